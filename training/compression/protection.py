"""Steps 1-5 of the method glued together: cluster labels, speaker-neuron sets, and the pruned models.

Shared by both protocols of ``training.experiment``:
- ``cluster_labels``: i-vector utterance clusters (k_ivec) and SSL frame clusters (k_ssl);
- ``neuron_sets_for``: activation statistics under those labels -> speaker neurons (sharded over
  ``torchrun`` ranks, summed across them);
- ``protect``: the speaker neurons a ratio lets a layer keep (most speaker-specific first);
- ``prune_recompute``: the "recompute per layer" variant: the sets are recomputed on the partially
  pruned model before each layer is pruned (cluster labels stay those of the unpruned model;
  the activation statistics are what pruning earlier layers changes);
- ``random_keep`` and ``remove_all_ffn``: the controls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.ssl import SSLSpeakerModel, ffn_layers
from training.compression.clusters import IVectorModel
from training.compression.ivector import IVectorExtractor, baum_welch, length_norm, train_ubm
from training.compression.neurons import ActivationStats, NeuronSets, kmeans_labels, neuron_sets, ssl_frames
from training.compression.prune import PrunePlan, apply_plan, neuron_scores, plan_pruning, slice_ffn
from training.data.features import mfcc
from training.distributed import all_reduce_stats, shard

__all__ = ["cluster_labels", "neuron_sets_for", "null_speaker_counts", "shuffled_protect", "speaker_neuron_sets",
           "specificity", "protect", "prune_recompute", "random_keep", "remove_all_ffn", "load_speaker_model", "kept_sets"]


def cluster_labels(model: SSLSpeakerModel, waves: list[np.ndarray], cfg: Any,
                   ivectors: IVectorModel | None = None) -> tuple[np.ndarray, list[np.ndarray], dict]:
    """(utterance labels (N,), frame labels [(T_i,)], report) for the calibration waveforms.

    ``cfg`` has k_ivec, k_ssl, ssl_layer (-1: middle hidden state), ubm_components, ivector_rank, seed.
    ``ivectors``: an extractor trained on the whole training split (``training.compression.clusters``); without
    it one is trained on the calibration waveforms themselves.
    """
    rng = np.random.default_rng(cfg.seed)
    if ivectors is not None:
        ivecs = ivectors.ivectors(waves)  # (N, R)
    else:
        feats = [mfcc(w, cmn=False) for w in waves]
        allf = np.concatenate(feats)
        sample = allf[rng.choice(len(allf), min(100_000, len(allf)), replace=False)]
        ubm = train_ubm(sample, min(cfg.ubm_components, max(2, len(sample) // 50)), 8, cfg.seed)
        stats_bw = [baum_welch(ubm, f) for f in feats]
        rank = min(cfg.ivector_rank, len(waves) - 1)
        ivecs = length_norm(IVectorExtractor(ubm, rank, cfg.seed).fit(stats_bw, 4).transform(stats_bw))
    utt_labels, _ = kmeans_labels(ivecs, cfg.k_ivec, cfg.seed, "utterances (i-vectors)")
    n_states = model.encoder.config.num_hidden_layers + 1
    layer = cfg.ssl_layer if cfg.ssl_layer >= 0 else n_states // 2
    frames = [ssl_frames(model, w, layer) for w in waves]  # [(T_i, H)]
    allfr = np.concatenate(frames)
    pick = allfr[rng.choice(len(allfr), min(50_000, len(allfr)), replace=False)]
    _, centroids = kmeans_labels(pick, cfg.k_ssl, cfg.seed, "frames")
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    frame_labels = [index.search(np.ascontiguousarray(f, dtype=np.float32), 1)[1][:, 0] for f in frames]
    share = np.bincount(np.concatenate(frame_labels), minlength=cfg.k_ssl) / len(allfr)
    report = {"ssl_layer": layer, "ssl_cluster_frame_share": share.round(4).tolist(),
              "ivector_cluster_utterances": np.bincount(utt_labels, minlength=cfg.k_ivec).tolist(),
              "utt_labels": utt_labels.tolist()}
    return utt_labels, frame_labels, report


def neuron_sets_for(model: SSLSpeakerModel, waves: list[np.ndarray], utt_labels: np.ndarray,
                    frame_labels: list[np.ndarray], cfg: Any,
                    per_utterance: bool = False) -> tuple[NeuronSets, ActivationStats]:
    """Activation statistics of ``model`` under fixed labels -> neuron sets (sigma, top_fraction from ``cfg``).

    Under torchrun each rank counts its shard of the utterances; the counts are summed across ranks.
    ``per_utterance`` keeps each utterance's counts too (for ``null_speaker_counts``).
    """
    stats = ActivationStats(model, int(max(utt_labels.max() + 1, cfg.k_ivec)), cfg.k_ssl, cfg.top_fraction,
                            per_utterance)
    for w, u, fl in shard(list(zip(waves, utt_labels, frame_labels))):
        stats.update(w, int(u), fl)
    all_reduce_stats(stats)
    return neuron_sets(stats, cfg.sigma), stats


def speaker_neuron_sets(model: SSLSpeakerModel, waves: list[np.ndarray], cfg: Any,
                        layers: list[int] | None = None) -> tuple[NeuronSets, ActivationStats, dict]:
    """Steps 1-4 of the method on calibration waveforms; returns (sets, stats, cluster report)."""
    utt_labels, frame_labels, report = cluster_labels(model, waves, cfg)
    sets, stats = neuron_sets_for(model, waves, utt_labels, frame_labels, cfg)
    return sets, stats, report


def null_speaker_counts(stats: ActivationStats, utt_labels: np.ndarray, sigma: float, permutations: int,
                        seed: int) -> list[int]:
    """Total speaker neurons marked under ``permutations`` random permutations of the utterance labels
    (the same statistics pass, relabelled): the null distribution of the speaker-neuron count."""
    rng = np.random.default_rng(seed)
    n_labels = stats.frames.shape[0]
    return [int(sum(neuron_sets(stats.relabelled(rng.permutation(utt_labels), n_labels), sigma).counts()))
            for _ in range(permutations)]


def shuffled_protect(protected: list[list[int]], widths: list[int], seed: int) -> list[list[int]]:
    """The ``shuffled_protect`` control: per layer, a uniformly random neuron set of the protected set's size."""
    rng = np.random.default_rng(seed)
    return [sorted(int(i) for i in rng.choice(w, len(p), replace=False)) for p, w in zip(protected, widths)]


