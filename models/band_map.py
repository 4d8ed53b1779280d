"""Band maps: a wideband voiceprint carried into a narrowband channel, for a narrowband probe against it.

``models.band_match`` compares two *recordings* in the narrower one's band. A voiceprint (an
enrolled speaker, a client's embedding) has no audio left to put through that band, and a
telephone call checked against a wideband enrolment is the common case: on held-out human speech
such a probe was falsely rejected 83% of the time at the operating point (BENCHMARKS.md section
9h). A band map predicts, from the wideband embedding, the embedding the same speech gives after
the narrowband channel: one linear map per band (8 kHz only, as GSM and AMR; and the landline's
300-3400 Hz band), fitted by ridge regression towards the identity on pairs of embeddings of the
same utterance before and after ``band_match.match_band``:

    W = argmin ||(X - mean_x) W - (Y - mean_y)||^2 + ridge ||W - I||^2,   y_hat = unit((x - mean_x) W + mean_y)

Shrinking towards the identity (not towards zero) keeps what tells speakers apart; a plain ridge
pulls every voiceprint towards the mean voice and loses it. A mapped voiceprint still scores lower
against a true narrowband probe than the true narrowband twin would, so each band also has an LLR
offset, fitted on held-out speakers' trials (cross-fitted), added to the calibrated LLR of a
mapped pair. ``training.evaluation.band_map`` fits both and writes them into the artifact.

numpy only (``service/`` imports no torch).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BANDS", "BandMap", "fit_linear_map"]

BANDS = ("narrowband", "telephone")  # index 0: the 8 kHz band only; 1: with the landline's 300 Hz cut


def fit_linear_map(x: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The map from (N, D) unit rows ``x`` to (N, D) ``y`` (row n of each: one utterance), shrunk towards the identity.

    Returns (W (D, D), mean_x (D,), mean_y (D,)).
    """
    if x.shape != y.shape or x.ndim != 2 or len(x) < 2:
        raise ValueError(f"band map fit: x and y must be (N, D) with N >= 2 and equal shapes, got {x.shape} and {y.shape}")
    if not ridge > 0:
        raise ValueError(f"band map fit: ridge must be > 0, got {ridge!r}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my  # (N, D)
    eye = np.eye(x.shape[1])
    w = np.linalg.solve(xc.T @ xc + ridge * eye, xc.T @ yc + ridge * eye)  # (D, D)
    return w.astype(np.float32), mx.astype(np.float32), my.astype(np.float32)


@dataclass(frozen=True)
class BandMap:
    """One linear map and LLR offset per band of ``BANDS`` (see the module docstring)."""

    weights: np.ndarray  # (2, D, D)
    mean_x: np.ndarray  # (2, D)
    mean_y: np.ndarray  # (2, D)
    llr_offset: np.ndarray  # (2,)

    def __post_init__(self) -> None:
        w = self.weights
        if w.ndim != 3 or w.shape[0] != len(BANDS) or w.shape[1] != w.shape[2]:
            raise ValueError(f"band map: weights must be ({len(BANDS)}, D, D), got {w.shape}")
        d = w.shape[1]
        for name in ("mean_x", "mean_y"):
            if getattr(self, name).shape != (len(BANDS), d):
                raise ValueError(f"band map: {name} must be ({len(BANDS)}, {d}), got {getattr(self, name).shape}")
        if self.llr_offset.shape != (len(BANDS),):
            raise ValueError(f"band map: llr_offset must be ({len(BANDS)},), got {self.llr_offset.shape}")
        for name in ("weights", "mean_x", "mean_y", "llr_offset"):
            if not np.isfinite(getattr(self, name)).all():
                raise ValueError(f"band map: {name} contains NaN or inf")
        if np.any(np.abs(self.llr_offset) > 20):
            raise ValueError(f"band map: llr_offset {self.llr_offset.tolist()} is outside [-20, 20]")

    @property
    def dim(self) -> int:
        """The embedding size it maps."""
        return int(self.weights.shape[1])

    def apply(self, vectors: np.ndarray, low_cut: bool) -> np.ndarray:
        """(D,) or (N, D) wideband unit embeddings -> the same shape of unit embeddings in the band
        (``low_cut``: the landline's 300-3400 Hz band; else the 8 kHz band only)."""
        i = int(bool(low_cut))
        v = np.atleast_2d(np.asarray(vectors, np.float32))  # (N, D)
        if v.shape[1] != self.dim:
            raise ValueError(f"band map: embeddings of size {v.shape[1]}, the map is for size {self.dim}")
        out = (v - self.mean_x[i]) @ self.weights[i] + self.mean_y[i]  # (N, D)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.reshape(np.shape(vectors)).astype(np.float32)

    def offset(self, low_cut: bool) -> float:
        """The LLR offset of a pair whose voiceprint was mapped into that band."""
        return float(self.llr_offset[int(bool(low_cut))])

    def save(self, path: str | Path) -> None:
        """Write it as an ``.npz`` (no pickles)."""
        with open(path, "wb") as f:
            np.savez(f, weights=self.weights, mean_x=self.mean_x, mean_y=self.mean_y, llr_offset=self.llr_offset)

    @classmethod
    def load(cls, path: str | Path, dim: int) -> "BandMap":
        """Read a map written by ``save``; raises ValueError naming the file and what is wrong with it."""
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k], np.float32) for k in ("weights", "mean_x", "mean_y", "llr_offset")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{path}: cannot read the band map ({e})") from None
        try:
            bm = cls(**arrays)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        if bm.dim != dim:
            raise ValueError(f"{path}: the band map is for embeddings of size {bm.dim}, the model's are {dim}")
        return bm
