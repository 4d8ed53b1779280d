"""SpeakerStore: exact appends, durability, snapshots, index types."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.store import IndexOptions, validate_collection, validate_speaker_id
from service.store import LocalStore as SpeakerStore


def units(n: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_append_equals_enrolling_all_at_once(tmp_path):
    e = units(5)
    s = SpeakerStore(tmp_path / "a")
    s.enroll("c", "m", "x", e[:2])
    rec, created = s.enroll("c", "m", "x", e[2:])
    assert not created and rec.count == 5
    t = SpeakerStore(tmp_path / "b")
    whole, _ = t.enroll("c", "m", "x", e)
    assert np.array_equal(rec.voiceprint, whole.voiceprint)
    mean = e.mean(0)
    np.testing.assert_allclose(rec.voiceprint, mean / np.linalg.norm(mean), atol=1e-6)


def test_recovery_from_wal_and_snapshot(tmp_path):
    e = units(40)
    s = SpeakerStore(tmp_path, snapshot_every=7)
    for i in range(30):
        s.enroll("c", "m", f"s{i % 12}", e[i:i + 1], {"k": str(i)})
    s.delete("c", "s3")
    expected = {r.speaker_id: (r.count, r.voiceprint.copy(), dict(r.metadata)) for r in s.list("c", 0, 100)[0]}
    s.abandon()  # no close(): as after kill -9
    r = SpeakerStore(tmp_path, snapshot_every=7)
    got = {x.speaker_id: (x.count, x.voiceprint, x.metadata) for x in r.list("c", 0, 100)[0]}
    assert set(got) == set(expected) and "s3" not in got
    for k in expected:
        assert got[k][0] == expected[k][0] and np.array_equal(got[k][1], expected[k][1]) and got[k][2] == expected[k][2]
    # the last two snapshots and the logs after the older one stay; older generations are removed
    assert len(list(tmp_path.glob("wal-*.log"))) == 2 and len(list(tmp_path.glob("snapshot-*.bin"))) == 2


def test_torn_tail_is_cut(tmp_path):
    s = SpeakerStore(tmp_path)
    s.enroll("c", "m", "a", units(1))
    wal = next(tmp_path.glob("wal-*.log"))
    good = wal.stat().st_size
    s.enroll("c", "m", "b", units(1, seed=1))
    data = wal.read_bytes()
    s.abandon()
    wal.write_bytes(data[: good + (len(data) - good) // 2])  # crash in the middle of the second record
    r = SpeakerStore(tmp_path)
    assert [x.speaker_id for x in r.list("c", 0, 10)[0]] == ["a"]
    assert wal.stat().st_size == good
    r.enroll("c", "m", "c", units(1, seed=2))  # appends after the cut work
    r.abandon()
    assert [x.speaker_id for x in SpeakerStore(tmp_path).list("c", 0, 10)[0]] == ["a", "c"]


def test_errors(tmp_path):
    s = SpeakerStore(tmp_path)
    s.enroll("c", "m", "a", units(1))
    with pytest.raises(FailedPrecondition, match="model 'm'"):
        s.enroll("c", "other", "b", units(1))
    with pytest.raises(FailedPrecondition, match="dim 16"):
        s.enroll("c", "m", "b", units(1, dim=8))
    with pytest.raises(NotFound, match="collection"):
        s.get("nope", "a")
    with pytest.raises(NotFound, match="speaker_id"):
        s.delete("c", "zz")
    with pytest.raises(InvalidArgument, match="metadata"):
        s.enroll("c", "m", "a", units(1), {"k": "v" * 2000})
    with pytest.raises(InvalidArgument, match="collection"):
        validate_collection("has space")
    with pytest.raises(InvalidArgument, match="speaker_id"):
        validate_speaker_id("a\nb")
    assert validate_collection("") == "default"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf", "ivf_pq"])
def test_index_types_find_the_right_speaker_and_honour_deletes(tmp_path, kind):
    n, dim = 3000, 32
    vecs = units(n, dim, seed=3)
    s = SpeakerStore(tmp_path, IndexOptions(index_type=kind, ivf_nlist=16, ivf_nprobe=16), fsync=False)
    for i in range(n):
        s.enroll("c", "m", f"s{i}", vecs[i:i + 1])
    assert s.collections()[0].index_type == kind
    for i in (0, 17, 2999):
        assert s.search("c", "m", vecs[i], 3)[0][0].speaker_id == f"s{i}"
    s.delete("c", "s17")
    s.enroll("c", "m", "s0", -vecs[0:1])  # s0 moves far away from vecs[0]
    top = [h[0].speaker_id for h in s.search("c", "m", vecs[17], 5)]
    assert "s17" not in top
    assert s.search("c", "m", vecs[0], 1)[0][0].speaker_id != "s0"
    assert len(s.search("c", "m", vecs[1], 10)) == 10
    # a filter (e.g. speakers with enough speech) still fills top-k from further down
    odd = [h[0].speaker_id for h in s.search("c", "m", vecs[1], 10, keep=lambda r: int(r.speaker_id[1:]) % 2 == 1)]
    assert len(odd) == 10 and all(int(x[1:]) % 2 == 1 for x in odd)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_approximate_indexes_on_voiceprints_in_one_cone_keep_exact_scores_and_ranking(kind):
    """Voiceprints sharing a large common direction (as speaker embeddings do): the approximate index
    answers the raw inner product and agrees with exact search."""
    from service.store.base import SpeakerRecord
    from service.store.faiss_index import CollectionIndex

    rng = np.random.default_rng(5)
    dim, n = 32, 4000
    common = rng.standard_normal(dim)
    vecs = common / np.linalg.norm(common) * 1.22 + rng.standard_normal((n, dim)) / np.sqrt(dim)  # (N, D) cosine ~0.6
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    opts = IndexOptions(index_type=kind, ivf_nlist=16, ivf_nprobe=16, hnsw_ef_search=256)
    coll, exact = CollectionIndex("c", "m", dim, opts), CollectionIndex("c", "m", dim, IndexOptions())
    for i, v in enumerate(vecs[:-10]):
        for c in (coll, exact):
            c.upsert(SpeakerRecord(f"s{i}", v.astype(np.float64), 1))
    coll.search(vecs[0], 1)  # built here; the last ten arrive after the build
    for i, v in enumerate(vecs[-10:], start=n - 10):
        for c in (coll, exact):
            c.upsert(SpeakerRecord(f"s{i}", v.astype(np.float64), 1))
    probes = vecs[[3, 500, n - 1]] + rng.standard_normal((3, dim)).astype(np.float32) * 0.05
    for q in probes / np.linalg.norm(probes, axis=1, keepdims=True):
        got, want = coll.search(q, 5), exact.search(q, 5)
        assert [r.speaker_id for r, _ in got] == [r.speaker_id for r, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
        assert abs(got[0][1] - float(q @ vecs[int(got[0][0].speaker_id[1:])])) < 1e-5


def test_ivf_pq_rescores_its_candidates_exactly_and_reranking_restores_the_order_codes_confuse():
    """Voiceprints in one cone with near-tied neighbours: 4-bit codes alone misorder the ten best;
    re-scoring the candidates exactly gives exact search's top ten and its scores (every list probed:
    what probing fewer lists costs is IVF's, measured in bench/bench_search_real.py)."""
    from service.store.base import SpeakerRecord
    from service.store.faiss_index import CollectionIndex

    rng = np.random.default_rng(11)
    dim, n = 64, 8000
    common = rng.standard_normal(dim)
    vecs = common / np.linalg.norm(common) * 1.22 + rng.standard_normal((n, dim)) / np.sqrt(dim)  # (N, D) cosine ~0.6
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    exact = CollectionIndex("c", "m", dim, IndexOptions())
    few = CollectionIndex("c", "m", dim, IndexOptions(index_type="ivf_pq", ivf_nlist=16, ivf_nprobe=16, ivf_pq_rerank=1))
    many = CollectionIndex("c", "m", dim, IndexOptions(index_type="ivf_pq", ivf_nlist=16, ivf_nprobe=16, ivf_pq_rerank=64))
    for i, v in enumerate(vecs):
        for c in (exact, few, many):
            c.upsert(SpeakerRecord(f"s{i}", v.astype(np.float64), 1))
    probes = vecs[:20] + rng.standard_normal((20, dim)).astype(np.float32) * 0.1
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    agree_few = agree_many = 0
    for q in probes:
        want = exact.search(q, 10)
        got_few, got_many = few.search(q, 10), many.search(q, 10)
        agree_few += [r.speaker_id for r, _ in got_few] == [r.speaker_id for r, _ in want]
        agree_many += [r.speaker_id for r, _ in got_many] == [r.speaker_id for r, _ in want]
        for rec, score in got_few + got_many:  # scores are always the exact inner product
            assert abs(score - float(q @ rec.voiceprint)) < 1e-5
    assert many.info().index_type == "ivf_pq"
    assert agree_many >= 18 and agree_few < agree_many


