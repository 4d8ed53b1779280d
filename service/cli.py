"""The ``spkserve`` command: run the server, or call one from the shell.

    spkserve serve [--config FILE] [--port N] [--http-port N] [--metrics-port N] [--model-repository DIR] [--data-dir DIR]
                   [--check]   (check everything start-up checks, print a summary, exit)
    spkserve embed    [--model NAME] [--stream] FILE...
    spkserve verify   [--model NAME] [--threshold T [--scale cosine|normalized|llr] | --target-far R]
                      FILE_A FILE_B  |  --speaker ID [--collection C] FILE
    spkserve verify-stream --collection C --speaker ID [--chunk-ms 500] [--realtime] [--interim-seconds S]
                      [--threshold T [--scale S] | --target-far R] [--pcm-rate HZ] FILE|-
    spkserve enroll   [--collection C] --speaker ID [--allow-reenroll] [--metadata KEY=VALUE]...
                      [--embeddings EMBEDDINGS]... [FILE...]
    spkserve identify [--collection C] [--top-k K] [--threshold T [--scale S] | --target-far R]
                      [--min-score M [--min-score-scale S]] [--single-pair] FILE
    spkserve delete   [--collection C] --speaker ID [--opt-out]
    spkserve update-speaker [--collection C] --speaker ID [--metadata KEY=VALUE]... [--remove-metadata KEY]...
    spkserve get-speaker [--collection C] --speaker ID [--include-voiceprint]
    spkserve list-speakers [--collection C] [--page-size N] [--page-token T | --all]
    spkserve list-collections
    spkserve delete-collection --collection C [--force]   (--force: with its speakers)
    spkserve compare  EMBEDDINGS_A EMBEDDINGS_B    (files of `spkserve embed` lines)
    spkserve migrate  --collection C --to NEW [--model M]   (admin)
    spkserve diarize  [--model M] [--num-speakers N | --min-speakers A --max-speakers B]
                      [--collection C] [--format rttm|json [--embeddings]] [--exclusive] FILE...
    spkserve models | model-info [NAME]
    spkserve --version
    spkserve load-model NAME | unload-model NAME   (admin)
    spkserve repair-log --data-dir DIR [--dry-run] [--config FILE]
    spkserve backup --data-dir DIR --out NEW_DIR [--config FILE]   (while the server runs, too)
    spkserve pull --list | NAME [--repository DIR] [--from FILE_OR_URL] [--real POOL] [--no-calibrate] [--force]

Client commands take ``--target`` (``$SPKSERVE_TARGET``, default localhost:50051), ``--token``
(``$SPKSERVE_TOKEN``), ``--tls-ca`` and ``--timeout``, and print JSON (one object per line for ``embed``, one per
result for ``verify-stream``, the last with ``"final": true``); ``diarize`` prints RTTM by
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
import os
import re
import sys
from pathlib import Path

from service import package_version


__all__ = ["main", "build_parser"]


def _serve(args: argparse.Namespace) -> int:
    from service.config import ConfigError, load_config, unknown_environment
    from service.server import serve

    overrides = {
        "port": args.port, "metrics_port": args.metrics_port, "http_port": args.http_port,
        "model_repository": args.model_repository,
        "data_dir": args.data_dir, "host": args.host, "default_model": args.default_model,
        "auth_token": args.auth_token, "auth_tokens_file": args.auth_tokens_file, "log_level": args.log_level,
        "log_format": args.log_format,
        "metrics_host": args.metrics_host, "index_backend": args.index_backend, "milvus_uri": args.milvus_uri,
    }
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"spkserve serve: {e}", file=sys.stderr)
        return 2
    from service.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    ignored = unknown_environment()
    for warning in ignored:
        logging.getLogger("spkserve.config").warning(warning)
    if args.check:
        from models.artifact import ArtifactError
        from service.preflight import check_setup

        try:
            print(json.dumps({**check_setup(config), "warnings": ignored}), flush=True)
        except (ConfigError, ArtifactError) as e:
            print(f"spkserve serve --check: {e}", file=sys.stderr)
            return 2
        return 0
    return asyncio.run(serve(config))


def _key_files(config: str | None, verb: str) -> list:
    """The key files of the server configuration ``config`` (none without one); SystemExit(2) naming a bad one."""
    if not config:
        return []
    from service.config import ConfigError, load_config
    from service.engine import configured_key_files

    try:
        return configured_key_files(load_config(config))
    except ConfigError as e:
        print(f"spkserve {verb}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _backup(args: argparse.Namespace) -> int:
    """Copy a local store's data directory (its server may be running) and check the copy; print a summary."""
    from service.store.backup import BackupError, backup_store

    try:
        print(json.dumps(backup_store(args.data_dir, args.out, _key_files(args.config, "backup"))), flush=True)
    except BackupError as e:
        print(f"spkserve backup: {e}", file=sys.stderr)
        return 1
    return 0


