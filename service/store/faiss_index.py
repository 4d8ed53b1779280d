"""One collection's speakers and their FAISS search index (derived state, rebuilt lazily).

Exact inner product (``IndexFlatIP``) by default; HNSW (deletes are filtered at search time
and the graph rebuilt once too many are stale) or IVF (switched on once there are enough
voiceprints to train it) for large collections. ``ivf_pq`` is IVF whose lists hold 4-bit
product-quantised codes (FAISS's fast-scan kernels, half a byte per dimension) scanned for
``ivf_pq_rerank`` times the results wanted; those candidates are then re-scored exactly from a
float32 copy of the voiceprints, so its scores are exact (its memory is about IVF's: codes are a
fourteenth of it, the copy the rest). Voiceprints of speakers crowd together, so the ten best
matches of a probe are near-ties that coarse methods confuse: scanning cheap codes of many lists
and re-ranking a few hundred candidates exactly reaches IVF's recall several times faster
(BENCHMARKS.md).

Every index holds the unit voiceprints themselves. Subtracting their mean (the same ranking for
a query, since every score moves by ``q . mu``) was tried and measured on voiceprints with the
structure of real ones: it leaves vectors of unequal norms, for which the inner product is no
longer a metric. At a million (bench/bench_search_real.py, efSearch 512) HNSW's recall@10 was
0.581 centred against 0.888 without; at 200k 0.70 against 0.94 (efSearch 256); IVF's fell
slightly (0.965 -> 0.955). At 20k centring helped HNSW instead (0.71 vs 0.54 at efSearch 32):
the large collections the approximate indexes are for decided it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from service.store.base import CollectionInfo, IndexOptions, SpeakerRecord

__all__ = ["CollectionIndex"]


class _UnitRows:
    """Unit voiceprints (float32) by index label in one contiguous matrix, for exact re-scoring;
    rows of removed labels are reused."""

    def __init__(self, vecs: np.ndarray, labels: np.ndarray):
        self.mat = np.array(vecs, dtype=np.float32)  # (capacity, D)
        self.row = {int(lab): i for i, lab in enumerate(labels.tolist())}
        self.free: list[int] = []

    def put(self, label: int, vec: np.ndarray) -> None:
        """Store ``vec`` (D,) for ``label``."""
        if self.free:
            i = self.free.pop()
        else:
            i = len(self.row)
            if i == len(self.mat):
                self.mat = np.concatenate([self.mat, np.empty((max(len(self.mat), 16), self.mat.shape[1]), np.float32)])
        self.mat[i] = vec
        self.row[label] = i

    def drop(self, label: int) -> None:
        """Forget ``label`` (absent: nothing)."""
        i = self.row.pop(label, None)
        if i is not None:
            self.free.append(i)

    def take(self, labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The present ``labels`` (n,) int64 and their vectors (n, D)."""
        kept = np.array([lab for lab in labels if lab in self.row], dtype=np.int64)
        rows = np.fromiter((self.row[lab] for lab in kept.tolist()), dtype=np.int64, count=len(kept))
        return kept, self.mat[rows]


