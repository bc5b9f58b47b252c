"""SmoothAPLoss at its edges: bad input, empty batches, queries without a term, dtypes, devices."""
import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.reducers import DoNothingReducer

from pml_smoothap import SmoothAPLoss
from pml_smoothap.reference import reference_loss


def random_batch(labels, dim=8, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.tensor(labels)
    return torch.randn(len(labels), dim, generator=generator, dtype=dtype), labels


# Bad input: a clear error, never a silently wrong result.
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(temperature=0), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=-0.01), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=math.nan), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=math.inf), ValueError, "temperature must be finite and > 0"),
        (dict(temperature=-math.inf), ValueError, "temperature must be finite and > 0"),
        (dict(temperature="0.01"), TypeError, "temperature must be a number"),
        (dict(temperature=True), TypeError, "temperature must be a number"),
        (dict(temperature=[0.01]), TypeError, "temperature must be a number"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(backend=None), ValueError, "backend must be one of"),
        (dict(workspace_bytes=-1), ValueError, "workspace_bytes must be >= 1"),
        (dict(workspace_bytes="4MB"), TypeError, "workspace_bytes must be an integer or None"),
    ],
)
def test_constructor_rejects_bad_hyperparameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        SmoothAPLoss(**kwargs)


@pytest.mark.parametrize(
    "temperature", [0.05, 1, np.float64(0.05), np.float32(0.05), np.int64(1)], ids=repr
)
def test_any_real_number_is_a_temperature(temperature):
    """numpy scalars (np.float32 from a config array or np.linspace(...).astype) are numbers."""
    loss_fn = SmoothAPLoss(temperature=temperature)
    assert isinstance(loss_fn.temperature, float)
    assert loss_fn.temperature == pytest.approx(float(temperature))


def test_labels_are_required():
    embeddings, _ = random_batch([0, 0, 1, 1])
    with pytest.raises(ValueError, match="labels and indices_tuple cannot both be None"):
        SmoothAPLoss()(embeddings)


@pytest.mark.parametrize(
    "labels, match",
    [
        (torch.tensor([[0], [0], [1], [1]]), "labels must be a 1D tensor"),
        (torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]]), "labels must be a 1D tensor"),
        (torch.tensor([0, 0, 1]), "Number of embeddings must equal number of labels"),
        (torch.tensor([0, 0, 1, 1, 2]), "Number of embeddings must equal number of labels"),
    ],
)
def test_labels_of_wrong_shape_or_length_are_rejected(labels, match):
    embeddings, _ = random_batch([0, 0, 1, 1])
    with pytest.raises(ValueError, match=match):
        SmoothAPLoss()(embeddings, labels)


def test_ref_labels_of_wrong_length_are_rejected():
    embeddings, labels = random_batch([0, 0, 1, 1])
    with pytest.raises(ValueError, match="Number of embeddings must equal number of labels"):
        SmoothAPLoss()(embeddings, labels, ref_emb=embeddings[:3].clone(), ref_labels=labels)


def test_ref_emb_without_ref_labels_is_rejected():
    embeddings, labels = random_batch([0, 0, 1, 1])
    with pytest.raises(ValueError, match="ref_labels are required with ref_emb"):
        SmoothAPLoss()(embeddings, labels, ref_emb=embeddings.clone())


# Batches where nothing, or not everything, has a term.
def test_empty_batch_gives_a_zero_loss_that_back_propagates():
    embeddings = torch.empty(0, 8, requires_grad=True)
    loss = SmoothAPLoss()(embeddings, torch.empty(0, dtype=torch.long))
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert embeddings.grad.shape == (0, 8)


@pytest.mark.parametrize("include_self", [True, False])
def test_no_query_with_a_positive_gives_a_zero_loss_and_zero_gradient(include_self):
    embeddings, labels = random_batch([3, 1, 4, 0, 5, 9, 2, 6])
    embeddings.requires_grad_()
    loss = SmoothAPLoss(include_self=include_self)(embeddings, labels)
    assert loss.item() == 0
    loss.backward()
    assert embeddings.grad.shape == embeddings.shape and not embeddings.grad.any()


def test_no_query_with_a_positive_in_the_reference_set_gives_a_zero_loss():
    embeddings, labels = random_batch([0, 0, 1, 1])
    ref_emb, ref_labels = random_batch([2, 3, 3], seed=1)
    embeddings.requires_grad_()
    loss = SmoothAPLoss()(embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels)
    assert loss.item() == 0
    loss.backward()
    assert not embeddings.grad.any()


@pytest.mark.parametrize("include_self", [True, False])
def test_a_query_whose_only_positive_is_itself_has_no_term(include_self):
    embeddings, labels = random_batch([0, 0, 1, 2, 2, 2, 3, 4, 4])
    terms = SmoothAPLoss(include_self=include_self, reducer=DoNothingReducer())(embeddings, labels)
    assert terms["loss"]["indices"].tolist() == [0, 1, 3, 4, 5, 7, 8]
    assert terms["loss"]["reduction_type"] == "element"
    loss_fn = SmoothAPLoss(include_self=include_self)
    expected, queries = reference_loss(
        embeddings, labels, loss_fn.distance, include_self=include_self
    )
    assert queries == [0, 1, 3, 4, 5, 7, 8]
    # The mean runs over the 7 queries with a term, not over all 9.
    torch.testing.assert_close(loss_fn(embeddings, labels), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms["loss"]["losses"].mean(), expected, rtol=1e-12, atol=1e-12)


