"""Retained enrollment audio (optional): per speaker, the speech its voiceprint was made from, so
that a collection can be moved to another model by embedding it again.

One file per speaker, ``audio/<slot>.bin`` (0600), a sequence of records ``u32 length | sealed``
where ``sealed`` is AES-GCM under the speaker's own key (``keys``) of ``u32 head length | JSON
{"rate": Hz} | int16 samples``. Deleting or expiring the speaker destroys the key and removes
the file; what a crash leaves behind is unreadable without the key.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from service.store.base import StoreCorrupt, StoreUnavailable
from service.store.keys import Sealed
from service.store.wal import fsync_dir

__all__ = ["RetainedAudio"]


class RetainedAudio:
    """The ``audio/`` directory of a store."""

    def __init__(self, directory: Path, fsync: bool = True):
        self.dir = Path(directory)
        self.fsync = fsync

    def _path(self, slot: int) -> Path:
        return self.dir / f"{slot:010d}.bin"

    def append(self, slot: int, key: bytes, chunks: list[tuple[int, np.ndarray]]) -> int:
        """Append (rate, (T,) int16) chunks durably; returns the file size before, for ``truncate``.

        Raises:
            StoreUnavailable: the disk refused; the file is as it was.
        """
        sealer = Sealed(key, slot)
        data = b""
        for rate, pcm in chunks:
            head = json.dumps({"rate": int(rate)}).encode()
            sealed = sealer.seal(struct.pack("<I", len(head)) + head + np.ascontiguousarray(pcm, "<i2").tobytes())
            data += struct.pack("<I", len(sealed)) + sealed
        path = self._path(slot)
        try:
            created = not self.dir.exists()
            self.dir.mkdir(mode=0o700, exist_ok=True)
            if created and self.fsync:
                fsync_dir(self.dir.parent)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as e:
            raise StoreUnavailable(f"speaker store: could not open {path.name} ({e.strerror or e}); nothing was stored") from None
        try:
            before = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if self.fsync:
                    os.fsync(fd)
                    if before == 0:
                        fsync_dir(self.dir)
            except OSError as e:
                try:
                    os.ftruncate(fd, before)
                except OSError:
                    pass
                raise StoreUnavailable(f"speaker store: could not write {path.name} ({e.strerror or e}); nothing "
                                       "was stored, retry when the disk has room") from None
            return before
        finally:
            os.close(fd)

    def truncate(self, slot: int, size: int) -> None:
        """Cut a speaker's file back to ``size`` (undo an append whose log record then failed)."""
        try:
            os.truncate(self._path(slot), size)
        except OSError:
            pass  # unreadable without a log record's speaker anyway; removed with the speaker

    def read(self, slot: int, key: bytes) -> list[tuple[int, np.ndarray]]:
        """The retained (rate, (T,) int16) chunks of a speaker (empty when none)."""
        from cryptography.exceptions import InvalidTag

        path = self._path(slot)
        if not path.exists():
            return []
        data, pos, out = path.read_bytes(), 0, []
        opener = Sealed(key, slot)
        while pos + 4 <= len(data):
            (n,) = struct.unpack_from("<I", data, pos)
            blob = data[pos + 4:pos + 4 + n]
            if len(blob) < n:
                break  # a torn last append: never acknowledged
            try:
                plain = opener.open(blob)
            except InvalidTag:
                raise StoreCorrupt(f"{path}: a record at byte {pos} does not decrypt with its speaker's key") from None
            (h,) = struct.unpack_from("<I", plain)
            rate = json.loads(plain[4:4 + h])["rate"]
            out.append((int(rate), np.frombuffer(plain[4 + h:], "<i2").copy()))
            pos += 4 + n
        return out

    def remove(self, slot: int) -> None:
        """Remove a speaker's file (its key is destroyed separately)."""
        try:
            self._path(slot).unlink()
        except FileNotFoundError:
            pass
