"""The ``spkserve`` verbs about enrolled speakers: enroll, identify, delete, get-speaker, list-speakers,
list-collections and migrate (one RPC each, JSON out)."""

from __future__ import annotations

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.cli_io import (SCALES, audio_of, collection_model, embed_streamed, embeddings_of, emit, enum_name,
                            is_large, models_of, probe_of)

__all__ = ["SPEAKER_VERBS"]


def _speaker_record(s: pb.Speaker, voiceprint: bool = False) -> dict:
    """A speaker record as printed by get-speaker and list-speakers (with the voiceprint when asked)."""
    out = {"collection": s.collection, "speaker": s.speaker_id, "model": s.model, "utterance_count": s.utterance_count,
           "status": enum_name(pb.EnrollmentStatus, s.status, "ENROLLMENT_STATUS_"), "speech_seconds": s.speech_seconds,
           "required_speech_seconds": s.required_speech_seconds, "metadata": dict(s.metadata),
           "created_unix_ms": s.created_unix_ms, "updated_unix_ms": s.updated_unix_ms}
    if voiceprint:
        out["voiceprint"] = list(s.voiceprint)
    return out


def _metadata(entries: list[str], verb: str = "enroll") -> dict[str, str]:
    """``--metadata KEY=VALUE`` entries as a dict (a later KEY wins); SystemExit naming a malformed one."""
    out = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise SystemExit(f"spkserve {verb}: --metadata must be KEY=VALUE, got {entry!r}")
        out[key] = value
    return out


def _enroll(stub, args, kw) -> None:
    if not args.files and not args.embeddings:
        raise SystemExit("spkserve enroll: give audio FILEs, --embeddings FILE, or both")
    metadata = _metadata(args.metadata)
    embedded = [(f"{path} line {n}", e) for path in args.embeddings for n, e in embeddings_of(path, "enroll")]
    model = args.model or ""
    made_by = models_of(args.embeddings, "enroll")
    if made_by and model and made_by != model:
        raise SystemExit(f"spkserve enroll: --embeddings were made by model {made_by!r}, not --model {model!r}")
    model = model or made_by or ""  # the server then refuses a collection of another model (same size, other space)
    large = [f for f in args.files if is_large(f)]  # too large for one message: embedded through EmbedStream
    if large and not model:
        model = collection_model(stub, args.collection, kw)  # as the server would embed them ("" for a new one)
    streamed = {f: embed_streamed(stub, f, model, kw) for f in large}
    embedded = [(f, pb.Embedding(values=r.embedding, speech_seconds=r.speech_seconds, model=r.model))
                for f, r in streamed.items()] + embedded
    small = [f for f in args.files if f not in streamed]
    r = stub.Enroll(pb.EnrollRequest(model=model, collection=args.collection, speaker_id=args.speaker,
                                     audio=[audio_of(f) for f in small], embeddings=[e for _, e in embedded],
                                     metadata=metadata, allow_reenroll=args.allow_reenroll), **kw)
    sources = small + [name for name, _ in embedded]  # the server's order: audio, then embeddings
    emit({"collection": r.speaker.collection, "speaker": r.speaker.speaker_id, "created": r.created,
           "utterance_count": r.speaker.utterance_count, "model": r.speaker.model,
           "status": enum_name(pb.EnrollmentStatus, r.status, "ENROLLMENT_STATUS_"),
           "speech_seconds": r.speaker.speech_seconds, "required_speech_seconds": r.speaker.required_speech_seconds,
           "utterances": [{"file": f, "speech_seconds": u.speech.speech_seconds, "consistent": u.consistent,
                           "multiple_speakers": (streamed[f].speech if f in streamed else u.speech).multiple_speakers}
                          for f, u in zip(sources, r.utterances)],
           "metadata": dict(r.speaker.metadata)})


