"""One contract for every speaker store backend: the local store and Milvus (Milvus Lite here;
a Milvus server with SPKSERVE_TEST_MILVUS_URI)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.store import LocalStore
from service.store.base import StoreCorrupt


def units(n, dim=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)  # (N, D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


_DATABASES: list[tuple[str, str]] = []  # (uri, database) created on a shared Milvus server


def _fresh_database(uri: str, prefix: str) -> str:
    """A new, empty database on the Milvus server at `uri`, dropped when this module's tests end."""
    from pymilvus import MilvusClient

    db = f"{prefix}{uuid.uuid4().hex[:12]}"
    MilvusClient(uri=uri).create_database(db)
    _DATABASES.append((uri, db))
    return db


@pytest.fixture(scope="module", autouse=True)
def _drop_databases():
    """Drop every database this module created, so a long-lived server never reaches its limit (64)."""
    yield
    from service.store.milvus import drop_database  # pymilvus itself is imported only when a database is dropped

    while _DATABASES:
        drop_database(*_DATABASES.pop())


def _milvus(tmp_path, options=None):
    pytest.importorskip("pymilvus")
    from service.store.milvus import MilvusStore

    uri = os.environ.get("SPKSERVE_TEST_MILVUS_URI") or str(tmp_path / "milvus.db")
    if not uri.startswith("http"):
        pytest.importorskip("milvus_lite")
        return MilvusStore(uri, options=options)
    return MilvusStore(uri, db=_fresh_database(uri, "t"), options=options)  # a fresh database per test


@pytest.fixture(params=["local", "milvus"])
def store(request, tmp_path):
    s = LocalStore(tmp_path / "local") if request.param == "local" else _milvus(tmp_path)
    yield s
    s.close()


_WRITER = """
import os, sys
import numpy as np
from service.store.milvus import MilvusStore
s = MilvusStore(sys.argv[1], db=sys.argv[2])
v = np.eye(16, dtype=np.float32)[:2]
s.enroll("c", "m", "a", v[:1], {"k": "v"}, speech=3.0)
s.enroll("c", "m", "b", v[1:], speech=3.0)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), 9)
s.close()
"""


