"""SpeakerStore: exact appends, durability, snapshots, index types."""

from __future__ import annotations

import numpy as np
import pytest

from service.errors import FailedPrecondition, InvalidArgument, NotFound
from service.index import IndexOptions, SpeakerStore, validate_collection, validate_speaker_id


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
    # no close(): as after kill -9
    r = SpeakerStore(tmp_path, snapshot_every=7)
    got = {x.speaker_id: (x.count, x.voiceprint, x.metadata) for x in r.list("c", 0, 100)[0]}
    assert set(got) == set(expected) and "s3" not in got
    for k in expected:
        assert got[k][0] == expected[k][0] and np.array_equal(got[k][1], expected[k][1]) and got[k][2] == expected[k][2]
    assert len(list(tmp_path.glob("wal-*.log"))) == 1  # older generations removed after snapshots


def test_torn_tail_is_cut(tmp_path):
    s = SpeakerStore(tmp_path)
    s.enroll("c", "m", "a", units(1))
    wal = next(tmp_path.glob("wal-*.log"))
    good = wal.stat().st_size
    s.enroll("c", "m", "b", units(1, seed=1))
    data = wal.read_bytes()
    wal.write_bytes(data[: good + (len(data) - good) // 2])  # crash in the middle of the second record
    r = SpeakerStore(tmp_path)
    assert [x.speaker_id for x in r.list("c", 0, 10)[0]] == ["a"]
    assert wal.stat().st_size == good
    r.enroll("c", "m", "c", units(1, seed=2))  # appends after the cut work
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


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_types_find_the_right_speaker_and_honour_deletes(tmp_path, kind):
    n, dim = 3000, 32
    vecs = units(n, dim, seed=3)
    s = SpeakerStore(tmp_path, IndexOptions(index_type=kind, ivf_nlist=16, ivf_nprobe=16), fsync=False)
    for i in range(n):
        s.enroll("c", "m", f"s{i}", vecs[i:i + 1])
    assert s.collections()[0].index_type == kind
    for i in (0, 17, 2999):
        assert s.search("c", "m", vecs[i], 3)[0][0] == f"s{i}"
    s.delete("c", "s17")
    s.enroll("c", "m", "s0", -vecs[0:1])  # s0 moves far away from vecs[0]
    top = [h[0] for h in s.search("c", "m", vecs[17], 5)]
    assert "s17" not in top
    assert s.search("c", "m", vecs[0], 1)[0][0] != "s0"
    assert len(s.search("c", "m", vecs[1], 10)) == 10
