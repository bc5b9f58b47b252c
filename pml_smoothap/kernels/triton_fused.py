"""Fused Triton backend for smooth AP (DESIGN.md §1, §3, §5), for any positive / retrieval masks.

The kernels read the (Q, N) scores (scaled by 1/τ after loading, in float32 whatever the input
dtype; items outside the retrieval set are -inf, so σ = 0 and σ' = 0 there) and a padded
(Q, Pmax) int32 table of each query's positive columns. A program holds a tile of BLOCK_P
positives of one query and streams that query's row in BLOCK_N columns; nothing of size
(pairs × N) is written.

* forward (grid Q × column splits; one split unless there are few queries): per positive i,
  ``A = 1/2 + Σ_j σ(s_j - s_i)`` over the row (σ(0) = 1/2 is the j = i term), ``R`` the same
  over the positive columns, and ``slope = Σ_j σ'(s_j - s_i)``, which the backward needs and
  which does not depend on ∂L/∂AP. Split 0 adds the 1/2 and R; further splits add partial sums.
* backward, items (grid Q × column blocks): ``∂s_j = Σ_i β_i σ'(s_j - s_i)`` — each program owns
  a block of one row and sums over all positive tiles in registers: no atomics, deterministic.
* backward, positives (grid Q): adds to each positive column ``-β_i slope_i`` (its A-terms as an
  anchor) and ``Σ_k (α_k - α_i) σ'(s_k - s_i)`` (its R-terms as receiver and as anchor).

with ``α_i = g / (n A_i)`` and ``β_i = -g R_i / (n A_i²)`` (DESIGN.md §3), computed in the kernels
from ``g = ∂L/∂AP_q``, ``n = |P_q|``, A and R: the backward is two launches. Float64 scores are
not handled here: the kernels accumulate in float32, so ``ops.resolve_backend`` sends them to
"torch".
"""
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable
from triton.runtime.interpreter import InterpretedFunction

from .torch_chunked import masked_scores

TILE_ELEMS = 4096  # BLOCK_P × BLOCK_N elements per loop step
MIN_BLOCK_P, MAX_BLOCK_P, MIN_BLOCK_N = 2, 16, 16
TABLE_BLOCK = 1024  # mask columns per step when building the table of positives
FORWARD_PROGRAMS = 4096  # split rows into column ranges below this many queries


@triton.jit
def _load_positive_tile(row, stride_sn, table_row, stride_tp, p0, n_pos, scale,
                        BLOCK_P: tl.constexpr):
    """Offsets, liveness, columns and scaled float32 scores (0 where not live) of positives
    p0 .. p0 + BLOCK_P of one query."""
    offs = p0 + tl.arange(0, BLOCK_P)
    live = offs < n_pos
    cols = tl.load(table_row + offs * stride_tp, mask=live, other=0)
    scores = tl.load(row + cols * stride_sn, mask=live, other=0.0).to(tl.float32) * scale
    return offs, live, cols, scores


