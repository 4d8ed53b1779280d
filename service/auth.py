"""Bearer tokens scoped to collections and permissions.

The token file (``auth_tokens_file``) is TOML::

    [[tokens]]
    name = "acme-backend"                 # shown in logs, never the token
    sha256 = "9f86d08188..."              # hex SHA-256 of the bearer token (``printf %s TOKEN | sha256sum``)
    collections = ["acme", "acme-*"]      # names; a trailing * matches a prefix
    permissions = ["read", "write"]       # read, write, admin

``read``: Embed, EmbedStream, Verify, VerifyStream, Compare, Identify, Diarize, DiarizeStream, GetSpeaker, ListSpeakers, ListCollections
(only the token's collections are listed). ``write``: Enroll, UpdateSpeaker, DeleteSpeaker, DeleteCollection. ``admin``: everything
on every collection. The single ``auth_token`` option is an admin token. Calls without a known
token answer UNAUTHENTICATED; a call outside its token's scope answers PERMISSION_DENIED naming
the collection.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

from service.errors import ServiceError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = ["Token", "load_tokens", "Authorizer", "PermissionDenied", "Unauthenticated", "PERMISSIONS"]

PERMISSIONS = ("read", "write", "admin")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\*?|\*")


class PermissionDenied(ServiceError):
    """The caller's token does not cover this collection or operation."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(ServiceError):
    """No valid bearer token."""

    code = grpc.StatusCode.UNAUTHENTICATED


@dataclass(frozen=True)
class Token:
    """One configured token (its hash, never the token)."""

    name: str
    sha256: str
    collections: tuple[str, ...]
    permissions: frozenset[str]

    def covers(self, collection: str) -> bool:
        """Whether the token's collection patterns match ``collection`` (admin: every collection)."""
        if "admin" in self.permissions:
            return True
        return any(collection.startswith(p[:-1]) if p.endswith("*") else collection == p for p in self.collections)

    def allows(self, permission: str, collection: str | None = None) -> bool:
        """Whether the token grants ``permission`` (on ``collection`` when given)."""
        if "admin" in self.permissions:
            return True
        if permission not in self.permissions:
            return False
        return collection is None or self.covers(collection)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def load_tokens(path: str | Path) -> list[Token]:
    """Parse and check a token file.

    Raises:
        ValueError: naming the file, the entry and the field that is wrong.
    """
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"auth_tokens_file {path}: {e}") from None
    unknown = sorted(set(raw) - {"tokens"})
    if unknown or not isinstance(raw.get("tokens"), list):
        raise ValueError(f"auth_tokens_file {path}: expected only [[tokens]] tables, found {unknown or 'no tokens'}")
    out, seen = [], set()
    for i, t in enumerate(raw["tokens"]):
        where = f"auth_tokens_file {path}: tokens[{i}]"

        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"{where}.{field}: {why}, got {t.get(field)!r}")

        need(isinstance(t, dict), "", "must be a table")
        extra = sorted(set(t) - {"name", "sha256", "collections", "permissions"})
        need(not extra, str(extra), "unknown key(s); allowed: name, sha256, collections, permissions")
        need(isinstance(t.get("name"), str) and bool(t.get("name")), "name", "must be a non-empty string")
        sha = t.get("sha256")
        need(isinstance(sha, str) and bool(_HEX64.fullmatch(sha.lower())), "sha256",
             "must be 64 hex characters (the SHA-256 of the token, not the token)")
        need(sha.lower() not in seen, "sha256", "repeats another entry's hash")
        colls = t.get("collections", [])
        need(isinstance(colls, list) and all(isinstance(c, str) and _PATTERN.fullmatch(c) for c in colls),
             "collections", "must be a list of collection names, each optionally ending in *")
        perms = t.get("permissions")
        need(isinstance(perms, list) and bool(perms) and all(p in PERMISSIONS for p in perms), "permissions",
             f"must be a non-empty list of {list(PERMISSIONS)}")
        need("admin" in perms or bool(colls), "collections", "is empty (only admin tokens need none)")
        seen.add(sha.lower())
        out.append(Token(t["name"], sha.lower(), tuple(colls), frozenset(perms)))
    return out


class Authorizer:
    """Resolves a call's bearer token and checks its scope."""

    def __init__(self, tokens: list[Token], admin_token: str = ""):
        self.tokens: dict[str, Token] = {}
        self.replace(tokens, admin_token)

    def replace(self, tokens: list[Token], admin_token: str = "") -> None:
        """Answer with these tokens from now on (a reloaded token file). One dict swap: a call sees the old set
        or the new one, never a mix."""
        table = {t.sha256: t for t in tokens}
        if admin_token:
            table[_digest(admin_token)] = Token("auth_token", _digest(admin_token), (), frozenset({"admin"}))
        self.tokens = table

    def token_of(self, metadata) -> Token:
        """The token of a call's metadata. Raises Unauthenticated."""
        header = next((v for k, v in (metadata or ()) if k == "authorization"), "")
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("missing or malformed authorization header (expected 'Bearer <token>')")
        digest = _digest(header[7:])
        for known, token in self.tokens.items():  # constant time per entry: no early exit on a prefix
            if hmac.compare_digest(known, digest):
                return token
        raise Unauthenticated("invalid token")

    def require(self, metadata, permission: str, collection: str | None = None) -> Token:
        """The call's token if it grants ``permission`` (on ``collection``); else PermissionDenied."""
        token = self.token_of(metadata)
        if not token.allows(permission, collection):
            where = f"collection {collection!r}" if collection is not None else "this server"
            raise PermissionDenied(f"collection: token {token.name!r} has no {permission} permission on {where}"
                                   if collection is not None else
                                   f"token {token.name!r} has no {permission} permission on {where}")
        return token
