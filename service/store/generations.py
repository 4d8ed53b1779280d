"""Snapshots and log generations of ``LocalStore``: ``wal-<gen>.log`` and ``snapshot-<gen>.bin`` files, and the
rotation that writes a snapshot, starts the next log and removes what the previous snapshot covers."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import numpy as np

from service.store import legacy
from service.store.keys import Sealed
from service.store.recovery import SNAP_RE, WAL_RE
from service.store.snapshot import SnapshotEntry, write_snapshot
from service.store.wal import LogWriter

__all__ = ["Generations", "now_ms", "pack"]


def now_ms() -> int:
    """Wall-clock time in milliseconds (record timestamps)."""
    return int(time.time() * 1000)


def pack(info: dict, array: np.ndarray) -> bytes:
    """A JSON head and an array's bytes as one sealed body (``recovery.unpack`` reads it)."""
    head = json.dumps(info, separators=(",", ":")).encode()
    return struct.pack("<I", len(head)) + head + np.ascontiguousarray(array).tobytes()


class Generations:
    """Mixin of ``LocalStore`` (uses its directory, keys, collections, tombstones and writer)."""

    # -- snapshots and log generations --------------------------------------------------
    def _wal_path(self, gen: int) -> Path:
        return self.dir / f"wal-{gen:08d}.log"

    def _snap_path(self, gen: int) -> Path:
        return self.dir / f"snapshot-{gen:08d}.bin"

    def _rotate_and_snapshot(self, scrub: bool = False) -> None:
        # The snapshot covers everything in logs < gen + 1. Order: snapshot file, new log, switch;
        # a crash or failure between steps leaves a state that replays to the same result.
        gen = self._gen + 1
        meta = {"next_gen": gen, "created_ms": now_ms(), "collections": []}
        entries = []
        for ci, name in enumerate(sorted(self._collections)):
            coll = self._collections[name]
            meta["collections"].append({"name": name, "model": coll.model, "dim": coll.dim, "version": coll.model_version,
                                        "tombstones": sorted(self._tombstones.get(name, ()))})
            for spk in sorted(coll.speakers):
                r, slot = coll.speakers[spk], self._slots[(name, spk)]
                info = {"spk": spk, "count": r.count, "meta": r.metadata, "created": r.created_ms,
                        "updated": r.updated_ms, "speech": r.speech, "used": r.last_used_ms}
                sealed = Sealed(self._keys.key(slot, name), slot).seal(pack(info, r.sum))
                entries.append(SnapshotEntry(ci, slot, sealed))
        for name in sorted(set(self._tombstones) - set(self._collections)):  # opt-outs of empty collections
            meta["collections"].append({"name": name, "model": "", "dim": 0,
                                        "tombstones": sorted(self._tombstones[name])})
        write_snapshot(self._snap_path(gen), meta, entries, self.fsync)
        writer = LogWriter(self._wal_path(gen), self.fsync, self.ops)
        if self._writer is not None:
            self._writer.close()
        self._writer, self._gen, self._since_snapshot = writer, gen, 0
        self.last_snapshot_error = None
        snaps = sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := SNAP_RE.fullmatch(p.name)))
        keep_from = snaps[-2] if len(snaps) >= 2 else gen  # the previous snapshot and its logs stay
        for p in self.dir.iterdir():
            m = SNAP_RE.fullmatch(p.name) or WAL_RE.fullmatch(p.name)
            if m and int(m.group(1)) < keep_from:
                legacy.scrub(p) if scrub else p.unlink()
