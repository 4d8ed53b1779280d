"""What the engine takes and gives for one audio input: the audio as it came in, and the speech found in it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["AudioInput", "Speech"]


@dataclass
class AudioInput:
    """Audio as it came in: an encoded file, or raw PCM with its format."""

    data: bytes
    field: str = "audio"
    pcm_encoding: str | None = None  # None: ``data`` is an encoded file
    sample_rate: int = 0
    channels: int = 1


@dataclass
class Speech:
    """A decoded input after voice activity detection: what will be embedded and how much speech it is."""

    wave: np.ndarray  # (T',) float32 speech-only waveform at the model's rate
    speech_seconds: float  # net speech (len(wave) / rate)
    audio_seconds: float  # the decoded audio's duration
    segments: list[tuple[float, float]]  # kept (start, end) in seconds of the input
    vad_applied: bool
    decode_s: float  # decoding + resampling + VAD
    narrowband: bool = False  # no energy above 4 kHz: VAD ran in its 8 kHz mode
    multiple_speakers: bool = False  # set by the one-talker check
    self_consistency: float | None = None  # its lowest LLR between parts (None: not checked)
    vad_s: float = 0.0  # the VAD's share of decode_s
