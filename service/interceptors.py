"""The server interceptor every call passes: bearer-token check and safe request parsing.

- Authentication: with tokens configured, a call without a known bearer token answers
  UNAUTHENTICATED before its request is parsed (health checks excepted: probes carry no
  credentials). What a token may do on which collection is checked by the servicer.
- Parsing: a request that is not a valid protobuf message of its method answers
  INVALID_ARGUMENT with a plain message, instead of gRPC's UNKNOWN with library internals.
"""

from __future__ import annotations

import grpc

from service.auth import Authorizer, Unauthenticated
from service.errors import InvalidArgument

__all__ = ["RequestGuard", "OPEN_METHODS"]

OPEN_METHODS = ("/grpc.health.v1.Health/",)


class _Malformed:
    """What the wrapped deserializer returns for bytes that do not parse."""

    def __init__(self, method: str):
        self.message = f"request: the bytes are not a valid request message of {method.rsplit('/', 1)[-1]}"


def _safe(deserializer, method: str):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any parse failure is the client's malformed message
            return _Malformed(method)

    return parse


async def _checked_stream(iterator):
    async for msg in iterator:
        if isinstance(msg, _Malformed):
            raise InvalidArgument("request", msg.message.partition(": ")[2])
        yield msg


class RequestGuard(grpc.aio.ServerInterceptor):
    """See the module docstring. ``auth`` None: no authentication."""

    def __init__(self, auth: Authorizer | None):
        self.auth = auth

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_METHODS):
            return handler
        denied = None
        if self.auth is not None:
            try:
                self.auth.token_of(details.invocation_metadata)
            except Unauthenticated as e:
                denied = e.message
        return self._wrap(handler, details.method, denied)

    @staticmethod
    def _wrap(handler, method: str, denied: str | None):
        streaming_in, streaming_out = bool(handler.request_streaming), bool(handler.response_streaming)
        behavior = {(False, False): handler.unary_unary, (True, False): handler.stream_unary,
                    (False, True): handler.unary_stream, (True, True): handler.stream_stream}[(streaming_in, streaming_out)]

        async def checked(request_or_iterator, context):
            """The request (stream) once authentication and parsing passed; else the call is aborted."""
            if denied is not None:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"authorization: {denied}")
            if streaming_in:
                return _checked_stream(request_or_iterator)
            if isinstance(request_or_iterator, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request_or_iterator.message)
            return request_or_iterator

        async def guarded(request_or_iterator, context):
            return await behavior(await checked(request_or_iterator, context), context)

        async def guarded_stream(request_or_iterator, context):  # reflection's method is an async generator
            async for item in behavior(await checked(request_or_iterator, context), context):
                yield item

        fn = guarded_stream if streaming_out else guarded
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (True, False): grpc.stream_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(streaming_in, streaming_out)]
        return make(fn, request_deserializer=_safe(handler.request_deserializer, method),
                    response_serializer=handler.response_serializer)
