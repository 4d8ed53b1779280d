"""The speaker store interface every backend implements, its records and input validation.

A store holds *collections* (namespaces, e.g. one per tenant), each bound to one model; a
collection holds *speakers*, each a running sum of L2-normalised utterance embeddings with the
utterance count (so appending gives exactly the voiceprint of enrolling everything at once),
the net speech enrolled, metadata, and the cohort statistics of its voiceprint. Deleting a
speaker leaves a *tombstone*: a keyed hash of its id, so that it is not re-enrolled by accident.

Errors: ``NotFound`` (collection, speaker), ``FailedPrecondition`` (another model, a tombstoned
speaker), ``InvalidArgument`` (bad names or metadata) and ``StoreUnavailable`` (the storage
cannot take writes now; nothing was changed).
"""

from __future__ import annotations

import abc
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from service.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable

__all__ = ["SpeakerRecord", "CollectionInfo", "IndexOptions", "SpeakerStore", "StoreUnavailable", "StoreCorrupt",
           "StatsFn", "check_merged_metadata", "validate_metadata_keys", "not_empty", "validate_collection", "validate_speaker_id", "validate_metadata", "quoted", "version_conflict", "check_binding"]

_COLLECTION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_METADATA = 64
_MAX_METADATA_BYTES = 4096  # per speaker, keys and values in UTF-8, after merging every enrollment's metadata
# Unicode categories never allowed in ids and metadata keys: controls, format characters (the
# bidirectional overrides, zero-width joiners ...), surrogates, private use, unassigned, and
# line/paragraph separators. They make one id print like another.
_BAD_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
# Letters and symbols that print as nothing (Hangul fillers, the Braille blank, the Mongolian vowel
# separator): an id made of them looks empty, or like another id with them left out.
_INVISIBLE = {0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800, 0x180E, 0x17B4, 0x17B5}
# Scripts whose letters look like Latin ones: an id mixing two of them (Latin "a" next to Cyrillic "а")
# is refused, because it can pass for another id.
_CONFUSABLE_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "CHEROKEE", "COPTIC")

StatsFn = Callable[[str, np.ndarray], "np.ndarray | None"]


class StoreUnavailable(Unavailable):
    """The store cannot take this write now (disk full, I/O error, a backend away); nothing was changed."""


class StoreCorrupt(RuntimeError):
    """Stored data is damaged in a way recovery must not guess about; the message says what to do."""


def version_conflict(collection: str, model: str, bound: str, given: str) -> str:
    """The message for voiceprints of one model version compared with another's."""
    return (f"collection {quoted(collection)} holds voiceprints of model {model!r} version {bound!r}; this server's "
            f"{model!r} is version {given!r}, and voiceprints of different versions cannot be compared. Move it "
            f"with MigrateCollection (re-embeds retained enrollment speech), enroll the speakers again into a new "
            f"collection, or serve {model!r} version {bound!r} (the release that enrolled it) for this collection")


def check_binding(collection: str, bound_model: str, bound_dim: int, bound_version: str, model: str, dim: int,
                  model_version: str, probe: bool) -> None:
    """Raise FailedPrecondition when vectors of (model, dim, version) meet a collection bound to others.

    ``probe``: the vectors are a search probe (else embeddings to enroll). An empty version on
    either side is not compared (collections written before versions were kept).
    """
    if bound_model != model or bound_dim != dim:
        what = "the probe is from" if probe else "cannot add embeddings of"
        raise FailedPrecondition(f"collection {quoted(collection)} holds voiceprints of model {bound_model!r} "
                                 f"(dim {bound_dim}); {what} model {model!r} (dim {dim})")
    if bound_version and model_version and bound_version != model_version:
        raise FailedPrecondition(version_conflict(collection, model, bound_version, model_version))


def quoted(value: str, limit: int = 64) -> str:
    """``repr`` of a client-given string, shortened: error messages never echo long input back."""
    return repr(value if len(value) <= limit else value[:limit] + "...")


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X} ({unicodedata.name(ch, unicodedata.category(ch))})"


