"""The planted-neuron check of the whole pipeline, downstream included.

An encoder is built in which four known FFN neurons of the last layer are the only carriers of
the cluster information a downstream needs: the rest of that FFN cancels the residual stream
exactly (pairs of neurons with GELU(e z) - GELU(-e z) = e z, written back with weight -1/e),
so the last hidden state is constant unless a planted neuron fires. Identification
(ActivationStats + neuron_sets) must recover the planted neurons; a SUPERB-style head trained
on the frozen last layer must identify the cluster after protected pruning and fall to chance
after norm-only pruning at the same ratio; the "recompute per layer" variant must keep them too
(here pruning the first layer changes nothing downstream, so the recomputed sets agree).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from models.ssl import SSLSpeakerConfig, build_model, ffn_layers  # noqa: E402
from training.compression.neurons import ActivationStats, neuron_sets  # noqa: E402
from training.compression.protection import neuron_sets_for, protect, prune_recompute, specificity  # noqa: E402
from training.compression.prune import PrunePlan, apply_plan, neuron_scores, plan_pruning  # noqa: E402
from training.experiment.downstream import HeadConfig, layer_means, sid_accuracy, split_by_speaker, train_head  # noqa: E402

H, FFN = 32, 128
ENCODER = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=2, intermediate_size=FFN,
               conv_dim=(32,) * 7, feat_extract_norm="group", num_buckets=32, max_bucket_distance=100,
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
PLANTED = {0: [2 * H, 2 * H + 1], 1: [2 * H + 2, 2 * H + 3]}  # cluster -> neurons of the last layer
CANCEL = list(range(2 * H))  # neurons 0..63 cancel the residual stream
OTHERS = list(range(2 * H + 4, FFN))  # 60 neurons: constant activity, large norms, constant output
RATIO = len(OTHERS) / FFN  # removes exactly as many neurons as there are "others"
EPS = 0.001
GAIN = 20.0  # planted pre-activations: far below zero off the cluster (GELU's negative lobe stays tiny)


def _utterances(rng) -> tuple[list[np.ndarray], np.ndarray]:
    """Two clusters of 1 s inputs (low tones, high tones) with noise; 12 each."""
    t = np.arange(16000) / 16000
    waves, labels = [], []
    for cluster, (lo, hi) in enumerate(((150, 300), (2000, 3000))):
        for _ in range(12):
            f = rng.uniform(lo, hi)
            waves.append((0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.normal(size=t.size)).astype(np.float32))
            labels.append(cluster)
    return waves, np.array(labels)


@torch.no_grad()
def _build(waves, labels):
    torch.manual_seed(0)
    model = build_model(SSLSpeakerConfig(family="wavlm", encoder=dict(ENCODER), embedding_dim=16)).eval()
    first, last = ffn_layers(model.encoder)
    first.output_dense.weight.zero_()  # the first layer's FFN writes nothing: pruning it changes nothing
    seen = {0: [], 1: []}
    grab = []
    handle = last.intermediate_dense.register_forward_pre_hook(lambda m, inp: grab.append(inp[0][0].clone()))
    for w, c in zip(waves, labels):
        grab.clear()
        model.frames(torch.from_numpy(w)[None], torch.tensor([len(w)]))
        seen[int(c)].append(grab[0])  # (T', H): the last FFN's inputs
    handle.remove()
    x0, x1 = torch.cat(seen[0]), torch.cat(seen[1])
    within = torch.cov(x0.T) + torch.cov(x1.T) + 1e-3 * torch.eye(H)
    d = torch.linalg.solve(within, x0.mean(0) - x1.mean(0))
    d = d / d.norm()  # (H,): the clusters' LDA direction
    hi, lo = torch.quantile(x1 @ d, 0.995), torch.quantile(x0 @ d, 0.005)  # dead zones around the other cluster
    fc1, fc2 = last.intermediate_dense, last.output_dense
    fc1.weight.zero_(), fc1.bias.zero_(), fc2.weight.zero_(), fc2.bias.zero_()
    for i in range(H):  # exact cancellation: h + FFN(h) loses h
        fc1.weight[2 * i, i], fc1.weight[2 * i + 1, i] = EPS, -EPS
        fc2.weight[i, 2 * i], fc2.weight[i, 2 * i + 1] = -1 / EPS, 1 / EPS
    u = torch.zeros(H)
    u[0] = 1.0
    for j in PLANTED[0]:
        fc1.weight[j], fc1.bias[j], fc2.weight[:, j] = GAIN * d, -GAIN * hi, 5 * u
    for j in PLANTED[1]:
        fc1.weight[j], fc1.bias[j], fc2.weight[:, j] = -GAIN * d, GAIN * lo, -5 * u
    for k, j in enumerate(OTHERS):  # constant activity GELU(b) on every frame, a constant output, large norms
        fc1.bias[j] = 0.1 + 0.001 * k
        fc2.weight[1 + k % (H - 1), j] = 500.0  # scores: planted ~100 < others ~500 < cancel ~1000
    # fc2's bias removes the others' constant output and leaves a fixed unit-scale vector, so the
    # last hidden state is one constant pattern on frames where no planted neuron fires
    constant = fc2.weight[:, OTHERS] @ torch.nn.functional.gelu(fc1.bias[OTHERS])  # (H,)
    fc2.bias.copy_(torch.linspace(-1.0, 1.0, H) - constant)
    return model


def _sets(model, waves, labels):
    cfg = SimpleNamespace(k_ivec=2, k_ssl=1, top_fraction=0.015, sigma=0.8)
    frame_labels = [np.zeros(model.frames(torch.from_numpy(w)[None], torch.tensor([len(w)]))[0][0].shape[1],
                             dtype=np.int64) for w in waves]
    sets, stats = neuron_sets_for(model, waves, labels, frame_labels, cfg)
    return sets, stats, frame_labels, cfg


def _downstream(model, waves, labels) -> float:
    x = layer_means(model, waves)  # (N, 3, H)
    train, test = split_by_speaker(labels, 0.25, 0)
    head = train_head(x[train], labels[train], 2, 0, HeadConfig(layers="last", epochs=60, batch_size=8))
    return sid_accuracy(head, x[test], labels[test])


def test_protected_pruning_keeps_the_downstream_and_norm_only_loses_it():
    waves, labels = _utterances(np.random.default_rng(0))
    model = _build(waves, labels)
    sets, stats, frame_labels, cfg = _sets(model, waves, labels)
    found = dict(zip(sets.speaker[1], sets.speaker_cluster[1]))
    planted = {j: c for c, js in PLANTED.items() for j in js}
    assert all(found.get(j) == c for j, c in planted.items()), found  # recall 1, right clusters
    assert len(set(planted) & set(found)) / len(found) >= 0.5, found  # precision

    scores = neuron_scores(model)
    baseline = plan_pruning(scores, RATIO)
    prot, _ = protect(sets, specificity(stats, sets), [FFN, FFN], RATIO)
    protected = plan_pruning(scores, RATIO, prot)
    assert baseline.removed == protected.removed  # the same ratio
    assert not set(planted) & set(baseline.keep[1].tolist()) and set(planted) <= set(protected.keep[1].tolist())
    assert set(CANCEL) <= set(baseline.keep[1].tolist()) and set(CANCEL) <= set(protected.keep[1].tolist())

    def pruned(keep):
        return apply_plan(build_copy(model), PrunePlan(keep, [0, 0], [0, 0], RATIO, "layer"))

    # the tiny random encoder's frames of the two clusters overlap along the planted direction, so
    # even unpruned the head is not perfect; what matters is protected keeps it and norm-only falls to chance
    assert _downstream(model, waves, labels) >= 75.0
    assert _downstream(pruned(protected.keep), waves, labels) >= 75.0
    assert _downstream(pruned(baseline.keep), waves, labels) == 50.0  # chance: the last layer is constant

    # recompute per layer: sets recomputed on the partially pruned model before each layer
    rec = build_copy(model)
    kept, _ = prune_recompute(rec, waves, labels, frame_labels, cfg, RATIO)
    assert set(planted) <= set(kept[1].tolist())
    assert _downstream(rec, waves, labels) >= 75.0


def test_control_without_the_planted_neurons_the_downstream_is_at_chance():
    """What the head reads is the planting: silence the planted neurons and nothing is left."""
    waves, labels = _utterances(np.random.default_rng(0))
    model = _build(waves, labels)
    with torch.no_grad():
        for js in PLANTED.values():
            ffn_layers(model.encoder)[1].output_dense.weight[:, js] = 0.0
    assert _downstream(model, waves, labels) == 50.0
    stats = ActivationStats(model, 2, 1, 0.015)
    assert neuron_sets(stats, 0.8).counts() == [0, 0]  # no statistics, no neurons


def build_copy(model):
    """A deep copy of ``model``."""
    import copy

    return copy.deepcopy(model)
