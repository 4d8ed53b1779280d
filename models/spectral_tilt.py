"""Spectral tilt: a microphone's or a line's slope across frequency, limited to what voices show.

A recording's long-term spectrum is the voice's times the channel's. Microphones, headsets,
laptop and phone front ends tilt it by several dB per octave (pre-emphasis, bass-heavy
capsules, high-pass filters), and a model that reads the spectrum's shape (``ge2e`` reads
linear mel power) hears a different voice: the real pool's utterances with a random microphone
response on the probe side went from 4.0% to 9.5% EER. Equalising every input to one reference
spectrum removes that, but also the slope that belongs to the speaker (EER 4.0 -> 5.0% on clean
speech). So the runtime only *limits* the tilt: it measures the slope of the input's long-term
spectrum against the model's reference (a line fitted to the difference, in dB per octave,
over the bands where the input has signal) and, where the slope lies outside the range that
real recordings of the calibration speakers show, filters the input back to the nearest edge
of that range. Inputs within the range, most of them, pass unchanged, and so do narrowband
inputs (by the VAD's test, ``models.vad_rules.is_narrowband``: a telephone line or an 8 kHz
codec, resampled), whose slope the band edges set, not a microphone (limiting them cost the
telephone-band trials an EER point; see BENCHMARKS.md section 9e).

The card's ``input_tilt`` holds the reference and the range
(``training.evaluation.tilt`` fits them); the runtime's input steps (``models.input_steps``)
apply the limit after the DC and hum steps and before the level step. Only numpy and scipy's FFT are imported (``service/`` must stay free of torch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft as sfft

from models.artifact import TILT_BANDS
from models.vad_rules import is_narrowband

__all__ = ["BAND_EDGES_HZ", "TiltLimit", "band_levels_db", "limit_tilt", "tilt_slope"]

# 24 bands, log-spaced from 100 Hz to 7.2 kHz (a third of an octave wide, about)
BAND_EDGES_HZ = np.geomspace(100.0, 7200.0, TILT_BANDS + 1)
_CENTRES = np.sqrt(BAND_EDGES_HZ[:-1] * BAND_EDGES_HZ[1:])  # (24,)
_OCTAVES = np.log2(_CENTRES / 1000.0)  # (24,) octaves from 1 kHz
_FRAME_SECONDS = 0.064
_LOUD_FRAMES_DB = 30.0  # frames within this of the loudest make the long-term spectrum (speech, not pauses)
_SIGNAL_BANDS_DB = 45.0  # bands within this of the strongest take part in the fit (a phone line's empty top does not)
_MIN_BANDS = 6
_MAX_GAIN_DB = 12.0


@dataclass(frozen=True)
class TiltLimit:
    """A model's reference spectrum and the slopes (dB per octave, input relative to it) left alone."""

    reference_db: np.ndarray  # (24,) band levels of the reference, dB
    min_db_per_octave: float
    max_db_per_octave: float

    @classmethod
    def from_card(cls, spec: dict) -> TiltLimit:
        """From a validated card's ``input_tilt`` object."""
        return cls(np.asarray(spec["reference_db"], np.float64), float(spec["min_db_per_octave"]),
                   float(spec["max_db_per_octave"]))