@pytest.mark.parametrize("how", ["clean", "kill"])
def test_milvus_store_reopens_its_collections_after_a_restart(tmp_path, how):
    """Milvus Lite (and a restarted server) hold collections released after a restart: opening loads them."""
    import subprocess
    import sys

    pytest.importorskip("pymilvus")
    from service.store.milvus import MilvusStore

    uri = os.environ.get("SPKSERVE_TEST_MILVUS_URI") or str(tmp_path / "milvus.db")
    if not uri.startswith("http"):
        pytest.importorskip("milvus_lite")
    db = _fresh_database(uri, "r") if uri.startswith("http") else ""
    r = subprocess.run([sys.executable, "-c", _WRITER, uri, db, how], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == (-9 if how == "kill" else 0), r.stderr[-2000:]
    if uri.startswith("http"):  # a restarted server: every collection released
        from pymilvus import MilvusClient

        client = MilvusClient(uri=uri, db_name=db)
        for name in client.list_collections():
            client.release_collection(name)
    s = MilvusStore(uri, db=db)
    try:
        assert s.get("c", "a").metadata == {"k": "v"} and s.speaker_count("c") == 2
        assert s.search("c", "m", np.eye(16, dtype=np.float32)[1], 1)[0][0].speaker_id == "b"
    finally:
        s.close()


def test_appends_are_exact_and_records_complete(store):
    e = units(4)
    store.enroll("c", "m", "x", e[:2], {"a": "1"}, speech=2.0, model_version="1")
    rec, created = store.enroll("c", "m", "x", e[2:], {"b": "2"}, speech=1.5, model_version="1")
    assert not created and rec.count == 4 and rec.metadata == {"a": "1", "b": "2"} and rec.speech == pytest.approx(3.5)
    np.testing.assert_allclose(rec.sum, e.astype(np.float64).sum(0), atol=1e-6)
    got = store.get("c", "x")
    np.testing.assert_allclose(got.voiceprint, rec.voiceprint, atol=1e-6)
    assert store.collection_binding("c") == ("m", "1")
    info = {i.name: i for i in store.collections()}["c"]
    assert (info.model, info.dim, info.speaker_count, info.model_version) == ("m", 16, 1, "1")


def test_metadata_is_capped_per_speaker_after_merging(store):
    """Appends merge metadata: the merged result is capped (64 keys, 4 KiB) and a refused append changes nothing."""
    e = units(3, seed=7)
    store.enroll("c", "m", "x", e[:1], {f"k{i}": "v" for i in range(60)})
    with pytest.raises(InvalidArgument, match="metadata.*64 keys"):
        store.enroll("c", "m", "x", e[1:2], {f"n{i}": "v" for i in range(10)})
    rec = store.get("c", "x")
    assert rec.count == 1 and len(rec.metadata) == 60
    store.enroll("c", "m", "x", e[1:2], {"k0": "updated", "n0": "v"})  # overwriting counts once
    assert len(store.get("c", "x").metadata) == 61
    with pytest.raises(InvalidArgument, match="4,096 bytes"):
        store.enroll("c", "m", "y", e[2:], {f"big{i}": "x" * 1000 for i in range(5)})
    with pytest.raises(NotFound):
        store.get("c", "y")
    assert store.speaker_count("c") == 1


def test_search_paging_and_errors(store):
    e = units(12, seed=1)
    for i in range(12):
        store.enroll("c", "m", f"s{i:02d}", e[i:i + 1], speech=5.0 if i % 2 else 1.0)
    hits = store.search("c", "m", e[3], 3)
    assert hits[0][0].speaker_id == "s03" and hits[0][1] == pytest.approx(1.0, abs=1e-5)
    odd = store.search("c", "m", e[4], 3, keep=lambda r: r.speech >= 5.0)
    assert len(odd) == 3 and all(int(r.speaker_id[1:]) % 2 for r, _ in odd)
    page, total = store.list("c", 5, 4)
    assert total == 12 and [r.speaker_id for r in page] == ["s05", "s06", "s07", "s08"]
    with pytest.raises(FailedPrecondition, match="model 'm'"):
        store.enroll("c", "other", "z", e[:1])
    with pytest.raises(FailedPrecondition, match="dim 16"):
        store.search("c", "m", units(1, dim=8)[0], 1)
    with pytest.raises(NotFound, match="collection"):
        store.get("nope", "s01")
    with pytest.raises(NotFound, match="speaker_id"):
        store.get("c", "nope")


@pytest.mark.parametrize("backend, kind", [(b, k) for b in ("local", "milvus") for k in ("flat", "hnsw", "ivf", "ivf_pq")])
def test_every_index_type_finds_the_probed_speaker(backend, kind, tmp_path):
    """flat, hnsw, ivf and ivf_pq on both backends (Milvus: FLAT, HNSW, IVF_FLAT, SCANN); reported by collections()."""
    from service.store import IndexOptions

    opts = IndexOptions(index_type=kind, ivf_nlist=1, ivf_nprobe=1)  # local IVF trains from 39 x nlist points
    store = LocalStore(tmp_path / "local", opts, fsync=False) if backend == "local" else _milvus(tmp_path, opts)
    try:
        n = 64 if backend == "local" else 16  # a Milvus server enrolls at about 1 s per call
        e = units(n, seed=3)
        for i in range(n):
            store.enroll("c", "m", f"s{i:02d}", e[i:i + 1])
        for i in (0, n // 2 + 1, n - 1):
            assert store.search("c", "m", e[i], 1)[0][0].speaker_id == f"s{i:02d}"
        assert [c.index_type for c in store.collections()] == [kind]
    finally:
        store.close()


def test_delete_tombstone_and_opt_out(store):
    store.enroll("c", "m", "a", units(1))
    store.enroll("c", "m", "b", units(1, seed=1))
    assert store.delete("c", "a").speaker_id == "a"
    with pytest.raises(NotFound):
        store.get("c", "a")
    assert "a" not in [h[0].speaker_id for h in store.search("c", "m", units(1)[0], 5)]
    with pytest.raises(FailedPrecondition, match="allow_reenroll"):
        store.enroll("c", "m", "a", units(1))
    assert store.delete("c", "never", opt_out=True) is None
    with pytest.raises(FailedPrecondition, match="allow_reenroll"):
        store.enroll("c", "m", "never", units(1))
    rec, created = store.enroll("c", "m", "a", units(1, seed=2), allow_reenroll=True)
    assert created and rec.count == 1


def test_metadata_updates_set_and_remove_keys_and_keep_the_voiceprint(store):
    """update_metadata: keys set (overwriting), then keys removed (unknown ones ignored), limits as for enroll;
    the voiceprint, count and speech stay; later enrollments merge into the updated metadata."""
    e = units(2)
    before, _ = store.enroll("c", "m", "a", e[:1], {"team": "blue", "site": "x", "old": "1"}, speech=3.0)
    rec = store.update_metadata("c", "a", {"team": "red", "new": "2"}, ["old", "never-set"])
    assert rec.metadata == {"team": "red", "site": "x", "new": "2"}
    assert (rec.count, rec.speech) == (1, 3.0) and np.allclose(rec.sum, before.sum)
    assert store.get("c", "a").metadata == rec.metadata
    assert store.update_metadata("c", "a", {}, ["site", "new"]).metadata == {"team": "red"}
    rec, _ = store.enroll("c", "m", "a", e[1:], {"more": "3"}, speech=2.0)
    assert rec.metadata == {"team": "red", "more": "3"} and rec.count == 2
    with pytest.raises(InvalidArgument, match="after this update"):
        store.update_metadata("c", "a", {f"k{i}": "v" for i in range(63)}, [])
    assert store.get("c", "a").metadata == {"team": "red", "more": "3"}  # refused: nothing changed
    store.update_metadata("c", "a", {f"k{i}": "v" for i in range(62)}, [])  # 64 keys: the limit, allowed
    with pytest.raises(NotFound):
        store.update_metadata("c", "nobody", {"x": "1"}, [])
    with pytest.raises(NotFound):
        store.update_metadata("nowhere", "a", {"x": "1"}, [])


def test_a_dropped_collection_is_gone_with_its_speakers_and_binding(store):
    """drop_collection: refused while it holds speakers unless forced; then no speaker, no binding (the name takes
    another model), its speakers' ids tombstoned as by delete, opt-outs kept, other collections untouched."""
    store.enroll("c", "m", "a", units(2), {"k": "v"}, model_version="1")
    store.enroll("c", "m", "b", units(1, seed=1), model_version="1")
    store.delete("c", "gone", opt_out=True)
    store.enroll("other", "m", "a", units(1, seed=3))
    with pytest.raises(FailedPrecondition, match="holds 2 speakers; set force"):
        store.drop_collection("c")
    assert store.speaker_count("c") == 2  # refused: nothing changed
    info = store.drop_collection("c", force=True)
    assert (info.name, info.model, info.model_version, info.speaker_count, info.dim) == ("c", "m", "1", 2, 16)
    assert "c" not in {i.name for i in store.collections()}
    for call in (lambda: store.get("c", "a"), lambda: store.collection_model("c"), lambda: store.list("c", 0, 10),
                 lambda: store.search("c", "m", units(1)[0], 5), lambda: store.drop_collection("c", force=True)):
        with pytest.raises(NotFound, match="collection: 'c' does not exist"):
            call()
    assert store.get("other", "a").count == 1
    with pytest.raises(FailedPrecondition, match="allow_reenroll"):  # a dropped speaker, as a deleted one
        store.enroll("c", "m2", "a", units(1, dim=8))
    with pytest.raises(FailedPrecondition, match="allow_reenroll"):  # an opt-out stays
        store.enroll("c", "m2", "gone", units(1, dim=8))
    rec, created = store.enroll("c", "m2", "new", units(1, dim=8), model_version="9")  # another model, dimension
    assert created and store.collection_binding("c") == ("m2", "9") and store.list("c", 0, 10)[1] == 1
    store.delete("c", "new")
    assert store.drop_collection("c").speaker_count == 0  # empty: no force needed


def test_a_replica_meeting_a_collection_deleted_by_another_answers_not_found_not_unavailable(tmp_path):
    """Another replica's cached binding of a deleted collection: its next call is NOT_FOUND (the store stays
    writable: no health flap), and a drop a crash interrupted (registry row left) is hidden and can be finished."""
    a = _milvus(tmp_path)
    pytest.importorskip("pymilvus")
    from service.store.milvus import MilvusStore
    from service.store.milvus_schema import milvus_name

    b = MilvusStore(a.uri, db=a.db)
    try:
        a.enroll("c", "m", "x", units(1))
        assert b.get("c", "x").count == 1  # b has read (and cached) the binding
        a.drop_collection("c", force=True)
        with pytest.raises(NotFound):
            b.get("c", "x")
        with pytest.raises(NotFound, match="does not exist"):
            b.get("c", "x")  # the registry read again
        assert b.writable and b.state() == "ok"
        a.enroll("d", "m", "y", units(1))
        a.client.drop_collection(milvus_name("spkv_", "d"))  # as if a drop crashed after its first step
        assert [i.name for i in a.collections()] == []
        assert a.drop_collection("d", force=True).speaker_count == 0  # finished: its rows were dropped already
        assert a.writable
    finally:
        b.close()
        a.close()


def test_collections_larger_than_one_milvus_query_are_listed_and_dropped_whole(store, monkeypatch):
    """A Milvus query returns at most 16,384 rows: listing, expiring and dropping a larger collection page through
    it (here the page is made 7 rows, with 20 speakers)."""
    if type(store).__name__ == "MilvusStore":
        import service.store.milvus as milvus

        monkeypatch.setattr(milvus, "_MAX_ROWS", 7)
    for i in range(20):
        store.enroll("big", "m", f"s{i:02d}", units(1, seed=i))
    page, total = store.list("big", 14, 100)
    assert total == 20 and [r.speaker_id for r in page] == [f"s{i:02d}" for i in range(14, 20)]
    assert store.drop_collection("big", force=True).speaker_count == 20
    for i in (0, 19):  # every one of them tombstoned, not only the first page's
        with pytest.raises(FailedPrecondition, match="allow_reenroll"):
            store.enroll("big", "m", f"s{i:02d}", units(1))


def test_version_binding(store):
    store.enroll("c", "m", "a", units(1), model_version="1")
    with pytest.raises(FailedPrecondition, match="version '1'"):
        store.enroll("c", "m", "b", units(1), model_version="2")
    with pytest.raises(FailedPrecondition, match="version"):
        store.search("c", "m", units(1)[0], 1, model_version="2")


def test_concurrent_appends_to_one_speaker_lose_nothing(store, tmp_path):
    """Two writers (for Milvus: two clients, as two replicas would be) append to the same speaker at once."""
    e = units(40, seed=3)
    others = [store, store]
    if not isinstance(store, LocalStore):
        from service.store.milvus import MilvusStore

        # on a server: a second client, as a second replica would be (Milvus Lite is one process per file)
        others = [store, MilvusStore(store.uri, db=store.db)] if store.uri.startswith("http") else [store, store]
    errors = []

    def writer(s, part):
        try:
            for i in part:
                s.enroll("c", "m", "shared", e[i:i + 1])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(others[k], range(k, 40, 2))) for k in (0, 1)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    rec = store.get("c", "shared")
    assert rec.count == 40
    np.testing.assert_allclose(rec.sum, e.astype(np.float64).sum(0), atol=1e-5)


def test_many_threads_enroll_and_delete_at_once(store):
    """One store used by many threads at once (a server's store pool): every speaker exact, deletes final."""
    e = units(64, seed=9)
    errors = []

    def worker(k):
        try:
            for j in range(4):
                store.enroll("c", "m", f"own{k}", e[8 * k + j:8 * k + j + 1], metadata={f"k{j}": str(j)})
                store.enroll("c", "m", "shared", e[8 * k + 4 + j:8 * k + 5 + j])
            if k % 2:
                store.delete("c", f"own{k}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    shared = store.get("c", "shared")
    assert shared.count == 32
    np.testing.assert_allclose(shared.sum, sum(e[8 * k + 4:8 * k + 8].astype(np.float64).sum(0) for k in range(8)), atol=1e-5)
    for k in range(8):
        if k % 2:
            with pytest.raises(NotFound):
                store.get("c", f"own{k}")
        else:
            rec = store.get("c", f"own{k}")
            assert rec.count == 4 and rec.metadata == {f"k{j}": str(j) for j in range(4)}
            np.testing.assert_allclose(rec.sum, e[8 * k:8 * k + 4].astype(np.float64).sum(0), atol=1e-5)
    assert store.speaker_count("c") == 5


def test_lock_table_serialises_one_key_and_frees_its_locks():
    from service.store.locks import LockTable

    table, order = LockTable(), []

    def hold(key, tag):
        with table.hold(key):
            order.append(("in", tag))
            time.sleep(0.05)
            order.append(("out", tag))

    threads = [threading.Thread(target=hold, args=("a", i)) for i in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert all(order[i][0] == "in" and order[i + 1] == ("out", order[i][1]) for i in range(0, 6, 2))  # one at a time
    assert table._locks == {}


def test_server_on_milvus_enrolls_identifies_and_deletes(model_repo, tmp_path):
    pytest.importorskip("milvus_lite")
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(model_repo, tmp_path / "data", models=["ge2e"], index_backend="milvus",
                                   milvus_uri=str(tmp_path / "milvus.db")))
    v = units(2, dim=256, seed=5)
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for i in range(2):
                s.Enroll(pb.EnrollRequest(collection="t", speaker_id=f"p{i}", embeddings=[
                    pb.Embedding(values=v[i].tolist(), speech_seconds=5)]))
            hit = s.Identify(pb.IdentifyRequest(collection="t", probe=pb.Probe(embedding=pb.Embedding(values=v[1].tolist()))))
            assert hit.candidates[0].speaker_id == "p1"
            s.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="t", speaker_id="p1"))
            assert s.ListSpeakers(pb.ListSpeakersRequest(collection="t")).total_size == 1
            assert {c.name for c in s.ListCollections(pb.ListCollectionsRequest()).collections} == {"t"}
    finally:
        srv.stop()


