"""Cross-batch memory: rank each small batch against the last ``--memory-size`` embeddings.

    python examples/xbm.py                       # batch 40 (4 per digit), memory 200

When the batch must stay small, ``pml_smoothap.CrossBatchMemory`` (PML's CrossBatchMemory,
whose whitelist also accepts SmoothAPLoss) keeps a queue of past embeddings and ranks every
query of the batch against the whole queue: each query sees many more positives and negatives
than the batch holds. The memory's entries come from earlier versions of the network, which is
why XBM papers start using it after a warm-up; here it is used from the first step, and the
default memory holds five batches, so that no entry is more than five steps old. The script
trains the same network with the same small batches, seed and budget twice — plain
SmoothAPLoss, then SmoothAPLoss inside CrossBatchMemory — and prints both test results.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import train_digits  # noqa: E402

from pml_smoothap import CrossBatchMemory, SmoothAPLoss  # noqa: E402


def main(argv=None):
    parser = common.add_training_arguments(common.new_parser(__doc__.splitlines()[0]), m_per_class=4)
    parser.add_argument("--memory-size", type=int, default=200, help="embeddings kept in memory")
    args = parser.parse_args(argv)

    splits = common.digits_splits()
    batch = args.m_per_class * args.classes_per_batch
    print(f"batch {batch}, memory {args.memory_size}, {args.epochs} x {args.steps_per_epoch} steps")
    losses = {
        "SmoothAPLoss, batch only": SmoothAPLoss(temperature=args.temperature),
        "SmoothAPLoss + CrossBatchMemory": CrossBatchMemory(
            SmoothAPLoss(temperature=args.temperature), args.embedding_size, memory_size=args.memory_size
        ),
    }
    results = {}
    for name, loss_fn in losses.items():
        model, history = train_digits.train_model(
            args, splits, loss_fn=loss_fn, progress=not args.no_progress
        )
        results[name] = {"test": train_digits.test_metrics(model, args, splits["test"]), "history": history}
        print(f"  {name:32s} {common.format_metrics(results[name]['test'])}", flush=True)
    return results


if __name__ == "__main__":
    main()
