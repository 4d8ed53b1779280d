"""Per-speaker encryption keys, and their destruction on delete (crypto-shredding).

Every speaker's stored data (log records and snapshot entries: embeddings, voiceprint sum,
id, metadata) is encrypted with AES-256-GCM under a key of its own, held in one fixed-size
*slot* of ``keys.bin``. Deleting the speaker overwrites its slot with zeros and fsyncs: what
is left in older log records and snapshots can no longer be decrypted by anyone.

With *key files* (encryption at rest) each slot's key is itself wrapped (AES-GCM) by a key
file's key: the store's default key, or a tenant's key for collections matching its pattern.
Without key files the slot keys are stored as they are: deleted data is still unreadable,
but someone who copies the data directory reads the rest.

``keys.bin`` layout: a 16-byte header (magic, slot size), then slots of 80 bytes::

    u8 state (0 empty/destroyed, 1 plain, 2 wrapped) | 7 zero bytes | 8-byte key-file fingerprint
    | 12-byte nonce | 32-byte key (wrapped: ciphertext) | 16-byte tag (wrapped only) | 4 zero bytes

Slot 0 holds the key of the tombstone hashes (keyed hashes of deleted or opted-out ids).

Limits, stated plainly: overwriting a slot in place destroys the key on ordinary filesystems
(ext4, xfs); copy-on-write filesystems, snapshots of the volume and SSD wear levelling may keep
old blocks. Use key files kept off the data volume, or full-disk encryption, where that matters.
"""

from __future__ import annotations

import fcntl
import fnmatch
import hashlib
import hmac
import os
import secrets
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from service.store.base import StoreCorrupt, StoreUnavailable

__all__ = ["KeyFile", "load_key_file", "KeyRing", "Sealed", "SLOT_SIZE", "check_not_in_use"]


def check_not_in_use(data_dir: Path) -> None:
    """Raise StoreUnavailable when another process holds ``data_dir`` (its key file's lock); changes nothing.

    The server asks before it binds its port, so a second server on a busy directory stops at once.
    """
    path = Path(data_dir) / "keys.bin"
    if not path.exists():
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # unreadable: the store's own open reports it with its context
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        raise StoreUnavailable(f"speaker store: {Path(data_dir)} is in use by another process "
                               "(a running server or repair-log)") from None
    finally:
        os.close(fd)

_MAGIC = b"SPKKEYS1"
_HEADER = struct.Struct("<8sII")  # magic, slot size, reserved
SLOT_SIZE = 80
_EMPTY, _PLAIN, _WRAPPED = 0, 1, 2
_SLOT = "<B7x8s12s48s4x"  # state, fingerprint, nonce, key (+ tag when wrapped), padding


@dataclass(frozen=True)
class KeyFile:
    """A 256-bit key read from a file; ``pattern`` says which collections it wraps ('*' = all)."""

    path: str
    key: bytes
    pattern: str = "*"

    @property
    def fingerprint(self) -> bytes:
        """8 bytes that tell which key file wrapped a slot (never the key)."""
        return hashlib.sha256(b"spkserve-key-fp" + self.key).digest()[:8]


def load_key_file(path: str | os.PathLike, pattern: str = "*") -> KeyFile:
    """Read a key file: 64 hex characters (``openssl rand -hex 32``) or 32 raw bytes.

    Raises:
        ValueError: naming the file when it holds anything else or others can read it.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ValueError(f"key file {p}: cannot read it ({e.strerror})") from None
    if p.stat().st_mode & 0o077:
        raise ValueError(f"key file {p}: is readable by group or others (mode {p.stat().st_mode & 0o777:o}); "
                         f"chmod 600 {p}")
    text = raw.strip()
    if len(text) == 64:
        try:
            return KeyFile(str(p), bytes.fromhex(text.decode("ascii")), pattern)
        except (ValueError, UnicodeDecodeError):
            pass
    if len(raw) == 32:
        return KeyFile(str(p), raw, pattern)
    raise ValueError(f"key file {p}: must hold 64 hex characters or 32 bytes (e.g. `openssl rand -hex 32 > {p}`)")


class Sealed:
    """AES-GCM under one speaker's key: ``seal``/``open`` with the slot number as associated data."""

    def __init__(self, key: bytes, slot: int):
        self._aead = AESGCM(key)
        self._ad = struct.pack("<Q", slot)

    def seal(self, data: bytes) -> bytes:
        """nonce (12 bytes) + ciphertext + tag."""
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data, self._ad)

    def open(self, blob: bytes) -> bytes:
        """The plaintext; raises ``InvalidTag`` when the blob is damaged or not under this key."""
        return self._aead.decrypt(blob[:12], blob[12:], self._ad)


