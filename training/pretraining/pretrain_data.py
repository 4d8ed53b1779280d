"""What SSL pretraining learns from: masked-prediction targets and the crops' augmentations.

Targets (HuBERT): FAISS k-means of MFCC+delta frames at the encoder's 20 ms frame rate, or of one
layer's frame features of an earlier encoder (the second iteration). Augmentations, applied to a
batch of crops in place: span masks (HuBERT style), WavLM utterance mixing and random recording
channels. ``training.pretraining.pretrain`` documents what each is for.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from training.data.features import mfcc

__all__ = ["PRETRAIN_CHANNELS", "frames_of", "kmeans_targets", "feature_targets", "span_mask", "mix_utterances",
           "through_channels"]

# Channels of --channel-prob: each is fast enough to run per crop in the training loop
PRETRAIN_CHANNELS = ("mic", "noise", "reverb", "telephone")


def frames_of(n_samples: int) -> int:
    """Encoder frames for a waveform of ``n_samples`` (the conv stack's 400/320 receptive field/stride)."""
    return max(0, (n_samples - 400) // 320 + 1)


def _kmeans(feats: list[np.ndarray], k: int, max_frames: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """FAISS k-means of standardised frames [(T_i, D)]; per-utterance labels [(T_i,)] and centroids (k, D)."""
    import faiss

    allf = np.concatenate(feats)  # (sum T_i, D)
    if len(allf) < k:
        raise ValueError(f"{len(allf)} frames cannot make {k} clusters; lower n_clusters or add audio")
    mu, sd = allf.mean(0), allf.std(0) + 1e-5
    rng = np.random.default_rng(seed)
    sample = allf[rng.choice(len(allf), min(max_frames, len(allf)), replace=False)]
    km = faiss.Kmeans(allf.shape[1], k, niter=25, seed=seed, verbose=False)
    km.train(((sample - mu) / sd).astype(np.float32))
    labels = [km.index.search(((f - mu) / sd).astype(np.float32), 1)[1][:, 0].astype(np.int64) for f in feats]
    return labels, km.centroids


def kmeans_targets(waves: list[np.ndarray], k: int, max_frames: int, seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Cluster MFCC+delta frames (20 ms shift) with FAISS k-means; returns per-utterance labels and centroids."""
    return _kmeans([mfcc(w, shift_ms=20.0) for w in waves], k, max_frames, seed)  # [(T_i, 39)]


def feature_targets(encoder: nn.Module, waves: list[np.ndarray], layer: int, k: int, max_frames: int,
                    seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Second-iteration targets: k-means of ``encoder``'s layer-``layer`` frame features.

    Raises:
        ValueError: ``layer`` is not one of the encoder's layers (1..num_hidden_layers).
    """
    n_layers = encoder.config.num_hidden_layers
    if not 1 <= layer <= n_layers:
        raise ValueError(f"target_layer {layer} is not a layer of the encoder (1..{n_layers})")
    feats = []
    encoder.eval()
    with torch.inference_mode():
        for w in waves:
            hs = encoder(torch.from_numpy(w)[None], output_hidden_states=True).hidden_states[layer]  # (1, T', H)
            feats.append(hs[0].float().numpy())
    encoder.train()
    return _kmeans(feats, k, max_frames, seed)


def span_mask(batch: int, frames: int, prob: float, length: int, rng: np.random.Generator) -> np.ndarray:
    """Random spans of ``length`` frames starting with probability prob / length (HuBERT style)."""
    mask = np.zeros((batch, frames), dtype=bool)
    n_spans = max(1, int(round(prob * frames / length)))
    for b in range(batch):
        for s in rng.choice(max(1, frames - length), n_spans, replace=False):
            mask[b, s:s + length] = True
    return mask


def mix_utterances(batch: np.ndarray, sources: list[np.ndarray], prob: float, rng: np.random.Generator) -> np.ndarray:
    """WavLM utterance mixing: overlay parts of other utterances on some crops of ``batch``, in place.

    Each row of ``batch`` (B, T) is chosen with probability ``prob``; a chosen row gets a segment
    of a random utterance from ``sources`` (length uniform in [T/10, T/2], so the overlap is at
    most half the crop) added at a random offset, scaled so that the row's energy over the
    interferer's energy is uniform in [-5, 5] dB. Returns ``batch``.
    """
    n = batch.shape[1]
    for b in range(len(batch)):
        if prob <= 0 or rng.random() >= prob:
            continue
        src = sources[int(rng.integers(0, len(sources)))]
        length = min(len(src), int(rng.integers(n // 10, n // 2 + 1)))
        s = int(rng.integers(0, len(src) - length + 1))
        seg = src[s:s + length].astype(np.float32)  # (L,)
        primary = float(np.mean(batch[b] ** 2))
        other = float(np.mean(seg ** 2))
        if primary <= 0 or other <= 0:
            continue
        ratio_db = rng.uniform(-5.0, 5.0)
        gain = math.sqrt(primary / (other * 10 ** (ratio_db / 10)))
        at = int(rng.integers(0, n - length + 1))
        batch[b, at:at + length] += gain * seg
    return batch


def through_channels(batch: np.ndarray, prob: float, rng: np.random.Generator,
                     bank: list[np.ndarray] | None = None) -> np.ndarray:
    """Pass each row of ``batch`` (B, T) with probability ``prob`` through one random channel of
    ``PRETRAIN_CHANNELS`` (back at 16 kHz, length kept), in place. Returns ``batch``."""
    from models.audio import resample
    from training.data.channels import apply_condition

    n = batch.shape[1]
    for b in range(len(batch)):
        if prob <= 0 or rng.random() >= prob or not np.any(batch[b]):
            continue
        name = PRETRAIN_CHANNELS[int(rng.integers(len(PRETRAIN_CHANNELS)))]
        y, rate = apply_condition(name, batch[b], rng, bank)
        y = resample(y, rate, 16000) if rate != 16000 else y  # (about T,)
        batch[b] = np.pad(y[:n], (0, max(0, n - len(y))))
    return batch
