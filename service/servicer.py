"""gRPC adapter: protobuf in -> validated values -> Engine -> protobuf out.

Each RPC is wrapped by ``_rpc``, which times it, maps exceptions to status codes through
``service.errors.status_of`` (one table) and counts the outcome. Nothing here runs a model
or touches the disk on the event loop. Scoring and verdict rules live in
``service.decisions``; message conversions in ``service.convert``.
"""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from models.band_match import has_low_cut, match_band, wider_than_pair
from models.consistency import self_consistency, speaker_chunks

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from service.convert import (SCALE_PB, VERDICT_PB, audio_input, check_embedding_model, merge_timings, ms, scale_of,
                             speech_pb)
from service.cohorts import cohort_side_stats
from service.decisions import Decision, Side, Threshold, carry_into_band, decide, speaker_shortfall, speech_shortfall
from service.engine import Engine
from service.inputs import AudioInput, Speech
from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.rpc import call_deadline as _deadline
from service.rpc import rpc as _rpc
from service.servicer_diarize import DiarizeRpcs
from service.servicer_live import LiveRpcs
from service.servicer_models import ModelRpcs
from service.servicer_search import SearchRpcs
from service.servicer_speakers import SpeakerRecordRpcs
from service.servicer_streams import StreamRpcs
from service.store import validate_collection, validate_speaker_id
from service.store.base import version_conflict

__all__ = ["SpeakerServicer"]

log = logging.getLogger("spkserve.servicer")

_MAX_COMPARE_SCORES = 1_000_000


