"""The temperature τ: how well smooth AP approximates AP, and which pairs get a gradient.

    python examples/train_digits.py && python examples/temperature.py

Uses the digits model saved by train_digits.py (``--checkpoint``; when the file is missing a
model is trained here with train_digits' defaults, or ``--epochs``), and the untrained network
for contrast. On the held-out test digits, every image queries all the others by cosine
similarity:

1. left: mean smooth AP (``pml_smoothap.smooth_ap``) against τ ∈ [1e-4, 1], with the exact mean
   AP (``pml_smoothap.average_precision``) as a line: smooth AP tends to AP as τ → 0 and is
   pulled towards the fraction of positives as τ grows.
2. right: the "operating region" of the sigmoid: the derivative of σ(d/τ) with respect to the
   score difference d = s_j − s_i (scaled so that its peak is 1) for a few τ, over the
   distribution of d between a negative j and a positive i of the same query. Pairs outside
   the bump get no gradient: a small τ sharpens the approximation but only pairs within ~τ of
   each other drive the learning.
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import train_digits  # noqa: E402

from pml_smoothap import average_precision, smooth_ap  # noqa: E402

REGION_TEMPERATURES = (0.001, 0.01, 0.1, 1.0)


def leave_one_out_problem(embeddings, labels):
    """Cosine scores of every item against every other, and the masks: (scores, pos, valid)."""
    scores = embeddings @ embeddings.T
    others = ~torch.eye(len(labels), dtype=torch.bool)
    return scores, (labels[:, None] == labels[None, :]) & others, others


def ap_versus_temperature(embeddings, labels, temperatures):
    """(mean smooth AP per τ, mean exact AP)."""
    scores, pos, valid = leave_one_out_problem(embeddings, labels)
    smooth = [smooth_ap(scores, pos, valid, temperature).mean().item() for temperature in temperatures]
    return np.array(smooth), average_precision(scores, pos, valid).mean().item()


def negative_minus_positive(embeddings, labels, n_triples=1_000_000, seed=0):
    """d = s[q, j] - s[q, i] for the (query q, positive i, negative j) among ``n_triples``
    uniformly drawn triples of items."""
    scores, pos, _ = leave_one_out_problem(embeddings, labels)
    generator = torch.Generator().manual_seed(seed)
    q, i, j = torch.randint(len(labels), (3, n_triples), generator=generator)
    keep = pos[q, i] & (labels[j] != labels[q])
    return (scores[q, j] - scores[q, i])[keep].numpy()


def save_temperature_plot(temperatures, curves, differences, path):
    """``curves``: {name: (smooth AP per τ, exact AP)}; ``differences``: {name: d samples}."""
    plt = common.pyplot()
    fig, (ap_ax, region_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for color, (name, (smooth, exact)) in zip(("C0", "C1"), curves.items()):
        ap_ax.semilogx(temperatures, smooth, marker=".", color=color, label=f"smooth AP, {name}")
        ap_ax.axhline(exact, color=color, linestyle="--", label=f"exact AP, {name}")
    ap_ax.set(xlabel="temperature τ", ylabel="mean AP over test queries", title="smooth AP vs AP")
    ap_ax.legend(fontsize=7)
    d = np.linspace(-1.0, 1.0, 801)
    for temperature in REGION_TEMPERATURES:
        sigmoid = 1 / (1 + np.exp(-np.clip(d / temperature, -50, 50)))
        region_ax.plot(d, 4 * sigmoid * (1 - sigmoid), label=f"τ={temperature:g}")
    histogram_ax = region_ax.twinx()
    for color, (name, values) in zip(("tab:gray", "black"), differences.items()):
        histogram_ax.hist(
            values, bins=100, range=(-1, 1), density=True, alpha=0.25, color=color, label=f"d, {name}"
        )
    histogram_ax.set_yticks([])
    region_ax.set(
        xlabel="d = s(negative) − s(positive)",
        ylabel="τ·dσ(d/τ)/dd, scaled to peak 1",
        title="gradient's operating region",
    )
    region_ax.legend(fontsize=7, loc="upper left")
    histogram_ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def trained_model(args, device):
    if os.path.exists(args.checkpoint):
        print(f"loading {args.checkpoint}")
        return train_digits.load_checkpoint(args.checkpoint, device)
    print(f"{args.checkpoint} not found: training with train_digits ({args.epochs} epochs)")
    digits_args = train_digits.parse_args(
        ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch)]
        + ["--device", args.device]
        + (["--no-progress"] if args.no_progress else [])
    )
    model, _ = train_digits.train_model(digits_args, common.digits_splits(), progress=not args.no_progress)
    return model


def main(argv=None):
    parser = common.new_parser(__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.join("out", "digits_model.pt"))
    parser.add_argument("--epochs", type=int, default=train_digits.parse_args([]).epochs)
    parser.add_argument("--steps-per-epoch", type=int, default=train_digits.parse_args([]).steps_per_epoch)
    parser.add_argument("--points", type=int, default=17, help="temperatures in [1e-4, 1]")
    parser.add_argument("--max-images", type=int, default=None, help="a random subset of the test set")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    test = common.digits_splits()["test"]
    common.seed_everything(0)
    if args.max_images is not None:
        subset = torch.randperm(len(test))[: args.max_images]
        test = common.Split(test.x[subset], test.y[subset])
    models = {"untrained": common.DigitsNet().to(device), "trained": trained_model(args, device)}
    temperatures = np.logspace(-4, 0, args.points)
    curves, differences = {}, {}
    for name, model in models.items():
        embeddings = common.embed(model, test.x, device)
        curves[name] = ap_versus_temperature(embeddings, test.y, temperatures)
        differences[name] = negative_minus_positive(embeddings, test.y)

    print("| τ | " + " | ".join(f"smooth AP, {name}" for name in curves) + " |")
    print("|---|" + "---|" * len(curves))
    for i, temperature in enumerate(temperatures):
        cells = " | ".join(f"{smooth[i]:.4f}" for smooth, _ in curves.values())
        print(f"| {temperature:.2g} | {cells} |")
    print("| exact AP | " + " | ".join(f"{exact:.4f}" for _, exact in curves.values()) + " |")
    for name, values in differences.items():
        for temperature in REGION_TEMPERATURES:
            active = np.mean(np.abs(values) < 3 * temperature)
            print(f"{name}, τ={temperature:g}: {100 * active:.1f}% of (negative, positive) pairs within 3τ")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "temperature.png")
    save_temperature_plot(temperatures, curves, differences, path)
    print(f"wrote {path}")
    return {"temperatures": temperatures, "curves": curves, "differences": differences}


if __name__ == "__main__":
    main()
