"""Decoding audio that arrives in chunks, once: raw PCM or a WAV stream, to the model's rate.

A live stream (``VerifyStream``) cannot wait for the end of a file to decode it, so only
formats that decode sample by sample are taken: raw PCM in any ``PCM_DTYPES`` encoding, and
WAV (RIFF) with PCM 16/32-bit, float 32-bit, or G.711 mu-law / A-law samples, the telephony
formats, whose header is read from the first chunk(s) and whose data size is ignored (streaming
writers leave it 0 or 0xFFFFFFFF). Compressed containers (FLAC, Ogg/Opus) need the whole file or
a seekable one: clients decode them and send PCM (the ``spkserve verify-stream`` CLI does).

Chunks may split a sample or a header anywhere; bytes of an unfinished sample frame wait for
the next chunk. Samples are downmixed and resampled with a ``soxr`` stream (state carried),
so decoding a stream in chunks costs the same as decoding it once.
"""

from __future__ import annotations

import struct

import numpy as np

from models.audio import PCM_DTYPES, AudioError, check_pcm_format, to_mono

__all__ = ["ChunkDecoder"]

_WAV_PCM, _WAV_FLOAT, _WAV_ALAW, _WAV_MULAW, _WAV_EXTENSIBLE = 1, 3, 6, 7, 0xFFFE
_MAX_HEADER = 1 << 16  # bytes of RIFF chunks before "data" that a stream may carry


def _mulaw_table() -> np.ndarray:
    """(256,) float32: G.711 mu-law byte -> sample in [-1, 1]."""
    u = ~np.arange(256, dtype=np.uint8)
    sign, exponent, mantissa = u & 0x80, (u >> 4) & 0x07, u & 0x0F
    magnitude = ((mantissa.astype(np.int32) << 3) + 0x84) << exponent.astype(np.int32)
    return (np.where(sign, -(magnitude - 0x84), magnitude - 0x84) / 32768.0).astype(np.float32)


def _alaw_table() -> np.ndarray:
    """(256,) float32: G.711 A-law byte -> sample in [-1, 1]."""
    a = np.arange(256, dtype=np.uint8) ^ 0x55
    sign, exponent, mantissa = a & 0x80, ((a >> 4) & 0x07).astype(np.int32), (a & 0x0F).astype(np.int32)
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    return (np.where(sign, magnitude, -magnitude) / 32768.0).astype(np.float32)


