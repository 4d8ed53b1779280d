"""The Milvus backend's schema: collection names, creation, loading, deletion and the registry (a mixin of
``MilvusStore``).

Every spkserve collection is two Milvus collections (voiceprints ``spkv_<name>``, enrollment deltas
``spkd_<name>``); two more hold the registry of spkserve collections and the tombstones. A
collection made by something else under one of these names is refused, never written to. After
a restart (Milvus Lite, or a restarted server) collections come back *released*; opening the
store loads every one it uses.
"""

from __future__ import annotations

import time

from service.errors import FailedPrecondition, InvalidArgument
from service.store.base import CollectionInfo, not_empty
from service.store.milvus_privacy import SEALED_SUFFIX

__all__ = ["MilvusSchema", "milvus_name", "drop_database", "BINDING_TTL_SECONDS"]

#: How long a replica trusts its cached registry row of a collection: another replica's DeleteCollection (and a
#: new collection of the same name) is noticed within it.
BINDING_TTL_SECONDS = 10.0

_REGISTRY, _TOMBSTONES = "spkserve_collections", "spkserve_tombstones"
_MAX_ROWS = 16384  # Milvus' largest query page
# spkserve's index_type -> Milvus index (searches pass ef, nprobe and reorder_k; each index reads its own).
# ivf_pq -> SCANN: IVF lists of 4-bit fast-scan codes whose best reorder_k candidates are re-scored on
# the raw vectors (SCANN's default with_raw_data), the same design as the faiss backend's ivf_pq.
_MILVUS_INDEX = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT", "ivf_pq": "SCANN"}


def milvus_name(prefix: str, collection: str) -> str:
    """A Milvus collection name for a spkserve collection (letters, digits and _ only)."""
    return prefix + "".join(ch if ch.isalnum() and ch.isascii() else f"_{ord(ch):02x}" for ch in collection)


def drop_database(uri: str, db: str) -> None:
    """Drop the Milvus database `db` on the server at `uri` with every collection in it.

    A Milvus server holds at most 64 databases; tests and benchmarks that make one per run
    give it back with this. Irreversible: every speaker in `db` is gone.
    """
    from pymilvus import MilvusClient

    if not db or db == "default":
        raise InvalidArgument("db", f"must name a non-default database, got {db!r}")
    client = MilvusClient(uri=uri, db_name=db)
    try:
        for name in client.list_collections():
            client.drop_collection(name)
        client.drop_database(db)
    finally:
        client.close()