def _identify(stub, args, kw) -> None:
    model = args.model or ""
    if not model and is_large(args.file):  # embedded by the collection's model, as the server would
        model = collection_model(stub, args.collection, kw)
    probe, streamed = probe_of(stub, args.file, model, kw)
    req = pb.IdentifyRequest(model=model, collection=args.collection, probe=probe, top_k=args.top_k,
                             rule=pb.IDENTIFY_RULE_SINGLE_PAIR if args.single_pair else pb.IDENTIFY_RULE_OPEN_SET)
    if args.target_far is not None:
        req.target_false_accept_rate = args.target_far
    if args.threshold is not None:
        req.threshold = args.threshold
        req.threshold_scale = SCALES[args.scale]
    if args.min_score is not None:
        req.min_score = args.min_score
        req.min_score_scale = SCALES[args.min_score_scale]
    r = stub.Identify(req, **kw)
    # candidates keep exactly {"speaker", "score"} (an interface scripts rely on: tests/test_lifecycle.py's
    # test_cli_interface); their calibrated scores are the parallel "llr" list, their metadata `get-speaker`'s
    emit({"candidates": [{"speaker": c.speaker_id, "score": c.score} for c in r.candidates],
           "is_match": r.is_match, "threshold": r.threshold, "model": r.model,
           "verdict": enum_name(pb.Verdict, r.verdict, "VERDICT_"),
           "llr": [c.llr for c in r.candidates if c.HasField("llr")],
           "rule": enum_name(pb.IdentifyRule, r.rule, "IDENTIFY_RULE_").lower(),
           "collection_size": r.collection_size, "decision_threshold": r.decision_threshold,
           "speech_seconds": (streamed.speech if streamed else r.probe_speech).speech_seconds,
           "band_matched": r.band_matched, **({"reason": r.reason} if r.reason else {})})


def _delete(stub, args, kw) -> None:
    r = stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection=args.collection, speaker_id=args.speaker,
                                                   opt_out=args.opt_out), **kw)
    emit({"deleted": r.speaker.speaker_id if r.HasField("speaker") else None,
           "collection": args.collection or "default", "opted_out": args.opt_out})


def _update_speaker(stub, args, kw) -> None:
    r = stub.UpdateSpeaker(pb.UpdateSpeakerRequest(collection=args.collection, speaker_id=args.speaker,
                                                   metadata=_metadata(args.metadata, "update-speaker"),
                                                   remove_metadata_keys=args.remove_metadata), **kw)
    emit(_speaker_record(r.speaker))


def _get_speaker(stub, args, kw) -> None:
    r = stub.GetSpeaker(pb.GetSpeakerRequest(collection=args.collection, speaker_id=args.speaker,
                                             include_voiceprint=args.include_voiceprint), **kw)
    emit(_speaker_record(r, args.include_voiceprint))


def _list_speakers(stub, args, kw) -> None:
    token, speakers, total = args.page_token, [], 0
    while True:
        r = stub.ListSpeakers(pb.ListSpeakersRequest(collection=args.collection, page_size=args.page_size,
                                                     page_token=token), **kw)
        speakers += [_speaker_record(s) for s in r.speakers]
        token, total = r.next_page_token, r.total_size
        if not args.all or not token:
            break
    emit({"collection": args.collection or "default", "speakers": speakers, "total_size": total,
           "next_page_token": token or None})


def _list_collections(stub, args, kw) -> None:
    r = stub.ListCollections(pb.ListCollectionsRequest(), **kw)
    emit({"collections": [{"name": c.name, "model": c.model, "model_version": c.model_version,
                            "embedding_dim": c.embedding_dim, "speaker_count": c.speaker_count,
                            "index_type": c.index_type} for c in r.collections]})


def _delete_collection(stub, args, kw) -> None:
    r = stub.DeleteCollection(pb.DeleteCollectionRequest(collection=args.collection, force=args.force), **kw)
    emit({"deleted": r.collection.name, "model": r.collection.model, "model_version": r.collection.model_version,
          "speakers_deleted": r.collection.speaker_count})


def _migrate(stub, args, kw) -> None:
    r = stub.MigrateCollection(pb.MigrateCollectionRequest(collection=args.collection, target_collection=args.to,
                                                           model=args.model or ""), **kw)
    emit({"target_collection": r.target_collection, "model": r.model, "model_version": r.model_version,
           "migrated": r.migrated, "skipped": list(r.skipped)})


SPEAKER_VERBS = {"enroll": _enroll, "identify": _identify, "delete": _delete, "update-speaker": _update_speaker,
                 "get-speaker": _get_speaker,
                 "list-speakers": _list_speakers, "list-collections": _list_collections, "delete-collection": _delete_collection,
                 "migrate": _migrate}