class KeyRing:
    """The slots of ``keys.bin``. Thread-safe; every change is fsynced before it returns.

    Args:
        path: the key file of the store (created 0600).
        key_files: wrapping keys; the first whose pattern matches a collection wraps its speakers'
            keys. Empty: slot keys are stored unwrapped.
        fsync: fsync after each change (off only for benchmarks).
    """

    def __init__(self, path: Path, key_files: list[KeyFile] | tuple[KeyFile, ...] = (), fsync: bool = True):
        self.path = Path(path)
        self.key_files = list(key_files)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._by_fp = {k.fingerprint: k for k in self.key_files}
        created = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # one server (or repair) per directory
        except OSError:
            os.close(self.fd)
            raise StoreUnavailable(f"speaker store: {self.path.parent} is in use by another process "
                                   "(a running server or repair-log)") from None
        try:
            if created or os.fstat(self.fd).st_size == 0:
                os.write(self.fd, _HEADER.pack(_MAGIC, SLOT_SIZE, 0))
                self._sync()
                self.next_slot = 1
                self.tombstone_key = self.new_key(0, "")
            else:
                head = os.pread(self.fd, _HEADER.size, 0)
                if len(head) < _HEADER.size or _HEADER.unpack(head)[:2] != (_MAGIC, SLOT_SIZE):
                    raise StoreCorrupt(f"{self.path}: not a spkserve key file (bad header); restore it from a backup")
                size = os.fstat(self.fd).st_size - _HEADER.size
                self.next_slot = max(1, -(-size // SLOT_SIZE))  # a torn last slot counts as allocated
                key = self.key(0, "")
                if key is None:
                    raise StoreCorrupt(f"{self.path}: the tombstone key (slot 0) is missing; restore the file from a backup")
                self.tombstone_key = key
        except BaseException:
            os.close(self.fd)
            raise

    def _sync(self) -> None:
        if self.fsync:
            os.fsync(self.fd)

    def _wrapping(self, collection: str) -> KeyFile | None:
        for k in self.key_files:
            if fnmatch.fnmatchcase(collection, k.pattern):
                return k
        return None

    def allocate(self) -> int:
        """A fresh slot number (slots are never reused)."""
        with self._lock:
            slot = self.next_slot
            self.next_slot += 1
            return slot

    def new_key(self, slot: int, collection: str) -> bytes:
        """Create, store and fsync a key in ``slot``; returns it. Raises StoreUnavailable on I/O errors."""
        key = secrets.token_bytes(32)
        wrap = self._wrapping(collection)
        if wrap is None:
            body = struct.pack(_SLOT, _PLAIN, b"", b"", key)
        else:
            nonce = secrets.token_bytes(12)
            ct = AESGCM(wrap.key).encrypt(nonce, key, struct.pack("<Q", slot))
            body = struct.pack(_SLOT, _WRAPPED, wrap.fingerprint, nonce, ct)
        self._write_slot(slot, body)
        return key

    def key(self, slot: int, collection: str) -> bytes | None:
        """The key in ``slot``, or None when it was destroyed (or never written).

        Raises:
            StoreCorrupt: the slot is wrapped by a key file that is not configured, or does not unwrap.
        """
        raw = os.pread(self.fd, SLOT_SIZE, _HEADER.size + slot * SLOT_SIZE)
        if len(raw) < SLOT_SIZE or raw[0] == _EMPTY:
            return None
        state, fp, nonce, body = struct.unpack(_SLOT, raw)
        if state == _PLAIN:
            return body[:32]
        if state != _WRAPPED:
            raise StoreCorrupt(f"{self.path}: slot {slot} has unknown state {state}; restore the file from a backup")
        wrap = self._by_fp.get(fp)
        if wrap is None:
            raise StoreCorrupt(f"{self.path}: slot {slot} (collection {collection!r}) is wrapped by a key file that is "
                               "not configured; configure the key files the data was written with")
        try:
            return AESGCM(wrap.key).decrypt(nonce, body, struct.pack("<Q", slot))
        except InvalidTag:
            raise StoreCorrupt(f"{self.path}: slot {slot} does not unwrap with key file {wrap.path}; "
                               "the key file or keys.bin is damaged") from None

    def destroy(self, slot: int) -> None:
        """Overwrite ``slot`` with zeros and fsync. Raises StoreUnavailable on I/O errors."""
        self._write_slot(slot, bytes(SLOT_SIZE))

    def destroy_many(self, slots: list[int]) -> None:
        """Overwrite every slot of ``slots`` with zeros, then fsync once (a whole collection's keys).
        Raises StoreUnavailable on I/O errors (some of them may be destroyed already)."""
        try:
            for slot in slots:
                if os.pwrite(self.fd, bytes(SLOT_SIZE), _HEADER.size + slot * SLOT_SIZE) != SLOT_SIZE:
                    raise OSError("short write")
            if slots:
                self._sync()
        except OSError as e:
            raise StoreUnavailable(f"speaker store: could not write {self.path.name} ({e.strerror or e}); "
                                   "the keys of deleted speakers are destroyed when it can be written") from None

    def slots_in_use(self) -> set[int]:
        """Slot numbers (from 1) that still hold a key."""
        size = os.fstat(self.fd).st_size - _HEADER.size
        data = os.pread(self.fd, max(size, 0), _HEADER.size)
        return {i for i in range(1, len(data) // SLOT_SIZE) if data[i * SLOT_SIZE] != _EMPTY}

    def _write_slot(self, slot: int, body: bytes) -> None:
        assert len(body) == SLOT_SIZE
        try:
            if os.pwrite(self.fd, body, _HEADER.size + slot * SLOT_SIZE) != SLOT_SIZE:
                raise OSError("short write")
            self._sync()
        except OSError as e:
            raise StoreUnavailable(f"speaker store: could not write {self.path.name} ({e.strerror or e}); "
                                   "nothing was stored, retry when the disk has room") from None

    def tombstone(self, collection: str, speaker_id: str) -> str:
        """The keyed hash recorded for a deleted or opted-out speaker id (hex)."""
        msg = collection.encode() + b"\x00" + speaker_id.encode("utf-8", "surrogatepass")
        return hmac.new(self.tombstone_key, msg, hashlib.sha256).hexdigest()[:32]

    def close(self) -> None:
        """Close the descriptor."""
        os.close(self.fd)