def _q(value: str) -> str:
    """A string literal for a Milvus filter expression."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'



class MilvusSchema:
    """Schema and registry methods of ``MilvusStore`` (uses its ``client``, ``options``, ``_call``, ``_make_sealer``
    and the ``_bindings`` and ``_sealers`` caches)."""

    def vector_index_params(self, index_type: str = "flat"):
        """Milvus index parameters of the ``vec`` field for spkserve's ``index_type``: flat -> FLAT,
        hnsw -> HNSW (``hnsw_m``, ``hnsw_ef_construction`` or 200), ivf -> IVF_FLAT (``ivf_nlist``),
        ivf_pq -> SCANN (``ivf_nlist``; it keeps the raw vectors for the exact re-scoring by default, and
        Milvus 2.3 refuses that flag when set, as pymilvus sends it as the string "True")."""
        if index_type not in _MILVUS_INDEX:
            raise ValueError(f"index_type {index_type!r}: not an index of the Milvus backend (one of {sorted(_MILVUS_INDEX)})")
        params = {"hnsw": {"M": self.options.hnsw_m, "efConstruction": self.options.hnsw_ef_construction or 200},
                  "ivf": {"nlist": self.options.ivf_nlist},
                  "ivf_pq": {"nlist": self.options.ivf_nlist}}.get(index_type, {})  # SCANN keeps raw data by default
        idx = self.client.prepare_index_params()
        idx.add_index(field_name="vec", index_type=_MILVUS_INDEX[index_type], metric_type="IP", params=params)
        return idx

    def search_params(self, limit: int) -> dict:
        """Milvus search parameters for `limit` results, read by whichever index a collection has:
        HNSW's ``ef`` (``hnsw_ef_search``, at least `limit`: a search for k results keeps k candidates at least), the IVF
        indexes' ``nprobe`` (``ivf_nprobe``) and SCANN's ``reorder_k`` (``ivf_pq_rerank`` x `limit`
        candidates re-scored exactly, at most Milvus' 16384 rows)."""
        return {"metric_type": "IP", "params": {"ef": max(self.options.hnsw_ef_search, limit),
                                                "nprobe": self.options.ivf_nprobe,
                                                "reorder_k": min(limit * self.options.ivf_pq_rerank, _MAX_ROWS)}}

    def _create(self, name: str, fields: list[tuple], vector_dim: int, index_type: str = "flat") -> None:
        from pymilvus import DataType, MilvusClient

        if self.client.has_collection(name):
            self._check_schema(name, [f[0] for f in fields], vector_dim)
            self._load(name)
            return
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.VARCHAR, is_primary=True, max_length=2048)
        for fname, kind, extra in fields:
            schema.add_field(fname, getattr(DataType, kind), **extra)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=vector_dim)
        self.client.create_collection(name, schema=schema, index_params=self.vector_index_params(index_type))

    def _load(self, name: str) -> None:
        """Load an existing Milvus collection for queries: after a restart (clean or kill -9) Milvus Lite and a
        restarted server hold collections released, and every query on them fails until loaded."""
        state = self.client.get_load_state(name).get("state")
        if getattr(state, "name", str(state)) != "Loaded":
            self.client.load_collection(name)

    def _check_schema(self, name: str, fields: list[str], vector_dim: int) -> None:
        """Refuse a Milvus collection of that name made by something else (other fields or dimension)."""
        desc = self.client.describe_collection(name)
        have = {f["name"]: f for f in desc["fields"]}
        missing = sorted(set(fields + ["pk", "vec"]) - set(have))
        dim = int((have.get("vec", {}).get("params") or {}).get("dim", -1))
        if missing or dim != vector_dim:
            raise FailedPrecondition(f"Milvus collection {name!r} exists with another schema (missing fields {missing}, "
                                     f"vector dimension {dim}, expected {vector_dim}); it was not made by spkserve or "
                                     "for another model: drop it or use another milvus_db")

    def _ensure_registry(self) -> None:
        self._create(_REGISTRY, [("model", "VARCHAR", {"max_length": 256}), ("version", "VARCHAR", {"max_length": 256}),
                                 ("dim", "INT64", {}), ("index_type", "VARCHAR", {"max_length": 16})], 2)
        self._create(_TOMBSTONES, [("c", "VARCHAR", {"max_length": 256})], 2)
        for row in self.client.query(_REGISTRY, filter='pk != ""', limit=_MAX_ROWS, output_fields=["pk"]):
            for prefix in ("spkv_", "spkd_"):  # every bound collection's voiceprints and deltas
                name = milvus_name(prefix, row["pk"])
                if self.client.has_collection(name):
                    self._load(name)

    def _binding(self, collection: str) -> tuple[str, str, int] | None:
        """(model, model version, dimension) the registry binds ``collection`` to, None when it does not exist;
        notes whether the collection is sealed."""
        cached = self._bindings.get(collection)
        if cached is not None and time.monotonic() - cached[1] < BINDING_TTL_SECONDS:
            return cached[0]
        rows = self._call(self.client.query, _REGISTRY, filter=f"pk == {_q(collection)}",
                          output_fields=["model", "version", "dim", "index_type"], consistency_level="Strong")
        if not rows:
            return None
        b = (rows[0]["model"], rows[0]["version"], int(rows[0]["dim"]))
        self._sealers[collection] = self._make_sealer(collection) if rows[0]["index_type"].endswith(SEALED_SUFFIX) else None
        if b[1]:
            # a versioned binding changes only when the collection is deleted (maybe by another replica): kept briefly
            self._bindings[collection] = (b, time.monotonic())
        return b

    def _bind(self, collection: str, model: str, version: str, dim: int) -> None:
        """Create the collection's two Milvus collections (when missing) and write its registry row."""
        self._create(milvus_name("spkv_", collection), [
            ("sum", "JSON", {}), ("count", "INT64", {}), ("speech", "DOUBLE", {}), ("meta", "JSON", {}),
            ("created", "INT64", {}), ("updated", "INT64", {}), ("deltas", "INT64", {})], dim, self.options.index_type)
        self._create(milvus_name("spkd_", collection), [
            ("spk", "VARCHAR", {"max_length": 2048}), ("sum", "JSON", {}), ("count", "INT64", {}),
            ("speech", "DOUBLE", {}), ("meta", "JSON", {}), ("ts", "INT64", {})], 2)
        known = self._binding(collection)
        sealed = self._sealers.get(collection) is not None if known else self._key_for(collection) is not None
        self._call(self.client.upsert, _REGISTRY, [{"pk": collection, "model": model, "version": version, "dim": dim,
                                                    "index_type": self.options.index_type + (SEALED_SUFFIX if sealed else ""),
                                                    "vec": [1.0, 0.0]}])
        self._bindings.pop(collection, None)
        self._sealers[collection] = self._make_sealer(collection) if sealed else None

    def drop_collection(self, collection: str, force: bool = False) -> CollectionInfo:
        """``SpeakerStore.drop_collection`` (service/store/base.py): the speakers' tombstones first, then the two Milvus
        collections, then the registry row (the commit: a crash before it leaves the collection listed, and a retry
        finishes the job). Other replicas notice within ``BINDING_TTL_SECONDS``."""
        with self._schema_lock:
            self._bindings.pop(collection, None)
            model, version, dim = self._require(collection)
            names = [milvus_name(prefix, collection) for prefix in ("spkv_", "spkd_")]
            ids = self._ids(collection) if self._call(self.client.has_collection, names[0]) else []
            if ids and not force:
                raise not_empty(collection, len(ids))
            tombs = [{"pk": f"{collection}/{self._tombstone(collection, spk)}", "c": collection, "vec": [1.0, 0.0]}
                     for spk, _ in ids]
            for i in range(0, len(tombs), 1000):
                self._call(self.client.upsert, _TOMBSTONES, tombs[i:i + 1000])
            for name in names:
                if self._call(self.client.has_collection, name):  # gone already when a crash interrupted a drop
                    self._call(self.client.drop_collection, name)
            self._call(self.client.delete, _REGISTRY, filter=f"pk == {_q(collection)}")
            self._bindings.pop(collection, None)
            self._sealers.pop(collection, None)
            return CollectionInfo(collection, model, dim, len(ids), self.options.index_type, version)
