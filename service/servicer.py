"""gRPC adapter: protobuf in -> validated numpy -> Engine -> protobuf out.

Each RPC is wrapped by ``_rpc``, which times it, maps exceptions to status codes through
``service.errors.status_of`` (one table) and counts the outcome. Nothing here runs a model
or touches the disk on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import grpc
import numpy as np

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from service.engine import AudioInput, Engine
from service.errors import FailedPrecondition, InvalidArgument, Unavailable, status_of
from service.index import SpeakerRecord, validate_collection, validate_speaker_id

__all__ = ["SpeakerServicer"]

log = logging.getLogger("spkserve.servicer")

_ENCODINGS = {pb.PCM_S16LE: "PCM_S16LE", pb.PCM_S32LE: "PCM_S32LE", pb.PCM_F32LE: "PCM_F32LE"}
_MAX_ENROLL_ITEMS = 64
_MAX_COMPARE_SCORES = 1_000_000


def _rpc(method):
    """Decorator: status mapping, latency and request counting for one RPC."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: "SpeakerServicer", request: Any, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if not self.ready:
                raise Unavailable("server is starting or shutting down")
            return await method(self, request, context)
        except asyncio.CancelledError:  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status code
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            await context.abort(code, message)
        finally:
            m = self.engine.metrics
            m.requests.labels(name, code.name).inc()
            m.latency.labels(name).observe(time.perf_counter() - t0)

    return wrapper


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _audio_input(audio: pb.Audio, field: str) -> AudioInput:
    kind = audio.WhichOneof("source")
    if kind == "encoded":
        return AudioInput(audio.encoded, field)
    if kind == "pcm":
        fmt = audio.pcm.format
        if fmt.encoding not in _ENCODINGS:
            raise InvalidArgument(f"{field}.pcm.format.encoding", f"must be one of {sorted(_ENCODINGS.values())}, got {fmt.encoding}")
        return AudioInput(audio.pcm.data, field, _ENCODINGS[fmt.encoding], fmt.sample_rate, fmt.channels or 1)
    raise InvalidArgument(field, "is empty: set audio.encoded or audio.pcm")


def _ms(seconds: float) -> float:
    return seconds * 1000.0


def _speaker_pb(collection: str, model: str, rec: SpeakerRecord, voiceprint: bool = False) -> pb.Speaker:
    return pb.Speaker(
        collection=collection, speaker_id=rec.speaker_id, utterance_count=rec.count, metadata=rec.metadata,
        model=model, created_unix_ms=rec.created_ms, updated_unix_ms=rec.updated_ms,
        voiceprint=rec.voiceprint.tolist() if voiceprint else [],
    )