def test_ivf_pq_answers_like_exact_search_through_updates_and_deletes_after_its_build():
    from service.store.base import SpeakerRecord
    from service.store.faiss_index import CollectionIndex

    rng = np.random.default_rng(12)
    dim = 32
    exact = CollectionIndex("c", "m", dim, IndexOptions())
    pq = CollectionIndex("c", "m", dim, IndexOptions(index_type="ivf_pq", ivf_nlist=16, ivf_nprobe=16, ivf_pq_rerank=200))

    def put(i: int) -> None:
        v = units(1, dim, seed=int(rng.integers(1 << 30)))[0].astype(np.float64)
        for c in (exact, pq):
            c.upsert(SpeakerRecord(f"s{i}", v, 1))

    for i in range(700):
        put(i)
    pq.search(units(1, dim, seed=1)[0], 1)  # built here
    assert pq.info().index_type == "ivf_pq"
    for i in rng.choice(700, 300, replace=False).tolist() + list(range(700, 760)):
        put(i)  # moved after the build, and new speakers
    for i in rng.choice(760, 100, replace=False).tolist():
        for c in (exact, pq):
            if f"s{i}" in c.speakers:
                c.remove(f"s{i}")
    for q in units(20, dim, seed=2):
        got, want = pq.search(q, 5), exact.search(q, 5)
        assert [r.speaker_id for r, _ in got] == [r.speaker_id for r, _ in want]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=1e-5)


