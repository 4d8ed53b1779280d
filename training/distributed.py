"""Running the offline jobs' heavy passes on several processes (``torchrun``), on GPUs or CPUs.

    torchrun --nproc-per-node 4 -m training.experiment --out DIR ...      # one node, 4 processes
    torchrun --nnodes 2 --node-rank R --master-addr HOST --nproc-per-node 8 -m training.experiment ...

``init()`` joins the process group torchrun describes in the environment (NCCL when each
process has a GPU, else gloo) and is a no-op in a plain ``python`` run. The activation
statistics pass (the part that grows with the calibration set and the model) is sharded: each
rank takes every ``world``-th utterance, and the counts, which are sums, are added across ranks
with ``all_reduce``, so every rank ends with the statistics one process would have computed
and the same neuron sets. Everything before it (i-vectors, k-means) is cheap and seeded, and
runs identically on every rank. The downstream's feature pass is sharded the same way and
gathered (``gather_shards``), its heads train under DistributedDataParallel, and only rank 0
writes files.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["init", "finish", "rank_and_world", "shard", "all_reduce_stats", "is_main", "gather_shards"]


def init() -> tuple[int, int]:
    """Join torchrun's process group when its environment is set; returns (rank, world size)."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return rank_and_world()


def finish(ok: bool = True) -> None:
    """Leave the process group, if any. After a successful run every rank first meets at a
    barrier: a rank that tore down its gloo connections while a peer still used them made the
    peer abort ("terminate called without an active exception"). After a failure the peers may
    never arrive, so the group is destroyed at once."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ok:
        dist.barrier()
    dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes results (rank 0)."""
    return rank_and_world()[0] == 0


def shard(items: list, rank: int | None = None, world: int | None = None) -> list:
    """Every ``world``-th item from ``rank`` (all items outside a process group)."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return items[rank::world]


def all_reduce_stats(stats) -> None:
    """Add ``ActivationStats`` counts and frame totals across ranks, in place (no-op alone)."""
    if rank_and_world()[1] == 1:
        return
    device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    for i, counts in enumerate(stats.counts):
        t = torch.from_numpy(counts).to(device)
        dist.all_reduce(t)
        stats.counts[i] = t.cpu().numpy().astype(np.int64)
    t = torch.from_numpy(stats.frames).to(device)
    dist.all_reduce(t)
    stats.frames = t.cpu().numpy().astype(np.int64)
    if stats.utterances is not None:  # per-utterance counts back in the unsharded order
        rank, world = rank_and_world()
        parts: list = [None] * world
        dist.all_gather_object(parts, stats.utterances)
        merged: list = [None] * sum(len(p) for p in parts)
        for r, p in enumerate(parts):
            merged[r::world] = p
        stats.utterances = merged


def gather_shards(part: np.ndarray, n: int) -> np.ndarray:
    """Reassemble an array computed by ``shard``: rank r holds rows r, r + world, ...; every rank gets all n rows."""
    rank, world = rank_and_world()
    if world == 1:
        return part
    parts: list = [None] * world
    dist.all_gather_object(parts, part)
    out = np.empty((n, *part.shape[1:]), dtype=part.dtype)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out
