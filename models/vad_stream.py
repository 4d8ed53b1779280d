"""Voice activity detection over a live stream: Silero's state carried from chunk to chunk.

A live call arrives in chunks of a few hundred milliseconds. ``VadStream`` runs every new
32 ms frame through the network once, carrying the LSTM state and the 64-sample context
across chunks and starting it afresh where ``SileroVad.probabilities`` does (``run_refreshing``:
a second state warms up over the last ``warmup_s`` before each refresh; the same probabilities
on the same frames, however the audio is chunked: tested), and
``SegmentTracker`` turns the probabilities into segments one frame at a time with the rules
of ``models.vad_rules.speech_segments`` (the same segments on the same probabilities: tested).

What a stream cannot know in advance, it estimates from the audio so far:

* **Bandwidth**: decided once, early (before that, audio waits): wideband as soon as the
  first ``decide_seconds`` or more show energy above 4 kHz, narrowband after three times that
  without; input at 8 kHz or less is narrowband from the start. (Deciding on the first second
  alone called 5% of wideband real-speech files narrowband: silence and vowel onsets.) Audio
  also waits until it shows speech-like dynamics (see ``_release``), for the level estimate.
* **DC offset and level**: the whole-file mean and loudness ``SileroVad.analyse`` uses are
  replaced by running estimates, refreshed as the audio grows by 10%; each frame is scaled with
  the estimate of its time. On the reference utterances 95% of the frames' probabilities stay
  within 0.02 of the whole-file ones, and the segments differ on under 2% of the speech
  (tests/test_vad_stream.py; on the real-speech pool, clean and telephone band: median 0%,
  95th percentile 2.5%).

``horizon`` says up to where the segments are final: a caller may embed the speech before it
and never see it change.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.vad import (_FRAME, _NB_FRAME, VAD_SAMPLE_RATE, SileroVad, VadOptions, VadState, gain_for_powers,
                        is_narrowband, pad_segments)

__all__ = ["RefreshingState", "SegmentTracker", "VadStream", "run_refreshing"]

_DECIDE_LEVEL_DB = -60.0  # held audio quieter than this (95th percentile frame power) cannot tell its bandwidth


class SegmentTracker:
    """``speech_segments`` one frame at a time.

    Args:
        options: segment rules.
        sample_rate: the rate sample positions refer to.
        frame: samples per frame.
    """

    def __init__(self, options: VadOptions, sample_rate: int = VAD_SAMPLE_RATE, frame: int = _FRAME):
        self.frame = frame
        self.min_speech = sample_rate * options.min_speech_ms / 1000.0
        self.min_silence = sample_rate * options.min_silence_ms / 1000.0
        self.pad = sample_rate * options.speech_pad_ms / 1000.0
        self.high, self.low = options.threshold, options.low_threshold
        self.frames = 0  # frames seen
        self.start: int | None = None  # raw start of the open segment
        self.quiet_since = 0  # first sample of the quiet stretch inside the open segment (0: none)
        self.pending: list[list[int]] = []  # closed raw segments whose padding is not final yet
        self.final: list[tuple[int, int]] = []  # padded segments that can no longer change
        self.last_raw_end: int | None = None  # raw end of the last segment in ``final``

    @property
    def processed(self) -> int:
        """Samples covered by the frames seen."""
        return self.frames * self.frame

    def push(self, probs: np.ndarray) -> None:
        """Take the next frames' probabilities, (F,)."""
        for p in np.asarray(probs, dtype=np.float32).tolist():
            pos = self.frames * self.frame
            self.frames += 1
            if p >= self.high:
                self.quiet_since = 0
                if self.start is None:
                    self.start = pos
            elif self.start is not None and p < self.low:
                if not self.quiet_since:
                    self.quiet_since = pos
                if pos - self.quiet_since >= self.min_silence:
                    if self.quiet_since - self.start > self.min_speech:
                        self.pending.append([self.start, self.quiet_since])
                    self.start, self.quiet_since = None, 0
        self._finalize()

    def _finalize(self) -> None:
        """Move pending segments whose padded ends can no longer change to ``final``."""
        while self.pending:
            end = self.pending[0][1]
            nxt = self.pending[1][0] if len(self.pending) > 1 else self.start
            if nxt is None:
                if self.processed < end + 2 * self.pad:  # a segment may still start within two pads
                    return
            elif len(self.pending) == 1 and nxt - end < 2 * self.pad:
                return  # the open segment may still be dropped (too short): the gap is not known
            head = [list(s) for s in self.pending[:2]]
            if len(head) == 1 and nxt is not None:
                head.append([nxt, nxt + 1])
            padded = pad_segments(head, 1 << 62, self.pad, self.last_raw_end)
            self.final.append(padded[0])
            self.last_raw_end = end
            self.pending.pop(0)

    def segments(self, n_samples: int | None = None) -> list[tuple[int, int]]:
        """The segments ``speech_segments`` gives on the probabilities so far and ``n_samples`` of audio.

        ``n_samples`` defaults to the samples the frames cover (an interim view); pass the
        stream's total length at its end.
        """
        n = self.processed if n_samples is None else n_samples
        raw = [list(s) for s in self.pending]
        if self.start is not None and n - self.start > self.min_speech:
            raw.append([self.start, n])
        return self.final + pad_segments(raw, n, self.pad, self.last_raw_end)

    def horizon(self) -> int:
        """A sample position before which ``segments`` will not change as more frames come."""
        if self.pending:
            return self.pending[0][1]  # its end (padding or a gap split) is still open
        if self.start is not None:
            end = self.quiet_since or self.processed  # it ends here at the earliest
            if end - self.start > self.min_speech:
                return end  # kept whatever follows, and final up to where it may close
            return max(0, self.start - int(self.pad))  # may still be dropped; its start pad is not certain
        return max(0, self.processed - int(self.pad))


