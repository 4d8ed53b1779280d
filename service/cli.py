"""The ``spkserve`` command: run the server, or call one from the shell.

    spkserve serve [--config FILE] [--port N] [--http-port N] [--metrics-port N] [--model-repository DIR] [--data-dir DIR]
    spkserve embed    --target HOST:PORT [--model NAME] FILE...
    spkserve verify   --target HOST:PORT [--model NAME] [--threshold T [--scale cosine|normalized|llr] | --target-far R]
                      FILE_A FILE_B
    spkserve enroll   --target HOST:PORT [--collection C] --speaker ID FILE...
    spkserve identify --target HOST:PORT [--collection C] [--top-k K] [--target-far R] [--single-pair] FILE
    spkserve delete   --target HOST:PORT [--collection C] --speaker ID
    spkserve diarize  [--target T] [--model M] [--num-speakers N | --min-speakers A --max-speakers B]
                      [--collection C] [--format rttm|json] FILE...
    spkserve models   --target HOST:PORT
    spkserve load-model   --target HOST:PORT NAME   (load or reload a repository entry; admin)
    spkserve unload-model --target HOST:PORT NAME
    spkserve repair-log --data-dir DIR [--dry-run] [--config FILE]

Client commands print JSON (one object per line for ``embed``); ``diarize`` prints RTTM by
default, one line per segment: ``SPEAKER <file name without extension> 1 <start> <duration>
<NA> <NA> <label> <NA> <NA>`` (labels ``SPEAKER_00``, ``SPEAKER_01``, ... or enrolled speaker
ids), or one JSON object per file with ``--format json``. A failed call exits with status 1 and
prints the gRPC status name and message on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

import grpc

__all__ = ["main", "build_parser"]

_SCALES = {"cosine": 1, "normalized": 2, "llr": 3}  # spkserve.v1.ScoreScale values


def _serve(args: argparse.Namespace) -> int:
    from service.config import ConfigError, load_config
    from service.server import serve

    overrides = {
        "port": args.port, "metrics_port": args.metrics_port, "http_port": args.http_port,
        "model_repository": args.model_repository,
        "data_dir": args.data_dir, "host": args.host, "default_model": args.default_model,
        "auth_token": args.auth_token, "auth_tokens_file": args.auth_tokens_file, "log_level": args.log_level,
        "metrics_host": args.metrics_host, "index_backend": args.index_backend, "milvus_uri": args.milvus_uri,
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"spkserve serve: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(config))


def _repair(args: argparse.Namespace) -> int:
    """Repair every write-ahead log of a stopped server's data directory; print what was kept and lost."""
    import re

    from service.store import StoreUnavailable
    from service.store.keys import KeyRing
    from service.store.naming import describe_damage
    from service.store.wal import repair_log

    data = Path(args.data_dir)
    logs = sorted(p for p in data.glob("wal-*.log") if re.fullmatch(r"wal-\d{8}\.log", p.name))
    if not logs:
        print(f"spkserve repair-log: no wal-<generation>.log files in {data}", file=sys.stderr)
        return 2
    key_files = []
    if args.config:
        from service.config import ConfigError, load_config
        from service.engine import configured_key_files

        try:
            key_files = configured_key_files(load_config(args.config))
        except ConfigError as e:
            print(f"spkserve repair-log: {e}", file=sys.stderr)
            return 2
    ring = None
    if (data / "keys.bin").exists():
        try:
            ring = KeyRing(data / "keys.bin", key_files)  # holds the directory's lock while we work
        except StoreUnavailable:
            print(f"spkserve repair-log: a server is using {data}; stop it first", file=sys.stderr)
            return 2
    try:
        reports = [repair_log(p, data / "damaged", dry_run=args.dry_run) for p in logs]
        speakers = describe_damage(reports, data, ring)
    finally:
        if ring is not None:
            ring.close()
    lost = sum(len(r["damaged"]) for r in reports)
    _emit({"data_dir": str(data), "dry_run": args.dry_run, "logs": reports,
           "records_kept": sum(r["records_kept"] for r in reports), "damaged_stretches": lost,
           "speakers_affected": speakers})
    return 0


