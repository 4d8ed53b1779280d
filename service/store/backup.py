"""Online backups of the local speaker store: a consistent copy of a data directory, taken while its server runs.

The store's files are written in an order that makes a copy in the same order consistent: snapshots are written to
a temporary file and renamed (a snapshot file is always whole), logs are only appended to, and a speaker's key is
written before any record sealed with it. So the copy takes the newest snapshot, then every log from its generation
in order (the last one may end in half a record, which a start cuts off as after a crash: the copy holds every
change acknowledged before that log was read), then ``keys.bin`` (after the logs, so every key a copied record
needs is in it), then the retained audio (which may hold the speech of an enrollment that came after the logs were
read: a migration of the restored copy would embed it too). If a snapshot rotation removes a file while it is being copied, the copy
starts again. The copy is then opened as a store, which checks it and reports what it holds.

A backup holds the keys of every speaker in it: restoring it brings back speakers deleted after it was taken. Keep
backups no longer than deleted voices may be kept, and delete again after a restore (see the operations guide).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from service.store.keys import KeyFile
from service.store.recovery import SNAP_RE, WAL_RE

__all__ = ["backup_store", "BackupError"]


class BackupError(Exception):
    """A backup that cannot be made (the message names the directory and why)."""


def _copy(src: Path, dst: Path) -> int:
    """Copy one file (0600) and fsync it; its size."""
    with open(src, "rb") as f, open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
        g.flush()
        os.fsync(g.fileno())
        return g.tell()


def _copy_once(data: Path, out: Path) -> tuple[list[str], int]:
    """One pass: the newest snapshot, its logs, keys.bin, retained audio; (files copied, bytes)."""
    names = {p.name for p in data.iterdir()}
    snaps = sorted(int(m.group(1)) for n in names if (m := SNAP_RE.fullmatch(n)))
    first = snaps[-1] if snaps else 0
    logs = sorted(g for n in names if (m := WAL_RE.fullmatch(n)) and (g := int(m.group(1))) >= first)
    order = ([f"snapshot-{first:08d}.bin"] if snaps else []) + [f"wal-{g:08d}.log" for g in logs] + ["keys.bin"]
    copied, size = [], 0
    for name in order:
        size += _copy(data / name, out / name)
        copied.append(name)
    audio = data / "audio"
    if audio.is_dir():
        (out / "audio").mkdir(mode=0o700)
        for p in sorted(audio.iterdir()):
            try:
                size += _copy(p, out / "audio" / p.name)
                copied.append(f"audio/{p.name}")
            except FileNotFoundError:  # the speaker was deleted meanwhile: its key is gone from the copy too
                continue
    return copied, size


def backup_store(data_dir: str | os.PathLike, out_dir: str | os.PathLike, key_files: list[KeyFile] = (),
                 attempts: int = 5) -> dict:
    """Copy the local store at ``data_dir`` (its server may be running) into the new directory ``out_dir`` and
    check the copy by opening it (with ``key_files``, the server's). Returns a summary: the files, bytes,
    collections and speakers of the copy. Raises BackupError naming the directory and why."""
    from service.store.base import StoreCorrupt, StoreUnavailable
    from service.store.local import LocalStore

    data, out = Path(data_dir), Path(out_dir)
    if not (data / "keys.bin").is_file():
        raise BackupError(f"{data}: not a speaker store's data directory (no keys.bin)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BackupError(f"{out}: exists and is not an empty directory; back up into a new one")
    if out.resolve() == data.resolve() or data.resolve() in out.resolve().parents:
        raise BackupError(f"{out}: inside the data directory {data}; back up somewhere else")
    t0 = time.monotonic()
    for attempt in range(attempts):
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            files, size = _copy_once(data, out)
            break
        except FileNotFoundError:  # a snapshot rotation removed a file being copied: start again
            shutil.rmtree(out)
    else:
        raise BackupError(f"{data}: files kept changing under {attempts} attempts (snapshots rotating); try again")
    try:
        store = LocalStore(out, key_files=list(key_files))
    except (StoreCorrupt, StoreUnavailable) as e:
        raise BackupError(f"{out}: the copy does not open ({e}); it is kept for inspection") from None
    try:
        infos = store.collections()
    finally:
        store.close()
    return {"out": str(out), "files": len(files), "bytes": size, "collections": len(infos),
            "speakers": sum(i.speaker_count for i in infos), "seconds": round(time.monotonic() - t0, 3)}
