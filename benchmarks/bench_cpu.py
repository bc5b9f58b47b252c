"""Forward+backward time and peak memory of Smooth-AP implementations on the CPU.

Compares pml_smoothap's SmoothAPLoss ("torch" backend, cosine similarity included) and its rank
computation alone (``smooth_ap`` on precomputed scores) with the authors' batched formula and
PML 2.9.0's built-in SmoothAPLoss, on ordered batches with 4 samples per class, plus the floor
of DESIGN.md §2: one torch.sigmoid pass over Σ_q |P_q|·|V_q| elements.

Each (method, B) runs in a fresh subprocess; its peak memory growth is the rise of the
process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over a first
forward+backward, measured from the resident set just before it. Times are medians.

    python benchmarks/bench_cpu.py                      # full table (about 3 minutes)
    python benchmarks/bench_cpu.py --sizes 64 128 --repeats 3
    python benchmarks/bench_cpu.py --plot docs/img/bench_cpu.png
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

METHODS = ("pml_smoothap", "ranks_only", "authors", "pml_builtin", "floor")
OURS = ("pml_smoothap", "ranks_only")
B3_METHODS = ("authors", "pml_builtin")  # materialise B×B×B tensors
BYTES_PER_B3 = 40  # measured: 4.9 GB at B=512 for the authors' formula (~9 floats per B³)


def _status_mb(field):
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _workload(method, batch_size, per_class, dim):
    """A closure running one forward+backward of ``method``."""
    import torch

    from pml_smoothap import SmoothAPLoss, smooth_ap
    from pml_smoothap.reference import authors_smooth_ap_loss
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.distances import CosineSimilarity

    torch.manual_seed(0)
    labels = torch.arange(batch_size // per_class).repeat_interleave(per_class)
    emb = torch.nn.functional.normalize(torch.randn(batch_size, dim), dim=1)
    emb.requires_grad_(True)
    if method == "floor":
        # Σ_q |P_q|·|V_q| with include_self: each query ranks its m positives among all B items.
        x = torch.randn(batch_size * per_class * batch_size)
        out = torch.empty_like(x)
        return lambda: torch.sigmoid(x, out=out)
    if method == "ranks_only":
        scores = (emb @ emb.t()).detach().requires_grad_()
        pos_mask = labels.unsqueeze(0) == labels.unsqueeze(1)

        def ranks_step():
            scores.grad = None
            loss = 1 - smooth_ap(scores, pos_mask, backend="torch").mean()
            loss.backward()
            return loss

        return ranks_step
    if method == "pml_smoothap":
        loss_fn = SmoothAPLoss(backend="torch")
        fn = lambda: loss_fn(emb, labels)  # noqa: E731
    elif method == "pml_builtin":
        loss_fn = losses.SmoothAPLoss(distance=CosineSimilarity())
        fn = lambda: loss_fn(emb, labels)  # noqa: E731
    else:  # the authors' code ranks dot products of the embeddings it is given
        fn = lambda: authors_smooth_ap_loss(emb, batch_size // per_class)  # noqa: E731

    def step():
        emb.grad = None
        loss = fn()
        loss.backward()
        return loss

    return step


def worker(method, batch_size, per_class, dim, repeats):
    """Run in a subprocess: print one JSON line with the loss, times and peak memory growth."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    step = _workload(method, batch_size, per_class, dim)
    _reset_peak_rss()
    rss_before = _status_mb("VmRSS")
    t0 = time.perf_counter()
    out = step()
    times = [time.perf_counter() - t0]
    peak_growth = _status_mb("VmHWM") - rss_before
    for _ in range(repeats - 1):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    loss = float(out) if out.numel() == 1 else None
    print(json.dumps({"loss": loss, "ms": 1e3 * statistics.median(times),
                      "peak_mb": peak_growth, "runs": len(times)}))


def run_one(method, batch_size, args):
    if method in B3_METHODS:
        need_gb = BYTES_PER_B3 * batch_size**3 / 1e9
        if need_gb > args.max_gb:
            return {"skipped": f"needs ~{need_gb:.0f} GB"}
    repeats = args.repeats if method not in B3_METHODS else max(1, min(args.repeats, 3))
    cmd = [sys.executable, __file__, "--worker", method, str(batch_size),
           "--per-class", str(args.per_class), "--dim", str(args.dim), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"skipped": f"failed: {proc.stderr.strip().splitlines()[-1][:60]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results, sizes):
    lines = [
        "| B | method | fwd+bwd ms (median) | peak MB (growth) | time vs pml_smoothap "
        "| memory vs pml_smoothap | time vs floor | loss matches pml_smoothap |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for b in sizes:
        ours, floor = results[(b, "pml_smoothap")], results[(b, "floor")]
        for method in METHODS:
            r = results[(b, method)]
            if "skipped" in r:
                lines.append(f"| {b} | {method} | {r['skipped']} | | | | | |")
                continue
            vs_time = f"{r['ms'] / ours['ms']:.1f}×" if method in B3_METHODS else ""
            vs_mem = (f"{r['peak_mb'] / max(ours['peak_mb'], 1e-3):.1f}×"
                      if method in B3_METHODS else "")
            x_floor = f"{r['ms'] / floor['ms']:.1f}×" if method in OURS else ""
            match = ""
            if method in B3_METHODS or method == "ranks_only":
                match = "yes" if abs(r["loss"] - ours["loss"]) < 1e-4 else (
                    f"no ({r['loss']:.4f} vs {ours['loss']:.4f})")
            lines.append(f"| {b} | {method} | {r['ms']:.3g} | {r['peak_mb']:.0f} | {vs_time} "
                         f"| {vs_mem} | {x_floor} | {match} |")
    return "\n".join(lines)


def plot(results, sizes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in METHODS:
        pts = [(b, results[(b, method)]) for b in sizes if "ms" in results[(b, method)]]
        if not pts:
            continue
        bs = [b for b, _ in pts]
        axes[0].plot(bs, [r["ms"] for _, r in pts], "o-", label=method)
        if method != "floor":
            axes[1].plot(bs, [max(r["peak_mb"], 0.1) for _, r in pts], "o-", label=method)
    for ax, ylabel in zip(axes, ("forward+backward (ms)", "peak memory growth (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size B (4 per class)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Smooth-AP on CPU (2 threads, float32)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+",
                        default=[64, 128, 256, 512, 1024, 2048, 4096])
    parser.add_argument("--per-class", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-gb", type=float, default=16.0,
                        help="skip B³ methods whose estimated memory exceeds this")
    parser.add_argument("--plot", help="save a log-log plot of time and memory to this PNG")
    parser.add_argument("--worker", nargs=2, metavar=("METHOD", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.per_class, args.dim, args.repeats)
        return
    import torch

    print(f"torch {torch.__version__}, {os.environ.get('BENCH_THREADS', '2')} threads, "
          f"float32, D={args.dim}, {args.per_class} per class, "
          f"{time.strftime('%Y-%m-%d')}", flush=True)
    results = {}
    for b in args.sizes:
        for method in METHODS:
            results[(b, method)] = run_one(method, b, args)
            print(f"  B={b} {method}: {results[(b, method)]}", file=sys.stderr, flush=True)
    print(table(results, args.sizes))
    if args.plot:
        plot(results, args.sizes, args.plot)
        print(f"plot saved to {args.plot}")


if __name__ == "__main__":
    main()
