"""What an HTTP request looks like to the servicer: a stand-in for the gRPC call context.

The HTTP/JSON API does not reimplement any RPC: it builds the RPC's request message and calls
the servicer's method with an ``HttpCallContext``, so validation, permissions, admission,
limits, metrics and the error table are the gRPC path's own. The context carries the request's
metadata (``authorization``, ``x-request-id``), its deadline (the ``x-request-timeout`` header,
seconds), collects the retry hint the servicer sets, and turns ``abort`` into ``HttpAbort``,
which the API answers as ``{"error": {"code": ..., "message": ...}}`` with the mapped HTTP status.
"""

from __future__ import annotations

import asyncio
import math
import time

import grpc

from service.errors import http_status

__all__ = ["HttpAbort", "HttpCallContext", "ClientGone", "error_body"]


class ClientGone(asyncio.CancelledError):
    """The HTTP or WebSocket client went away while its call was still reading or writing (a cancellation).

    The call's context says so too (``client_gone``): on Python 3.10 a cancellation that crosses
    ``asyncio.wait_for`` (the servicer's idle timeouts) arrives as a plain ``CancelledError``."""


class HttpAbort(Exception):
    """A call that ended with a non-OK status; ``status`` is the HTTP status to answer."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s
        self.status = http_status(code)

    def headers(self) -> dict[str, str]:
        """``Retry-After`` (whole seconds, at least 1) when the server gave a retry hint."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def error_body(code: grpc.StatusCode | str, message: str) -> dict:
    """The JSON error body every HTTP route answers with."""
    return {"error": {"code": code if isinstance(code, str) else code.name, "message": message}}


class HttpCallContext:
    """The parts of ``grpc.aio.ServicerContext`` the servicer uses, for one HTTP request."""

    def __init__(self, metadata: list[tuple[str, str]], timeout_s: float | None = None):
        self._metadata = tuple(metadata)
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.retry_after_s: float | None = None
        self.transport = "http"  # for the access log
        self.client_gone = False  # set when the client disconnected mid-call (then a cancellation is no error)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        """The request's metadata: lower-case (key, value) pairs."""
        return self._metadata

    def time_remaining(self) -> float | None:
        """Seconds left before the request's deadline, or None without one."""
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata) -> None:
        """Nothing to send: the HTTP response carries ``x-request-id`` itself."""

    def set_trailing_metadata(self, metadata) -> None:
        """Keeps the retry hint (``grpc-retry-pushback-ms``) for the ``Retry-After`` header."""
        for key, value in metadata:
            if key == "grpc-retry-pushback-ms":
                self.retry_after_s = int(value) / 1000

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        """End the call: raises ``HttpAbort``."""
        raise HttpAbort(code, details, self.retry_after_s)
