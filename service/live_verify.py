"""Live verification of one stream: provisional verdicts as speech accumulates, and speaker-change alerts.

What ``VerifyStream`` does with the audio of one call, without protobuf:

1. Each chunk is decoded once (``models.audio_stream.ChunkDecoder``) and run through Silero VAD
   once, its state carried from chunk to chunk (``models.vad_stream.VadStream``), on the engine's
   ``live_pool`` (threads of their own, so a chunk never waits behind other requests' decoding).
   A stream is admitted once, when it starts (``VerifyStream`` refuses a new stream while the
   model's queue is too long): its later windows are never refused for the queue's length, so
   an overload slows running calls down instead of cutting them off. The windows are *urgent*
   in the model's batcher: they go ahead of other waiting work (other requests, new streams'
   reference audio) for up to ``live_priority_ms``, so a burst of long requests does not hold up
   the interim results of calls in progress.
2. Speech before the VAD's *horizon* (where its segments are final) is *committed*. Every
   ``interim_seconds`` of new committed speech, one *window* is embedded: the last
   ``max(change_window_seconds, interim_seconds)`` of speech (the new speech and the end of
   the speech before it). That is the only embedding per step: each second of speech goes
   through the model about ``change_window_seconds / interim_seconds`` times (twice with the
   defaults), whatever the stream's length.
3. An interim result scores the mean of the windows so far (each weighted by the new speech
   it added) against the reference, with the rules of ``Verify`` (``service.decisions``):
   NOT_ENOUGH_SPEECH below the model's ``min_probe_speech``. GE2E-style models embed a long
   utterance as the mean of overlapping short windows; this is the same construction.
4. Speaker change: the last window (the *recent* speech) is scored against the *base*, the
   mean of the earlier windows that do not overlap it, on the calibrated LLR scale with both
   durations; below ``change_llr`` the recent speech no longer sounds like the speaker verified
   so far, and if it also scores below ``change_reference_llr`` against the reference (it does
   not sound like the claimed speaker either): ``speaker_changed``. The second condition keeps
   a stray window of the claimed speaker from raising an alert (on the calibration speakers it
   allowed a looser ``change_llr`` at the same false alerts: 39% of switches flagged within 3 s
   instead of 35%, at 2.0%); a switch *to* the claimed speaker is therefore not flagged. From
   the first alert on, the base stays the windows before it
   (the verified speaker), so a takeover keeps being flagged and a return clears it. (Means
   of 1 s pieces were tried as the recent speech first: averaging short embeddings pulls every
   speaker toward one mean, and different real speakers still scored LLR +2 against each other.)
5. The final result (client half-close) is decided on the windows' mean, unless that scores
   within ``final_margin`` (cosine) of the threshold: then the stream's whole speech is embedded
   once more in one pass, exactly as ``Verify`` embeds a recording, and decided on that (the one
   recomputation; not for streams with more speech than ``max_audio_seconds``). Far from the
   threshold the two embeddings give the same verdict; near it, only the whole-speech one
   matches ``Verify``. The final result also says whether any change was detected.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

import numpy as np

from models.band_match import has_low_cut, match_band, wider_than_pair
from models.vad import keep_speech
from models.vad_stream import VadStream
from service.decisions import Decision, Side, Threshold, carry_into_band, decide, speech_shortfall
from service.inputs import Speech

__all__ = ["LiveOptions", "LiveUpdate", "LiveVerification"]


@dataclass(frozen=True)
class LiveOptions:
    """How a live stream answers (server options, ``interim_seconds`` per stream)."""

    interim_seconds: float = 1.0  # new speech per interim result (and per embedded window)
    change_window_seconds: float = 2.0  # recent speech compared with the base
    change_min_base_seconds: float = 3.0  # base speech needed before a change can be flagged
    change_llr: float = 0.0  # recent vs base below this calibrated LLR: speaker changed ...
    final_margin: float = 2.0  # the final result re-embeds the whole speech when the windows' mean scores this
    #                            close (cosine) to the threshold (2.0: always)
    change_reference_llr: float = 0.0  # ... while the recent speech vs the reference is below this (50: always)


@dataclass
class LiveUpdate:
    """One result of a live stream."""

    decision: Decision
    speech_seconds: float  # net speech so far
    audio_seconds: float  # stream position (input seconds) this result covers
    final: bool
    speaker_changed: bool  # interim: the recent speech does not match the base; final: any change detected
    recent_llr: float | None  # recent speech vs base (None: not enough of either, or no calibration)
    changes: list[float] = field(default_factory=list)  # stream positions (s) where changes were flagged
    recent_reference_llr: float | None = None  # recent speech vs the reference (None when recent_llr is)


@dataclass
class _Window:
    vector: np.ndarray  # (D,) unit embedding of the window
    seconds: float  # speech in the window
    new: float  # speech it added (its weight in the stream's mean)
    end: float  # stream position (s) of its last sample
    speech_end: int  # committed speech samples up to its end


def _mean(windows: list[_Window]) -> np.ndarray:
    """(D,) mean of windows' embeddings weighted by the speech each added, L2-normalised."""
    w = np.array([x.new for x in windows])  # (W,)
    v = (w[:, None] * np.stack([x.vector for x in windows])).sum(axis=0)  # (D,)
    return (v / max(float(np.linalg.norm(v)), 1e-12)).astype(np.float32)


