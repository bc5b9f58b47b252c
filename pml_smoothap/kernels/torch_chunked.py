"""Chunked PyTorch backend for smooth AP (DESIGN.md §1-§3), on any device.

Queries are grouped by their number of positives ``p``. For a block of ``q`` queries of one group
the sigmoid of every (query, positive, item) difference is a ``(q, p, N)`` tensor; blocks are
sized so that it stays within a workspace, so nothing of size B³ or (all pairs × N) is ever held.
The backward recomputes the sigmoid instead of storing it: only ``A`` and ``R`` (one value per
(query, positive) pair) and the scaled scores are saved.
"""
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

# Blocks that stay in a CPU's cache make the element-wise passes over them cheap (measured with
# benchmarks/bench_cpu.py); on GPUs larger blocks mean fewer kernel launches.
CPU_WORKSPACE_BYTES = 4 * 2**20
DEVICE_WORKSPACE_BYTES = 64 * 2**20


class PositiveGroup(NamedTuple):
    """Queries that have the same number ``p`` of positives."""

    queries: torch.Tensor  # (Qg,) long: rows of the score matrix, ascending
    positives: torch.Tensor  # (Qg, p) long: column of each positive, ascending
    first_query: Optional[int]  # set when the rows are consecutive: they are then read as views


def group_by_positive_count(pos_mask: torch.Tensor) -> List[PositiveGroup]:
    """Split the rows of a (Q, N) bool mask by their number of positives (rows with none dropped)."""
    rows, cols = pos_mask.nonzero(as_tuple=True)  # row-major; cheaper than summing a bool mask
    counts = torch.bincount(rows, minlength=pos_mask.shape[0])
    sizes = counts.unique().tolist()
    if len(sizes) > 1:  # order the entries by their row's count, rows staying in order
        cols = cols[torch.argsort(counts[rows], stable=True)]
    groups, start = [], 0
    for p in sizes:
        if p == 0:
            continue
        queries = (counts == p).nonzero().squeeze(1)
        first, last = int(queries[0]), int(queries[-1])
        consecutive = last - first + 1 == len(queries)
        positives = cols[start : start + len(queries) * p].view(-1, p)
        start += positives.numel()
        groups.append(PositiveGroup(queries, positives, first if consecutive else None))
    return groups


def rank_dtype(dtype: torch.dtype) -> torch.dtype:
    """Ranks are computed in float64 for float64 scores, in float32 otherwise (DESIGN.md §4)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_scores(scores, valid_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """``scores * scale`` in the rank dtype, with items outside ``valid_mask`` set to -inf.

    A -inf item contributes sigmoid(-inf) = 0 to every rank and gets a zero gradient, so the
    retrieval mask costs nothing inside the rank loops.
    """
    out = scores.to(rank_dtype(scores.dtype)) * scale
    if valid_mask is not None:
        out.masked_fill_(~valid_mask, float("-inf"))
    return out


def _blocks(group: PositiveGroup, n_items: int, max_elems: int):
    """(query slice, positive slice) pairs whose (q, p, N) block holds at most ``max_elems``
    elements (or one row of N when a single row is larger)."""
    n_queries, p = group.positives.shape
    if p * n_items <= max_elems:
        step = max(1, max_elems // (p * n_items))
        for q0 in range(0, n_queries, step):
            yield slice(q0, min(q0 + step, n_queries)), slice(0, p)
    else:
        step = max(1, max_elems // n_items)
        for q0 in range(n_queries):
            for p0 in range(0, p, step):
                yield slice(q0, q0 + 1), slice(p0, min(p0 + step, p))


def _block_buffer(scaled, groups: List[PositiveGroup], max_elems: int) -> torch.Tensor:
    """One flat buffer that every block of every group fits in, reused from block to block (a
    fresh allocation per block would pay for zeroing new pages each time)."""
    n_items = scaled.shape[1]
    largest = 0
    for group in groups:
        qs, ps = next(_blocks(group, n_items, max_elems))
        largest = max(largest, (qs.stop - qs.start) * (ps.stop - ps.start) * n_items)
    return torch.empty(largest, dtype=scaled.dtype, device=scaled.device)


def _differences(buffer, rows, anchors):
    """(q, pb, N) view of ``buffer`` holding rows[q, j] - anchors[q, i]."""
    shape = (rows.shape[0], anchors.shape[1], rows.shape[1])
    out = buffer[: shape[0] * shape[1] * shape[2]].view(shape)
    return torch.sub(rows.unsqueeze(1), anchors.unsqueeze(2), out=out)


def _rows(t: torch.Tensor, group: PositiveGroup, qs: slice) -> torch.Tensor:
    """Rows of ``t`` for the group's queries ``qs``: a view when the rows are consecutive."""
    if group.first_query is not None:
        return t[group.first_query + qs.start : group.first_query + qs.stop]
    return t.index_select(0, group.queries[qs])


