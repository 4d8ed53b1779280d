"""Downloading a model file: resumable, checked, with a progress bar, behind a proxy.

``fetch_file`` writes ``<dest>.part`` as bytes arrive and resumes it with an HTTP Range request
when the connection drops or the command is run again; the file takes its final name only once
its size and sha256 match. A local path or ``file://`` URL is copied the same way (offline use,
a mirror on a shared disk). Proxies come from the usual environment (``HTTPS_PROXY``,
``HTTP_PROXY``, ``NO_PROXY``), which ``urllib`` honours.
"""

from __future__ import annotations

import hashlib
import http.client
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

__all__ = ["DownloadError", "fetch_file", "sha256_of"]

_BLOCK = 1 << 20
_USER_AGENT = "spkserve-pull"


class DownloadError(RuntimeError):
    """A download that cannot be completed or checked; the message says which and why."""


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


class _Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, label: str, total: int, out=None):
        self.label, self.total, self.out = label, total, out or sys.stderr
        self.shown = self.out.isatty() if hasattr(self.out, "isatty") else False
        self.last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.shown or (not final and now - self.last < 0.2):
            return
        self.last = now
        mb = done / 1e6
        if self.total:
            frac = min(done / self.total, 1.0)
            bar = "#" * int(30 * frac)
            self.out.write(f"\r{self.label}: [{bar:<30}] {mb:7.1f} / {self.total / 1e6:.1f} MB")
        else:
            self.out.write(f"\r{self.label}: {mb:7.1f} MB")
        if final:
            self.out.write("\n")
        self.out.flush()


def _open(url: str, offset: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    # a fresh opener reads HTTPS_PROXY / HTTP_PROXY / NO_PROXY now (urlopen's shared one read them once)
    return urllib.request.build_opener().open(req, timeout=timeout)


def fetch_file(source: str, dest: Path, sha256: str | None = None, size: int | None = None, *, retries: int = 3,
               timeout: float = 60.0, log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Path:
    """Download ``source`` (URL or local path) to ``dest``; returns ``dest``.

    Args:
        source: an http(s) or file URL, or a local path.
        dest: the final path (written as ``dest.part`` until checked).
        sha256: the expected hex digest; None skips the check (a local file named by the user).
        size: the expected size in bytes, when known.
        retries: how often a dropped connection is resumed.
        timeout: seconds without data before a connection counts as dropped.

    Raises:
        DownloadError: not found, refused, truncated after every retry, wrong size or checksum.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists() and sha256 and sha256_of(dest) == sha256:
        log(f"{dest.name}: already downloaded and checked")
        return dest
    part = dest.with_name(dest.name + ".part")
    local = Path(source[7:] if source.startswith("file://") else source)
    if "://" not in source or source.startswith("file://"):
        if not local.is_file():
            raise DownloadError(f"{source}: no such file")
        shutil.copyfile(local, part)
    else:
        _download(source, part, size, retries, timeout)
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{source}: {got:,} bytes arrived, the catalogue says {size:,}; the partial file was removed")
    if sha256:
        digest = sha256_of(part)
        if digest != sha256:
            part.unlink(missing_ok=True)
            raise DownloadError(f"{source}: sha256 {digest} does not match the expected {sha256}; the file was "
                                "removed (a corrupted download, or the upstream file changed)")
    part.replace(dest)
    return dest


def _download(url: str, part: Path, size: int | None, retries: int, timeout: float) -> None:
    """Fill ``part`` from ``url``, resuming from its current length."""
    attempt = 0
    progress = _Progress(part.name.removesuffix(".part"), size or 0)
    while True:
        offset = part.stat().st_size if part.exists() else 0
        if size is not None and offset >= size:
            if offset > size:
                part.unlink()
                continue
            progress.update(offset, final=True)
            return
        try:
            with _open(url, offset, timeout) as r:
                if offset and getattr(r, "status", 200) != 206:  # the server ignored the range: start over
                    offset = 0
                length = int(r.headers.get("Content-Length") or 0)
                if not offset and size is not None and length and length != size:
                    raise DownloadError(f"{url}: the server has {length:,} bytes, the catalogue says {size:,} "
                                        "(another file, or the upstream changed it)")
                total = size or length + offset
                progress.total = total
                with open(part, "ab" if offset else "wb") as f:
                    while block := r.read(_BLOCK):
                        f.write(block)
                        offset += len(block)
                        progress.update(offset)
            if size is None and total and offset < total:
                raise ConnectionError(f"connection closed at {offset:,} of {total:,} bytes")
            if size is None or offset >= size:
                progress.update(offset, final=True)
                return
            raise ConnectionError(f"connection closed at {offset:,} of {size:,} bytes")
        except urllib.error.HTTPError as e:
            if e.code == 416 and size is not None and offset == size:
                return
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}" + (" (not found: the upstream moved or removed "
                                "the file; pull --from a mirror)" if e.code == 404 else "")) from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as e:
            attempt += 1
            if attempt > retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(f"{url}: {getattr(e, 'reason', e)}; {have:,} bytes kept in {part} (run the "
                                    "command again to resume)") from None
            time.sleep(min(2.0 ** attempt * 0.1, 5.0))  # 0.2, 0.4, 0.8 s ... at most 5 s
