"""Reading the first release's data directory (``snapshot.npz`` and headerless logs), to migrate it.

Those files hold voiceprints, embeddings and metadata in plain text; after migration the store
writes its own encrypted snapshot and overwrites the old files with zeros before removing them.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from service.store.base import StoreCorrupt

__all__ = ["read_v1_snapshot", "v1_ops", "scrub"]

log = logging.getLogger("spkserve.store")


def read_v1_snapshot(path: Path) -> tuple[int, list[dict]]:
    """(next log generation, collections with their speakers' plain records) of a v1 snapshot."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes())
            out = []
            for ci, c in enumerate(meta["collections"]):
                sums = z[f"sum_{ci}"]  # (N, D) float64
                speakers = [dict(s, sum=row.astype(np.float64)) for s, row in zip(c["speakers"], sums)]
                out.append({"name": c["name"], "model": c["model"], "dim": c["dim"], "speakers": speakers})
            return int(meta["next_gen"]), out
    except (OSError, ValueError, KeyError) as e:
        raise StoreCorrupt(f"snapshot {path} (first-release format) is damaged ({type(e).__name__}); "
                           "restore the data directory from a backup") from None


def v1_ops(records) -> Iterator[tuple[dict, np.ndarray | None]]:
    """(op, embeddings (N, D) or None) of v1 log records."""
    for r in records:
        op = r.head
        if op["op"] == "enroll":
            yield op, np.frombuffer(r.blob, dtype=np.float32).reshape(op["n"], op["dim"])
        else:
            yield op, None


def scrub(path: Path) -> None:
    """Overwrite a file with zeros, fsync, and remove it."""
    try:
        size = path.stat().st_size
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, bytes(size), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    except OSError as e:
        log.warning("could not scrub %s (%s); remove it by hand, it holds plain-text voiceprints", path, e)
