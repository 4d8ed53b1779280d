"""Voice activity detection: Silero VAD on ONNX Runtime, and the speech-segment rules.

Real recordings carry leading and trailing silence, pauses, line noise and hold music; a
speaker embedding averages over all of it, so a padded utterance stops matching itself and
pure silence or noise gets a "voice". Everything the service embeds therefore goes through
VAD first and only the speech segments are embedded.

The network is Silero VAD (MIT licence), the block ("sequence") ONNX export shipped inside the
``silero-vad`` wheel (``models/assets/silero_vad_16k_sequence.onnx``, taken unchanged from
``silero-vad==6.2.3``; ``scripts/fetch_vad.sh`` re-extracts it and checks its hash). It takes
many 32 ms frames per call, each prefixed with the previous frame's last 64 samples, and
carries an LSTM state across calls, which starts from zeros for every input, so one request
never sees another's state. Importing the ``silero_vad`` package would import torch, which
the service must not, so the frame/segment logic is ours; ``tests/test_vad.py`` checks both
the probabilities and the segments against the package's own functions.

Segment rules (the package's defaults, every one configurable): a segment starts at the first
frame with probability >= ``threshold``; it ends where the probability first fell below
``neg_threshold`` (``threshold - 0.15``) once that quiet stretch has lasted
``min_silence_ms``; segments of ``min_speech_ms`` or less are dropped; each kept segment is
widened by ``speech_pad_ms`` on both sides (neighbours closer than two pads split the gap).

Only numpy and onnxruntime are imported (and soxr for inputs that are not at 16 kHz).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["VadOptions", "SileroVad", "speech_segments", "keep_speech", "DEFAULT_VAD_MODEL", "VAD_SAMPLE_RATE"]

DEFAULT_VAD_MODEL = Path(__file__).resolve().parent / "assets" / "silero_vad_16k_sequence.onnx"
VAD_SAMPLE_RATE = 16000
_FRAME = 512  # samples per VAD frame at 16 kHz (32 ms)
_CONTEXT = 64  # samples of the previous frame the network sees before each frame
_STATE = (1, 1, 128)


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
    """

    threshold: float = 0.5
    neg_threshold: float | None = None
    min_speech_ms: float = 250.0
    min_silence_ms: float = 100.0
    speech_pad_ms: float = 30.0

    def validate(self, where: str = "vad") -> "VadOptions":
        """Check ranges; raise ValueError naming the option and its value."""
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"{where}.threshold must be in (0, 1), got {self.threshold!r}")
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

    # pad every segment; neighbours closer than two pads meet in the middle of their gap
    for i, seg in enumerate(raw):
        if i == 0:
            seg[0] = int(max(0, seg[0] - pad))
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


def keep_speech(wave: np.ndarray, segments: list[tuple[int, int]]) -> np.ndarray:
    """The (T',) concatenation of ``wave[start:end]`` over ``segments``."""
    if not segments:
        return wave[:0]
    return np.ascontiguousarray(np.concatenate([wave[a:b] for a, b in segments]), dtype=np.float32)


class SileroVad:
    """Silero VAD's block ONNX graph on an ONNX Runtime CPU session.

    Thread-safe: every call starts from a zero LSTM state and keeps no state on the object,
    so one instance serves all requests of a process.

    Args:
        path: the sequence ONNX file (default: the copy shipped in ``models/assets``).
        max_frames: frames per ONNX call (512 frames = 16.4 s of audio).
        intra_op_threads: ONNX Runtime threads per call (1: the service runs VAD on its
            decode pool, one request per thread).
    """

    def __init__(self, path: str | Path | None = None, max_frames: int = 512, intra_op_threads: int = 1):
        import onnxruntime as ort

        self.path = Path(path) if path else DEFAULT_VAD_MODEL
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: Silero VAD model not found (scripts/fetch_vad.sh restores it)")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        names = sorted(i.name for i in self.session.get_inputs())
        if names != ["c", "h", "input"]:
            raise ValueError(f"{self.path}: not the Silero VAD sequence graph (inputs {names}, expected c, h, input)")
        self.max_frames = max_frames

    def probabilities(self, wave: np.ndarray) -> np.ndarray:
        """Speech probability of every 32 ms frame of a 16 kHz mono waveform: (T,) -> (ceil(T / 512),)."""
        wave = np.ascontiguousarray(wave, dtype=np.float32).reshape(-1)
        n_frames = -(-wave.size // _FRAME)
        if n_frames == 0:
            return np.zeros(0, dtype=np.float32)
        h = np.zeros(_STATE, dtype=np.float32)
        c = np.zeros(_STATE, dtype=np.float32)
        out = []
        context = np.zeros(_CONTEXT, dtype=np.float32)
        for first in range(0, n_frames, self.max_frames):
            count = min(self.max_frames, n_frames - first)
            frames = np.zeros((count, _FRAME), dtype=np.float32)  # (F, 512), the last one zero-padded
            chunk = wave[first * _FRAME:(first + count) * _FRAME]
            frames.reshape(-1)[:chunk.size] = chunk
            block = np.empty((count, _CONTEXT + _FRAME), dtype=np.float32)  # (F, 576)
            block[0, :_CONTEXT] = context
            block[1:, :_CONTEXT] = frames[:-1, -_CONTEXT:]
            block[:, _CONTEXT:] = frames
            context = frames[-1, -_CONTEXT:].copy()
            probs, h, c = self.session.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
            out.append(np.asarray(probs, dtype=np.float32).reshape(-1))
        return np.concatenate(out)

    def segments(self, wave: np.ndarray, sample_rate: int, options: VadOptions = VadOptions()) -> list[tuple[int, int]]:
        """Speech segments of a mono waveform at any rate, as sample positions at that rate.

        Inputs that are not at 16 kHz are resampled for the network only; the segments are
        mapped back to ``wave``'s own sample positions. The DC offset is removed before VAD
        (a constant offset is not speech, and the network was not trained on it).
        """
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            return []
        vad_in = wave - np.float32(wave.mean(dtype=np.float64))
        if sample_rate != VAD_SAMPLE_RATE:
            from models.audio import resample

            vad_in = resample(vad_in, sample_rate, VAD_SAMPLE_RATE)
        probs = self.probabilities(vad_in)
        segs = speech_segments(probs, vad_in.size, options)
        if sample_rate == VAD_SAMPLE_RATE:
            return segs
        ratio = sample_rate / VAD_SAMPLE_RATE
        mapped = [(int(round(a * ratio)), min(wave.size, int(round(b * ratio)))) for a, b in segs]
        return [(a, b) for a, b in mapped if b > a]
