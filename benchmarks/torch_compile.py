"""Does torch.compile help SmoothAPLoss? Prints a table; not a test.

Forward+backward time of the loss alone for each batch size: eager; through
``torch.compile(loss_fn)`` as shipped (``compute_loss`` is excluded from compilation, so only
PML's reducer is compiled); and through ``torch.compile`` of a variant that lets Dynamo trace
``compute_loss`` (the data-dependent masks and chunk loops split it into many graphs).
Steady state after the first call; "first call" is that call's time (tracing + Inductor code
generation, cold: the Inductor cache is a fresh temporary directory). Then, for batches with
random labels (other class sizes each time), how many graphs Dynamo has captured after each
batch: a growing count is recompilation.

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


class TracedSmoothAPLoss(SmoothAPLoss):
    """SmoothAPLoss with compute_loss open to torch.compile (what the shipped class opts out of)."""

    compute_loss = SmoothAPLoss._compute_loss


def step(loss_fn, embeddings, labels):
    embeddings.grad = None
    loss_fn(embeddings, labels).backward()


def milliseconds(loss_fn, embeddings, labels):
    timer = Timer(
        "step(loss_fn, embeddings, labels)",
        globals=dict(step=step, loss_fn=loss_fn, embeddings=embeddings, labels=labels),
    )
    return timer.blocked_autorange(min_run_time=1.0).median * 1e3


def compiled_ms(loss_fn, embeddings, labels):
    """(steady-state ms, first call s) of torch.compile(loss_fn)."""
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn)
    start = time.perf_counter()
    step(compiled, embeddings, labels)
    first_call = time.perf_counter() - start
    return milliseconds(compiled, embeddings, labels), first_call


def graphs_after_each_batch(loss_fn, batch_size, dim, n_batches=4):
    """Graphs captured by torch.compile(loss_fn) after each of ``n_batches`` random-label
    batches (Dynamo only: the graphs run eagerly)."""
    torch._dynamo.reset()
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(loss_fn, backend=recording_backend)
    counts = []
    for seed in range(n_batches):
        generator = torch.Generator().manual_seed(seed)
        embeddings = torch.randn(batch_size, dim, generator=generator, requires_grad=True)
        labels = torch.randint(0, batch_size // 8, (batch_size,), generator=generator)
        step(compiled, embeddings, labels)
        counts.append(len(graphs))
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu")
    print(
        "| batch | eager ms | compiled, as shipped ms (first call s) "
        "| compiled, loss traced ms (first call s) |"
    )
    print("|---:|---:|---:|---:|")
    for batch_size in args.batch_sizes:
        torch.manual_seed(0)
        embeddings = torch.randn(batch_size, args.dim, requires_grad=True)
        labels = torch.arange(batch_size) // args.per_class
        eager = milliseconds(SmoothAPLoss(), embeddings, labels)
        shipped, shipped_first = compiled_ms(SmoothAPLoss(), embeddings, labels)
        traced, traced_first = compiled_ms(TracedSmoothAPLoss(), embeddings, labels)
        print(
            f"| {batch_size} | {eager:.2f} | {shipped:.2f} ({shipped_first:.1f}) "
            f"| {traced:.2f} ({traced_first:.1f}) |"
        )
    batch_size = args.batch_sizes[0]
    print(f"\nGraphs captured after each of 4 batches of {batch_size} with random labels:")
    print(f"- as shipped: {graphs_after_each_batch(SmoothAPLoss(), batch_size, args.dim)}")
    print(f"- loss traced: {graphs_after_each_batch(TracedSmoothAPLoss(), batch_size, args.dim)}")


if __name__ == "__main__":
    main()
