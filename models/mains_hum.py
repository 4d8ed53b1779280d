"""Mains hum: the lines at 50 or 60 Hz and their harmonics that a ground loop or a charger adds, taken out.

A hum 10 dB under the speech moved a genuine pair's LLR by about 3 on ``ge2e`` 0.3.0 (probed through
the service with real utterances): its harmonics sit in the mel bands that carry the voice's pitch
and first formant, and the encoder hears them as part of the voice. Hum is easy to tell from a
voice: its lines stay at one frequency for the whole recording, while a voice's harmonics glide
with its pitch, so averaged over seconds a hum harmonic is one narrow line and a voice's is
smeared over several hertz.

``find_hum`` cuts the input into Hann-windowed blocks of ``BLOCK_SECONDS`` (half overlapping),
averages their power spectra and measures, for each candidate fundamental near 50 and near 60 Hz
(mains drift up to ``DRIFT_HZ``), how far each of the first 40 harmonics stands above the spectrum
2.5-6 Hz either side of it. The same is measured for control fundamentals between the mains ones
(44.5-45.5, 54.5-55.5, 64.5-65.5 Hz), where no mains line sits: the input is hummed when its best
mains fundamental has at least ``MIN_LINES`` harmonics ``LINE_DB`` above their shoulders *and*
explains clearly more line energy than the best control (a voice that holds a steady pitch
makes lines at the controls too). On held-out real recordings this fires on about 1% of clean
utterances and 1.5% of 1.5 s windows, and finds 84% of hums 8-20 dB under the speech.

``remove_hum`` then works on shorter blocks (``REMOVAL_BLOCK_SECONDS``, half overlapping, added
back after): in each block, each harmonic's bin and its neighbours are clamped to the median
level of the bins 4-6 Hz away (never raised), so the hum goes where the voice is quiet and the
voice is kept where it is loud. Short blocks and narrow clamps were chosen by measurement: a
long notch (one FFT of the whole input, or IIR notches) spreads what it takes out over the whole
input and moved ``ge2e``'s voiceprints more than the hum it removed (BENCHMARKS.md section 9f).
Inputs without hum, and inputs shorter than ``MIN_SECONDS``, pass unchanged.

A card's ``remove_mains_hum`` turns it on; the runtime's input steps (``models.input_steps``) apply it after the DC step,
before the tilt and level steps (hum would bend the measured tilt). numpy and scipy only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

__all__ = ["Hum", "find_hum", "remove_hum", "MAINS_HZ"]

MAINS_HZ = (50.0, 60.0)
CONTROL_HZ = (45.0, 55.0, 65.0)  # fundamentals no mains line sits on: what a voice alone scores
DRIFT_HZ = 0.5  # grids keep within +-0.2 Hz; resampled recordings and cheap clocks add a little
HARMONICS = 40
LINE_DB = 6.0
MIN_LINES = 3
MARGIN = 1.5  # the mains score over the best control's
NOTCH_BINS = 1  # removal: the bins either side of each harmonic that are clamped (+-2 Hz)
_RING_BINS = (2, 3)  # removal: the bins either side (4-6 Hz) whose median level a harmonic is clamped to
MIN_SECONDS = 1.0
BLOCK_SECONDS = 2.0  # detection: 0.5 Hz bins, a Hann main lobe of +-1 Hz
REMOVAL_BLOCK_SECONDS = 0.5  # removal: 2 Hz bins, a clamp that follows the voice within half a second
_SHOULDER_HZ = (2.5, 6.0)  # the ring around a harmonic that tells a line from a gliding voice harmonic
_CHUNK_BLOCKS = 32  # blocks transformed at once: a 300 s input holds a few MB of spectra, not hundreds


@dataclass(frozen=True)
class Hum:
    """Mains hum found in an input: its fundamental and the harmonics that stand out as lines."""

    fundamental_hz: float
    harmonics: tuple[int, ...]  # harmonic numbers (1 = the fundamental) at least LINE_DB above their shoulders
    strength_db: tuple[float, ...]  # each one's height above its shoulders


@functools.lru_cache(maxsize=4)
def _window(n: int) -> np.ndarray:
    """(n,) periodic Hann window: half-overlapping copies add up to one."""
    return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def _blocks(wav: np.ndarray, n: int) -> np.ndarray:
    """A (B, n) view of (T,) ``wav``'s half-overlapping blocks of n samples, padded by half a block each side so that
    every input sample lies in two blocks (their periodic Hann windows then add up to one)."""
    hop = n // 2
    padded = np.pad(wav, (hop, hop + (-len(wav)) % hop))
    return np.lib.stride_tricks.sliding_window_view(padded, n)[::hop]  # (B, n), no copy


def _spectra(blocks: np.ndarray):
    """The windowed spectra of ``blocks`` (B, n), ``_CHUNK_BLOCKS`` at a time: yields (first block, (b, n/2+1)
    complex64), so that a long input never holds all its spectra at once."""
    window = _window(blocks.shape[1])
    for i in range(0, len(blocks), _CHUNK_BLOCKS):
        yield i, sfft.rfft(blocks[i:i + _CHUNK_BLOCKS] * window, axis=1)


def _line_tables(log_power: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n+1,) running sum of ``log_power`` (ring means in O(1) each) and (n,) its maximum over each bin's
    neighbours (a line between two bins), made once per spectrum."""
    peak = log_power.copy()
    np.maximum(peak[1:], log_power[:-1], out=peak[1:])
    np.maximum(peak[:-1], log_power[1:], out=peak[:-1])
    return np.concatenate([[0.0], np.cumsum(log_power)]), peak