class CollectionIndex:
    """Speakers of one collection and their search index."""

    def __init__(self, name: str, model: str, dim: int, options: IndexOptions):
        self.name, self.model, self.dim, self.options = name, model, dim, options
        self.model_version = ""  # the model version of its voiceprints ("" when not recorded)
        self.speakers: dict[str, SpeakerRecord] = {}
        self.by_label: dict[int, str] = {}
        self._next_label = 0
        self._index = None
        self._stale = 0  # HNSW entries of deleted/updated speakers still in the graph
        self._dirty = True
        self._built_kind = ""
        self._units: _UnitRows | None = None  # ivf_pq: the voiceprints its candidates are re-scored with

    def _build(self) -> None:
        import faiss

        ids = np.fromiter((r.label for r in self.speakers.values()), dtype=np.int64, count=len(self.speakers))
        vecs = np.stack([r.voiceprint for r in self.speakers.values()]) if self.speakers else np.zeros((0, self.dim), np.float32)
        kind = self._index_kind()
        self._units = _UnitRows(vecs, ids) if kind == "ivf_pq" else None
        if kind == "hnsw":
            index = faiss.IndexIDMap2(faiss.IndexHNSWFlat(self.dim, self.options.hnsw_m, faiss.METRIC_INNER_PRODUCT))
            if self.options.hnsw_ef_construction:
                faiss.downcast_index(index.index).hnsw.efConstruction = self.options.hnsw_ef_construction
            faiss.downcast_index(index.index).hnsw.efSearch = self.options.hnsw_ef_search
        elif kind in ("ivf", "ivf_pq"):
            quantizer = faiss.IndexFlatIP(self.dim)
            if kind == "ivf":
                index = faiss.IndexIVFFlat(quantizer, self.dim, self.options.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            else:  # two dimensions per 4-bit code (one each when the dimension is odd)
                codes = self.dim // 2 if self.dim % 2 == 0 else self.dim
                index = faiss.IndexIVFPQFastScan(quantizer, self.dim, self.options.ivf_nlist, codes, 4,
                                                 faiss.METRIC_INNER_PRODUCT)
            index.train(vecs)
            index.nprobe = self.options.ivf_nprobe
        else:  # flat, or IVF with too few points to train (exact search is cheap there)
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        if len(vecs):
            index.add_with_ids(vecs, ids)
        self._index, self._stale, self._dirty, self._built_kind = index, 0, False, kind

    def _index_kind(self) -> str:
        """The index searches use: IVF only once there are enough points to train it."""
        kind = self.options.index_type
        if kind in ("ivf", "ivf_pq") and len(self.speakers) < 39 * self.options.ivf_nlist:
            return "flat"
        return kind

    def upsert(self, rec: SpeakerRecord) -> None:
        """Add or replace a speaker in the collection and its index."""
        old = self.speakers.get(rec.speaker_id)
        if old is not None:
            self._remove_from_index(old.label)
        rec.label = self._next_label
        self._next_label += 1
        self.speakers[rec.speaker_id] = rec
        self.by_label[rec.label] = rec.speaker_id
        if self._index_kind() != self._built_kind:
            self._dirty = True  # e.g. an IVF collection grew large enough to train
        if not self._dirty and self._index is not None:
            unit = rec.voiceprint  # (D,)
            self._index.add_with_ids(unit[None], np.array([rec.label], dtype=np.int64))
            if self._units is not None:
                self._units.put(rec.label, unit)

    def remove(self, speaker_id: str) -> SpeakerRecord:
        """Remove a speaker; returns its record."""
        rec = self.speakers.pop(speaker_id)
        self._remove_from_index(rec.label)
        return rec

    def _remove_from_index(self, label: int) -> None:
        self.by_label.pop(label, None)
        if self._units is not None:
            self._units.drop(label)
        if self._dirty or self._index is None:
            return
        if self._built_kind == "hnsw":
            self._stale += 1  # HNSW cannot remove: filter at search time, rebuild when too stale
            if self._stale > max(64, len(self.speakers) // 5):
                self._dirty = True
        else:
            self._index.remove_ids(np.array([label], dtype=np.int64))

    def search(self, query: np.ndarray, k: int, keep: Callable[[SpeakerRecord], bool] | None = None
               ) -> list[tuple[SpeakerRecord, float]]:
        """Top-k (record, score) for a (D,) unit query, best first, among records ``keep`` accepts."""
        if not self.speakers:
            return []
        if self._dirty or self._index is None:
            self._build()
        fetch = k
        rerank = self.options.ivf_pq_rerank if self._built_kind == "ivf_pq" else 1
        while True:
            n = min(fetch * rerank + self._stale, len(self.speakers) + self._stale)
            scores, labels = self._index.search(query[None].astype(np.float32), n)  # (1, n)
            if self._built_kind == "ivf_pq":
                scores, labels = self._exact(query, labels[0])
            out = []
            for s, lab in zip(scores[0], labels[0]):
                spk = self.by_label.get(int(lab))
                if lab < 0 or spk is None:
                    continue
                rec = self.speakers[spk]
                if keep is None or keep(rec):
                    out.append((rec, float(s)))
                if len(out) == k:
                    return out
            if n >= len(self.speakers) + self._stale:
                return out
            fetch *= 4  # filtered records took places: look further

    def _exact(self, query: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Candidates re-scored by the exact inner product, best first: scores (1, n) and labels (1, n)."""
        labels, vecs = self._units.take(labels.tolist())  # (n,), (n, D)
        scores = vecs @ query.astype(np.float32)  # (n,)
        order = np.argsort(-scores, kind="stable")
        return scores[order][None], labels[order][None]

    def info(self) -> CollectionInfo:
        """Summary of this collection."""
        return CollectionInfo(self.name, self.model, self.dim, len(self.speakers), self._index_kind(), self.model_version)
