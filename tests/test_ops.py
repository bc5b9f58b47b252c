"""The functional API: smooth_ap and average_precision on (Q, N) scores and boolean masks."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.metrics import average_precision_score

from pml_smoothap import average_precision, smooth_ap
from pml_smoothap.kernels.torch_chunked import SmoothAPFunction, _blocks, group_by_positive_count
from pml_smoothap.reference import per_query_smooth_ap_from_masks

TIGHT = dict(rtol=1e-9, atol=1e-11)
TINY_WORKSPACE = 64  # bytes: 8 float64 elements, smaller than most (positives × items) rows

temperatures = st.floats(-3, 0).map(lambda exponent: 10.0**exponent)  # log-uniform in [1e-3, 1]
shapes = st.tuples(st.integers(1, 6), st.integers(1, 9))


def bool_matrices(shape):
    return hnp.arrays(np.bool_, shape).map(torch.from_numpy)


def score_matrices(shape):
    return hnp.arrays(np.float64, shape, elements=st.floats(-1, 1)).map(torch.from_numpy)


@st.composite
def ranking_problems(draw, shape=shapes):
    """(scores, pos_mask, valid_mask or None): positives are a random subset of the ranked items."""
    shape = draw(shape)
    scores = draw(score_matrices(shape))
    pos_mask = draw(bool_matrices(shape))
    valid_mask = draw(st.none() | bool_matrices(shape).map(lambda m: m | pos_mask))
    return scores, pos_mask, valid_mask


def ap_and_grad(function, scores, *args, **kwargs):
    """Per-query values and the gradient of their sum over queries with positives."""
    scores = scores.clone().requires_grad_()
    ap = function(scores, *args, **kwargs)
    total = ap[~ap.isnan()].sum()
    if not total.requires_grad:  # the reference, when no query has a positive
        return ap.detach(), torch.zeros_like(scores)
    (grad,) = torch.autograd.grad(total, scores, allow_unused=True)
    return ap.detach(), torch.zeros_like(scores) if grad is None else grad


@given(problem=ranking_problems(), temperature=temperatures, transpose=st.booleans())
def test_smooth_ap_equals_per_query_reference(problem, temperature, transpose):
    """Random masks, queries without positives (NaN), and non-contiguous scores."""
    scores, pos_mask, valid_mask = problem
    if transpose:  # same values, non-contiguous layout
        scores = scores.t().contiguous().t()
    ap, grad = ap_and_grad(smooth_ap, scores, pos_mask, valid_mask, temperature)
    expected, expected_grad = ap_and_grad(
        per_query_smooth_ap_from_masks, scores, pos_mask, valid_mask, temperature
    )
    assert ap.isnan().tolist() == (~pos_mask.any(1)).tolist()
    torch.testing.assert_close(ap, expected, equal_nan=True, **TIGHT)
    torch.testing.assert_close(grad, expected_grad, **TIGHT)


@given(
    problem=ranking_problems(st.tuples(st.integers(1, 5), st.integers(1, 24))),
    temperature=temperatures,
    workspace_bytes=st.sampled_from([1, TINY_WORKSPACE, 8 * 24, 8 * 100]),
)
def test_small_workspace_gives_the_same_result(problem, temperature, workspace_bytes):
    """Chunking over queries, and over one query's positives when its (p × N) row is too big."""
    scores, pos_mask, valid_mask = problem
    ap, grad = ap_and_grad(smooth_ap, scores, pos_mask, valid_mask, temperature)
    chunked_ap, chunked_grad = ap_and_grad(
        smooth_ap, scores, pos_mask, valid_mask, temperature, workspace_bytes=workspace_bytes
    )
    torch.testing.assert_close(chunked_ap, ap, equal_nan=True, **TIGHT)
    torch.testing.assert_close(chunked_grad, grad, **TIGHT)
    exact = average_precision(scores, pos_mask, valid_mask)
    torch.testing.assert_close(
        average_precision(scores, pos_mask, valid_mask, workspace_bytes=workspace_bytes),
        exact,
        equal_nan=True,
        **TIGHT,
    )


@st.composite
def tie_free_problems(draw):
    """Scores with every row a permutation of 0..N-1 (gaps >= 1), and masks with a positive
    in every row."""
    n_queries, n_items = draw(shapes)
    rows = st.permutations(range(n_items))
    scores = torch.tensor(draw(st.lists(rows, min_size=n_queries, max_size=n_queries)))
    scores = scores.double() * draw(st.floats(0.1, 10))
    pos_mask = draw(bool_matrices((n_queries, n_items))).clone()
    first_positive = draw(hnp.arrays(np.int64, n_queries, elements=st.integers(0, n_items - 1)))
    pos_mask[torch.arange(n_queries), torch.from_numpy(first_positive)] = True
    valid_mask = draw(st.none() | bool_matrices((n_queries, n_items)).map(lambda m: m | pos_mask))
    return scores, pos_mask, valid_mask