def _heights(tables: tuple[np.ndarray, np.ndarray], df: float, freqs: np.ndarray) -> np.ndarray:
    """How far the strongest bin within one bin of each frequency in ``freqs`` (any shape) stands above
    the mean log power of its shoulders (2.5-6 Hz either side), in dB; NaN where the shoulders leave the spectrum."""
    cum, peak = tables
    lo, hi = int(np.ceil(_SHOULDER_HZ[0] / df)), int(np.floor(_SHOULDER_HZ[1] / df))
    centre = np.rint(freqs / df).astype(np.int64)
    ok = (centre - hi >= 1) & (centre + hi + 1 < len(peak))
    c = np.where(ok, centre, hi + 1)
    ring = (cum[c + hi + 1] - cum[c + lo] + cum[c - lo + 1] - cum[c - hi]) / (2 * (hi - lo + 1))
    return np.where(ok, peak[c] - ring, np.nan)


def _best_fundamental(tables: tuple[np.ndarray, np.ndarray], df: float, nominal: float, sample_rate: int
                      ) -> tuple[float, float, np.ndarray]:
    """The fundamental within DRIFT_HZ of ``nominal`` whose harmonics stand highest: (score, f0, (K,) heights)."""
    k = np.arange(1, HARMONICS + 1)  # (K,)
    step = df / 16  # the 40th harmonic lands within a bin of the line for some candidate
    f0 = nominal + np.arange(-DRIFT_HZ, DRIFT_HZ + step / 2, step)  # (C,)
    heights = _heights(tables, df, f0[:, None] * k)  # (C, K)
    heights = np.where(k * f0[:, None] < 0.45 * sample_rate, heights, np.nan)
    score = np.nansum(np.clip(heights, 0.0, 30.0), axis=1)  # (C,) line energy each candidate explains
    c = int(np.argmax(score))
    return float(score[c]), float(f0[c]), heights[c]


