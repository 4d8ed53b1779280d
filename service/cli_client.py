"""The client verbs of the ``spkserve`` command: one per RPC, JSON out, friendly errors (the verbs about
enrolled speakers are in ``service.cli_speakers``).

Every verb prints JSON (one object per line; ``diarize`` prints RTTM by default). The target and
token come from ``--target`` / ``--token`` or ``SPKSERVE_TARGET`` / ``SPKSERVE_TOKEN``. A failed
call exits with status 1 and prints ``STATUS_NAME: message`` on stderr, with a hint where the
usual cause is known: a server that is not running, a file over the server's message limit, an
audio container the server cannot read. Files over ``STREAM_ABOVE_BYTES`` go through EmbedStream (``verify``,
``identify`` and ``enroll`` then send their embedding).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

import grpc

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from service.cli_io import (SCALES, STREAM_ABOVE_BYTES, Unreadable, audio_of, check_readable, collection_model,
                            embed_streamed, embeddings_of, emit, enum_name, is_large, models_of, probe_of, read_chunks)
from service.cli_speakers import SPEAKER_VERBS

__all__ = ["run_client", "call_options", "VERBS", "STREAM_ABOVE_BYTES"]



def _channel(args: argparse.Namespace) -> grpc.Channel:
    opts = [("grpc.max_send_message_length", 256 * 1024 * 1024), ("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        return grpc.secure_channel(args.target, creds, options=opts)
    return grpc.insecure_channel(args.target, options=opts)


class _FilesFailed(Exception):
    """Some of a verb's files failed, each reported on stderr; the others were done."""


def _each_file(files: list[str], args: argparse.Namespace, work: Callable[[str], None]) -> None:
    """``work(path)`` for every file of a per-file verb (``embed``, ``diarize``).

    With several files, one the server refuses as bad input (INVALID_ARGUMENT) or that cannot be read is
    reported on stderr under its name and the others still run (then ``_FilesFailed``: exit status 1); an
    error about the call itself (server down, token, overload, unknown model) stops at once, as with one file.
    """
    failed = 0
    for path in files:
        try:
            work(path)
        except grpc.RpcError as e:
            if len(files) == 1 or e.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            print(f"{path}: {_hint(e, args)}", file=sys.stderr, flush=True)
            failed += 1
        except Unreadable as e:
            if len(files) == 1:
                raise
            print(e, file=sys.stderr, flush=True)
            failed += 1
    if failed:
        raise _FilesFailed(f"{failed} of {len(files)} files failed")


def _embed(stub, args, kw) -> None:
    _each_file(args.files, args, lambda f: _embed_one(stub, args, kw, f))


def _embed_one(stub, args, kw, f: str) -> None:
    """Embed one file (EmbedStream when asked or when it is large) and print its line."""
    if args.stream or is_large(f):
        r = embed_streamed(stub, f, args.model or "", kw)
    else:
        r = stub.Embed(pb.EmbedRequest(model=args.model or "", audio=audio_of(f)), **kw)
    emit({"file": f, "model": r.model, "model_version": r.model_version,
           "speech_seconds": r.speech_seconds, "embedding": list(r.embedding)})