@given(problem=tie_free_problems())
def test_average_precision_equals_sklearn_without_ties(problem):
    scores, pos_mask, valid_mask = problem
    ap = average_precision(scores, pos_mask, valid_mask)
    valid = torch.ones_like(pos_mask) if valid_mask is None else valid_mask
    expected = [
        average_precision_score(pos[v].numpy(), s[v].numpy())
        for s, pos, v in zip(scores, pos_mask, valid)
    ]
    torch.testing.assert_close(ap, torch.tensor(expected, dtype=ap.dtype), **TIGHT)


def test_average_precision_counts_a_tie_as_half():
    scores = torch.tensor([[1.0, 1.0, 0.0]])
    pos_mask = torch.tensor([[True, False, True]])
    # Positive 0 ties with the negative: rank 1.5 among all, 1 among positives. Positive 2: rank 3.
    assert average_precision(scores, pos_mask).item() == pytest.approx((1 / 1.5 + 2 / 3) / 2)


@given(problem=tie_free_problems())
def test_smooth_ap_approaches_average_precision_as_temperature_goes_to_zero(problem):
    scores, pos_mask, valid_mask = problem
    exact = average_precision(scores, pos_mask, valid_mask)
    gap = 0.1  # the smallest score difference tie_free_problems makes
    errors = [
        (smooth_ap(scores, pos_mask, valid_mask, temperature=gap * t) - exact).abs().max().item()
        for t in (0.1, 0.01)
    ]
    # Every sigmoid is within exp(-gap / τ) of its step, so each rank within N·exp(-gap / τ),
    # and R / A (with A >= R, A >= 1) within twice that.
    n_items = scores.shape[1]
    assert errors[0] <= 2 * n_items * math.exp(-10)
    assert errors[1] <= 1e-14


