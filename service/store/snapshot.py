"""Snapshot files: the whole store state at one log generation, each speaker sealed with its own key.

Format (``snapshot-<gen>.bin``)::

    b"SPKSNAP2\\n" | u32 meta length | JSON meta | entries | SHA-256 of everything before it
    entry = u32 collection index | u32 slot | u32 length | sealed speaker (see ``LocalStore``)

The meta names the collections (model, dimension, tombstones) and the log generation that
follows the snapshot. A file whose checksum fails is refused as a whole: nothing in it is
trusted, and the error says which file and what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from service.store.base import StoreCorrupt, StoreUnavailable
from service.store.wal import fsync_dir

__all__ = ["SnapshotEntry", "write_snapshot", "read_snapshot", "MAGIC"]

MAGIC = b"SPKSNAP2\n"
_ENTRY = struct.Struct("<III")


@dataclass
class SnapshotEntry:
    """One sealed speaker."""

    collection: int
    slot: int
    sealed: bytes


def write_snapshot(path: Path, meta: dict, entries: list[SnapshotEntry], fsync: bool = True) -> None:
    """Write atomically: a temporary file, fsync, rename, fsync of the directory.

    Raises:
        StoreUnavailable: the disk refused (the temporary file is removed; the old snapshot stays).
    """
    head = json.dumps(meta, separators=(",", ":")).encode()
    parts = [MAGIC, struct.pack("<I", len(head)), head]
    for e in entries:
        parts += [_ENTRY.pack(e.collection, e.slot, len(e.sealed)), e.sealed]
    body = b"".join(parts)
    data = body + hashlib.sha256(body).digest()
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        if fsync:
            fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise StoreUnavailable(f"speaker store: could not write snapshot {path.name} ({e.strerror or e})") from None


def read_snapshot(path: Path, fallback: str) -> tuple[dict, list[SnapshotEntry]]:
    """Read and verify a snapshot.

    Args:
        fallback: what the operator can do when the file is damaged (part of the error).

    Raises:
        StoreCorrupt: naming the file, what is wrong and ``fallback``.
    """
    data = path.read_bytes()

    def bad(what: str) -> StoreCorrupt:
        return StoreCorrupt(f"snapshot {path} is damaged ({what}); nothing in it is used. {fallback}")

    if len(data) < len(MAGIC) + 4 + 32 or not data.startswith(MAGIC):
        raise bad("not a spkserve snapshot or cut short")
    body, digest = data[:-32], data[-32:]
    if hashlib.sha256(body).digest() != digest:
        raise bad("checksum mismatch")
    pos = len(MAGIC)
    (hlen,) = struct.unpack_from("<I", body, pos)
    pos += 4
    meta = json.loads(body[pos:pos + hlen])
    pos += hlen
    entries = []
    while pos < len(body):
        coll, slot, n = _ENTRY.unpack_from(body, pos)
        pos += _ENTRY.size
        entries.append(SnapshotEntry(coll, slot, body[pos:pos + n]))
        pos += n
    return meta, entries