def _bad_char(value: str) -> str | None:
    for ch in value:
        if unicodedata.category(ch) in _BAD_CATEGORIES or ord(ch) in _INVISIBLE:
            return _describe(ch)
    return None


def _scripts(value: str) -> set[str]:
    """The confusable scripts (``_CONFUSABLE_SCRIPTS``) the letters of ``value`` come from."""
    out = set()
    for ch in value:
        if unicodedata.category(ch).startswith("L"):
            name = unicodedata.name(ch, "")
            out.update(s for s in _CONFUSABLE_SCRIPTS if name.startswith(s + " "))
    return out


def validate_collection(name: str, field_name: str = "collection") -> str:
    """Return the collection name ('default' for empty) or raise InvalidArgument."""
    name = name or "default"
    if not _COLLECTION_RE.fullmatch(name):
        raise InvalidArgument(field_name, f"{quoted(name)} is not a valid collection name "
                                          "(1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)")
    return name


def validate_speaker_id(speaker_id: str, field_name: str = "speaker_id") -> str:
    """Return the speaker id in Unicode NFC, or raise InvalidArgument naming what is wrong with it.

    One id has one spelling: the composed form (NFC) is the id, so "café" typed with a combining
    accent is the same speaker as with a precomposed "é". Refused: empty or over 256 characters;
    control, format (bidirectional overrides, zero-width) and invisible characters (Hangul fillers,
    the Braille blank); surrounding whitespace; a combining mark with nothing to combine with;
    compatibility forms that print like plain characters (fullwidth "Ａ", mathematical "𝐀",
    ligatures: the id must equal its NFKC form); and letters of two look-alike scripts in one id
    (Latin with Cyrillic or Greek, ...).
    """
    if not speaker_id:
        raise InvalidArgument(field_name, "is empty")
    if len(speaker_id) > 256:
        raise InvalidArgument(field_name, f"is {len(speaker_id)} characters long, at most 256 allowed")
    bad = _bad_char(speaker_id)
    if bad:
        raise InvalidArgument(field_name, f"{quoted(speaker_id)} contains the control or invisible character {bad}")
    if speaker_id != speaker_id.strip():
        raise InvalidArgument(field_name, f"{quoted(speaker_id)} starts or ends with whitespace")
    nfc = unicodedata.normalize("NFC", speaker_id)
    if unicodedata.combining(nfc[0]) or unicodedata.category(nfc[0]) in ("Mn", "Mc", "Me"):
        raise InvalidArgument(field_name, f"{quoted(speaker_id)} starts with the combining mark {_describe(nfc[0])}")
    folded = unicodedata.normalize("NFKC", nfc)
    if folded != nfc:
        ch = next(c for c in nfc if unicodedata.normalize("NFKC", c) != c)
        raise InvalidArgument(field_name, f"{quoted(speaker_id)} contains the compatibility character {_describe(ch)}, "
                                          f"which prints like {quoted(unicodedata.normalize('NFKC', ch))}; use {quoted(folded)}")
    scripts = _scripts(nfc)
    if len(scripts) > 1:
        raise InvalidArgument(field_name, f"{quoted(speaker_id)} mixes letters of the look-alike scripts "
                                          f"{', '.join(sorted(scripts))}; use one script per id")
    return nfc


def validate_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """Check metadata sizes and keys; return a copy."""
    if len(metadata) > _MAX_METADATA:
        raise InvalidArgument("metadata", f"has {len(metadata)} entries, at most {_MAX_METADATA} allowed")
    for k, v in metadata.items():
        if not k or len(k) > 128:
            raise InvalidArgument("metadata", f"key {quoted(k)} must be 1-128 characters")
        bad = _bad_char(k)
        if bad:
            raise InvalidArgument("metadata", f"key {quoted(k)} contains the control or invisible character {bad}")
        if len(v) > 1024:
            raise InvalidArgument(f"metadata[{quoted(k)}]", f"value is {len(v)} characters long, at most 1024 allowed")
    return dict(metadata)