def _block_scores(scaled, group: PositiveGroup, qs: slice, ps: slice):
    """The block's rows (q, N), their positives' scores (q, p) and its anchors (q, pb)."""
    rows = _rows(scaled, group, qs)
    pos_scores = rows.gather(1, group.positives[qs])
    return rows, pos_scores, pos_scores[:, ps]


def _add_to_rows(grad: torch.Tensor, group: PositiveGroup, qs: slice, values: torch.Tensor):
    if group.first_query is not None:
        _rows(grad, group, qs).add_(values)
    else:
        grad.index_add_(0, group.queries[qs], values)


def sigmoid_(x):
    return x.sigmoid_()


def heaviside_(x):
    """The τ → 0 limit of the sigmoid: 0, 1/2 at ties, 1."""
    return x.sign_().add_(1).mul_(0.5)


def group_ranks(
    scaled: torch.Tensor, group: PositiveGroup, squash: Callable, max_elems: int, buffer
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Smooth ranks of each positive of each query in ``group``.

    Returns ``A`` (among retrieved items) and ``R`` (among positives), both (Qg, p). The term
    j = i contributes squash(0) = 1/2 to each sum, so ``1 + Σ_{j≠i}`` is ``1/2 + Σ_j``.
    """
    A = torch.empty(group.positives.shape, dtype=scaled.dtype, device=scaled.device)
    R = torch.empty_like(A)
    for qs, ps in _blocks(group, scaled.shape[1], max_elems):
        rows, pos_scores, anchors = _block_scores(scaled, group, qs, ps)
        A[qs, ps] = squash(_differences(buffer, rows, anchors)).sum(2).add_(0.5)
        R[qs, ps] = squash(pos_scores.unsqueeze(1) - anchors.unsqueeze(2)).sum(2).add_(0.5)
    return A, R


def average_precision_from_ranks(
    scaled: torch.Tensor, groups: List[PositiveGroup], ranks, out_dtype
) -> torch.Tensor:
    """(Q,) mean over positives of R / A; NaN for a query without positives."""
    ap = torch.full((scaled.shape[0],), float("nan"), dtype=scaled.dtype, device=scaled.device)
    for group, (A, R) in zip(groups, ranks):
        ap[group.queries] = (R / A).mean(1)
    return ap.to(out_dtype)


def scaled_score_grad(scaled, groups, ranks, grad_ap, max_elems) -> torch.Tensor:
    """∂L/∂scaled (Q, N) from ∂L/∂AP (Q,), by DESIGN.md §3 with σ recomputed block by block."""
    grad = torch.zeros_like(scaled)
    buffer = _block_buffer(scaled, groups, max_elems)
    for group, (A, R) in zip(groups, ranks):
        p = group.positives.shape[1]
        alpha = grad_ap[group.queries].unsqueeze(1) / (p * A)  # coefficient of R
        beta = -alpha * R / A  # coefficient of A
        grad_pos = torch.zeros_like(A)  # gradient collected at the positives' columns
        for qs, ps in _blocks(group, scaled.shape[1], max_elems):
            rows, pos_scores, anchors = _block_scores(scaled, group, qs, ps)
            # A-terms: w[q, i, j] = β[q, i] σ'(x); ∂s[q, j] += w, ∂s[q, i] -= Σ_j w.
            u = _differences(buffer, rows, anchors).sigmoid_()
            w = torch.ops.aten.sigmoid_backward.grad_input(
                beta[qs, ps].unsqueeze(2).expand_as(u), u, grad_input=u
            )
            _add_to_rows(grad, group, qs, w.sum(1))
            grad_pos[qs, ps] -= w.sum(2)
            # R-terms, over positive columns only.
            u = (pos_scores.unsqueeze(1) - anchors.unsqueeze(2)).sigmoid_()
            w = alpha[qs, ps].unsqueeze(2) * u * (1 - u)
            grad_pos[qs] += w.sum(1)
            grad_pos[qs, ps] -= w.sum(2)
        grad.index_put_(
            (group.queries.unsqueeze(1).expand_as(group.positives), group.positives),
            grad_pos,
            accumulate=True,
        )
    return grad


class SmoothAPFunction(torch.autograd.Function):
    """(scores (Q, N), pos_mask, valid_mask | None, temperature, max_elems) → smooth AP (Q,)."""

    @staticmethod
    def forward(ctx, scores, pos_mask, valid_mask, temperature, max_elems):
        scaled = masked_scores(scores, valid_mask, 1.0 / temperature)
        groups = group_by_positive_count(pos_mask)
        buffer = _block_buffer(scaled, groups, max_elems)
        ranks = [group_ranks(scaled, g, sigmoid_, max_elems, buffer) for g in groups]
        ctx.groups, ctx.temperature, ctx.max_elems = groups, temperature, max_elems
        ctx.scores_dtype = scores.dtype
        ctx.save_for_backward(scaled, *[t for AR in ranks for t in AR])
        return average_precision_from_ranks(scaled, groups, ranks, scores.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ap):
        scaled, *flat = ctx.saved_tensors
        ranks = list(zip(flat[0::2], flat[1::2]))
        # scaled = scores / τ: the chain rule's 1/τ is folded into ∂L/∂AP (in the rank dtype).
        grad_ap = grad_ap.to(scaled.dtype) / ctx.temperature
        grad = scaled_score_grad(scaled, ctx.groups, ranks, grad_ap, ctx.max_elems)
        return grad.to(ctx.scores_dtype), None, None, None, None


def _max_elems(scores, workspace_bytes: Optional[int]) -> int:
    """How many rank-dtype elements one (q, p, N) block may hold."""
    if workspace_bytes is None:
        cpu = scores.device.type == "cpu"
        workspace_bytes = CPU_WORKSPACE_BYTES if cpu else DEVICE_WORKSPACE_BYTES
    return max(1, workspace_bytes * 8 // torch.finfo(rank_dtype(scores.dtype)).bits)


def smooth_ap(scores, pos_mask, valid_mask, temperature, workspace_bytes):
    max_elems = _max_elems(scores, workspace_bytes)
    return SmoothAPFunction.apply(scores, pos_mask, valid_mask, temperature, max_elems)


@torch.no_grad()
def average_precision(scores, pos_mask, valid_mask, workspace_bytes):
    max_elems = _max_elems(scores, workspace_bytes)
    scaled = masked_scores(scores, valid_mask, 1.0)
    groups = group_by_positive_count(pos_mask)
    buffer = _block_buffer(scaled, groups, max_elems)
    ranks = [group_ranks(scaled, g, heaviside_, max_elems, buffer) for g in groups]
    return average_precision_from_ranks(scaled, groups, ranks, scores.dtype)