@triton.jit
def _smooth_ap_fwd_kernel(
    scores_ptr, stride_sq, stride_sn,
    table_ptr, stride_tq, stride_tp,
    counts_ptr,
    partial_all_ptr, partial_slope_ptr, stride_ps, stride_pq, stride_pp,
    rank_pos_ptr, stride_rq, stride_rp,
    n_items, split_cols, scale,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For one query and one split of ``split_cols`` columns: Σ_j σ and Σ_j σ' of each live
    positive (``partial_*[split, q, :]``); split 0 adds 1/2 to the former and writes R
    (``rank_pos[q, :]``)."""
    q = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row = scores_ptr + q * stride_sq
    table_row = table_ptr + q * stride_tq
    n_pos = tl.load(counts_ptr + q)
    col_start = split * split_cols
    col_end = tl.minimum(col_start + split_cols, n_items)
    for p0 in range(0, n_pos, BLOCK_P):
        offs, live, _, anchors = _load_positive_tile(
            row, stride_sn, table_row, stride_tp, p0, n_pos, scale, BLOCK_P)
        # Element-wise accumulators, reduced once after the loop (no reduction per block).
        sig_sum = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        slope_sum = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for n0 in range(col_start, col_end, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            items = tl.load(row + cols * stride_sn, mask=cols < col_end,
                            other=float("-inf")).to(tl.float32) * scale
            u = tl.sigmoid(items[None, :] - anchors[:, None])
            sig_sum += u
            slope_sum += u - u * u
        partial = split.to(tl.int64) * stride_ps + q * stride_pq + offs * stride_pp
        self_term = tl.where(split == 0, 0.5, 0.0)  # σ(0) of j = i, counted once
        tl.store(partial_all_ptr + partial, tl.sum(sig_sum, axis=1) + self_term, mask=live)
        tl.store(partial_slope_ptr + partial, tl.sum(slope_sum, axis=1), mask=live)
        if split == 0:
            rank_pos = tl.zeros([BLOCK_P], dtype=tl.float32)
            for k0 in range(0, n_pos, BLOCK_P):
                _, k_live, _, others = _load_positive_tile(
                    row, stride_sn, table_row, stride_tp, k0, n_pos, scale, BLOCK_P)
                u = tl.sigmoid(others[None, :] - anchors[:, None])
                rank_pos += tl.sum(tl.where(k_live[None, :], u, 0.0), axis=1)
            tl.store(rank_pos_ptr + q * stride_rq + offs * stride_rp, rank_pos + 0.5, mask=live)


@triton.jit
def _load_coefficients(rank_all_row, rank_pos_row, stride_cp, offs, live, grad_per_pos):
    """α = g / (n A) and β = -g R / (n A²) of the positives ``offs`` (0 where not live), from
    ``grad_per_pos`` = g / n."""
    rank_all = tl.load(rank_all_row + offs * stride_cp, mask=live, other=1.0)
    rank_pos = tl.load(rank_pos_row + offs * stride_cp, mask=live, other=0.0)
    alpha = tl.where(live, grad_per_pos / rank_all, 0.0)
    return alpha, -alpha * rank_pos / rank_all


@triton.jit
def _smooth_ap_bwd_items_kernel(
    scores_ptr, stride_sq, stride_sn,
    table_ptr, stride_tq, stride_tp,
    counts_ptr,
    grad_ap_ptr, stride_ga,
    rank_all_ptr, rank_pos_ptr, stride_cq, stride_cp,
    grad_ptr, stride_gq, stride_gn,
    n_items, scale,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad[q, j] = scale · Σ_i β_i σ'(s_j - s_i) for one block of columns of one query."""
    q = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = scores_ptr + q * stride_sq
    table_row = table_ptr + q * stride_tq
    n_pos = tl.load(counts_ptr + q)
    grad_per_pos = tl.load(grad_ap_ptr + q * stride_ga).to(tl.float32) / tl.maximum(n_pos, 1)
    items = tl.load(row + cols * stride_sn, mask=cols < n_items,
                    other=float("-inf")).to(tl.float32) * scale
    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)  # reduced over positives at the end
    for p0 in range(0, n_pos, BLOCK_P):
        offs, live, _, anchors = _load_positive_tile(
            row, stride_sn, table_row, stride_tp, p0, n_pos, scale, BLOCK_P)
        _, beta = _load_coefficients(rank_all_ptr + q * stride_cq, rank_pos_ptr + q * stride_cq,
                                     stride_cp, offs, live, grad_per_pos)
        u = tl.sigmoid(items[None, :] - anchors[:, None])
        acc += beta[:, None] * (u - u * u)
    grad = tl.sum(acc, axis=0) * scale
    tl.store(grad_ptr + q * stride_gq + cols * stride_gn, grad, mask=cols < n_items)


@triton.jit
def _smooth_ap_bwd_positives_kernel(
    scores_ptr, stride_sq, stride_sn,
    table_ptr, stride_tq, stride_tp,
    counts_ptr,
    grad_ap_ptr, stride_ga,
    rank_all_ptr, rank_pos_ptr, slope_ptr, stride_cq, stride_cp,
    grad_ptr, stride_gq, stride_gn,
    scale,
    BLOCK_P: tl.constexpr,
):
    """Adds each positive's anchor terms to grad at its column; one program per query."""
    q = tl.program_id(0).to(tl.int64)
    row = scores_ptr + q * stride_sq
    table_row = table_ptr + q * stride_tq
    rank_all_row, rank_pos_row = rank_all_ptr + q * stride_cq, rank_pos_ptr + q * stride_cq
    n_pos = tl.load(counts_ptr + q)
    grad_per_pos = tl.load(grad_ap_ptr + q * stride_ga).to(tl.float32) / tl.maximum(n_pos, 1)
    for p0 in range(0, n_pos, BLOCK_P):
        offs, live, cols, anchors = _load_positive_tile(
            row, stride_sn, table_row, stride_tp, p0, n_pos, scale, BLOCK_P)
        alpha, beta = _load_coefficients(rank_all_row, rank_pos_row, stride_cp, offs, live,
                                         grad_per_pos)
        slope = tl.load(slope_ptr + q * stride_cq + offs * stride_cp, mask=live, other=0.0)
        acc = -beta * slope
        for k0 in range(0, n_pos, BLOCK_P):
            k_offs, k_live, _, others = _load_positive_tile(
                row, stride_sn, table_row, stride_tp, k0, n_pos, scale, BLOCK_P)
            alpha_k, _ = _load_coefficients(rank_all_row, rank_pos_row, stride_cp, k_offs, k_live,
                                            grad_per_pos)
            u = tl.sigmoid(others[None, :] - anchors[:, None])
            d = tl.where(k_live[None, :], u - u * u, 0.0)
            acc += tl.sum(alpha_k[None, :] * d, axis=1) - alpha * tl.sum(d, axis=1)
        grad_cols = grad_ptr + q * stride_gq + cols * stride_gn
        tl.store(grad_cols, tl.load(grad_cols, mask=live, other=0.0) + acc * scale, mask=live)