class SpeakerServicer(SearchRpcs, StreamRpcs, LiveRpcs, DiarizeRpcs, SpeakerRecordRpcs, ModelRpcs,
                      pb_grpc.SpeakerServiceServicer):
    """Implements spkserve.v1.SpeakerService on an Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.ready = False
        self.auth = None  # service.auth.Authorizer when tokens are configured

    async def on_models_changed(self) -> None:
        """Called after a model was loaded or unloaded (the server updates per-model health)."""

    def _allow(self, context, permission: str, collection: str | None = None) -> None:
        """PERMISSION_DENIED unless the call's token grants ``permission`` (on ``collection``)."""
        if self.auth is not None:
            self.auth.require(context.invocation_metadata(), permission, collection)

    # -- audio and embeddings ---------------------------------------------------------
    def _observe_speech(self, model, method: str, speech: Speech, shortfall: str) -> None:
        m = self.engine.metrics
        m.speech_seconds.labels(model.name, method).observe(speech.speech_seconds)
        if speech.narrowband:
            m.narrowband.labels(model.name, method).inc()
        if shortfall:
            m.speech_insufficient.labels(model.name, method, "no_speech" if speech.speech_seconds == 0
                                         else "too_little_speech").inc()

    async def _embed_speech(self, model, speech: Speech, context) -> tuple[np.ndarray, pb.Timings]:
        """Embed prepared speech; returns (unit embedding, timings)."""
        t0 = time.perf_counter()
        res = await self.engine.embed(model, speech.wave, _deadline(context))
        return res.embedding, pb.Timings(decode_ms=ms(speech.decode_s), queue_ms=ms(res.queue_s),
                                         inference_ms=ms(res.inference_s), execution_provider=model.provider,
                                         total_ms=ms(speech.decode_s + time.perf_counter() - t0))

    async def _check_speakers(self, model, speech: Speech, method: str, context) -> None:
        """The one-talker check: embed parts of the speech and score them against each other (config speaker_check)."""
        cfg = self.engine.config
        if not cfg.speaker_check or model.scorer.calibration is None:
            return
        chunks = speaker_chunks(speech.wave, model.sample_rate, cfg.speaker_check_min_seconds)
        if not chunks:
            return
        results = await asyncio.gather(*[self.engine.embed(model, c, _deadline(context)) for c in chunks])
        llr = self_consistency(model.scorer, np.stack([r.embedding for r in results]),
                               [len(c) / model.sample_rate for c in chunks])
        speech.self_consistency = llr
        speech.multiple_speakers = llr is not None and llr < cfg.speaker_check_llr
        if speech.multiple_speakers:
            self.engine.metrics.multiple_speakers.labels(model.name, method).inc()

    async def _embed_checked(self, model, speech: Speech, method: str, context) -> tuple[np.ndarray, pb.Timings]:
        """``_embed_speech`` with the one-talker check alongside."""
        (vec, timings), _ = await asyncio.gather(self._embed_speech(model, speech, context),
                                                 self._check_speakers(model, speech, method, context))
        return vec, timings

    def _embeddable(self, model, speech: Speech, field: str) -> str:
        """Why VAD's output is too short for the model to embed ("" when it is long enough)."""
        need = model.card.min_audio_seconds
        if speech.speech_seconds == 0:
            return f"{field}: no speech found in {speech.audio_seconds:.2f} s of audio"
        if speech.speech_seconds < need:
            return f"{field}: {speech.speech_seconds:.2f} s of speech, model {model.name} needs at least {need:.2f} s"
        return ""

    async def _embed_only(self, model, audio: AudioInput, method: str, context) -> tuple[np.ndarray, Speech, pb.Timings]:
        """Embed (Embed, EmbedStream): any speech the model can embed; none is an error naming the field."""
        speech = await self.engine.prepare(model, audio, _deadline(context))
        why = self._embeddable(model, speech, audio.field)
        self._observe_speech(model, method, speech, why)
        if why:
            field, _, message = why.partition(": ")
            raise InvalidArgument(field, message)
        emb, timings = await self._embed_speech(model, speech, context)
        return emb, speech, timings

    async def _side(self, model, probe: pb.Probe, field: str, method: str, context,
                    allow_speaker: bool = True) -> tuple[Side, pb.Timings]:
        """One side of a comparison, embedded unless it carries too little speech."""
        policy = self.engine.policies[model.name]
        kind = probe.WhichOneof("source")
        if kind == "audio":
            speech = await self.engine.prepare(model, audio_input(probe.audio, f"{field}.audio"), _deadline(context))
            short = speech_shortfall(f"{field}.audio", speech, policy.min_probe_speech) or \
                self._embeddable(model, speech, f"{field}.audio")
            self._observe_speech(model, method, speech, short)
            if short:
                return Side(field, speech=speech, shortfall=short), pb.Timings(decode_ms=ms(speech.decode_s))
            vec, timings = await self._embed_checked(model, speech, method, context)
            return Side(field, vec, model.scorer.stats(vec), speech), timings
        if kind == "embedding":
            check_embedding_model(probe.embedding, model.name, f"{field}.embedding")
            vec = self.engine.unit_embedding(probe.embedding.values, model.dim, f"{field}.embedding.values")
            declared = float(probe.embedding.speech_seconds)
            if not (np.isfinite(declared) and declared >= 0):
                raise InvalidArgument(f"{field}.embedding.speech_seconds", f"must be a finite number >= 0, got {declared!r}")
            return Side(field, vec, model.scorer.stats(vec), speech_seconds=declared or None), pb.Timings()
        if kind == "speaker" and allow_speaker:
            coll = validate_collection(probe.speaker.collection, f"{field}.speaker.collection")
            spk = validate_speaker_id(probe.speaker.speaker_id, f"{field}.speaker.speaker_id")
            self._allow(context, "read", coll)
            store = self.engine.store
            bound, version = await self.engine.store_call(store.collection_binding, coll)
            if bound != model.name:
                raise FailedPrecondition(f"{field}.speaker: collection {coll!r} holds voiceprints of model {bound!r}, not {model.name!r}")
            if version and version != model.card.version:
                raise FailedPrecondition(f"{field}.speaker: " + version_conflict(coll, bound, version, model.card.version))
            rec = await self.engine.store_call(store.get, coll, spk)
            short = "" if self.engine.config.allow_unready_speakers else \
                speaker_shortfall(f"{field}.speaker", spk, rec.speech, policy.min_enroll_speech)
            if short:
                self.engine.metrics.speech_insufficient.labels(model.name, method, "speaker_not_ready").inc()
            stats = rec.stats if rec.stats is not None else model.scorer.stats(rec.voiceprint)
            await self.engine.store_call(store.touch, coll, [spk])
            return Side(field, rec.voiceprint, stats, shortfall=short, speech_seconds=rec.speech, ref=(coll, spk)), pb.Timings()
        allowed = "audio, embedding or speaker" if allow_speaker else "audio or embedding"
        if kind == "speaker":  # Identify: an enrolled speaker is what it searches, not what it is asked about
            raise InvalidArgument(f"{field}.speaker", f"{method} takes {allowed} here, not an enrolled speaker "
                                  "(GetSpeaker with include_voiceprint gives the voiceprint to send as an embedding)")
        raise InvalidArgument(field, f"is empty: set one of {allowed}")

    def _threshold(self, model, request, field: str = "threshold") -> Threshold:
        """The request's threshold on its scale, its target false-accept rate, or the model's operating point."""
        scale_field = f"{field}_scale"
        scale = scale_of(getattr(request, scale_field), scale_field)
        if request.HasField("target_false_accept_rate"):
            if request.HasField(field):
                raise InvalidArgument("target_false_accept_rate", f"set {field} or target_false_accept_rate, not both")
            if not model.scorer.far_table:
                raise FailedPrecondition(f"target_false_accept_rate: model {model.name} has no false-accept table "
                                         "(it was not calibrated on real speech); set threshold instead")
            try:
                return Threshold("llr", model.scorer.llr_for_far(request.target_false_accept_rate))
            except ValueError as e:
                name, _, message = str(e).partition(": ")
                raise InvalidArgument(name, message) from None
        if not request.HasField(field):
            if getattr(request, scale_field) != pb.SCORE_SCALE_UNSPECIFIED:
                raise InvalidArgument(scale_field, f"is set but {field} is not")
            policy = self.engine.policies[model.name]
            return Threshold(policy.scale, policy.threshold)
        return self._checked(model, scale, getattr(request, field), field, scale_field)

    @staticmethod
    def _checked(model, scale: str, value: float, field: str, scale_field: str) -> Threshold:
        if scale not in model.scorer.scales:
            raise FailedPrecondition(f"{scale_field}: model {model.name} has no {scale!r} scale "
                                     f"(it scores on {list(model.scorer.scales)})")
        try:
            model.scorer.check_threshold(scale, value, field)
        except ValueError as e:
            field_name, _, message = str(e).partition(": ")
            raise InvalidArgument(field_name, message) from None
        return Threshold(scale, float(value))

    async def _in_domain(self, a: Side, b: Side) -> None:
        """Normalise a pair against the collection of an enrolled side when it is its own cohort (service.cohorts)."""
        if not self.engine.cohorts.enabled or a.vector is None or b.vector is None or a.stats is None:
            return
        coll = (a.ref or b.ref or (None,))[0]
        cohort = None if coll is None else await self.engine.cohorts.get(self.engine, coll)
        if cohort is None:
            return
        leave = {r[1] for r in (a.ref, b.ref) if r is not None and r[0] == coll}
        a.stats = cohort_side_stats(cohort, a.stats, a.vector, leave)
        b.stats = cohort_side_stats(cohort, b.stats, b.vector, leave)

    async def _match_band(self, model, a: Side, b: Side, context) -> bool:
        """Two recordings, at least one narrowband: embed each side that is wider than the narrowest band of the pair
        again in that band (``models.band_match``: 8 kHz, and the landline's 300 Hz cut when either side lacks its
        fundamental), so that the pair is scored as two recordings of one channel. Returns whether a side changed."""
        if not self.engine.config.band_match or a.vector is None or b.vector is None:
            return False
        if a.speech is None or b.speech is None or not (a.speech.narrowband or b.speech.narrowband):
            return False
        rate, loop = model.sample_rate, asyncio.get_running_loop()
        cuts = await asyncio.gather(*[loop.run_in_executor(self.engine.decode_pool, has_low_cut, s.speech.wave, rate)
                                      for s in (a, b)])
        low_cut = any(cuts)
        wider = [s for s, cut in zip((a, b), cuts) if wider_than_pair(s.speech.narrowband, cut, low_cut)]

        async def again(side: Side) -> None:
            wave = await loop.run_in_executor(self.engine.decode_pool, match_band, side.speech.wave, rate, low_cut)
            res = await self.engine.embed(model, wave, _deadline(context))
            side.vector, side.stats = res.embedding, model.scorer.stats(res.embedding)

        await asyncio.gather(*[again(s) for s in wider])
        if wider:
            self.engine.metrics.band_matched.labels(model.name).inc()
        return bool(wider)

    async def _map_band(self, model, a: Side, b: Side) -> bool:
        """A narrowband recording against a voiceprint (an enrolled speaker, an embedding: no audio to match): unless
        the voiceprint's channel group is already in the recording's band (``ModelScorer.in_band``), carry it into
        that band with the model's band map (``models.band_map``; the landline's band when the recording lacks its
        fundamental) and give the pair the band's LLR offset. Returns whether it did."""
        for probe, other in ((a, b), (b, a)):
            if other.speech is None:
                low_cut = await self._probe_band(model, probe)
                if low_cut is not None and carry_into_band(model.scorer, other, low_cut):
                    self.engine.metrics.band_matched.labels(model.name).inc()
                    return True
        return False

    async def _probe_band(self, model, probe: Side) -> bool | None:
        """For a narrowband recording whose voiceprint counterparts the model's band map can carry into its band:
        whether it lacks its fundamental (the landline's band, ``models.band_match.has_low_cut``); None otherwise."""
        if (not self.engine.config.band_match or model.scorer.band_map is None or probe.speech is None
                or not probe.speech.narrowband or probe.vector is None):
            return None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine.decode_pool, has_low_cut, probe.speech.wave, model.sample_rate)

    def _observe_decision(self, model, method: str, decision: Decision) -> None:
        m = self.engine.metrics
        m.verdicts.labels(model.name, method, decision.verdict).inc()
        if decision.scores is not None and decision.scores.llr is not None:
            m.decision_llr.labels(model.name, method, decision.verdict).observe(decision.scores.llr)

    async def _collection_model(self, requested: str, collection: str, field: str = "model"):
        """The collection's bound model; the request's (or the default) for a new collection.

        A request naming another model than the collection's is refused before any work
        (voiceprints of different models cannot be compared).
        """
        try:
            bound, version = await self.engine.store_call(self.engine.store.collection_binding, collection)
        except NotFound:
            return self.engine.model(requested, field)
        if requested and requested != bound:
            self.engine.model(requested, field)  # an unknown name is NOT_FOUND first
            raise FailedPrecondition(f"{field}: collection {collection!r} holds voiceprints of model {bound!r}; "
                                     f"they cannot be compared with {requested!r} embeddings (omit {field} to use {bound!r})")
        model = self.engine.model(bound, field)
        if version and version != model.card.version:  # the model was reloaded with another version
            raise FailedPrecondition(version_conflict(collection, bound, version, model.card.version))
        return model

    # -- RPCs -------------------------------------------------------------------------
    @_rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        """The embedding of one recording's speech; see the proto."""
        self._allow(context, "read")
        model = self.engine.model(request.model)
        if not request.HasField("audio"):
            raise InvalidArgument("audio", "is missing")
        emb, speech, timings = await self._embed_only(model, audio_input(request.audio, "audio"), "Embed", context)
        return pb.EmbedResponse(embedding=emb.tolist(), model=model.name, model_version=model.card.version,
                                speech_seconds=speech.speech_seconds, timings=timings, speech=speech_pb(speech))

    @_rpc
    async def Verify(self, request: pb.VerifyRequest, context) -> pb.VerifyResponse:
        """Score two probes and decide whether they are one speaker; see the proto."""
        t0 = time.perf_counter()
        self._allow(context, "read")
        model = self.engine.model(request.model)
        threshold = self._threshold(model, request)
        (a, ta), (b, tb) = await asyncio.gather(self._side(model, request.a, "a", "Verify", context),
                                                self._side(model, request.b, "b", "Verify", context))
        matched = await self._match_band(model, a, b, context) or await self._map_band(model, a, b)
        await self._in_domain(a, b)
        d = decide(model.scorer, threshold, a, b, model.card.threshold)
        self._observe_decision(model, "Verify", d)
        s = d.scores
        return pb.VerifyResponse(
            score=s.cosine if s else 0.0, decision=d.accepted, threshold=d.cosine_threshold, model=model.name,
            timings=merge_timings([ta, tb], time.perf_counter() - t0), verdict=VERDICT_PB[d.verdict],
            normalized_score=s.normalized if s else None, llr=s.llr if s else None,
            decision_scale=SCALE_PB[threshold.scale], decision_threshold=threshold.value,
            a_speech=speech_pb(a.speech), b_speech=speech_pb(b.speech), reason=d.reason, band_matched=matched)

    @_rpc
    async def Compare(self, request: pb.CompareRequest, context) -> pb.CompareResponse:
        """Cosine scores between two lists of embeddings; see the proto."""
        self._allow(context, "read")
        if not request.a:
            raise InvalidArgument("a", "is empty")
        if not request.b:
            raise InvalidArgument("b", "is empty")
        if len(request.a) * len(request.b) > _MAX_COMPARE_SCORES:
            raise InvalidArgument("a", f"{len(request.a)} x {len(request.b)} scores exceed the limit of {_MAX_COMPARE_SCORES:,}")
        first = ""  # the first model an embedding names: every other one that names a model must agree
        for side, embeddings in (("a", request.a), ("b", request.b)):
            for i, e in enumerate(embeddings):
                first = first or e.model
                check_embedding_model(e, first, f"{side}[{i}]")
        dim = len(request.a[0].values)
        a = np.stack([self.engine.unit_embedding(e.values, dim, f"a[{i}].values") for i, e in enumerate(request.a)])  # (N, D)
        b = np.stack([self.engine.unit_embedding(e.values, dim, f"b[{i}].values") for i, e in enumerate(request.b)])  # (M, D)
        scores = np.clip(a @ b.T, -1.0, 1.0)  # (N, M)
        return pb.CompareResponse(rows=scores.shape[0], cols=scores.shape[1], scores=scores.ravel().tolist())