class ChunkDecoder:
    """Turn chunks of one audio stream into (T,) float32 samples at ``target_rate``.

    Args:
        field: the request field chunks come in (error messages name it).
        target_rate: the model's sample rate.
        pcm: (encoding, sample rate, channels) for raw PCM; None for a WAV stream.
        max_seconds: longest audio accepted (input seconds).
    """

    def __init__(self, field: str, target_rate: int, pcm: tuple[str, int, int] | None = None,
                 max_seconds: float = 3600.0):
        self.field, self.target_rate, self.max_seconds = field, target_rate, max_seconds
        self._buf = bytearray()
        self._resampler = None
        self.frames = 0  # sample frames decoded, at the input rate
        self.rate: int | None = None
        self._table = None
        if pcm is not None:
            encoding, rate, channels = pcm
            if encoding not in PCM_DTYPES:
                raise AudioError(f"{field}.encoding", f"must be one of {sorted(PCM_DTYPES)}, got {encoding!r}")
            self._set_format(np.dtype(PCM_DTYPES[encoding][0]), PCM_DTYPES[encoding][1], rate, channels or 1)

    def _set_format(self, dtype: np.dtype, scale: float, rate: int, channels: int, table=None) -> None:
        import soxr

        self.dtype, self.scale, self.rate, self.channels, self._table = dtype, scale, rate, channels, table
        self.width = dtype.itemsize * channels
        if rate != self.target_rate:
            self._resampler = soxr.ResampleStream(rate, self.target_rate, 1, dtype="float32", quality="HQ")

    @property
    def seconds(self) -> float:
        """Input audio decoded so far, in seconds."""
        return self.frames / self.rate if self.rate else 0.0

    def _parse_wav(self) -> bool:
        """Read the RIFF header once enough bytes arrived; False while more are needed."""
        b = bytes(self._buf)
        if len(b) >= 4 and b[:4] != b"RIFF"[:len(b)] or len(b) >= 12 and b[8:12] != b"WAVE":
            raise AudioError(self.field, "is not a WAV stream (no RIFF/WAVE header); an encoded live stream must be "
                                         "WAV, or set config.pcm and send raw PCM")
        pos, fmt = 12, None
        while pos + 8 <= len(b):
            tag, size = b[pos:pos + 4], struct.unpack("<I", b[pos + 4:pos + 8])[0]
            if tag == b"data":
                if fmt is None:
                    raise AudioError(self.field, "WAV stream has its data chunk before the fmt chunk")
                del self._buf[:pos + 8]
                return self._wav_format(*fmt)
            if pos + 8 + size > len(b):
                break
            if tag == b"fmt ":
                if size < 16:
                    raise AudioError(self.field, f"WAV fmt chunk of {size} bytes is malformed")
                fmt = struct.unpack("<HHIIHH", b[pos + 8:pos + 24])
                if fmt[0] == _WAV_EXTENSIBLE and size >= 26:
                    fmt = (struct.unpack("<H", b[pos + 32:pos + 34])[0],) + fmt[1:]
            pos += 8 + size + (size & 1)
        if len(b) > _MAX_HEADER:
            raise AudioError(self.field, f"WAV stream has no data chunk in its first {_MAX_HEADER:,} bytes")
        return False

    def _wav_format(self, tag: int, channels: int, rate: int, _byte_rate: int, _align: int, bits: int) -> bool:
        kinds = {(_WAV_PCM, 16): ("<i2", 1 / 32768.0, None), (_WAV_PCM, 32): ("<i4", 1 / 2147483648.0, None),
                 (_WAV_FLOAT, 32): ("<f4", 1.0, None), (_WAV_MULAW, 8): ("u1", 1.0, _mulaw_table()),
                 (_WAV_ALAW, 8): ("u1", 1.0, _alaw_table())}
        if (tag, bits) not in kinds:
            raise AudioError(self.field, f"WAV stream with format tag {tag} and {bits}-bit samples is not streamable; "
                                         "send 16/32-bit PCM, 32-bit float, mu-law or A-law, or raw PCM (config.pcm)")
        check_pcm_format(rate, channels, self.field)
        dtype, scale, table = kinds[(tag, bits)]
        self._set_format(np.dtype(dtype), scale, rate, channels, table)
        return True

    def feed(self, data: bytes) -> np.ndarray:
        """Decode the next chunk: (T,) float32 at ``target_rate`` (possibly empty)."""
        self._buf += data
        if self.rate is None and not self._parse_wav():
            return np.zeros(0, np.float32)
        whole = len(self._buf) // self.width * self.width
        if whole == 0:
            return np.zeros(0, np.float32)
        raw = np.frombuffer(bytes(self._buf[:whole]), dtype=self.dtype)
        del self._buf[:whole]
        x = self._table[raw] if self._table is not None else raw.astype(np.float32)
        if self._table is None and self.scale != 1.0:
            x *= np.float32(self.scale)
        if not np.isfinite(x).all():
            raise AudioError(self.field, f"contains {int((~np.isfinite(x)).sum())} non-finite (NaN or inf) samples")
        self.frames += whole // self.width
        if self.seconds > self.max_seconds:
            raise AudioError(self.field, f"the stream is longer than the maximum {self.max_seconds:.1f} s "
                                         "(max_stream_audio_seconds)")
        mono = to_mono(x.reshape(-1, self.channels))  # (T,)
        return mono if self._resampler is None else self._resampler.resample_chunk(mono, last=False)

    def finish(self) -> np.ndarray:
        """The stream ended: the resampler's tail, (T,). A partial sample frame left over is an error."""
        if self.rate is None:
            raise AudioError(self.field, "the stream ended before its WAV header was complete" if self._buf
                             else "the stream carried no audio")
        if self.frames == 0 and not self._buf:
            raise AudioError(self.field, "the stream carried no audio")
        if self._buf:
            raise AudioError(self.field, f"the stream ends with {len(self._buf)} bytes of an unfinished sample frame "
                                         f"({self.width} bytes per frame)")
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True)