@triton.jit
def _positive_table_kernel(
    flags_ptr, stride_fq, stride_fn,
    table_ptr, stride_tq, stride_tp,
    n_items,
    BLOCK_N: tl.constexpr,
):
    """Writes the columns of the nonzero flags of one row, in order, to its row of the table."""
    q = tl.program_id(0).to(tl.int64)
    found = 0
    for n0 in range(0, n_items, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        flag = tl.load(flags_ptr + q * stride_fq + cols * stride_fn, mask=cols < n_items, other=0)
        flag = (flag != 0).to(tl.int32)
        slots = found + tl.cumsum(flag, axis=0) - flag
        tl.store(table_ptr + q * stride_tq + slots * stride_tp, cols, mask=flag != 0)
        found += tl.sum(flag, axis=0)


# @triton.jit builds, at import, kernels for Triton's CPU interpreter when TRITON_INTERPRET=1 is
# set (every Triton version): those run on CPU tensors, compiled ones need CUDA tensors.
INTERPRETED = isinstance(_positive_table_kernel, InterpretedFunction)


class BlockSizes(NamedTuple):
    positives: int  # BLOCK_P: positives per tile
    items: int  # BLOCK_N: columns per block


def default_block_sizes(max_positives: int, n_items: int) -> BlockSizes:
    """Tiles of about TILE_ELEMS elements, no larger than the problem needs."""
    block_p = max(MIN_BLOCK_P, min(triton.next_power_of_2(max(max_positives, 1)), MAX_BLOCK_P))
    block_n = max(MIN_BLOCK_N, min(TILE_ELEMS // block_p, triton.next_power_of_2(max(n_items, 1))))
    return BlockSizes(block_p, block_n)


def positive_table(pos_mask: torch.Tensor, block_items: int = TABLE_BLOCK
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(table (Q, Pmax) int32: each row's positive columns ascending, -1 padded; counts (Q,) int32).

    One pass of a Triton kernel over the mask, ``block_items`` columns at a time: a prefix sum
    per block gives each positive its slot.
    """
    _check_device(pos_mask)
    n_queries, n_items = pos_mask.shape
    counts = pos_mask.sum(1, dtype=torch.int32)
    max_positives = int(counts.max()) if n_queries else 0
    table = torch.full((n_queries, max(max_positives, 1)), -1, dtype=torch.int32,
                       device=pos_mask.device)
    if max_positives:
        flags = pos_mask.view(torch.uint8)
        _positive_table_kernel[(n_queries,)](
            flags, flags.stride(0), flags.stride(1), table, table.stride(0), table.stride(1),
            n_items, BLOCK_N=min(block_items, triton.next_power_of_2(n_items)),
        )
    return table, counts


def _check_device(scores):
    if scores.device.type != "cuda" and not INTERPRETED:
        raise ValueError(
            "the Triton kernels were compiled for CUDA; to run them on CPU tensors set "
            "TRITON_INTERPRET=1 before pml_smoothap.kernels.triton_fused is first imported"
        )


def forward_splits(n_queries: int, n_items: int, block_items: int) -> Tuple[int, int]:
    """(number of column splits, columns per split, a multiple of ``block_items``): enough
    forward programs to fill a large GPU when there are few queries."""
    n_blocks = triton.cdiv(n_items, block_items)
    wanted = min(n_blocks, max(1, triton.cdiv(FORWARD_PROGRAMS, max(n_queries, 1))))
    split_cols = triton.cdiv(n_blocks, wanted) * block_items
    return triton.cdiv(n_items, split_cols), split_cols


def smooth_ap_ranks(scores, table, counts, temperature, block_sizes: BlockSizes):
    """(A, R, slope), each (Q, Pmax) float32, from ``scores`` (Q, N) with -inf outside the
    retrieval sets. Padding entries hold A = 1, R = 0, slope = 0. The sums over column splits
    are added in a fixed order, so the result is deterministic."""
    _check_device(scores)
    n_queries, n_items = scores.shape
    rank_pos = torch.zeros(table.shape, dtype=torch.float32, device=scores.device)
    if not (n_queries and n_items):
        return torch.ones_like(rank_pos), rank_pos, torch.zeros_like(rank_pos)
    n_splits, split_cols = forward_splits(n_queries, n_items, block_sizes.items)
    # The kernel overwrites live entries; A's padding keeps split 0's 1 and the others' 0.
    partial_all = torch.ones((n_splits, *table.shape), dtype=torch.float32, device=scores.device)
    if n_splits > 1:
        partial_all[1:] = 0.0
    partial_slope = torch.zeros_like(partial_all)
    _smooth_ap_fwd_kernel[(n_queries, n_splits)](
        scores, scores.stride(0), scores.stride(1),
        table, table.stride(0), table.stride(1),
        counts,
        partial_all, partial_slope, *partial_all.stride(),
        rank_pos, rank_pos.stride(0), rank_pos.stride(1),
        n_items, split_cols, 1.0 / temperature,
        BLOCK_P=block_sizes.positives, BLOCK_N=block_sizes.items,
    )
    if n_splits == 1:
        return partial_all[0], rank_pos, partial_slope[0]
    return partial_all.sum(0), rank_pos, partial_slope.sum(0)


def smooth_ap_score_grad(scores, table, counts, ranks, grad_ap, temperature,
                         block_sizes: BlockSizes) -> torch.Tensor:
    """∂L/∂scores (Q, N) float32 from ∂L/∂AP (Q,), DESIGN.md §3 with σ recomputed."""
    _check_device(scores)
    rank_all, rank_pos, slope = ranks  # (Q, Pmax) float32, one layout
    assert rank_all.stride() == rank_pos.stride() == slope.stride()
    n_queries, n_items = scores.shape
    grad = torch.empty((n_queries, n_items), dtype=torch.float32, device=scores.device)
    if n_queries and n_items:
        scale = 1.0 / temperature
        common = (scores, scores.stride(0), scores.stride(1),
                  table, table.stride(0), table.stride(1), counts,
                  grad_ap, grad_ap.stride(0))
        _smooth_ap_bwd_items_kernel[(n_queries, triton.cdiv(n_items, block_sizes.items))](
            *common, rank_all, rank_pos, *rank_all.stride(),
            grad, grad.stride(0), grad.stride(1), n_items, scale,
            BLOCK_P=block_sizes.positives, BLOCK_N=block_sizes.items,
        )
        _smooth_ap_bwd_positives_kernel[(n_queries,)](
            *common, rank_all, rank_pos, slope, *rank_all.stride(),
            grad, grad.stride(0), grad.stride(1), scale,
            BLOCK_P=block_sizes.positives,
        )
    return grad


class SmoothAPFunction(torch.autograd.Function):
    """(scores (Q, N), pos_mask, valid_mask | None, temperature, block_sizes | None) → AP (Q,).

    Same semantics as :class:`torch_chunked.SmoothAPFunction`: AP in the scores' dtype, NaN for
    a query without positives; ``block_sizes=None`` picks them from the shape.
    """

    @staticmethod
    def forward(ctx, scores, pos_mask, valid_mask, temperature, block_sizes):
        kernel_scores = scores if valid_mask is None else masked_scores(scores, valid_mask, 1.0)
        table, counts = positive_table(pos_mask)
        if block_sizes is None:
            block_sizes = default_block_sizes(table.shape[1], scores.shape[1])
        ranks = smooth_ap_ranks(kernel_scores, table, counts, temperature, block_sizes)
        rank_all, rank_pos, _ = ranks
        ap = (rank_pos / rank_all).sum(1) / counts  # 0 / 0 = NaN without positives
        ctx.temperature, ctx.block_sizes, ctx.scores_dtype = temperature, block_sizes, scores.dtype
        ctx.save_for_backward(kernel_scores, table, counts, *ranks)
        return ap.to(scores.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_ap):
        kernel_scores, table, counts, *ranks = ctx.saved_tensors
        grad = smooth_ap_score_grad(kernel_scores, table, counts, ranks, grad_ap,
                                    ctx.temperature, ctx.block_sizes)
        return grad.to(ctx.scores_dtype), None, None, None, None


def smooth_ap(scores, pos_mask, valid_mask, temperature, block_sizes: Optional[BlockSizes] = None):
    """Smooth AP (Q,) of float16 / bfloat16 / float32 ``scores`` (Q, N) under bool masks."""
    return SmoothAPFunction.apply(scores, pos_mask, valid_mask, temperature, block_sizes)
