"""Logging of the server: text or JSON lines, request ids, and one access-log line per call.

- ``setup_logging(level, fmt)``: ``fmt`` "text" (``time level logger: message``) or "json" (one
  object per line: ``ts``, ``level``, ``logger``, ``message`` and any structured fields).
- ``request_id(metadata)``: the caller's ``x-request-id`` when it is a short printable string,
  else a new random one; the server returns it (gRPC initial metadata, HTTP header) and logs it.
- ``access(...)``: the access line of one call on logger ``spkserve.access``: method, status,
  duration, audio seconds, tenant (the token's name), request id, transport. Never audio, speaker
  ids or collection names: those identify people.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

__all__ = ["setup_logging", "JsonFormatter", "request_id", "access", "LOG_FORMATS"]

LOG_FORMATS = ("text", "json")
ACCESS = logging.getLogger("spkserve.access")
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; fields passed with ``extra=`` become keys."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    """Configure the root logger once for the process (``spkserve serve``)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def request_id(metadata) -> str:
    """The call's ``x-request-id`` (at most 128 printable characters) or a new one."""
    for key, value in metadata or ():
        if key == "x-request-id" and isinstance(value, str) and 0 < len(value) <= 128 and value.isprintable():
            return value
    return uuid.uuid4().hex


def access(method: str, code: str, seconds: float, audio_seconds: float, tenant: str, rid: str,
           transport: str) -> None:
    """Log the access line of one call (INFO on ``spkserve.access``)."""
    if not ACCESS.isEnabledFor(logging.INFO):
        return
    ACCESS.info("%s %s %.1f ms audio=%.2fs tenant=%s id=%s via=%s", method, code, seconds * 1e3, audio_seconds, tenant,
                rid, transport, extra={"method": method, "code": code, "duration_ms": round(seconds * 1e3, 2),
                                       "audio_seconds": round(audio_seconds, 3), "tenant": tenant, "request_id": rid,
                                       "transport": transport})
