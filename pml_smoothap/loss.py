"""The pytorch-metric-learning glue: SmoothAPLoss builds each query's masks and reduces per query."""
import sys

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from . import ops


def _pair_mask(rows, cols, shape, device, kind):
    """(Q, N) bool mask, True at the mined (row, col) pairs."""
    rows, cols = c_f.to_device(rows, device=device), c_f.to_device(cols, device=device)
    if len(rows) and not (
        0 <= rows.min() and rows.max() < shape[0] and 0 <= cols.min() and cols.max() < shape[1]
    ):
        raise ValueError(f"indices_tuple has a {kind} pair outside the (queries, items) range")
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    mask[rows, cols] = True
    return mask


def query_masks(labels, ref_labels, indices_tuple, shape, self_ranking, include_self, device):
    """(pos_mask, valid_mask, has_term) as DESIGN.md §1 defines them: (Q, N) bool masks of each
    query's positives and retrieval set (``valid_mask`` None: every item), and (Q,) bool, True
    for the queries with a positive other than themselves.

    Without ``indices_tuple`` the positives are the items with the query's label and every item
    is ranked. With it, pairs ``(a1, p, a2, n)`` (triplets are converted) give each anchor's
    positives and negatives, and only those are ranked. When the batch is ranked against
    itself, the query's own column is a positive iff ``include_self``, and never ranked otherwise.
    """
    n_queries, n_items = shape
    if indices_tuple is None:
        if ref_labels is None:
            raise ValueError("ref_labels are required with ref_emb when indices_tuple is None")
        pos_mask = labels.unsqueeze(1) == ref_labels.unsqueeze(0)
        valid_mask = None
    else:
        if len(indices_tuple) not in (3, 4):
            raise ValueError("indices_tuple must hold triplets (a, p, n) or pairs (a1, p, a2, n)")
        a1, p, a2, n = lmu.convert_to_pairs(indices_tuple, labels, ref_labels)
        pos_mask = _pair_mask(a1, p, shape, device, "positive")
        valid_mask = _pair_mask(a2, n, shape, device, "negative") | pos_mask
    if not self_ranking:
        return pos_mask, valid_mask, pos_mask.any(1)
    # The masks are new tensors: their diagonals are set in place.
    has_term = pos_mask.fill_diagonal_(False).any(1)
    pos_mask.fill_diagonal_(include_self)
    if valid_mask is not None:
        valid_mask.fill_diagonal_(include_self)
    elif not include_self:
        valid_mask = ~torch.eye(n_queries, dtype=torch.bool, device=device)
    return pos_mask, valid_mask, has_term


class SmoothAPLoss(BaseMetricLossFunction):
    """Smooth-AP (Brown et al., ECCV 2020) for any labels, order and class sizes.

    Each query's loss is ``1 - smooth AP`` of its positives among its retrieval set (see
    :func:`pml_smoothap.smooth_ap` and DESIGN.md §1); queries with no positive other than
    themselves have no term. Per-query losses go to the reducer under the key ``"loss"``.

    Args:
        temperature: τ of the sigmoid that smooths the rank (finite, > 0).
        include_self: when the batch is ranked against itself, count the query as its own
            positive, as the authors do. False gives the leave-one-out AP of retrieval metrics.
        backend: "auto", "torch" or "triton" (see :func:`pml_smoothap.smooth_ap`).
        workspace_bytes: bound on the temporaries of the "torch" backend (None: 4 MiB on CPU,
            64 MiB on other devices).
        **kwargs: ``distance``, ``reducer``, ``embedding_regularizer``... for the base class.
    """

    def __init__(
        self,
        temperature=0.01,
        include_self=True,
        backend="auto",
        workspace_bytes=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.temperature = ops.check_temperature(temperature)
        self.include_self = bool(include_self)
        self.backend = ops.check_backend(backend)
        self.workspace_bytes = ops.check_workspace(workspace_bytes)
        self.add_to_recordable_attributes(list_of_names=["temperature"], is_stat=False)

    def get_default_distance(self):
        return CosineSimilarity()

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        # Data-dependent masks, grouping and chunk loops: torch.compile would only split this
        # into many small graphs, slower than eager (benchmarks/torch_compile.py), so it runs
        # eagerly. torch.compile can only be tracing when torch._dynamo has been imported;
        # decorating at import would import it (seconds) for everyone.
        if "torch._dynamo" in sys.modules:
            return torch.compiler.disable(self._compute_loss)(
                embeddings, labels, indices_tuple, ref_emb, ref_labels
            )
        return self._compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_or_indices_tuple_required(labels, indices_tuple)
        if len(embeddings) == 0 or len(ref_emb) == 0:
            return self.zero_losses()
        self_ranking = ref_emb is embeddings  # set by c_f.set_ref_emb when ref_emb is None
        scores = self.distance(embeddings, ref_emb)
        if scores.shape != (len(embeddings), len(ref_emb)):
            raise ValueError(
                f"{type(self.distance).__name__} returned shape {tuple(scores.shape)}, expected "
                f"a (queries, items) matrix {(len(embeddings), len(ref_emb))}"
            )
        if not self.distance.is_inverted:
            scores = -scores
        pos_mask, valid_mask, has_term = query_masks(
            labels,
            ref_labels,
            indices_tuple,
            scores.shape,
            self_ranking,
            self.include_self,
            scores.device,
        )
        queries = has_term.nonzero().squeeze(1)
        if len(queries) == 0:
            return self.zero_losses()
        if len(queries) < len(has_term):  # the AP of a query without a term is not computed
            pos_mask = pos_mask & has_term.unsqueeze(1)
        ap = ops.smooth_ap(
            scores,
            pos_mask,
            valid_mask,
            self.temperature,
            self.backend,
            self.workspace_bytes,
        )[queries]
        return {
            "loss": {
                "losses": (1 - ap).to(embeddings.dtype),
                "indices": queries,
                "reduction_type": "element",
            }
        }
