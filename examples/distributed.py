"""Data-parallel Smooth-AP: each process embeds its own batch, the loss ranks the union.

    torchrun --nproc_per_node=2 examples/distributed.py              # gloo on CPU
    torchrun --nproc_per_node=8 examples/distributed.py --device cuda  # NCCL, one GPU each

Each process draws its own MPerClassSampler batch (seed + rank) and runs it through a
DistributedDataParallel copy of the digits network. PML's DistributedLossWrapper all-gathers the
embeddings, so SmoothAPLoss ranks every query against the batches of all processes (world size
x batch items); gradients reach the local embeddings, and DDP averages the parameter gradients.
Rank 0 reports the held-out test metrics and whether all ranks ended with identical weights.
"""
import os
import sys

import torch
import torch.distributed as dist
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import train_digits  # noqa: E402

from pml_smoothap import SmoothAPLoss  # noqa: E402


def weights_identical_across_ranks(model):
    """True on every rank iff all ranks hold exactly rank 0's parameters."""
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    reference = weights.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(weights, reference))], device=weights.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def main(argv=None):
    parser = common.add_training_arguments(common.new_parser(__doc__.splitlines()[0]), device="cpu")
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if args.device.startswith("cuda"):
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        backend = "gloo"
    dist.init_process_group(backend)
    try:
        common.seed_everything(args.seed)
        network = train_digits.build_model(args, device)
        model = torch.nn.parallel.DistributedDataParallel(
            network, device_ids=[local_rank] if device.type == "cuda" else None
        )
        common.seed_everything(args.seed + rank)  # a different stream of batches per process
        splits = common.digits_splits()
        loss_fn = DistributedLossWrapper(SmoothAPLoss(temperature=args.temperature))
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
        history = common.train(
            model,
            loss_fn,
            splits["train"],
            optimizer,
            device,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            m_per_class=args.m_per_class,
            classes_per_batch=args.classes_per_batch,
            progress=rank == 0 and not args.no_progress,
        )
        identical = weights_identical_across_ranks(network)
        if rank == 0:
            batch = args.m_per_class * args.classes_per_batch
            print(
                f"{world_size} processes ({backend}), {batch} per process, "
                f"{world_size * batch} ranked per query"
            )
            for record in history:
                print(f"epoch {record['epoch']}: loss {record['loss']:.4f}")
            metrics = train_digits.test_metrics(network, args, splits["test"])
            print(f"test: {common.format_metrics(metrics)}")
            print(f"weights identical across ranks: {identical}")
        # Leave together, and drop DDP's hold on the process group before destroying it: a gloo
        # rank torn down while its peer is still evaluating can hang at exit.
        dist.barrier()
        del model
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
