"""The fused Triton backend against the per-query reference and the torch backend.

On a machine with CUDA the compiled kernels run on CUDA tensors; elsewhere on CPU tensors
through Triton's interpreter (conftest sets TRITON_INTERPRET=1 before anything imports Triton
when there is no CUDA). The interpreter is slow: shapes are small, and small block sizes make
the kernels tile over positives and columns anyway. The references run on CPU.
"""
import os
import subprocess
import sys

import pytest
import torch
from pytorch_metric_learning.miners import BatchHardMiner

pytest.importorskip("triton")

from pml_smoothap import SmoothAPLoss, ops  # noqa: E402
from pml_smoothap.kernels import triton_fused  # noqa: E402
from pml_smoothap.reference import per_query_smooth_ap_from_masks  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where kernels run
SMALL_BLOCKS = triton_fused.BlockSizes(positives=4, items=16)
# Largest |difference| / max |reference| allowed, per score dtype. Both backends rank in float32;
# low-precision gradients are rounded to the scores' dtype on the way out.
RTOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ap_and_grad(fn, scores, weights, device="cpu"):
    """fn(scores on ``device``) → AP (Q,), and the gradient of Σ_q weights[q] AP[q] over queries
    with an AP; both returned on CPU."""
    leaf = scores.detach().to(device).clone().requires_grad_()
    ap = fn(leaf)
    has_ap = ~ap.isnan()
    (ap[has_ap].float() * weights.to(device)[has_ap]).sum().backward()
    return ap.detach().cpu(), leaf.grad.cpu()


def on_device(*masks):
    return [None if mask is None else mask.to(DEVICE) for mask in masks]


def assert_matches(actual, expected, rtol):
    assert torch.equal(actual.isnan(), expected.isnan())
    actual, expected = actual.nan_to_num().double(), expected.nan_to_num().double()
    scale = max(expected.abs().max().item(), 1e-12)
    assert (actual - expected).abs().max().item() <= rtol * scale


def check_backends(scores, pos_mask, valid_mask, temperature=0.05, block_sizes=None):
    """Triton (on DEVICE) against the per-query reference (float64) and the torch backend (CPU):
    AP and gradient, returned on CPU."""
    rtol = RTOL[scores.dtype]
    weights = torch.randn(scores.shape[0], generator=torch.Generator().manual_seed(1))
    masks = on_device(pos_mask, valid_mask)
    triton_out = ap_and_grad(
        lambda s: triton_fused.smooth_ap(s, *masks, temperature, block_sizes),
        scores, weights, DEVICE)
    torch_out = ap_and_grad(
        lambda s: ops.smooth_ap(s, pos_mask, valid_mask, temperature, backend="torch"),
        scores, weights)
    reference_out = ap_and_grad(
        lambda s: per_query_smooth_ap_from_masks(s, pos_mask, valid_mask, temperature),
        scores.double(), weights.double())
    for actual, from_torch, from_reference in zip(triton_out, torch_out, reference_out):
        assert actual.dtype == scores.dtype
        assert_matches(actual, from_torch, rtol)
        assert_matches(actual, from_reference.to(scores.dtype), rtol)
    return triton_out


def random_scores(n_queries, n_items, seed, spread=0.1):
    """Distinct scores a few temperatures apart, so that every sigmoid is in play."""
    return torch.randn(n_queries, n_items, generator=torch.Generator().manual_seed(seed)) * spread


def random_masks(n_queries, n_items, seed, p_pos=0.3, p_valid=0.6):
    g = torch.Generator().manual_seed(seed)
    pos_mask = torch.rand(n_queries, n_items, generator=g) < p_pos
    valid_mask = pos_mask | (torch.rand(n_queries, n_items, generator=g) < p_valid)
    return pos_mask, valid_mask


@pytest.mark.parametrize("include_self", [True, False])
def test_labels_self_ranking(include_self):
    labels = torch.tensor([0, 2, 1, 0, 3, 2, 2, 0, 1, 4, 2, 1, 0])  # one singleton class
    pos_mask = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool)
    pos_mask = pos_mask if include_self else pos_mask & ~eye
    valid_mask = None if include_self else ~eye
    check_backends(random_scores(13, 13, seed=0), pos_mask, valid_mask)