def _repair(args: argparse.Namespace) -> int:
    """Repair every write-ahead log of a stopped server's data directory; print what was kept and lost."""
    from service.store import StoreUnavailable
    from service.store.keys import KeyRing
    from service.store.naming import describe_damage
    from service.store.wal import repair_log

    data = Path(args.data_dir)
    logs = sorted(p for p in data.glob("wal-*.log") if re.fullmatch(r"wal-\d{8}\.log", p.name))
    if not logs:
        print(f"spkserve repair-log: no wal-<generation>.log files in {data}", file=sys.stderr)
        return 2
    key_files = _key_files(args.config, "repair-log")
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
    print(json.dumps({"data_dir": str(data), "dry_run": args.dry_run, "logs": reports,
           "records_kept": sum(r["records_kept"] for r in reports), "damaged_stretches": lost,
           "speakers_affected": speakers}), flush=True)
    return 0


_MAX_DEADLINE = 1e9  # seconds (~31 years): gRPC's deadline arithmetic overflows not far above this


def _deadline(text: str) -> float:
    """``--timeout``: a finite number of seconds above 0 (0, negative, NaN or huge deadlines expire at once)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value <= _MAX_DEADLINE:  # also false for NaN
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {_MAX_DEADLINE:.0e} seconds, got {text}")
    return value


def _target(text: str) -> str:
    """``--target``: a gRPC target; a HOST:PORT one needs a port in 1..65535 (gRPC wraps larger ports around)."""
    port = re.search(r":(\d+)$", text)
    if port and not text.startswith(("unix:", "unix-abstract:")) and not 1 <= int(port.group(1)) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {port.group(1)} in {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``spkserve`` command."""
    ap = argparse.ArgumentParser(prog="spkserve", description="Speaker embedding service",
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--version", action="version", version=f"spkserve {package_version()}")
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
    s.add_argument("--log-format", choices=["text", "json"], help="text (default) or JSON lines")
    s.add_argument("--check", action="store_true",
                   help="check the configuration, tokens, key and TLS files, data directory and every model it would "
                        "load (ONNX session and warm-up), print a JSON summary and exit: 0 ready, 2 not (nothing is "
                        "bound, created or written)")

    def client(name: str, help: str, model: bool = False) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--target", type=_target, default=os.environ.get("SPKSERVE_TARGET", "localhost:50051"),
                       help="HOST:PORT of the server (default $SPKSERVE_TARGET or localhost:50051)")
        p.add_argument("--token", default=os.environ.get("SPKSERVE_TOKEN"), help="bearer token (default $SPKSERVE_TOKEN)")
        p.add_argument("--tls-ca", default=None, help="CA certificate (PEM) for a TLS server")
        p.add_argument("--timeout", type=_deadline, default=None,
                       help="deadline in seconds (default 60; none when a FILE is - (stdin))")
        if model:  # only verbs whose RPC takes a model: elsewhere `--model X` would be silently ignored
            p.add_argument("--model", default="", help="model name (default: the server's default)")
        return p

    def speaker(p: argparse.ArgumentParser, required: bool = True) -> None:
        p.add_argument("--collection", default="", help="collection (default: 'default')")
        p.add_argument("--speaker", required=required, metavar="ID")

    p = client("embed", "embed audio files (files over 8 MiB, or all with --stream, go through EmbedStream)",
               model=True)
    p.add_argument("--stream", action="store_true", help="send every file through EmbedStream")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = client("verify", "score two audio files, or one against an enrolled speaker (--speaker)", model=True)
    speaker(p, required=False)
    p.add_argument("files", nargs="+", metavar="FILE", help="FILE_A FILE_B, or one FILE with --speaker")
    p.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model's operating point)")
    p.add_argument("--scale", choices=["cosine", "llr", "normalized"], default="cosine", help="the scale --threshold is on")
    p.add_argument("--target-far", type=float, default=None,
                   help="decide at this false-accept rate (e.g. 0.001), from the model's real-speech table")
    p = client("verify-stream", "verify a recording live against an enrolled speaker: streams FILE in chunks and "
                                "prints each provisional result, then the final one", model=True)
    p.add_argument("--collection", required=True, help="the enrolled speaker's collection")
    p.add_argument("--speaker", required=True, metavar="ID")
    p.add_argument("--chunk-ms", type=float, default=500.0, help="audio per message (default 500 ms)")
    p.add_argument("--realtime", action="store_true", help="send at the audio's pace, as a live call would")
    p.add_argument("--interim-seconds", type=float, default=0.0, help="new speech per provisional result (default 1 s)")
    p.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model's operating point)")
    p.add_argument("--scale", choices=["cosine", "llr", "normalized"], default="cosine", help="the scale --threshold is on")
    p.add_argument("--target-far", type=float, default=None,
                   help="decide at this false-accept rate (e.g. 0.001), from the model's real-speech table")
    p.add_argument("--pcm-rate", type=int, default=None, metavar="HZ",
                   help="FILE is raw 16-bit little-endian mono PCM at HZ (e.g. from arecord or a telephony gateway)")
    p.add_argument("file", metavar="FILE", help="an audio file, or - for stdin (a WAV stream, or raw PCM with "
                                                "--pcm-rate), sent as it arrives")
    p = client("enroll", "enroll audio files (or embeddings printed by `spkserve embed`) as a speaker", model=True)
    speaker(p)
    p.add_argument("--allow-reenroll", action="store_true", help="enroll an id that was deleted or opted out")
    p.add_argument("--embeddings", action="append", default=[], metavar="FILE",
                   help="also enroll the embeddings in FILE (lines printed by `spkserve embed`; repeatable)")
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="set a metadata entry of the speaker (repeatable; new keys overwrite old ones)")
    p.add_argument("files", nargs="*", metavar="FILE")
    p = client("identify", "find the closest enrolled speakers", model=True)
    p.add_argument("--collection", default="")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--target-far", type=float, default=None, help="a pair's false-accept rate (see verify)")
    p.add_argument("--threshold", type=float, default=None,
                   help="the pair threshold (default: the model's operating point; not with --target-far)")
    p.add_argument("--scale", choices=["cosine", "llr", "normalized"], default="cosine", help="the scale --threshold is on")
    p.add_argument("--min-score", type=float, default=None, help="leave out candidates below this score")
    p.add_argument("--min-score-scale", choices=["cosine", "llr", "normalized"], default="cosine",
                   help="the scale --min-score is on")
    p.add_argument("--single-pair", action="store_true",
                   help="decide is_match by the pair threshold (closed-set), not the open-set rule")
    p.add_argument("file", metavar="FILE")
    p = client("delete", "delete an enrolled speaker")
    speaker(p)
    p.add_argument("--opt-out", action="store_true", help="also when not enrolled: refuse later enrollment of the id")
    p = client("update-speaker", "change an enrolled speaker's metadata (the voiceprint stays)")
    speaker(p)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE",
                   help="set a metadata entry (repeatable; overwrites the key's value)")
    p.add_argument("--remove-metadata", action="append", default=[], metavar="KEY",
                   help="remove a metadata key (repeatable)")
    p = client("get-speaker", "an enrolled speaker's record")
    speaker(p)
    p.add_argument("--include-voiceprint", action="store_true", help="also print the voiceprint")
    p = client("list-speakers", "the speakers of a collection")
    p.add_argument("--collection", default="")
    p.add_argument("--page-size", type=int, default=0, help="speakers per page (0: the server's 100)")
    p.add_argument("--page-token", default="", help="continue from a previous page")
    p.add_argument("--all", action="store_true", help="follow every page")
    client("list-collections", "the collections this token can see")
    p = client("delete-collection", "delete a collection and its model binding (--force: with its speakers)")
    p.add_argument("--collection", required=True, help="the collection (named in full: no default here)")
    p.add_argument("--force", action="store_true", help="also when it holds speakers: delete them all")
    p = client("compare", "cosine scores between two files of embeddings (lines printed by `spkserve embed`)")
    p.add_argument("file_a", metavar="EMBEDDINGS_A")
    p.add_argument("file_b", metavar="EMBEDDINGS_B")
    p = client("migrate", "re-embed a collection's speakers with another model into a new collection (admin)",
               model=True)
    p.add_argument("--collection", default="", help="the source collection")
    p.add_argument("--to", required=True, metavar="COLLECTION", help="the new collection (must not exist)")
    p = client("diarize", "who spoke when: speaker turns of recordings, as RTTM (default) or JSON", model=True)
    count = p.add_mutually_exclusive_group()
    count.add_argument("--num-speakers", type=int, default=None, help="the number of speakers, when known")
    count.add_argument("--min-speakers", type=int, default=None, help="at least this many speakers (with --max-speakers)")
    p.add_argument("--max-speakers", type=int, default=None, help="at most this many speakers")
    p.add_argument("--collection", default="", help="label speakers with the enrolled speakers they match")
    p.add_argument("--format", choices=["rttm", "json"], default="rttm")
    p.add_argument("--exclusive", action="store_true", help="one speaker at a time (segments never overlap)")
    p.add_argument("--embeddings", action="store_true",
                   help="with --format json: each speaker's embedding (to enroll or search it)")
    p.add_argument("files", nargs="+", metavar="FILE")
    client("models", "list the served models")
    p = client("model-info", "one served model (default: the default model)")
    p.add_argument("name", metavar="NAME", nargs="?", default="")
    p = client("load-model", "load a model from the server's repository, or reload it (admin)")
    p.add_argument("name", metavar="NAME")
    p = client("unload-model", "stop serving a model (admin)")
    p.add_argument("name", metavar="NAME")
    r = sub.add_parser("repair-log", help="repair a stopped server's damaged write-ahead log (keeps every intact record)")
    r.add_argument("--data-dir", required=True)
    r.add_argument("--dry-run", action="store_true", help="report what would be kept and lost, change nothing")
    r.add_argument("--config", help="the server's configuration file: its key files name the speakers affected")
    b = sub.add_parser("backup", help="copy the speaker store's data directory, consistent even while its server "
                                      "runs, and check the copy")
    b.add_argument("--data-dir", required=True, help="the server's data_dir")
    b.add_argument("--out", required=True, metavar="NEW_DIR", help="where the copy goes (a new or empty directory)")
    b.add_argument("--config", help="the server's configuration file (its key files, to check the copy)")
    from models.pull import add_arguments

    add_arguments(sub.add_parser("pull", help="download a catalogued community model, import, check and calibrate it "
                                              "into the model repository (--list: the catalogue)"))
    return ap


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``spkserve`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "diarize" and args.num_speakers is not None and args.max_speakers is not None:
        parser.error("diarize: --num-speakers cannot be combined with --max-speakers")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # Ctrl-C on a client command: its calls are cancelled as the channel closes
        if args.command == "serve":  # the server drains on SIGINT itself; anything else is not ours to hide
            raise
        print("spkserve: interrupted", file=sys.stderr)
        return 130  # 128 + SIGINT
    except BrokenPipeError:  # the reader went away (`spkserve embed ... | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141  # 128 + SIGPIPE, the status a shell reports for a tool stopped by a closed pipe


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        return _serve(args)
    if args.command == "repair-log":
        return _repair(args)
    if args.command == "backup":
        return _backup(args)
    if args.command == "pull":
        from models.pull import run

        return run(args)
    from service.cli_client import run_client

    return run_client(args)


if __name__ == "__main__":
    sys.exit(main())
