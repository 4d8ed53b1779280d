"""``Diarize`` and ``DiarizeStream`` (a mixin of ``SpeakerServicer``): who spoke when.

Both run ``service.diarize`` on the request's audio: a unary request up to
``max_diarize_audio_seconds`` (its bytes are also bounded by ``max_message_mb``), a stream up to
``max_stream_audio_seconds``. With a collection, every speaker found is compared with the
collection's enrolled speakers by the open-set rule of Identify (the pair threshold + ln(N) on
the calibrated scale, at the model's operating point); a speaker that passes takes the enrolled
id as its label (one enrolled id labels one speaker at most: the better-scoring one), the others
keep ``SPEAKER_nn``.
"""

from __future__ import annotations

import io
import time

from models.audio import check_pcm_format
from models.diarization import DiarizationOptions
from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.convert import ms, pcm_encoding
from service.decisions import Side, Threshold, open_set_threshold
from service.diarize import Diarization, diarize_source
from service.errors import InvalidArgument
from service.rpc import call_deadline
from service.rpc import rpc as _rpc
from service.store import validate_collection

__all__ = ["DiarizeRpcs", "diarization_options", "one_id_each"]


def diarization_options(o: pb.DiarizationOptions, field: str) -> DiarizationOptions:
    """Checked ``DiarizationOptions`` of a request (INVALID_ARGUMENT naming ``field.<option>``)."""
    if o.num_speakers and (o.min_speakers or o.max_speakers):
        raise InvalidArgument(f"{field}.num_speakers", "set either num_speakers or min_speakers/max_speakers, not both")
    opts = DiarizationOptions(num_speakers=o.num_speakers or None, min_speakers=o.min_speakers or 1,
                              max_speakers=o.max_speakers or max(16, o.min_speakers))
    try:
        return opts.validate()
    except ValueError as e:  # "<option>: <what is wrong>"
        name, _, message = str(e).partition(": ")
        raise InvalidArgument(f"{field}.{name}", message) from None


def one_id_each(matches: list[tuple[str, float] | None]) -> list[str]:
    """The enrolled id each speaker takes ("" for none) from its accepted match (id, score): an id matched by
    several speakers goes to the best-scoring one only (the first of equals)."""
    best: dict[str, tuple[float, int]] = {}
    for i, m in enumerate(matches):
        if m is not None and (m[0] not in best or m[1] > best[m[0]][0]):
            best[m[0]] = (m[1], i)
    out = [""] * len(matches)
    for speaker_id, (_, i) in best.items():
        out[i] = speaker_id
    return out