def test_a_query_without_a_positive_in_the_reference_set_has_no_term():
    embeddings, labels = random_batch([0, 1, 2, 1])
    ref_emb, ref_labels = random_batch([1, 0, 1, 3, 0], seed=1)
    terms = SmoothAPLoss(reducer=DoNothingReducer())(
        embeddings, labels, ref_emb=ref_emb, ref_labels=ref_labels
    )
    assert terms["loss"]["indices"].tolist() == [0, 1, 3]


def test_a_single_positive_ranked_first_has_zero_loss():
    """One positive, scored above every other item: AP = 1 whatever the temperature."""
    embeddings = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [-1.0, 0.2]])
    labels = torch.tensor([0, 0, 1, 2])
    loss_fn = SmoothAPLoss(temperature=1e-3, include_self=False, reducer=DoNothingReducer())
    terms = loss_fn(embeddings, labels)["loss"]
    assert terms["indices"].tolist() == [0, 1]
    torch.testing.assert_close(terms["losses"], torch.zeros(2))


# Dtypes and devices.
LOW_PRECISION = [
    # dtype, temperature, |loss - float32 loss|, relative error of the gradient. About 3× what
    # 6 seeds gave: the loss error is mostly the rounding of the result to the dtype, the
    # gradient error grows with the score error / τ (bfloat16 scores are ~8× coarser).
    (torch.float16, 0.01, 1e-3, 0.03),
    (torch.float16, 0.1, 1e-3, 3e-3),
    (torch.bfloat16, 0.01, 6e-3, 0.2),
    (torch.bfloat16, 0.1, 6e-3, 0.02),
]


@pytest.mark.parametrize("dtype, temperature, loss_tol, grad_tol", LOW_PRECISION)
@pytest.mark.parametrize("seed", [0, 1])
def test_half_precision_is_finite_and_close_to_float32(
    dtype, temperature, loss_tol, grad_tol, seed, require_cpu_matmul
):
    require_cpu_matmul(dtype)
    embeddings, labels = random_batch(list(range(8)) * 4, dim=16, seed=seed, dtype=torch.float32)
    loss_fn = SmoothAPLoss(temperature=temperature)

    def loss_and_grad(emb):
        emb = emb.clone().requires_grad_()
        loss = loss_fn(emb, labels)
        loss.backward()
        return loss, emb.grad

    loss32, grad32 = loss_and_grad(embeddings)
    loss, grad = loss_and_grad(embeddings.to(dtype))
    assert loss.dtype == dtype and grad.dtype == dtype
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.float() - loss32).item() <= loss_tol
    assert ((grad.float() - grad32).norm() / grad32.norm()).item() <= grad_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_has_the_embeddings_dtype(dtype):
    embeddings, labels = random_batch([0, 0, 1, 1, 2], dtype=dtype)
    assert SmoothAPLoss()(embeddings, labels).dtype == dtype


def _loss_and_grad_on(device, include_self=True, dtype=torch.float64):
    embeddings, labels = random_batch([0, 2, 0, 1, 1, 2, 3, 0, 5, 2], dtype=dtype)
    embeddings = embeddings.to(device).requires_grad_()
    loss = SmoothAPLoss(temperature=0.05, include_self=include_self)(embeddings, labels.to(device))
    loss.backward()
    return loss.detach(), embeddings.grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize(
    # float32 takes backend="auto"'s CUDA choice (Triton when installed), float64 the torch one.
    "dtype, tol",
    [(torch.float64, dict(rtol=1e-9, atol=1e-11)), (torch.float32, dict(rtol=1e-4, atol=1e-5))],
)
def test_cuda_matches_cpu(include_self, dtype, tol):
    loss, grad = _loss_and_grad_on("cpu", include_self, dtype)
    cuda_loss, cuda_grad = _loss_and_grad_on("cuda", include_self, dtype)
    assert cuda_loss.device.type == "cuda" and cuda_grad.device.type == "cuda"
    torch.testing.assert_close(cuda_loss.cpu(), loss, **tol)
    torch.testing.assert_close(cuda_grad.cpu(), grad, **tol)


@pytest.mark.skipif(not torch.backends.mps.is_available(), reason="needs MPS")
def test_mps_matches_cpu():
    embeddings, labels = random_batch([0, 2, 0, 1, 1, 2, 3, 0, 5, 2], dtype=torch.float32)
    results = []
    for device in ("cpu", "mps"):
        emb = embeddings.to(device).requires_grad_()
        loss = SmoothAPLoss(temperature=0.05)(emb, labels.to(device))
        loss.backward()
        results.append((loss.detach().cpu(), emb.grad.cpu()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5)
