"""Shared by the examples: the digits data and splits, the network, the training loop, retrieval
metrics (pytorch-metric-learning's AccuracyCalculator on faiss) and the pictures.

The digits examples train with one plain loop (:func:`train`) rather than PML's MetricLossOnly:
they swap what a step uses — a cross-batch memory, a distributed loss wrapper around a DDP
model, another loss — and a ten-line loop shows that more plainly than a trainer configured (or
subclassed) for each; large_batch.py replaces the backward itself. tests/test_training.py runs
SmoothAPLoss inside MetricLossOnly.
"""
import argparse
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import FaissKNN
from tqdm.auto import tqdm

MAIN_METRICS = ("mean_average_precision_at_r", "precision_at_1", "r_precision")


def seed_everything(seed):
    """Seed Python, NumPy (PML's samplers draw from ``np.random``) and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- data


@dataclass
class Split:
    """Images ``x`` (N, 1, 8, 8) in [0, 1] and their digit ``y`` (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self):
        return len(self.y)


def digits_splits(class_disjoint=False, test_fraction=0.5, val_fraction=0.2, split_seed=0):
    """scikit-learn's 1797 8x8 digits as {"train", "val", "test"} :class:`Split`.

    Default: images held out within every class — a stratified ``test_fraction`` of the images
    is the test set. ``class_disjoint``: digits 0-4 are for training, digits 5-9 are the test
    set, as the metric-learning literature splits (CUB, Cars, SOP). In both cases the validation
    set (for tuning and the per-epoch curve) is a stratified ``val_fraction`` of the training
    images; the test set is only used for the final numbers.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    if class_disjoint:
        is_train_class = labels < 5
        pool_x, pool_y = images[is_train_class], labels[is_train_class]
        test_x, test_y = images[~is_train_class], labels[~is_train_class]
    else:
        pool_x, test_x, pool_y, test_y = train_test_split(
            images, labels, test_size=test_fraction, stratify=labels, random_state=split_seed
        )
    train_x, val_x, train_y, val_y = train_test_split(
        pool_x, pool_y, test_size=val_fraction, stratify=pool_y, random_state=split_seed
    )
    as_split = lambda x, y: Split(torch.from_numpy(x), torch.from_numpy(y).long())  # noqa: E731
    return {
        "train": as_split(train_x, train_y),
        "val": as_split(val_x, val_y),
        "test": as_split(test_x, test_y),
    }


def random_shift(x, max_shift=1):
    """Each image of ``x`` (N, C, H, W) translated by a random integer offset in
    [-max_shift, max_shift] in both directions, zero-filled (a digit's border is blank)."""
    n, _, height, width = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n), device=x.device)
    rows = (offsets[0, :, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (offsets[1, :, None] + torch.arange(width, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channels, rows, cols]


# ----------------------------------------------------------------------------- network


class DigitsNet(torch.nn.Module):
    """A small CNN for 8x8 images: (N, 1, 8, 8) -> L2-normalised (N, embedding_size)."""

    def __init__(self, embedding_size=64, width=32):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(width, 2 * width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(2 * width, 4 * width, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.embedding = torch.nn.Linear(4 * width, embedding_size)

    def forward(self, x):
        return F.normalize(self.embedding(self.features(x)), dim=1)


@torch.no_grad()
def embed(model, x, device, batch_size=1024):
    """Embeddings of ``x`` in eval mode, on the CPU."""
    model.eval()
    return torch.cat([model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)])


# ----------------------------------------------------------------------------- training


def batch_indices(labels, m_per_class, classes_per_batch, steps):
    """(steps, batch_size) indices from PML's MPerClassSampler: ``m_per_class`` images of each
    of ``min(classes_per_batch, number of classes)`` classes per batch."""
    n_classes = len(torch.unique(labels))
    batch_size = m_per_class * min(classes_per_batch, n_classes)
    sampler = MPerClassSampler(
        labels, m_per_class, batch_size=batch_size, length_before_new_iter=batch_size * steps
    )
    return torch.tensor(list(iter(sampler))).view(steps, batch_size)


def plain_backward(model, inputs, labels, loss_fn):
    """One ordinary forward and backward; returns the detached loss."""
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    return loss.detach()


def train(
    model,
    loss_fn,
    data,
    optimizer,
    device,
    epochs,
    steps_per_epoch,
    m_per_class,
    classes_per_batch,
    val=None,
    progress=True,
):
    """Train ``model`` on ``data`` (a :class:`Split`) with ``loss_fn(embeddings, labels)`` on
    MPerClassSampler batches; return the history, one dict per epoch: the mean training loss
    and, when ``val`` is given, its mean_average_precision_at_r."""
    history = []
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc="train", leave=False)
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        for idx in batch_indices(data.y, m_per_class, classes_per_batch, steps_per_epoch):
            inputs, labels = data.x[idx].to(device), data.y[idx].to(device)
            optimizer.zero_grad(set_to_none=True)
            losses.append(plain_backward(model, inputs, labels, loss_fn).item())
            optimizer.step()
            bar.update()
            bar.set_postfix(epoch=epoch, loss=f"{losses[-1]:.4f}")
        record = {"epoch": epoch, "loss": float(np.mean(losses))}
        if val is not None:
            val_metrics = retrieval_metrics(embed(model, val.x, device), val.y)
            record["val_map_at_r"] = val_metrics["mean_average_precision_at_r"]
            bar.set_postfix(
                epoch=epoch, loss=f"{record['loss']:.4f}", val_map_at_r=f"{record['val_map_at_r']:.3f}"
            )
        history.append(record)
    bar.close()
    return history


# ----------------------------------------------------------------------------- evaluation


class RetrievalCalculator(AccuracyCalculator):
    """PML's AccuracyCalculator plus Recall@K (the fraction of queries with at least one
    same-class item among their K nearest neighbours), reported as ``recall_at_{K}``."""

    def __init__(self, recall_ks=(), **kwargs):
        self.recall_ks = tuple(recall_ks)
        super().__init__(**kwargs)

    def requires_knn(self):
        return super().requires_knn() + ["recall_at_k"]

    def calculate_recall_at_k(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
        knn_labels, query_labels = knn_labels[not_lone_query_mask], query_labels[not_lone_query_mask]
        hits = knn_labels == query_labels[:, None]
        return {k: hits[:, :k].any(1).double().mean().item() for k in self.recall_ks}

    def determine_k(self, bin_counts, num_reference_embeddings, ref_includes_query):
        k = super().determine_k(bin_counts, num_reference_embeddings, ref_includes_query)
        return min(max([k, *self.recall_ks]), num_reference_embeddings - int(ref_includes_query))


def retrieval_metrics(embeddings, labels, recall_ks=()):
    """Leave-one-out retrieval metrics of a labelled set against itself (faiss k-NN, on the GPU
    when the embeddings are CUDA tensors and faiss-gpu is installed): mean_average_precision_at_r,
    precision_at_1, r_precision and ``recall_at_{K}`` for each K of ``recall_ks``."""
    include = MAIN_METRICS + (("recall_at_k",) if recall_ks else ())
    calculator = RetrievalCalculator(
        recall_ks, include=include, k="max_bin_count", device=embeddings.device
    )
    metrics = calculator.get_accuracy(embeddings.float(), labels)
    recalls = metrics.pop("recall_at_k", {})
    metrics.update({f"recall_at_{k}": value for k, value in recalls.items()})
    return metrics


def format_metrics(metrics):
    return "  ".join(f"{name}={value:.4f}" for name, value in metrics.items())


def nearest_neighbours(embeddings, k):
    """(N, k) indices of each item's k nearest other items (faiss, L2 = cosine on the sphere)."""
    _, indices = FaissKNN()(embeddings.float().cpu(), k, embeddings.float().cpu(), True)
    return indices


# ----------------------------------------------------------------------------- pictures


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_history_plot(history, path, title=""):
    """Training loss and validation mAP@R per epoch, side by side."""
    plt = pyplot()
    epochs = [record["epoch"] for record in history]
    fig, (loss_ax, map_ax) = plt.subplots(1, 2, figsize=(8, 3))
    loss_ax.plot(epochs, [record["loss"] for record in history], marker="o")
    loss_ax.set(xlabel="epoch", ylabel="training loss (1 - smooth AP)", title="loss")
    if "val_map_at_r" in history[0]:
        map_ax.plot(epochs, [record["val_map_at_r"] for record in history], marker="o", color="C2")
    map_ax.set(xlabel="epoch", ylabel="mAP@R", title="validation mAP@R")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_retrieval_picture(images, labels, embeddings, path, n_queries=8, k=8, seed=0):
    """A grid: each row a query image then its k nearest neighbours, green when the neighbour
    has the query's label and red otherwise."""
    plt = pyplot()
    neighbours = nearest_neighbours(embeddings, k)
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randperm(len(labels), generator=generator)[:n_queries]
    fig, axes = plt.subplots(n_queries, k + 1, figsize=(0.8 * (k + 1), 0.8 * n_queries + 0.4))
    for row, query in enumerate(queries.tolist()):
        items = [query] + neighbours[query].tolist()
        for col, item in enumerate(items):
            ax = axes[row, col]
            ax.imshow(images[item].squeeze(0).numpy(), cmap="gray_r", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            color = "black" if col == 0 else ("green" if labels[item] == labels[query] else "red")
            for spine in ax.spines.values():
                spine.set_color(color)
                spine.set_linewidth(1 if col == 0 else 3)
    fig.suptitle(f"query (left) and its {k} nearest neighbours; green: same digit, red: not", fontsize=9)
    top = 1 - 0.4 / (0.8 * n_queries + 0.4)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=top, wspace=0.15, hspace=0.15)
    fig.savefig(path, dpi=60)
    plt.close(fig)


# ----------------------------------------------------------------------------- command line


def add_training_arguments(parser, **defaults):
    """The training flags shared by the digits examples (``defaults`` override the defaults)."""
    options = {
        "epochs": 5,
        "steps_per_epoch": 30,
        "m_per_class": 16,
        "classes_per_batch": 10,
        "lr": 3e-3,
        "temperature": 0.3,
        "embedding_size": 64,
        "width": 32,
        "seed": 0,
        "device": "auto",
        "out": "out",
    }
    options.update(defaults)
    parser.add_argument("--epochs", type=int, default=options["epochs"])
    parser.add_argument("--steps-per-epoch", type=int, default=options["steps_per_epoch"])
    parser.add_argument("--m-per-class", type=int, default=options["m_per_class"])
    parser.add_argument("--classes-per-batch", type=int, default=options["classes_per_batch"])
    parser.add_argument("--lr", type=float, default=options["lr"], help="Adam learning rate")
    parser.add_argument("--temperature", type=float, default=options["temperature"], help="τ")
    parser.add_argument("--embedding-size", type=int, default=options["embedding_size"])
    parser.add_argument("--width", type=int, default=options["width"], help="CNN width")
    parser.add_argument("--seed", type=int, default=options["seed"])
    parser.add_argument("--device", default=options["device"], help="auto, cpu, cuda, cuda:1...")
    parser.add_argument("--out", default=options["out"], help="directory for pictures/checkpoints")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def new_parser(description):
    return argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
