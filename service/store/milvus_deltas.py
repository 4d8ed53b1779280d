"""The Milvus backend's append protocol (a mixin of ``MilvusStore``): enrollments and metadata changes are
*deltas*, rows only ever inserted into ``spkd_<name>``; a speaker's row in ``spkv_<name>`` is recomputed from all
of them (see ``service.store.milvus``). A metadata change is a delta of no embedding (count 0) whose metadata
names the keys it removes under ``REMOVED_KEYS``, the empty key, which no client can set (keys hold no control
characters either, so a newline separates the removed ones)."""

from __future__ import annotations

import time
import uuid

import numpy as np

from service.store.base import SpeakerRecord, StoreUnavailable, quoted
from service.store.milvus_schema import _MAX_ROWS, _q, milvus_name

__all__ = ["DeltaProtocol", "merged_metadata", "metadata_change", "REMOVED_KEYS"]

REMOVED_KEYS = ""  # in a delta's metadata: the keys it removes, one per line


def metadata_change(metadata: dict[str, str], remove: list[str]) -> dict[str, str]:
    """A delta's metadata for a change that sets ``metadata`` and removes ``remove``."""
    return {**metadata, REMOVED_KEYS: "\n".join(sorted(set(remove)))} if remove else dict(metadata)


def merged_metadata(deltas: list[dict]) -> dict[str, str]:
    """A speaker's metadata from its deltas (their "meta" opened), applied in the order they were written."""
    meta: dict[str, str] = {}
    for d in sorted(deltas, key=lambda d: (d["ts"], d["pk"])):
        change = dict(d["meta"])
        removed = change.pop(REMOVED_KEYS, "")
        meta.update(change)
        for key in removed.split("\n") if removed else ():
            meta.pop(key, None)
    return meta


class DeltaProtocol:
    """Mixin of ``MilvusStore`` (uses its client, sealers and ``_call``)."""

    def _append_delta(self, collection: str, speaker_id: str, total: np.ndarray, count: int, speech: float,
                      metadata: dict[str, str]) -> None:
        """Insert one delta: the (D,) sum of ``count`` unit embeddings, their net speech, a metadata change."""
        pk, sealer = self._pk(collection, speaker_id), self._sealer(collection)
        self._call(self.client.insert, milvus_name("spkd_", collection), [{
            "pk": f"{pk}/{uuid.uuid4().hex}", "spk": pk, "sum": {"v": np.asarray(total, np.float64).tolist()},
            "count": int(count), "speech": float(speech),
            "meta": metadata if sealer is None else sealer.seal(speaker_id, metadata),
            "ts": int(time.time() * 1000), "vec": [1.0, 0.0]}])

    def _deltas(self, collection: str, speaker_id: str, consistency: str = "Strong") -> list[dict]:
        """The speaker's enrollment rows, their metadata opened (``Session``: this client's own writes at least)."""
        sealer = self._sealer(collection)
        rows = self._call(self.client.query, milvus_name("spkd_", collection),
                          filter=f"spk == {_q(self._pk(collection, speaker_id))}",
                          output_fields=["pk", "sum", "count", "speech", "meta", "ts"], limit=_MAX_ROWS,
                          consistency_level=consistency)
        if sealer is not None:
            for r in rows:
                r["meta"] = sealer.open(r["meta"])[1]
        return rows

    def _materialise(self, collection: str, speaker_id: str) -> tuple[SpeakerRecord, bool]:
        """Recompute the speaker's row from all its deltas until no other writer added one meanwhile."""
        name = milvus_name("spkv_", collection)
        for attempt in range(20):
            # the first computation reads with session consistency (it sees this client's own delta without
            # waiting for the server); the row is accepted only after a strong read finds the same deltas
            deltas = sorted(self._deltas(collection, speaker_id, "Session" if attempt == 0 else "Strong"),
                            key=lambda d: (d["ts"], d["pk"]))
            total = np.sum([np.asarray(d["sum"]["v"], dtype=np.float64) for d in deltas], axis=0)  # (D,)
            meta = merged_metadata(deltas)
            speech = sum(float(d["speech"]) for d in deltas)
            # (sum as a JSON object: a Milvus server takes no JSON arrays at the top level)
            sealer = self._sealer(collection)
            row = {"pk": self._pk(collection, speaker_id), "sum": {"v": total.tolist()},
                   "count": int(sum(d["count"] for d in deltas)), "speech": speech,
                   "meta": meta if sealer is None else sealer.seal(speaker_id, meta), "created": int(deltas[0]["ts"]),
                   "updated": int(deltas[-1]["ts"]), "deltas": len(deltas),
                   "vec": (total / max(np.linalg.norm(total), 1e-12)).astype(np.float32).tolist()}
            self._call(self.client.upsert, name, [row])
            if len(self._deltas(collection, speaker_id)) == len(deltas):
                rec = self._record(row, sealer)
                self._stats(collection, [rec])
                return rec, len(deltas) == 1
        raise StoreUnavailable(f"speaker store: speaker_id {quoted(speaker_id)} kept changing under concurrent "
                               "appends; its enrollment is stored, retry to see the result")

