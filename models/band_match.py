"""Band matching: two recordings compared in the narrowest band either of them has.

A voice heard through a telephone line and the same voice recorded wideband embed far apart: the
missing top octave and, on a landline, the missing fundamental (a 300 Hz high-pass) read as a
different voice. When either side of a pair is narrowband, each side wider than the pair's
narrowest band is put through that band before it is embedded (``match_band``), so that the pair
is a pair of one channel, which the cohort and calibration already handle. Measured on held-out
human speech against a wideband recording (BENCHMARKS.md section 9g, ``ge2e`` 0.4.0): a
telephone-band probe EER 17.6% -> 12.3% (false rejects at the operating point 82.9% -> 51.3%),
GSM 8.2% -> 5.3%, AMR-NB 11.8% -> 10.3%.

Which band: a landline's 300-3400 Hz band must be matched with its high-pass, and an 8 kHz codec
(GSM, AMR) with the 8 kHz band only (cutting the low end of a GSM pair made it worse: EER 18%).
``low_band_db`` tells them apart: the level of 100-250 Hz (a voice's fundamental and first
harmonics) against 400-1000 Hz in the louder half of 32 ms frames, below ``LOW_CUT_DB`` when a
high-pass has taken the fundamental out (held-out speech through the telephone band: -48 to -28 dB;
GSM, AMR and clean speech -17 to +7 dB).

numpy, scipy and soxr only (``service/`` imports no torch).
"""

from __future__ import annotations

import numpy as np

from models.audio import resample
from models.vad_rules import loud_spectrum

__all__ = ["LOW_CUT_DB", "NARROW_RATE", "low_band_db", "has_low_cut", "wider_than_pair", "match_band"]

LOW_CUT_DB = -20.0
NARROW_RATE = 8000  # the narrowband side's rate: its band ends below 4 kHz
TELEPHONE_BAND_HZ = (300.0, 3400.0)


def low_band_db(wav: np.ndarray, sample_rate: int) -> float:
    """Level of 100-250 Hz against 400-1000 Hz in (T,) ``wav``'s louder half of 32 ms frames, in dB
    (NaN when ``wav`` is shorter than four frames or silent there)."""
    loud = loud_spectrum(np.asarray(wav, np.float32), sample_rate)
    if loud is None:
        return float("nan")
    power, hz = loud
    ref = power[(hz >= 400) & (hz < 1000)].sum()
    if not ref > 0:
        return float("nan")
    return float(10 * np.log10(power[(hz >= 100) & (hz < 250)].sum() / ref + 1e-30))


def has_low_cut(wav: np.ndarray, sample_rate: int) -> bool:
    """Whether (T,) ``wav`` lacks its fundamental the way a landline's 300 Hz high-pass takes it out."""
    level = low_band_db(wav, sample_rate)
    return bool(np.isfinite(level) and level < LOW_CUT_DB)


def wider_than_pair(narrowband, low_cut, pair_low_cut):
    """Whether a side of a pair with a narrowband side is wider than the pair's narrowest band, so that it is embedded
    again in that band: it is wideband, or the pair's band has the landline's low cut (``pair_low_cut``: either side
    lacks its fundamental) and it does not. Bools, or (K,) bool arrays of trial-aligned sides."""
    return np.logical_not(narrowband) | (np.asarray(pair_low_cut) & np.logical_not(low_cut))


def match_band(wav: np.ndarray, sample_rate: int, low_cut: bool) -> np.ndarray:
    """(T,) float32 ``wav`` limited to a narrowband channel's band, at its own rate and length.

    ``low_cut``: the 300-3400 Hz telephone band (a 6th-order Butterworth band-pass, run forwards and
    backwards); otherwise only the 8 kHz band. Both then go down to 8 kHz and back (soxr's
    band-limited resampler), as a narrowband recording reaches the model.
    """
    wav = np.asarray(wav, np.float32)
    if wav.size == 0:
        return wav
    if low_cut and wav.size > 256:  # sosfiltfilt needs some length to pad; inputs here are >= 1 s of speech
        from scipy.signal import butter, sosfiltfilt

        sos = butter(6, TELEPHONE_BAND_HZ, btype="bandpass", fs=sample_rate, output="sos")
        wav = sosfiltfilt(sos, wav).astype(np.float32)
    out = resample(resample(wav, sample_rate, NARROW_RATE), NARROW_RATE, sample_rate)
    if len(out) < len(wav):  # a resampler's rounding: keep the length the VAD's segments were measured on
        out = np.pad(out, (0, len(wav) - len(out)))
    return np.ascontiguousarray(out[: len(wav)], dtype=np.float32)
