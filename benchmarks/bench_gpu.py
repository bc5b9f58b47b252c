"""Smooth-AP on a CUDA device: the Triton backend checked, then timed against the alternatives.

1. Checks the "triton" backend against the "torch" backend (AP and ∂AP/∂scores) on a few
   shapes: labels, mined masks, a rectangular reference set with many positives, float16/bfloat16.
2. Times forward+backward (median, torch.cuda.synchronize around each run) and measures peak
   CUDA memory growth (torch.cuda.max_memory_allocated over the memory allocated before) for
   ordered batches of B cosine-scored random embeddings, 4 per class (D=512):
   * both backends on the rank computation alone (a (B, B) score matrix → AP → ∂/∂scores),
   * SmoothAPLoss with each backend, the authors' formula and PML 2.9.0's SmoothAPLoss
     (embeddings → loss → ∂/∂embeddings); the last two build B×B×B tensors and are skipped
     when their estimated memory exceeds the free memory,
   * the floor of DESIGN.md §2 as one fused Triton pass: the sigmoid of every
     (query, positive, item) difference, summed per query (nothing big is written).
3. Prints one markdown table; "x floor" is the time over the floor's.

    python benchmarks/bench_gpu.py                        # B = 1024 ... 65536, a few minutes
    python benchmarks/bench_gpu.py --quick                # B up to 16384, fewer repeats
    python benchmarks/bench_gpu.py --device cpu --quick   # dry run on CPU (Triton's interpreter)
"""
import argparse
import os
import statistics
import sys
import time
import warnings

PER_CLASS = 4
DIM = 512
BYTES_PER_B3 = 40  # the authors' formula: 4.9 GB at B=512 (benchmarks/bench_cpu.py)
SIZES = {("cuda", False): [1024, 4096, 16384, 32768, 65536], ("cuda", True): [1024, 4096, 16384],
         ("cpu", False): [64, 128], ("cpu", True): [32, 64]}
CHECK_TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}  # relative to max |·|


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cpu: a dry run through Triton's interpreter, tiny batches")
    parser.add_argument("--quick", action="store_true", help="fewer batch sizes and repeats")
    parser.add_argument("--sizes", type=int, nargs="+", help="batch sizes (overrides the defaults)")
    parser.add_argument("--repeats", type=int,
                        help="timed runs per measurement (default 5, 3 with --quick, 1 on CPU)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip the remaining measurements after this many seconds")
    return parser.parse_args()


