"""Clusters that mean what they say: an i-vector extractor trained on the whole training split,
and the speaker and gender purity of every cluster set the method uses.

The method's utterance clusters are meant to be speaker (or gender) groups. Whether they are is
measured, not assumed:

- ``train_ivector_extractor``: GMM-UBM and total-variability matrix on every training utterance
  (not only the ~200 calibration utterances the statistics read), so i-vectors of the calibration
  set come from a model of the whole population;
- ``pitch_class``: the corpus has no gender labels, so a speaker's class is estimated from the
  median F0 of its voiced frames (autocorrelation pitch; below 165 Hz "low", else "high"), the
  usual acoustic proxy for male / female voices; reported as estimated;
- ``cluster_purity``: speaker consistency (per speaker, the share of its items in its most common
  cluster, averaged over speakers), pitch-class purity (per cluster, the share of its majority
  class, weighted by size), both with their chance level under shuffled cluster labels, and
  ``speaker_like`` (consistency >= 0.9 and above every shuffled value).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.compression.ivector import DiagGMM, IVectorExtractor, baum_welch, length_norm, train_ubm

__all__ = ["IVectorModel", "train_ivector_extractor", "pitch_hz", "pitch_class", "cluster_purity",
           "SPEAKER_LIKE_CONSISTENCY", "LOW_PITCH_HZ"]

SPEAKER_LIKE_CONSISTENCY = 0.9  # a cluster set is speaker-like when speakers stay (almost) whole
LOW_PITCH_HZ = 165.0  # median F0 below this: the "low" (typically male) pitch class


@dataclass
class IVectorModel:
    """UBM + extractor and the training i-vectors' mean (for length normalisation)."""

    ubm: DiagGMM
    extractor: IVectorExtractor
    mean: np.ndarray  # (R,)
    utterances: int

    def ivectors(self, waves: list[np.ndarray]) -> np.ndarray:
        """Length-normalised i-vectors (N, R) of 16 kHz waveforms."""
        from training.data.features import mfcc

        stats = [baum_welch(self.ubm, mfcc(w, cmn=False)) for w in waves]
        return length_norm(self.extractor.transform(stats), self.mean)


def train_ivector_extractor(corpus: str | Path, components: int, rank: int, seed: int,
                            max_utts: int | None = None, iterations: int = 4) -> IVectorModel:
    """UBM (EM on up to 200k sampled frames) and T (EM) on the training split (every utterance, or a
    seeded sample of ``max_utts``).

    Raises:
        ValueError: fewer training utterances than the rank needs.
    """
    from training.common import load_split
    from training.data.corpus import read_scp
    from training.data.features import mfcc

    utts = sorted(read_scp(Path(corpus) / "train" / "wav.scp"))
    rng = np.random.default_rng(seed)
    if max_utts and max_utts < len(utts):
        utts = sorted(rng.choice(utts, max_utts, replace=False).tolist())
    if len(utts) <= rank:
        raise ValueError(f"{len(utts)} training utterances cannot train an i-vector extractor of rank {rank}")
    _, waves, _ = load_split(corpus, "train", utts, progress=False)
    feats = [mfcc(w, cmn=False) for w in waves]  # [(T_i, 39)]
    del waves
    allf = np.concatenate(feats)
    ubm = train_ubm(allf[rng.choice(len(allf), min(200_000, len(allf)), replace=False)], components, 8, seed)
    stats = [baum_welch(ubm, f) for f in feats]
    ext = IVectorExtractor(ubm, rank, seed).fit(stats, iterations)
    return IVectorModel(ubm, ext, ext.transform(stats).mean(0), len(utts))


def pitch_hz(wave: np.ndarray, sr: int = 16000, fmin: float = 60.0, fmax: float = 400.0) -> float:
    """Median F0 (Hz) of the voiced 40 ms frames of ``wave`` (normalised autocorrelation peak >= 0.5);
    NaN when no frame is voiced."""
    n, hop = int(0.04 * sr), int(0.01 * sr)
    lo, hi = int(sr / fmax), int(sr / fmin)
    if len(wave) < n or hi >= n:
        return float("nan")
    frames = np.lib.stride_tricks.sliding_window_view(wave.astype(np.float64), n)[::hop]  # (F, n)
    frames = frames - frames.mean(1, keepdims=True)
    energy = (frames ** 2).sum(1)
    if not (energy > 0).any():
        return float("nan")
    frames = frames[energy > 0.1 * np.median(energy[energy > 0])]  # skip silence
    spec = np.fft.rfft(frames, 2 * n, axis=1)
    ac = np.fft.irfft(np.abs(spec) ** 2, axis=1)[:, :n]  # (F, n) autocorrelation
    ac = ac / np.maximum(ac[:, :1], 1e-12)
    lag = lo + ac[:, lo:hi].argmax(1)  # (F,)
    voiced = ac[np.arange(len(ac)), lag] >= 0.5
    return float(np.median(sr / lag[voiced])) if voiced.any() else float("nan")


def pitch_class(f0_hz: float) -> str:
    """"low" below ``LOW_PITCH_HZ``, "high" at or above it, "unknown" for NaN."""
    if not np.isfinite(f0_hz):
        return "unknown"
    return "low" if f0_hz < LOW_PITCH_HZ else "high"


def _consistency(labels: np.ndarray, speakers: np.ndarray) -> float:
    shares = []
    for s in np.unique(speakers):
        own = labels[speakers == s]
        shares.append(np.bincount(own).max() / len(own))
    return float(np.mean(shares))


def _class_purity(labels: np.ndarray, classes: np.ndarray) -> float:
    total = 0
    for c in np.unique(labels):
        _, counts = np.unique(classes[labels == c], return_counts=True)
        total += counts.max()
    return float(total / len(labels))


def cluster_purity(labels: np.ndarray, speakers: list[str], classes: list[str], permutations: int = 20,
                   seed: int = 0) -> dict:
    """Speaker consistency and pitch-class purity of one cluster set, with their shuffled chance levels.

    ``labels`` (N,) cluster per item (an utterance, or a frame), ``speakers`` / ``classes`` (N,) the
    item's speaker and its speaker's pitch class.

    Raises:
        ValueError: lengths differ or there are no items.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if not len(labels) or len(labels) != len(speakers) or len(labels) != len(classes):
        raise ValueError(f"labels, speakers and classes must be equal non-zero lengths, got {len(labels)}, "
                         f"{len(speakers)}, {len(classes)}")
    spk, cls = np.asarray(speakers), np.asarray(classes)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permutation(labels) for _ in range(permutations)]
    cons, chance_cons = _consistency(labels, spk), [_consistency(p, spk) for p in shuffled]
    pur, chance_pur = _class_purity(labels, cls), [_class_purity(p, cls) for p in shuffled]
    return {"clusters": int(labels.max() + 1), "items": int(len(labels)), "speakers": int(len(np.unique(spk))),
            "speaker_consistency": round(cons, 4),
            "speaker_consistency_chance": round(float(np.mean(chance_cons)), 4) if shuffled else None,
            "pitch_class_purity": round(pur, 4),
            "pitch_class_purity_chance": round(float(np.mean(chance_pur)), 4) if shuffled else None,
            "speaker_like": bool(cons >= SPEAKER_LIKE_CONSISTENCY and all(cons > c for c in chance_cons))}
