"""The wrapper every RPC of the servicer runs in: status mapping, retry hints, latency and counts."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import grpc

from service.errors import Unavailable, status_of

__all__ = ["rpc"]

log = logging.getLogger("spkserve.servicer")

MAX_MESSAGE = 1024  # characters of an error message: client input is quoted short, this is the last guard


def _bounded(message: str) -> str:
    """An error message cut to ``MAX_MESSAGE`` characters (status details travel in a header of limited size)."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def rpc(method):
    """Decorator: status mapping, latency and request counting for one RPC."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self, request: Any, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if not self.ready:
                raise Unavailable("server is starting or shutting down")
            return await method(self, request, context)
        except asyncio.CancelledError:  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status code
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            retry = getattr(exc, "retry_after_s", None)
            if retry:  # gRPC clients with a retry policy honour the server's pushback
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(retry * 1000))),))
            await context.abort(code, _bounded(message))
        finally:
            m = self.engine.metrics
            m.requests.labels(name, code.name).inc()
            m.latency.labels(name).observe(time.perf_counter() - t0)

    return wrapper


