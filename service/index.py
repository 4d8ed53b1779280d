"""Durable speaker store: collections of voiceprints, FAISS search, write-ahead log.

Durability: every mutation (enroll, delete) is appended to a write-ahead log as a
length-prefixed, CRC-checked record and fsynced before the call returns, so an enrollment
acknowledged to a client survives ``kill -9``. Every ``snapshot_every`` records the whole
state is written to ``snapshot.npz`` (temp file, fsync, atomic rename) and older logs are
removed. Start-up loads the snapshot and replays the logs that follow it; a torn last record
(crash mid-write) is detected by its CRC and cut off.

A speaker's voiceprint is the L2-normalised mean of its utterances' L2-normalised
embeddings. The running sum is kept in float64 with the utterance count, so appending to a
speaker gives exactly the voiceprint of enrolling all utterances at once. The net speech
enrolled is summed the same way, and each voiceprint keeps its cohort statistics (mean and
standard deviation of its scores against the model's impostor cohort, for S-norm), computed
when the voiceprint changes rather than at every query.

Search: exact inner product (``IndexFlatIP``) by default; HNSW or IVF for large collections.
FAISS indexes are derived state, rebuilt from the voiceprints at start-up.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from service.errors import FailedPrecondition, InvalidArgument, NotFound

__all__ = ["SpeakerStore", "SpeakerRecord", "IndexOptions", "CollectionInfo", "validate_collection", "validate_speaker_id"]

log = logging.getLogger("spkserve.index")

_COLLECTION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HEADER = struct.Struct("<II")  # payload length, crc32
_MAX_METADATA = 64


def validate_collection(name: str, field_name: str = "collection") -> str:
    """Return the collection name ('default' for empty) or raise InvalidArgument."""
    name = name or "default"
    if not _COLLECTION_RE.match(name):
        raise InvalidArgument(field_name, f"{name[:64]!r} is not a valid collection name (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
    return name


def validate_speaker_id(speaker_id: str, field_name: str = "speaker_id") -> str:
    """Return the speaker id or raise InvalidArgument (empty, too long, control characters)."""
    if not speaker_id:
        raise InvalidArgument(field_name, "is empty")
    if len(speaker_id) > 256:
        raise InvalidArgument(field_name, f"is {len(speaker_id)} characters long, at most 256 allowed")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in speaker_id):
        raise InvalidArgument(field_name, f"{speaker_id[:64]!r} contains control characters")
    return speaker_id


def _validate_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > _MAX_METADATA:
        raise InvalidArgument("metadata", f"has {len(metadata)} entries, at most {_MAX_METADATA} allowed")
    for k, v in metadata.items():
        if not k or len(k) > 128:
            raise InvalidArgument("metadata", f"key {k[:64]!r} must be 1-128 characters")
        if len(v) > 1024:
            raise InvalidArgument(f"metadata[{k!r}]", f"value is {len(v)} characters long, at most 1024 allowed")
    return dict(metadata)


@dataclass
class IndexOptions:
    """Search index settings of new collections."""

    index_type: str = "flat"  # flat | hnsw | ivf
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32


@dataclass
class SpeakerRecord:
    """One enrolled speaker."""

    speaker_id: str
    sum: np.ndarray  # (D,) float64 sum of unit utterance embeddings
    count: int
    metadata: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0
    updated_ms: int = 0
    label: int = -1  # FAISS id
    speech: float | None = 0.0  # net speech seconds enrolled; None: enrolled before speech was measured
    stats: np.ndarray | None = None  # (2,) cohort (mean, std) of the voiceprint; None: the model has no cohort

    @property
    def voiceprint(self) -> np.ndarray:
        """The L2-normalised mean embedding, (D,) float32."""
        return (self.sum / max(np.linalg.norm(self.sum), 1e-12)).astype(np.float32)


@dataclass
class CollectionInfo:
    """Summary of a collection."""

    name: str
    model: str
    dim: int
    speaker_count: int
    index_type: str


class _Collection:
    """Speakers of one collection and their FAISS index (derived state)."""

    def __init__(self, name: str, model: str, dim: int, options: IndexOptions):
        self.name, self.model, self.dim, self.options = name, model, dim, options
        self.speakers: dict[str, SpeakerRecord] = {}
        self.by_label: dict[int, str] = {}
        self._next_label = 0
        self._index = None
        self._stale = 0  # HNSW entries of deleted/updated speakers still in the graph
        self._dirty = True
        self._built_kind = ""

    # FAISS indexes are rebuilt lazily: mutations mark them dirty or patch them in place.
    def _build(self):
        import faiss

        ids = np.fromiter((r.label for r in self.speakers.values()), dtype=np.int64, count=len(self.speakers))
        vecs = np.stack([r.voiceprint for r in self.speakers.values()]) if self.speakers else np.zeros((0, self.dim), np.float32)
        kind = self.options.index_type
        if kind == "hnsw":
            index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(self.dim, self.options.hnsw_m, faiss.METRIC_INNER_PRODUCT))
            faiss.downcast_index(index.index).hnsw.efSearch = self.options.hnsw_ef_search
        elif kind == "ivf" and self._index_kind() == "ivf":
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.options.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(vecs)
            index.nprobe = self.options.ivf_nprobe
        else:  # flat, or IVF with too few points to train (exact search is cheap there)
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if len(vecs):
            index.add_with_ids(vecs, ids)
        self._index, self._stale, self._dirty = index, 0, False
        self._built_kind = self._index_kind()

    def _index_kind(self) -> str:
        """The index searches use: IVF only once there are enough points to train it."""
        kind = self.options.index_type
        if kind == "ivf" and len(self.speakers) < 39 * self.options.ivf_nlist:
            return "flat"
        return kind

    def upsert(self, rec: SpeakerRecord) -> None:
        """Add or replace a speaker in the collection and its index."""
        old = self.speakers.get(rec.speaker_id)
        if old is not None:
            self._remove_from_index(old.label)
        rec.label = self._next_label
        self._next_label += 1
        self.speakers[rec.speaker_id] = rec
        self.by_label[rec.label] = rec.speaker_id
        if self._index_kind() != self._built_kind:
            self._dirty = True  # e.g. an IVF collection grew large enough to train
        if not self._dirty and self._index is not None:
            self._index.add_with_ids(rec.voiceprint[None], np.array([rec.label], dtype=np.int64))

    def remove(self, speaker_id: str) -> SpeakerRecord:
        """Remove a speaker; returns its record."""
        rec = self.speakers.pop(speaker_id)
        self._remove_from_index(rec.label)
        return rec

    def _remove_from_index(self, label: int) -> None:
        self.by_label.pop(label, None)
        if self._dirty or self._index is None:
            return
        if self.options.index_type == "hnsw":
            self._stale += 1  # HNSW cannot remove: filter at search time, rebuild when too stale
            if self._stale > max(64, len(self.speakers) // 5):
                self._dirty = True
        else:
            self._index.remove_ids(np.array([label], dtype=np.int64))

    def search(self, query: np.ndarray, k: int, keep: Callable[[SpeakerRecord], bool] | None = None
               ) -> list[tuple[SpeakerRecord, float]]:
        """Top-k (record, score) for a (D,) unit query, best first, among records ``keep`` accepts."""
        if not self.speakers:
            return []
        if self._dirty or self._index is None:
            self._build()
        fetch = k
        while True:
            n = min(fetch + self._stale, len(self.speakers) + self._stale)
            scores, labels = self._index.search(query[None].astype(np.float32), n)  # (1, n)
            out = []
            for s, lab in zip(scores[0], labels[0]):
                spk = self.by_label.get(int(lab))
                if lab < 0 or spk is None:
                    continue
                rec = self.speakers[spk]
                if keep is None or keep(rec):
                    out.append((rec, float(s)))
                if len(out) == k:
                    return out
            if n >= len(self.speakers) + self._stale:
                return out
            fetch *= 4  # filtered records took places: look further

    def info(self) -> CollectionInfo:
        """Summary of this collection."""
        return CollectionInfo(self.name, self.model, self.dim, len(self.speakers), self._index_kind())


def _now_ms() -> int:
    return int(time.time() * 1000)


class SpeakerStore:
    """All collections, persisted under ``data_dir``. Thread-safe; calls block on disk I/O.

    Args:
        data_dir: directory for ``snapshot.npz`` and ``wal-<generation>.log`` files.
        options: index settings of collections.
        fsync: fsync every log record (disable only for benchmarks).
        snapshot_every: log records between snapshots.
    """

    def __init__(self, data_dir: str | os.PathLike, options: IndexOptions | None = None,
                 fsync: bool = True, snapshot_every: int = 10000):
        self.dir = Path(data_dir)
        self._stats_fn: Callable[[str, np.ndarray], np.ndarray | None] | None = None
        self.options = options or IndexOptions()
        self.fsync = fsync
        self.snapshot_every = snapshot_every
        self._lock = threading.RLock()
        self._collections: dict[str, _Collection] = {}
        self._gen = 0
        self._records_since_snapshot = 0
        self._wal = None
        self.dir.mkdir(parents=True, exist_ok=True)
        self._recover()

    # -- public API -------------------------------------------------------------------
    def set_stats_fn(self, fn: Callable[[str, np.ndarray], np.ndarray | None] | None) -> None:
        """Set how voiceprints get cohort statistics and (re)compute them for every speaker.

        Args:
            fn: (model name, (N, D) unit voiceprints) -> (N, 2) (mean, std) rows, or None when
                the model has no cohort.
        """
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
               metadata: dict[str, str] | None = None, speech: float = 0.0) -> tuple[SpeakerRecord, bool]:
        """Add unit embeddings (N, D) to a speaker, creating speaker and collection as needed.

        Args:
            speech: net speech seconds behind the embeddings (counted toward the speaker's total).

        Returns:
            (the updated record, whether the speaker was created).

        Raises:
            FailedPrecondition: the collection belongs to another model or dimension.
            InvalidArgument: bad metadata.
        """
        metadata = _validate_metadata(metadata or {})
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)  # (N, D)
        with self._lock:
            self._check_model(collection, model, embeddings.shape[1])
            op = {"op": "enroll", "c": collection, "model": model, "spk": speaker_id, "n": int(embeddings.shape[0]),
                  "dim": int(embeddings.shape[1]), "meta": metadata, "ts": _now_ms(), "speech": round(float(speech), 4)}
            self._append(op, embeddings.tobytes())
            result = self._apply_enroll(op, embeddings)
            stats = self._stats(model, [result[0]])
            result[0].stats = None if stats is None else stats[0]
            self.maybe_snapshot()
            return result

    def delete(self, collection: str, speaker_id: str) -> SpeakerRecord:
        """Remove a speaker; returns the removed record. Raises NotFound."""
        with self._lock:
            rec = self.get(collection, speaker_id)
            self._append({"op": "delete", "c": collection, "spk": speaker_id, "ts": _now_ms()}, b"")
            self._apply_delete(collection, speaker_id)
            self.maybe_snapshot()
            return rec

    def get(self, collection: str, speaker_id: str) -> SpeakerRecord:
        """A speaker's record. Raises NotFound for an unknown collection or speaker."""
        with self._lock:
            coll = self._collection(collection)
            rec = coll.speakers.get(speaker_id)
            if rec is None:
                raise NotFound(f"speaker_id: {speaker_id!r} is not enrolled in collection {collection!r}")
            return rec

    def list(self, collection: str, offset: int, limit: int) -> tuple[list[SpeakerRecord], int]:
        """Speakers sorted by id from ``offset``; returns (page, total)."""
        with self._lock:
            coll = self._collection(collection)
            ids = sorted(coll.speakers)
            return [coll.speakers[i] for i in ids[offset:offset + limit]], len(ids)

    def search(self, collection: str, model: str, query: np.ndarray, k: int,
               keep: Callable[[SpeakerRecord], bool] | None = None) -> list[tuple[SpeakerRecord, float]]:
        """Top-k (record, cosine) for a (D,) unit query of ``model``, best first.

        Args:
            keep: only records it accepts are returned (e.g. speakers with enough speech).
        """
        with self._lock:
            coll = self._collection(collection)
            if coll.model != model or coll.dim != query.shape[0]:
                raise FailedPrecondition(
                    f"collection {collection!r} holds voiceprints of model {coll.model!r} (dim {coll.dim}); "
                    f"the probe is from model {model!r} (dim {query.shape[0]})")
            return coll.search(query, k, keep)

    def collection_model(self, collection: str) -> str:
        """The model a collection is bound to. Raises NotFound."""
        with self._lock:
            return self._collection(collection).model

    def collections(self) -> list[CollectionInfo]:
        """Summaries of all collections, sorted by name."""
        with self._lock:
            return [self._collections[n].info() for n in sorted(self._collections)]

    def snapshot(self) -> None:
        """Write the full state to disk and start a new log generation."""
        with self._lock:
            self._rotate_and_snapshot()

    def close(self) -> None:
        """Snapshot and close the log."""
        with self._lock:
            if self._wal is not None:
                self._rotate_and_snapshot()
                self._wal.close()
                self._wal = None

    # -- state changes (shared by live calls and replay) ------------------------------
    def _collection(self, name: str) -> _Collection:
        coll = self._collections.get(name)
        if coll is None:
            raise NotFound(f"collection: {name!r} does not exist")
        return coll

    def _check_model(self, collection: str, model: str, dim: int) -> None:
        coll = self._collections.get(collection)
        if coll is not None and (coll.model != model or coll.dim != dim):
            raise FailedPrecondition(
                f"collection {collection!r} holds voiceprints of model {coll.model!r} (dim {coll.dim}); "
                f"cannot add embeddings of model {model!r} (dim {dim})")

    def _apply_enroll(self, op: dict, embeddings: np.ndarray) -> tuple[SpeakerRecord, bool]:
        coll = self._collections.get(op["c"])
        if coll is None:
            coll = self._collections[op["c"]] = _Collection(op["c"], op["model"], op["dim"], self.options)
        old = coll.speakers.get(op["spk"])
        added = embeddings.astype(np.float64).sum(axis=0)  # (D,)
        speech = op.get("speech")  # absent in logs written before speech was measured
        if old is None:
            rec = SpeakerRecord(op["spk"], added, op["n"], dict(op["meta"]), op["ts"], op["ts"], speech=speech)
        else:
            total = None if old.speech is None or speech is None else old.speech + speech
            rec = SpeakerRecord(op["spk"], old.sum + added, old.count + op["n"], {**old.metadata, **op["meta"]},
                                old.created_ms, op["ts"], speech=total)
        coll.upsert(rec)
        return rec, old is None

    def _apply_delete(self, collection: str, speaker_id: str) -> None:
        coll = self._collections.get(collection)
        if coll is not None and speaker_id in coll.speakers:
            coll.remove(speaker_id)

    # -- write-ahead log --------------------------------------------------------------
    def _wal_path(self, gen: int) -> Path:
        return self.dir / f"wal-{gen:08d}.log"

    def _open_wal(self) -> None:
        self._wal = open(self._wal_path(self._gen), "ab")
        self._fsync_dir()

    def _append(self, op: dict, blob: bytes) -> None:
        head = json.dumps(op, separators=(",", ":")).encode()
        payload = struct.pack("<I", len(head)) + head + blob
        self._wal.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
        self._wal.flush()
        if self.fsync:
            os.fsync(self._wal.fileno())
        self._records_since_snapshot += 1

    def _fsync_dir(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def maybe_snapshot(self) -> bool:
        """Snapshot if enough log records have accumulated; returns whether it did."""
        with self._lock:
            if self._records_since_snapshot >= self.snapshot_every:
                self._rotate_and_snapshot()
                return True
            return False

    def _rotate_and_snapshot(self) -> None:
        # 1. new writes go to a new generation; 2. the snapshot covers everything before it;
        # 3. older generations are deleted. A crash between steps leaves a replayable state.
        if self._wal is not None:
            self._wal.close()
        self._gen += 1
        self._open_wal()
        self._write_snapshot(self._gen)
        for p in self.dir.glob("wal-*.log"):
            if int(p.stem.split("-")[1]) < self._gen:
                p.unlink()
        self._records_since_snapshot = 0

    def _write_snapshot(self, next_gen: int) -> None:
        arrays: dict[str, np.ndarray] = {}
        meta = {"next_gen": next_gen, "collections": []}
        for ci, name in enumerate(sorted(self._collections)):
            coll = self._collections[name]
            ids = sorted(coll.speakers)
            recs = [coll.speakers[i] for i in ids]
            arrays[f"sum_{ci}"] = np.stack([r.sum for r in recs]) if recs else np.zeros((0, coll.dim))
            meta["collections"].append({
                "name": name, "model": coll.model, "dim": coll.dim,
                "speakers": [{"id": r.speaker_id, "count": r.count, "meta": r.metadata,
                              "created": r.created_ms, "updated": r.updated_ms, "speech": r.speech} for r in recs],
            })
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        tmp = self.dir / "snapshot.npz.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        os.replace(tmp, self.dir / "snapshot.npz")
        self._fsync_dir()

    def _recover(self) -> None:
        t0 = time.monotonic()
        first_gen = 0
        snap = self.dir / "snapshot.npz"
        if snap.exists():
            with np.load(snap) as z:
                meta = json.loads(z["meta"].tobytes())
                first_gen = meta["next_gen"]
                for ci, c in enumerate(meta["collections"]):
                    coll = self._collections[c["name"]] = _Collection(c["name"], c["model"], c["dim"], self.options)
                    sums = z[f"sum_{ci}"]
                    for s, row in zip(c["speakers"], sums):
                        coll.upsert(SpeakerRecord(s["id"], row.astype(np.float64), s["count"], s["meta"], s["created"],
                                                  s["updated"], speech=s.get("speech")))
        gens = sorted(int(p.stem.split("-")[1]) for p in self.dir.glob("wal-*.log"))
        replayed = 0
        for gen in gens:
            if gen < first_gen:
                continue
            replayed += self._replay(self._wal_path(gen))
        self._gen = max([first_gen] + gens)
        self._records_since_snapshot = replayed
        self._open_wal()
        n = sum(len(c.speakers) for c in self._collections.values())
        log.info("speaker store at %s: %d collections, %d speakers (%d log records replayed) in %.2f s",
                 self.dir, len(self._collections), n, replayed, time.monotonic() - t0)

    def _replay(self, path: Path) -> int:
        data = path.read_bytes()
        pos, count = 0, 0
        while pos + _HEADER.size <= len(data):
            length, crc = _HEADER.unpack_from(data, pos)
            payload = data[pos + _HEADER.size: pos + _HEADER.size + length]
            if len(payload) < length or zlib.crc32(payload) != crc:
                break
            (hlen,) = struct.unpack_from("<I", payload)
            op = json.loads(payload[4:4 + hlen])
            if op["op"] == "enroll":
                emb = np.frombuffer(payload[4 + hlen:], dtype=np.float32).reshape(op["n"], op["dim"])
                self._apply_enroll(op, emb)
            elif op["op"] == "delete":
                self._apply_delete(op["c"], op["spk"])
            pos += _HEADER.size + length
            count += 1
        if pos < len(data):  # torn tail from a crash mid-write: cut it off
            log.warning("%s: dropping %d bytes of an incomplete last record", path, len(data) - pos)
            with open(path, "r+b") as f:
                f.truncate(pos)
        return count
