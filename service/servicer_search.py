"""The servicer's speaker-search RPCs: enroll a speaker's utterances, identify a probe among the enrolled."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.cohorts import cohort_side_stats
from service.convert import SCALE_PB, VERDICT_PB, audio_input, check_embedding_model, merge_timings, ms, scale_of, speaker_pb, speech_pb, to_pcm16
from service.decisions import (NOT_ENOUGH_SPEECH, REJECT, Decision, Side, Threshold, carry_into_band, decide, is_ready,
                                open_set_threshold)
from service.errors import InvalidArgument, NotFound, Overloaded
from service.rpc import call_deadline as _deadline
from service.rpc import rpc as _rpc
from service.store import validate_collection, validate_speaker_id

__all__ = ["SearchRpcs"]

_MAX_ENROLL_ITEMS = 64


class SearchRpcs:
    """Mixin of ``SpeakerServicer`` (uses its ``engine``, ``auth``, ``_allow``, ``_side``, ``_threshold``,
    ``_checked``, ``_collection_model``, ``_embeddable``, ``_embed_checked``, ``_observe_speech`` and
    ``_observe_decision``)."""

    @_rpc
    async def Enroll(self, request: pb.EnrollRequest, context) -> pb.EnrollResponse:
        """Add utterances to a speaker of a collection (creating either); see the proto."""
        t0 = time.perf_counter()
        coll = validate_collection(request.collection)
        spk = validate_speaker_id(request.speaker_id)
        self._allow(context, "write", coll)
        model = await self._collection_model(request.model, coll)
        policy = self.engine.policies[model.name]
        n = len(request.audio) + len(request.embeddings)
        if n == 0:
            raise InvalidArgument("audio", "no utterances: give audio and/or embeddings")
        if n > _MAX_ENROLL_ITEMS:
            raise InvalidArgument("audio", f"{n} utterances in one request, at most {_MAX_ENROLL_ITEMS}")
        # validate and embed everything before anything is written: a bad item changes nothing
        for i, e in enumerate(request.embeddings):
            check_embedding_model(e, model.name, f"embeddings[{i}]")
        given = [self.engine.unit_embedding(e.values, model.dim, f"embeddings[{i}].values")
                 for i, e in enumerate(request.embeddings)]
        declared = []
        longest = self.engine.config.max_stream_audio_seconds  # EmbedStream embeds audio up to this long
        for i, e in enumerate(request.embeddings):
            if not (np.isfinite(e.speech_seconds) and 0 <= e.speech_seconds <= longest):
                raise InvalidArgument(f"embeddings[{i}].speech_seconds",
                                      f"must be in 0..{longest:g} (max_stream_audio_seconds), got {e.speech_seconds!r}")
            declared.append(float(e.speech_seconds))
        speeches = await asyncio.gather(*[
            self.engine.prepare(model, audio_input(a, f"audio[{i}]"), _deadline(context))
            for i, a in enumerate(request.audio)])
        for i, speech in enumerate(speeches):
            why = self._embeddable(model, speech, f"audio[{i}]")
            self._observe_speech(model, "Enroll", speech, why)
            if why:
                field, _, message = why.partition(": ")
                raise InvalidArgument(field, f"{message}; nothing was enrolled")
        embedded = await asyncio.gather(*[self._embed_checked(model, sp, "Enroll", context) for sp in speeches])
        await self._collection_quota(coll, context)
        vectors = np.stack([e for e, _ in embedded] + given)  # (N, D)
        total_speech = sum(sp.speech_seconds for sp in speeches) + sum(declared)
        store = self.engine.store
        retained = [(model.sample_rate, to_pcm16(sp.wave)) for sp in speeches] \
            if self.engine.config.retain_enrollment_audio else None
        rec, created = await self.engine.store_call(store.enroll, coll, model.name, spk, vectors,
                                                    dict(request.metadata), total_speech, request.allow_reenroll,
                                                    model.card.version, retained)
        self.engine.cohorts.invalidate(coll)
        await self.engine.report_collection(coll)
        fields = [f"audio[{i}]" for i in range(len(speeches))] + [f"embeddings[{i}]" for i in range(len(given))]
        infos = [speech_pb(sp) for sp in speeches] + [pb.SpeechInfo(speech_seconds=s) for s in declared]
        feedback = self._consistency(model, rec, vectors, fields, infos)
        required = policy.min_enroll_speech
        speaker = speaker_pb(coll, model.name, rec, required)
        status = speaker.status
        if status == pb.ENROLLMENT_STATUS_READY and not all(f.consistent for f in feedback):
            status = pb.ENROLLMENT_STATUS_INCONSISTENT_UTTERANCE
        return pb.EnrollResponse(speaker=speaker, created=created, utterances=feedback, status=status,
                                 timings=merge_timings([t for _, t in embedded], time.perf_counter() - t0))

    async def _collection_quota(self, coll: str, context) -> None:
        """RESOURCE_EXHAUSTED before a tenant's collection beyond ``max_collections_per_tenant`` is created."""
        try:
            await self.engine.store_call(self.engine.store.collection_binding, coll)
            return  # it exists: no new collection
        except NotFound:
            pass
        names = {i.name for i in await self.engine.store_call(self.engine.store.collections)}
        if self.auth is not None:
            token = self.auth.token_of(context.invocation_metadata())
            names = {n for n in names if token.covers(n)} if "admin" not in token.permissions else names
        cap = self.engine.config.max_collections_per_tenant
        if len(names) >= cap:
            raise Overloaded(f"collection: creating {coll!r} would exceed max_collections_per_tenant ({cap}); "
                             "delete unused collections' speakers or raise the option")

    def _consistency(self, model, rec, vectors: np.ndarray, fields: list[str],
                     infos: list[pb.SpeechInfo]) -> list[pb.UtteranceFeedback]:
        """Each new utterance scored against the mean of the speaker's other utterances."""
        policy = self.engine.policies[model.name]
        out = []
        for i, vec in enumerate(vectors):
            fb = pb.UtteranceFeedback(field=fields[i], speech=infos[i], consistent=True)
            others = rec.sum - vec.astype(np.float64)  # (D,) sum of every other utterance of the speaker
            norm = float(np.linalg.norm(others))
            mine = infos[i].speech_seconds or None
            if rec.count > 1 and norm > 1e-9:
                mean = (others / norm).astype(np.float32)
                rest = (rec.speech - mine) if rec.speech is not None and mine is not None else None
                scores = model.scorer.score(float(np.dot(vec, mean)), model.scorer.stats(mean), model.scorer.stats(vec),
                                            rest if rest and rest > 0 else None, mine)
                fb.consistency = scores.cosine
                if scores.llr is not None:
                    fb.consistency_llr = scores.llr
                fb.consistent = bool(scores.on(policy.scale) >= policy.threshold)
            if infos[i].multiple_speakers:  # a second voice in the utterance: it should not be part of a voiceprint
                fb.consistent = False
            out.append(fb)
        return out

    async def _ranked(self, model, coll: str, probe: Side, threshold: Threshold, k: int) -> tuple[list, bool]:
        """The enrolled speakers of ``coll`` closest to ``probe``: [(record, Decision, cosine)], best first on
        ``threshold``'s scale (about ``k`` of them; speakers without enough speech left out), and whether their
        voiceprints were carried into a narrowband probe's band (``carry_into_band``)."""
        store = self.engine.store
        required = self.engine.policies[model.name].min_enroll_speech
        keep = None if self.engine.config.allow_unready_speakers else (lambda r: is_ready(r.speech, required))
        # S-norm can reorder near neighbours: fetch more than k by cosine, re-rank on the decision scale
        fetch = k if model.scorer.cohort is None else max(4 * k, k + 16)
        hits = await self.engine.store_call(store.search, coll, model.name, probe.vector, fetch, keep,
                                            model.card.version)
        ranked, mapped = [], False
        cohort = await self.engine.cohorts.get(self.engine, coll) if probe.stats is not None else None
        low_cut = await self._probe_band(model, probe)  # a narrowband probe: candidates go into its band, as in Verify
        for rec, cosine in hits:
            side = Side("candidate", rec.voiceprint, rec.stats if rec.stats is not None else model.scorer.stats(rec.voiceprint),
                        speech_seconds=rec.speech, ref=(coll, rec.speaker_id))
            if low_cut is not None:
                mapped = carry_into_band(model.scorer, side, low_cut) or mapped
            pair_probe = probe
            if cohort is not None:  # in-domain normalisation, leaving the candidate out of both sides' cohort
                side.stats = cohort_side_stats(cohort, side.stats, side.vector, {rec.speaker_id})
                pair_probe = Side(probe.field, probe.vector, cohort_side_stats(cohort, probe.stats, probe.vector,
                                                                              {rec.speaker_id}),
                                  probe.speech, speech_seconds=probe.speech_seconds)
            ranked.append((rec, decide(model.scorer, threshold, side, pair_probe, model.card.threshold), cosine))
        ranked.sort(key=lambda t: -t[1].scores.on(threshold.scale))
        if mapped:
            self.engine.metrics.band_matched.labels(model.name).inc()
        return ranked, mapped

    @_rpc
    async def Identify(self, request: pb.IdentifyRequest, context) -> pb.IdentifyResponse:
        """The enrolled speakers of a collection closest to a probe, and the open-set decision; see the proto."""
        t0 = time.perf_counter()
        coll = validate_collection(request.collection)
        self._allow(context, "read", coll)
        if request.top_k < 0 or request.top_k > 1000:
            raise InvalidArgument("top_k", f"must be in 0..1000, got {request.top_k}")
        store = self.engine.store
        await self.engine.store_call(store.collection_model, coll)  # NotFound before any inference
        model = await self._collection_model(request.model, coll)
        threshold = self._threshold(model, request)
        min_score = None
        if request.HasField("min_score"):
            min_score = self._checked(model, scale_of(request.min_score_scale, "min_score_scale"), request.min_score,
                                      "min_score", "min_score_scale")
        k = request.top_k or 5
        rule = request.rule or pb.IDENTIFY_RULE_OPEN_SET
        if rule not in (pb.IDENTIFY_RULE_OPEN_SET, pb.IDENTIFY_RULE_SINGLE_PAIR):
            raise InvalidArgument("rule", f"unknown identify rule {request.rule}")
        probe, timings = await self._side(model, request.probe, "probe", "Identify", context, allow_speaker=False)
        size = await self.engine.store_call(store.speaker_count, coll)
        if rule == pb.IDENTIFY_RULE_OPEN_SET and threshold.scale != "llr":
            rule = pb.IDENTIFY_RULE_SINGLE_PAIR  # a cosine or S-norm is no likelihood ratio: ln(N) means nothing there
        if rule == pb.IDENTIFY_RULE_OPEN_SET:
            threshold = open_set_threshold(threshold, size)
        base = dict(model=model.name, decision_scale=SCALE_PB[threshold.scale], decision_threshold=threshold.value,
                    probe_speech=speech_pb(probe.speech), rule=rule, collection_size=size)
        if probe.shortfall:
            d = Decision(NOT_ENOUGH_SPEECH, None, threshold, model.card.threshold, probe.shortfall)
            self._observe_decision(model, "Identify", d)
            timings.total_ms = ms(time.perf_counter() - t0)
            return pb.IdentifyResponse(is_match=False, threshold=model.card.threshold, timings=timings,
                                       verdict=pb.VERDICT_NOT_ENOUGH_SPEECH, reason=d.reason, **base)
        ranked, mapped = await self._ranked(model, coll, probe, threshold, k)
        if min_score is not None:
            ranked = [t for t in ranked if t[1].scores.on(min_score.scale) >= min_score.value]
        ranked = ranked[:k]
        best = ranked[0][1] if ranked else Decision(REJECT, None, threshold, model.card.threshold)
        if best.accepted:
            await self.engine.store_call(store.touch, coll, [ranked[0][0].speaker_id])
        self._observe_decision(model, "Identify", best)
        timings.total_ms = ms(time.perf_counter() - t0)
        return pb.IdentifyResponse(
            candidates=[pb.Candidate(speaker_id=rec.speaker_id, score=d.scores.cosine, metadata=rec.metadata,
                                     normalized_score=d.scores.normalized, llr=d.scores.llr) for rec, d, _ in ranked],
            is_match=best.accepted, threshold=best.cosine_threshold, timings=timings, verdict=VERDICT_PB[best.verdict],
            band_matched=mapped, **base)