@pytest.mark.parametrize("block_sizes", [None, SMALL_BLOCKS])
def test_mined_masks_rectangular_and_ragged(block_sizes):
    """Random positives and retrieval sets, Q ≠ N, neither a multiple of the block sizes, and
    queries without positives (NaN AP, zero gradient)."""
    pos_mask, valid_mask = random_masks(9, 21, seed=2)
    pos_mask[[0, 5]] = False
    ap, grad = check_backends(random_scores(9, 21, seed=3), pos_mask, valid_mask,
                              block_sizes=block_sizes)
    assert ap[[0, 5]].isnan().all() and not ap[[1, 2, 3, 4, 6, 7, 8]].isnan().any()
    assert (grad[[0, 5]] == 0).all()
    assert (grad[~valid_mask] == 0).all()


def test_ref_emb_like_all_items_ranked():
    pos_mask, _ = random_masks(5, 37, seed=4, p_pos=0.2)
    pos_mask[:, 0] = True
    check_backends(random_scores(5, 37, seed=5), pos_mask, None, temperature=0.01)


def test_many_positives_per_query_tile_over_positives():
    """About 25 positives per query: 7 tiles of 4 positives and 3 blocks of 16 columns."""
    pos_mask, valid_mask = random_masks(3, 40, seed=6, p_pos=0.65, p_valid=0.5)
    assert pos_mask.sum(1).min() > 4 * SMALL_BLOCKS.positives
    check_backends(random_scores(3, 40, seed=7), pos_mask, valid_mask, block_sizes=SMALL_BLOCKS)
    check_backends(random_scores(3, 40, seed=7), pos_mask, None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_scores(dtype):
    pos_mask, valid_mask = random_masks(6, 19, seed=8)
    pos_mask[:, 3] = valid_mask[:, 3] = True
    check_backends(random_scores(6, 19, seed=9).to(dtype), pos_mask, valid_mask)


def test_deterministic():
    pos_mask, valid_mask = on_device(*random_masks(3, 33, seed=10, p_pos=0.4))
    scores, weights = random_scores(3, 33, seed=11), torch.randn(3)
    runs = [
        ap_and_grad(lambda s: triton_fused.smooth_ap(s, pos_mask, valid_mask, 0.01, SMALL_BLOCKS),
                    scores, weights, DEVICE)
        for _ in range(2)
    ]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_forward_splits_rows_only_when_there_are_few_queries():
    assert triton_fused.forward_splits(9, 21, 16) == (2, 16)  # as in the tests above
    assert triton_fused.forward_splits(3, 40, 16) == (3, 16)
    assert triton_fused.forward_splits(8, 10_000, 256) == (40, 256)
    assert triton_fused.forward_splits(1024, 65536, 1024) == (4, 16384)
    assert triton_fused.forward_splits(65536, 65536, 1024) == (1, 65536)


def test_positive_table():
    pos_mask = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)
    table, counts = triton_fused.positive_table(pos_mask.to(DEVICE))
    assert table.tolist() == [[1, 3, 4], [-1, -1, -1], [0, -1, -1]]
    assert counts.tolist() == [3, 0, 1]


def test_positive_table_across_column_blocks():
    pos_mask, _ = random_masks(5, 37, seed=16, p_pos=0.4)
    table, counts = triton_fused.positive_table(pos_mask.to(DEVICE), block_items=8)
    for row, positives, count in zip(pos_mask, table, counts):
        expected = row.nonzero().flatten().tolist()
        assert count == len(expected)
        assert positives.tolist() == expected + [-1] * (table.shape[1] - len(expected))