class SpeakerServicer(pb_grpc.SpeakerServiceServicer):
    """Implements spkserve.v1.SpeakerService on an Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ready = False

    # -- helpers ----------------------------------------------------------------------
    async def _embed_audio(self, model, audio: AudioInput, context) -> tuple[np.ndarray, float, pb.Timings]:
        """Decode and embed one utterance; returns (unit embedding, seconds, timings)."""
        t0 = time.perf_counter()
        decoded = await self.engine.decode(model, audio)
        res = await self.engine.embed(model, decoded.wave, _deadline(context))
        timings = pb.Timings(decode_ms=_ms(decoded.decode_s), queue_ms=_ms(res.queue_s),
                             inference_ms=_ms(res.inference_s), total_ms=_ms(time.perf_counter() - t0))
        return res.embedding, decoded.seconds, timings

    async def _probe(self, model, probe: pb.Probe, field: str, context, allow_speaker: bool = True) -> tuple[np.ndarray, pb.Timings]:
        """A probe as a unit embedding of ``model``."""
        kind = probe.WhichOneof("source")
        if kind == "audio":
            emb, _, timings = await self._embed_audio(model, _audio_input(probe.audio, f"{field}.audio"), context)
            return emb, timings
        if kind == "embedding":
            return self.engine.unit_embedding(probe.embedding.values, model.dim, f"{field}.embedding.values"), pb.Timings()
        if kind == "speaker" and allow_speaker:
            coll = validate_collection(probe.speaker.collection, f"{field}.speaker.collection")
            spk = validate_speaker_id(probe.speaker.speaker_id, f"{field}.speaker.speaker_id")
            store = self.engine.store
            bound = await self.engine.store_call(store.collection_model, coll)
            if bound != model.name:
                raise FailedPrecondition(f"{field}.speaker: collection {coll!r} holds voiceprints of model {bound!r}, not {model.name!r}")
            rec = await self.engine.store_call(store.get, coll, spk)
            return rec.voiceprint, pb.Timings()
        allowed = "audio, embedding or speaker" if allow_speaker else "audio or embedding"
        raise InvalidArgument(field, f"is empty: set one of {allowed}")

    # -- RPCs -------------------------------------------------------------------------
    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        model = self.engine.model(request.model)
        if not request.HasField("audio"):
            raise InvalidArgument("audio", "is missing")
        emb, seconds, timings = await self._embed_audio(model, _audio_input(request.audio, "audio"), context)
        return pb.EmbedResponse(embedding=emb.tolist(), model=model.name, model_version=model.card.version,
                                speech_seconds=seconds, timings=timings)

    @_rpc
    async def EmbedStream(self, request_iterator, context) -> pb.EmbedResponse:
        """Client-streamed audio: config first, then chunks (see the proto)."""
        limit = self.engine.config.max_stream_mb * 1024 * 1024
        config, chunks, size, index = None, [], 0, 0
        async for msg in request_iterator:
            part = msg.WhichOneof("part")
            if index == 0 and part != "config":
                raise InvalidArgument("config", "the first message must carry config")
            if index > 0 and part == "config":
                raise InvalidArgument("config", f"sent again in message {index}; only the first message carries it")
            if part == "config":
                config = msg.config
            elif part == "chunk":
                size += len(msg.chunk)
                if size > limit:
                    raise InvalidArgument("chunk", f"stream exceeds max_stream_mb={self.engine.config.max_stream_mb} MiB")
                chunks.append(msg.chunk)
            else:
                raise InvalidArgument("part", f"message {index} is empty: set config or chunk")
            index += 1
        if config is None:
            raise InvalidArgument("config", "the stream carried no messages")
        model = self.engine.model(config.model, "config.model")
        data = b"".join(chunks)
        if config.HasField("pcm"):
            fmt = config.pcm
            if fmt.encoding not in _ENCODINGS:
                raise InvalidArgument("config.pcm.encoding", f"must be one of {sorted(_ENCODINGS.values())}, got {fmt.encoding}")
            audio = AudioInput(data, "chunk", _ENCODINGS[fmt.encoding], fmt.sample_rate, fmt.channels or 1)
        else:
            audio = AudioInput(data, "chunk")
        emb, seconds, timings = await self._embed_audio(model, audio, context)
        return pb.EmbedResponse(embedding=emb.tolist(), model=model.name, model_version=model.card.version,
                                speech_seconds=seconds, timings=timings)

    @_rpc
    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        t0 = time.perf_counter()
        model = self.engine.model(request.model)
        if request.HasField("threshold") and not -1.0 <= request.threshold <= 1.0:
            raise InvalidArgument("threshold", f"must be in [-1, 1], got {request.threshold}")
        (a, ta), (b, tb) = await asyncio.gather(self._probe(model, request.a, "a", context),
                                                self._probe(model, request.b, "b", context))
        score = float(np.dot(a, b))
        threshold = request.threshold if request.HasField("threshold") else model.card.threshold
        timings = pb.Timings(decode_ms=max(ta.decode_ms, tb.decode_ms), queue_ms=max(ta.queue_ms, tb.queue_ms),
                             inference_ms=max(ta.inference_ms, tb.inference_ms), total_ms=_ms(time.perf_counter() - t0))
        return pb.VerifyResponse(score=score, decision=score >= threshold, threshold=threshold, model=model.name,
                                 timings=timings)

    @_rpc
    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        if not request.a:
            raise InvalidArgument("a", "is empty")
        if not request.b:
            raise InvalidArgument("b", "is empty")
        if len(request.a) * len(request.b) > _MAX_COMPARE_SCORES:
            raise InvalidArgument("a", f"{len(request.a)} x {len(request.b)} scores exceed the limit of {_MAX_COMPARE_SCORES:,}")
        dim = len(request.a[0].values)
        a = np.stack([self.engine.unit_embedding(e.values, dim, f"a[{i}].values") for i, e in enumerate(request.a)])  # (N, D)
        b = np.stack([self.engine.unit_embedding(e.values, dim, f"b[{i}].values") for i, e in enumerate(request.b)])  # (M, D)
        scores = a @ b.T  # (N, M)
        return pb.CompareResponse(rows=scores.shape[0], cols=scores.shape[1], scores=scores.ravel().tolist())

    @_rpc
    async def Enroll(self, request: pb.EnrollRequest, context) -> pb.EnrollResponse:
        t0 = time.perf_counter()
        model = self.engine.model(request.model)
        coll = validate_collection(request.collection)
        spk = validate_speaker_id(request.speaker_id)
        n = len(request.audio) + len(request.embeddings)
        if n == 0:
            raise InvalidArgument("audio", "no utterances: give audio and/or embeddings")
        if n > _MAX_ENROLL_ITEMS:
            raise InvalidArgument("audio", f"{n} utterances in one request, at most {_MAX_ENROLL_ITEMS}")
        # validate and embed everything before anything is written: a bad item changes nothing
        given = [self.engine.unit_embedding(e.values, model.dim, f"embeddings[{i}].values")
                 for i, e in enumerate(request.embeddings)]
        embedded = await asyncio.gather(*[
            self._embed_audio(model, _audio_input(a, f"audio[{i}]"), context) for i, a in enumerate(request.audio)])
        vectors = np.stack([e for e, _, _ in embedded] + given)  # (N, D)
        store = self.engine.store
        rec, created = await self.engine.store_call(store.enroll, coll, model.name, spk, vectors, dict(request.metadata))
        await self.engine.report_collection(coll)
        timings = pb.Timings(
            decode_ms=max((t.decode_ms for _, _, t in embedded), default=0.0),
            queue_ms=max((t.queue_ms for _, _, t in embedded), default=0.0),
            inference_ms=max((t.inference_ms for _, _, t in embedded), default=0.0),
            total_ms=_ms(time.perf_counter() - t0))
        return pb.EnrollResponse(speaker=_speaker_pb(coll, model.name, rec), created=created, timings=timings)

    @_rpc
    async def Identify(self, request: pb.IdentifyRequest, context) -> pb.IdentifyResponse:
        t0 = time.perf_counter()
        model = self.engine.model(request.model)
        coll = validate_collection(request.collection)
        if request.top_k < 0 or request.top_k > 1000:
            raise InvalidArgument("top_k", f"must be in 0..1000, got {request.top_k}")
        if request.HasField("threshold") and not -1.0 <= request.threshold <= 1.0:
            raise InvalidArgument("threshold", f"must be in [-1, 1], got {request.threshold}")
        k = request.top_k or 5
        store = self.engine.store
        await self.engine.store_call(store.collection_model, coll)  # NotFound before any inference
        query, timings = await self._probe(model, request.probe, "probe", context, allow_speaker=False)
        hits = await self.engine.store_call(store.search, coll, model.name, query, k)
        if request.HasField("min_score"):
            hits = [h for h in hits if h[1] >= request.min_score]
        threshold = request.threshold if request.HasField("threshold") else model.card.threshold
        timings.total_ms = _ms(time.perf_counter() - t0)
        return pb.IdentifyResponse(
            candidates=[pb.Candidate(speaker_id=s, score=sc, metadata=md) for s, sc, md in hits],
            is_match=bool(hits) and hits[0][1] >= threshold, threshold=threshold, model=model.name, timings=timings)

    async def _speaker_ref(self, request) -> tuple[str, str, str]:
        """Validated (collection, speaker_id) of a request and the collection's model (NotFound if none)."""
        coll = validate_collection(request.collection)
        spk = validate_speaker_id(request.speaker_id)
        return coll, spk, await self.engine.store_call(self.engine.store.collection_model, coll)

    @_rpc
    async def DeleteSpeaker(self, request: pb.DeleteSpeakerRequest, context) -> pb.DeleteSpeakerResponse:
        coll, spk, model = await self._speaker_ref(request)
        rec = await self.engine.store_call(self.engine.store.delete, coll, spk)
        await self.engine.report_collection(coll)
        return pb.DeleteSpeakerResponse(speaker=_speaker_pb(coll, model, rec))

    @_rpc
    async def GetSpeaker(self, request: pb.GetSpeakerRequest, context) -> pb.Speaker:
        coll, spk, model = await self._speaker_ref(request)
        rec = await self.engine.store_call(self.engine.store.get, coll, spk)
        return _speaker_pb(coll, model, rec, request.include_voiceprint)

    @_rpc
    async def ListSpeakers(self, request: pb.ListSpeakersRequest, context) -> pb.ListSpeakersResponse:
        coll = validate_collection(request.collection)
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument("page_size", f"must be in 0..1000, got {request.page_size}")
        size = request.page_size or 100
        try:
            offset = int(request.page_token) if request.page_token else 0
            if offset < 0:
                raise ValueError
        except ValueError:
            raise InvalidArgument("page_token", f"{request.page_token[:64]!r} is not a token this server issued") from None
        store = self.engine.store
        model = await self.engine.store_call(store.collection_model, coll)
        page, total = await self.engine.store_call(store.list, coll, offset, size)
        nxt = str(offset + size) if offset + size < total else ""
        return pb.ListSpeakersResponse(speakers=[_speaker_pb(coll, model, r) for r in page], next_page_token=nxt,
                                       total_size=total)

    @_rpc
    async def ListCollections(self, request: pb.ListCollectionsRequest, context) -> pb.ListCollectionsResponse:
        infos = await self.engine.store_call(self.engine.store.collections)
        return pb.ListCollectionsResponse(collections=[
            pb.Collection(name=i.name, model=i.model, embedding_dim=i.dim, speaker_count=i.speaker_count,
                          index_type=i.index_type) for i in infos])

    def _model_info(self, model) -> pb.ModelInfo:
        c = model.card
        return pb.ModelInfo(
            name=c.name, version=c.version, embedding_dim=c.embedding_dim, sample_rate=c.sample_rate,
            execution_provider=model.provider, threshold=c.threshold, min_audio_seconds=c.min_audio_seconds,
            max_audio_seconds=self.engine.config.max_audio_seconds, description=c.description, license=c.license,
            source=c.source, parameters=c.parameters, opset=c.opset, is_default=c.name == self.engine.default_model)

    @_rpc
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._model_info(m) for _, m in sorted(self.engine.models.items())],
                                     default_model=self.engine.default_model)

    @_rpc
    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context) -> pb.ModelInfo:
        return self._model_info(self.engine.model(request.name, "name"))