def gradcheck_problem(n_queries=3, n_items=5, seed=0):
    """Float64 scores and masks where every query has a positive and a negative."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_queries, n_items, generator=generator, dtype=torch.float64)
    pos_mask = torch.rand(n_queries, n_items, generator=generator) < 0.4
    pos_mask[:, 0], pos_mask[:, 1] = True, False
    valid_mask = (torch.rand(n_queries, n_items, generator=generator) < 0.7) | pos_mask
    valid_mask[:, 1] = True
    return scores.requires_grad_(), pos_mask, valid_mask


@pytest.mark.parametrize("with_valid_mask", [False, True])
@pytest.mark.parametrize("workspace_bytes", [TINY_WORKSPACE, 2**20])
@pytest.mark.parametrize("temperature", [0.05, 0.5])
def test_gradcheck(with_valid_mask, workspace_bytes, temperature):
    scores, pos_mask, valid_mask = gradcheck_problem()
    valid_mask = valid_mask if with_valid_mask else None
    assert torch.autograd.gradcheck(
        lambda s: smooth_ap(s, pos_mask, valid_mask, temperature, workspace_bytes=workspace_bytes),
        (scores,),
    )


def test_gradcheck_of_the_autograd_function_directly():
    scores, pos_mask, valid_mask = gradcheck_problem(n_queries=4, n_items=6, seed=1)
    max_elems = 3  # fewer elements than one query's (positives × items) row
    assert torch.autograd.gradcheck(
        lambda s: SmoothAPFunction.apply(s, pos_mask, valid_mask, 0.2, max_elems), (scores,)
    )


def test_query_without_positive_is_nan_and_does_not_touch_the_gradient():
    scores, pos_mask, valid_mask = gradcheck_problem()
    pos_mask[1] = False
    scores = scores.detach().requires_grad_()
    ap = smooth_ap(scores, pos_mask, valid_mask, temperature=0.1)
    assert ap[1].isnan() and not ap[[0, 2]].isnan().any()
    ap[[0, 2]].sum().backward()
    assert torch.isfinite(scores.grad).all()
    assert not scores.grad[1].any()


def test_items_outside_valid_mask_do_not_matter():
    scores, pos_mask, valid_mask = gradcheck_problem()
    ap = smooth_ap(scores, pos_mask, valid_mask)
    moved = scores.detach().masked_fill(~valid_mask, 1e6).requires_grad_()  # would rank first
    moved_ap = smooth_ap(moved, pos_mask, valid_mask)
    torch.testing.assert_close(moved_ap, ap, **TIGHT)
    moved_ap.sum().backward()
    assert not moved.grad[~valid_mask].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_result_has_the_scores_dtype(dtype):
    scores, pos_mask, valid_mask = gradcheck_problem()
    scores = scores.detach().to(dtype).requires_grad_()
    ap = smooth_ap(scores, pos_mask, valid_mask, temperature=0.1)
    assert ap.dtype == dtype and average_precision(scores, pos_mask, valid_mask).dtype == dtype
    ap.sum().backward()
    assert scores.grad.dtype == dtype and torch.isfinite(scores.grad).all()
    expected = smooth_ap(scores.detach().double(), pos_mask, valid_mask, temperature=0.1)
    torch.testing.assert_close(ap.double(), expected, rtol=0, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores_are_ranked_in_float32(dtype):
    """DESIGN.md §4: the result is the float32 computation on the same values, rounded. With
    τ = 1e-3, ranking in the scores' dtype would round every score / τ to 0.5 (float16) or
    0.5..4 (bfloat16) and move the result."""
    generator = torch.Generator().manual_seed(0)
    scores = torch.rand(4, 64, generator=generator).to(dtype).requires_grad_()
    pos_mask = torch.rand(4, 64, generator=generator) < 0.3
    as_float32 = scores.detach().float().requires_grad_()
    ap = smooth_ap(scores, pos_mask, temperature=1e-3, backend="torch")
    expected = smooth_ap(as_float32, pos_mask, temperature=1e-3, backend="torch")
    assert torch.equal(ap, expected.to(dtype))
    ap.sum().backward()
    expected.sum().backward()
    assert torch.equal(scores.grad, as_float32.grad.to(dtype))


@given(
    pos_mask=st.tuples(st.integers(1, 8), st.integers(1, 8)).flatmap(bool_matrices),
    data=st.data(),
)
def test_chunks_cover_every_positive_once_within_the_workspace(pos_mask, data):
    """The torch backend's blocks of (queries, positives, items) partition each group's
    (query, positive) pairs and hold at most max(max_elems, N) elements."""
    n_items = pos_mask.shape[1]
    max_elems = data.draw(st.integers(1, pos_mask.numel()), label="max_elems")
    for group in group_by_positive_count(pos_mask):
        covered = torch.zeros(group.positives.shape, dtype=torch.long)
        for qs, ps in _blocks(group, n_items, max_elems):
            block = covered[qs, ps]
            assert block.numel() * n_items <= max(max_elems, n_items)
            covered[qs, ps] += 1
        assert (covered == 1).all()


# Bad input: a clear error, never a silently wrong result.
SCORES = torch.zeros(2, 3)
POS = torch.tensor([[True, False, False], [False, True, True]])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=-0.1), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=math.nan), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be finite and > 0"),
        (dict(temperature="0.1"), TypeError, "temperature must be a number"),
        (dict(temperature=None), TypeError, "temperature must be a number"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(scores=torch.zeros(6)), ValueError, r"scores must be .* shape \(Q, N\)"),
        (dict(scores=torch.zeros(1, 2, 3)), ValueError, r"scores must be .* shape \(Q, N\)"),
        (dict(scores=torch.zeros(2, 3, dtype=torch.long)), ValueError, "scores must be a floating"),
        (dict(pos_mask=POS[:, :2]), ValueError, r"pos_mask has shape \(2, 2\)"),
        (dict(pos_mask=POS.T), ValueError, r"pos_mask has shape \(3, 2\)"),
        (dict(pos_mask=POS.float()), ValueError, "pos_mask must be a bool tensor"),
        (dict(pos_mask=POS.tolist()), ValueError, "pos_mask must be a bool tensor"),
        (dict(valid_mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "valid_mask has shape"),
        (dict(valid_mask=torch.ones(2, 3)), ValueError, "valid_mask must be a bool tensor"),
        (dict(valid_mask=~POS), ValueError, "pos_mask must imply valid_mask"),
        (dict(workspace_bytes=0), ValueError, "workspace_bytes must be >= 1"),
        (dict(workspace_bytes=1.5), TypeError, "workspace_bytes must be an integer or None"),
    ],
)
def test_smooth_ap_rejects_bad_input(kwargs, error, match):
    args = dict(scores=SCORES, pos_mask=POS, valid_mask=None) | kwargs
    with pytest.raises(error, match=match):
        smooth_ap(**args)
    if not {"temperature", "backend"} & set(kwargs):
        with pytest.raises(error, match=match):
            average_precision(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_cuda_matches_cpu(backend):
    scores, pos_mask, valid_mask = gradcheck_problem(n_queries=7, n_items=40, seed=2)
    scores = scores.detach().float()  # float32: "auto" picks Triton on CUDA when installed
    ap, grad = ap_and_grad(smooth_ap, scores, pos_mask, valid_mask, 0.05, backend="torch")
    cuda_ap, cuda_grad = ap_and_grad(
        smooth_ap, scores.cuda(), pos_mask.cuda(), valid_mask.cuda(), 0.05, backend=backend
    )
    assert cuda_ap.device.type == "cuda" and cuda_grad.device.type == "cuda"
    torch.testing.assert_close(cuda_ap.cpu(), ap, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cuda_grad.cpu(), grad, rtol=1e-4, atol=1e-5)
