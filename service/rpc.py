"""The wrapper every RPC of the servicer runs in: status mapping, retry hints, request ids, latency, counts
and the access log (gRPC and HTTP calls alike)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import grpc

from service.errors import Unavailable, status_of
from service.logs import access, request_id

__all__ = ["call_deadline", "rpc", "send"]

log = logging.getLogger("spkserve.servicer")

MAX_MESSAGE = 1024  # characters of an error message: client input is quoted short, this is the last guard


def call_deadline(context) -> float | None:
    """The call's absolute deadline on ``time.monotonic``'s clock (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def send(context, message) -> None:
    """Write one message of a server stream. A write the transport refuses means the call is already over on the
    wire (its client cancelled, went away or ran out of time); gRPC may report that to the handler only moments
    later, so the refusal is raised as the cancellation it is (counted CANCELLED), never as the server's own error."""
    try:
        await context.write(message)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - grpc's ExecuteBatchError and kin: nothing more can reach this client
        raise asyncio.CancelledError(f"the client can no longer be written to: {exc!r}") from exc


def _bounded(message: str) -> str:
    """An error message cut to ``MAX_MESSAGE`` characters (status details travel in a header of limited size)."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


def _audio_seconds(reply) -> float:
    """Decoded audio seconds a reply reports (its SpeechInfo fields and per-utterance feedback)."""
    total = 0.0
    for fd, value in reply.ListFields() if reply is not None else ():
        kind = fd.message_type.name if fd.message_type is not None else ""
        if kind == "SpeechInfo":
            total += value.audio_seconds
        elif kind == "UtteranceFeedback":
            total += sum(u.speech.audio_seconds for u in value)
    return total


def _tenant(servicer, metadata) -> str:
    if servicer.auth is None:
        return "-"
    try:
        return servicer.auth.token_of(metadata).name
    except Exception:  # noqa: BLE001 - an unauthenticated call never reaches a handler; be safe anyway
        return "?"


def rpc(method):
    """Decorator: status mapping, request id, latency, request counting and the access log for one RPC."""
    name = method.__name__

    @functools.wraps(method)
    def _client_gone(context) -> bool:
        """Whether the call was cancelled by its client (the HTTP gateway's context has no such state)."""
        cancelled = getattr(context, "cancelled", None)
        try:
            return bool(cancelled()) if callable(cancelled) else False
        except Exception:  # noqa: BLE001 - a context that cannot tell: treat the error as the call's own
            return False

    async def wrapper(self, request: Any, context: grpc.aio.ServicerContext):
        t0 = time.perf_counter()
        code = grpc.StatusCode.OK
        metadata = context.invocation_metadata()
        rid = request_id(metadata)
        reply, done = None, False

        def finish() -> None:
            """Metrics and the access line, once, before the status leaves (abort sends it at once)."""
            nonlocal done
            if done:
                return
            done = True
            m = self.engine.metrics
            elapsed = time.perf_counter() - t0
            m.requests.labels(name, code.name).inc()
            m.latency.labels(name).observe(elapsed)
            if self.engine.config.access_log:
                access(name, code.name, elapsed, _audio_seconds(reply), _tenant(self, metadata), rid,
                       getattr(context, "transport", "grpc"))

        try:
            await context.send_initial_metadata((("x-request-id", rid),))
            if not self.ready:
                raise Unavailable("server is starting or shutting down")
            reply = await method(self, request, context)
            return reply
        except asyncio.CancelledError:  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - every error leaves as a status code
            if _client_gone(context):  # e.g. a stream's write failed because the client cancelled meanwhile
                code = grpc.StatusCode.CANCELLED
                raise asyncio.CancelledError() from None
            code, message = status_of(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("%s failed", name)
            retry = getattr(exc, "retry_after_s", None)
            if retry:  # gRPC clients with a retry policy honour the server's pushback
                context.set_trailing_metadata((("grpc-retry-pushback-ms", str(int(retry * 1000))),))
            finish()
            await context.abort(code, _bounded(message))
        finally:
            finish()

    return wrapper