def band_levels_db(wav: np.ndarray, sample_rate: int) -> np.ndarray:
    """The long-term spectrum of (T,) ``wav``'s loud frames in the 24 bands of ``BAND_EDGES_HZ``.

    Returns:
        (24,) float64 dB (power); NaN for a band above the rate's Nyquist frequency, without an
        FFT bin, or for every band when ``wav`` is shorter than one frame or silent.
    """
    wav = np.asarray(wav, np.float32)
    n = 1 << int(np.ceil(np.log2(_FRAME_SECONDS * sample_rate)))
    out = np.full(TILT_BANDS, np.nan)
    if len(wav) < n:
        return out
    window, inside, band, counts = _frame_bands(n, sample_rate)
    frames = wav[: len(wav) // n * n].reshape(-1, n) * window  # (F, n), back to back
    spec = sfft.rfft(frames, axis=1)  # (F, n/2+1) complex64
    power = spec.real ** 2 + spec.imag ** 2
    energy = power.sum(axis=1)  # (F,)
    if not energy.max() > 0:
        return out
    ltas = power[energy >= energy.max() * 10 ** (-_LOUD_FRAMES_DB / 10)].mean(axis=0)  # (n/2+1,)
    sums = np.bincount(band, weights=ltas[inside], minlength=TILT_BANDS)  # (24,)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(counts > 0, 10 * np.log10(sums / np.maximum(counts, 1) + 1e-20), np.nan)
    return out


@functools.lru_cache(maxsize=8)
def _frame_bands(n: int, sample_rate: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For frames of ``n`` samples: the (n,) Hann window, the (n/2+1,) mask of FFT bins inside a band (and below
    0.45 of the rate), each such bin's band, and the (24,) number of bins per band. Made once per frame and rate."""
    freqs = np.fft.rfftfreq(n, 1.0 / sample_rate)
    band = np.searchsorted(BAND_EDGES_HZ, freqs, side="right") - 1  # (n/2+1,) band of each bin, -1/24 outside
    inside = (band >= 0) & (band < TILT_BANDS) & (freqs < 0.45 * sample_rate)
    counts = np.bincount(band[inside], minlength=TILT_BANDS)
    return np.hanning(n).astype(np.float32), inside, band[inside], counts


def tilt_slope(levels_db: np.ndarray, reference_db: np.ndarray) -> tuple[float, np.ndarray] | None:
    """The slope (dB per octave) of a line fitted to ``reference_db - levels_db`` over the bands with signal.

    A positive slope means the input falls off towards high frequencies faster than the reference.

    Returns:
        (slope, (24,) bool mask of the bands used), or None when fewer than 6 bands have signal.
    """
    finite = np.isfinite(levels_db)
    if finite.sum() < _MIN_BANDS:
        return None
    used = finite & (levels_db > np.nanmax(levels_db) - _SIGNAL_BANDS_DB)
    if used.sum() < _MIN_BANDS:
        return None
    slope = np.polyfit(_OCTAVES[used], (reference_db - levels_db)[used], 1)[0]
    return float(slope), used


def limit_tilt(wav: np.ndarray, sample_rate: int, limit: TiltLimit, passes: int = 2) -> np.ndarray:
    """(T,) float32 ``wav`` with its spectral slope brought into ``limit``'s range (unchanged when inside it,
    and when the input is narrowband by the VAD's test, ``models.vad_rules.is_narrowband``).

    The correction is a zero-phase gain that is linear in octaves over the bands with signal and flat
    beyond them (an empty band is not raised), at most 12 dB either way in a pass, applied by one FFT of the
    whole (zero-padded) input. Raising a steep input's top brings more bands above the signal floor,
    which moves the fitted slope, so the fit runs again on the corrected band levels (``passes`` in
    all) while the slope is still outside the range, and the passes' gains add up. The level is not
    kept (the level step follows).
    """
    wav = np.asarray(wav, np.float32)
    if is_narrowband(wav, sample_rate):
        return wav
    levels = band_levels_db(wav, sample_rate)
    steps = []  # (excess dB/octave, lowest and highest octave with signal, their mean)
    for _ in range(passes):
        fit = tilt_slope(levels, limit.reference_db)
        if fit is None:
            break
        slope, used = fit
        excess = min(slope - limit.min_db_per_octave, 0.0) + max(slope - limit.max_db_per_octave, 0.0)
        if excess == 0.0:
            break
        steps.append((excess, _OCTAVES[used].min(), _OCTAVES[used].max(), _OCTAVES[used].mean()))
        levels = levels + _gain_db(_OCTAVES, *steps[-1])  # (24,) what this pass does to each band
    if not steps:
        return wav
    size = sfft.next_fast_len(len(wav), real=True)  # zero-padded: a fast length, and less wrap-around
    octaves = np.log2(np.maximum(np.fft.rfftfreq(size, 1.0 / sample_rate), 1.0) / 1000.0)  # (size/2+1,)
    gain_db = sum(_gain_db(octaves, *step) for step in steps)
    return sfft.irfft(sfft.rfft(wav, size) * (10 ** (gain_db / 20)).astype(np.float32), size)[: len(wav)]


def _gain_db(octaves: np.ndarray, excess: float, lo: float, hi: float, mid: float) -> np.ndarray:
    """One pass's correction in dB at ``octaves`` (from 1 kHz): linear within [lo, hi], flat beyond, +-12 dB."""
    return np.clip(excess * (np.clip(octaves, lo, hi) - mid), -_MAX_GAIN_DB, _MAX_GAIN_DB)