def _verify(stub, args, kw) -> None:
    model = args.model or ""
    if args.speaker:
        if len(args.files) != 1:
            raise SystemExit("spkserve verify: with --speaker give one FILE (checked against the enrolled speaker)")
        if not model and is_large(args.files[0]):  # embedded by the speaker's model, as the server would
            model = collection_model(stub, args.collection, kw)
        a, streamed_a = pb.Probe(speaker=pb.SpeakerRef(collection=args.collection, speaker_id=args.speaker)), None
        b, streamed_b = probe_of(stub, args.files[0], model, kw)
    else:
        if len(args.files) != 2:
            raise SystemExit("spkserve verify: give FILE_A FILE_B, or --speaker ID [--collection C] FILE")
        (a, streamed_a), (b, streamed_b) = (probe_of(stub, f, model, kw) for f in args.files)
    req = pb.VerifyRequest(model=model, a=a, b=b)
    if args.threshold is not None:
        req.threshold = args.threshold
        req.threshold_scale = SCALES[args.scale]
    if args.target_far is not None:
        req.target_false_accept_rate = args.target_far
    r = stub.Verify(req, **kw)
    # what VAD found: the server's for audio probes, EmbedStream's for large files sent as embeddings
    sides = [r.a_speech if a.HasField("audio") else streamed_a.speech if streamed_a else None,
             r.b_speech if b.HasField("audio") else streamed_b.speech]
    out = {"score": r.score, "decision": r.decision, "threshold": r.threshold, "model": r.model,
           "verdict": enum_name(pb.Verdict, r.verdict, "VERDICT_"),
           "llr": r.llr if r.HasField("llr") else None,
           "normalized_score": r.normalized_score if r.HasField("normalized_score") else None,
           "decision_scale": enum_name(pb.ScoreScale, r.decision_scale, "SCORE_SCALE_").lower(),
           "decision_threshold": r.decision_threshold,
           # null for the enrolled speaker's side (no audio was sent)
           "speech_seconds": [s.speech_seconds if s else None for s in sides],
           "multiple_speakers": [s.multiple_speakers if s else None for s in sides],
           "narrowband": [s.narrowband if s else None for s in sides],
           "band_matched": r.band_matched}
    if r.reason:
        out["reason"] = r.reason
    emit(out)


def _live_source(args) -> tuple[pb.PcmFormat | None, Callable[[], Iterator[bytes]], float | None]:
    """What verify-stream sends: (the PCM format, None for a WAV stream; its chunks; bytes per second when the
    audio can be paced, i.e. not stdin). A file without --pcm-rate is decoded here: any format libsndfile reads
    goes as 16-bit PCM; stdin and --pcm-rate input go as they are, a chunk at a time as they arrive."""
    import soundfile as sf

    rate = args.pcm_rate
    if args.file == "-" or rate:
        source = sys.stdin.buffer if args.file == "-" else None
        if source is None:
            check_readable(args.file)
        step = max(2, int((rate or 16000) * args.chunk_ms / 1000) * 2)  # (a WAV stream: about chunk-ms at 16 kHz)
        fmt = pb.PcmFormat(sample_rate=rate, encoding=pb.PCM_S16LE, channels=1) if rate else None

        def chunks() -> Iterator[bytes]:
            with (open(args.file, "rb") if source is None else contextlib.nullcontext(source)) as fh:
                while data := fh.read(step):
                    yield data

        return fmt, chunks, (2 * rate if rate and source is None else None)
    check_readable(args.file)
    try:
        samples, rate = sf.read(args.file, dtype="int16", always_2d=True)  # (T, C)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise SystemExit(f"spkserve verify-stream: {args.file}: not readable audio ({e})") from None
    channels = samples.shape[1]
    data = samples.astype("<i2").tobytes()
    step = max(1, int(rate * args.chunk_ms / 1000)) * 2 * channels
    return (pb.PcmFormat(sample_rate=rate, encoding=pb.PCM_S16LE, channels=channels),
            lambda: (data[i:i + step] for i in range(0, len(data), step)), 2 * channels * rate)


