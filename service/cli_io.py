"""What the ``spkserve`` client verbs share: reading local files, printing JSON, naming enum values."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.client import CHUNK_BYTES, ONE_MESSAGE_BYTES, embed_stream, embedding, file_chunks

__all__ = ["SCALES", "STREAM_ABOVE_BYTES", "CHUNK", "is_large", "embed_streamed", "read_chunks", "probe_of",
           "collection_model", "Unreadable", "read_file", "check_readable", "audio_of", "emit", "enum_name",
           "embeddings_of", "models_of"]

SCALES = {"cosine": 1, "normalized": 2, "llr": 3}  # spkserve.v1.ScoreScale values
STREAM_ABOVE_BYTES = ONE_MESSAGE_BYTES  # larger files go through EmbedStream, as the Python client does
CHUNK = CHUNK_BYTES


class Unreadable(SystemExit):
    """A local file that cannot be read (the command's message names it)."""


def read_file(path: str) -> bytes:
    """The bytes of a local file; ``Unreadable`` naming it and why when it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise Unreadable(f"spkserve: cannot read {path}: {e.strerror}") from None


def check_readable(path: str) -> None:
    """``Unreadable`` naming the file when it cannot be opened (before a stream reads it in chunks)."""
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise Unreadable(f"spkserve: cannot read {path}: {e.strerror}") from None


def audio_of(path: str) -> pb.Audio:
    """A file's bytes as encoded audio for a request (the server decodes it)."""
    return pb.Audio(encoded=read_file(path))


def emit(obj: Any) -> None:
    """Print one JSON line and flush it (a reader sees each result as it comes)."""
    print(json.dumps(obj), flush=True)


def enum_name(enum, value: int, prefix: str) -> str:
    """An enum value's name without its prefix: ``enum_name(pb.Verdict, 1, "VERDICT_")`` is ``"ACCEPT"``."""
    return enum.Name(value).removeprefix(prefix)


def models_of(paths: list[str], verb: str) -> str | None:
    """The model that made the embeddings of files of `spkserve embed` lines (their "model" field); None when no
    line says. Embeddings of different models share no space, so a mix is refused (SystemExit naming both)."""
    seen: dict[str, str] = {}
    for path in paths:
        for line in read_file(path).decode("utf-8", "replace").splitlines():
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # embeddings_of names a malformed line
            if isinstance(obj, dict) and isinstance(obj.get("model"), str) and obj["model"]:
                seen.setdefault(obj["model"], path)
    if len(seen) > 1:
        (first, first_path), (second, second_path) = list(seen.items())[:2]
        raise SystemExit(f"spkserve {verb}: embeddings of different models cannot be compared: "
                         f"{first!r} ({first_path}) and {second!r} ({second_path})")
    return next(iter(seen), None)


def embeddings_of(path: str, verb: str = "compare") -> list[tuple[int, pb.Embedding]]:
    """(line number, embedding) of each line of a file of `spkserve embed` lines (JSON objects with "embedding")."""
    out = []
    for n, line in enumerate(read_file(path).decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            values = obj["embedding"] if isinstance(obj, dict) else obj
            meta = obj if isinstance(obj, dict) else {}
            out.append((n, pb.Embedding(values=[float(v) for v in values],
                                        speech_seconds=float(meta.get("speech_seconds", 0.0)),
                                        model=str(meta.get("model") or ""))))  # the server checks the model
        except (ValueError, KeyError, TypeError):
            raise SystemExit(f"spkserve {verb}: {path} line {n}: not a `spkserve embed` JSON line "
                             "(an object with \"embedding\") or a JSON list of numbers") from None
    return out


def is_large(path: str) -> bool:
    """Whether a file is too large to send in one message (it goes through EmbedStream instead); stdin (``-``),
    of unknown length, always is."""
    if path == "-":
        return True
    p = Path(path)
    return p.is_file() and p.stat().st_size > STREAM_ABOVE_BYTES


def read_chunks(path: str) -> Iterator[bytes]:
    """A file's bytes 1 MiB at a time; ``-`` is standard input, read as it arrives."""
    if path == "-":
        while chunk := sys.stdin.buffer.read(CHUNK):
            yield chunk
        return
    check_readable(path)
    yield from file_chunks(path)


def embed_streamed(stub, path: str, model: str, kw: dict) -> pb.EmbedResponse:
    """Embed a file (``-``: stdin) through EmbedStream, 1 MiB per message (any length up to the stream limits)."""
    if path != "-":
        check_readable(path)  # before the call: the file's own error, not the stream's
    return embed_stream(stub, read_chunks(path), model, **kw)


def probe_of(stub, path: str, model: str, kw: dict) -> tuple[pb.Probe, pb.EmbedResponse | None]:
    """A file as a probe: its audio, or, when it is too large for one message, its embedding from EmbedStream
    (naming its model and net speech, so the server checks and counts them); (probe, the stream's response)."""
    if not is_large(path):
        return pb.Probe(audio=audio_of(path)), None
    r = embed_streamed(stub, path, model, kw)
    return pb.Probe(embedding=embedding(r)), r


def collection_model(stub, collection: str, kw: dict) -> str:
    """The model of a collection's voiceprints (ListCollections), or "" when it does not exist yet."""
    name = collection or "default"
    for c in stub.ListCollections(pb.ListCollectionsRequest(), **kw).collections:
        if c.name == name:
            return c.model
    return ""
