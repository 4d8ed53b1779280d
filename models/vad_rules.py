"""The rules around the VAD network: speech segments from probabilities, the input's level and bandwidth.

``models.vad`` runs Silero's network; what turns its probabilities into segments, and what
decides how its input is prepared, is here (numpy only, no ONNX Runtime), shared by the
one-shot VAD and the live stream's (``models.vad_stream``).

Segment rules (the package's defaults, every one configurable): a segment starts at the first
frame with probability >= ``threshold``; it ends where the probability first fell below
``neg_threshold`` (``threshold - 0.15``) once that quiet stretch has lasted
``min_silence_ms``; segments of ``min_speech_ms`` or less are dropped; each kept segment is
widened by ``speech_pad_ms`` on both sides (neighbours closer than two pads split the gap).

Degraded audio (measured on the real-speech pool, ``training.evaluation.decisions``): telephone-band input
resampled to 16 kHz lost speech to the wideband network (10.8% of 3-7 s utterances under 1 s of
speech, against 0.6% clean), and 25 dB quieter audio lost it too (5.1%). Two steps fix that:

* **Level**: the network's input (not the audio that is embedded) is raised so that its loudest
  frames (95th percentile of 32 ms frame RMS) sit at -20 dBFS, by at most +30 dB and never
  lowered; audio whose loudest frames are under -80 dBFS (digital silence) is left alone.
* **Bandwidth**: audio with no energy above 4 kHz (energy in 4.2-7.6 kHz at least 45 dB below
  0.2-3.8 kHz in the louder half of the frames: telephone, GSM, AMR, 8 kHz recordings) runs
  through Silero's own 8 kHz mode (the 8 kHz branch of ``silero_vad.onnx``, rebuilt batched like
  the 16 kHz one), downsampled to 8 kHz. Telephone: 4.0% under 1 s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

__all__ = ["VAD_SAMPLE_RATE", "VadOptions", "gain_for_powers", "is_narrowband", "keep_speech", "level_gain", "loud_spectrum",
           "pad_segments", "speech_segments"]

VAD_SAMPLE_RATE = 16000
_NARROWBAND_DB = -45.0  # 4.2-7.6 kHz energy this far below 0.2-3.8 kHz: no wideband content
_LEVEL_TARGET_DB, _LEVEL_MAX_GAIN_DB, _LEVEL_FLOOR_DB = -20.0, 30.0, -80.0
_FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)


@dataclass(frozen=True)
class VadOptions:
    """How probabilities become speech segments.

    Attributes:
        threshold: a frame with speech probability >= this starts (or continues) speech.
        neg_threshold: below this, a frame counts as silence inside speech; None means
            ``max(threshold - 0.15, 0.01)``.
        min_speech_ms: segments this long or shorter are dropped.
        min_silence_ms: silence inside speech must last this long to end a segment.
        speech_pad_ms: padding added to both sides of every segment.
        normalize_level: raise quiet input to a working level before the network (see above).
        narrowband: run narrowband input through the 8 kHz graph (see above).
        narrowband_threshold: ``threshold`` for narrowband input (the 8 kHz graph is less
            confident on telephone speech: 0.4 kept 4.0% of telephone-band utterances under 1 s
            of speech, 0.5 kept 6.8%); its ``neg_threshold`` is 0.15 lower.
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_ms: float = 250.0
    min_silence_ms: float = 100.0
    speech_pad_ms: float = 30.0
    normalize_level: bool = True
    narrowband: bool = True
    narrowband_threshold: float = 0.4

    def validate(self, where: str = "vad") -> "VadOptions":
        """Check ranges; raise ValueError naming the option and its value."""
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"{where}.threshold must be in (0, 1), got {self.threshold!r}")
        if not 0.0 < self.narrowband_threshold < 1.0:
            raise ValueError(f"{where}.narrowband_threshold must be in (0, 1), got {self.narrowband_threshold!r}")
        if self.neg_threshold is not None and not 0.0 < self.neg_threshold <= self.threshold:
            raise ValueError(f"{where}.neg_threshold must be in (0, threshold], got {self.neg_threshold!r}")
        for name in ("min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            value = getattr(self, name)
            if not (np.isfinite(value) and 0.0 <= value <= 60_000):
                raise ValueError(f"{where}.{name} must be in 0..60000 ms, got {value!r}")
        return self

    @property
    def low_threshold(self) -> float:
        """The effective ``neg_threshold``."""
        return self.neg_threshold if self.neg_threshold is not None else max(self.threshold - 0.15, 0.01)


def speech_segments(probs: np.ndarray, n_samples: int, options: VadOptions = VadOptions(),
                    sample_rate: int = VAD_SAMPLE_RATE, frame: int = _FRAME) -> list[tuple[int, int]]:
    """Turn per-frame speech probabilities into padded speech segments.

    Args:
        probs: (F,) probability of frame i, which starts at sample ``i * frame``.
        n_samples: length of the audio the frames cover.
        options: segment rules.
        sample_rate: rate the sample positions refer to.
        frame: samples per frame.

    Returns:
        ``[(start, end), ...]`` sample positions, sorted and non-overlapping.
    """
    min_speech = sample_rate * options.min_speech_ms / 1000.0
    min_silence = sample_rate * options.min_silence_ms / 1000.0
    pad = sample_rate * options.speech_pad_ms / 1000.0
    high, low = options.threshold, options.low_threshold

    raw: list[list[int]] = []  # [start, end] before padding
    start: int | None = None  # start of the open segment
    quiet_since = 0  # first sample of the current quiet stretch inside the open segment (0: none)
    for i, p in enumerate(np.asarray(probs, dtype=np.float32).tolist()):
        pos = i * frame
        if p >= high:
            quiet_since = 0
            if start is None:
                start = pos
            continue
        if start is None or p >= low:
            continue
        if not quiet_since:
            quiet_since = pos
        if pos - quiet_since >= min_silence:
            if quiet_since - start > min_speech:
                raw.append([start, quiet_since])
            start, quiet_since = None, 0
    if start is not None and n_samples - start > min_speech:
        raw.append([start, n_samples])

    return pad_segments(raw, n_samples, pad)


def pad_segments(raw: list[list[int]], n_samples: int, pad: float, prev_end: int | None = None) -> list[tuple[int, int]]:
    """Pad raw ``[start, end]`` speech segments (in place): neighbours closer than two pads meet in the middle.

    Args:
        raw: sorted, non-overlapping raw segments (sample positions), modified in place.
        n_samples: length of the audio (no segment ends beyond it).
        pad: padding in samples.
        prev_end: raw end of the segment before ``raw[0]``, when there is one (a stream's
            earlier, already padded segment): ``raw[0]``'s start is padded as its neighbour.
    """
    for i, seg in enumerate(raw):
        if i == 0:
            gap = None if prev_end is None else seg[0] - prev_end
            seg[0] = int(max(0, seg[0] - (pad if gap is None or gap >= 2 * pad else gap // 2)))
        if i + 1 < len(raw):
            nxt = raw[i + 1]
            gap = nxt[0] - seg[1]
            if gap < 2 * pad:
                seg[1] += gap // 2
                nxt[0] = int(max(0, nxt[0] - gap // 2))
            else:
                seg[1] = int(min(n_samples, seg[1] + pad))
                nxt[0] = int(max(0, nxt[0] - pad))
        else:
            seg[1] = int(min(n_samples, seg[1] + pad))
    return [(int(a), int(b)) for a, b in raw]


def _frame_power(wave: np.ndarray, frame: int = 512) -> np.ndarray:
    """(T,) -> (F,) mean square of each whole ``frame``-sample frame."""
    n = wave.size // frame
    return np.mean(np.square(wave[:n * frame].reshape(n, frame), dtype=np.float64), axis=1)


def level_gain(wave: np.ndarray) -> float:
    """The linear gain that brings the loudest frames of (T,) ``wave`` to the VAD's working level (>= 1)."""
    return gain_for_powers(_frame_power(wave))


def gain_for_powers(power: np.ndarray) -> float:
    """``level_gain`` from (F,) mean squares of 512-sample frames (what a stream accumulates as it goes)."""
    if power.size == 0:
        return 1.0
    level_db = 10 * np.log10(np.percentile(power, 95) + 1e-20)
    if level_db < _LEVEL_FLOOR_DB or level_db >= _LEVEL_TARGET_DB:
        return 1.0
    return float(10 ** (min(_LEVEL_TARGET_DB - level_db, _LEVEL_MAX_GAIN_DB) / 20))


@functools.lru_cache(maxsize=8)
def _hann(frame: int) -> np.ndarray:
    """(frame,) float32 Hann window, made once per frame length."""
    w = np.hanning(frame).astype(np.float32)
    w.flags.writeable = False
    return w


def loud_spectrum(wave: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The power spectrum of (T,) float32 ``wave``'s louder half of 32 ms Hann frames: ((L/2+1,) float64 power summed
    over those frames, (L/2+1,) bin frequencies in Hz); None for fewer than four frames."""
    frame = int(0.032 * sample_rate)
    n = wave.size // frame
    if n < 4:
        return None
    frames = wave[:n * frame].reshape(n, frame) * _hann(frame)  # (F, L) float32
    spec = np.fft.rfft(frames, axis=1)  # (F, L // 2 + 1), complex64 on NumPy 2 (half the time of complex128)
    power = spec.real ** 2 + spec.imag ** 2  # (F, L // 2 + 1), without abs()'s square root
    energy = power.sum(axis=1)
    return power[energy >= np.median(energy)].sum(axis=0, dtype=np.float64), np.fft.rfftfreq(frame, 1.0 / sample_rate)


def is_narrowband(wave: np.ndarray, sample_rate: int) -> bool:
    """Whether (T,) ``wave`` carries no speech energy above 4 kHz (telephone band, 8 kHz codecs).

    Compares the 4.2-7.6 kHz band with 0.2-3.8 kHz over the louder half of 32 ms frames
    (Hann-windowed). Audio at 8 kHz or less is narrowband by definition; audio too short or
    silent to tell is not.
    """
    if sample_rate <= 8000:
        return True
    loud = loud_spectrum(wave, sample_rate)
    if loud is None:
        return False
    spectrum, hz = loud
    low = spectrum[(hz >= 200) & (hz < 3800)].sum()
    high = spectrum[(hz >= 4200) & (hz < min(7600, sample_rate / 2))].sum()
    if low <= 0:
        return False
    return bool(10 * np.log10(high / low + 1e-30) < _NARROWBAND_DB)


def keep_speech(wave: np.ndarray, segments: list[tuple[int, int]]) -> np.ndarray:
    """The (T',) concatenation of ``wave[start:end]`` over ``segments``."""
    if not segments:
        return wave[:0]
    return np.ascontiguousarray(np.concatenate([wave[a:b] for a, b in segments]), dtype=np.float32)
