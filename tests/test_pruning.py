"""Compression pieces: i-vectors, neuron statistics, protected structured pruning."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.ssl import SSLSpeakerConfig, build_model, ffn_layers  # noqa: E402
from tests.conftest import TINY_ENCODER  # noqa: E402
from training.compression.ivector import IVectorExtractor, baum_welch, length_norm, train_ubm  # noqa: E402
from training.compression.neurons import ActivationStats, kmeans_labels, neuron_sets  # noqa: E402
from training.compression.prune import PruneError, apply_plan, neuron_scores, plan_pruning  # noqa: E402


def tiny(seed=0, widths=None):
    torch.manual_seed(seed)
    return build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=16,
                                        ffn_widths=widths)).eval()


def test_slicing_equals_zeroing_fc2_columns():
    model = tiny()
    scores = neuron_scores(model)
    plan = plan_pruning(scores, 0.5)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for ff, keep in zip(ffn_layers(masked.encoder), plan.keep):
            drop = np.setdiff1d(np.arange(ff.output_dense.in_features), keep)
            ff.output_dense.weight[:, torch.as_tensor(drop)] = 0.0
    pruned = apply_plan(copy.deepcopy(model), plan)
    assert [ff.intermediate_dense.out_features for ff in ffn_layers(pruned.encoder)] == [64, 64]
    x, lens = torch.randn(2, 12000) * 0.1, torch.tensor([12000, 8000])
    with torch.no_grad():
        assert torch.allclose(masked(x, lens), pruned(x, lens), atol=1e-6)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_protected_never_removed_and_counts_exact(scope):
    rng = np.random.default_rng(0)
    scores = [rng.random(128), rng.random(128)]
    # protect the lowest-scoring neurons: the ones plain pruning would take first
    protected = [list(np.argsort(s)[:20]) for s in scores]
    for ratio in (0.0, 0.3, 0.5, 0.84):
        plan = plan_pruning(scores, ratio, protected, scope)
        assert sum(plan.removed) == (round(ratio * 256) if scope == "global" else 2 * round(ratio * 128))
        for keep, p in zip(plan.keep, protected):
            assert set(p) <= set(keep.tolist())
    baseline = plan_pruning(scores, 0.5, None, scope)
    assert not set(protected[0]) <= set(baseline.keep[0].tolist())
    again = plan_pruning(scores, 0.3, protected, scope)
    assert all(np.array_equal(a, b) for a, b in zip(again.keep, plan_pruning(scores, 0.3, protected, scope).keep))


def test_prune_errors_say_what_to_change():
    scores = [np.arange(10.0)]
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        plan_pruning(scores, 1.0)
    with pytest.raises(PruneError, match=r"\[0, 1\)"):
        plan_pruning(scores, -0.1)
    with pytest.raises(PruneError, match="protect fewer"):
        plan_pruning(scores, 0.5, [list(range(8))])
    with pytest.raises(PruneError, match="scope"):
        plan_pruning(scores, 0.5, scope="blocks")


def test_ivectors_separate_speakers():
    """Synthetic speakers: frames from a GMM whose means are shifted per speaker."""
    rng = np.random.default_rng(0)
    c, f, n_spk = 8, 6, 6
    means = rng.standard_normal((c, f)) * 3
    shifts = rng.standard_normal((n_spk, f)) * 0.8
    utts, spk = [], []
    for s in range(n_spk):
        for _ in range(6):
            comp = rng.integers(0, c, 300)
            utts.append(means[comp] + shifts[s] + rng.standard_normal((300, f)))
            spk.append(s)
    ubm = train_ubm(np.concatenate(utts), c, 10)
    stats = [baum_welch(ubm, u) for u in utts]
    iv = length_norm(IVectorExtractor(ubm, 10).fit(stats, 5).transform(stats))
    sim = iv @ iv.T
    same = np.array(spk)[:, None] == np.array(spk)[None, :]
    off = ~np.eye(len(spk), dtype=bool)
    assert sim[same & off].mean() > sim[~same].mean() + 0.3
    with pytest.raises(ValueError, match="too few"):
        train_ubm(np.zeros((5, 3)), 8)


def test_activation_stats_and_neuron_sets():
    model = tiny()
    stats = ActivationStats(model, n_utt_labels=2, n_frame_labels=3)
    assert stats.taus == [1, 1]
    rng = np.random.default_rng(0)
    for u in range(6):
        wave = (rng.standard_normal(8000) * (0.05 if u % 2 else 0.3)).astype(np.float32)
        n_frames = (8000 - 400) // 320 + 1
        stats.update(wave, u % 2, rng.integers(0, 3, n_frames))
    assert stats.frames.sum() == 6 * 24
    for counts, tau in zip(stats.counts, stats.taus):
        assert counts.sum() == stats.frames.sum() * tau  # exactly tau active per frame
    sets = neuron_sets(stats, sigma=0.5)
    assert len(sets.speaker) == 2 and all(o in (0, 1) for layer in sets.speaker_cluster for o in layer)
    with pytest.raises(ValueError, match="sigma"):
        neuron_sets(stats, sigma=0)
    with pytest.raises(ValueError, match="clusters"):
        kmeans_labels(np.zeros((2, 4)), 3)
