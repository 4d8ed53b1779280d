"""Live verification: ``VerifyStream`` (a mixin of ``SpeakerServicer``).

The first message carries the config (claimed speaker, threshold, interim cadence, audio
format), later ones audio chunks; results go back on the same stream as speech accumulates
and once more, final, after the client half-closes. The work per chunk and the scoring rules
are ``service.live_verify``'s; this module checks the messages and limits, resolves the
reference exactly as ``Verify`` does (tenancy, scoped tokens, enrollment readiness), and
turns results into protobuf.
"""

from __future__ import annotations

import asyncio

from models.audio import check_pcm_format
from models.audio_stream import ChunkDecoder
from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.convert import SCALE_PB, VERDICT_PB, pcm_encoding
from service.errors import DeadlineExceeded, InvalidArgument
from service.live_verify import LiveOptions, LiveUpdate, LiveVerification
from service.rpc import call_deadline, send
from service.rpc import rpc as _rpc
from service.store import validate_collection

__all__ = ["LiveRpcs"]

_END = object()


class LiveRpcs:
    """Mixin of ``SpeakerServicer`` (uses its ``engine``, ``_allow``, ``_side``, ``_threshold``, ``_collection_model``)."""

    async def _next(self, iterator, index: int):
        """The stream's next message, ``_END`` after the half-close; DEADLINE_EXCEEDED when the client goes quiet."""
        timeout = self.engine.config.stream_idle_timeout_seconds
        try:
            return await asyncio.wait_for(iterator.__anext__(), timeout)
        except StopAsyncIteration:
            return _END
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"chunk: no message for {timeout:g} s after message {index} "
                                   "(stream_idle_timeout_seconds); send audio as it is captured") from None

    async def _live_setup(self, config: pb.VerifyStreamConfig, context) -> tuple[LiveVerification, ChunkDecoder]:
        """Check the config; resolve the model, threshold and reference as Verify does."""
        cfg = self.engine.config
        if not config.HasField("reference"):
            raise InvalidArgument("config.reference", "is missing: set an enrolled speaker, an embedding or audio")
        ref = config.reference
        if ref.WhichOneof("source") == "speaker":
            coll = validate_collection(ref.speaker.collection, "config.reference.speaker.collection")
            self._allow(context, "read", coll)
            await self.engine.store_call(self.engine.store.collection_model, coll)  # NOT_FOUND before any work
            model = await self._collection_model(config.model, coll, "config.model")
        else:
            model = self.engine.model(config.model, "config.model")
        try:
            threshold = self._threshold(model, config)
        except InvalidArgument as e:
            raise InvalidArgument(f"config.{e.field}", e.message.partition(": ")[2]) from None
        interim = config.interim_seconds or 1.0
        if not 0.5 <= interim <= 60:
            raise InvalidArgument("config.interim_seconds", f"must be in 0.5..60 s (0: 1 s), got {config.interim_seconds!r}")
        pcm = None
        if config.HasField("pcm"):
            fmt = config.pcm
            check_pcm_format(fmt.sample_rate, fmt.channels or 1, "config.pcm")
            pcm = (pcm_encoding(fmt.encoding, "config.pcm.encoding"), fmt.sample_rate, fmt.channels or 1)
        deadline = call_deadline(context)
        batcher = self.engine.batchers.get(model.name)
        if batcher is not None:
            batcher.admit(deadline)  # a new stream waits for no queue: refused now (RESOURCE_EXHAUSTED) when it is long
        reference, _ = await self._side(model, ref, "config.reference", "VerifyStream", context)
        options = LiveOptions(interim_seconds=interim, change_window_seconds=cfg.live_change_window_seconds,
                              change_min_base_seconds=cfg.live_change_min_base_seconds, change_llr=cfg.live_change_llr,
                              change_reference_llr=cfg.live_change_reference_llr, final_margin=cfg.live_final_margin)
        narrow = True if pcm is not None and pcm[1] <= 8000 else None
        live = LiveVerification(self.engine, model, reference, threshold, options, narrow, deadline)
        return live, ChunkDecoder("chunk", model.sample_rate, pcm, cfg.max_stream_audio_seconds)

    def _live_pb(self, live: LiveVerification, u: LiveUpdate) -> pb.VerifyStreamResponse:
        d, s = u.decision, u.decision.scores
        return pb.VerifyStreamResponse(
            speech_seconds=u.speech_seconds, audio_seconds=u.audio_seconds, score=s.cosine if s else 0.0,
            normalized_score=s.normalized if s else None, llr=s.llr if s else None, verdict=VERDICT_PB[d.verdict],
            final=u.final, speaker_changed=u.speaker_changed, recent_llr=u.recent_llr,
            recent_reference_llr=u.recent_reference_llr, change_seconds=u.changes,
            threshold=d.cosine_threshold, decision_scale=SCALE_PB[d.threshold.scale],
            decision_threshold=d.threshold.value, reason=d.reason, model=live.model.name,
            narrowband=bool(live.vad is not None and live.vad.narrowband),
            band_matched=live.band_mapped)

    @_rpc
    async def VerifyStream(self, request_iterator, context) -> None:
        """Live verification of one stream (see the proto)."""
        self._allow(context, "read")
        cfg = self.engine.config
        iterator = request_iterator.__aiter__()
        first = await self._next(iterator, 0)
        if first is _END:
            raise InvalidArgument("config", "the stream carried no messages")
        if first.WhichOneof("part") != "config":
            raise InvalidArgument("config", "the first message must carry config")
        live, decoder = await self._live_setup(first.config, context)
        loop = asyncio.get_running_loop()
        gauge = self.engine.metrics.live_streams.labels(live.model.name)
        gauge.inc()
        self.engine.metrics.live_speaker_changes.labels(live.model.name)  # exported from the first stream on, at 0
        changes = 0
        try:
            size, index, limit = 0, 1, cfg.max_stream_mb * 1024 * 1024
            while (msg := await self._next(iterator, index)) is not _END:
                part = msg.WhichOneof("part")
                if part == "config":
                    raise InvalidArgument("config", f"sent again in message {index}; only the first message carries it")
                if part != "chunk":
                    raise InvalidArgument("part", f"message {index} is empty: set chunk")
                if not msg.chunk:
                    raise InvalidArgument("chunk", f"message {index} is an empty chunk")
                index += 1
                if index > cfg.max_stream_messages:
                    raise InvalidArgument("chunk", f"the stream exceeds {cfg.max_stream_messages:,} messages "
                                                   "(max_stream_messages)")
                size += len(msg.chunk)
                if size > limit:
                    raise InvalidArgument("chunk", f"the stream exceeds {limit:,} bytes (max_stream_mb={cfg.max_stream_mb})")
                wave = await loop.run_in_executor(self.engine.live_pool, decoder.feed, msg.chunk)
                for u in await live.push(wave):
                    await send(context, self._live_pb(live, u))
                changes = self._count_changes(live, changes)
            tail = decoder.finish()
            updates = await live.push(tail)
            more, final = await live.finish()
            for u in updates + more:
                await send(context, self._live_pb(live, u))
            self._count_changes(live, changes)
            self._observe_decision(live.model, "VerifyStream", final.decision)
            await send(context, self._live_pb(live, final))
        finally:
            gauge.dec()

    def _count_changes(self, live: LiveVerification, counted: int) -> int:
        if len(live.changes) > counted:
            self.engine.metrics.live_speaker_changes.labels(live.model.name).inc(len(live.changes) - counted)
        return len(live.changes)