def check_merged_metadata(old: dict[str, str], new: dict[str, str], remove: list[str] | tuple = (),
                          change: str = "enrollment") -> dict[str, str]:
    """The metadata once ``new`` is merged into ``old`` and ``remove`` keys removed; InvalidArgument when it would
    exceed 64 keys or 4 KiB (``change``: what would do it, for the message)."""
    merged = {k: v for k, v in {**old, **new}.items() if k not in remove}
    size = sum(len(k.encode()) + len(v.encode()) for k, v in merged.items())
    if len(merged) > _MAX_METADATA or size > _MAX_METADATA_BYTES:
        raise InvalidArgument("metadata", f"the speaker would hold {len(merged)} keys and {size:,} bytes of metadata "
                                          f"after this {change}, at most {_MAX_METADATA} keys and "
                                          f"{_MAX_METADATA_BYTES:,} bytes; nothing was changed")
    return merged


def not_empty(collection: str, speakers: int) -> FailedPrecondition:
    """The error of a DeleteCollection without ``force`` on a collection that holds speakers."""
    return FailedPrecondition(f"collection: {quoted(collection)} holds {speakers} speaker{'s' if speakers != 1 else ''}; "
                              "set force to delete them with it")


def validate_metadata_keys(keys: list[str], field_name: str = "remove_metadata_keys") -> list[str]:
    """Check keys named for removal as metadata keys are checked; return them as a list."""
    for i, k in enumerate(keys):
        if not k or len(k) > 128 or _bad_char(k):
            raise InvalidArgument(f"{field_name}[{i}]", f"{quoted(k)} is not a metadata key (1-128 characters, no "
                                                        "control or invisible characters)")
    return list(keys)


@dataclass
class IndexOptions:
    """Search index settings of new collections."""

    index_type: str = "flat"  # flat | hnsw | ivf | ivf_pq
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    ivf_nlist: int = 1024
    ivf_nprobe: int = 32
    hnsw_ef_construction: int = 0  # HNSW build breadth; 0: the backend's default (faiss 40, Milvus 200)
    ivf_pq_rerank: int = 64  # ivf_pq: candidates re-scored exactly per result wanted


@dataclass
class SpeakerRecord:
    """One enrolled speaker."""

    speaker_id: str
    sum: np.ndarray  # (D,) float64 sum of unit utterance embeddings
    count: int
    metadata: dict[str, str] = field(default_factory=dict)
    created_ms: int = 0
    updated_ms: int = 0
    label: int = -1  # the search index's id
    speech: float | None = 0.0  # net speech seconds enrolled; None: enrolled before speech was measured
    stats: np.ndarray | None = None  # (2,) cohort (mean, std) of the voiceprint; None: the model has no cohort
    last_used_ms: int = 0  # last enrolment, verification or identification match (retention)

    @property
    def voiceprint(self) -> np.ndarray:
        """The L2-normalised mean embedding, (D,) float32."""
        return (self.sum / max(np.linalg.norm(self.sum), 1e-12)).astype(np.float32)


@dataclass
class CollectionInfo:
    """Summary of a collection."""

    name: str
    model: str
    dim: int
    speaker_count: int
    index_type: str
    model_version: str = ""  # the model version its voiceprints were made with ("" before versions were kept)