def make_floor_kernel():
    """Σ_i Σ_j σ(s_qj - s_qi) over the positives i of each query q: one row per program."""
    import triton
    import triton.language as tl

    @triton.jit
    def sigmoid_floor_kernel(scores_ptr, stride_sq, table_ptr, stride_tq, counts_ptr, out_ptr,
                             n_items, scale, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        q = tl.program_id(0).to(tl.int64)
        row = scores_ptr + q * stride_sq
        n_pos = tl.load(counts_ptr + q)
        total = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
        for p0 in range(0, n_pos, BLOCK_P):
            offs = p0 + tl.arange(0, BLOCK_P)
            cols = tl.load(table_ptr + q * stride_tq + offs, mask=offs < n_pos, other=0)
            anchors = tl.load(row + cols).to(tl.float32) * scale
            for n0 in range(0, n_items, BLOCK_N):
                items_at = n0 + tl.arange(0, BLOCK_N)
                items = tl.load(row + items_at, mask=items_at < n_items,
                                other=float("-inf")).to(tl.float32) * scale
                total += tl.sigmoid(items[None, :] - anchors[:, None])
        tl.store(out_ptr + q, tl.sum(tl.sum(total, axis=1), axis=0))

    return sigmoid_floor_kernel


class Bench:
    def __init__(self, device, repeats, budget_s):
        import torch

        self.torch, self.device, self.repeats = torch, torch.device(device), repeats
        self.deadline = time.perf_counter() + budget_s
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def measure(self, step, repeats=None):
        """{"ms": median time, "peak_mb": peak memory growth, "loss": float} of ``step()``
        (which returns a scalar tensor), or {"skipped": why}."""
        torch = self.torch
        if time.perf_counter() > self.deadline:
            return {"skipped": "time budget spent"}
        try:
            step()  # warm-up: Triton compiles, the caching allocator fills
            self.sync()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            times = []
            for _ in range(repeats or self.repeats):
                self.sync()
                t0 = time.perf_counter()
                loss = step()
                self.sync()
                times.append(time.perf_counter() - t0)
            peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if self.cuda else None
            return {"ms": 1e3 * statistics.median(times), "peak_mb": peak, "loss": float(loss)}
        except torch.cuda.OutOfMemoryError:
            return {"skipped": "OOM"}
        except RuntimeError as error:  # e.g. a PyTorch limit on huge tensors
            return {"skipped": f"error: {str(error).splitlines()[0][:60]}"}
        finally:
            if self.cuda:
                torch.cuda.empty_cache()

    def free_gb(self):
        if self.cuda:
            return self.torch.cuda.mem_get_info(self.device)[0] / 1e9
        return 8.0  # the CPU dry run keeps the B³ methods small


def check_backends(bench, out):
    """Triton against torch: max |difference| / max |torch| of AP and gradient, per case."""
    import torch

    from pml_smoothap import ops

    g = torch.Generator().manual_seed(0)
    big = bench.cuda
    n, q_ref, n_ref = (512, 256, 1000) if big else (16, 6, 30)
    labels = torch.randint(0, n // 8, (n,), generator=g)
    mined_pos = torch.rand(n // 2, n + 37, generator=g) < 0.05
    mined_valid = mined_pos | (torch.rand(n // 2, n + 37, generator=g) < 0.5)
    ref_pos = torch.rand(q_ref, n_ref, generator=g) < 0.3  # ~300 positives each on CUDA
    cases = [
        ("labels, include_self", n, n, labels[:, None] == labels[None, :], None, torch.float32),
        ("mined pairs, Q != N", n // 2, n + 37, mined_pos, mined_valid, torch.float32),
        ("ref set, many positives", q_ref, n_ref, ref_pos, None, torch.float32),
        ("labels, float16", n, n, labels[:, None] == labels[None, :], None, torch.float16),
        ("labels, bfloat16", n, n, labels[:, None] == labels[None, :], None, torch.bfloat16),
    ]
    out.append("| check: triton vs torch | Q×N | AP rel. diff | grad rel. diff | ok |")
    out.append("|---|---|---:|---:|---|")
    all_ok = True
    for name, n_queries, n_items, pos_mask, valid_mask, dtype in cases:
        scores = (torch.randn(n_queries, n_items, generator=g) * 0.1).to(bench.device, dtype)
        pos_mask = pos_mask.to(bench.device)
        valid_mask = None if valid_mask is None else valid_mask.to(bench.device)
        weights = torch.randn(n_queries, generator=g).to(bench.device)
        results = []
        for backend in ("triton", "torch"):
            leaf = scores.clone().requires_grad_()
            ap = ops.smooth_ap(leaf, pos_mask, valid_mask, temperature=0.01, backend=backend)
            (ap.float().nan_to_num() * weights).sum().backward()
            results.append((ap.detach().float().nan_to_num(), leaf.grad.float()))
        (ap_t, grad_t), (ap_ref, grad_ref) = results
        diffs = [((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                 for a, b in ((ap_t, ap_ref), (grad_t, grad_ref))]
        ok = max(diffs) <= CHECK_TOLERANCE[str(dtype).split(".")[1]]
        all_ok &= ok
        out.append(f"| {name} | {n_queries}×{n_items} | {diffs[0]:.1e} | {diffs[1]:.1e} "
                   f"| {'yes' if ok else 'NO'} |")
    return all_ok


def benchmark_ranks(bench, emb, labels, floor_kernel):
    """Both backends on the rank computation alone (scores → 1 - mean AP → ∂/∂scores), and the
    floor, on the cosine scores of ``emb``."""
    import torch

    from pml_smoothap import ops
    from pml_smoothap.kernels import triton_fused

    batch_size = len(emb)
    scores = (emb.detach() @ emb.detach().T).requires_grad_()
    pos_mask = labels[:, None] == labels[None, :]
    results = {}
    for backend in ("triton", "torch"):
        def ranks_step(backend=backend):
            scores.grad = None
            loss = 1 - ops.smooth_ap(scores, pos_mask, backend=backend).mean()
            loss.backward()
            return loss.detach()
        results[f"{backend}: ranks (scores → AP)"] = bench.measure(ranks_step)

    table, counts = triton_fused.positive_table(pos_mask)
    block = triton_fused.default_block_sizes(table.shape[1], batch_size)
    floor_out = torch.empty(batch_size, device=bench.device)

    def floor_step():
        floor_kernel[(batch_size,)](scores, scores.stride(0), table, table.stride(0), counts,
                                    floor_out, batch_size, 100.0,
                                    BLOCK_P=block.positives, BLOCK_N=block.items)
        return floor_out[0]
    results["floor: one σ pass (Triton)"] = bench.measure(floor_step)
    return results


def benchmark_losses(bench, emb, labels):
    """Embeddings → loss → ∂/∂embeddings: SmoothAPLoss with each backend, the authors' formula
    and PML's SmoothAPLoss (these two unless their B×B×B tensors would not fit)."""
    from pytorch_metric_learning import losses
    from pytorch_metric_learning.distances import CosineSimilarity

    from pml_smoothap import SmoothAPLoss
    from pml_smoothap.reference import authors_smooth_ap_loss

    batch_size = len(emb)

    def authors(emb, labels):  # dot products of the (unit) embeddings, ordered batch
        return authors_smooth_ap_loss(emb, batch_size // PER_CLASS)

    methods = {
        "triton: SmoothAPLoss": SmoothAPLoss(backend="triton"),
        "torch: SmoothAPLoss": SmoothAPLoss(backend="torch"),
        "authors' formula": authors,
        "PML 2.9.0 SmoothAPLoss": losses.SmoothAPLoss(distance=CosineSimilarity()),
    }
    results = {}
    for name, loss_fn in methods.items():
        def step(loss_fn=loss_fn):
            emb.grad = None
            loss = loss_fn(emb, labels)
            loss.backward()
            return loss.detach()
        if name.startswith(("triton", "torch")):
            results[name] = bench.measure(step)
            continue
        need_gb = BYTES_PER_B3 * batch_size**3 / 1e9
        if need_gb > bench.free_gb():
            results[name] = {"skipped": f"OOM (needs {need_gb:,.0f} GB)"}
        else:
            results[name] = bench.measure(step, repeats=min(bench.repeats, 3))
    return results


def benchmark_size(bench, batch_size, floor_kernel):
    """{method: measurement} for an ordered batch of ``batch_size`` random unit embeddings."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    labels = torch.arange(batch_size // PER_CLASS, device=bench.device)
    labels = labels.repeat_interleave(PER_CLASS)
    emb = F.normalize(torch.randn(batch_size, DIM, device=bench.device), dim=1).requires_grad_()
    return {**benchmark_ranks(bench, emb, labels, floor_kernel),
            **benchmark_losses(bench, emb, labels)}


def table(results):
    lines = ["| B | method | fwd+bwd ms | peak MB | x floor | loss |",
             "|---:|---|---:|---:|---:|---:|"]
    for batch_size, by_method in results.items():
        floor = by_method["floor: one σ pass (Triton)"]
        for method, r in by_method.items():
            if "skipped" in r:
                lines.append(f"| {batch_size} | {method} | {r['skipped']} | | | |")
                continue
            peak = "n/a" if r["peak_mb"] is None else f"{r['peak_mb']:,.0f}"
            x_floor = f"{r['ms'] / floor['ms']:.1f}" if "ms" in floor else ""
            loss = "" if method.startswith("floor") else f"{r['loss']:.5f}"
            lines.append(f"| {batch_size} | {method} | {r['ms']:.2f} | {peak} | {x_floor} "
                         f"| {loss} |")
    return "\n".join(lines)


def main():
    args = parse_args()
    # Triton picks compiled kernels or its interpreter when a kernel is defined: decide first.
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        # The interpreter evaluates σ(-inf - s) with numpy's exp, which warns on overflow.
        warnings.filterwarnings("ignore", "overflow encountered in exp", RuntimeWarning)
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    import torch
    import triton

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --device cpu for a dry run")
    sizes = args.sizes or SIZES[(args.device, args.quick)]
    repeats = args.repeats or (1 if args.device == "cpu" else 3 if args.quick else 5)
    bench = Bench(args.device, repeats, args.budget_s)
    name = torch.cuda.get_device_name() if bench.cuda else "CPU, Triton interpreter (dry run)"
    print(f"{time.strftime('%Y-%m-%d')}, {name}, torch {torch.__version__}, triton "
          f"{triton.__version__}, float32, D={DIM}, {PER_CLASS} per class, τ=0.01, median of "
          f"{repeats}\n", flush=True)
    out = []
    all_ok = check_backends(bench, out)
    print("\n".join(out) + "\n", flush=True)
    floor_kernel = make_floor_kernel()
    results = {}
    for batch_size in sizes:
        results[batch_size] = benchmark_size(bench, batch_size, floor_kernel)
        print(f"  B={batch_size} done", file=sys.stderr, flush=True)
    print(table(results))
    if not all_ok:
        sys.exit("the Triton backend disagrees with the torch backend (see the check table)")


if __name__ == "__main__":
    main()
