"""The server interceptor every call passes: bearer-token check and safe request parsing.

- Authentication: with tokens configured, a call without a known bearer token answers
  UNAUTHENTICATED as soon as its metadata arrives, before its request message is read: the
  call is answered by a handler that never reads its request, so an unauthenticated client's
  upload stops at gRPC's flow-control window instead of being received whole (health checks
  excepted: probes carry no credentials). What a token may do on which collection is checked by
  the servicer.
- Memory: the request bytes of the calls in progress are counted process-wide; a call whose
  message would take the total past ``max_inflight_request_mb`` answers RESOURCE_EXHAUSTED.
- Parsing: a request that is not a valid protobuf message of its method answers
  INVALID_ARGUMENT with a plain message, instead of gRPC's UNKNOWN with library internals.
"""

from __future__ import annotations

import inspect
import threading

import grpc

from service.auth import Authorizer, Unauthenticated
from service.errors import InvalidArgument

__all__ = ["RequestGuard", "ByteBudget", "OPEN_METHODS"]

OPEN_METHODS = ("/grpc.health.v1.Health/",)
# request streams whose messages are used up as they arrive (EmbedStream/DiarizeStream spool theirs and hold them)
CONSUMED_AS_THEY_ARRIVE = ("/spkserve.v1.SpeakerService/VerifyStream",)


class _Malformed:
    """What the wrapped deserializer returns for bytes that do not parse."""

    def __init__(self, method: str):
        self.message = f"request: the bytes are not a valid request message of {method.rsplit('/', 1)[-1]}"


class ByteBudget:
    """Request bytes held by calls in progress, process-wide; ``take`` refuses past ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> bool:
        """Count ``n`` more bytes; False (nothing counted) when that would pass the limit."""
        with self._lock:
            if self.used + n > self.limit and n > 0:
                return False
            self.used += n
            return True

    def give(self, n: int) -> None:
        """Release ``n`` bytes."""
        with self._lock:
            self.used = max(0, self.used - n)


class _OverBudget:
    def __init__(self, size: int, budget: ByteBudget):
        self.message = (f"request: its {size:,} bytes would take the requests in progress past "
                        f"max_inflight_request_mb ({budget.limit // (1 << 20)} MiB); retry shortly")


class _Sized:
    """A parsed message and the bytes it holds of the budget."""

    __slots__ = ("msg", "size")

    def __init__(self, msg, size: int):
        self.msg, self.size = msg, size


def _safe(deserializer, method: str, budget: ByteBudget | None):
    if deserializer is None:
        return None

    def parse(data: bytes):
        if budget is not None and not budget.take(len(data)):
            return _OverBudget(len(data), budget)
        try:
            msg = deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed message
            if budget is not None:
                budget.give(len(data))
            return _Malformed(method)
        return _Sized(msg, len(data)) if budget is not None else msg

    return parse


async def _checked_stream(iterator, held: list[int], budget: ByteBudget | None = None, consumed: bool = False):
    """The messages of a request stream, checked; ``consumed``: each one's bytes are released once the next is asked
    for (a live stream is processed as it arrives and holds nothing of it, however long it runs)."""
    last = 0
    async for msg in iterator:
        if consumed and last and budget is not None:
            budget.give(last)
            held[0] -= last
            last = 0
        if isinstance(msg, _Sized):
            held[0] += msg.size
            last = msg.size
            msg = msg.msg
        if isinstance(msg, _Malformed):
            raise InvalidArgument("request", msg.message.partition(": ")[2])
        if isinstance(msg, _OverBudget):
            from service.errors import Overloaded

            raise Overloaded(msg.message, 1.0)
        yield msg


class RequestGuard(grpc.aio.ServerInterceptor):
    """See the module docstring. ``auth`` None: no authentication."""

    def __init__(self, auth: Authorizer | None, budget: ByteBudget | None = None):
        self.auth = auth
        self.budget = budget

    async def intercept_service(self, continuation, details):
        """Refuse an unauthenticated or over-budget call before its handler reads the request."""
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        if self.auth is not None:
            try:
                self.auth.token_of(details.invocation_metadata)
            except Unauthenticated as e:
                return self._deny(handler, e.message)
        return self._wrap(handler, details.method, self.budget)

    @staticmethod
    def _deny(handler, message: str):
        """A handler that answers UNAUTHENTICATED without reading the request (a request stream is never iterated)."""

        async def deny(_request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {message}")

        async def deny_stream(_request_iterator, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {message}")
            yield  # an async generator, as a streaming response needs

        if handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(deny_stream, response_serializer=handler.response_serializer)
        return grpc.stream_unary_rpc_method_handler(deny, response_serializer=handler.response_serializer)

    @staticmethod
    def _wrap(handler, method: str, budget: ByteBudget | None):
        streaming_in, streaming_out = bool(handler.request_streaming), bool(handler.response_streaming)
        behavior = {(False, False): handler.unary_unary, (True, False): handler.stream_unary,
                    (False, True): handler.unary_stream, (True, True): handler.stream_stream}[(streaming_in, streaming_out)]

        async def checked(request_or_iterator, context, held: list[int]):
            """The request (stream) once parsing passed and it fits the budget; else the call is aborted."""
            if streaming_in:
                return _checked_stream(request_or_iterator, held, budget, method in CONSUMED_AS_THEY_ARRIVE)
            msg = request_or_iterator
            if isinstance(msg, _Sized):
                held[0], msg = msg.size, msg.msg
            if isinstance(msg, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, msg.message)
            if isinstance(msg, _OverBudget):
                context.set_trailing_metadata((("grpc-retry-pushback-ms", "1000"),))
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, msg.message)
            return msg

        async def guarded(request_or_iterator, context):
            held = [0]
            try:
                return await behavior(await checked(request_or_iterator, context, held), context)
            finally:
                if budget is not None:
                    budget.give(held[0])

        async def guarded_stream(request_or_iterator, context):  # reflection's method is an async generator
            held = [0]
            try:
                async for item in behavior(await checked(request_or_iterator, context, held), context):
                    yield item
            finally:
                if budget is not None:
                    budget.give(held[0])

        # a streaming response comes from an async generator (reflection) or from context.write (VerifyStream)
        fn = guarded_stream if streaming_out and inspect.isasyncgenfunction(behavior) else guarded
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(streaming_in, streaming_out)]
        return make(fn, request_deserializer=_safe(handler.request_deserializer, method, budget),
                    response_serializer=handler.response_serializer)