@pytest.mark.parametrize("opts, words", [
    (dict(index_backend="milvus"), "milvus_uri"),
    (dict(index_backend="milvus", milvus_uri="ftp://x"), "milvus_uri"),
    (dict(index_backend="milvus", milvus_uri="/tmp/m.db", retain_enrollment_audio=True), "retain_enrollment_audio"),
    (dict(index_backend="redis"), "index_backend"),
])
def test_milvus_options_are_checked(opts, words):
    from service.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=words):
        load_config(env={}, overrides=opts)


def test_two_replicas_share_speakers_on_a_milvus_server(model_repo, tmp_path):
    """Two spkserve servers on one Milvus server: enroll through one, identify and delete through the other."""
    uri = os.environ.get("SPKSERVE_TEST_MILVUS_URI")
    if not uri:
        pytest.skip("needs a Milvus server (SPKSERVE_TEST_MILVUS_URI; scripts/milvus_server.sh start)")
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
    from tests.conftest import ServerThread, make_config

    db = _fresh_database(uri, "r")
    servers = [ServerThread(make_config(model_repo, tmp_path / f"d{i}", models=["ge2e"], index_backend="milvus",
                                        milvus_uri=uri, milvus_db=db)) for i in range(2)]
    v = units(3, dim=256, seed=7)
    try:
        with grpc.insecure_channel(servers[0].target) as a, grpc.insecure_channel(servers[1].target) as b:
            one, two = pb_grpc.SpeakerServiceStub(a), pb_grpc.SpeakerServiceStub(b)
            for i in range(3):
                one.Enroll(pb.EnrollRequest(collection="shared", speaker_id=f"p{i}", embeddings=[
                    pb.Embedding(values=v[i].tolist(), speech_seconds=5)]))
            two.Enroll(pb.EnrollRequest(collection="shared", speaker_id="p0", embeddings=[  # append through the other
                pb.Embedding(values=v[0].tolist(), speech_seconds=5)]))
            assert one.GetSpeaker(pb.GetSpeakerRequest(collection="shared", speaker_id="p0")).utterance_count == 2
            probe = pb.Probe(embedding=pb.Embedding(values=v[2].tolist()))
            deadline = time.monotonic() + 10  # searches are bounded-staleness: allow the other replica a moment
            while True:
                hit = two.Identify(pb.IdentifyRequest(collection="shared", probe=probe))
                if hit.candidates and hit.candidates[0].speaker_id == "p2" or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert hit.candidates[0].speaker_id == "p2"
            two.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="shared", speaker_id="p2"))
            with pytest.raises(grpc.RpcError) as e:
                one.GetSpeaker(pb.GetSpeakerRequest(collection="shared", speaker_id="p2"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND
            assert one.ListSpeakers(pb.ListSpeakersRequest(collection="shared")).total_size == 2
            # a collection deleted through one replica is gone for the other: at once for reads of its records,
            # its cached binding within BINDING_TTL_SECONDS
            two.Identify(pb.IdentifyRequest(collection="shared", probe=probe))  # the binding is cached now
            gone = one.DeleteCollection(pb.DeleteCollectionRequest(collection="shared", force=True)).collection
            assert (gone.name, gone.speaker_count) == ("shared", 2)
            with pytest.raises(grpc.RpcError) as e:
                two.GetSpeaker(pb.GetSpeakerRequest(collection="shared", speaker_id="p0"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()  # not an outage
            from service.store.milvus_schema import BINDING_TTL_SECONDS

            time.sleep(BINDING_TTL_SECONDS)
            with pytest.raises(grpc.RpcError) as e:
                two.ListSpeakers(pb.ListSpeakersRequest(collection="shared"))
            assert e.value.code() == grpc.StatusCode.NOT_FOUND, e.value.details()
            assert "shared" not in {c.name for c in two.ListCollections(pb.ListCollectionsRequest()).collections}
    finally:
        for s in servers:
            s.stop()


def test_unreachable_milvus_keeps_the_server_not_serving_and_retries(model_repo, tmp_path, caplog):
    pytest.importorskip("pymilvus")
    import asyncio

    from grpc_health.v1 import health_pb2

    from service.server import SpeakerServer
    from tests.conftest import free_port, make_config

    port = free_port()  # nothing listens on it
    cfg = make_config(model_repo, tmp_path / "d", models=["ge2e"], index_backend="milvus",
                      milvus_uri=f"http://127.0.0.1:{port}")

    async def main():
        server = SpeakerServer(cfg)
        await server.start()
        try:
            await asyncio.sleep(4)
            status = (await server.health.Check(health_pb2.HealthCheckRequest(service=""), None)).status
            return status, server.engine.store
        finally:
            await server.stop(0)

    status, store = asyncio.run(main())
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING and store is None
    assert "not reachable" in caplog.text and "retrying" in caplog.text


def test_milvus_going_away_answers_unavailable_and_health_shows_it(tmp_path, monkeypatch):
    pytest.importorskip("milvus_lite")
    from service.store import StoreUnavailable

    store = _milvus(tmp_path)
    store.enroll("c", "m", "a", units(1))

    def away(*args, **kwargs):
        raise ConnectionError("connection refused")

    real = store.client.query
    monkeypatch.setattr(store.client, "query", away)
    with pytest.raises(StoreUnavailable, match="Milvus call failed"):
        store.get("c", "a")
    assert not store.writable and store.state().startswith("unavailable")
    monkeypatch.setattr(store.client, "query", real)  # back
    assert store.get("c", "a").count == 1 and store.writable
    store.close()


def test_drop_database_removes_a_database_with_its_speakers_and_refuses_the_default():
    pytest.importorskip("pymilvus")
    from service.store.milvus import MilvusStore, drop_database

    for bad in ("", "default"):
        with pytest.raises(InvalidArgument, match="db"):
            drop_database("http://127.0.0.1:1", bad)
    uri = os.environ.get("SPKSERVE_TEST_MILVUS_URI")
    if not uri:
        pytest.skip("the rest needs a Milvus server (SPKSERVE_TEST_MILVUS_URI; scripts/milvus_server.sh start)")
    from pymilvus import MilvusClient

    db = f"d{uuid.uuid4().hex[:12]}"
    MilvusClient(uri=uri).create_database(db)
    store = MilvusStore(uri, db=db)
    store.enroll("c", "m", "a", units(1))
    store.close()
    drop_database(uri, db)
    assert db not in MilvusClient(uri=uri).list_databases()


def test_a_foreign_milvus_collection_is_refused_by_name(tmp_path):
    pytest.importorskip("milvus_lite")
    from pymilvus import MilvusClient

    from service.store.milvus import MilvusStore

    path = str(tmp_path / "foreign.db")
    client = MilvusClient(path)
    client.create_collection("spkserve_tombstones", dimension=8)  # someone else's collection of that name
    client.close()
    with pytest.raises(FailedPrecondition, match="'spkserve_tombstones' exists with another schema"):
        MilvusStore(path)


def test_sealed_milvus_collections_hold_no_ids_in_the_clear(tmp_path):
    """With a key file, ids are keyed hashes and ids + metadata encrypted: no id reaches Milvus' files or logs,
    deletes included; another tenant's key file does not open the collection."""
    pytest.importorskip("pymilvus")
    from service.store.keys import KeyFile
    from service.store.milvus import MilvusStore

    uri = os.environ.get("SPKSERVE_TEST_MILVUS_URI") or str(tmp_path / "milvus.db")
    if not uri.startswith("http"):
        pytest.importorskip("milvus_lite")
    db = _fresh_database(uri, "p") if uri.startswith("http") else ""
    key = KeyFile("k", bytes(range(32)), "acme-*")
    s = MilvusStore(uri, db=db, key_files=[key])
    e = units(3, seed=11)
    try:
        s.enroll("acme-eu", "m", "Zorblax-Quentin", e[:1], {"note": "Szczebrzeszyn"}, speech=3.0)
        s.enroll("acme-eu", "m", "Zorblax-Quentin", e[1:2], {"more": "x"}, speech=3.0)
        s.enroll("acme-eu", "m", "Wilhelmina-Yarrow", e[2:], speech=3.0)
        s.enroll("plain", "m", "Visible-Vincent", e[:1], speech=3.0)  # no key matches: in the clear
        rec = s.get("acme-eu", "Zorblax-Quentin")
        assert rec.count == 2 and rec.metadata == {"note": "Szczebrzeszyn", "more": "x"}
        assert [r.speaker_id for r in s.list("acme-eu", 0, 10)[0]] == ["Wilhelmina-Yarrow", "Zorblax-Quentin"]
        assert s.search("acme-eu", "m", e[2], 1)[0][0].speaker_id == "Wilhelmina-Yarrow"
        s.delete("acme-eu", "Zorblax-Quentin")
        with pytest.raises(NotFound):
            s.get("acme-eu", "Zorblax-Quentin")
        with pytest.raises(FailedPrecondition, match="deleted from or opted out"):
            s.enroll("acme-eu", "m", "Zorblax-Quentin", e[:1])
        assert {c.name: c.index_type for c in s.collections()}["acme-eu"] == "flat"
    finally:
        s.close()
    if not uri.startswith("http"):  # every byte Milvus Lite wrote: no id, no metadata value
        blob = b"".join(p.read_bytes() for p in Path(uri).rglob("*") if p.is_file())
        for secret in (b"Zorblax", b"Wilhelmina", b"Szczebrzeszyn"):
            assert secret not in blob
        assert b"Visible-Vincent" in blob  # the unsealed collection, for contrast
        modes = {p.stat().st_mode & 0o777 for p in Path(uri).rglob("*")}
        assert modes <= {0o600, 0o700}, sorted(oct(m) for m in modes)
    with pytest.raises(FailedPrecondition, match="no configured key file"):
        MilvusStore(uri, db=db).get("acme-eu", "Wilhelmina-Yarrow")
    other = MilvusStore(uri, db=db, key_files=[KeyFile("o", bytes(32), "*")])
    with pytest.raises(StoreCorrupt, match="does not decrypt"):
        other.list("acme-eu", 0, 10)
    other.close()


def test_the_milvus_backend_refuses_an_index_it_does_not_have_by_name():
    from types import SimpleNamespace

    from service.store import IndexOptions
    from service.store.milvus_schema import MilvusSchema

    with pytest.raises(ValueError, match="index_type 'lsh': not an index of the Milvus backend"):
        MilvusSchema.vector_index_params(SimpleNamespace(options=IndexOptions()), "lsh")


def test_milvus_search_parameters_suit_every_index_and_limit():
    """HNSW's ef is never below the results asked; SCANN re-scores rerank x limit candidates."""
    from types import SimpleNamespace

    from service.store import IndexOptions
    from service.store.milvus_schema import MilvusSchema

    fake = SimpleNamespace(options=IndexOptions(hnsw_ef_search=128, ivf_nprobe=256, ivf_pq_rerank=64))
    assert MilvusSchema.search_params(fake, 10)["params"] == {"ef": 128, "nprobe": 256, "reorder_k": 640}
    assert MilvusSchema.search_params(fake, 400)["params"] == {"ef": 400, "nprobe": 256, "reorder_k": 16384}
    assert MilvusSchema.search_params(fake, 400)["metric_type"] == "IP"


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivf_pq"])
def test_milvus_server_builds_every_index_and_searches_it(kind):
    """The store's index parameters build on a Milvus server (a sealed, indexed segment, not only the growing
    one that small collections are searched in) and its search parameters find a stored vector first."""
    import time

    pytest.importorskip("pymilvus")
    uri = os.environ.get("SPKSERVE_TEST_MILVUS_URI")
    if not uri:
        pytest.skip("needs a Milvus server (SPKSERVE_TEST_MILVUS_URI; scripts/milvus_server.sh start)")
    from pymilvus import DataType, MilvusClient

    from service.store import IndexOptions
    from service.store.milvus import MilvusStore

    store = MilvusStore(uri, db=_fresh_database(uri, "i"), options=IndexOptions(index_type=kind, ivf_nlist=16,
                                                                                 ivf_nprobe=16))
    try:
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=32)
        store.client.create_collection("v", schema=schema)
        x = units(3000, dim=32, seed=4)
        store.client.insert("v", [{"pk": i, "vec": v} for i, v in enumerate(x.tolist())])
        store.client.flush("v")
        store.client.create_index("v", store.vector_index_params(kind), sync=False)  # the loop below waits, with a deadline
        deadline = time.monotonic() + 180
        while True:  # a build Milvus rejects is retried for ever (state InProgress): the deadline catches it
            info = store.client.describe_index("v", "vec")
            if info.get("state") == "Finished" and int(info.get("indexed_rows", 0)) >= len(x):
                break
            assert info.get("state") != "Failed" and time.monotonic() < deadline, info
            time.sleep(1)
        store.client.load_collection("v")
        for i in (0, 1234, 2999):
            hits = store.client.search("v", data=[x[i].tolist()], anns_field="vec", limit=5,
                                       search_params=store.search_params(5), consistency_level="Strong")[0]
            assert int(hits[0]["id"]) == i
    finally:
        store.close()