def _channel(args: argparse.Namespace) -> grpc.Channel:
    opts = [("grpc.max_send_message_length", 256 * 1024 * 1024), ("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    if args.tls_ca:
        creds = grpc.ssl_channel_credentials(Path(args.tls_ca).read_bytes())
        return grpc.secure_channel(args.target, creds, options=opts)
    return grpc.insecure_channel(args.target, options=opts)


def _metadata(args: argparse.Namespace) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {args.token}")] if args.token else []


def _audio(path: str):
    from service._proto.spkserve.v1 import speaker_pb2 as pb

    try:
        return pb.Audio(encoded=Path(path).read_bytes())
    except OSError as e:
        raise SystemExit(f"spkserve: cannot read {path}: {e.strerror}") from None


def _diarize(stub, args: argparse.Namespace, path: str, kw: dict) -> None:
    """Stream one file to DiarizeStream and print its RTTM lines or JSON object."""
    from service._proto.spkserve.v1 import speaker_pb2 as pb

    try:
        f = open(path, "rb")
    except OSError as e:
        raise SystemExit(f"spkserve: cannot read {path}: {e.strerror}") from None
    options = pb.DiarizationOptions(num_speakers=args.num_speakers or 0, min_speakers=args.min_speakers or 0,
                                    max_speakers=args.max_speakers or 0, collection=args.collection,
                                    exclusive=args.exclusive)

    def messages():
        yield pb.DiarizeStreamRequest(config=pb.DiarizeStreamConfig(model=args.model or "", options=options))
        while chunk := f.read(1 << 20):
            yield pb.DiarizeStreamRequest(chunk=chunk)

    with f:
        r = stub.DiarizeStream(messages(), **kw)
    file_id = Path(path).stem
    if args.format == "rttm":
        sys.stdout.write("".join(f"SPEAKER {file_id} 1 {s.start_seconds:.3f} {s.end_seconds - s.start_seconds:.3f} "
                                 f"<NA> <NA> {s.speaker_label} <NA> <NA>\n" for s in r.segments))
        sys.stdout.flush()
        return
    _emit({"file": path, "model": r.model, "model_version": r.model_version,
           "speech_seconds": r.speech.speech_seconds, "audio_seconds": r.speech.audio_seconds,
           "speakers": [{"label": s.speaker_label, "speech_seconds": round(s.speech_seconds, 3),
                         "speaker_id": s.speaker_id or None, "llr": s.llr if s.HasField("llr") else None}
                        for s in r.speakers],
           "segments": [{"start": round(s.start_seconds, 3), "end": round(s.end_seconds, 3), "speaker": s.speaker_label,
                         "confidence": round(s.confidence, 3)} for s in r.segments]})


def _emit(obj: Any) -> None:
    print(json.dumps(obj), flush=True)


def _client(args: argparse.Namespace) -> int:
    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    with _channel(args) as channel:
        stub = pb_grpc.SpeakerServiceStub(channel)
        kw = {"metadata": _metadata(args), "timeout": args.timeout}
        try:
            if args.command == "embed":
                for f in args.files:
                    r = stub.Embed(pb.EmbedRequest(model=args.model or "", audio=_audio(f)), **kw)
                    _emit({"file": f, "model": r.model, "model_version": r.model_version,
                           "speech_seconds": r.speech_seconds, "embedding": list(r.embedding)})
            elif args.command == "verify":
                req = pb.VerifyRequest(model=args.model or "", a=pb.Probe(audio=_audio(args.file_a)),
                                       b=pb.Probe(audio=_audio(args.file_b)))
                if args.threshold is not None:
                    req.threshold = args.threshold
                    req.threshold_scale = _SCALES[args.scale]
                if args.target_far is not None:
                    req.target_false_accept_rate = args.target_far
                r = stub.Verify(req, **kw)
                out = {"score": r.score, "decision": r.decision, "threshold": r.threshold, "model": r.model,
                       "verdict": pb.Verdict.Name(r.verdict).removeprefix("VERDICT_"),
                       "llr": r.llr if r.HasField("llr") else None,
                       "normalized_score": r.normalized_score if r.HasField("normalized_score") else None,
                       "decision_scale": pb.ScoreScale.Name(r.decision_scale).removeprefix("SCORE_SCALE_").lower(),
                       "decision_threshold": r.decision_threshold,
                       "speech_seconds": [r.a_speech.speech_seconds, r.b_speech.speech_seconds],
                       "multiple_speakers": [r.a_speech.multiple_speakers, r.b_speech.multiple_speakers],
                       "narrowband": [r.a_speech.narrowband, r.b_speech.narrowband]}
                if r.reason:
                    out["reason"] = r.reason
                _emit(out)
            elif args.command == "enroll":
                r = stub.Enroll(pb.EnrollRequest(model=args.model or "", collection=args.collection,
                                                 speaker_id=args.speaker, audio=[_audio(f) for f in args.files],
                                                 allow_reenroll=args.allow_reenroll), **kw)
                _emit({"collection": r.speaker.collection, "speaker": r.speaker.speaker_id, "created": r.created,
                       "utterance_count": r.speaker.utterance_count, "model": r.speaker.model,
                       "status": pb.EnrollmentStatus.Name(r.status).removeprefix("ENROLLMENT_STATUS_"),
                       "speech_seconds": r.speaker.speech_seconds,
                       "required_speech_seconds": r.speaker.required_speech_seconds,
                       "utterances": [{"file": f, "speech_seconds": u.speech.speech_seconds, "consistent": u.consistent,
                                       "multiple_speakers": u.speech.multiple_speakers}
                                      for f, u in zip(args.files, r.utterances)]})
            elif args.command == "identify":
                req = pb.IdentifyRequest(model=args.model or "", collection=args.collection,
                                         probe=pb.Probe(audio=_audio(args.file)), top_k=args.top_k,
                                         rule=pb.IDENTIFY_RULE_SINGLE_PAIR if args.single_pair else pb.IDENTIFY_RULE_OPEN_SET)
                if args.target_far is not None:
                    req.target_false_accept_rate = args.target_far
                r = stub.Identify(req, **kw)
                _emit({"candidates": [{"speaker": c.speaker_id, "score": c.score} for c in r.candidates],
                       "is_match": r.is_match, "threshold": r.threshold, "model": r.model,
                       "verdict": pb.Verdict.Name(r.verdict).removeprefix("VERDICT_"),
                       "llr": [c.llr for c in r.candidates if c.HasField("llr")],
                       "rule": pb.IdentifyRule.Name(r.rule).removeprefix("IDENTIFY_RULE_").lower(),
                       "collection_size": r.collection_size, "decision_threshold": r.decision_threshold,
                       "speech_seconds": r.probe_speech.speech_seconds, **({"reason": r.reason} if r.reason else {})})
            elif args.command == "delete":
                r = stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection=args.collection, speaker_id=args.speaker,
                                                               opt_out=args.opt_out), **kw)
                _emit({"deleted": r.speaker.speaker_id if r.HasField("speaker") else None,
                       "collection": args.collection or "default", "opted_out": args.opt_out})
            elif args.command == "diarize":
                for f in args.files:
                    _diarize(stub, args, f, kw)
            elif args.command == "load-model":
                r = stub.LoadModel(pb.LoadModelRequest(model=args.name), **kw)
                _emit({"model": r.model.name, "version": r.model.version, "replaced": r.replaced,
                       "previous_version": r.previous_version or None, "execution_provider": r.model.execution_provider})
            elif args.command == "unload-model":
                r = stub.UnloadModel(pb.UnloadModelRequest(model=args.name), **kw)
                _emit({"unloaded": r.model, "version": r.version})
            elif args.command == "models":
                r = stub.ListModels(pb.ListModelsRequest(), **kw)
                _emit({"default_model": r.default_model, "models": [
                    {"name": m.name, "version": m.version, "embedding_dim": m.embedding_dim, "sample_rate": m.sample_rate,
                     "execution_provider": m.execution_provider, "threshold": m.threshold} for m in r.models]})
        except grpc.RpcError as e:
            print(f"{e.code().name}: {e.details()}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spkserve`` command."""
    ap = argparse.ArgumentParser(prog="spkserve", description="Speaker embedding service",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the gRPC server")
    s.add_argument("--config", help="TOML file of options (see service/config.py)")
    s.add_argument("--port", type=int)
    s.add_argument("--metrics-port", type=int)
    s.add_argument("--http-port", type=int, help="HTTP/JSON API and web console (default 8080; 0: off)")
    s.add_argument("--host")
    s.add_argument("--model-repository")
    s.add_argument("--default-model")
    s.add_argument("--data-dir")
    s.add_argument("--auth-token", help="require this bearer token (prefer SPKSERVE_AUTH_TOKEN)")
    s.add_argument("--auth-tokens-file", help="TOML file of scoped tokens ([[tokens]] name, sha256, collections, permissions)")
    s.add_argument("--metrics-host", help="address of the metrics endpoint (default 127.0.0.1)")
    s.add_argument("--index-backend", choices=["faiss", "milvus"], help="speaker store (default faiss)")
    s.add_argument("--milvus-uri", help="Milvus server URI or Milvus Lite file (index_backend milvus)")
    s.add_argument("--log-level")

    def client(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--target", default="localhost:50051", help="HOST:PORT of the server")
        p.add_argument("--token", default=None, help="bearer token")
        p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) for a TLS server")
        p.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds")
        p.add_argument("--model", default="", help="model name (default: the server's default)")
        return p

    p = client("embed", "embed audio files")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = client("verify", "score two audio files")
    p.add_argument("file_a", metavar="FILE_A")
    p.add_argument("file_b", metavar="FILE_B")
    p.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model's operating point)")
    p.add_argument("--scale", choices=sorted(_SCALES), default="cosine", help="the scale --threshold is on")
    p.add_argument("--target-far", type=float, default=None,
                   help="decide at this false-accept rate (e.g. 0.001), from the model's real-speech table")
    p = client("enroll", "enroll audio files as a speaker")
    p.add_argument("--collection", default="")
    p.add_argument("--speaker", required=True)
    p.add_argument("--allow-reenroll", action="store_true", help="enroll an id that was deleted or opted out")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = client("identify", "find the closest enrolled speakers")
    p.add_argument("--collection", default="")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--target-far", type=float, default=None, help="a pair's false-accept rate (see verify)")
    p.add_argument("--single-pair", action="store_true",
                   help="decide is_match by the pair threshold (closed-set), not the open-set rule")
    p.add_argument("file", metavar="FILE")
    p = client("delete", "delete an enrolled speaker")
    p.add_argument("--collection", default="")
    p.add_argument("--speaker", required=True)
    p.add_argument("--opt-out", action="store_true", help="also when not enrolled: refuse later enrollment of the id")
    p = client("diarize", "who spoke when: speaker turns of recordings, as RTTM (default) or JSON")
    count = p.add_mutually_exclusive_group()
    count.add_argument("--num-speakers", type=int, default=None, help="the number of speakers, when known")
    count.add_argument("--min-speakers", type=int, default=None, help="at least this many speakers (with --max-speakers)")
    p.add_argument("--max-speakers", type=int, default=None, help="at most this many speakers")
    p.add_argument("--collection", default="", help="label speakers with the enrolled speakers they match")
    p.add_argument("--format", choices=["rttm", "json"], default="rttm")
    p.add_argument("--exclusive", action="store_true", help="one speaker at a time (segments never overlap)")
    p.add_argument("files", nargs="+", metavar="FILE")
    client("models", "list the served models")
    p = client("load-model", "load a model from the server's repository, or reload it (admin)")
    p.add_argument("name", metavar="NAME")
    p = client("unload-model", "stop serving a model (admin)")
    p.add_argument("name", metavar="NAME")
    r = sub.add_parser("repair-log", help="repair a stopped server's damaged write-ahead log (keeps every intact record)")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--dry-run", action="store_true", help="report what would be kept and lost, change nothing")
    r.add_argument("--config", help="the server's configuration file: its key files name the speakers affected")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spkserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "diarize" and args.num_speakers is not None and args.max_speakers is not None:
        parser.error("diarize: --num-speakers cannot be combined with --max-speakers")
    if args.command == "serve":
        return _serve(args)
    if args.command == "repair-log":
        return _repair(args)
    return _client(args)


if __name__ == "__main__":
    sys.exit(main())