class LiveVerification:
    """The state of one live stream on one model.

    Args:
        engine: the server's Engine (batchers, VAD, decode pool).
        model: the model embedding the stream.
        reference: the side the stream is verified against (an enrolled speaker, an embedding or audio).
        threshold: the decision threshold (as ``Verify`` takes it).
        options: interim cadence and speaker-change rule.
        narrowband: True when the input is known to be narrowband (8 kHz or less), else None.
        deadline: ``time.monotonic()`` by which embeddings must be done, or None.
    """

    def __init__(self, engine, model, reference: Side, threshold: Threshold, options: LiveOptions,
                 narrowband: bool | None = None, deadline: float | None = None):
        self.engine, self.model, self.reference, self.threshold, self.options = engine, model, reference, threshold, options
        self.rate = model.sample_rate
        self.policy = engine.policies[model.name]
        vad = self.policy.vad
        self.vad = None if vad is None or engine.vad is None else VadStream(engine.vad, self.rate, vad, narrowband)
        self.deadline = deadline
        self.samples = 0  # model-rate samples received
        self._audio: list[np.ndarray] = []  # received audio from ``_audio_from`` on
        self._audio_from = 0
        self._committed = 0  # audio position up to which speech was committed
        self._pending: list[np.ndarray] = []  # committed speech not yet embedded
        self._pending_n = 0
        self._speech: list[np.ndarray] = []  # all committed speech, while it fits max_audio_seconds
        self._speech_n = 0  # committed speech samples
        self._recent = np.zeros(0, np.float32)  # the end of the embedded speech (a window's worth)
        self._embedded_n = 0  # speech samples embedded (the last window's end)
        self.windows: list[_Window] = []
        self._base_until: int | None = None  # windows in the base once a change was flagged
        self._changed = False
        self.changes: list[float] = []
        self.recomputed = False  # the final result embedded the whole speech once more
        self._narrowband = narrowband
        self._mapped_reference: Side | None = None  # the reference in the stream's band (``_reference``)

    # -- audio in -------------------------------------------------------------------
    async def push(self, wave: np.ndarray) -> list[LiveUpdate]:
        """Take (T,) samples at the model's rate; returns the interim results they complete (oldest first)."""
        if wave.size == 0:
            return []
        self._audio.append(wave)
        self.samples += wave.size
        if self.vad is not None:
            await asyncio.get_running_loop().run_in_executor(self.engine.live_pool, self.vad.push, wave)
        self._commit(self.vad.horizon() if self.vad is not None else self.samples)
        return await self._interims()

    def _segments(self) -> list[tuple[int, int]]:
        return self.vad.segments() if self.vad is not None else [(0, self.samples)]

    def _commit(self, horizon: int) -> None:
        """Move the speech before ``horizon`` (final segments) to the pending piece; drop audio before it."""
        if horizon <= self._committed:
            return
        audio = np.concatenate(self._audio) if len(self._audio) > 1 else self._audio[0]  # (T,) from _audio_from
        parts = [(max(a, self._committed), min(b, horizon)) for a, b in self._segments()
                 if b > self._committed and a < horizon]
        speech = keep_speech(audio, [(a - self._audio_from, b - self._audio_from) for a, b in parts])
        if speech.size:
            self._pending.append(speech)
            self._pending_n += speech.size
            self._speech_n += speech.size
            if self._speech_n / self.rate <= self.engine.config.max_audio_seconds:
                self._speech.append(speech)
            else:  # too long to embed in one pass: the final keeps the windows' mean, so none of it is kept
                self._speech = []
        self._audio = [audio[horizon - self._audio_from:]]
        self._audio_from = self._committed = horizon

    async def _interims(self, last: bool = False) -> list[LiveUpdate]:
        """Embed a window for every ``interim_seconds`` of pending speech (and, when ``last``, the rest); score each."""
        step = int(round(max(self.options.interim_seconds, self.model.card.min_audio_seconds) * self.rate))
        if self._pending_n < step and not (last and self._pending_n >= self.model.card.min_audio_seconds * self.rate):
            return []
        speech = np.concatenate(self._pending)
        cut = speech.size if last else speech.size // step * step
        rest = speech[cut:]
        self._pending, self._pending_n = ([rest], rest.size) if rest.size else ([], 0)
        news = [speech[i:i + step] for i in range(0, cut, step)]
        if last and len(news) > 1 and news[-1].size < step // 2:  # a short tail joins the step before
            news[-2:] = [np.concatenate(news[-2:])]
        span = max(int(self.options.change_window_seconds * self.rate), step)
        windows = []
        for new in news:  # each window: the new speech and the end of the speech before it
            self._recent = np.concatenate([self._recent, new])[-span:]
            self._embedded_n += new.size
            windows.append((self._recent, new.size, self._embedded_n))
        results = await asyncio.gather(*[self.engine.embed(self.model, w, self.deadline, admitted=True, urgent=True)
                                         for w, _, _ in windows])  # urgent: a caller waits for it in real time
        await self._band_reference()
        position = self._committed / self.rate
        updates = []
        for (w, added, end), r in zip(windows, results):
            self.windows.append(_Window(r.embedding, w.size / self.rate, added / self.rate, position, end))
            updates.append(self._update(final=False))
        return updates

    # -- scoring --------------------------------------------------------------------
    def _probe(self, vector: np.ndarray | None, seconds: float) -> Side:
        """The stream's side of the comparison, short of speech below the model's probe minimum."""
        speech = Speech(np.zeros(0, np.float32), seconds, self.samples / self.rate, [], self.vad is not None, 0.0)
        short = speech_shortfall("chunk", speech, self.policy.min_probe_speech)
        if short or vector is None:
            return Side("chunk", speech=speech, shortfall=short or "chunk: no speech")
        return Side("chunk", vector, self.model.scorer.stats(vector), speech_seconds=seconds)

    @property
    def band_mapped(self) -> bool:
        """Whether the reference is scored in the stream's band: embedded again, or mapped (``_band_reference``)."""
        return self._mapped_reference is not None and self._mapped_reference is not self.reference

    def _reference(self) -> Side:
        """The reference as the stream's speech is scored against it (``_band_reference``)."""
        return self._mapped_reference if self._mapped_reference is not None else self.reference

    async def _band_reference(self) -> None:
        """Decide once, when the stream is known narrowband (a call), how the reference meets its band, as ``Verify``
        does: reference audio wider than the call's band is embedded again in it (``models.band_match``: the 8 kHz
        band, with the landline's 300 Hz cut when either side lacks its fundamental); a voiceprint (an enrolled
        speaker, an embedding) not already in the band is carried into it by the model's band map
        (``models.band_map``). A wideband stream leaves the reference as it is (its windows are not embedded again)."""
        if self._mapped_reference is not None or not (self._speech or self._recent.size):
            return
        ref = self.reference
        narrow = self._narrowband or (self.vad.narrowband if self.vad is not None else False)
        if narrow is None:  # the VAD has not told yet
            return
        if not narrow or not self.engine.config.band_match or ref.vector is None:
            self._mapped_reference = ref
            return
        loop, scorer = asyncio.get_running_loop(), self.model.scorer
        speech = np.concatenate(self._speech) if self._speech else self._recent
        stream_cut = await loop.run_in_executor(self.engine.live_pool, has_low_cut, speech, self.rate)
        mapped = replace(ref)
        if ref.speech is None:
            changed = carry_into_band(scorer, mapped, stream_cut)
        else:
            ref_cut = await loop.run_in_executor(self.engine.live_pool, has_low_cut, ref.speech.wave, self.rate)
            low_cut = stream_cut or ref_cut
            changed = bool(wider_than_pair(ref.speech.narrowband, ref_cut, low_cut))
            if changed:
                wave = await loop.run_in_executor(self.engine.live_pool, match_band, ref.speech.wave, self.rate, low_cut)
                mapped.vector = (await self.engine.embed(self.model, wave, self.deadline, admitted=True)).embedding
                mapped.stats = scorer.stats(mapped.vector)
        if changed:
            self.engine.metrics.band_matched.labels(self.model.name).inc()
        self._mapped_reference = mapped if changed else ref

    def _change(self) -> tuple[float | None, float | None]:
        """LLRs of the recent window against the base and against the reference; updates ``speaker_changed``
        and the alerts."""
        o, scorer = self.options, self.model.scorer
        recent = self.windows[-1]
        if scorer.calibration is None or recent.seconds < o.change_window_seconds - 1e-6:
            return None, None
        start = recent.speech_end - int(round(recent.seconds * self.rate))  # the recent window's first sample
        limit = self._base_until if self._base_until is not None else len(self.windows) - 1
        base = [w for w in self.windows[:limit] if w.speech_end <= start]
        base_seconds = (min(start, base[-1].speech_end) if base else 0) / self.rate
        if not base or base_seconds < o.change_min_base_seconds:
            return None, None
        b = _mean(base)
        recent_stats = scorer.stats(recent.vector)
        llr = scorer.score(float(np.dot(b, recent.vector)), scorer.stats(b), recent_stats,
                           base_seconds, recent.seconds).llr
        # the reference as given, not as the verdicts meet it in a call's band (``_band_reference``):
        # live_change_reference_llr was tuned on these (BENCHMARKS.md 13c), and on the band-matched reference the
        # same threshold fired on 2 more of 200 single-speaker streams (9h)
        ref = self.reference
        ref_llr = None
        if llr is not None and ref.vector is not None:
            ref_llr = scorer.score(float(np.dot(ref.vector, recent.vector)), ref.stats, recent_stats,
                                   ref.speech_seconds, recent.seconds).llr
        changed = llr is not None and llr < o.change_llr and (ref_llr is None or ref_llr < o.change_reference_llr)
        if changed and not self._changed:
            self.changes.append(recent.end)
            if self._base_until is None:
                self._base_until = len(self.windows) - 1
        self._changed = changed
        return llr, ref_llr

    def _update(self, final: bool, vector: np.ndarray | None = None) -> LiveUpdate:
        llr, ref_llr = (None, None) if final else self._change()
        seconds = (self._speech_n if final else self._embedded_n) / self.rate
        if vector is None and self.windows:
            vector = _mean(self.windows)
        decision = decide(self.model.scorer, self.threshold, self._reference(), self._probe(vector, seconds),
                          self.model.card.threshold)
        return LiveUpdate(decision, seconds, (self.samples if final else self._committed) / self.rate, final,
                          bool(self.changes) if final else self._changed, llr, list(self.changes), ref_llr)

    async def finish(self) -> tuple[list[LiveUpdate], LiveUpdate]:
        """The client half-closed: flush the VAD, the last interim(s), then the final result."""
        if self.vad is not None:
            await asyncio.get_running_loop().run_in_executor(self.engine.live_pool, self.vad.finish)
        if self._audio:
            self._commit(self.samples)
        updates = await self._interims(last=True)
        await self._band_reference()
        final = self._update(final=True)  # on the windows' mean
        scores = final.decision.scores
        near = scores is not None and abs(scores.cosine - final.decision.cosine_threshold) < self.options.final_margin
        if near and self._speech_n / self.rate <= self.engine.config.max_audio_seconds:
            speech = np.concatenate(self._speech)  # close to the threshold: decide on the whole speech, as Verify does
            if speech.size >= self.model.card.min_audio_seconds * self.rate:
                vector = (await self.engine.embed(self.model, speech, self.deadline, admitted=True)).embedding
                final = self._update(final=True, vector=vector)
                self.recomputed = True
        return updates, final
