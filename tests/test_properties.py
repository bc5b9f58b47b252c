"""SmoothAPLoss against the two references of pml_smoothap.reference, and its invariances.

Embeddings are float64 so that the comparisons can be tight: the loss and the references
compute the same quantity (DESIGN.md §1) by different routes.
"""
import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pytorch_metric_learning.distances import CosineSimilarity, DotProductSimilarity, LpDistance
from pytorch_metric_learning.reducers import DoNothingReducer

from pml_smoothap import SmoothAPLoss
from pml_smoothap.reference import (
    authors_smooth_ap_loss,
    per_query_smooth_ap,
    reference_loss,
    reference_sets,
)

TIGHT = dict(rtol=1e-9, atol=1e-11)

temperatures = st.floats(-3, 0).map(lambda exponent: 10.0**exponent)  # log-uniform in [1e-3, 1]
labels_lists = st.lists(st.integers(0, 3), min_size=1, max_size=10)
DISTANCES = {
    "cosine": lambda: CosineSimilarity(),
    "raw dot": lambda: DotProductSimilarity(normalize_embeddings=False),
    "L2 normalized": lambda: LpDistance(),
    "squared L2 raw": lambda: LpDistance(normalize_embeddings=False, power=2),
    "L1 raw": lambda: LpDistance(normalize_embeddings=False, p=1),
}


def embeddings(n, dim):
    """(n, dim) float64 tensors with distinct entries, 1/8 <= |x| <= 1: no two rows coincide and
    no row is near zero, where normalizing embeddings has a gradient of 1e12 (F.normalize's eps)."""
    elements = st.floats(-1, -0.125) | st.floats(0.125, 1)
    return hnp.arrays(np.float64, (n, dim), elements=elements, unique=True).map(torch.from_numpy)


def loss_and_grads(loss_fn, inputs, **kwargs):
    """The loss and the gradient of each tensor in ``inputs`` (a dict of tensors); an input
    the loss does not depend on gets a zero gradient."""
    leaves = {name: t.clone().requires_grad_() for name, t in inputs.items()}
    loss = loss_fn(**leaves, **kwargs)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves.values(), grads)]
    return loss.detach(), dict(zip(leaves, grads))


@given(
    num_classes=st.integers(1, 5),
    per_class=st.integers(2, 5),
    dim=st.integers(1, 6),
    temperature=temperatures,
    data=st.data(),
)
def test_equals_authors_formula_on_ordered_balanced_batches(
    num_classes, per_class, dim, temperature, data
):
    emb = data.draw(embeddings(num_classes * per_class, dim))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    loss_fn = SmoothAPLoss(
        temperature=temperature, distance=DotProductSimilarity(normalize_embeddings=False)
    )
    loss, grads = loss_and_grads(lambda e: loss_fn(e, labels), {"e": emb})
    expected, expected_grads = loss_and_grads(
        lambda preds: authors_smooth_ap_loss(preds, num_classes, temperature)[0], {"preds": emb}
    )
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["e"], expected_grads["preds"], **TIGHT)


@given(
    labels=labels_lists,
    dim=st.integers(1, 4),
    distance=st.sampled_from(sorted(DISTANCES)),
    include_self=st.booleans(),
    temperature=temperatures,
    data=st.data(),
)
def test_equals_per_query_reference(labels, dim, distance, include_self, temperature, data):
    """Any labels in any order, singletons, include_self both ways, similarities and distances."""
    emb = data.draw(embeddings(len(labels), dim))
    labels = torch.tensor(labels)
    distance = DISTANCES[distance]()
    kwargs = dict(temperature=temperature, include_self=include_self)
    loss_fn = SmoothAPLoss(distance=distance, **kwargs)
    loss, grads = loss_and_grads(lambda e: loss_fn(e, labels), {"e": emb})
    expected, expected_grads = loss_and_grads(
        lambda e: reference_loss(e, labels, distance, **kwargs)[0], {"e": emb}
    )
    torch.testing.assert_close(loss, expected, **TIGHT)
    torch.testing.assert_close(grads["e"], expected_grads["e"], **TIGHT)

    # Per query: the same queries get a term, with the reference's value.
    terms = SmoothAPLoss(distance=distance, reducer=DoNothingReducer(), **kwargs)(emb, labels)
    _, queries = reference_loss(emb, labels, distance, **kwargs)
    if not queries:  # PML's zero loss
        assert terms["loss"] == {"losses": 0, "indices": None, "reduction_type": "already_reduced"}
        return
    scores = distance(emb) if distance.is_inverted else -distance(emb)
    positives, retrieval = reference_sets(labels, include_self=include_self)
    aps = per_query_smooth_ap(scores, positives, retrieval, temperature)
    assert terms["loss"]["indices"].tolist() == queries
    assert terms["loss"]["reduction_type"] == "element"
    expected_terms = 1 - torch.stack([aps[q] for q in queries])
    torch.testing.assert_close(terms["loss"]["losses"], expected_terms, **TIGHT)


