"""Storage faults: damaged logs and snapshots, full disks, failed fsyncs and snapshots, stray files,
deletion that leaves nothing readable, and the first release's data directory."""

import errno
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from service.cli import main as cli
from service.errors import FailedPrecondition
from service.store import LocalStore, StoreCorrupt, StoreUnavailable, load_key_file
from service.store.wal import FileOps, scan_log

DATA = Path(__file__).parent / "data"


def units(n, dim=16, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)  # (N, D)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def enroll_many(d, n=100, **kw):
    s = LocalStore(d, **kw)
    e = units(n)
    for i in range(n):
        s.enroll("c", "m", f"s{i:03d}", e[i:i + 1], {"i": str(i)})
    return s


def ids(store):
    return [r.speaker_id for r in store.list("c", 0, 10_000)[0]]


@pytest.fixture
def crashed_log(tmp_path):
    """100 acknowledged enrolls, then kill -9: (data dir, the log, its intact records)."""
    s = enroll_many(tmp_path)
    s.abandon()
    wal = next(tmp_path.glob("wal-*.log"))
    return tmp_path, wal, scan_log(wal).records


def _flip_bit(data, rec):
    data[rec.offset + 20] ^= 0x01


def _random_bytes(data, rec):
    data[rec.offset + 8:rec.offset + 24] = np.random.default_rng(1).bytes(16)


def _huge_length(data, rec):
    data[rec.offset + 4:rec.offset + 8] = b"\xff\xff\xff\xff"


def _inserted(data, rec):
    data[rec.offset + 30:rec.offset + 30] = b"0123456789"


