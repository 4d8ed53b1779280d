"""What the Milvus backend keeps of a speaker in the clear: nothing but the voiceprint.

A Milvus row's primary key, its filters and its delete log are plain text inside Milvus' files and
logs, readable by whoever can read Milvus' storage. With a key file for the collection (the same
``encryption_key_file`` / ``tenant_key_files`` the embedded store uses, the first matching
pattern), a collection is created *sealed*:

* a speaker's id is stored as a keyed hash (HMAC-SHA256 under a key derived for that collection),
  so primary keys, filters, tombstones and delete logs hold hashes only;
* the id and the metadata are stored AES-256-GCM encrypted (``{"s": ...}`` in the JSON field);
* the voiceprint and its sums stay in the clear: Milvus must search them. Encrypt Milvus'
  storage (or its volumes) at rest for them.

Keys are derived per collection with HKDF-SHA256 from the key file, so a tenant's key file opens
only its collections. Collections created before a key file was configured stay in the clear
(``ListCollections`` shows which); move them with ``MigrateCollection`` or enroll again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.store.base import StoreCorrupt

__all__ = ["Sealer", "SEALED_SUFFIX", "protect_tree"]

SEALED_SUFFIX = ":sealed"  # appended to a sealed collection's index type in the registry


class Sealer:
    """Keyed hashing and sealing of one collection's speaker ids and metadata."""

    def __init__(self, key: bytes, collection: str):
        material = HKDF(algorithm=hashes.SHA256(), length=64, salt=b"spkserve-milvus-v1",
                        info=collection.encode("utf-8")).derive(key)
        self._mac, self._aead = material[:32], AESGCM(material[32:])
        self.collection = collection

    def pk(self, speaker_id: str) -> str:
        """The id as stored: 40 hex characters of HMAC-SHA256."""
        return hmac.new(self._mac, speaker_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:40]

    def tombstone(self, speaker_id: str) -> str:
        """A deleted id's tombstone (another keyed hash: it cannot be matched with the rows' keys)."""
        return hmac.new(self._mac, b"tomb\0" + speaker_id.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()[:32]

    def seal(self, speaker_id: str, metadata: dict[str, str]) -> dict:
        """The JSON field of a row: the id and metadata encrypted."""
        nonce = os.urandom(12)
        plain = json.dumps({"id": speaker_id, "meta": metadata}, separators=(",", ":")).encode()
        return {"s": base64.b64encode(nonce + self._aead.encrypt(nonce, plain, self.collection.encode())).decode()}

    def open(self, field: dict) -> tuple[str, dict[str, str]]:
        """(speaker id, metadata) of a sealed JSON field.

        Raises:
            StoreCorrupt: the field does not decrypt with this collection's key (a wrong key file).
        """
        try:
            raw = base64.b64decode(field["s"])
            body = json.loads(self._aead.decrypt(raw[:12], raw[12:], self.collection.encode()))
        except (KeyError, TypeError, ValueError, InvalidTag):
            raise StoreCorrupt(f"Milvus collection {self.collection!r}: a row does not decrypt with the configured "
                               "key file; it was sealed with another key") from None
        return body["id"], dict(body["meta"])


def protect_tree(path: Path) -> None:
    """Directories 0700 and files 0600 under (and at) ``path``: Milvus Lite's own files."""
    path = Path(path)
    if not path.exists():
        return
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        try:
            mode = stat.S_IMODE(p.lstat().st_mode)
            want = 0o700 if p.is_dir() else 0o600
            if not p.is_symlink() and mode & 0o077:
                os.chmod(p, mode & ~0o077 | (want & 0o700))
        except OSError:
            continue
