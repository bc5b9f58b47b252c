"""Does torch.compile help SmoothAPLoss? Prints a table; not a test.

For each batch size: forward+backward time of the loss alone, eager and through
``torch.compile(loss_fn)`` (steady state, after the first call), and the time of that first
compiled call (tracing + Inductor code generation; the Inductor cache is a fresh temporary
directory, so this is a cold start).

    python benchmarks/torch_compile.py [--batch-sizes 64 256 1024] [--per-class 8]
"""
import argparse
import os
import tempfile
import time

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))

import torch  # noqa: E402
from torch.utils.benchmark import Timer  # noqa: E402

from pml_smoothap import SmoothAPLoss  # noqa: E402


def step(loss_fn, embeddings, labels):
    embeddings.grad = None
    loss_fn(embeddings, labels).backward()


def milliseconds(loss_fn, embeddings, labels):
    timer = Timer("step(loss_fn, embeddings, labels)", globals=dict(step=step, loss_fn=loss_fn, embeddings=embeddings, labels=labels))
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    print("| batch | eager ms | compiled ms | first compiled call s |")
    print("|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        embeddings = torch.randn(batch_size, args.dim, requires_grad=True)
        labels = torch.arange(batch_size) // args.per_class
        loss_fn = SmoothAPLoss()
        eager = milliseconds(loss_fn, embeddings, labels)
        torch._dynamo.reset()
        compiled_fn = torch.compile(loss_fn)
        start = time.perf_counter()
        step(compiled_fn, embeddings, labels)
        first_call = time.perf_counter() - start
        compiled = milliseconds(compiled_fn, embeddings, labels)
        print(f"| {batch_size} | {eager:.2f} | {compiled:.2f} | {first_call:.1f} |")


if __name__ == "__main__":
    main()
