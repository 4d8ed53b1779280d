"""Who a damaged record belonged to: speaker ids of key slots, for repair-log's report.

Records name their speaker only inside the sealed payload (the log head carries the collection
and the key slot), so the slot of a damaged record says nothing to an operator. Another record of
the same slot (an intact enrollment in any log, or the speaker's snapshot entry) decrypts with the
same per-speaker key and holds the id. A slot whose key was destroyed belonged to a deleted
speaker; one with no other readable record stays unnamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag

from service.store.base import StoreCorrupt
from service.store.keys import KeyRing, Sealed
from service.store.recovery import SNAP_RE, WAL_RE, unpack
from service.store.snapshot import read_snapshot
from service.store.wal import scan_log

__all__ = ["name_slots", "describe_damage"]


def _open(ring: KeyRing, slot: int, collection: str, sealed: bytes, dtype) -> dict | None:
    try:
        key = ring.key(slot, collection)
    except StoreCorrupt:
        return None  # wrapped by a key file that was not given
    if key is None:
        return None
    try:
        return unpack(Sealed(key, slot).open(sealed), dtype)[0]
    except InvalidTag:
        return None


def name_slots(data_dir: Path, ring: KeyRing, wanted: set[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Speaker id of each wanted (collection, slot) that another readable record names."""
    data_dir = Path(data_dir)
    found: dict[tuple[str, int], str] = {}
    for path in sorted(p for p in data_dir.iterdir() if WAL_RE.fullmatch(p.name)):
        for r in scan_log(path).records:
            h = r.head
            k = (h.get("c"), h.get("slot"))
            if h.get("op") == "enroll" and k in wanted and k not in found:
                body = _open(ring, h["slot"], h["c"], r.blob, np.float32)
                if body is not None:
                    found[k] = body["spk"]
    for path in sorted((p for p in data_dir.iterdir() if SNAP_RE.fullmatch(p.name)), reverse=True):
        try:
            meta, entries = read_snapshot(path, "")
        except StoreCorrupt:
            continue
        names = [c["name"] for c in meta["collections"]]
        for e in entries:
            k = (names[e.collection], e.slot)
            if k in wanted and k not in found:
                info = _open(ring, e.slot, k[0], e.sealed, np.float64)
                if info is not None:
                    found[k] = info["spk"]
    return found


def describe_damage(reports: list[dict], data_dir: Path, ring: KeyRing | None) -> list[dict]:
    """The speakers and collections whose changes were set aside, from the record heads repair still reads.

    Returns:
        One entry per (collection, speaker) or lost collection deletion: ``{"collection", "speaker_id" (or None),
        "slot", "status"}``. Status of an enrollment set aside: "re-enroll" (named), "deleted" (its key is destroyed)
        or "unknown" (nothing else names it); of a metadata change: "update-metadata" (named, else as above); of a
        DeleteCollection: "delete-collection" (the collection may be listed again: delete it again; its speakers'
        ids are no longer refused on re-enrollment).
    """
    heads = [h for r in reports for d in r["damaged"]
             for h in d.get("records_inside") or ([d["still_readable"]] if d.get("still_readable") else [])]
    lost = {(h["c"], h["slot"]): h["op"] for h in heads
            if "slot" in h and "c" in h and h.get("op") in ("enroll", "meta")}
    lost.update({(h["c"], h["slot"]): "enroll" for h in heads  # an enrollment lost matters more than an update
                 if "slot" in h and "c" in h and h.get("op") == "enroll"})
    named = name_slots(data_dir, ring, set(lost)) if ring is not None and lost else {}
    out = []
    for (coll, slot), op in sorted(lost.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if (coll, slot) in named:
            status = "re-enroll" if op == "enroll" else "update-metadata"
            out.append({"collection": coll, "speaker_id": named[(coll, slot)], "slot": slot, "status": status})
            continue
        deleted = False
        if ring is not None:
            try:
                deleted = ring.key(slot, coll) is None
            except StoreCorrupt:
                deleted = False
        out.append({"collection": coll, "speaker_id": None, "slot": slot, "status": "deleted" if deleted else "unknown"})
    for coll in sorted({h["c"] for h in heads if h.get("op") == "drop" and "c" in h}):
        out.append({"collection": coll, "speaker_id": None, "slot": None, "status": "delete-collection"})
    return out