def _verify_stream(stub, args, kw) -> None:
    import time

    if not 10 <= args.chunk_ms <= 10_000:
        raise SystemExit(f"spkserve verify-stream: --chunk-ms must be in 10..10000, got {args.chunk_ms:g}")
    fmt, chunks, byte_rate = _live_source(args)
    config = pb.VerifyStreamConfig(
        model=args.model or "", interim_seconds=args.interim_seconds,
        reference=pb.Probe(speaker=pb.SpeakerRef(collection=args.collection, speaker_id=args.speaker)), pcm=fmt)
    if args.threshold is not None:
        config.threshold = args.threshold
        config.threshold_scale = SCALES[args.scale]
    if args.target_far is not None:
        config.target_false_accept_rate = args.target_far

    def messages():
        yield pb.VerifyStreamRequest(config=config)
        t0, sent = time.monotonic(), 0
        for chunk in chunks():
            if args.realtime and byte_rate:
                time.sleep(max(0.0, t0 + sent / byte_rate - time.monotonic()))
            yield pb.VerifyStreamRequest(chunk=chunk)
            sent += len(chunk)

    if args.realtime and byte_rate:  # the deadline covers the audio's own duration
        kw = {**kw, "timeout": kw["timeout"] + _audio_seconds(args, byte_rate)}
    for r in stub.VerifyStream(messages(), **kw):
        out = {"final": r.final, "audio_seconds": round(r.audio_seconds, 3), "speech_seconds": round(r.speech_seconds, 3),
               "verdict": enum_name(pb.Verdict, r.verdict, "VERDICT_"), "score": r.score,
               "llr": r.llr if r.HasField("llr") else None,
               "normalized_score": r.normalized_score if r.HasField("normalized_score") else None,
               "speaker_changed": r.speaker_changed, "recent_llr": r.recent_llr if r.HasField("recent_llr") else None,
               "recent_reference_llr": r.recent_reference_llr if r.HasField("recent_reference_llr") else None,
               "change_seconds": [round(t, 3) for t in r.change_seconds], "model": r.model,
               "narrowband": r.narrowband, "band_matched": r.band_matched}
        if r.reason:
            out["reason"] = r.reason
        emit(out)


def _audio_seconds(args, byte_rate: int) -> float:
    """Seconds of audio verify-stream will send from a file (its PCM size over the byte rate)."""
    if args.pcm_rate:
        return Path(args.file).stat().st_size / byte_rate
    import soundfile as sf

    return sf.info(args.file).duration


def _compare(stub, args, kw) -> None:
    models_of([args.file_a, args.file_b], "compare")  # scores across two models' spaces would mean nothing
    a, b = ([e for _, e in embeddings_of(path)] for path in (args.file_a, args.file_b))
    r = stub.Compare(pb.CompareRequest(a=a, b=b), **kw)
    emit({"rows": r.rows, "cols": r.cols,
           "scores": [list(r.scores[i * r.cols:(i + 1) * r.cols]) for i in range(r.rows)]})


def _diarize(stub, args, kw) -> None:
    for flag in ("num_speakers", "min_speakers", "max_speakers"):  # the API reads 0 as "not given"
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"spkserve diarize: --{flag.replace('_', '-')} must be at least 1, got {value}")
    options = pb.DiarizationOptions(num_speakers=args.num_speakers or 0, min_speakers=args.min_speakers or 0,
                                    max_speakers=args.max_speakers or 0, collection=args.collection,
                                    exclusive=args.exclusive, include_embeddings=args.embeddings)
    if args.embeddings and args.format != "json":
        raise SystemExit("spkserve diarize: --embeddings needs --format json (RTTM has no place for them)")
    _each_file(args.files, args, lambda path: _diarize_one(stub, args, kw, options, path))


def _diarize_one(stub, args, kw, options: pb.DiarizationOptions, path: str) -> None:
    """Diarize one file (``-``: stdin) through DiarizeStream and print its RTTM lines or JSON line."""
    if path != "-":
        check_readable(path)

    def messages(path=path):
        yield pb.DiarizeStreamRequest(config=pb.DiarizeStreamConfig(model=args.model or "", options=options))
        for chunk in read_chunks(path):
            yield pb.DiarizeStreamRequest(chunk=chunk)

    r = stub.DiarizeStream(messages(), **kw)
    file_id = "stdin" if path == "-" else Path(path).stem
    if args.format == "rttm":
        sys.stdout.write("".join(f"SPEAKER {file_id} 1 {s.start_seconds:.3f} {s.end_seconds - s.start_seconds:.3f} "
                                 f"<NA> <NA> {s.speaker_label} <NA> <NA>\n" for s in r.segments))
        sys.stdout.flush()
        return
    emit({"file": path, "model": r.model, "model_version": r.model_version,
           "speech_seconds": r.speech.speech_seconds, "audio_seconds": r.speech.audio_seconds,
           "speakers": [{"label": s.speaker_label, "speech_seconds": round(s.speech_seconds, 3),
                         "speaker_id": s.speaker_id or None, "llr": s.llr if s.HasField("llr") else None,
                         **({"embedding": list(s.embedding)} if args.embeddings else {})}
                        for s in r.speakers],
           "segments": [{"start": round(s.start_seconds, 3), "end": round(s.end_seconds, 3),
                         "speaker": s.speaker_label, "confidence": round(s.confidence, 3)} for s in r.segments]})


