"""How each log record changes the local store's in-memory state.

A mixin of ``LocalStore``: a live write and the replay of the same record at start-up (``Recovery``)
run the same code, so what a restart rebuilds is what the running store held. The state it changes
(``_collections``, ``_slots``, ``_owners``, ``_tombstones``) is set up by ``LocalStore``.
"""

from __future__ import annotations

import numpy as np

from service.store.base import SpeakerRecord
from service.store.faiss_index import CollectionIndex

__all__ = ["RecordState"]


class RecordState:
    """Applying enroll, metadata, delete, drop and touch records of ``LocalStore``'s log to its collections."""

    def _apply_enroll(self, head: dict, body: dict, embeddings: np.ndarray) -> tuple[SpeakerRecord, bool]:
        """Add an enroll record's embeddings to its speaker (created if new); (the record, whether it is new)."""
        c, spk = head["c"], body["spk"]
        coll = self._collections.get(c)
        if coll is None:
            coll = self._collections[c] = CollectionIndex(c, head["model"], head["dim"], self.options)
        if not coll.model_version and head.get("mv"):
            coll.model_version = head["mv"]  # collections from before versions were kept adopt the first one seen
        if "reenroll" in head:
            self._tombstones.get(c, set()).discard(head["reenroll"])
        old = coll.speakers.get(spk)
        emb = embeddings.reshape(-1, head["dim"]).astype(np.float64)  # (N, D); a v1 snapshot row is one sum of n
        added, ts, speech = emb.sum(axis=0), head["ts"], body.get("speech")
        if old is None:
            rec = SpeakerRecord(spk, added, body["n"], dict(body["meta"]), ts, ts, speech=speech, last_used_ms=ts)
        else:
            total = None if old.speech is None or speech is None else old.speech + speech
            rec = SpeakerRecord(spk, old.sum + added, old.count + body["n"], {**old.metadata, **body["meta"]},
                                old.created_ms, ts, speech=total, last_used_ms=ts)
        coll.upsert(rec)
        self._slots[(c, spk)] = head["slot"]
        self._owners[head["slot"]] = (c, spk)
        return rec, old is None

    def _apply_delete(self, head: dict) -> None:
        """Remove the speaker a delete record names and keep its tombstone."""
        c = head["c"]
        self._tombstones.setdefault(c, set()).add(head["tomb"])
        owner = self._owners.pop(head.get("slot"), None)
        if owner is not None:
            self._collections[owner[0]].remove(owner[1])
            del self._slots[owner]

    def _apply_meta(self, head: dict, body: dict) -> None:
        """Merge a metadata record's keys into its speaker's metadata and remove the ones it names."""
        if self._owners.get(head["slot"]) != (head["c"], body["spk"]):
            return  # the speaker is gone (a later delete already applied): nothing to change
        rec = self._collections[head["c"]].speakers[body["spk"]]
        merged = {**rec.metadata, **body["set"]}
        rec.metadata = {k: v for k, v in merged.items() if k not in set(body["remove"])}
        rec.updated_ms = max(rec.updated_ms, head["ts"])

    def _apply_drop(self, head: dict) -> None:
        """Remove a collection, its speakers and its binding, keeping its speakers' tombstones (a drop record)."""
        c = head["c"]
        self._tombstones.setdefault(c, set()).update(head["tombs"])
        coll = self._collections.pop(c, None)
        for spk in coll.speakers if coll is not None else ():
            self._owners.pop(self._slots.pop((c, spk)), None)

    def _apply_touch(self, head: dict) -> None:
        """Move speakers' last-used times forward (never back) as a touch record says."""
        coll = self._collections.get(head["c"])
        if coll is None:
            return
        for slot, used in head["used"]:
            c, spk = self._owners.get(slot, (None, None))
            if c == head["c"] and spk in coll.speakers:
                coll.speakers[spk].last_used_ms = max(coll.speakers[spk].last_used_ms, used)