def test_loss_module_with_triton_backend():
    """SmoothAPLoss(backend="triton") equals backend="torch" for labels, a miner, and ref_emb."""
    g = torch.Generator().manual_seed(12)
    emb = torch.randn(12, 5, generator=g).to(DEVICE)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 1, 1, 2, 4], device=DEVICE)
    ref_emb, ref_labels = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    ref_emb, ref_labels = ref_emb.to(DEVICE), ref_labels.to(DEVICE)
    mined = BatchHardMiner()(emb, labels)
    cases = [dict(labels=labels), dict(labels=labels, indices_tuple=mined),
             dict(labels=labels, ref_emb=ref_emb, ref_labels=ref_labels)]
    for kwargs in cases:
        results = []
        for backend in ("triton", "torch"):
            leaf = emb.clone().requires_grad_()
            loss = SmoothAPLoss(temperature=0.1, backend=backend)(leaf, **kwargs)
            loss.backward()
            results.append((loss.detach(), leaf.grad))
        (loss_triton, grad_triton), (loss_torch, grad_torch) = results
        assert loss_triton > 0
        torch.testing.assert_close(loss_triton, loss_torch, rtol=1e-5, atol=1e-6)
        assert_matches(grad_triton, grad_torch, RTOL[torch.float32])


def test_float64_scores_use_the_torch_backend():
    scores = random_scores(4, 9, seed=13).double()
    pos_mask, valid_mask = random_masks(4, 9, seed=14, p_pos=0.5)
    assert ops.resolve_backend("triton", scores.device, scores.dtype) == "torch"
    via_triton = ops.smooth_ap(scores, pos_mask, valid_mask, backend="triton")
    via_torch = ops.smooth_ap(scores, pos_mask, valid_mask, backend="torch")
    assert via_triton.dtype == torch.float64 and torch.equal(via_triton, via_torch)


def test_backend_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert ops.resolve_backend("auto", cuda) == "triton"
    assert ops.resolve_backend("auto", cpu) == "torch"  # never the interpreter unless asked
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert ops.resolve_backend("triton", cpu) == "triton"  # through the interpreter
    assert ops.resolve_backend("torch", cuda) == "torch"
    # Without Triton, or with one older than the kernels are tested with: "auto" falls back.
    for found, named in ((None, "none"), ((3, 1), "3.1")):
        monkeypatch.setattr(ops, "_triton_version", lambda found=found: found)
        assert ops.resolve_backend("auto", cuda) == "torch"
        with pytest.raises(ImportError, match=rf"Triton >= 3\.2, found {named}"):
            ops.resolve_backend("triton", cuda)


def test_installed_triton_version_is_read():
    import triton

    assert ops._triton_version() == tuple(int(v) for v in triton.__version__.split(".")[:2])


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    scores = random_scores(3, 4, seed=15)
    pos_mask = torch.eye(3, 4, dtype=torch.bool)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        ops.smooth_ap(scores, pos_mask, backend="triton")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        SmoothAPLoss(backend="triton")(torch.randn(4, 3), torch.tensor([0, 0, 1, 1]))
    # Kernels compiled for CUDA (Triton imported without the variable) refuse CPU tensors too.
    monkeypatch.setattr(triton_fused, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        triton_fused.smooth_ap(scores, pos_mask, None, 0.01)


COMPILE_FOR_HOPPER = """
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pml_smoothap.kernels import triton_fused as tf

assert not tf.INTERPRETED
kernels = (tf._smooth_ap_fwd_kernel, tf._smooth_ap_bwd_items_kernel,
           tf._smooth_ap_bwd_positives_kernel, tf._positive_table_kernel)
for dtype, kernel in [(dtype, kernel) for dtype in sys.argv[1:] for kernel in kernels]:
    pointers = {"scores_ptr": "*" + dtype, "grad_ap_ptr": "*" + dtype, "table_ptr": "*i32",
                "counts_ptr": "*i32", "flags_ptr": "*u8", "scale": "fp32"}
    constexprs = {"BLOCK_P": 4, "BLOCK_N": 1024}
    constexprs = {k: v for k, v in constexprs.items() if k in kernel.arg_names}
    signature = {name: pointers.get(name, "*fp32" if name.endswith("_ptr") else "i32")
                 for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert len(compiled.asm["cubin"]) > 0
"""


def test_kernels_compile_for_cuda():
    """The kernels compile to a Hopper cubin — the CUDA path, which the interpreter does not
    exercise (no GPU needed: Triton ships ptxas)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER, "fp32", "bf16"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
