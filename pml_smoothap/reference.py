"""Two independent references for tests and benchmarks (slow on purpose: read, don't train).

* :func:`authors_smooth_ap_loss`: the authors' batched formula (Brown et al. 2020, the seed's
  ``SmoothAP.forward``), ported device-agnostic. It builds B×B×B tensors and needs batches
  ordered by class with equal class sizes.
* :func:`per_query_smooth_ap` with :func:`reference_sets`: a plain loop over queries and
  positives straight from DESIGN.md §1, for any labels, mined pairs and reference sets;
  :func:`per_query_smooth_ap_from_masks` is the same loop for the functional API's masks.
"""
import torch


def _authors_sigmoid(x, temperature):
    exponent = torch.clamp(-x / temperature, min=-50, max=50)
    return 1.0 / (1.0 + torch.exp(exponent))


def authors_smooth_ap_loss(preds, num_id, temperature=0.01):
    """1 - mean smooth AP of a (B, D) batch of ``num_id`` classes, ordered, B/num_id each.

    Scores are raw dot products ``preds @ preds.T``, as in the authors' ``compute_aff``.
    """
    batch_size, feat_dims = preds.shape
    assert batch_size % num_id == 0
    group = batch_size // num_id
    device, dtype = preds.device, preds.dtype

    mask = 1.0 - torch.eye(batch_size, device=device, dtype=dtype)
    mask = mask.unsqueeze(dim=0).repeat(batch_size, 1, 1)
    sim_all = preds @ preds.t()
    sim_all_repeat = sim_all.unsqueeze(dim=1).repeat(1, batch_size, 1)
    sim_diff = sim_all_repeat - sim_all_repeat.permute(0, 2, 1)
    sim_sg = _authors_sigmoid(sim_diff, temperature) * mask
    sim_all_rk = torch.sum(sim_sg, dim=-1) + 1

    xs = preds.view(num_id, group, feat_dims)
    pos_mask = 1.0 - torch.eye(group, device=device, dtype=dtype)
    pos_mask = pos_mask.unsqueeze(dim=0).unsqueeze(dim=0).repeat(num_id, group, 1, 1)
    sim_pos = torch.bmm(xs, xs.permute(0, 2, 1))
    sim_pos_repeat = sim_pos.unsqueeze(dim=2).repeat(1, 1, group, 1)
    sim_pos_diff = sim_pos_repeat - sim_pos_repeat.permute(0, 1, 3, 2)
    sim_pos_sg = _authors_sigmoid(sim_pos_diff, temperature) * pos_mask
    sim_pos_rk = torch.sum(sim_pos_sg, dim=-1) + 1

    ap = torch.zeros(1, device=device, dtype=dtype)
    for ind in range(num_id):
        block = slice(ind * group, (ind + 1) * group)
        pos_divide = torch.sum(sim_pos_rk[ind] / sim_all_rk[block, block])
        ap = ap + (pos_divide / group) / batch_size
    return 1 - ap


def reference_sets(labels, ref_labels=None, indices_tuple=None, include_self=True):
    """Each query's positives and retrieval set as Python sets (DESIGN.md §1).

    ``ref_labels=None`` means the batch is ranked against itself. ``indices_tuple`` holds
    pairs ``(a1, p, a2, n)`` or triplets ``(a, p, n)``; with it ``labels`` may be None when
    ``ref_labels`` is None only if the number of queries is given by ``len(labels)``.
    """
    labels = [int(x) for x in labels]
    self_ranking = ref_labels is None
    ref = labels if self_ranking else [int(x) for x in ref_labels]
    n_queries = len(labels)
    if indices_tuple is None:
        positives = [{j for j, r in enumerate(ref) if r == labels[q]} for q in range(n_queries)]
        retrieval = [set(range(len(ref))) for _ in range(n_queries)]
    else:
        if len(indices_tuple) == 3:
            a, p, n = indices_tuple
            indices_tuple = (a, p, a, n)
        a1, p, a2, n = (t.tolist() for t in indices_tuple)
        positives = [set() for _ in range(n_queries)]
        retrieval = [set() for _ in range(n_queries)]
        for q, j in zip(a1, p):
            positives[q].add(j)
            retrieval[q].add(j)
        for q, j in zip(a2, n):
            retrieval[q].add(j)
    if self_ranking:
        for q in range(n_queries):
            for s in (positives[q], retrieval[q]):
                s.add(q) if include_self else s.discard(q)
    return positives, retrieval


def per_query_smooth_ap(scores, positives, retrieval, temperature):
    """List of each query's smooth AP (a 0-dim tensor, differentiable), None without positives."""
    out = []
    for q in range(scores.shape[0]):
        if not positives[q]:
            out.append(None)
            continue
        terms = []
        for i in sorted(positives[q]):
            others_all = [j for j in sorted(retrieval[q]) if j != i]
            others_pos = [j for j in sorted(positives[q]) if j != i]
            sig_all = torch.sigmoid((scores[q, others_all] - scores[q, i]) / temperature)
            sig_pos = torch.sigmoid((scores[q, others_pos] - scores[q, i]) / temperature)
            terms.append((1 + sig_pos.sum()) / (1 + sig_all.sum()))
        out.append(torch.stack(terms).mean())
    return out


def per_query_smooth_ap_from_masks(scores, pos_mask, valid_mask, temperature):
    """(Q,) smooth AP from the per-query loop, for (Q, N) bool masks (``valid_mask`` None: every
    item ranked); NaN for a query without positives. Differentiable."""
    valid_mask = torch.ones_like(pos_mask) if valid_mask is None else valid_mask
    positives = [set(row.nonzero().flatten().tolist()) for row in pos_mask]
    retrieval = [set(row.nonzero().flatten().tolist()) for row in valid_mask]
    aps = per_query_smooth_ap(scores, positives, retrieval, temperature)
    nan = scores.new_tensor(float("nan"))
    return torch.stack([nan if ap is None else ap for ap in aps])


def reference_loss(
    embeddings, labels, distance, temperature=0.01, include_self=True,
    indices_tuple=None, ref_emb=None, ref_labels=None,
):
    """Mean over queries with a term of 1 - smooth AP (what SmoothAPLoss gives with MeanReducer),
    and the list of those queries. 0-dim zero tensor and [] when no query has a term."""
    scores = distance(embeddings, ref_emb)
    if not distance.is_inverted:
        scores = -scores
    positives, retrieval = reference_sets(
        labels, None if ref_emb is None else ref_labels, indices_tuple, include_self
    )
    self_ranking = ref_emb is None
    aps = per_query_smooth_ap(scores, positives, retrieval, temperature)
    queries = [
        q for q, ap in enumerate(aps) if ap is not None and (positives[q] - ({q} if self_ranking else set()))
    ]
    if not queries:
        return embeddings.sum() * 0, []
    return torch.stack([1 - aps[q] for q in queries]).mean(), queries