@pytest.mark.parametrize("damage", [_flip_bit, _random_bytes, _huge_length, _inserted])
def test_mid_log_damage_stops_start_up_and_repair_keeps_every_intact_record(crashed_log, damage, capsys):
    d, wal, records = crashed_log
    data = bytearray(wal.read_bytes())
    damage(data, records[40])
    wal.write_bytes(bytes(data))
    before = wal.read_bytes()
    with pytest.raises(StoreCorrupt) as exc:
        LocalStore(d)
    msg = str(exc.value)
    assert str(wal) in msg and f"byte {records[40].offset}" in msg and "59 intact records follow" in msg
    assert "repair-log" in msg
    assert wal.read_bytes() == before  # nothing cut off or rewritten
    assert cli(["repair-log", "--data-dir", str(d), "--dry-run"]) == 0 and wal.read_bytes() == before
    capsys.readouterr()
    assert cli(["repair-log", "--data-dir", str(d)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records_kept"] == 99 and report["damaged_stretches"] == 1
    lost = report["logs"][0]["damaged"][0]
    assert Path(lost["saved_to"]).is_file() and lost["offset"] == records[40].offset
    s = LocalStore(d)
    assert ids(s) == [f"s{i:03d}" for i in range(100) if i != 40]  # only the damaged record is gone
    s.close()


def test_repair_names_the_speakers_whose_records_were_set_aside(tmp_path, capsys):
    s = enroll_many(tmp_path, n=5)
    s.enroll("c", "m", "s002", units(1, seed=9), {"again": "1"})  # s002's second record
    s.delete("c", "s004")
    s.abandon()
    wal = next(tmp_path.glob("wal-*.log"))
    records = scan_log(wal).records
    second = next(r for r in records if r.head.get("op") == "enroll" and r.head["slot"] == records[2].head["slot"]
                  and r.offset != records[2].offset)
    data = bytearray(wal.read_bytes())
    for rec in (second, records[4], records[0]):  # s002's append; the deleted s004's (its key is gone); s000's only one
        data[rec.offset + 200] ^= 0x01  # in the sealed payload: the record's head still reads
    wal.write_bytes(bytes(data))
    assert cli(["repair-log", "--data-dir", str(tmp_path), "--dry-run"]) == 0
    affected = json.loads(capsys.readouterr().out)["speakers_affected"]
    by_status = {a["status"]: a for a in affected}
    assert by_status["re-enroll"]["speaker_id"] == "s002" and by_status["re-enroll"]["collection"] == "c"
    assert by_status["deleted"]["speaker_id"] is None and by_status["unknown"]["speaker_id"] is None
    assert len(affected) == 3


def test_zeroed_last_record_is_possibly_acknowledged(crashed_log, caplog, capsys):
    d, wal, records = crashed_log
    data = bytearray(wal.read_bytes())
    data[records[-1].offset:] = bytes(len(data) - records[-1].offset)  # the last record's blocks came back zeroed
    wal.write_bytes(bytes(data))
    assert cli(["repair-log", "--data-dir", str(d), "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["logs"][0]["torn_tail"].startswith("possibly acknowledged")
    s = LocalStore(d)
    assert len(ids(s)) == 99
    s.close()
    assert any("possibly acknowledged" in r.getMessage() for r in caplog.records)
    assert not any("never acknowledged" in r.getMessage() for r in caplog.records)


def test_zero_tail_after_power_loss_is_a_torn_tail(crashed_log):
    d, wal, _ = crashed_log
    size = wal.stat().st_size
    with open(wal, "ab") as f:
        f.write(bytes(4096))
    s = LocalStore(d)
    assert len(ids(s)) == 100 and wal.stat().st_size == size
    s.close()


def test_torn_last_record_is_cut_and_nothing_else(crashed_log):
    d, wal, records = crashed_log
    wal.write_bytes(wal.read_bytes()[:records[-1].offset + 30])
    s = LocalStore(d)
    assert len(ids(s)) == 99 and wal.stat().st_size == records[-1].offset
    s.close()


class Faulty(FileOps):
    """Fails the next write (after writing part of it), fsync or ftruncate on demand."""

    def __init__(self):
        self.fail_write = self.fail_fsync = self.fail_truncate = False

    def write(self, fd, data):
        if self.fail_write:
            os.write(fd, data[:len(data) // 2])  # a partial record reaches the file
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def fsync(self, fd):
        if self.fail_fsync:
            self.fail_fsync = False  # one failed writeback; the rollback's fsync succeeds
            raise OSError(errno.EIO, "Input/output error")
        os.fsync(fd)

    def ftruncate(self, fd, length):
        if self.fail_truncate:
            raise OSError(errno.EIO, "Input/output error")
        os.ftruncate(fd, length)


@pytest.mark.parametrize("fault", ["fail_write", "fail_fsync"])
def test_failed_write_is_cut_off_never_applied_and_later_writes_survive(tmp_path, fault):
    ops = Faulty()
    s = LocalStore(tmp_path, ops=ops)
    e = units(4)
    s.enroll("c", "m", "a", e[:1])
    wal = next(tmp_path.glob("wal-*.log"))
    size = wal.stat().st_size
    setattr(ops, fault, True)
    with pytest.raises(StoreUnavailable, match="nothing was stored"):
        s.enroll("c", "m", "b", e[1:2])
    assert wal.stat().st_size == size  # the partial record was cut off again
    assert ids(s) == ["a"]  # and never applied
    setattr(ops, fault, False)  # space freed
    s.enroll("c", "m", "c", e[2:3])
    assert s.writable
    s.abandon()
    r = LocalStore(tmp_path)
    assert ids(r) == ["a", "c"]  # acknowledged ones only: "b" does not reappear, "c" is not lost
    r.close()


def test_a_write_that_cannot_be_cut_off_stops_writes(tmp_path):
    ops = Faulty()
    s = LocalStore(tmp_path, ops=ops)
    s.enroll("c", "m", "a", units(1))
    ops.fail_write = ops.fail_truncate = True
    with pytest.raises(StoreUnavailable, match="cutting it off failed"):
        s.enroll("c", "m", "b", units(1, seed=1))
    ops.fail_write = ops.fail_truncate = False
    assert not s.writable and s.state().startswith("read-only")
    with pytest.raises(StoreUnavailable, match="stopped until restart"):
        s.enroll("c", "m", "c", units(1, seed=2))
    assert ids(s) == ["a"] and s.get("c", "a")  # reads go on
    s.abandon()
    r = LocalStore(tmp_path)  # the half record is a torn tail
    assert ids(r) == ["a"] and r.writable
    r.close()


def test_failed_snapshot_does_not_fail_the_enroll(tmp_path, monkeypatch):
    import service.store.snapshot as snapshot

    s = LocalStore(tmp_path, snapshot_every=3)
    real = os.replace

    def failing_replace(a, b):
        if str(b).endswith(".bin"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(snapshot.os, "replace", failing_replace)
    e = units(5)
    for i in range(5):
        s.enroll("c", "m", f"s{i}", e[i:i + 1])  # the third triggers a snapshot that fails
    assert "snapshot" in s.state() and s.writable
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob("snapshot-*.bin"))
    monkeypatch.undo()
    s.abandon()
    r = LocalStore(tmp_path)
    assert ids(r) == [f"s{i}" for i in range(5)]
    r.close()


def test_stray_files_are_ignored_and_leftover_temporaries_removed(tmp_path, caplog):
    s = enroll_many(tmp_path, 5)
    s.close()
    (tmp_path / "wal-backup.log").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "snapshot-00000009.bin.tmp").write_bytes(b"half")
    r = LocalStore(tmp_path)
    assert len(ids(r)) == 5
    assert "wal-backup.log" in caplog.text and not (tmp_path / "snapshot-00000009.bin.tmp").exists()
    r.close()


def test_corrupt_snapshot_names_the_file_and_the_way_out(tmp_path):
    s = enroll_many(tmp_path, 10, snapshot_every=4)
    s.close()
    snaps = sorted(tmp_path.glob("snapshot-*.bin"))
    data = bytearray(snaps[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF
    snaps[-1].write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt) as exc:
        LocalStore(tmp_path)
    assert str(snaps[-1]) in str(exc.value) and snaps[-2].name in str(exc.value) and "move" in str(exc.value)
    snaps[-1].rename(tmp_path.parent / "bad.bin")  # what the message says to do
    r = LocalStore(tmp_path)
    assert len(ids(r)) == 10
    r.close()


def test_files_are_private(tmp_path):
    d = tmp_path / "data"
    s = enroll_many(d, 3, snapshot_every=2)
    s.close()
    assert d.stat().st_mode & 0o777 == 0o700
    for p in d.iterdir():
        assert p.stat().st_mode & 0o777 == 0o600, p


def _files(d):
    return b"".join(p.read_bytes() for p in Path(d).rglob("*") if p.is_file())


def test_deleted_voiceprint_is_unreadable_in_every_file(tmp_path):
    s = LocalStore(tmp_path, snapshot_every=3)
    secret = units(2, seed=9)
    s.enroll("c", "m", "victim", secret, {"name": "Jane Q. Example"})
    for i in range(4):  # snapshots now hold the victim too
        s.enroll("c", "m", f"other{i}", units(1, seed=i))
    rec = s.get("c", "victim")
    needles = [b"Jane Q. Example", b"victim", secret[0].tobytes()[:32], rec.sum.tobytes()[:32]]
    blob = _files(tmp_path)
    assert not any(n in blob for n in needles)  # sealed per speaker even before deletion
    s.delete("c", "victim")
    s.abandon()  # no snapshot after the delete: old snapshots and logs still hold its sealed records
    r = LocalStore(tmp_path)
    assert "victim" not in ids(r) and len(ids(r)) == 4
    # what is left cannot be opened: the key slot is zeros
    slot_keys = _files(tmp_path)
    assert not any(n in slot_keys for n in needles)
    assert r._keys.key(1, "c") is None  # the victim's slot (the first speaker key)
    r.close()


def test_deleted_and_opted_out_ids_are_not_re_enrolled_by_accident(tmp_path):
    s = LocalStore(tmp_path)
    s.enroll("c", "m", "a", units(1))
    s.delete("c", "a")
    assert s.delete("c", "never-enrolled", opt_out=True) is None
    for spk in ("a", "never-enrolled"):
        with pytest.raises(FailedPrecondition, match="allow_reenroll"):
            s.enroll("c", "m", spk, units(1, seed=1))
    s.close()
    r = LocalStore(tmp_path)  # tombstones survive restarts
    with pytest.raises(FailedPrecondition):
        r.enroll("c", "m", "a", units(1, seed=1))
    r.enroll("c", "m", "a", units(1, seed=1), allow_reenroll=True)
    r.enroll("c", "m", "b", units(1, seed=2))
    r.abandon()
    t = LocalStore(tmp_path)
    assert ids(t) == ["a", "b"] and t.get("c", "a").count == 1  # a fresh speaker, not the deleted one
    t.close()


def test_retention_expires_unused_speakers(tmp_path):
    s = LocalStore(tmp_path)
    e = units(3)
    for i, spk in enumerate(["old", "used", "new"]):
        s.enroll("c", "m", spk, e[i:i + 1])
    for spk, t in (("old", 1000), ("used", 1000)):
        s._collection("c").speakers[spk].last_used_ms = t  # enrolled long ago
    s.touch("c", ["used"])  # verified now
    s.flush_touches()
    assert s.expire(older_than_ms=5000) == 1 and ids(s) == ["new", "used"]
    with pytest.raises(FailedPrecondition):
        s.enroll("c", "m", "old", e[:1])
    s.abandon()
    r = LocalStore(tmp_path)
    assert ids(r) == ["new", "used"] and r.get("c", "used").last_used_ms > 5000
    r.close()


def test_key_files_wrap_speaker_keys(tmp_path):
    keyfile = tmp_path / "store.key"
    keyfile.write_text(os.urandom(32).hex())
    keyfile.chmod(0o600)
    d = tmp_path / "data"
    s = LocalStore(d, key_files=[load_key_file(keyfile)])
    s.enroll("c", "m", "a", units(1))
    s.close()
    with pytest.raises(StoreCorrupt, match="key file"):
        LocalStore(d)  # without the key file nothing can be read
    r = LocalStore(d, key_files=[load_key_file(keyfile)])
    assert ids(r) == ["a"]
    r.close()
    keyfile.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_key_file(keyfile)


def test_one_process_per_data_directory(tmp_path):
    s = LocalStore(tmp_path)
    with pytest.raises(StoreUnavailable, match="in use"):
        LocalStore(tmp_path)
    s.close()


def test_first_release_data_is_migrated_and_scrubbed(tmp_path):
    d = tmp_path / "data"
    shutil.copytree(DATA / "store-v1", d)
    s = LocalStore(d)
    expected = np.load(DATA / "store-v1-voiceprints.npy")  # (5, 16) spk0, 1, 3, 4, 5
    got = np.stack([s.get("tenant-a", f"spk{i}").voiceprint for i in (0, 1, 3, 4, 5)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert s.get("tenant-a", "spk0").count == 3 and s.get("tenant-a", "spk1").metadata == {"name": "person 1"}
    assert not (d / "snapshot.npz").exists()
    assert b"person 1" not in _files(d)  # no plain text left
    s.close()
    r = LocalStore(d)
    assert len(r.list("tenant-a", 0, 10)[0]) == 5
    r.close()


def test_directory_is_fsynced_after_creating_logs_and_renaming_snapshots(tmp_path, monkeypatch):
    import service.store.snapshot as snapshot
    import service.store.wal as wal

    synced = []
    real = wal.fsync_dir
    monkeypatch.setattr(wal, "fsync_dir", lambda p: synced.append(("log", p)) or real(p))
    monkeypatch.setattr(snapshot, "fsync_dir", lambda p: synced.append(("snapshot", p)) or real(p))
    s = LocalStore(tmp_path, snapshot_every=2)
    assert ("log", tmp_path) in synced  # the first log file's directory entry is durable
    synced.clear()
    s.enroll("c", "m", "a", units(1))
    s.enroll("c", "m", "b", units(1, seed=1))  # triggers a snapshot and a new log generation
    assert [k for k, _ in synced] == ["snapshot", "log"]
    s.close()


@pytest.mark.parametrize("fault", ["fail_write", "fail_fsync"])
def test_a_drop_that_cannot_be_written_changes_nothing(tmp_path, fault):
    """Disk full or a failed fsync while dropping a collection: the record is cut off, the collection and every
    speaker's key stay (a restart sees them), and a later drop succeeds."""
    ops = Faulty()
    s = enroll_many(tmp_path, n=5, ops=ops)
    setattr(ops, fault, True)
    with pytest.raises(StoreUnavailable, match="nothing was stored"):
        s.drop_collection("c", force=True)
    setattr(ops, fault, False)
    assert len(ids(s)) == 5 and all(s._keys.key(slot, "c") for slot in range(1, 6))
    s.abandon()
    r = LocalStore(tmp_path)
    assert len(ids(r)) == 5
    assert r.drop_collection("c", force=True).speaker_count == 5
    r.close()


@pytest.mark.parametrize("when", ["after the record", "after the keys", "after a snapshot"])
def test_a_dropped_collection_stays_dropped_and_unreadable_after_kill_9(tmp_path, when, monkeypatch):
    """kill -9 right after the drop's record (its keys not yet destroyed), after the keys, or after a snapshot: the
    restart has no trace of the collection, its speakers' keys are zeros (destroyed at start-up when the crash came
    first), nothing they said is in any file, their ids are tombstoned, and other collections are intact."""
    s = LocalStore(tmp_path, snapshot_every=1000 if when != "after a snapshot" else 4)
    secret = units(2, seed=9)
    s.enroll("c", "m", "victim", secret, {"name": "Jane Q. Example"})
    s.enroll("c", "m", "v2", units(1, seed=4))
    s.enroll("keep", "m", "k", units(1, seed=5))
    if when == "after the record":
        monkeypatch.setattr(s._keys, "destroy_many", lambda slots: None)  # killed before the keys were destroyed
    s.drop_collection("c", force=True)
    s.abandon()
    r = LocalStore(tmp_path)
    assert [i.name for i in r.collections()] == ["keep"] and r.get("keep", "k").count == 1
    assert r._keys.key(1, "c") is None and r._keys.key(2, "c") is None  # both speakers' slots are zeros
    assert not any(n in _files(tmp_path) for n in (b"Jane Q. Example", b"victim", secret[0].tobytes()[:32]))
    with pytest.raises(FailedPrecondition, match="allow_reenroll"):
        r.enroll("c", "m", "victim", units(1))
    r.enroll("c", "m2", "fresh", units(1, dim=8))  # the name is free for another model
    r.close()


def test_a_drop_whose_keys_cannot_be_destroyed_stops_writes_until_they_are(tmp_path, monkeypatch):
    s = enroll_many(tmp_path, n=3)
    real = s._keys.destroy_many

    def failing(slots):
        raise StoreUnavailable("speaker store: could not write keys.bin (Input/output error)")

    monkeypatch.setattr(s._keys, "destroy_many", failing)
    monkeypatch.setattr(s._keys, "destroy", lambda slot: failing([slot]))
    with pytest.raises(StoreUnavailable, match="was deleted, but destroying its speakers' keys failed"):
        s.drop_collection("c", force=True)
    assert s.collections() == []  # deleted all the same
    with pytest.raises(StoreUnavailable, match="destroying its key failed"):
        s.enroll("d", "m", "x", units(1))
    monkeypatch.setattr(s._keys, "destroy_many", real)
    monkeypatch.undo()
    s.enroll("d", "m", "x", units(1))  # the pending keys were destroyed first
    assert all(s._keys.key(slot, "c") is None for slot in range(1, 4))
    s.close()


@pytest.mark.parametrize("fault", ["fail_write", "fail_fsync", None])
def test_metadata_updates_survive_kill_9_and_failed_writes_change_nothing(tmp_path, fault):
    """A metadata update is a record sealed with the speaker's key: replayed after kill -9 (and after a snapshot),
    nothing of it in the clear on disk, nothing of it applied when its write fails, and unreadable once deleted."""
    ops = Faulty()
    s = LocalStore(tmp_path, ops=ops, snapshot_every=3)
    s.enroll("c", "m", "a", units(1), {"name": "Jane Q. Example"})
    s.update_metadata("c", "a", {"phone": "+1 555 0100"}, ["name"])
    if fault:
        setattr(ops, fault, True)
        with pytest.raises(StoreUnavailable, match="nothing was stored"):
            s.update_metadata("c", "a", {"phone": "+1 555 0199"}, [])
        setattr(ops, fault, False)
    assert s.get("c", "a").metadata == {"phone": "+1 555 0100"}
    s.enroll("c", "m", "b", units(1, seed=1))
    s.enroll("c", "m", "b", units(1, seed=2))  # a snapshot after these
    s.update_metadata("c", "b", {"k": "v"}, [])  # and a record after the snapshot
    s.abandon()
    r = LocalStore(tmp_path)
    assert r.get("c", "a").metadata == {"phone": "+1 555 0100"} and r.get("c", "b").metadata == {"k": "v"}
    assert b"+1 555 01" not in _files(tmp_path)
    r.delete("c", "a")
    r.abandon()
    t = LocalStore(tmp_path)  # the deleted speaker's update records are unreadable, and skipped
    assert ids(t) == ["b"]
    t.close()


def _state(store):
    return {(i.name, r.speaker_id): (r.count, dict(r.metadata), r.sum.tobytes())
            for i in store.collections() for r in store.list(i.name, 0, 100_000)[0]}


def test_a_backup_of_a_stopped_store_restores_it_exactly(tmp_path, capsys):
    s = LocalStore(tmp_path / "data", snapshot_every=7)
    for i in range(20):
        s.enroll("c" if i % 3 else "d", "m", f"s{i % 12}", units(1, seed=i), {"i": str(i)})
    s.delete("c", "s1")
    s.update_metadata("d", "s0", {"z": "1"}, ["i"])
    want = _state(s)
    s.close()
    assert cli(["backup", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "b")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["collections"] == 2 and summary["speakers"] == len(want) and summary["bytes"] > 0
    r = LocalStore(tmp_path / "b")
    assert _state(r) == want
    with pytest.raises(FailedPrecondition, match="allow_reenroll"):  # tombstones come along
        r.enroll("c", "m", "s1", units(1))
    r.close()
    assert oct((tmp_path / "b").stat().st_mode & 0o777) == "0o700"
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "b").rglob("*") if p.is_file())


def test_a_backup_taken_while_the_store_writes_and_rotates_is_consistent(tmp_path):
    """A writer enrolls, appends and deletes while snapshots rotate every few records; backups taken meanwhile open,
    hold only acknowledged changes, and everything acknowledged before each backup started."""
    import threading

    from service.store.backup import backup_store

    s = LocalStore(tmp_path / "data", snapshot_every=5)
    acked: list[tuple[str, int]] = []  # (speaker, count after the enroll), in order
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            spk = f"s{i % 40}"
            rec, _ = s.enroll("c", "m", spk, units(1, seed=i), {"n": str(i)})
            acked.append((spk, rec.count))
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for n in range(4):
            time.sleep(0.2)
            before = dict(acked)  # each speaker's count acknowledged before this backup started
            summary = backup_store(tmp_path / "data", tmp_path / f"b{n}")
            assert summary["speakers"] >= len(before)
            r = LocalStore(tmp_path / f"b{n}")
            got = {rec.speaker_id: rec.count for rec in r.list("c", 0, 1000)[0]}
            r.close()
            assert all(got.get(spk, 0) >= count for spk, count in before.items()), (before, got)
            assert all(count <= max(c for s_, c in acked if s_ == spk) for spk, count in got.items())
    finally:
        stop.set()
        t.join()
        s.close()
    assert len(acked) > 20  # the writer really wrote meanwhile


def test_a_backup_needs_the_key_files_and_a_new_directory(tmp_path, capsys):
    keyfile = tmp_path / "store.key"
    keyfile.write_text(os.urandom(32).hex())
    keyfile.chmod(0o600)
    s = LocalStore(tmp_path / "data", key_files=[load_key_file(keyfile)])
    s.enroll("c", "m", "a", units(1))
    assert cli(["backup", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "b")]) == 1
    assert "does not open" in capsys.readouterr().err  # without the key file the copy cannot be checked
    (tmp_path / "server.toml").write_text(f'encryption_key_file = "{keyfile}"\n')
    assert cli(["backup", "--data-dir", str(tmp_path / "data"), "--out", str(tmp_path / "b2"),
                "--config", str(tmp_path / "server.toml")]) == 0  # the server still runs: an online backup
    assert json.loads(capsys.readouterr().out)["speakers"] == 1
    for out, words in [(tmp_path / "b2", "not an empty directory"), (tmp_path / "data" / "x", "inside the data"),
                       (tmp_path / "nowhere", None)]:
        code = cli(["backup", "--data-dir", str(tmp_path / ("data" if words else "missing")), "--out", str(out)])
        assert code == 1 and (words or "not a speaker store") in capsys.readouterr().err
    s.close()


def test_a_backup_starts_again_when_a_rotation_removes_a_file_it_copies(tmp_path, monkeypatch):
    from service.store import backup

    s = enroll_many(tmp_path / "data", n=5)
    real, calls = backup._copy, []

    def vanishing(src, dst):
        calls.append(src.name)
        if len(calls) == 1:
            raise FileNotFoundError(2, "No such file or directory", str(src))  # removed by a rotation
        return real(src, dst)

    monkeypatch.setattr(backup, "_copy", vanishing)
    assert backup.backup_store(tmp_path / "data", tmp_path / "b")["speakers"] == 5
    assert calls.count(calls[0]) == 2  # the first file again, in a fresh directory
    monkeypatch.setattr(backup, "_copy", lambda src, dst: (_ for _ in ()).throw(FileNotFoundError(2, "gone")))
    with pytest.raises(backup.BackupError, match="kept changing under 5 attempts"):
        backup.backup_store(tmp_path / "data", tmp_path / "c")
    assert not (tmp_path / "c").exists()
    s.close()


def test_repair_names_lost_metadata_updates_and_collection_deletions(tmp_path, capsys):
    s = enroll_many(tmp_path, n=3)
    s.update_metadata("c", "s001", {"desk": "7"}, [])
    s.enroll("gone", "m", "x", units(1, seed=5))
    s.drop_collection("gone", force=True)
    s.abandon()
    wal = next(tmp_path.glob("wal-*.log"))
    records = scan_log(wal).records
    meta = next(r for r in records if r.head.get("op") == "meta")
    drop = next(r for r in records if r.head.get("op") == "drop")
    data = bytearray(wal.read_bytes())
    for rec in (meta, drop):
        data[rec.offset + 8] ^= 0x01  # the checksum: the record is set aside, its head still reads
    wal.write_bytes(bytes(data))
    assert cli(["repair-log", "--data-dir", str(tmp_path), "--dry-run"]) == 0
    affected = json.loads(capsys.readouterr().out)["speakers_affected"]
    assert {"collection": "c", "speaker_id": "s001", "slot": records[1].head["slot"], "status": "update-metadata"} \
        in affected, affected
    assert {"collection": "gone", "speaker_id": None, "slot": None, "status": "delete-collection"} in affected
    assert len(affected) == 2
