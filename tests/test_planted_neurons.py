"""A planted-neuron check of the speaker-neuron pipeline: FFN neurons made to fire for one cluster
of utterances must be found by ActivationStats + neuron_sets with the right cluster, and
protected pruning must keep them where norm-only pruning removes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.ssl import SSLSpeakerConfig, build_model, ffn_layers
from tests.conftest import TINY_ENCODER
from training.compression.neurons import ActivationStats, neuron_sets
from training.compression.prune import neuron_scores, plan_pruning

LAYER, PLANTED = 1, {0: [3, 17], 1: [5, 29]}  # cluster -> neurons of the layer


def _utterances(rng) -> list[tuple[np.ndarray, int]]:
    """Two clusters of 1 s inputs: low tones and high tones, with noise."""
    t = np.arange(16000) / 16000
    out = []
    for cluster, (lo, hi) in enumerate(((150, 300), (2000, 3000))):
        for _ in range(12):
            f = rng.uniform(lo, hi)
            out.append(((0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32), cluster))
    return out


@torch.no_grad()
def _plant(model, utts) -> None:
    """Neurons that fire only beyond every frame of the other cluster, along the clusters' LDA direction."""
    ff = ffn_layers(model.encoder)[LAYER]
    seen = {0: [], 1: []}
    handle = ff.intermediate_dense.register_forward_pre_hook(lambda m, inp: grabbed.append(inp[0][0]))
    for wave, cluster in utts:
        grabbed = []
        model.frames(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        seen[cluster].append(grabbed[0])  # (T', H) FFN inputs
    handle.remove()
    x0, x1 = torch.cat(seen[0]), torch.cat(seen[1])
    within = torch.cov(x0.T) + torch.cov(x1.T) + 1e-3 * torch.eye(x0.shape[1])
    d = torch.linalg.solve(within, x0.mean(0) - x1.mean(0))
    d = d / d.norm()  # (H,)
    hi, lo = torch.quantile(x1 @ d, 0.995), torch.quantile(x0 @ d, 0.005)  # a dead zone around the other cluster
    for j in PLANTED[0]:
        ff.intermediate_dense.weight[j], ff.intermediate_dense.bias[j] = 10 * d, -10 * hi
    for j in PLANTED[1]:
        ff.intermediate_dense.weight[j], ff.intermediate_dense.bias[j] = -10 * d, 10 * lo
    # norm-only pruning ranks by weight norms, which need not follow activity: give every other
    # neuron a larger output column (activity, read at the fc2 input, is unchanged)
    others = [j for j in range(ff.output_dense.in_features) if j not in PLANTED[0] + PLANTED[1]]
    ff.output_dense.weight[:, others] *= 200


def test_planted_speaker_neurons_are_found_and_protected():
    torch.manual_seed(0)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=32)).eval()
    utts = _utterances(np.random.default_rng(0))
    _plant(model, utts)
    owner = _found(model, utts)
    for cluster, neurons in PLANTED.items():
        for j in neurons:
            assert owner.get(j) == cluster, (j, cluster, owner)  # recall 1, each with its own cluster
    planted = set(PLANTED[0] + PLANTED[1])
    scores = neuron_scores(model)
    baseline = plan_pruning(scores, 0.5)
    assert not planted & set(baseline.keep[LAYER].tolist())  # norm-only removes them all
    protected = [[] for _ in scores]
    protected[LAYER] = sorted(owner)
    plan = plan_pruning(scores, 0.5, protected)
    assert planted <= set(plan.keep[LAYER].tolist()) and plan.removed == baseline.removed  # same ratio


def _found(model, utts) -> dict[int, int]:
    stats = ActivationStats(model, n_utt_labels=2, n_frame_labels=1, top_fraction=0.02)
    for wave, cluster in utts:
        states, _ = model.frames(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        stats.update(wave, cluster, np.zeros(states[0].shape[1], dtype=np.int64))
    sets = neuron_sets(stats, sigma=0.8)
    return dict(zip(sets.speaker[LAYER], sets.speaker_cluster[LAYER]))


def test_control_the_same_model_unplanted_does_not_own_those_neurons():
    """What the first test finds is the planting: unplanted, the positions are not owned as planted."""
    torch.manual_seed(0)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=32)).eval()
    owner = _found(model, _utterances(np.random.default_rng(0)))
    as_planted = [j for c, js in PLANTED.items() for j in js if owner.get(j) == c]
    assert len(as_planted) < 4, as_planted
    with pytest.raises(ValueError, match="sigma"):
        neuron_sets(ActivationStats(model, 2, 1), sigma=0.0)


def test_label_permutations_give_the_null_without_a_new_pass():
    """Per-utterance counts: relabelling with the true labels reproduces the pass; under permuted labels
    the planted neurons are no longer speaker neurons, so the null count sits below the planted one."""
    from training.compression.protection import null_speaker_counts

    torch.manual_seed(0)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(TINY_ENCODER), embedding_dim=32)).eval()
    utts = _utterances(np.random.default_rng(0))
    _plant(model, utts)
    stats = ActivationStats(model, n_utt_labels=2, n_frame_labels=1, top_fraction=0.02, per_utterance=True)
    for wave, cluster in utts:
        states, _ = model.frames(torch.from_numpy(wave)[None], torch.tensor([len(wave)]))
        stats.update(wave, cluster, np.zeros(states[0].shape[1], dtype=np.int64))
    labels = np.array([c for _, c in utts])
    same = stats.relabelled(labels, 2)
    assert all((a == b).all() for a, b in zip(same.counts, stats.counts)) and (same.frames == stats.frames).all()
    true = neuron_sets(stats, 0.8)
    assert set(PLANTED[0] + PLANTED[1]) <= set(true.speaker[LAYER])
    rng = np.random.default_rng(1)
    planted_hits = []
    for _ in range(10):
        sets = neuron_sets(stats.relabelled(rng.permutation(labels), 2), 0.8)
        planted_hits.append(len(set(PLANTED[0] + PLANTED[1]) & set(sets.speaker[LAYER])))
    assert np.mean(planted_hits) < 2, planted_hits
    null = null_speaker_counts(stats, labels, 0.8, 20, 0)
    assert len(null) == 20 and np.percentile(null, 95) < sum(true.counts())
    with pytest.raises(ValueError, match="labels for"):
        stats.relabelled(labels[:-1], 2)
    with pytest.raises(ValueError, match="per_utterance=True"):
        ActivationStats(model, 2, 1).relabelled(labels, 2)
