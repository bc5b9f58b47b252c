"""Gradient caching (pml_smoothap.large_batch_backward) gives the plain step's gradients."""
import pytest
import torch

from pml_smoothap import CrossBatchMemory, SmoothAPLoss, large_batch_backward


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 8)
    )


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def batch(n_classes=9, per_class=5, seed=1):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=generator)]
    return torch.randn(len(labels), 12, generator=generator), labels


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 45, 100])
def test_cached_gradient_equals_plain_gradient_with_dropout(chunk_size):
    """Both passes draw the same dropout masks, so the gradients are those of a plain step whose
    forward embeds the same chunks in order. (Whether chunks draw the full batch's masks depends
    on the torch version: not assumed.)"""
    inputs, labels = batch()
    loss_fn = SmoothAPLoss(temperature=0.05)
    plain_model, cached_model = make_model(), make_model()

    torch.manual_seed(123)
    plain_loss = loss_fn(torch.cat([plain_model(c) for c in inputs.split(chunk_size)]), labels)
    plain_loss.backward()
    rng_after_plain = torch.get_rng_state()

    torch.manual_seed(123)
    cached_loss = large_batch_backward(cached_model, inputs, labels, loss_fn, chunk_size)

    # the RNG ends where one forward pass leaves it
    assert torch.equal(torch.get_rng_state(), rng_after_plain)
    torch.testing.assert_close(cached_loss, plain_loss.detach())
    assert not cached_loss.requires_grad
    for cached, plain in zip(gradients(cached_model), gradients(plain_model)):
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


def test_cached_gradient_accumulates_like_backward():
    inputs, labels = batch()
    loss_fn = SmoothAPLoss()
    plain_model, cached_model = make_model().eval(), make_model().eval()
    for _ in range(2):
        loss_fn(plain_model(inputs), labels).backward()
        large_batch_backward(cached_model, inputs, labels, loss_fn, 10)
    for cached, plain in zip(gradients(cached_model), gradients(plain_model)):
        torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


def test_cached_gradient_through_cross_batch_memory():
    """The loss may be any callable on (embeddings, labels), here a memory wrapper."""
    inputs, labels = batch()
    plain_model, cached_model = make_model().eval(), make_model().eval()
    plain_loss_fn = CrossBatchMemory(SmoothAPLoss(), embedding_size=8, memory_size=30)
    cached_loss_fn = CrossBatchMemory(SmoothAPLoss(), embedding_size=8, memory_size=30)
    for step in range(2):  # the second step ranks against the first batch's embeddings
        plain_model.zero_grad()
        cached_model.zero_grad()
        plain_loss_fn(plain_model(inputs[step::2]), labels[step::2]).backward()
        large_batch_backward(cached_model, inputs[step::2], labels[step::2], cached_loss_fn, 6)
        for cached, plain in zip(gradients(cached_model), gradients(plain_model)):
            torch.testing.assert_close(cached, plain, rtol=1e-4, atol=1e-5)


def test_chunk_size_must_be_positive():
    inputs, labels = batch()
    with pytest.raises(ValueError, match="chunk_size"):
        large_batch_backward(make_model(), inputs, labels, SmoothAPLoss(), 0)
