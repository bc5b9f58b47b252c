"""Batches larger than memory: gradient caching for any loss of the whole batch's embeddings.

A ranking loss such as Smooth-AP couples every item of the batch, so ordinary gradient
accumulation (a loss per chunk) changes the objective. Gradient caching (Gao et al., "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup", 2021; used by Patel et al.'s
Recall@k surrogate to train with batches of 4000 on one GPU) keeps the objective exact:

1. embed the batch chunk by chunk without building a graph (activations of one chunk at a time);
2. compute the loss on the detached (B, D) embeddings and its gradient ``∂L/∂embeddings``;
3. embed each chunk again, with a graph, and back-propagate its slice of ``∂L/∂embeddings``.

The parameter gradients equal those of ``loss_fn(model(inputs), labels).backward()`` up to
float rounding, for one extra forward pass; peak activation memory is that of one chunk plus
the (B, D) embeddings and the loss's own memory (O(B·B) for Smooth-AP).
"""
import torch


def _rng_state(device):
    """The random state that a forward pass on ``device`` may draw from (dropout...)."""
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda_state


def _set_rng_state(device, state):
    cpu_state, cuda_state = state
    torch.set_rng_state(cpu_state)
    if cuda_state is not None:
        torch.cuda.set_rng_state(cuda_state, device)


def large_batch_backward(model, inputs, labels, loss_fn, chunk_size):
    """``loss_fn(model(inputs), labels).backward()`` with the activations of ``chunk_size``
    inputs at a time. Returns the loss, detached.

    Args:
        model: maps a chunk of ``inputs`` to its (chunk, D) embeddings.
        inputs: (B, ...) tensor, split along the first dimension.
        labels: (B,) labels, passed whole to ``loss_fn``.
        loss_fn: ``loss_fn(embeddings, labels)`` -> scalar, e.g. a :class:`SmoothAPLoss` or a
            PML wrapper around it (CrossBatchMemory...); its own parameters get their
            gradients too.
        chunk_size: inputs embedded per forward pass.

    The random state is replayed so that dropout draws the same masks in both passes. Layers
    that use batch statistics (BatchNorm in train mode) see one chunk at a time, as with any
    micro-batching, and update their running statistics twice: freeze them (as the Smooth-AP
    recipe does) for a step identical to the plain one.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunks = inputs.split(chunk_size)
    rng_states = []
    with torch.no_grad():
        embedded = []
        for chunk in chunks:
            rng_states.append(_rng_state(chunk.device))
            embedded.append(model(chunk))
    embeddings = torch.cat(embedded).detach().requires_grad_()
    loss = loss_fn(embeddings, labels)
    loss.backward()
    gradients = embeddings.grad.split(chunk_size)
    rng_after = _rng_state(inputs.device)
    for chunk, gradient, state in zip(chunks, gradients, rng_states):
        _set_rng_state(chunk.device, state)
        model(chunk).backward(gradient)
    _set_rng_state(inputs.device, rng_after)
    return loss.detach()
