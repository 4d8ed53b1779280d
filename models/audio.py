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
    "stream_windows",
    "decode_pcm",
    "to_mono",
    "resample",
    "set_level",
    "remove_dc",
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


MIN_SAMPLE_RATE = 4_000  # below this there is no speech band left to embed
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
_UNKNOWN_FRAMES = 1 << 62  # libsndfile reports an undeclared length as INT64_MAX
_BLOCK_SECONDS = 4.0  # encoded audio is decoded and downmixed in blocks of this length


def check_header(field: str, sr: int, channels: int, frames: int, limits: AudioLimits | None) -> None:
    """Raise AudioError for a header's rate, channel count or declared length out of bounds. Refuse declared rates, channel counts and lengths out of bounds before anything is decoded."""
    if not MIN_SAMPLE_RATE <= sr <= MAX_SAMPLE_RATE:
        raise AudioError(field, f"has a sample rate of {sr} Hz; {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz is accepted")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(field, f"has {channels} channels; 1..{MAX_CHANNELS} are accepted")
    if limits is not None and 0 < frames < _UNKNOWN_FRAMES and frames / sr > limits.max_seconds + 1.0:
        raise AudioError(field, f"declares {frames / sr:.1f} s of audio, longer than the maximum "
                                f"{limits.max_seconds:.1f} s")


def check_pcm_format(sample_rate: int, channels: int, field: str) -> None:
    """Raise AudioError naming ``field``.sample_rate / .channels when a raw PCM format is out of bounds."""
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"{field}.sample_rate", f"must be in {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz, got {sample_rate}")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioError(f"{field}.channels", f"must be in 1..{MAX_CHANNELS}, got {channels}")


