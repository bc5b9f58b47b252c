"""SmoothAPLoss under PML's DistributedLossWrapper: 2 CPU processes, gloo backend.

Each rank holds one slice of a global batch. PML's wrapper multiplies the loss by the world size,
so that DDP's gradient averaging gives the gradient of the loss itself:
* efficient=False: every rank computes the loss of the whole gathered batch; only its own slice
  carries gradient.
* efficient=True: each rank ranks its own queries against all gathered items, without the
  query's own copy (leave-one-out); gradient flows through its own queries and items only.
* CrossBatchMemory: every rank enqueues the gathered batch and ranks it against the memory.
"""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from pml_smoothap import CrossBatchMemory, SmoothAPLoss
from pml_smoothap.reference import per_query_smooth_ap, reference_sets

WORLD_SIZE, LOCAL_BATCH, TAU = 2, 10, 0.05


def global_batch():
    gen = torch.Generator().manual_seed(0)
    embeddings = torch.randn(WORLD_SIZE * LOCAL_BATCH, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (WORLD_SIZE * LOCAL_BATCH,), generator=gen)
    return embeddings, labels


def local_slice(rank):
    return slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)


def run_rank(rank, init_file, out_dir):
    torch.set_num_threads(1)  # two processes share the test machine's cores
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE
    )
    try:
        embeddings, labels = global_batch()
        results = {}
        for efficient in (False, True):
            local = embeddings[local_slice(rank)].clone().requires_grad_()
            loss_fn = DistributedLossWrapper(SmoothAPLoss(TAU), efficient=efficient)
            loss = loss_fn(local, labels[local_slice(rank)])
            loss.backward()
            results[efficient] = (loss.detach(), local.grad)
        local = embeddings[local_slice(rank)].clone().requires_grad_()
        memory = DistributedLossWrapper(CrossBatchMemory(SmoothAPLoss(TAU), 6, memory_size=64))
        loss = memory(local, labels[local_slice(rank)])
        loss.backward()
        results["memory"] = (loss.detach(), local.grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    mp.spawn(run_rank, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(tmp / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_not_efficient_is_the_loss_of_the_gathered_batch(rank_results, rank):
    embeddings, labels = global_batch()
    embeddings.requires_grad_()
    one_process = SmoothAPLoss(TAU)(embeddings, labels)
    (full_grad,) = torch.autograd.grad(one_process, embeddings)
    loss, grad = rank_results[rank][False]
    torch.testing.assert_close(loss, WORLD_SIZE * one_process.detach())
    torch.testing.assert_close(grad, WORLD_SIZE * full_grad[local_slice(rank)])


def test_not_efficient_averaged_gradients_are_the_one_process_gradient(rank_results):
    embeddings, labels = global_batch()
    embeddings.requires_grad_()
    (full_grad,) = torch.autograd.grad(SmoothAPLoss(TAU)(embeddings, labels), embeddings)
    # What DDP does to the parameters' gradients: average over ranks (each rank owns a slice).
    gathered = torch.cat([result[False][1] for result in rank_results])
    torch.testing.assert_close(gathered / WORLD_SIZE, full_grad)


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_efficient_ranks_local_queries_against_all_items(rank_results, rank):
    embeddings, labels = global_batch()
    embeddings.requires_grad_()
    scores = CosineSimilarity()(embeddings)
    # Leave-one-out sets on the gathered batch: the query's own copy is neither positive nor ranked.
    positives, retrieval = reference_sets(labels, include_self=False)
    aps = per_query_smooth_ap(scores, positives, retrieval, TAU)
    local_queries = range(WORLD_SIZE * LOCAL_BATCH)[local_slice(rank)]
    expected = torch.stack([1 - aps[q] for q in local_queries if aps[q] is not None]).mean()
    (expected_grad,) = torch.autograd.grad(expected, embeddings)
    loss, grad = rank_results[rank][True]
    torch.testing.assert_close(loss, WORLD_SIZE * expected.detach())
    torch.testing.assert_close(grad, WORLD_SIZE * expected_grad[local_slice(rank)])


@pytest.mark.parametrize("rank", range(WORLD_SIZE))
def test_cross_batch_memory_first_step_is_leave_one_out_ap_of_gathered_batch(rank_results, rank):
    embeddings, labels = global_batch()
    queries = embeddings.clone().requires_grad_()
    # The memory holds detached copies: gradient flows through the queries only.
    scores = CosineSimilarity()(queries, embeddings)
    positives, retrieval = reference_sets(labels, include_self=False)
    aps = per_query_smooth_ap(scores, positives, retrieval, TAU)
    expected = torch.stack([1 - ap for ap in aps if ap is not None]).mean()
    (expected_grad,) = torch.autograd.grad(expected, queries)
    loss, grad = rank_results[rank]["memory"]
    torch.testing.assert_close(loss, WORLD_SIZE * expected.detach())
    torch.testing.assert_close(grad, WORLD_SIZE * expected_grad[local_slice(rank)])
