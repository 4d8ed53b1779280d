"""The catalogue of community speaker models ``spkserve pull`` knows (``models/catalog.toml``).

Each entry says where the model is, how to check it (sha256 and size, or a pinned Hugging Face
revision), its licence, its front end and its published accuracy. ``load_catalog`` reads and
checks the file; a malformed entry is an error naming the entry and the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["CatalogEntry", "CatalogError", "load_catalog", "CATALOG", "FORMATS"]

CATALOG = Path(__file__).resolve().parent / "catalog.toml"
FORMATS = ("fbank-onnx", "hf-xvector")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA = re.compile(r"[0-9a-f]{64}")
_REV = re.compile(r"[0-9a-f]{40}")


class CatalogError(ValueError):
    """The catalogue (or a name looked up in it) is wrong; the message names the entry and key."""


@dataclass(frozen=True)
class CatalogEntry:
    """One catalogued model (see ``models/catalog.toml`` for the meaning of each field)."""

    name: str
    description: str
    format: str
    license: str
    commercial_use: bool
    sample_rate: int
    embedding_dim: int
    urls: list[str] = field(default_factory=list)
    sha256: str = ""
    size: int = 0
    repo_id: str = ""
    revision: str = ""
    num_bins: int = 80
    cmn: bool = True
    published_eer: float | None = None
    published_test_set: str = ""
    published_setting: str = ""

    @property
    def source(self) -> str:
        """Where it comes from, as model.json records it."""
        if self.repo_id:
            return f"huggingface:{self.repo_id}@{self.revision}"
        return self.urls[0] if self.urls else ""


_REQUIRED = {"description": str, "format": str, "license": str, "commercial_use": bool, "sample_rate": int,
             "embedding_dim": int}
_OPTIONAL = {"urls": list, "sha256": str, "size": int, "repo_id": str, "revision": str, "num_bins": int, "cmn": bool,
             "published_eer": (int, float), "published_test_set": str, "published_setting": str}


def _entry(name: str, table: dict) -> CatalogEntry:
    where = f"catalog entry [{name}]"
    if not _NAME.fullmatch(name):
        raise CatalogError(f"{where}: the name must be lower-case letters, digits, '.', '_' or '-'")
    for key in table:
        if key not in _REQUIRED and key not in _OPTIONAL:
            raise CatalogError(f"{where}: unknown key {key!r}")
    for key, kind in {**_REQUIRED, **_OPTIONAL}.items():
        if key in _REQUIRED and key not in table:
            raise CatalogError(f"{where}: {key} is missing")
        if key in table and (not isinstance(table[key], kind) or (kind is int and isinstance(table[key], bool))):
            raise CatalogError(f"{where}: {key} = {table[key]!r} is not a {getattr(kind, '__name__', 'number')}")
    e = CatalogEntry(name=name, **table)
    if e.format not in FORMATS:
        raise CatalogError(f"{where}: format {e.format!r} is not one of {FORMATS}")
    if e.format == "fbank-onnx":
        if not e.urls or not all(isinstance(u, str) and u.startswith(("https://", "http://")) for u in e.urls):
            raise CatalogError(f"{where}: urls must list http(s) addresses")
        if not _SHA.fullmatch(e.sha256):
            raise CatalogError(f"{where}: sha256 must be 64 lower-case hex digits")
        if e.size <= 0:
            raise CatalogError(f"{where}: size must be the file's size in bytes")
    else:
        if not e.repo_id or not _REV.fullmatch(e.revision):
            raise CatalogError(f"{where}: a Hugging Face entry needs repo_id and a 40-hex-digit revision (a commit)")
    if not 8000 <= e.sample_rate <= 48000 or e.embedding_dim < 1:
        raise CatalogError(f"{where}: sample_rate must be in 8000..48000 and embedding_dim >= 1")
    return e


def load_catalog(path: str | Path | None = None) -> dict[str, CatalogEntry]:
    """The catalogue's entries by name (default: the shipped ``models/catalog.toml``)."""
    path = Path(path) if path else CATALOG
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CatalogError(f"{path}: {e}") from None
    out = {}
    for name, table in data.items():
        if not isinstance(table, dict):
            raise CatalogError(f"{path}: {name!r} is not a table")
        out[name] = _entry(name, table)
    return out