def _model(m: pb.ModelInfo) -> dict:
    return {"name": m.name, "version": m.version, "embedding_dim": m.embedding_dim, "sample_rate": m.sample_rate,
            "execution_provider": m.execution_provider, "threshold": m.threshold,
            "input_level_dbfs": m.input_level_dbfs if m.HasField("input_level_dbfs") else None,
            "input_tilt_db_per_octave": [round(m.input_tilt.min_db_per_octave, 3), round(m.input_tilt.max_db_per_octave, 3)]
            if m.HasField("input_tilt") else None, "remove_mains_hum": m.remove_mains_hum}


def _models(stub, args, kw) -> None:
    r = stub.ListModels(pb.ListModelsRequest(), **kw)
    emit({"default_model": r.default_model, "models": [_model(m) for m in r.models]})


def _model_info(stub, args, kw) -> None:
    emit(_model(stub.GetModelInfo(pb.GetModelInfoRequest(name=args.name or ""), **kw)))


def _load_model(stub, args, kw) -> None:
    r = stub.LoadModel(pb.LoadModelRequest(model=args.name), **kw)
    emit({"model": r.model.name, "version": r.model.version, "replaced": r.replaced,
           "previous_version": r.previous_version or None, "execution_provider": r.model.execution_provider})


def _unload_model(stub, args, kw) -> None:
    r = stub.UnloadModel(pb.UnloadModelRequest(model=args.name), **kw)
    emit({"unloaded": r.model, "version": r.version})


VERBS = {"embed": _embed, "verify": _verify, "verify-stream": _verify_stream, "compare": _compare, "diarize": _diarize,
         "models": _models, "model-info": _model_info, "load-model": _load_model, "unload-model": _unload_model,
         **SPEAKER_VERBS}


def _hint(e: grpc.RpcError, args: argparse.Namespace) -> str:
    """``STATUS: message``, with the usual cause spelled out where it is known."""
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and ("connect" in details.lower() or "unavailable" in details.lower()):
        return f"UNAVAILABLE: cannot reach {args.target}: is `spkserve serve` running? ({details})"
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        return (f"RESOURCE_EXHAUSTED: the request is larger than the server's max_message_mb ({details}); "
                "`spkserve embed` streams large files (EmbedStream), or raise max_message_mb on the server")
    return f"{code.name}: {details}"


def call_options(args: argparse.Namespace) -> dict:
    """The gRPC call options of a verb: the bearer token, and the deadline (``--timeout``; by default 60 s, none
    when a FILE is ``-``: standard input lasts as long as its producer)."""
    reads_stdin = "-" in getattr(args, "files", []) or getattr(args, "file", None) == "-"
    default = None if reads_stdin else 60.0
    return {"metadata": [("authorization", f"Bearer {args.token}")] if args.token else [],
            "timeout": args.timeout if args.timeout is not None else default}


def run_client(args: argparse.Namespace) -> int:
    """Run one client verb against ``args.target``; returns the exit status."""
    if getattr(args, "files", []).count("-") > 1:
        raise SystemExit(f"spkserve {args.command}: - (standard input) can be read once; give it as one FILE only")
    with _channel(args) as channel:
        stub = pb_grpc.SpeakerServiceStub(channel)
        kw = call_options(args)
        try:
            VERBS[args.command](stub, args, kw)
        except grpc.RpcError as e:
            print(_hint(e, args), file=sys.stderr)
            return 1
        except _FilesFailed:  # each already reported under its name
            return 1
    return 0