def specificity(stats: ActivationStats, sets: NeuronSets) -> list[np.ndarray]:
    """Per layer, for each speaker neuron: P(active | own cluster) - P(active | other clusters)."""
    out = []
    for probs, idx, own in zip(stats.probabilities(), sets.speaker, sets.speaker_cluster):
        p = probs.mean(1)  # (C, ffn): averaged over SSL clusters
        idx, own = np.array(idx, dtype=np.int64), np.array(own, dtype=np.int64)
        if len(idx) == 0:
            out.append(np.zeros(0))
            continue
        mine = p[own, idx]
        other = (p[:, idx].sum(0) - mine) / max(p.shape[0] - 1, 1)
        out.append(mine - other)
    return out


def protect(sets: NeuronSets, spec: list[np.ndarray], widths: list[int], ratio: float) -> tuple[list[list[int]], bool]:
    """Speaker neurons to protect, capped per layer at what the ratio lets it keep (most specific first)."""
    protected, truncated = [], False
    for idx, s, w in zip(sets.speaker, spec, widths):
        budget = w - int(round(ratio * w))
        if len(idx) > budget:
            truncated = True
            idx = list(np.array(idx)[np.argsort(-s, kind="stable")[:budget]])
        protected.append([int(i) for i in idx])
    return protected, truncated


def prune_recompute(model: SSLSpeakerModel, waves: list[np.ndarray], utt_labels: np.ndarray,
                    frame_labels: list[np.ndarray], cfg: Any, ratio: float) -> tuple[list[np.ndarray], bool]:
    """Prune ``model`` in place layer by layer, recomputing the speaker sets before each layer.

    Returns the kept indices per layer (in the unpruned model's numbering) and whether any layer
    had more speaker neurons than it could keep.
    """
    n_layers = len(ffn_layers(model.encoder))
    kept = [np.arange(ff.intermediate_dense.out_features) for ff in ffn_layers(model.encoder)]
    truncated = False
    for li in range(n_layers):
        sets, stats = neuron_sets_for(model, waves, utt_labels, frame_labels, cfg)
        scores = neuron_scores(model)
        widths = [len(s) for s in scores]
        protected, t = protect(sets, specificity(stats, sets), widths, ratio)
        truncated |= t
        plan = plan_pruning([scores[li]], ratio, [protected[li]], "layer")
        keep = [np.arange(w) for w in widths]
        keep[li] = plan.keep[0]
        apply_plan(model, PrunePlan(keep, [0] * n_layers, [0] * n_layers, ratio, "layer"))
        kept[li] = kept[li][plan.keep[0]]
    return kept, truncated


def random_keep(widths: list[int], ratio: float, seed: int) -> list[np.ndarray]:
    """The random-pruning control: per layer, a uniformly random ``1 - ratio`` share of neurons kept."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(w, w - int(round(ratio * w)), replace=False)) for w in widths]


def remove_all_ffn(model: SSLSpeakerModel) -> SSLSpeakerModel:
    """The all-FFN control: every layer's FFN keeps no neuron (its output is fc2's bias alone)."""
    for ff in ffn_layers(model.encoder):
        slice_ffn(ff, np.zeros(0, dtype=np.int64))
    model.config.ffn_widths = [0] * len(ffn_layers(model.encoder))
    return model


def kept_sets(plan: PrunePlan) -> list[np.ndarray]:
    """The plan's kept neuron indices per layer."""
    return [np.asarray(k) for k in plan.keep]


def load_speaker_model(path: str | Path) -> tuple[SSLSpeakerModel, dict]:
    """A speaker model from a ``{state_dict, config}`` file, or an SSL ``save_pretrained`` directory.

    A bare encoder directory (WavLM, HuBERT, wav2vec 2.0; base or large) gets a mean+std
    pooling head with a fixed random projection: the neuron analysis and pruning concern the
    encoder, and the verification figures then measure what the encoder's features carry.
    """
    from models.ssl import SSLSpeakerConfig, load_checkpoint, load_encoder

    path = Path(path)
    if path.is_dir():
        family, encoder = load_encoder(path)
        torch.manual_seed(0)
        model = SSLSpeakerModel(SSLSpeakerConfig(family=family, encoder=encoder.config.to_dict(), pooling="meanstd",
                                                 embedding_dim=256), encoder=encoder).eval()
        return model, {"source": str(path), "head": "random mean+std projection (encoder-only checkpoint)"}
    return load_checkpoint(path)
