"""Per-key locks for stores whose calls run on many threads."""

from __future__ import annotations

import contextlib
import threading

__all__ = ["LockTable"]


class LockTable:
    """One lock per key, created on first use and dropped when no thread holds or waits for it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._locks: dict[object, list] = {}  # key -> [lock, users]

    @contextlib.contextmanager
    def hold(self, key):
        """Hold ``key``'s lock for the ``with`` block."""
        with self._guard:
            entry = self._locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._locks[key]
