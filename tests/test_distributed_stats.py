"""The activation-statistics pass on two processes (gloo, as under torchrun on CPUs) gives the
counts and neuron sets of one process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.ssl import SSLSpeakerConfig, build_model
from tests.conftest import TINY_ENCODER
from training.compression.neurons import ActivationStats, neuron_sets
from training.distributed import all_reduce_stats, finish, shard


def _data():
    rng = np.random.default_rng(0)
    t = np.arange(12000) / 16000
    waves, labels = [], []
    for i in range(10):
        f = rng.uniform(150, 300) if i % 2 else rng.uniform(2000, 3000)
        waves.append((0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32))
        labels.append(i % 2)
    return waves, labels


def _stats(waves, labels, rank=None, world=None):
    torch.manual_seed(0)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=32)).eval()
    stats = ActivationStats(model, n_utt_labels=2, n_frame_labels=2, top_fraction=0.02)
    for w, u in shard(list(zip(waves, labels)), rank, world):
        states, _ = model.frames(torch.from_numpy(w)[None], torch.tensor([len(w)]))
        n = states[0].shape[1]
        stats.update(w, u, (np.arange(n) % 2).astype(np.int64))  # two frame classes
    return stats


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ok = False
    try:
        waves, labels = _data()
        stats = _stats(waves, labels, rank, world)
        all_reduce_stats(stats)
        np.savez(f"{out_dir}/rank{rank}.npz", frames=stats.frames, *stats.counts)
        ok = True
    finally:
        finish(ok)


def test_two_processes_reduce_to_the_single_process_statistics(tmp_path):
    waves, labels = _data()
    single = _stats(waves, labels)
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        assert np.array_equal(got["frames"], single.frames)
        for i, counts in enumerate(single.counts):
            assert np.array_equal(got[f"arr_{i}"], counts)  # every rank holds the whole counts
    merged = _stats(waves, labels)
    merged.counts = [np.load(tmp_path / "rank0.npz")[f"arr_{i}"] for i in range(len(single.counts))]
    merged.frames = np.load(tmp_path / "rank0.npz")["frames"]
    assert neuron_sets(merged, 0.8).speaker == neuron_sets(single, 0.8).speaker


def test_shard_splits_without_overlap():
    items = list(range(11))
    parts = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(parts, [])) == items and shard(items) == items
    with pytest.raises(ValueError, match="rank 3"):
        shard(items, 3, 3)