def probe_header(data: bytes) -> tuple[int, int, int] | None:
    """(sample rate, channels, declared frames) from the start of an audio file, or None when it
    cannot be read yet (e.g. the first chunks of a stream)."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            return int(f.samplerate), int(f.channels), int(f.frames)
    except Exception:  # noqa: BLE001 - not enough bytes yet, or not audio: decided when complete
        return None


def decode_encoded(data: bytes, field: str = "audio.encoded",
                   limits: AudioLimits | None = None) -> tuple[np.ndarray, int]:
    """Decode a complete audio file held in memory, downmixing to mono as it goes.

    The header's sample rate, channel count and declared length are checked before any
    decoding, and decoding runs in blocks that stop at ``limits.max_seconds``: a small file that
    declares hours of many-channel audio costs neither the memory nor the time it declares.

    Args:
        data: the file's bytes (WAV, FLAC, OGG, ... anything libsndfile reads).
        field: request field name used in error messages.
        limits: duration limits (None: no length limit while decoding).

    Returns:
        ``(samples, sample_rate)`` with samples float32 of shape (T, 1).

    Raises:
        AudioError: empty input, bytes that are not audio, a truncated file, or a header out of bounds.
    """
    import soundfile as sf

    if not data:
        raise AudioError(field, "is empty")
    truncated = _wav_truncation(data)
    if truncated:
        raise AudioError(field, truncated)
    blocks, total = [], 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            sr, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
            check_header(field, sr, channels, frames, limits)
            cap = None if limits is None else int((limits.max_seconds + 1.0) * sr)
            block = max(1, int(_BLOCK_SECONDS * sr))
            while True:
                part = f.read(block, dtype="float32", always_2d=True)  # (n, C)
                if part.shape[0] == 0:
                    break
                blocks.append(to_mono(part))  # (n,)
                total += part.shape[0]
                if cap is not None and total > cap:
                    raise AudioError(field, f"is longer than the maximum {limits.max_seconds:.1f} s")
    except sf.LibsndfileError as e:
        raise undecodable(field, e) from None
    except (RuntimeError, TypeError, ValueError) as e:
        if isinstance(e, AudioError):
            raise
        raise undecodable(field, e) from None
    if 0 < frames < _UNKNOWN_FRAMES and total < frames:
        raise AudioError(field, f"is truncated: header says {frames} frames, only {total} present")
    samples = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    return samples[:, None], sr  # (T, 1)


def stream_windows(source, field: str, target_rate: int, max_seconds: float, pcm: tuple[str, int, int] | None = None,
                   window_seconds: float = 60.0):
    """Decode audio from a file object window by window, in bounded memory: yields (T,) float32 at ``target_rate``.

    For recordings too long to hold decoded (an hour through ``EmbedStream``): only one window, a
    decoding block and the resampler's state are in memory at a time. Checks as ``decode_encoded``
    and ``decode_pcm`` do (header bounds, non-finite samples, truncation, ``max_seconds``).

    Args:
        source: a readable binary file object positioned at the start of the audio.
        field: request field name used in error messages.
        target_rate: the rate of the windows yielded.
        max_seconds: longest audio accepted.
        pcm: (encoding, sample rate, channels) for raw PCM; None for an encoded file.
        window_seconds: length of the windows (the last one may be shorter).
    """
    import soundfile as sf
    import soxr

    def blocks():  # (n, C) float32 at the source rate
        if pcm is not None:
            encoding, rate, channels = pcm
            dtype, scale = PCM_DTYPES[encoding]
            width = np.dtype(dtype).itemsize * channels
            step = int(_BLOCK_SECONDS * rate) * width
            while data := source.read(step):
                if len(data) % width:
                    raise AudioError(f"{field}.data", f"does not end on a whole frame ({encoding} x {channels} channels)")
                x = np.frombuffer(data, dtype=dtype).astype(np.float32).reshape(-1, channels)
                yield x * np.float32(scale) if scale != 1.0 else x
            return
        try:
            with sf.SoundFile(source) as f:
                rate, channels, frames = int(f.samplerate), int(f.channels), int(f.frames)
                check_header(field, rate, channels, frames, AudioLimits(0.0, max_seconds))
                total = 0
                while (part := f.read(int(_BLOCK_SECONDS * rate), dtype="float32", always_2d=True)).shape[0]:
                    total += part.shape[0]
                    yield part
                if 0 < frames < _UNKNOWN_FRAMES and total < frames:
                    raise AudioError(field, f"is truncated: header says {frames} frames, only {total} present")
        except sf.LibsndfileError as e:
            raise undecodable(field, e) from None

    rate = pcm[1] if pcm is not None else None
    if rate is None:
        pos = source.tell()
        try:
            rate = int(sf.info(source).samplerate)
        except (sf.LibsndfileError, RuntimeError) as e:
            raise undecodable(field, e) from None
        source.seek(pos)
    resampler = None if rate == target_rate else soxr.ResampleStream(rate, target_rate, 1, dtype="float32", quality="HQ")
    window = int(window_seconds * target_rate)
    pending: list[np.ndarray] = []
    have, seen = 0, 0
    for part in blocks():
        if not np.isfinite(part).all():
            raise AudioError(field, f"contains {int((~np.isfinite(part)).sum())} non-finite (NaN or inf) samples")
        seen += part.shape[0]
        if seen / rate > max_seconds:
            raise AudioError(field, f"is longer than the maximum {max_seconds:.1f} s")
        mono = to_mono(part)  # (n,)
        out = mono if resampler is None else resampler.resample_chunk(mono, last=False)
        pending.append(out)
        have += len(out)
        while have >= window:
            joined = np.concatenate(pending)
            yield np.ascontiguousarray(joined[:window])
            pending, have = [joined[window:]], len(joined) - window
    if resampler is not None:
        pending.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True))
    rest = np.concatenate(pending) if pending else np.zeros(0, np.float32)
    if seen == 0:
        raise AudioError(field, "contains no samples")
    if len(rest):
        yield np.ascontiguousarray(rest, dtype=np.float32)


_COMMON_FORMATS = ("WAV", "FLAC", "OGG", "MP3", "AIFF", "CAF", "W64", "RF64")


def undecodable(field: str, e: BaseException) -> AudioError:
    """The error for bytes libsndfile cannot read: what it said, the containers it reads here, and how to convert."""
    import soundfile as sf

    have = [f for f in _COMMON_FORMATS if f in sf.available_formats()]
    return AudioError(field, f"could not be decoded as audio ({_plain(e)}); readable containers: {', '.join(have)} "
                             "(OGG: Vorbis or Opus); not MP4/M4A/AAC, WebM or video: convert first, e.g. "
                             "`ffmpeg -i INPUT -ac 1 -ar 16000 out.wav`")


def _plain(e: Exception) -> str:
    """A library error without object reprs or addresses (never echo internals to clients)."""
    import re

    text = getattr(e, "error_string", None) or str(e)
    return re.sub(r"<[^>]*>", "<input>", text)[:200]


def decode_pcm(
    data: bytes, sample_rate: int, encoding: str, channels: int = 1, field: str = "audio.pcm",
    limits: AudioLimits | None = None,
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
    channels = channels or 1
    check_pcm_format(sample_rate, channels, f"{field}.format")
    dtype, scale = PCM_DTYPES[encoding]
    width = np.dtype(dtype).itemsize * channels
    if not data:
        raise AudioError(f"{field}.data", "is empty")
    if len(data) % width:
        raise AudioError(
            f"{field}.data",
            f"has {len(data)} bytes, not a multiple of {width} ({encoding} x {channels} channels)",
        )
    seconds = len(data) / width / sample_rate
    if limits is not None and seconds > limits.max_seconds:
        raise AudioError(f"{field}.data", f"is {seconds:.1f} s long, longer than the maximum {limits.max_seconds:.1f} s")
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


def remove_dc(wav: np.ndarray) -> np.ndarray:
    """(T,) float32 ``wav`` minus its mean: a constant offset (cheap converters, some telephony gear) is not voice,
    but a model's lowest spectral band reads it as energy."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.size == 0:
        return wav
    return wav - np.float32(wav.mean(dtype=np.float64))


def set_level(wav: np.ndarray, dbfs: float) -> np.ndarray:
    """(T,) float32 ``wav`` scaled so that its RMS is ``dbfs`` dB full scale.

    Digital silence stays silence (the RMS is floored at -120 dBFS, so the gain is bounded);
    samples may leave [-1, 1] when quiet audio is raised, which float models accept.
    """
    wav = np.asarray(wav, dtype=np.float32)
    if wav.size == 0:
        return wav
    rms = max(float(np.sqrt(np.mean(np.square(wav, dtype=np.float64)))), 1e-6)
    return wav * np.float32(10.0 ** (dbfs / 20.0) / rms)


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
