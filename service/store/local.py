"""The local speaker store: a write-ahead log, snapshots and per-speaker keys in one directory.

Files (mode 0600, directory 0700)::

    keys.bin               per-speaker keys (see ``keys``); zeroed on delete
    audio/<slot>.bin       retained enrollment audio, when the service keeps it (see ``audio``)
    wal-<gen>.log          write-ahead log (see ``wal``); records sealed per speaker
    snapshot-<gen>.bin     state before log ``gen`` (see ``snapshot``); the last two are kept

Durability: a mutation returns only after its log record (and, for a new speaker, its key) is
fsynced; a failed write is cut off again and answered UNAVAILABLE, never applied. A failed
snapshot only costs replay time: the log still holds everything, and the error is logged and
shown in health, not reported as the failure of the call that triggered it.

Deletion: the log record of the delete is written, then the speaker's key is destroyed; the
speaker's earlier records in logs and snapshots can no longer be read. What the store keeps of
a deleted or opted-out id is a keyed hash (tombstone), so it is not re-enrolled by accident.
Dropping a collection is one log record (its speakers' tombstones), then all their keys destroyed
with one fsync; keys a crash left behind are destroyed at the next start.

Start-up: the newest snapshot, then the logs from its generation. Only a torn tail of the last
log (a crash mid-append, or zeros after power loss) is cut off; damage anywhere else stops
start-up with the file, offset and the intact records after it, and ``spkserve repair-log``
fixes it keeping every intact record.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.store.base import (CollectionInfo, IndexOptions, SpeakerRecord, SpeakerStore, StatsFn,
                                StoreUnavailable, check_binding, check_merged_metadata, not_empty, quoted,
                                validate_metadata)
from service.store.audio import RetainedAudio
from service.store.faiss_index import CollectionIndex
from service.store.keys import KeyFile, KeyRing, Sealed
from service.store.generations import Generations, now_ms, pack
from service.store.local_state import RecordState
from service.store.recovery import Recovery
from service.store.wal import FileOps, LogWriter

__all__ = ["LocalStore"]

log = logging.getLogger("spkserve.store")




class LocalStore(Generations, Recovery, RecordState, SpeakerStore):
    """All collections, persisted under ``data_dir``. Thread-safe; calls block on disk I/O.

    Args:
        data_dir: the directory (created 0700).
        options: search index settings of collections.
        fsync: fsync every change (disable only for benchmarks).
        snapshot_every: log records between snapshots.
        key_files: key files for encryption at rest (see ``keys``); empty: slot keys unwrapped.
        ops: system calls of the log writer (fault injection in tests).
    """

    def __init__(self, data_dir: str | os.PathLike, options: IndexOptions | None = None, fsync: bool = True,
                 snapshot_every: int = 10000, key_files: list[KeyFile] | tuple[KeyFile, ...] = (),
                 ops: FileOps | None = None):
        self.dir = Path(data_dir)
        self.options = options or IndexOptions()
        self.fsync = fsync
        self.snapshot_every = snapshot_every
        self.ops = ops or FileOps()
        self._lock = threading.RLock()
        self._stats_fn: StatsFn | None = None
        self._collections: dict[str, CollectionIndex] = {}
        self._slots: dict[tuple[str, str], int] = {}  # (collection, speaker) -> key slot
        self._owners: dict[int, tuple[str, str]] = {}  # key slot -> (collection, speaker)
        self._tombstones: dict[str, set[str]] = {}
        self._touched: set[tuple[str, str]] = set()
        self._pending_shred: set[int] = set()
        self._gen = 0
        self._since_snapshot = 0
        self._writer: LogWriter | None = None
        self.last_snapshot_error: str | None = None
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.dir.stat().st_mode & 0o077:
            log.warning("%s was readable by group or others; restricting it to its owner (0700)", self.dir)
            os.chmod(self.dir, 0o700)
        self._keys = KeyRing(self.dir / "keys.bin", key_files, fsync)
        self._audio = RetainedAudio(self.dir / "audio", fsync)
        try:
            self._recover()
        except BaseException:
            self.abandon()  # release the directory (the lock) for repair-log or a retry
            raise

    # -- reads ------------------------------------------------------------------------
    def get(self, collection: str, speaker_id: str) -> SpeakerRecord:
        """``SpeakerStore.get`` (service/store/base.py)."""
        with self._lock:
            rec = self._collection(collection).speakers.get(speaker_id)
            if rec is None:
                raise NotFound(f"speaker_id: {quoted(speaker_id)} is not enrolled in collection {quoted(collection)}")
            return rec

    def list(self, collection: str, offset: int, limit: int) -> tuple[list[SpeakerRecord], int]:
        """``SpeakerStore.list`` (service/store/base.py)."""
        with self._lock:
            coll = self._collection(collection)
            ids = sorted(coll.speakers)
            return [coll.speakers[i] for i in ids[offset:offset + limit]], len(ids)

    def search(self, collection: str, model: str, query: np.ndarray, k: int,
               keep: Callable[[SpeakerRecord], bool] | None = None,
               model_version: str = "") -> list[tuple[SpeakerRecord, float]]:
        """``SpeakerStore.search`` (service/store/base.py)."""
        with self._lock:
            coll = self._collection(collection)
            check_binding(collection, coll.model, coll.dim, coll.model_version, model, query.shape[0], model_version,
                          probe=True)
            return coll.search(query, k, keep)

    def collection_model(self, collection: str) -> str:
        """``SpeakerStore.collection_model`` (service/store/base.py)."""
        with self._lock:
            return self._collection(collection).model

    def collection_binding(self, collection: str) -> tuple[str, str]:
        """``SpeakerStore.collection_binding`` (service/store/base.py)."""
        with self._lock:
            coll = self._collection(collection)
            return coll.model, coll.model_version

    def collections(self) -> list[CollectionInfo]:
        """``SpeakerStore.collections`` (service/store/base.py)."""
        with self._lock:
            return [self._collections[n].info() for n in sorted(self._collections)]

    def speaker_count(self, collection: str) -> int:
        """``SpeakerStore.speaker_count`` (service/store/base.py)."""
        with self._lock:
            return len(self._collection(collection).speakers)

    @property
    def writable(self) -> bool:
        """``SpeakerStore.writable`` (service/store/base.py)."""
        return self._writer is not None and not self._writer.broken and not self._pending_shred

    def state(self) -> str:
        """'ok', or why writes are stopped or the last snapshot failed (for health and logs)."""
        if self._writer is not None and self._writer.broken:
            return f"read-only: {self._writer.broken}"
        if self._pending_shred:
            return f"read-only: keys of {len(self._pending_shred)} deleted speakers still to destroy"
        if self.last_snapshot_error:
            return f"ok (last snapshot failed: {self.last_snapshot_error})"
        return "ok"

    # -- writes -----------------------------------------------------------------------
    def set_stats_fn(self, fn: StatsFn | None) -> None:
        """``SpeakerStore.set_stats_fn`` (service/store/base.py)."""
        with self._lock:
            self._stats_fn = fn
            for coll in self._collections.values():
                recs = list(coll.speakers.values())
                stats = self._stats(coll.model, recs)
                for i, rec in enumerate(recs):
                    rec.stats = None if stats is None else stats[i]

    def _stats(self, model: str, recs: list[SpeakerRecord]) -> np.ndarray | None:
        if self._stats_fn is None or not recs:
            return None
        return self._stats_fn(model, np.stack([r.voiceprint for r in recs]))  # (N, 2)

    def enroll(self, collection: str, model: str, speaker_id: str, embeddings: np.ndarray,
               metadata: dict[str, str] | None = None, speech: float = 0.0,
               allow_reenroll: bool = False, model_version: str = "",
               audio: list[tuple[int, np.ndarray]] | None = None) -> tuple[SpeakerRecord, bool]:
        """``SpeakerStore.enroll`` (service/store/base.py)."""
        metadata = validate_metadata(metadata or {})
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
        if embeddings.ndim != 2 or not np.isfinite(embeddings).all():
            raise InvalidArgument("embeddings", "must be finite (N, D) values")
        with self._lock:
            coll = self._collections.get(collection)
            if coll is not None:
                check_binding(collection, coll.model, coll.dim, coll.model_version, model, embeddings.shape[1],
                              model_version, probe=False)
            tomb = self._keys.tombstone(collection, speaker_id)
            if tomb in self._tombstones.get(collection, ()) and not allow_reenroll:
                raise FailedPrecondition(
                    f"speaker_id: {quoted(speaker_id)} was deleted from or opted out of collection {quoted(collection)}; "
                    "set allow_reenroll to enroll it again")
            self._check_writable()
            slot = self._slots.get((collection, speaker_id))
            created = slot is None
            if not created:
                check_merged_metadata(coll.speakers[speaker_id].metadata, metadata)
            else:
                check_merged_metadata({}, metadata)
            if created:
                slot = self._keys.allocate()
                key = self._keys.new_key(slot, collection)
            else:
                key = self._keys.key(slot, collection)
            ts = now_ms()
            body = {"spk": speaker_id, "meta": metadata, "speech": round(float(speech), 4), "n": int(len(embeddings))}
            head = {"op": "enroll", "c": collection, "model": model, "dim": int(embeddings.shape[1]), "slot": slot,
                    "ts": ts, "mv": model_version}
            if tomb in self._tombstones.get(collection, ()):
                head["reenroll"] = tomb
            try:
                undo = self._audio.append(slot, key, audio) if audio else None
            except StoreUnavailable:
                if created:
                    self._try_destroy(slot)
                raise
            try:
                self._writer.append(head, Sealed(key, slot).seal(pack(body, embeddings)))
            except StoreUnavailable:
                if undo is not None:
                    self._audio.truncate(slot, undo)
                if created:
                    self._try_destroy(slot)
                raise
            result = self._apply_enroll(head, body, embeddings)
            stats = self._stats(model, [result[0]])
            result[0].stats = None if stats is None else stats[0]
            self._after_write()
            return result

    def delete(self, collection: str, speaker_id: str, opt_out: bool = False) -> SpeakerRecord | None:
        """``SpeakerStore.delete`` (service/store/base.py)."""
        with self._lock:
            rec = self._collections.get(collection) and self._collections[collection].speakers.get(speaker_id)
            if rec is None and not opt_out:
                self.get(collection, speaker_id)  # raises NotFound naming what is missing
            self._check_writable()
            tomb = self._keys.tombstone(collection, speaker_id)
            slot = self._slots.get((collection, speaker_id))
            head = {"op": "delete" if rec else "optout", "c": collection, "tomb": tomb, "ts": now_ms()}
            if rec:
                head["slot"] = slot
            self._writer.append(head)
            self._apply_delete(head)
            if rec:
                self._audio.remove(slot)
                self._shred(slot, f"speaker_id {quoted(speaker_id)} was deleted")
            self._after_write()
            return rec or None

    def update_metadata(self, collection: str, speaker_id: str, metadata: dict[str, str],
                        remove: list[str]) -> SpeakerRecord:
        """``SpeakerStore.update_metadata`` (service/store/base.py): one log record sealed with the speaker's key."""
        metadata = validate_metadata(metadata)
        with self._lock:
            rec = self.get(collection, speaker_id)
            check_merged_metadata(rec.metadata, metadata, remove, change="update")
            self._check_writable()
            slot = self._slots[(collection, speaker_id)]
            head = {"op": "meta", "c": collection, "slot": slot, "ts": now_ms()}
            body = {"spk": speaker_id, "set": metadata, "remove": sorted(set(remove))}
            self._writer.append(head, Sealed(self._keys.key(slot, collection), slot).seal(
                pack(body, np.zeros(0, np.float32))))
            self._apply_meta(head, body)
            self._after_write()
            return self.get(collection, speaker_id)

    def drop_collection(self, collection: str, force: bool = False) -> CollectionInfo:
        """``SpeakerStore.drop_collection`` (service/store/base.py): one log record (the speakers' tombstones), then
        each speaker's key destroyed, as ``delete`` does one by one."""
        with self._lock:
            info = self._collection(collection).info()
            if info.speaker_count and not force:
                raise not_empty(collection, info.speaker_count)
            self._check_writable()
            speakers = sorted(self._collections[collection].speakers)
            slots = [self._slots[(collection, spk)] for spk in speakers]
            head = {"op": "drop", "c": collection, "tombs": [self._keys.tombstone(collection, spk) for spk in speakers],
                    "ts": now_ms()}
            self._writer.append(head)
            self._apply_drop(head)
            for slot in slots:
                self._audio.remove(slot)
            try:
                self._keys.destroy_many(slots)
            except StoreUnavailable as e:  # the collection is gone either way; writes stop until its keys are destroyed
                self._pending_shred.update(slots)
                raise StoreUnavailable(f"collection {quoted(collection)} was deleted, but destroying its speakers' "
                                       f"keys failed ({e}); writes are stopped until they are destroyed (retried with "
                                       "every write)") from None
            self._after_write()
            return info

    def retained_audio(self, collection: str, speaker_id: str) -> list[tuple[int, np.ndarray]]:
        """``SpeakerStore.retained_audio`` (service/store/base.py)."""
        with self._lock:
            self.get(collection, speaker_id)
            slot = self._slots[(collection, speaker_id)]
            return self._audio.read(slot, self._keys.key(slot, collection))

    def touch(self, collection: str, speaker_ids: list[str]) -> None:
        """``SpeakerStore.touch`` (service/store/base.py)."""
        now = now_ms()
        with self._lock:
            coll = self._collections.get(collection)
            for spk in speaker_ids:
                rec = coll and coll.speakers.get(spk)
                if rec:
                    rec.last_used_ms = now
                    self._touched.add((collection, spk))

    def flush_touches(self) -> None:
        """Write the last-use times recorded since the last flush (one log record per collection)."""
        with self._lock:
            by_coll: dict[str, list] = {}
            for c, spk in self._touched:
                slot = self._slots.get((c, spk))
                if slot is not None:
                    by_coll.setdefault(c, []).append([slot, self._collections[c].speakers[spk].last_used_ms])
            if not by_coll or not self.writable:
                return
            for c, used in by_coll.items():
                self._writer.append({"op": "touch", "c": c, "used": used})
                self._since_snapshot += 1
            self._touched.clear()

    def expire(self, older_than_ms: int) -> int:
        """``SpeakerStore.expire`` (service/store/base.py)."""
        with self._lock:
            self.flush_touches()
            old = [(c.name, r.speaker_id) for c in self._collections.values() for r in c.speakers.values()
                   if r.last_used_ms < older_than_ms]
            for c, spk in old:
                self.delete(c, spk)
            if old:
                log.info("retention: deleted %d speakers unused since %s", len(old),
                         time.strftime("%Y-%m-%d %H:%M", time.gmtime(older_than_ms / 1000)))
            return len(old)

    def snapshot(self) -> None:
        """Write the full state to a new snapshot and start a new log generation (raises on failure)."""
        with self._lock:
            self._rotate_and_snapshot()

    def close(self) -> None:
        """``SpeakerStore.close`` (service/store/base.py)."""
        with self._lock:
            if self._writer is None:
                return
            try:
                self.flush_touches()
                if self.writable:
                    self._rotate_and_snapshot()
            except StoreUnavailable as e:
                log.error("closing the speaker store: %s; the log still holds every acknowledged change", e)
            self._writer.close()
            self._writer = None
            self._keys.close()

    def abandon(self) -> None:
        """Release the files without flushing or snapshotting, as a killed process would (for crash tests)."""
        with self._lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            self._keys.close()

    # -- internals --------------------------------------------------------------------
    def _collection(self, name: str) -> CollectionIndex:
        coll = self._collections.get(name)
        if coll is None:
            raise NotFound(f"collection: {quoted(name)} does not exist")
        return coll

    def _check_writable(self) -> None:
        if self._writer is None:
            raise StoreUnavailable("speaker store: closed")
        for slot in sorted(self._pending_shred):
            self._shred(slot, "an earlier delete")
        if self._writer.broken:
            raise StoreUnavailable(f"speaker store: writes are stopped until restart ({self._writer.broken})")

    def _shred(self, slot: int, what: str) -> None:
        try:
            self._keys.destroy(slot)
            self._pending_shred.discard(slot)
        except StoreUnavailable as e:
            self._pending_shred.add(slot)
            raise StoreUnavailable(f"{what}, but destroying its key failed ({e}); writes are stopped until the key "
                                   "is destroyed (retried with every write)") from None

    def _try_destroy(self, slot: int) -> None:
        try:
            self._keys.destroy(slot)
        except StoreUnavailable:
            self._pending_shred.add(slot)

    def _after_write(self) -> None:
        self._since_snapshot += 1
        if self._since_snapshot < self.snapshot_every:
            return
        try:
            self._rotate_and_snapshot()
        except StoreUnavailable as e:
            self.last_snapshot_error = str(e)
            self._since_snapshot = self.snapshot_every // 2  # try again later, not after every write
            log.error("%s; the write-ahead log still holds every acknowledged change", e)
