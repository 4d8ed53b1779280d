"""The write-ahead log: record format, an append-only writer that never leaves a failed record
behind, and a scanner that tells a torn tail from damage.

File format (version 2)::

    b"SPKWAL2\\n"                                    file header
    b"\\xa5SPK" | u32 length | u32 crc | payload      one record (little endian)
    payload = u32 head length | JSON head | blob     crc = CRC-32 of the length bytes + payload

Version 1 files (the first release) have no header and records ``u32 length | u32 crc(payload)
| payload``; they are read, never written.

Recovery rules (``scan_log``):
- a *torn tail* is what a crash in the middle of an append leaves: a last record cut short,
  or zero bytes after the last intact record (the usual result of power loss). Only that may
  be cut off silently;
- anything else that fails its checksum or does not parse is *damage*. The scanner finds the
  next intact record after it, so the caller can refuse to start with the file, the offset and
  the number of intact records that follow, instead of discarding them.

The writer appends with ``os.write`` on an unbuffered descriptor and fsyncs; when a write or an
fsync fails it truncates the file back to the end of the last complete record, so a failed
append leaves nothing behind that a later append or a restart could pick up. If even the
truncation fails the writer is *broken*: it refuses further appends until restart.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from service.store.base import StoreUnavailable

__all__ = ["FILE_MAGIC", "encode_record", "Record", "Damage", "Scan", "scan_log", "readable_heads", "LogWriter",
           "FileOps", "repair_log", "fsync_dir", "MAX_RECORD"]

FILE_MAGIC = b"SPKWAL2\n"
_REC_MAGIC = b"\xa5SPK"
_HEAD2 = struct.Struct("<4sII")  # record marker, payload length, crc
_HEAD1 = struct.Struct("<II")  # version 1: payload length, crc(payload)
MAX_RECORD = 256 * 1024 * 1024


class FileOps:
    """The system calls the writer uses; tests replace them to inject faults."""

    def write(self, fd: int, data: bytes) -> int:
        """os.write (a seam for fault injection in tests)."""
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        """os.fsync (a seam for fault injection in tests)."""
        os.fsync(fd)

    def ftruncate(self, fd: int, length: int) -> None:
        """os.ftruncate (a seam for fault injection in tests)."""
        os.ftruncate(fd, length)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that files created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_record(head: dict, blob: bytes = b"") -> bytes:
    """One version-2 record."""
    h = json.dumps(head, separators=(",", ":")).encode()
    payload = struct.pack("<I", len(h)) + h + blob
    if len(payload) > MAX_RECORD:
        raise ValueError(f"log record of {len(payload)} bytes exceeds {MAX_RECORD}")
    length = struct.pack("<I", len(payload))
    return _REC_MAGIC + length + struct.pack("<I", zlib.crc32(length + payload)) + payload


@dataclass
class Record:
    """An intact record: where it is and what it says."""

    offset: int
    end: int
    head: dict
    blob: bytes


@dataclass
class Damage:
    """A damaged stretch of a log file."""

    offset: int
    end: int
    reason: str
    hint: dict | None = None  # what the damaged bytes still say (a readable record head), when anything


@dataclass
class Scan:
    """The result of reading one log file."""

    path: Path
    version: int
    size: int
    records: list[Record] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    torn_tail: tuple[int, int] | None = None  # (offset, bytes) of a crash-torn last record

    @property
    def good_end(self) -> int:
        """Where the intact content ends (the size minus a torn tail)."""
        return self.torn_tail[0] if self.torn_tail else self.size

    def records_after(self, offset: int) -> int:
        """How many intact records start after ``offset``."""
        return sum(r.offset > offset for r in self.records)


def _payload(payload: bytes) -> tuple[dict, bytes] | None:
    if len(payload) < 4:
        return None
    (hlen,) = struct.unpack_from("<I", payload)
    try:
        head = json.loads(payload[4:4 + hlen])
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(head, dict) or "op" not in head or 4 + hlen > len(payload):
        return None
    return head, payload[4 + hlen:]


def _parse_at(data: bytes, pos: int, version: int) -> Record | None:
    """The intact record starting at ``pos``, or None."""
    if version == 2:
        if pos + _HEAD2.size > len(data):
            return None
        magic, length, crc = _HEAD2.unpack_from(data, pos)
        start = pos + _HEAD2.size
        if magic != _REC_MAGIC or length > MAX_RECORD or start + length > len(data):
            return None
        payload = data[start:start + length]
        if zlib.crc32(data[pos + 4:pos + 8] + payload) != crc:
            return None
    else:
        if pos + _HEAD1.size > len(data):
            return None
        length, crc = _HEAD1.unpack_from(data, pos)
        start = pos + _HEAD1.size
        if length < 4 or length > MAX_RECORD or start + length > len(data):
            return None
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            return None
    parsed = _payload(payload)
    if parsed is None:
        return None
    return Record(pos, start + length, parsed[0], parsed[1])


def _next_record(data: bytes, pos: int, version: int) -> int | None:
    """The offset of the next intact record after ``pos`` (searching marker positions in v2)."""
    if version == 2:
        i = data.find(_REC_MAGIC, pos)
        while i != -1:
            if _parse_at(data, i, 2) is not None:
                return i
            i = data.find(_REC_MAGIC, i + 1)
        return None
    for i in range(pos, len(data) - _HEAD1.size):  # version 1 has no marker: try every offset
        if _parse_at(data, i, 1) is not None:
            return i
    return None


def _hint(data: bytes, pos: int, end: int) -> dict | None:
    """What a damaged stretch still says: the JSON head of a record whose blob is damaged, say."""
    heads = readable_heads(data, pos, end)
    return heads[0] if heads else None


def readable_heads(data: bytes, pos: int, end: int) -> list[dict]:
    """Every record head that still parses in ``data[pos:end]`` (op, collection, slot, time)."""
    chunk, out, start = data[pos:end], [], 0
    while (i := chunk.find(b'{"op"', start)) >= 0:
        depth, j = 0, i
        while j < len(chunk):
            depth += {ord("{"): 1, ord("}"): -1}.get(chunk[j], 0)
            j += 1
            if depth == 0:
                break
        try:
            head = json.loads(chunk[i:j])
            out.append({k: head[k] for k in ("op", "c", "spk", "slot", "ts") if k in head})
        except (ValueError, UnicodeDecodeError):
            pass
        start = i + 1
    return out


def _is_torn(data: bytes, pos: int, version: int) -> bool:
    """Whether the bytes from ``pos`` to the end look like an append cut short by a crash."""
    tail = data[pos:]
    if not tail.strip(b"\x00"):
        return True  # zeros only: the file was extended but the data never reached the disk
    head = _HEAD2 if version == 2 else _HEAD1
    if version == 2 and not _REC_MAGIC.startswith(tail[:4]) and tail[:4] != _REC_MAGIC:
        return False  # not even a record marker: damage, not a torn append
    if len(tail) < head.size:
        return True
    length = head.unpack_from(tail)[1 if version == 2 else 0]
    if head.size + length > len(tail):
        return True  # the record is cut short
    stripped = tail.rstrip(b"\x00")
    return len(tail) - len(stripped) >= 16  # the end of the record never made it to the disk


def scan_log(path: Path) -> Scan:
    """Read a log file into intact records, damage and a torn tail (see the module docstring)."""
    data = Path(path).read_bytes()
    version, pos = (2, len(FILE_MAGIC)) if data.startswith(FILE_MAGIC) else (1, 0)
    if version == 1 and data and FILE_MAGIC.startswith(data[:len(FILE_MAGIC)]):
        version, pos = 2, len(data)  # a header cut short by a crash right after creating the file
    scan = Scan(Path(path), version, len(data))
    while pos < len(data):
        rec = _parse_at(data, pos, version)
        if rec is not None:
            scan.records.append(rec)
            pos = rec.end
            continue
        nxt = _next_record(data, pos + 1, version)
        if nxt is None:
            if _is_torn(data, pos, version):
                scan.torn_tail = (pos, len(data) - pos)
            else:
                scan.damage.append(Damage(pos, len(data), "the last record fails its checksum", _hint(data, pos, len(data))))
            break
        scan.damage.append(Damage(pos, nxt, "bytes that are not an intact record", _hint(data, pos, nxt)))
        pos = nxt
    return scan


class LogWriter:
    """Appends records to one log file; a failed append leaves the file as it was.

    Args:
        path: the log file (created with mode 0600 and a version-2 header when missing).
        fsync: fsync after every record (off only for benchmarks).
        ops: system calls (fault injection in tests).
    """

    def __init__(self, path: Path, fsync: bool = True, ops: FileOps | None = None):
        self.path = Path(path)
        self.fsync = fsync
        self.ops = ops or FileOps()
        self.broken: str | None = None
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.offset = os.fstat(self.fd).st_size
        if created or self.offset == 0:
            self.offset = 0
            self._write(FILE_MAGIC)
            fsync_dir(self.path.parent)

    def append(self, head: dict, blob: bytes = b"") -> None:
        """Append one record and make it durable, or raise StoreUnavailable having changed nothing."""
        self._write(encode_record(head, blob))

    def _write(self, data: bytes) -> None:
        if self.broken:
            raise StoreUnavailable(f"speaker store: writes are stopped until restart ({self.broken})")
        try:
            done = 0
            while done < len(data):
                n = self.ops.write(self.fd, data[done:])
                if n <= 0:
                    raise OSError("write returned 0 bytes")
                done += n
            if self.fsync:
                self.ops.fsync(self.fd)
        except OSError as e:
            self._roll_back(e)
        self.offset += len(data)

    def _roll_back(self, error: OSError) -> None:
        what = error.strerror or str(error)
        try:
            self.ops.ftruncate(self.fd, self.offset)
            if self.fsync:
                self.ops.fsync(self.fd)
        except OSError as e2:
            self.broken = f"{self.path}: a write failed ({what}) and cutting it off failed too ({e2.strerror or e2})"
            raise StoreUnavailable(f"speaker store: {self.broken}; the change was not acknowledged but may be "
                                   "found in the log after restart") from None
        raise StoreUnavailable(f"speaker store: could not write {self.path.name} ({what}); nothing was stored, "
                               "retry when the disk has room") from None

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)


def repair_log(path: Path, damaged_dir: Path, dry_run: bool = False) -> dict:
    """Rewrite a log with every intact record, setting damaged bytes aside in ``damaged_dir``.

    Returns a report: records kept, and for each damaged stretch its offset, length, where its
    bytes were saved and what they still say. Changes nothing with ``dry_run``.
    """
    scan = scan_log(path)
    data = Path(path).read_bytes()
    report = {"file": str(path), "records_kept": len(scan.records), "damaged": [], "torn_tail_bytes": 0}
    if scan.torn_tail:
        report["torn_tail_bytes"] = scan.torn_tail[1]
        zeros = not data[scan.torn_tail[0]:].strip(b"\x00")
        report["torn_tail"] = ("possibly acknowledged: zero bytes where the last record was (the file kept its length, "
                               "not its data)" if zeros else "never acknowledged: a record cut short by a crash mid-write")
    for d in scan.damage:
        saved = damaged_dir / f"{Path(path).name}.{d.offset}-{d.end}.bin"
        report["damaged"].append({"offset": d.offset, "length": d.end - d.offset, "reason": d.reason,
                                  "saved_to": str(saved), "still_readable": d.hint,
                                  "records_inside": readable_heads(data, d.offset, d.end)})
        if not dry_run:
            damaged_dir.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(saved, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data[d.offset:d.end])
                os.fsync(fd)
            finally:
                os.close(fd)
    if dry_run or (not scan.damage and not scan.torn_tail and scan.version == 2):
        return report
    tmp = Path(path).with_name(Path(path).name + ".repair")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, FILE_MAGIC + b"".join(encode_record(r.head, r.blob) for r in scan.records))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return report
