"""Audio decoding and conditioning shared by training, export and serving.

One module so that the waveform a model was trained and exported on is exactly the waveform
the server feeds it: decode (libsndfile through ``soundfile``), downmix to mono, resample
with ``soxr`` (a band-limited resampler; naive interpolation aliases and shifts speaker
features), and check that the result is finite and within duration limits.

Only numpy, soundfile and soxr are imported: ``service/`` uses this module and must stay
free of torch.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AudioError",
    "PCM_DTYPES",
    "decode_encoded",
    "decode_pcm",
    "to_mono",
    "resample",
    "condition",
    "AudioLimits",
]

# Raw PCM encodings the API accepts: name -> (numpy dtype, scale to [-1, 1]).
PCM_DTYPES: dict[str, tuple[str, float]] = {
    "PCM_S16LE": ("<i2", 1.0 / 32768.0),
    "PCM_S32LE": ("<i4", 1.0 / 2147483648.0),
    "PCM_F32LE": ("<f4", 1.0),
}


class AudioError(ValueError):
    """Audio that cannot be used; ``field`` names the request field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class AudioLimits:
    """Duration limits applied after decoding, in seconds of audio."""

    min_seconds: float = 0.1
    max_seconds: float = 300.0


def _wav_truncation(data: bytes) -> str | None:
    """For a RIFF/WAVE file, describe how its data chunk is cut short (None when it is whole).

    libsndfile silently reads what is there; a short file usually means a broken upload.
    Streaming writers put 0 or 0xFFFFFFFF in the size field: those are accepted.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        if chunk == b"data":
            have = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and have < size:
                return f"is truncated: its data chunk declares {size} bytes, only {have} present"
            return None
        pos += 8 + size + (size & 1)
    return None


def decode_encoded(data: bytes, field: str = "audio.encoded") -> tuple[np.ndarray, int]:
    """Decode a complete audio file held in memory.

    Args:
        data: the file's bytes (WAV, FLAC, OGG, ... anything libsndfile reads).
        field: request field name used in error messages.

    Returns:
        ``(samples, sample_rate)`` with samples float32 of shape (T, C).

    Raises:
        AudioError: empty input, bytes that are not audio, or a truncated file.
    """
    import soundfile as sf

    if not data:
        raise AudioError(field, "is empty")
    truncated = _wav_truncation(data)
    if truncated:
        raise AudioError(field, truncated)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr = int(f.samplerate)
            frames = f.frames
            samples = f.read(dtype="float32", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioError(field, f"could not be decoded as audio ({e})") from None
    if frames > 0 and samples.shape[0] < frames:
        raise AudioError(
            field, f"is truncated: header says {frames} frames, only {samples.shape[0]} present"
        )
    if sr <= 0:
        raise AudioError(field, f"has an invalid sample rate {sr}")
    return samples, sr


def decode_pcm(
    data: bytes, sample_rate: int, encoding: str, channels: int = 1, field: str = "audio.pcm"
) -> tuple[np.ndarray, int]:
    """Interpret raw interleaved PCM bytes.

    Args:
        data: interleaved little-endian samples.
        sample_rate: Hz, > 0.
        encoding: one of ``PCM_DTYPES``.
        channels: number of interleaved channels (0 is read as 1).
        field: request field name used in error messages.

    Returns:
        ``(samples, sample_rate)`` with samples float32 of shape (T, C).
    """
    if encoding not in PCM_DTYPES:
        raise AudioError(
            f"{field}.format.encoding", f"must be one of {sorted(PCM_DTYPES)}, got {encoding!r}"
        )
    if sample_rate <= 0 or sample_rate > 384_000:
        raise AudioError(f"{field}.format.sample_rate", f"must be in 1..384000 Hz, got {sample_rate}")
    channels = channels or 1
    if channels < 1 or channels > 64:
        raise AudioError(f"{field}.format.channels", f"must be in 1..64, got {channels}")
    dtype, scale = PCM_DTYPES[encoding]
    width = np.dtype(dtype).itemsize * channels
    if not data:
        raise AudioError(f"{field}.data", "is empty")
    if len(data) % width:
        raise AudioError(
            f"{field}.data",
            f"has {len(data)} bytes, not a multiple of {width} ({encoding} x {channels} channels)",
        )
    samples = np.frombuffer(data, dtype=dtype).astype(np.float32)
    if scale != 1.0:
        samples *= np.float32(scale)
    return samples.reshape(-1, channels), sample_rate  # (T, C)


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels of a (T, C) or (T,) array into a float32 (T,) waveform."""
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.shape[1] == 1:
        return np.ascontiguousarray(samples[:, 0], dtype=np.float32)
    return samples.mean(axis=1, dtype=np.float32)


def resample(wav: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample a mono float32 waveform with soxr's high-quality band-limited filter."""
    if sr_in == sr_out:
        return wav
    import soxr

    return soxr.resample(wav, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)


def condition(
    samples: np.ndarray,
    sample_rate: int,
    target_rate: int,
    limits: AudioLimits = AudioLimits(),
    field: str = "audio",
) -> np.ndarray:
    """Turn decoded samples into the model's input waveform.

    Checks for non-finite values before resampling (a NaN would smear over the whole
    filter), downmixes, resamples to ``target_rate`` and enforces the duration limits.

    Args:
        samples: float32 (T, C) or (T,).
        sample_rate: rate of ``samples`` in Hz.
        target_rate: the model's rate in Hz.
        limits: duration limits in seconds.
        field: request field name used in error messages.

    Returns:
        float32 (T',) waveform at ``target_rate``.
    """
    if samples.size == 0:
        raise AudioError(field, "contains no samples")
    if not np.isfinite(samples).all():
        bad = int((~np.isfinite(samples)).sum())
        raise AudioError(field, f"contains {bad} non-finite (NaN or inf) samples")
    seconds = samples.shape[0] / float(sample_rate)
    if seconds < limits.min_seconds:
        raise AudioError(
            field, f"is {seconds:.3f} s long, shorter than the minimum {limits.min_seconds:.3f} s"
        )
    if seconds > limits.max_seconds:
        raise AudioError(
            field, f"is {seconds:.1f} s long, longer than the maximum {limits.max_seconds:.1f} s"
        )
    wav = resample(to_mono(samples), sample_rate, target_rate)  # (T',)
    return np.ascontiguousarray(wav, dtype=np.float32)
