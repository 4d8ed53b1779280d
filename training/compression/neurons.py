"""Speaker neurons of an SSL Transformer's FFN layers (k-means of SSL features and of i-vectors, activation statistics).

Steps 1-4 of the method:
1. ``ssl_clusters``: k-means (FAISS) of frame-level hidden states from one layer -> a label per frame;
2. ``ivector_clusters``: k-means of per-utterance i-vectors -> a label per utterance;
3. ``ActivationStats``: forward pre-hooks on every layer's fc2 read a = |GELU(fc1(x))| per
   frame; a neuron is active on a frame when it is among the frame's top ``tau`` activations
   (tau = round(0.01 * ffn_dim)); counts of active frames per (i-vector cluster, SSL cluster)
   are streamed, so no frames are kept in memory;
4. ``neuron_sets``: speaker (i-vector cluster) neurons - above the random baseline tau/ffn_dim
   for at least a fraction sigma of the SSL clusters, for exactly one i-vector cluster - and
   SSL-cluster neurons - above baseline for exactly one SSL cluster.

Any labels can replace the clusters (gender, pitch bins, phone classes: the "property
neurons" of the predecessor paper): ``ActivationStats.update`` takes per-frame label arrays.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.ssl import SSLSpeakerModel, ffn_layers

__all__ = ["ActivationStats", "NeuronSets", "neuron_sets", "kmeans_labels", "ssl_frames", "plot_neuron_counts"]


def kmeans_labels(x: np.ndarray, k: int, seed: int = 0, what: str = "points") -> tuple[np.ndarray, np.ndarray]:
    """FAISS k-means of (N, D) points; returns (labels (N,), centroids (k, D)).

    Raises:
        ValueError: fewer points than clusters.
    """
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    if k < 1:
        raise ValueError(f"number of clusters must be >= 1, got {k}")
    if len(x) < k:
        raise ValueError(f"cannot make {k} clusters from {len(x)} {what}; lower k or add data")
    km = faiss.Kmeans(x.shape[1], k, niter=25, seed=seed, verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0].astype(np.int64), km.centroids


@torch.no_grad()
def ssl_frames(model: SSLSpeakerModel, wave: np.ndarray, layer: int) -> np.ndarray:
    """Hidden states (T', H) of ``layer`` (0 = input to the first Transformer layer) for one utterance."""
    dev = next(model.parameters()).device
    states, _ = model.frames(torch.from_numpy(wave)[None].to(dev), torch.tensor([len(wave)], device=dev))
    if not 0 <= layer < len(states):
        raise ValueError(f"layer {layer} out of range: the model has hidden states 0..{len(states) - 1}")
    return states[layer][0].float().cpu().numpy()


class ActivationStats:
    """Streaming counts of top-tau activity per neuron, per (utterance label, frame label) pair.

    Args:
        model: the SSL speaker model (its encoder's FFN layers are hooked).
        n_utt_labels: number of utterance-level classes (i-vector clusters).
        n_frame_labels: number of frame-level classes (SSL clusters).
        top_fraction: share of a frame's neurons counted active (0.01 -> tau = round(0.01 * ffn)).
    """

    def __init__(self, model: SSLSpeakerModel, n_utt_labels: int, n_frame_labels: int, top_fraction: float = 0.01,
                 per_utterance: bool = False):
        if not 0 < top_fraction < 1:
            raise ValueError(f"top_fraction must be in (0, 1), got {top_fraction}")
        self.model = model
        self.layers = ffn_layers(model.encoder)
        self.widths = [ff.intermediate_dense.out_features for ff in self.layers]
        self.taus = [max(1, round(top_fraction * w)) for w in self.widths]
        self.counts = [np.zeros((n_utt_labels, n_frame_labels, w), dtype=np.int64) for w in self.widths]
        self.frames = np.zeros((n_utt_labels, n_frame_labels), dtype=np.int64)
        self.top_fraction = top_fraction
        self._acts: list[torch.Tensor | None] = [None] * len(self.layers)
        # with per_utterance: each utterance's own counts, [(S, ffn) per layer] and frames (S,), so that
        # the statistics under any other utterance labelling (a permutation null) need no new pass
        self.utterances: list[tuple[list[np.ndarray], np.ndarray]] | None = [] if per_utterance else None

    def _hook(self, i: int):
        def grab(module, inputs):
            self._acts[i] = inputs[0].detach()  # (B, T', ffn): GELU(fc1 x) in eval mode
        return grab

    @torch.no_grad()
    def update(self, wave: np.ndarray, utt_label: int, frame_labels: np.ndarray) -> None:
        """Add one utterance: its label and one label per encoder frame (T',)."""
        handles = [ff.output_dense.register_forward_pre_hook(self._hook(i)) for i, ff in enumerate(self.layers)]
        dev = next(self.model.parameters()).device
        try:
            self.model.frames(torch.from_numpy(wave)[None].to(dev), torch.tensor([len(wave)], device=dev))
        finally:
            for h in handles:
                h.remove()
        t = len(frame_labels)
        n_frame_labels = self.frames.shape[1]
        own = [np.zeros((n_frame_labels, w), dtype=np.int32) for w in self.widths]  # this utterance's counts
        for i, act in enumerate(self._acts):
            a = act[0, :t].abs()  # (T', ffn)
            if a.shape[0] != t:
                raise ValueError(f"{t} frame labels for {a.shape[0]} frames")
            top = torch.topk(a.float(), self.taus[i], dim=1).indices.cpu().numpy()  # (T', tau)
            for s in np.unique(frame_labels):
                own[i][s] = np.bincount(top[frame_labels == s].ravel(), minlength=self.widths[i])
            self.counts[i][utt_label] += own[i]
        frames = np.bincount(frame_labels, minlength=n_frame_labels)  # (S,)
        self.frames[utt_label] += frames
        if self.utterances is not None:
            self.utterances.append((own, frames))
        self._acts = [None] * len(self.layers)

    def relabelled(self, utt_labels: np.ndarray, n_utt_labels: int) -> "ActivationStats":
        """The statistics this pass would give under another utterance labelling (N,), in update order.

        Raises:
            ValueError: the pass did not keep per-utterance counts, or the label count differs.
        """
        if self.utterances is None:
            raise ValueError("relabelled needs ActivationStats(per_utterance=True)")
        if len(utt_labels) != len(self.utterances):
            raise ValueError(f"{len(utt_labels)} labels for {len(self.utterances)} utterances")
        out = object.__new__(ActivationStats)
        out.model, out.layers, out.widths, out.taus = self.model, self.layers, self.widths, self.taus
        out.top_fraction, out._acts, out.utterances = self.top_fraction, [None] * len(self.layers), None
        out.counts = [np.zeros((n_utt_labels, c.shape[1], w), dtype=np.int64) for c, w in zip(self.counts, self.widths)]
        out.frames = np.zeros((n_utt_labels, self.frames.shape[1]), dtype=np.int64)
        for label, (own, frames) in zip(utt_labels, self.utterances):
            for i, c in enumerate(own):
                out.counts[i][label] += c
            out.frames[label] += frames
        return out

    def probabilities(self) -> list[np.ndarray]:
        """P(active | utterance label, frame label) per layer: [(C, S, ffn)]."""
        denom = np.maximum(self.frames, 1)[:, :, None]
        return [c / denom for c in self.counts]

    def baselines(self) -> list[float]:
        """The random baseline tau / ffn_dim per layer."""
        return [t / w for t, w in zip(self.taus, self.widths)]


@dataclass
class NeuronSets:
    """Neuron sets per layer, with the parameters that made them."""

    speaker: list[list[int]]  # per layer: neurons specific to exactly one utterance cluster
    speaker_cluster: list[list[int]]  # the cluster each speaker neuron belongs to
    ssl: list[list[int]]  # per layer: neurons above baseline for exactly one frame cluster
    params: dict = field(default_factory=dict)

    def counts(self) -> list[int]:
        """Speaker neurons per layer."""
        return [len(s) for s in self.speaker]

    def save(self, path: str | Path, stats: ActivationStats | None = None) -> Path:
        """Write the sets (and, with ``stats``, the probabilities) as JSON."""
        d = asdict(self)
        if stats is not None:
            d["probabilities"] = [p.round(5).tolist() for p in stats.probabilities()]
            d["frames"] = stats.frames.tolist()
        path = Path(path)
        path.write_text(json.dumps(d) + "\n")
        return path


def neuron_sets(stats: ActivationStats, sigma: float = 0.8) -> NeuronSets:
    """Speaker and SSL-cluster neurons from activation statistics (step 4 of the method)."""
    if not 0 < sigma <= 1:
        raise ValueError(f"sigma must be in (0, 1], got {sigma}")
    present = stats.frames > 0  # (C, S) pairs that were observed
    speaker, owner, ssl = [], [], []
    for probs, base in zip(stats.probabilities(), stats.baselines()):
        above = probs > base  # (C, S, ffn)
        n_s = np.maximum(present.sum(1), 1)[:, None]  # (C, 1)
        share = (above & present[:, :, None]).sum(1) / n_s  # (C, ffn): fraction of SSL clusters above baseline
        qualifies = share >= sigma  # (C, ffn)
        exactly_one = qualifies.sum(0) == 1
        idx = np.flatnonzero(exactly_one)
        speaker.append(idx.tolist())
        owner.append(qualifies[:, idx].argmax(0).tolist())
        # SSL-cluster neurons: pool utterance clusters, above baseline for exactly one frame cluster
        tot = stats.frames.sum(0)  # (S,)
        p_s = np.stack([probs[:, s] * stats.frames[:, s, None] for s in range(probs.shape[1])], 0).sum(1)
        p_s = p_s / np.maximum(tot, 1)[:, None]  # (S, ffn)
        ssl.append(np.flatnonzero(((p_s > base) & (tot > 0)[:, None]).sum(0) == 1).tolist())
    params = {"sigma": sigma, "top_fraction": stats.top_fraction, "taus": stats.taus, "widths": stats.widths,
              "n_utt_labels": int(stats.frames.shape[0]), "n_frame_labels": int(stats.frames.shape[1])}
    return NeuronSets(speaker, owner, ssl, params)


def plot_neuron_counts(sets: NeuronSets, path: str | Path, title: str = "speaker neurons per layer") -> Path:
    """Bar chart of speaker and SSL-cluster neurons per layer (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = np.arange(1, len(sets.speaker) + 1)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(layers - 0.2, sets.counts(), width=0.4, label="speaker (i-vector cluster) neurons")
    ax.bar(layers + 0.2, [len(s) for s in sets.ssl], width=0.4, label="SSL-cluster neurons")
    ax.set_xlabel("layer")
    ax.set_ylabel("neurons")
    ax.set_xticks(layers)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
