"""Smooth-AP with a batch of 4096 through gradient caching (pml_smoothap.large_batch_backward).

    python examples/large_batch.py                      # 512 images x 8 views = 4096, ~1 min on CPU
    python examples/large_batch.py --device cuda --steps 200

Smooth-AP ranks every item of the batch against every other, so a bigger batch is a better
estimate of the ranking (the paper reports gains with batch size; the Recall@k-surrogate
follow-up trains with 4000 per batch on one GPU). Gradient caching gives the exact gradient of
the whole batch's loss while the network only ever holds the activations of ``--chunk-size``
images: the network's memory no longer limits the batch.

Digits have 10 classes, and a batch of thousands from 10 classes would have hundreds of
positives per query; this example instead uses the setting of SOP-like data, many small
classes: each training image is a class, and its ``--views`` random translations with pixel
noise are the positives (instance discrimination — the digit labels are not used for training).
Test metrics are still digit retrieval on the held-out images, printed before and after for
context; the point of the example is the step, so the first step's gradient is also compared
with the ordinary full-batch backward (``--check-gradient``, on by default).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from pml_smoothap import SmoothAPLoss, large_batch_backward  # noqa: E402


def views_batch(images, images_per_batch, views, noise):
    """``views`` augmented copies of ``images_per_batch`` random images: (inputs, labels), the
    label being the source image's position in the batch."""
    chosen = torch.randperm(len(images), device=images.device)[:images_per_batch]
    inputs = images[chosen].repeat_interleave(views, 0)
    inputs = common.random_shift(inputs) + noise * torch.randn_like(inputs)
    labels = torch.arange(len(chosen), device=images.device).repeat_interleave(views)
    return inputs, labels


def gradient_difference(model, inputs, labels, loss_fn, chunk_size):
    """Largest |difference| between the parameter gradients of the plain and the cached step,
    relative to the largest gradient; leaves the model's gradients zeroed."""
    gradients = []
    for backward in (
        common.plain_backward,
        lambda m, x, y, f: large_batch_backward(m, x, y, f, chunk_size),
    ):
        model.zero_grad(set_to_none=True)
        backward(model, inputs, labels, loss_fn)
        gradients.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    return ((gradients[0] - gradients[1]).abs().max() / gradients[0].abs().max()).item()


def main(argv=None):
    parser = common.new_parser(__doc__.splitlines()[0])
    parser.add_argument("--images-per-batch", type=int, default=512)
    parser.add_argument("--views", type=int, default=8, help="augmented copies per image")
    parser.add_argument("--chunk-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--temperature", type=float, default=0.01)
    parser.add_argument("--noise", type=float, default=0.1, help="pixel noise of a view")
    parser.add_argument("--check-gradient", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    device = common.resolve_device(args.device)
    common.seed_everything(args.seed)
    splits = common.digits_splits()
    train_images, test = splits["train"].x.to(device), splits["test"]
    model = common.DigitsNet().to(device)
    loss_fn = SmoothAPLoss(temperature=args.temperature)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    before = common.retrieval_metrics(common.embed(model, test.x, device), test.y)

    batch = min(args.images_per_batch, len(train_images)) * args.views
    print(f"batch {batch} ({args.views} views of each image), chunks of {args.chunk_size}")
    report = {"before": before, "losses": []}
    model.train()
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        inputs, labels = views_batch(train_images, args.images_per_batch, args.views, args.noise)
        if step == 1 and args.check_gradient:
            difference = gradient_difference(model, inputs, labels, loss_fn, args.chunk_size)
            report["gradient_difference"] = difference
            print(f"cached vs plain gradient: max |difference| / max |gradient| = {difference:.2e}")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        optimizer.zero_grad(set_to_none=True)
        loss = large_batch_backward(model, inputs, labels, loss_fn, args.chunk_size)
        optimizer.step()
        report["losses"].append(loss.item())
        line = f"step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.1f} s"
        if device.type == "cuda":
            line += f", peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB"
        print(line + ")", flush=True)

    report["after"] = common.retrieval_metrics(common.embed(model, test.x, device), test.y)
    print("test digit retrieval (the training used no digit labels):")
    print(f"  before: {common.format_metrics(before)}")
    print(f"  after:  {common.format_metrics(report['after'])}")
    return report


if __name__ == "__main__":
    main()