def _find(mean_power: np.ndarray, df: float, sample_rate: int) -> Hum | None:
    """Mains hum in a long-term spectrum (power per bin of ``df`` Hz, from 0 Hz), or None."""
    tables = _line_tables(10 * np.log10(mean_power + 1e-20))
    control = max(_best_fundamental(tables, df, f, sample_rate)[0] for f in CONTROL_HZ)
    best = None
    for mains in MAINS_HZ:
        score, f0, heights = _best_fundamental(tables, df, mains, sample_rate)
        lines = np.flatnonzero(heights >= LINE_DB)
        if len(lines) >= MIN_LINES and score > MARGIN * control and (best is None or score > best[0]):
            best = (score, Hum(round(f0, 3), tuple(int(i) + 1 for i in lines),
                               tuple(round(float(h), 1) for h in heights[lines])))
    return None if best is None else best[1]


def find_hum(wav: np.ndarray, sample_rate: int) -> Hum | None:
    """Mains hum in (T,) ``wav``, or None (also for inputs shorter than ``MIN_SECONDS``)."""
    wav = np.asarray(wav, np.float32)
    if len(wav) < MIN_SECONDS * sample_rate:
        return None
    n = int(BLOCK_SECONDS * sample_rate)
    df = sample_rate / n
    # only bins up to the 40th harmonic of the highest candidate (and its shoulders) are read
    top = min(n // 2 + 1, int((HARMONICS * (max(MAINS_HZ) + DRIFT_HZ) + 2 * _SHOULDER_HZ[1]) / df) + 2)
    blocks = _blocks(wav, n)  # (B, n)
    power = np.zeros(top)  # (top,) summed over blocks
    for _, spec in _spectra(blocks):
        low = spec[:, :top]
        power += (low.real ** 2 + low.imag ** 2).sum(axis=0, dtype=np.float64)
    return _find(power / len(blocks), df, sample_rate)


def remove_hum(wav: np.ndarray, sample_rate: int, hum: Hum | None = None,
               block_seconds: float = REMOVAL_BLOCK_SECONDS) -> np.ndarray:
    """(T,) float32 ``wav`` with its mains hum clamped to the level around it (the same array when none is found).

    ``hum``: the hum to take out (default: ``find_hum``'s answer); ``block_seconds``: the clamp's block length.
    """
    wav = np.asarray(wav, np.float32)
    hum = find_hum(wav, sample_rate) if hum is None else hum
    if hum is None:
        return wav
    n = int(block_seconds * sample_rate)
    df, hop = sample_rate / n, n // 2
    half, (lo, hi) = NOTCH_BINS, _RING_BINS
    centres = np.array([c for c in (int(round(h * hum.fundamental_hz / df)) for h in range(1, HARMONICS + 1))
                        if c - hi >= 0 and c + hi < n // 2 + 1])  # (H,) every harmonic: the weaker ones are hum too
    side = np.arange(lo, hi + 1)
    ring = centres[:, None] + np.concatenate([-side[::-1], side])  # (H, 2 (hi - lo + 1)) bins around each harmonic
    notch = centres[:, None] + np.arange(-half, half + 1)  # (H, 2 half + 1) bins clamped
    blocks = _blocks(wav, n)  # (B, n)
    out = np.zeros((len(blocks) + 1) * hop, np.float32)
    for first, spec in _spectra(blocks):  # spec: (b, n/2+1)
        log_power = 10 * np.log10(spec.real ** 2 + spec.imag ** 2 + 1e-20)  # (b, n/2+1)
        gain_db = np.zeros(log_power.shape, np.float32)
        floor = np.median(log_power[:, ring], axis=2, keepdims=True)  # (b, H, 1) each block's level around a line
        gain_db[:, notch] = np.minimum(0.0, floor - log_power[:, notch])  # (b, H, 2 half + 1)
        frames = sfft.irfft(spec * 10 ** (gain_db / 20), n, axis=1)  # (b, n), still windowed
        for b, frame in enumerate(frames, start=first):  # overlap-add: the windows sum to one
            out[b * hop:b * hop + n] += frame
    return out[hop:hop + len(wav)]