@given(
    labels=labels_lists,
    ref_labels=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    dim=st.integers(1, 4),
    distance=st.sampled_from(sorted(DISTANCES)),
    temperature=temperatures,
    data=st.data(),
)
def test_equals_per_query_reference_with_ref_emb(
    labels, ref_labels, dim, distance, temperature, data
):
    """A rectangular (queries × reference items) problem: ref_emb / ref_labels."""
    inputs = {
        "embeddings": data.draw(embeddings(len(labels), dim)),
        "ref_emb": data.draw(embeddings(len(ref_labels), dim)),
    }
    labels, ref_labels = torch.tensor(labels), torch.tensor(ref_labels)
    loss_fn = SmoothAPLoss(temperature=temperature, distance=DISTANCES[distance]())
    loss, grads = loss_and_grads(loss_fn, inputs, labels=labels, ref_labels=ref_labels)
    expected, expected_grads = loss_and_grads(
        lambda embeddings, ref_emb: reference_loss(
            embeddings, labels, DISTANCES[distance](), temperature,
            ref_emb=ref_emb, ref_labels=ref_labels,
        )[0],
        inputs,
    )
    torch.testing.assert_close(loss, expected, **TIGHT)
    for name in inputs:
        torch.testing.assert_close(grads[name], expected_grads[name], **TIGHT)


@given(
    labels=labels_lists,
    include_self=st.booleans(),
    temperature=temperatures,
    data=st.data(),
)
def test_shuffling_the_batch_keeps_the_loss_and_permutes_the_gradient(
    labels, include_self, temperature, data
):
    emb = data.draw(embeddings(len(labels), 3))
    labels = torch.tensor(labels)
    order = torch.tensor(data.draw(st.permutations(range(len(labels)))))
    loss_fn = SmoothAPLoss(temperature=temperature, include_self=include_self)
    loss, grads = loss_and_grads(lambda e: loss_fn(e, labels), {"e": emb})
    shuffled_loss, shuffled_grads = loss_and_grads(
        lambda e: loss_fn(e, labels[order]), {"e": emb[order]}
    )
    torch.testing.assert_close(shuffled_loss, loss, **TIGHT)
    torch.testing.assert_close(shuffled_grads["e"], grads["e"][order], **TIGHT)


@given(
    labels=labels_lists,
    ref_labels=st.lists(st.integers(0, 3), min_size=1, max_size=8),
    temperature=temperatures,
    data=st.data(),
)
def test_shuffling_the_reference_set_keeps_the_loss_and_permutes_its_gradient(
    labels, ref_labels, temperature, data
):
    inputs = {
        "embeddings": data.draw(embeddings(len(labels), 3)),
        "ref_emb": data.draw(embeddings(len(ref_labels), 3)),
    }
    labels, ref_labels = torch.tensor(labels), torch.tensor(ref_labels)
    order = torch.tensor(data.draw(st.permutations(range(len(ref_labels)))))
    loss_fn = SmoothAPLoss(temperature=temperature)
    loss, grads = loss_and_grads(loss_fn, inputs, labels=labels, ref_labels=ref_labels)
    shuffled = dict(inputs, ref_emb=inputs["ref_emb"][order])
    shuffled_loss, shuffled_grads = loss_and_grads(
        loss_fn, shuffled, labels=labels, ref_labels=ref_labels[order]
    )
    torch.testing.assert_close(shuffled_loss, loss, **TIGHT)
    torch.testing.assert_close(shuffled_grads["ref_emb"], grads["ref_emb"][order], **TIGHT)
    torch.testing.assert_close(shuffled_grads["embeddings"], grads["embeddings"], **TIGHT)
