"""A collection as its own impostor cohort: in-domain score normalisation.

The model's cohort holds voiceprints of training speakers through common channels. A
deployment's own speakers, recorded on its own channel, are a better one: with
``collection_cohort_min_speakers = N`` (0: off), a collection of at least N speakers normalises
the comparisons made inside it (Identify, and Verify against its enrolled speakers) against its
own voiceprints instead, each side leaving out the speakers being compared. At most
``collection_cohort_max_speakers`` voiceprints (the first by id) are used. The cohort is read
from the store when first needed and again after an Enroll or DeleteSpeaker on that collection
through this server, or after ``collection_cohort_refresh_seconds`` (changes made through other
replicas). The calibration map is the model's (fitted with its own cohort); re-fit it on your
own trials for a fully in-domain score (``python -m training.evaluation.calibrate --trials``).

Statistics keep the model's channel group of each side (the calibration's bandwidth term);
only the mean and standard deviation come from the collection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

__all__ = ["CollectionCohort", "CollectionCohorts", "cohort_side_stats"]

_MIN_SD = 1e-4


@dataclass
class CollectionCohort:
    """A collection's voiceprints as a cohort."""

    vectors: np.ndarray  # (M, D) unit voiceprints
    ids: list[str]  # (M,) speaker ids
    loaded: float  # time.monotonic() when read

    def stats(self, vectors: np.ndarray, groups: np.ndarray, leave_out: list[set[str]]) -> np.ndarray:
        """(N, 3) statistics of (N, D) ``vectors`` against the collection, row i leaving out ``leave_out[i]``.

        Args:
            vectors: (N, D) unit vectors.
            groups: (N,) each row's channel group in the model's cohort (kept for the calibration).
            leave_out: per row, speaker ids not to compare with (the sides of the comparison).
        """
        scores = np.atleast_2d(vectors).astype(np.float32) @ self.vectors.T  # (N, M)
        keep = np.ones(scores.shape, bool)
        index = {s: j for j, s in enumerate(self.ids)}
        for i, ids in enumerate(leave_out):
            for s in ids:
                if s in index:
                    keep[i, index[s]] = False
        n = np.maximum(keep.sum(axis=1), 1)
        s64 = scores.astype(np.float64)
        mean = np.where(keep, s64, 0.0).sum(axis=1) / n
        var = np.where(keep, (s64 - mean[:, None]) ** 2, 0.0).sum(axis=1) / n
        return np.stack([mean, np.maximum(np.sqrt(var), _MIN_SD), np.asarray(groups, np.float64)], axis=1)


def cohort_side_stats(cohort: CollectionCohort, model_stats: np.ndarray, vector: np.ndarray,
                      leave_out: set[str]) -> np.ndarray:
    """(3,) statistics of one side against a collection cohort, keeping its model channel group."""
    group = model_stats[2] if model_stats is not None and len(model_stats) > 2 else 0.0
    return cohort.stats(vector[None, :], np.array([group]), [leave_out])[0]


class CollectionCohorts:
    """Cached collection cohorts (see the module docstring); used from the event loop only.

    Args:
        min_speakers: a collection needs this many speakers to be its own cohort (0: never).
        max_speakers: voiceprints used at most.
        refresh_seconds: re-read a cached cohort after this long.
    """

    def __init__(self, min_speakers: int, max_speakers: int, refresh_seconds: float):
        self.min_speakers = min_speakers
        self.max_speakers = max_speakers
        self.refresh_seconds = refresh_seconds
        self._cache: dict[str, CollectionCohort | None] = {}
        self._loaded: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        """Whether collections may serve as cohorts at all."""
        return self.min_speakers > 0

    def invalidate(self, collection: str) -> None:
        """Forget a collection's cohort (its speakers changed)."""
        self._cache.pop(collection, None)
        self._loaded.pop(collection, None)

    async def get(self, engine, collection: str) -> CollectionCohort | None:
        """The collection's cohort, or None when it is off or the collection is too small."""
        if not self.enabled:
            return None
        now = time.monotonic()
        if collection in self._cache and now - self._loaded[collection] < self.refresh_seconds:
            return self._cache[collection]
        store = engine.store
        total = await engine.store_call(store.speaker_count, collection)
        cohort = None
        if total >= self.min_speakers:
            vectors, ids, offset = [], [], 0
            while offset < min(total, self.max_speakers):
                page, _ = await engine.store_call(store.list, collection, offset,
                                                  min(1000, self.max_speakers - offset))
                if not page:
                    break
                vectors += [r.voiceprint for r in page]
                ids += [r.speaker_id for r in page]
                offset += len(page)
            if len(ids) >= self.min_speakers:
                cohort = CollectionCohort(np.stack(vectors).astype(np.float32), ids, now)
        self._cache[collection], self._loaded[collection] = cohort, now
        return cohort
