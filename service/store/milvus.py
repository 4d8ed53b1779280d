"""The speaker store on Milvus, so that several stateless spkserve replicas share one index.

Layout: a registry collection ``spkserve_collections`` (one row per spkserve collection: model,
model version, dimension) and ``spkserve_tombstones`` (hashes of deleted or opted-out ids);
per spkserve collection two Milvus collections (spkserve collections are bound to one model,
hence one dimension each, and a tenant is dropped or migrated as a whole):

- ``spkd_<name>``: one row per enrollment (*delta*): the float64 sum of its unit embeddings
  (JSON ``{"v": [...]}``: a server takes JSON objects, not arrays), its count, speech and metadata. Rows are only ever inserted, so two replicas
  appending to the same speaker never overwrite each other.
- ``spkv_<name>``: one row per speaker, the *materialised* voiceprint (unit vector, FLAT or
  HNSW or IVF_FLAT or SCANN inner-product index, from ``index_type``) with the exact running sum, count, speech and metadata, recomputed
  from all its deltas.

Appends without compare-and-set: a writer inserts its delta, then recomputes the speaker's row
from every delta it can read and upserts it, then reads the deltas again with strong consistency;
if their number changed (another replica appended meanwhile) it recomputes and upserts again.
The first recomputation reads with session consistency (this client's own delta, without waiting
for the server's clock); only the strongly consistent check accepts a row.
The last upsert of every writer therefore comes after it saw all deltas written before its own
check, and the row converges to the sum of all deltas: an acknowledged append is never lost,
even when two replicas append to one speaker at once.

Throughput: a strongly consistent read waits for the server's time tick (about 200 ms on a
default Milvus), so an enroll costs two such waits (the tombstone and metadata reads side by
side before the write, the check after it); writes to different speakers run at once (one lock
per speaker in this process, and the server's store pool of ``store_workers`` threads), so a
replica's enrollments per second grow with the Enroll calls in flight.

Consistency: reads a client does right after its own write (get, list, the appends above) use
``Strong``; Identify's searches use ``Bounded`` staleness (a speaker enrolled or deleted a
moment ago through another replica may be missed or still found for that moment), which is what
keeps them fast on a Milvus server.

Privacy (``service.store.milvus_privacy``): with a key file for a collection, its ids are stored
as keyed hashes and its ids and metadata encrypted, so Milvus' rows, filters and delete logs hold
no id in the clear; a delete triggers a compaction of the collection, after which Milvus drops the
deleted rows from its segments (their files leave its storage at its next garbage collection,
``dataCoord.gc``). Milvus Lite's files are created 0600 in 0700 directories.

Differences from the local store: no per-speaker keys (deleted rows are removed from Milvus
and gone after its compaction; encrypt Milvus' storage for the voiceprints at rest), no retained
audio, and retention counts from the last enrollment only (uses are not written back).
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.store.base import (CollectionInfo, IndexOptions, SpeakerRecord, SpeakerStore, StatsFn, StoreUnavailable,
                                check_binding, check_merged_metadata, quoted, validate_metadata)
from service.store.locks import LockTable
from service.store.milvus_privacy import SEALED_SUFFIX, Sealer, protect_tree
from service.store.milvus_deltas import DeltaProtocol, merged_metadata, metadata_change
from service.store.milvus_schema import _MAX_ROWS, _REGISTRY, _TOMBSTONES, MilvusSchema, _q, drop_database, milvus_name

__all__ = ["MilvusStore", "drop_database", "milvus_name"]

_COLLECTION_NOT_FOUND = 100  # Milvus' error code for a collection that does not exist

log = logging.getLogger("spkserve.store.milvus")

class MilvusStore(MilvusSchema, DeltaProtocol, SpeakerStore):
    """All collections in one Milvus database. Thread-safe.

    Args:
        uri: a Milvus server (``http://host:19530``) or a local file for Milvus Lite.
        token: ``user:password`` or an API key; empty for none.
        db: the Milvus database (empty: the default one).
        options: search index settings of new collections (flat, hnsw, ivf or ivf_pq: FLAT, HNSW, IVF_FLAT, SCANN).
        key_files: ``KeyFile`` s; a new collection matching one is created sealed (see the module docstring).
    """

    def __init__(self, uri: str, token: str = "", db: str = "", options: IndexOptions | None = None,
                 key_files=()):
        from pymilvus import MilvusClient

        self.uri, self.db, self.options = uri, db, options or IndexOptions()
        self.key_files = list(key_files)
        self._sealers: dict[str, Sealer | None] = {}
        self._lite = "://" not in uri
        if self._lite:
            os.umask(0o077)  # Milvus Lite writes its files in this process: 0600 files, 0700 directories
        self._last_error: str | None = None  # the last failed call's error, until a call succeeds
        kw = {"uri": uri}
        if token:
            kw["token"] = token
        if db:
            kw["db_name"] = db
        try:
            self.client = MilvusClient(**kw)
            if self._lite:
                protect_tree(uri)  # files of an older start, made under another umask
            self._ensure_registry()
        except FailedPrecondition:
            raise  # reached, but holds something else: retrying would not help
        except Exception as e:  # noqa: BLE001 - pymilvus raises many kinds
            raise StoreUnavailable(f"speaker store: Milvus at {uri} is not reachable ({type(e).__name__}: {e})") from None
        # Writes to one speaker take turns within this process (other replicas: the append protocol above);
        # different speakers are written at once, as their calls mostly wait on the server's consistency.
        self._speaker_locks = LockTable()
        self._schema_lock = threading.RLock()  # creating or rebinding a collection
        self._reads = ThreadPoolExecutor(8, thread_name_prefix="milvus-read")  # reads issued side by side
        self._stats_fn: StatsFn | None = None
        self._bindings: dict[str, tuple[tuple[str, str, int], float]] = {}  # binding, when it was read

    # -- schema -----------------------------------------------------------------------
    def _call(self, fn, *args, **kw):
        try:
            out = fn(*args, **kw)
        except (NotFound, FailedPrecondition, InvalidArgument):
            raise
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) == _COLLECTION_NOT_FOUND:  # deleted meanwhile, maybe by another replica:
                self._bindings.clear()  # not an outage; the next call reads the registry again
                raise NotFound(f"collection: deleted while this call ran ({getattr(e, 'message', e)})") from None
            self._last_error = f"Milvus call failed ({type(e).__name__}: {str(e)[:200]})"
            raise StoreUnavailable(f"speaker store: {self._last_error}") from None
        self._last_error = None
        return out

    def _key_for(self, collection: str):
        return next((k for k in self.key_files if fnmatch.fnmatchcase(collection, k.pattern)), None)

    def _make_sealer(self, collection: str) -> Sealer:
        key = self._key_for(collection)
        if key is None:
            raise FailedPrecondition(f"collection: {quoted(collection)} is sealed in Milvus with a key file, and no "
                                     "configured key file (encryption_key_file, tenant_key_files) matches it")
        return Sealer(key.key, collection)

    def _sealer(self, collection: str) -> Sealer | None:
        """The collection's sealer (None: ids in the clear); the collection must exist."""
        if collection not in self._sealers:
            self._bindings.pop(collection, None)  # read the registry row, which says whether it is sealed
            self._require(collection)
        return self._sealers.get(collection)

    def _pk(self, collection: str, speaker_id: str) -> str:
        sealer = self._sealer(collection)
        return speaker_id if sealer is None else sealer.pk(speaker_id)

    # -- reads ------------------------------------------------------------------------
    def _require(self, collection: str) -> tuple[str, str, int]:
        b = self._binding(collection)
        if b is None:
            raise NotFound(f"collection: {quoted(collection)} does not exist")
        return b

    def _record(self, row: dict, sealer: Sealer | None = None) -> SpeakerRecord:
        speaker_id, meta = sealer.open(row["meta"]) if sealer is not None else (row["pk"], dict(row["meta"]))
        return SpeakerRecord(speaker_id, np.asarray(row["sum"]["v"], dtype=np.float64), int(row["count"]), meta,
                             int(row["created"]), int(row["updated"]),
                             speech=None if row["speech"] < 0 else float(row["speech"]),
                             last_used_ms=int(row["updated"]))

    _FIELDS = ["pk", "sum", "count", "speech", "meta", "created", "updated"]

    def get(self, collection: str, speaker_id: str) -> SpeakerRecord:
        """``SpeakerStore.get`` (service/store/base.py)."""
        self._require(collection)
        rows = self._call(self.client.query, milvus_name("spkv_", collection),
                          filter=f"pk == {_q(self._pk(collection, speaker_id))}",
                          output_fields=self._FIELDS, consistency_level="Strong")
        if not rows:
            raise NotFound(f"speaker_id: {quoted(speaker_id)} is not enrolled in collection {quoted(collection)}")
        rec = self._record(rows[0], self._sealer(collection))
        rec.stats = self._stats(collection, [rec])
        return rec

    def _stats(self, collection: str, recs: list[SpeakerRecord]):
        if self._stats_fn is None or not recs:
            return None
        stats = self._stats_fn(self._require(collection)[0], np.stack([r.voiceprint for r in recs]))  # (N, 2)
        if stats is None:
            return None
        for r, s in zip(recs, stats):
            r.stats = s
        return stats[0]

    def _ids(self, collection: str, where: str = 'pk != ""') -> list[tuple[str, str]]:
        """(speaker id, stored key) of the collection's rows matching ``where``, sorted by id."""
        sealer = self._sealer(collection)
        name, fields = milvus_name("spkv_", collection), ["pk"] if sealer is None else ["pk", "meta"]
        rows = self._call(self.client.query, name, filter=where, output_fields=fields, limit=_MAX_ROWS,
                          consistency_level="Strong")
        if len(rows) >= _MAX_ROWS:  # one query returns at most this many: page through all of them
            rows = self._call(self._all_rows, name, where, fields)
        return sorted((r["pk"] if sealer is None else sealer.open(r["meta"])[0], r["pk"]) for r in rows)

    def _all_rows(self, name: str, where: str, fields: list[str]) -> list[dict]:
        """Every row of a Milvus collection matching ``where``, through a query iterator (pages of _MAX_ROWS)."""
        it = self.client.query_iterator(name, batch_size=_MAX_ROWS, filter=where, output_fields=fields,
                                        consistency_level="Strong")
        rows: list[dict] = []
        try:
            while batch := it.next():
                rows.extend(batch)
        finally:
            it.close()
        return rows

    def list(self, collection: str, offset: int, limit: int) -> tuple[list[SpeakerRecord], int]:
        """``SpeakerStore.list`` (service/store/base.py)."""
        self._require(collection)
        ids = self._ids(collection)
        page = [pk for _, pk in ids[offset:offset + limit]]
        if not page:
            return [], len(ids)
        rows = self._call(self.client.query, milvus_name("spkv_", collection),
                          filter=f"pk in [{', '.join(_q(i) for i in page)}]", output_fields=self._FIELDS,
                          consistency_level="Strong")
        sealer = self._sealer(collection)
        recs = sorted((self._record(r, sealer) for r in rows), key=lambda r: r.speaker_id)
        self._stats(collection, recs)
        return recs, len(ids)

    def search(self, collection: str, model: str, query: np.ndarray, k: int,
               keep: Callable[[SpeakerRecord], bool] | None = None,
               model_version: str = "") -> list[tuple[SpeakerRecord, float]]:
        """``SpeakerStore.search`` (service/store/base.py)."""
        bound, version, dim = self._require(collection)
        check_binding(collection, bound, dim, version, model, query.shape[0], model_version, probe=True)
        fetch, out = k, []
        while True:
            hits = self._call(self.client.search, milvus_name("spkv_", collection), data=[query.astype(np.float32).tolist()],
                              anns_field="vec", limit=min(fetch, _MAX_ROWS), output_fields=self._FIELDS[1:],
                              search_params=self.search_params(min(fetch, _MAX_ROWS)),
                              consistency_level="Bounded")[0]
            out = []
            sealer = self._sealer(collection)
            for h in hits:
                rec = self._record({"pk": h["id"] if "id" in h else h["pk"], **h["entity"]}, sealer)
                if keep is None or keep(rec):
                    out.append((rec, float(h["distance"])))
            if len(out) >= k or len(hits) < fetch or fetch >= _MAX_ROWS:
                break
            fetch *= 4
        out = out[:k]
        self._stats(collection, [r for r, _ in out])
        return out

    def collection_model(self, collection: str) -> str:
        """``SpeakerStore.collection_model`` (service/store/base.py)."""
        return self._require(collection)[0]

    def collection_binding(self, collection: str) -> tuple[str, str]:
        """``SpeakerStore.collection_binding`` (service/store/base.py)."""
        b = self._require(collection)
        return b[0], b[1]

    def collections(self) -> list[CollectionInfo]:
        """``SpeakerStore.collections`` (service/store/base.py)."""
        rows = self._call(self.client.query, _REGISTRY, filter='pk != ""', limit=_MAX_ROWS,
                          output_fields=["pk", "model", "version", "dim", "index_type"], consistency_level="Strong")
        out = []
        for r in sorted(rows, key=lambda r: r["pk"]):
            try:
                n = self._call(self.client.query, milvus_name("spkv_", r["pk"]), filter='pk != ""',
                               output_fields=["count(*)"], consistency_level="Strong")[0]["count(*)"]
            except NotFound:  # being deleted (or a deletion a crash interrupted: DeleteCollection again finishes it)
                continue
            kind = r["index_type"].removesuffix(SEALED_SUFFIX)
            out.append(CollectionInfo(r["pk"], r["model"], int(r["dim"]), int(n), kind, r["version"]))
        return out

    def speaker_count(self, collection: str) -> int:
        """``SpeakerStore.speaker_count`` (service/store/base.py)."""
        self._require(collection)
        rows = self._call(self.client.query, milvus_name("spkv_", collection), filter='pk != ""',
                          output_fields=["count(*)"], consistency_level="Strong")
        return int(rows[0]["count(*)"])

    @property
    def writable(self) -> bool:
        """False after a failed Milvus call, until one succeeds (health shows it meanwhile)."""
        return self._last_error is None

    def state(self) -> str:
        """'ok', or the last failed call while Milvus is away."""
        return "ok" if self._last_error is None else f"unavailable: {self._last_error}"

    def retained_audio(self, collection: str, speaker_id: str) -> list[tuple[int, np.ndarray]]:
        """``SpeakerStore.retained_audio`` (service/store/base.py)."""
        self.get(collection, speaker_id)
        return []  # the Milvus backend keeps no audio (the server refuses retain_enrollment_audio with it)

    # -- writes -----------------------------------------------------------------------
    def set_stats_fn(self, fn: StatsFn | None) -> None:
        """``SpeakerStore.set_stats_fn`` (service/store/base.py)."""
        self._stats_fn = fn  # statistics are computed when records are read

    def _tombstone(self, collection: str, speaker_id: str) -> str:
        sealer = self._sealers.get(collection) if self._binding(collection) is not None else None
        if sealer is None and self._binding(collection) is None and self._key_for(collection) is not None:
            sealer = Sealer(self._key_for(collection).key, collection)  # the collection will be created sealed
        if sealer is not None:
            return sealer.tombstone(speaker_id)
        return hashlib.sha256(collection.encode() + b"\0" + speaker_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]

    def _tombstoned(self, collection: str, tomb: str) -> bool:
        return bool(self._call(self.client.query, _TOMBSTONES, filter=f"pk == {_q(collection + '/' + tomb)}",
                               output_fields=["pk"], consistency_level="Strong"))

    def enroll(self, collection: str, model: str, speaker_id: str, embeddings: np.ndarray,
               metadata: dict[str, str] | None = None, speech: float = 0.0,
               allow_reenroll: bool = False, model_version: str = "",
               audio: list[tuple[int, np.ndarray]] | None = None) -> tuple[SpeakerRecord, bool]:
        """``SpeakerStore.enroll`` (service/store/base.py)."""
        metadata = validate_metadata(metadata or {})
        embeddings = np.asarray(embeddings, dtype=np.float64)  # (N, D)
        if embeddings.ndim != 2 or not np.isfinite(embeddings).all():
            raise InvalidArgument("embeddings", "must be finite (N, D) values")
        if audio:
            raise FailedPrecondition("the milvus speaker store keeps no enrollment audio (retain_enrollment_audio)")
        with self._speaker_locks.hold((collection, speaker_id)):
            b = self._binding(collection)
            if b is not None:
                check_binding(collection, b[0], b[2], b[1], model, embeddings.shape[1], model_version, probe=False)
            tomb = self._tombstone(collection, speaker_id)
            # the two strongly consistent reads before the write wait for the server together
            tombstoned = self._reads.submit(self._tombstoned, collection, tomb)
            current = self._deltas(collection, speaker_id) if b is not None else []
            if tombstoned.result():
                if not allow_reenroll:
                    raise FailedPrecondition(f"speaker_id: {quoted(speaker_id)} was deleted from or opted out of "
                                             f"collection {quoted(collection)}; set allow_reenroll to enroll it again")
                self._call(self.client.delete, _TOMBSTONES, filter=f"pk == {_q(collection + '/' + tomb)}")
            check_merged_metadata(merged_metadata(current), metadata)
            if b is None or (not b[1] and model_version):
                with self._schema_lock:
                    b = self._binding(collection)  # another thread may have bound it meanwhile
                    if b is not None:
                        check_binding(collection, b[0], b[2], b[1], model, embeddings.shape[1], model_version, probe=False)
                    if b is None or (not b[1] and model_version):
                        self._call(self._bind, collection, model, model_version, int(embeddings.shape[1]))
            self._append_delta(collection, speaker_id, embeddings.sum(0), len(embeddings), speech, metadata)
            return self._materialise(collection, speaker_id)

    def update_metadata(self, collection: str, speaker_id: str, metadata: dict[str, str],
                        remove: list[str]) -> SpeakerRecord:
        """``SpeakerStore.update_metadata`` (service/store/base.py): a delta of no embedding that carries the
        change (appended and materialised as an enrollment is)."""
        metadata = validate_metadata(metadata)
        with self._speaker_locks.hold((collection, speaker_id)):
            current = self._deltas(collection, speaker_id)
            if not current:
                self.get(collection, speaker_id)  # raises NotFound naming what is missing
            check_merged_metadata(merged_metadata(current), metadata, remove, change="update")
            self._append_delta(collection, speaker_id, np.zeros(self._require(collection)[2]), 0, 0.0,
                               metadata_change(metadata, remove))
            return self._materialise(collection, speaker_id)[0]

    def delete(self, collection: str, speaker_id: str, opt_out: bool = False) -> SpeakerRecord | None:
        """``SpeakerStore.delete`` (service/store/base.py)."""
        with self._speaker_locks.hold((collection, speaker_id)):
            try:
                rec = self.get(collection, speaker_id)
            except NotFound:
                if not opt_out:
                    raise
                rec = None
            tomb = self._tombstone(collection, speaker_id)
            self._call(self.client.upsert, _TOMBSTONES, [{"pk": f"{collection}/{tomb}", "c": collection, "vec": [1.0, 0.0]}])
            if rec is not None:
                pk = self._pk(collection, speaker_id)
                self._call(self.client.delete, milvus_name("spkd_", collection), filter=f"spk == {_q(pk)}")
                self._call(self.client.delete, milvus_name("spkv_", collection), filter=f"pk == {_q(pk)}")
                for prefix in ("spkd_", "spkv_"):  # drop the deleted rows from the segments now, not some day
                    try:
                        self.client.compact(milvus_name(prefix, collection))
                    except Exception as e:  # noqa: BLE001 - compaction is an optimisation: the rows are deleted already
                        log.warning("Milvus compaction of %s after a delete failed: %s", prefix + collection, e)
            return rec

    def touch(self, collection: str, speaker_ids: list[str]) -> None:
        """Not recorded on this backend (retention counts from the last enrollment)."""

    def expire(self, older_than_ms: int) -> int:
        """``SpeakerStore.expire`` (service/store/base.py)."""
        n = 0
        for info in self.collections():
            for speaker_id, _ in self._ids(info.name, f"updated < {int(older_than_ms)}"):
                self.delete(info.name, speaker_id)
                n += 1
        return n

    def close(self) -> None:
        """``SpeakerStore.close`` (service/store/base.py)."""
        self._reads.shutdown(wait=True)
        self.client.close()
        if self._lite:
            protect_tree(self.uri)