class DiarizeRpcs:
    """Mixin of ``SpeakerServicer`` (uses its ``engine``, ``_allow``, ``_receive``, ``_collection_model`` and
    ``_ranked``)."""

    async def _diarize(self, request_model: str, options: pb.DiarizationOptions, opts_field: str, source, field: str,
                       max_seconds: float, pcm, context, method: str) -> pb.DiarizeResponse:
        t0 = time.perf_counter()
        opts = diarization_options(options, opts_field)
        coll = validate_collection(options.collection) if options.collection else ""
        self._allow(context, "read", coll or None)
        if coll:
            await self.engine.store_call(self.engine.store.collection_model, coll)  # NotFound before any inference
            model = await self._collection_model(request_model, coll)
        else:
            model = self.engine.model(request_model, "model" if method == "Diarize" else "config.model")
        result = await diarize_source(self.engine, model, source, field, max_seconds, pcm, call_deadline(context), opts)
        labels, ids, llrs, threshold = await self._label(model, coll, result)
        m = self.engine.metrics
        m.diarization_audio.labels(model.name).inc(result.audio_seconds)
        m.diarization_speakers.labels(model.name).observe(len(labels))
        m.speech_seconds.labels(model.name, method).observe(result.speech_seconds)
        speakers = []
        for i, label in enumerate(labels):
            sp = pb.DiarizedSpeaker(speaker_label=label, speech_seconds=float(result.speaker_seconds[i]),
                                    speaker_id=ids[i], llr=llrs[i])
            if options.include_embeddings:
                sp.embedding.extend(result.prints[i].tolist())
            speakers.append(sp)
        segments = [pb.DiarizationSegment(start_seconds=round(t.start, 3), end_seconds=round(t.end, 3),
                                          speaker_label=labels[t.speaker], confidence=t.confidence)
                    for t in result.turns]
        long = len(result.segments) > 10_000
        speech = pb.SpeechInfo(speech_seconds=result.speech_seconds, audio_seconds=result.audio_seconds,
                               vad_applied=result.vad_applied, narrowband=result.narrowband,
                               segments=[] if long else [pb.SpeechSegment(start_seconds=a, end_seconds=b)
                                                         for a, b in result.segments])
        timings = pb.Timings(decode_ms=ms(result.decode_s), queue_ms=ms(result.queue_s),
                             inference_ms=ms(result.inference_s), total_ms=ms(time.perf_counter() - t0),
                             execution_provider=model.provider)
        return pb.DiarizeResponse(segments=segments, speakers=speakers, model=model.name,
                                  model_version=model.card.version, speech=speech, timings=timings,
                                  match_threshold=threshold)

    async def _label(self, model, coll: str, result: Diarization):
        """(labels, enrolled ids, best LLRs, open-set LLR threshold) of the speakers found."""
        k = len(result.speaker_seconds)
        labels = [f"SPEAKER_{i:02d}" for i in range(k)]
        ids: list[str] = [""] * k
        llrs: list[float | None] = [None] * k
        if not coll or k == 0:
            return labels, ids, llrs, None
        scorer = model.scorer
        size = await self.engine.store_call(self.engine.store.speaker_count, coll)
        threshold = open_set_threshold(Threshold(scorer.scale, scorer.threshold), size)
        matches: list[tuple[str, float] | None] = [None] * k
        for i in range(k):
            vec = result.prints[i]
            probe = Side(f"speaker {labels[i]}", vec, scorer.stats(vec), speech_seconds=float(result.speaker_seconds[i]))
            ranked, _ = await self._ranked(model, coll, probe, threshold, 1)
            if not ranked:
                continue
            rec, decision, _ = ranked[0]
            llrs[i] = decision.scores.llr
            if decision.accepted:
                matches[i] = (rec.speaker_id, decision.scores.on(threshold.scale))
        for i, speaker_id in enumerate(one_id_each(matches)):
            if speaker_id:
                labels[i] = ids[i] = speaker_id
        return labels, ids, llrs, threshold.value if threshold.scale == "llr" else None

    @_rpc
    async def Diarize(self, request: pb.DiarizeRequest, context) -> pb.DiarizeResponse:
        """Who spoke when in one recording (see the proto)."""
        kind = request.audio.WhichOneof("source")
        if kind == "encoded":
            source, field, pcm = io.BytesIO(request.audio.encoded), "audio.encoded", None
        elif kind == "pcm":
            fmt = request.audio.pcm.format
            pcm = (pcm_encoding(fmt.encoding, "audio.pcm.format.encoding"), fmt.sample_rate, fmt.channels or 1)
            source, field = io.BytesIO(request.audio.pcm.data), "audio.pcm"
        else:
            raise InvalidArgument("audio", "is empty: set audio.encoded or audio.pcm")
            check_pcm_format(fmt.sample_rate, fmt.channels or 1, "audio.pcm.format")
        return await self._diarize(request.model, request.options, "options", source, field,
                                   self.engine.config.max_diarize_audio_seconds, pcm, context, "Diarize")

    @_rpc
    async def DiarizeStream(self, request_iterator, context) -> pb.DiarizeResponse:
        """Who spoke when in audio uploaded in chunks (see the proto)."""
        self._allow(context, "read")
        config, spool, _ = await self._receive(request_iterator)
        with spool:
            pcm = None
            if config.HasField("pcm"):
                fmt = config.pcm
                pcm = (pcm_encoding(fmt.encoding, "config.pcm.encoding"), fmt.sample_rate, fmt.channels or 1)
            return await self._diarize(config.model, config.options, "config.options", spool, "chunk",
                                       self.engine.config.max_stream_audio_seconds, pcm, context, "DiarizeStream")