def test_speech_and_cohort_statistics_survive_restart(tmp_path):
    cohort = units(30, seed=9)

    def stats_fn(model, vecs):
        return None if model != "m" else np.stack([(vecs @ cohort.T).mean(1), (vecs @ cohort.T).std(1)], 1)

    e = units(6)
    s = SpeakerStore(tmp_path, snapshot_every=3)
    s.set_stats_fn(stats_fn)
    s.enroll("c", "m", "x", e[:2], speech=2.5)
    rec, _ = s.enroll("c", "m", "x", e[2:4], speech=1.25)
    s.enroll("d", "other", "y", e[4:5], speech=4.0)  # a model without a cohort: no statistics
    assert rec.speech == pytest.approx(3.75)
    np.testing.assert_allclose(rec.stats, stats_fn("m", rec.voiceprint[None])[0], rtol=1e-6)
    assert s.get("c", "x").stats is not None
    s.abandon()
    r = SpeakerStore(tmp_path, snapshot_every=3)  # snapshot + log replay
    assert r.get("c", "x").speech == pytest.approx(3.75) and r.get("c", "x").stats is None
    r.set_stats_fn(stats_fn)  # the engine sets it once the models are loaded: every voiceprint gets its statistics
    np.testing.assert_allclose(r.get("c", "x").stats, rec.stats, rtol=1e-6)
    assert r.get("d", "y").stats is None


def test_records_written_before_speech_was_measured_stay_usable(tmp_path):
    import json
    import struct
    import zlib

    # a log record as the first release wrote it: no "speech" key
    (tmp_path).mkdir(exist_ok=True)
    emb = units(1)
    head = json.dumps({"op": "enroll", "c": "c", "model": "m", "spk": "old", "n": 1, "dim": 16, "meta": {},
                       "ts": 1}).encode()
    payload = struct.pack("<I", len(head)) + head + emb.tobytes()
    (tmp_path / "wal-00000000.log").write_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    s = SpeakerStore(tmp_path)
    assert s.get("c", "old").speech is None  # unknown, not zero: the service treats it as ready
    rec, _ = s.enroll("c", "m", "old", units(1, seed=3), speech=1.0)
    assert rec.speech is None and rec.count == 2


def test_model_version_binding_is_adopted_checked_and_kept(tmp_path):
    from service.errors import FailedPrecondition

    s = SpeakerStore(tmp_path, snapshot_every=2)
    s.enroll("c", "m", "a", units(1))  # written before versions were kept
    assert s.collection_binding("c") == ("m", "")
    s.enroll("c", "m", "b", units(1, seed=1), model_version="1.0")  # adopts the first version seen
    assert s.collection_binding("c") == ("m", "1.0")
    with pytest.raises(FailedPrecondition, match="version '1.0'.*'2.0'"):
        s.enroll("c", "m", "c", units(1, seed=2), model_version="2.0")
    with pytest.raises(FailedPrecondition, match="version"):
        s.search("c", "m", units(1)[0], 1, model_version="2.0")
    assert len(s.search("c", "m", units(1)[0], 2, model_version="1.0")) == 2
    s.abandon()
    r = SpeakerStore(tmp_path)  # snapshot + log replay keep it
    assert r.collection_binding("c") == ("m", "1.0")
    r.close()
