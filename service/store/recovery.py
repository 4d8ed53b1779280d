"""Start-up of the local store: the newest snapshot, then the logs after it; first-release migration.

A mixin of ``LocalStore`` (see there for the files and rules): reading what is on disk is
one concern, serving calls another.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import time
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag

from service.store import legacy
from service.store.base import SpeakerRecord, StoreCorrupt
from service.store.faiss_index import CollectionIndex
from service.store.keys import Sealed
from service.store.snapshot import read_snapshot
from service.store.wal import LogWriter, scan_log

__all__ = ["Recovery", "SNAP_RE", "WAL_RE", "unpack"]

log = logging.getLogger("spkserve.store")

WAL_RE = re.compile(r"wal-(\d{8})\.log")
SNAP_RE = re.compile(r"snapshot-(\d{8})\.bin")
_KNOWN = re.compile(r"keys\.bin|snapshot\.npz|damaged|audio")


def unpack(data: bytes, dtype) -> tuple[dict, np.ndarray]:
    """(JSON head, array) of a sealed payload."""
    (n,) = struct.unpack_from("<I", data)
    return json.loads(data[4:4 + n]), np.frombuffer(data[4 + n:], dtype=dtype)


def _zeros(path: Path, offset: int) -> bool:
    """Whether the file holds only zero bytes from ``offset`` on."""
    with open(path, "rb") as f:
        f.seek(offset)
        return not f.read().strip(b"\x00")


class Recovery:
    """Start-up and migration methods of ``LocalStore``."""

    def _recover(self) -> None:
        t0 = time.monotonic()
        snaps, wals, legacy_snapshot = [], [], None
        for p in sorted(self.dir.iterdir()):
            if m := SNAP_RE.fullmatch(p.name):
                snaps.append(int(m.group(1)))
            elif m := WAL_RE.fullmatch(p.name):
                wals.append(int(m.group(1)))
            elif p.name.endswith(".tmp") or p.name.endswith(".repair"):
                log.warning("removing %s, left by an interrupted write", p)
                p.unlink()
            elif p.name == "snapshot.npz":
                legacy_snapshot = p
            elif not _KNOWN.fullmatch(p.name):
                log.warning("ignoring %s: not a file of the speaker store", p)
        first = 0
        if snaps:
            first = snaps[-1]
            older = snaps[:-1]
            fallback = (f"The previous snapshot {self._snap_path(older[-1]).name} and the logs after it also hold "
                        f"the state: move {self._snap_path(first).name} out of {self.dir} and start again."
                        if older else f"Restore {self.dir} from a backup.")
            self._load_snapshot(self._snap_path(first), fallback)
        migrated = legacy_snapshot is not None
        if legacy_snapshot is not None:
            first, colls = legacy.read_v1_snapshot(legacy_snapshot)
            for c in colls:
                for s in c["speakers"]:
                    self._replay_plain({"op": "enroll", "c": c["name"], "model": c["model"], "dim": c["dim"],
                                        "spk": s["id"], "n": s["count"], "meta": s["meta"], "ts": s["updated"],
                                        "speech": s.get("speech")}, s["sum"][None], created=s["created"])
        logs = [g for g in wals if g >= first]
        replayed, shredded = 0, 0
        for i, gen in enumerate(logs):
            path = self._wal_path(gen)
            scan = scan_log(path)
            if scan.damage:
                d = scan.damage[0]
                raise StoreCorrupt(
                    f"{path} is damaged at byte {d.offset} ({d.end - d.offset} bytes: {d.reason}); "
                    f"{scan.records_after(d.offset)} intact records follow it. Nothing was changed. Run "
                    f"`spkserve repair-log --data-dir {self.dir}` to keep every intact record and set the damaged "
                    "bytes aside (it reports what was lost), or restore the directory from a backup.")
            if scan.torn_tail:
                if i != len(logs) - 1:
                    raise StoreCorrupt(f"{path} ends in an incomplete record at byte {scan.torn_tail[0]} but is not the "
                                       f"last log; run `spkserve repair-log --data-dir {self.dir}`")
                if _zeros(path, scan.torn_tail[0]):
                    log.warning("%s: cutting off %d zero bytes after the last intact record at byte %d; the file "
                                "kept its length but not its data (power loss on a device that drops written data): "
                                "the last enroll or delete was possibly acknowledged and is lost, so check the last "
                                "speakers changed before the crash", path, scan.torn_tail[1], scan.torn_tail[0])
                else:
                    log.warning("%s: cutting off %d bytes of an incomplete last record at byte %d (a crash mid-write; "
                                "it was never acknowledged)", path, scan.torn_tail[1], scan.torn_tail[0])
                with open(path, "r+b") as f:
                    f.truncate(scan.torn_tail[0])
                    os.fsync(f.fileno())
            if scan.version == 1:
                migrated = True
                for op, emb in legacy.v1_ops(scan.records):
                    self._replay_plain(op, emb)
                replayed += len(scan.records)
                continue
            for rec in scan.records:
                shredded += self._replay(rec.head, rec.blob, path, rec.offset)
            replayed += len(scan.records)
        self._gen = max([first] + logs)
        self._since_snapshot = replayed
        live = set(self._slots.values())
        for slot in sorted(self._keys.slots_in_use() - live):  # deletes whose key destruction did not finish
            self._audio.remove(slot)
            self._try_destroy(slot)
        if not migrated:
            self._writer = LogWriter(self._wal_path(self._gen), self.fsync, self.ops)
        if migrated:
            self._migrate(legacy_snapshot, logs)
        n = sum(len(c.speakers) for c in self._collections.values())
        log.info("speaker store at %s: %d collections, %d speakers (%d log records replayed, %d of deleted speakers "
                 "unreadable) in %.2f s", self.dir, len(self._collections), n, replayed, shredded, time.monotonic() - t0)

    def _migrate(self, legacy_snapshot: Path | None, logs: list[int]) -> None:
        """Move first-release data (plain text) to sealed records, then scrub the old files."""
        self._owners.clear()
        for (c, spk) in sorted(self._slots):
            slot = self._keys.allocate()
            self._keys.new_key(slot, c)
            self._slots[(c, spk)] = slot
            self._owners[slot] = (c, spk)
        self._rotate_and_snapshot(scrub=True)
        if legacy_snapshot is not None:
            legacy.scrub(legacy_snapshot)
        log.warning("migrated %s from the first release's format; old plain-text files scrubbed", self.dir)

    def _load_snapshot(self, path: Path, fallback: str) -> None:
        meta, entries = read_snapshot(path, fallback)
        names = []
        for c in meta["collections"]:
            names.append(c["name"])
            if c["tombstones"]:
                self._tombstones[c["name"]] = set(c["tombstones"])
            if c["dim"]:
                self._collections[c["name"]] = CollectionIndex(c["name"], c["model"], c["dim"], self.options)
                self._collections[c["name"]].model_version = c.get("version", "")
        for e in entries:
            name = names[e.collection]
            key = self._keys.key(e.slot, name)
            if key is None:
                continue  # deleted after the snapshot: its key is gone
            try:
                info, s = unpack(Sealed(key, e.slot).open(e.sealed), np.float64)
            except InvalidTag:
                raise StoreCorrupt(f"snapshot {path}: the entry of key slot {e.slot} does not decrypt; {fallback}") from None
            self._collections[name].upsert(SpeakerRecord(
                info["spk"], s.copy(), info["count"], info["meta"], info["created"], info["updated"],
                speech=info["speech"], last_used_ms=info.get("used", info["updated"])))
            self._slots[(name, info["spk"])] = e.slot
            self._owners[e.slot] = (name, info["spk"])

    def _replay(self, head: dict, blob: bytes, path: Path, offset: int) -> int:
        """Apply one sealed record; returns 1 when it belonged to a deleted speaker (unreadable), else 0."""
        op = head["op"]
        if op in ("enroll", "meta"):
            key = self._keys.key(head["slot"], head["c"])
            if key is None:
                return 1
            try:
                body, emb = unpack(Sealed(key, head["slot"]).open(blob), np.float32)
            except InvalidTag:
                raise StoreCorrupt(f"{path}: the record at byte {offset} passes its checksum but does not decrypt "
                                   "with its speaker's key; keys.bin or the key files do not match this log") from None
            if op == "enroll":
                self._apply_enroll(head, body, emb)
            else:
                self._apply_meta(head, body)
        elif op in ("delete", "optout"):
            self._apply_delete(head)
        elif op == "drop":
            self._apply_drop(head)
        elif op == "touch":
            self._apply_touch(head)
        return 0

    def _replay_plain(self, op: dict, emb: np.ndarray | None, created: int | None = None) -> None:
        """Apply a first-release record (speaker ids in the head, embeddings in plain text)."""
        if op["op"] == "enroll":
            head = {"op": "enroll", "c": op["c"], "model": op["model"], "dim": op["dim"], "ts": op["ts"],
                    "slot": self._slots.get((op["c"], op["spk"]), -1)}
            body = {"spk": op["spk"], "meta": op["meta"], "speech": op.get("speech"), "n": op["n"]}
            rec, _ = self._apply_enroll(head, body, emb)
            if created is not None:
                rec.created_ms = created
        elif op["op"] == "delete":
            coll = self._collections.get(op["c"])
            if coll is not None and op["spk"] in coll.speakers:
                coll.remove(op["spk"])
                self._owners.pop(self._slots.pop((op["c"], op["spk"])), None)