class SpeakerStore(abc.ABC):
    """What the service needs of a speaker store. Implementations are thread-safe."""

    @abc.abstractmethod
    def enroll(self, collection: str, model: str, speaker_id: str, embeddings: np.ndarray,
               metadata: dict[str, str] | None = None, speech: float = 0.0,
               allow_reenroll: bool = False, model_version: str = "",
               audio: list[tuple[int, np.ndarray]] | None = None) -> tuple[SpeakerRecord, bool]:
        """Add unit embeddings (N, D) to a speaker, creating speaker and collection as needed.

        ``audio``: (rate, (T,) int16) speech to retain with the speaker (for migration to another
        model), encrypted and deleted with it. Returns (the updated record, whether the speaker
        was created). Durable when it returns.
        Raises FailedPrecondition for another model or model version, or for a deleted/opted-out
        speaker unless ``allow_reenroll``.
        """

    @abc.abstractmethod
    def delete(self, collection: str, speaker_id: str, opt_out: bool = False) -> SpeakerRecord | None:
        """Remove a speaker and leave a tombstone; returns the removed record.

        Raises NotFound for an unknown speaker, unless ``opt_out`` (then only the tombstone is
        written and None returned).
        """

    @abc.abstractmethod
    def update_metadata(self, collection: str, speaker_id: str, metadata: dict[str, str],
                        remove: list[str]) -> SpeakerRecord:
        """Merge ``metadata`` into a speaker's, then remove the ``remove`` keys; the voiceprint is unchanged.
        Returns the updated record; durable when it returns. Raises NotFound, or InvalidArgument past the limits."""

    @abc.abstractmethod
    def drop_collection(self, collection: str, force: bool = False) -> CollectionInfo:
        """Delete a collection: each of its speakers as ``delete`` does (tombstones kept), then its binding to a
        model, so the name is free for any model. Opt-outs stay. Returns what it was (model, speakers deleted).
        Durable when it returns.

        Raises NotFound for an unknown collection, FailedPrecondition when it holds speakers and not ``force``.
        """

    @abc.abstractmethod
    def retained_audio(self, collection: str, speaker_id: str) -> list[tuple[int, np.ndarray]]:
        """The (rate, (T,) int16) enrollment speech kept for a speaker (empty when none). Raises NotFound."""

    @abc.abstractmethod
    def get(self, collection: str, speaker_id: str) -> SpeakerRecord:
        """A speaker's record. Raises NotFound."""

    @abc.abstractmethod
    def list(self, collection: str, offset: int, limit: int) -> tuple[list[SpeakerRecord], int]:
        """Speakers sorted by id from ``offset``; returns (page, total)."""

    @abc.abstractmethod
    def search(self, collection: str, model: str, query: np.ndarray, k: int,
               keep: Callable[[SpeakerRecord], bool] | None = None,
               model_version: str = "") -> list[tuple[SpeakerRecord, float]]:
        """Top-k (record, cosine) for a (D,) unit query of ``model``, best first, among records ``keep`` accepts."""

    @abc.abstractmethod
    def collection_model(self, collection: str) -> str:
        """The model a collection is bound to. Raises NotFound."""

    @abc.abstractmethod
    def collection_binding(self, collection: str) -> tuple[str, str]:
        """(model, model version) a collection is bound to; the version is "" when unknown. Raises NotFound."""

    @abc.abstractmethod
    def collections(self) -> list[CollectionInfo]:
        """Summaries of all collections, sorted by name."""

    def speaker_count(self, collection: str) -> int:
        """How many speakers a collection holds (Identify's N). Raises NotFound."""
        for info in self.collections():
            if info.name == collection:
                return info.speaker_count
        raise NotFound(f"collection: {quoted(collection)} does not exist")

    @abc.abstractmethod
    def set_stats_fn(self, fn: StatsFn | None) -> None:
        """How voiceprints get cohort statistics ((model, (N, D)) -> (N, 2) or None); recomputes them all."""

    @abc.abstractmethod
    def touch(self, collection: str, speaker_ids: list[str]) -> None:
        """Record that speakers were used now (retention counts from the last use)."""

    def flush_touches(self) -> None:
        """Persist the uses recorded by ``touch`` (stores that keep none need nothing here)."""

    def state(self) -> str:
        """'ok', or why writes are stopped (health and logs)."""
        return "ok" if self.writable else "read-only"

    @abc.abstractmethod
    def expire(self, older_than_ms: int) -> int:
        """Delete (with tombstones) every speaker last used before ``older_than_ms``; returns how many."""

    @property
    @abc.abstractmethod
    def writable(self) -> bool:
        """False while the store cannot take writes (the last write failed)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Flush and release resources."""