@dataclass
class RefreshingState:
    """A stream's network state under ``SileroVad``'s refresh rule (see ``SileroVad.probabilities_batch``).

    Attributes:
        main: the state scoring the current block.
        warm: the fresh state warming up over the last frames before the next block (None outside them).
        frame: frames run so far.
    """

    main: VadState
    warm: VadState | None
    frame: int


def run_refreshing(vad: SileroVad, frames: np.ndarray, rate: int,
                   state: RefreshingState | None) -> tuple[np.ndarray, RefreshingState]:
    """Probabilities of a stream's next frames, (F, frame) -> (F,), equal to what ``vad.probabilities_batch``
    gives the same frames of the whole input: every ``block`` frames the state starts afresh, having run
    over the ``warm`` frames before the block (those frames run through both states, as one batch of two)."""
    block, warm = vad.refresh_frames(rate)
    state = state or RefreshingState(VadState.zeros(1, rate), None, 0)
    main, fresh, t = state.main, state.warm, state.frame
    out: list[np.ndarray] = []
    done = 0
    while done < len(frames):
        if block and t and t % block == 0:
            main, fresh = fresh, None  # the warmed state takes over at the block's first frame
        if block and (t + warm) % block == 0 and t + warm > 0:
            fresh = VadState.zeros(1, rate)
        stop = len(frames)
        if block:  # run up to the next event: a warm-up starts or a block starts
            boundary = (t // block + 1) * block
            warm_from = boundary - warm if boundary - warm > t else boundary + block - warm
            stop = min(stop, done + min(boundary, warm_from) - t)
        part = frames[done:stop]  # (F', frame)
        if fresh is None:
            probs, main = vad.run_frames(part[None], rate, main)
        else:
            both = VadState(*(np.concatenate([a, b], axis=axis) for a, b, axis in
                              ((main.context, fresh.context, 0), (main.h, fresh.h, 1), (main.c, fresh.c, 1))))
            probs, after = vad.run_frames(np.stack([part, part]), rate, both)
            main = VadState(after.context[:1], after.h[:, :1], after.c[:, :1])
            fresh = VadState(after.context[1:], after.h[:, 1:], after.c[:, 1:])
        out.append(probs[0])
        t += stop - done
        done = stop
    probs = np.concatenate(out) if out else np.zeros(0, np.float32)
    return probs, RefreshingState(main, fresh, t)


class VadStream:
    """Silero VAD over audio that arrives in chunks.

    Args:
        vad: the shared ``SileroVad`` (its sessions are stateless; the state lives here).
        sample_rate: the rate of the audio pushed (the model's).
        options: segment rules.
        narrowband: the bandwidth when known up front (input at 8 kHz or less); None decides
            it on the first ``decide_seconds``.
        decide_seconds: audio held back before the bandwidth is decided.
    """

    def __init__(self, vad: SileroVad, sample_rate: int, options: VadOptions = VadOptions(),
                 narrowband: bool | None = None, decide_seconds: float = 1.0):
        import soxr

        self.vad, self.sample_rate, self.options = vad, sample_rate, options
        self.narrowband = narrowband if options.narrowband else False
        self._decide = int(decide_seconds * sample_rate)
        self._soxr = soxr
        self._held: list[np.ndarray] = []  # audio waiting for the bandwidth decision
        self._held_n = 0
        self.samples = 0  # audio pushed, at ``sample_rate``
        self._dc_sum, self._dc_n = 0.0, 0
        self._powers: list[np.ndarray] = []  # (F,) frame powers of the network's input, before gain
        self._power_n, self._gain_at, self.gain = 0, 0, 1.0
        self._resampler = None
        self._tail = np.zeros(0, np.float32)  # network input not yet a whole frame
        self.rate = VAD_SAMPLE_RATE
        self._state: RefreshingState | None = None  # the network's context and LSTM state(s)
        self.tracker: SegmentTracker | None = None
        self.probs: list[np.ndarray] = []
        self.finished = False
        self._gain_tail = np.zeros(0, np.float32)  # network input not yet a whole 512-sample level frame

    def _start(self) -> None:
        """Set up the network path once the bandwidth is known."""
        self.rate = 8000 if self.narrowband else VAD_SAMPLE_RATE
        if self.sample_rate != self.rate:
            self._resampler = self._soxr.ResampleStream(self.sample_rate, self.rate, 1, dtype="float32", quality="HQ")
        self._state = None
        if self.narrowband:
            opts = VadOptions(**{**self.options.__dict__, "threshold": self.options.narrowband_threshold,
                                 "neg_threshold": None})
            self.tracker = SegmentTracker(opts, 8000, _NB_FRAME)
        else:
            self.tracker = SegmentTracker(self.options)

    def push(self, wave: np.ndarray) -> None:
        """Take the next (T,) samples at ``sample_rate`` and run every whole frame they complete."""
        if self.finished:
            raise RuntimeError("push after finish")
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            return
        self.samples += wave.size
        self._dc_sum += float(wave.sum(dtype=np.float64))
        self._dc_n += wave.size
        if self.tracker is None:
            self._held.append(wave)
            self._held_n += wave.size
            if self._held_n >= self._decide:
                self._release(final=False)
            return
        self._feed(wave)

    def _release(self, final: bool) -> None:
        """Start the network on the held audio once its bandwidth and level can be told.

        Bandwidth: wideband as soon as audio with signal in it (loudest frames above -60 dBFS)
        shows energy above 4 kHz; narrowband only after ``3 x decide_seconds`` without it (the
        first second of a wideband recording often holds nothing above 4 kHz: silence, a vowel
        onset). Level: the network's input gain is estimated on the audio so far, so the audio
        waits until it holds speech-like dynamics (its loudest frames 20 dB above its quietest)
        or ``3 x decide_seconds`` passed: a gain estimated on leading silence alone would raise
        line noise by up to 30 dB (on telephone-band real speech that changed the net speech of
        one utterance in ten by 0.3 s or more).
        """
        held = np.concatenate(self._held) if self._held else np.zeros(0, np.float32)
        self._held = [held]
        centred = held - np.float32(self._dc_sum / max(self._dc_n, 1))
        power = np.mean(np.square(centred[:centred.size // _FRAME * _FRAME].reshape(-1, _FRAME), dtype=np.float64), axis=1)
        loud = power.size > 0 and 10 * np.log10(np.percentile(power, 95) + 1e-20) >= _DECIDE_LEVEL_DB
        dynamic = power.size > 0 and np.percentile(power, 95) >= 100 * max(float(np.percentile(power, 10)), 1e-14)
        narrow = self.narrowband if self.narrowband is not None else bool(is_narrowband(centred, self.sample_rate))
        told = self.narrowband is not None or (loud and not narrow)
        if not final and held.size < 3 * self._decide and not (told and loud and dynamic):
            return
        self.narrowband = narrow
        self._held, self._held_n = [], 0
        self._start()
        self._feed(held)

    def _feed(self, wave: np.ndarray, last: bool = False) -> None:
        x = wave - np.float32(self._dc_sum / max(self._dc_n, 1))
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x, last=last)
        x = np.concatenate([self._tail, x]) if self._tail.size else x
        frame = _NB_FRAME if self.narrowband else _FRAME
        whole = x.size // frame * frame
        if last and x.size > whole:  # the final partial frame, zero-padded as the whole-file VAD pads it
            x = np.concatenate([x, np.zeros(frame - (x.size - whole), np.float32)])
            whole = x.size
        self._tail = np.ascontiguousarray(x[whole:])
        frames = x[:whole].reshape(-1, frame)  # (F, frame)
        if frames.shape[0] == 0:
            return
        self._update_gain(x[:whole])
        if self.options.normalize_level:
            frames = frames * np.float32(self.gain)
        probs, self._state = run_refreshing(self.vad, frames, self.rate, self._state)  # (F,)
        self.probs.append(probs)
        self.tracker.push(probs)

    def _update_gain(self, x: np.ndarray) -> None:
        """Refresh the running level estimate (``models.vad_rules.level_gain`` on the network input so far) as it grows by 10%."""
        x = np.concatenate([self._gain_tail, x]) if self._gain_tail.size else x
        whole = x.size // _FRAME * _FRAME  # level_gain's 512-sample frames, whatever the rate
        self._gain_tail = x[whole:].copy()
        if whole:
            self._powers.append(np.mean(np.square(x[:whole].reshape(-1, _FRAME), dtype=np.float64), axis=1))  # (F,)
            self._power_n += whole // _FRAME
        if not self._powers or (self._gain_at and self._power_n < 1.1 * self._gain_at):
            return
        allp = np.concatenate(self._powers)
        self._powers, self._gain_at = [allp], self._power_n
        self.gain = gain_for_powers(allp)

    def finish(self) -> None:
        """The stream ended: decide the bandwidth if still undecided and run the last, partial frame."""
        if self.finished:
            return
        if self.tracker is None:
            self._release(final=True)
        self._feed(np.zeros(0, np.float32), last=True)
        self.finished = True

    def _to_input(self, pos: int) -> int:
        return int(round(pos * self.sample_rate / self.rate))

    def segments(self) -> list[tuple[int, int]]:
        """Speech segments so far, as sample positions of the pushed audio (final after ``finish``)."""
        if self.tracker is None:
            return []
        n = self._vad_samples() if self.finished else None
        out = [(self._to_input(a), min(self.samples, self._to_input(b))) for a, b in self.tracker.segments(n)]
        return [(a, b) for a, b in out if b > a]

    def _vad_samples(self) -> int:
        """The network input's length at the stream's end (the whole-file VAD's ``n_samples``)."""
        if self.rate == self.sample_rate:
            return self.samples
        return int(round(self.samples * self.rate / self.sample_rate))

    def horizon(self) -> int:
        """A position of the pushed audio before which ``segments`` will not change (all of it after ``finish``)."""
        if self.finished:
            return self.samples
        if self.tracker is None:
            return 0
        return min(self.samples, self._to_input(self.tracker.horizon()))
