"""Voice activity detection: Silero VAD on ONNX Runtime, and the speech-segment rules.

Real recordings carry leading and trailing silence, pauses, line noise and hold music; a
speaker embedding averages over all of it, so a padded utterance stops matching itself and
pure silence or noise gets a "voice". Everything the service embeds therefore goes through
VAD first and only the speech segments are embedded.

The network is Silero VAD (MIT licence, ``silero-vad==6.2.3``; its own ONNX files are kept in
``models/assets`` as shipped in the wheel, ``scripts/fetch_vad.sh`` re-extracts them and checks
their hashes). The service runs the same weights rebuilt by ``models.vad_graph`` as one graph per
rate made of large matrix multiplies over all frames of a batch of inputs (Silero's 1-D
convolutions over four-step sequences run far below the CPU's GEMM speed, and its 8 kHz mode
exists only frame by frame): 3-4x faster at 16 kHz, 10x at 8 kHz, probabilities within 3e-5
of Silero's graphs and the same segments on real speech. Each 32 ms frame is prefixed with the
previous frame's last samples and an LSTM state is carried across calls; both start from zeros
for every input, so one request never sees another's state. Importing the ``silero_vad`` package
would import torch, which the service must not, so the frame/segment logic is ours;
``tests/test_vad.py`` checks the probabilities and segments against the package's own functions.

The segment rules, the level and the bandwidth check are in ``models.vad_rules``.

Long input (**state refresh**): Silero's LSTM state, carried over a long recording, can drift until
the network scores speech as silence (reported upstream for long streams, silero-vad issue #725).
On the real-speech pool's single-speaker recordings it hit the 8 kHz network hardest: on 3.5
minutes of telephone-band words and pauses (Dutch letters and syllables) it found 0.5 s of the
91 s of reference speech, and 36 s with the refresh below. So every ``REFRESH_S`` seconds of
input the state starts afresh, having first run over the ``WARMUP_S`` seconds before that block
(a fresh state needs some audio to settle); inputs up to ``REFRESH_S`` are scored exactly as
before, which keeps the utterances of most Verify calls unchanged. Blocks of equal length run as
one batch (10 s of input costs 1.1-1.2x the time, a minute 1.05x). Chosen on the
calibration speakers' diarization sets (``training.evaluation.diarization_eval``): single-speaker
recordings DER 21.7% -> 17.8% (missed speech 14.8% -> 12.9%; telephone band 40.0% -> 32.7%), the
conversations 17.9% -> 18.6% (missed 8.4% -> 8.3%; speech is seldom interrupted long enough there
for the drift, and the change is in the clustering's confusion); 4 s blocks were worse on both.

Only numpy and onnxruntime are imported (and soxr for inputs that are not at 16 kHz).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from models.vad_rules import (  # noqa: F401  (re-exported: the VAD's public names live here too)
    _FRAME,
    VAD_SAMPLE_RATE,
    VadOptions,
    gain_for_powers,
    is_narrowband,
    keep_speech,
    level_gain,
    pad_segments,
    speech_segments,
)

__all__ = ["VadOptions", "SileroVad", "VadState", "VAD_MODELS", "speech_segments", "pad_segments", "keep_speech", "is_narrowband", "level_gain",
           "gain_for_powers",
           "DEFAULT_VAD_MODEL", "NARROWBAND_VAD_MODEL", "VAD_SAMPLE_RATE"]

_ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_VAD_MODEL = _ASSETS / "silero_vad_16k_sequence.onnx"  # Silero's own graphs, as shipped in its wheel
NARROWBAND_VAD_MODEL = _ASSETS / "silero_vad.onnx"
VAD_MODELS = {16000: _ASSETS / "silero_vad_16k_batched.onnx", 8000: _ASSETS / "silero_vad_8k_batched.onnx"}
REFRESH_S = 8.0  # the network's state is started afresh every this many seconds of input ...
WARMUP_S = 1.0  # ... having run over this much audio before the block it scores
_BATCH_FRAMES = 8192  # frames of refresh blocks per ONNX call (bounds memory on long inputs)
_NB_FRAME, _NB_CONTEXT = 256, 32  # the 8 kHz graph: 32 ms frames, 4 ms of context
_CONTEXT = 64  # samples of the previous frame the network sees before each frame
_FRAMES = {16000: (_FRAME, _CONTEXT), 8000: (_NB_FRAME, _NB_CONTEXT)}  # samples per frame, of context before it


@dataclass
class VadState:
    """What Silero carries from one call to the next for B inputs: the context samples and the LSTM state.

    Attributes:
        context: (B, context) the last samples of each input's previous frame.
        h, c: (1, B, 128) LSTM state.
    """

    context: np.ndarray
    h: np.ndarray
    c: np.ndarray

    @staticmethod
    def zeros(batch: int, rate: int) -> "VadState":
        """The state every input starts from (zeros, as Silero's own wrappers reset to)."""
        _, context = _FRAMES[rate]
        return VadState(np.zeros((batch, context), np.float32), np.zeros((1, batch, 128), np.float32),
                        np.zeros((1, batch, 128), np.float32))


class SileroVad:
    """Silero VAD on ONNX Runtime CPU sessions, one per sample rate (16 kHz, and 8 kHz for narrowband input).

    The graphs are Silero's network rebuilt as batched matrix multiplies (``models.vad_graph``;
    probabilities within 1e-6 of Silero's own graphs, 3-4x faster at 16 kHz and 10x at 8 kHz,
    which Silero ships only frame by frame). Thread-safe: every call starts from the state it is
    given (zeros by default) and keeps none on the object, so one instance serves all requests
    of a process.

    Args:
        paths: {rate: batched ONNX graph} (default: the copies built into ``models/assets``).
        max_frames: frames per ONNX call for one input (512 frames = 16.4 s at 16 kHz); longer
            inputs run in consecutive calls with the state carried, which bounds memory.
        intra_op_threads: ONNX Runtime threads per call (1: the service runs VAD on its
            decode pool, one request per thread).
        refresh_s, warmup_s: the state refresh on long inputs (see the module docstring); None:
            one state carried over the whole input, as Silero's own wrappers do.
    """

    def __init__(self, paths: dict[int, str | Path] | None = None, max_frames: int = 512, intra_op_threads: int = 1,
                 refresh_s: float | None = REFRESH_S, warmup_s: float = WARMUP_S):
        import onnxruntime as ort

        self.paths = {rate: Path(p) for rate, p in (paths or VAD_MODELS).items()}
        if sorted(self.paths) != sorted(_FRAMES):
            raise ValueError(f"paths must name a graph for each of the rates {sorted(_FRAMES)}, got {sorted(self.paths)}")
        if max_frames < 1:
            raise ValueError(f"max_frames must be >= 1, got {max_frames}")
        if refresh_s is not None and not 0 < warmup_s < refresh_s:
            raise ValueError(f"refresh_s: need 0 < warmup_s < refresh_s, got {warmup_s} and {refresh_s}")
        self.refresh_s, self.warmup_s = refresh_s, warmup_s
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.sessions = {}
        for rate, path in self.paths.items():
            if not path.is_file():
                raise FileNotFoundError(f"{path}: Silero VAD graph not found (python -m models.vad_graph rebuilds it)")
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            frame, context = _FRAMES[rate]
            shape = session.get_inputs()[0].shape
            names = sorted(i.name for i in session.get_inputs())
            if names != ["c", "h", "input"] or len(shape) != 3 or shape[-1] != frame + context:
                raise ValueError(f"{path}: not a batched Silero VAD graph for {rate} Hz (inputs {names}, input shape "
                                 f"{shape}; expected c, h, input (B, F, {frame + context}))")
            self.sessions[rate] = session
        self.max_frames = max_frames

    def run_frames(self, frames: np.ndarray, rate: int, state: VadState | None = None) -> tuple[np.ndarray, VadState]:
        """Speech probabilities of whole frames of B inputs, the state carried in and out.

        Args:
            frames: (B, F, frame) consecutive frames of each input (512 samples at 16 kHz, 256 at 8 kHz).
            rate: 16000 or 8000.
            state: where each input's previous call left off (None: a fresh start).

        Returns:
            ``(probs (B, F), state after the last frame)``.
        """
        frame, context = _FRAMES[rate]
        frames = np.asarray(frames, dtype=np.float32)
        batch, n = frames.shape[0], frames.shape[1]
        state = state or VadState.zeros(batch, rate)
        out, ctx, h, c = [], state.context, state.h, state.c
        for first in range(0, n, self.max_frames):
            part = frames[:, first:first + self.max_frames]  # (B, F', frame)
            block = np.empty(part.shape[:2] + (context + frame,), dtype=np.float32)  # (B, F', context + frame)
            block[:, 0, :context] = ctx
            block[:, 1:, :context] = part[:, :-1, -context:]
            block[:, :, context:] = part
            ctx = part[:, -1, -context:].copy()
            probs, h, c = self.sessions[rate].run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
            out.append(probs)
        if not out:
            return np.zeros((batch, 0), np.float32), state
        return np.concatenate(out, axis=1), VadState(ctx, h, c)

    def probabilities_batch(self, waves: list[np.ndarray], rate: int = VAD_SAMPLE_RATE) -> list[np.ndarray]:
        """``probabilities`` of several waveforms at ``rate`` in one batched run: [(T_i,)] -> [(ceil(T_i / frame),)].

        Shorter inputs are padded with zeros after their end; Silero is causal, so the padding
        changes none of their frames. Inputs longer than ``refresh_s`` are cut into blocks of it,
        each run from a fresh state over ``warmup_s`` of the audio before it (the module
        docstring says why); blocks of equal length run together (no padding), at most
        ``_BATCH_FRAMES`` frames per call.
        """
        frame, _ = _FRAMES[rate]
        waves = [np.asarray(w, dtype=np.float32).reshape(-1) for w in waves]
        counts = [-(-w.size // frame) for w in waves]
        if not waves:
            return []
        block, warm = self.refresh_frames(rate)
        pieces: list[np.ndarray] = []  # runs from a fresh state, each up to warm + block frames
        keep: list[tuple[int, int, int]] = []  # (input, first frame kept, frames of warm-up before it)
        for i, (w, n) in enumerate(zip(waves, counts)):
            for first in range(0, n, block or max(n, 1)):
                lead = min(first, warm)
                pieces.append(w[(first - lead) * frame:(first + (block or n)) * frame])
                keep.append((i, first, lead))
        out = [np.empty(n, np.float32) for n in counts]
        groups: dict[int, list[int]] = {}  # the blocks of split inputs by length (no padding); whole inputs together
        for j, (i, _, _) in enumerate(keep):
            groups.setdefault(-(-pieces[j].size // frame) if block and counts[i] > block else -1, []).append(j)
        for members in groups.values():
            size = max(1, _BATCH_FRAMES // max(max(-(-pieces[j].size // frame) for j in members), 1))
            for g in range(0, len(members), size):
                part = members[g:g + size]
                lengths = [-(-pieces[j].size // frame) for j in part]
                frames = np.zeros((len(part), max(lengths), frame), dtype=np.float32)  # (B, F, frame)
                for row, j in zip(frames, part):
                    row.reshape(-1)[:pieces[j].size] = pieces[j]
                probs, _ = self.run_frames(frames, rate)  # (B, F)
                for j, row, n in zip(part, probs, lengths):
                    i, first, lead = keep[j]
                    out[i][first:first + n - lead] = row[lead:n]
        return out

    def refresh_frames(self, rate: int) -> tuple[int, int]:
        """(frames per refresh block, frames of warm-up before it) at ``rate``; (0, 0): never refreshed."""
        if self.refresh_s is None:
            return 0, 0
        frame, _ = _FRAMES[rate]
        return int(round(self.refresh_s * rate / frame)), int(round(self.warmup_s * rate / frame))

    def probabilities(self, wave: np.ndarray) -> np.ndarray:
        """Speech probability of every 32 ms frame of a 16 kHz mono waveform: (T,) -> (ceil(T / 512),)."""
        return self.probabilities_batch([wave], VAD_SAMPLE_RATE)[0]

    def probabilities_8k(self, wave: np.ndarray) -> np.ndarray:
        """Speech probability of every 32 ms frame of an 8 kHz mono waveform: (T,) -> (ceil(T / 256),)."""
        return self.probabilities_batch([wave], 8000)[0]

    def segments(self, wave: np.ndarray, sample_rate: int, options: VadOptions = VadOptions()) -> list[tuple[int, int]]:
        """Speech segments of a mono waveform at any rate, as sample positions at that rate.

        The network's input is prepared from ``wave``; the segments are mapped back to ``wave``'s
        own sample positions. The DC offset is removed first (a constant offset is not speech,
        and the network was not trained on it), quiet input is raised to a working level
        (``options.normalize_level``), and narrowband input runs at 8 kHz (``options.narrowband``);
        other input is resampled to 16 kHz.
        """
        return self.analyse(wave, sample_rate, options)[0]

    def analyse(self, wave: np.ndarray, sample_rate: int,
                options: VadOptions = VadOptions()) -> tuple[list[tuple[int, int]], bool]:
        """``segments`` and whether the input was treated as narrowband."""
        many, narrow = self.analyse_many(wave, sample_rate, [options])
        return many[0], narrow

    def analyse_many(self, wave: np.ndarray, sample_rate: int,
                     options: list[VadOptions]) -> tuple[list[list[tuple[int, int]]], bool]:
        """``segments`` under each of several rule sets from one run of the network, and whether the
        input was treated as narrowband.

        The network's input depends only on ``normalize_level`` and ``narrowband``, so every entry of
        ``options`` must agree on those two (ValueError otherwise); thresholds, durations and padding
        may differ. Diarization uses this to find turns strictly and speech generously in one pass.
        """
        from models.audio import remove_dc, resample

        if not options:
            raise ValueError("options: give at least one VadOptions")
        first = options[0]
        for i, o in enumerate(options[1:], 1):
            if (o.normalize_level, o.narrowband) != (first.normalize_level, first.narrowband):
                raise ValueError(f"options[{i}]: normalize_level and narrowband must match options[0]'s "
                                 f"({first.normalize_level}, {first.narrowband}), got ({o.normalize_level}, "
                                 f"{o.narrowband})")
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            return [[] for _ in options], sample_rate <= 8000
        vad_in = remove_dc(wave)
        narrow = first.narrowband and is_narrowband(vad_in, sample_rate)
        rate = 8000 if narrow else VAD_SAMPLE_RATE
        if sample_rate != rate:
            vad_in = resample(vad_in, sample_rate, rate)
        if first.normalize_level:
            vad_in = vad_in * np.float32(level_gain(vad_in))
        if narrow:
            probs = self.probabilities_8k(vad_in)  # (ceil(T / 256),)
            many = [speech_segments(probs, vad_in.size, replace(o, threshold=o.narrowband_threshold,
                                                               neg_threshold=None), sample_rate=8000, frame=_NB_FRAME)
                    for o in options]
        else:
            probs = self.probabilities(vad_in)  # (ceil(T / 512),)
            many = [speech_segments(probs, vad_in.size, o) for o in options]
        if sample_rate == rate:
            return many, narrow
        ratio = sample_rate / rate
        out = []
        for segs in many:
            mapped = [(int(round(a * ratio)), min(wave.size, int(round(b * ratio)))) for a, b in segs]
            out.append([(a, b) for a, b in mapped if b > a])
        return out, narrow
