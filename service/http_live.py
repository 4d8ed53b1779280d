"""Live verification over a WebSocket: ``/v1/verify:stream``, the HTTP face of ``VerifyStream``.

Browsers cannot open a bidirectional gRPC stream; a WebSocket carries the same conversation.
The client sends, in order:

1. one text message, the ``VerifyStreamConfig`` as proto3 JSON (``{"reference": {"speaker":
   {"collection": "c", "speakerId": "alice"}}, "pcm": {"sampleRate": 16000, "encoding": "PCM_S16LE"}}``);
2. binary messages, the audio chunks (raw PCM as configured, or a WAV stream);
3. the text message ``{"end": true}`` when the audio is over (the half-close).

The server answers each result as a text message, ``VerifyStreamResponse`` in proto3 JSON, the
last with ``"final": true``, then closes the socket normally (1000). An error is one text message
``{"error": {"code", "message"}}`` and a close with code 4000 + the HTTP status of the gRPC code
(4400 invalid argument, 4401 unauthenticated, 4403, 4404, 4409 failed precondition, 4429, 4503,
4504 deadline exceeded, e.g. nothing sent for ``stream_idle_timeout_seconds``). The token comes
from the ``Authorization: Bearer`` header, or, for browsers, which cannot set it on a WebSocket,
from the query parameter ``access_token`` (RFC 6750; keep such URLs out of logs).
Tokens, scopes, limits, metrics and the access log are ``VerifyStream``'s own.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

import grpc
from google.protobuf import json_format
from starlette.websockets import WebSocket, WebSocketDisconnect

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.errors import InvalidArgument, ServiceError, http_status, status_of
from service.http_context import ClientGone, HttpAbort, HttpCallContext, error_body
from service.http_forms import json_message

__all__ = ["verify_stream_socket"]



class SocketCallContext(HttpCallContext):
    """An ``HttpCallContext`` whose server-stream writes go to the WebSocket as proto3-JSON text messages."""

    def __init__(self, metadata: list[tuple[str, str]], websocket: WebSocket):
        super().__init__(metadata)
        self._ws = websocket

    async def write(self, message) -> None:
        """Send one response message; ``ClientGone`` (a cancellation) when the client has closed the socket."""
        text = json.dumps(json_format.MessageToDict(message, always_print_fields_with_no_presence=True))
        try:
            await self._ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError):  # closed under us: the call is over for this client
            self.client_gone = True
            raise ClientGone() from None


async def _messages(ws: WebSocket, ctx: SocketCallContext):
    """The ``VerifyStreamRequest`` messages of a socket: its config (text), chunks (binary) up to ``{"end": true}``."""
    index = 0
    while True:
        event = await ws.receive()
        if event["type"] == "websocket.disconnect":
            ctx.client_gone = True
            raise ClientGone()
        text, data = event.get("text"), event.get("bytes")
        if index == 0:
            if text is None:
                raise InvalidArgument("config", "the first message must be the config as JSON text")
            yield pb.VerifyStreamRequest(config=_config(text))
        elif data is not None:
            yield pb.VerifyStreamRequest(chunk=data)
        elif _is_end(text):
            return
        else:
            raise InvalidArgument("chunk", f"message {index}: after the config send audio as binary messages, "
                                           "and {\"end\": true} as text when it is over")
        index += 1


class _BadMessage(ServiceError):
    """A socket message the API refuses (its message already names the field)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


def _config(text: str) -> pb.VerifyStreamConfig:
    """The first text message as a ``VerifyStreamConfig`` (proto3 JSON), checked as the HTTP routes check bodies."""
    try:
        return json_message(text, pb.VerifyStreamConfig(), "config")
    except HttpAbort as e:
        raise _BadMessage(e.message) from None


def _is_end(text: str | None) -> bool:
    try:
        return json.loads(text or "") == {"end": True}
    except json.JSONDecodeError:
        return False


async def verify_stream_socket(ws: WebSocket) -> None:
    """Serve one live verification on a WebSocket (see the module docstring)."""
    server = ws.app.state.server
    rid = ws.headers.get("x-request-id", "")
    rid = rid if 0 < len(rid) <= 128 and rid.isprintable() else uuid.uuid4().hex
    metadata = [("x-request-id", rid)]
    token = ws.headers.get("authorization") or (f"Bearer {ws.query_params['access_token']}"
                                                 if "access_token" in ws.query_params else None)
    if token:
        metadata.append(("authorization", token))
    await ws.accept(headers=[(b"x-request-id", rid.encode())])
    t0, status = time.perf_counter(), 200
    ctx = SocketCallContext(metadata, ws)
    try:
        servicer = server.servicer
        if servicer.auth is not None:  # before any message is read
            servicer.auth.token_of(metadata)
        await servicer.VerifyStream(_messages(ws, ctx), ctx)
        try:
            await ws.close(1000)
        except (RuntimeError, WebSocketDisconnect, OSError):  # the client left after the final result: done
            pass
    except asyncio.CancelledError:
        if not ctx.client_gone:  # the server's own cancellation (shutdown): not ours to end
            raise
        status = 499
    except (HttpAbort, ServiceError) as e:
        if isinstance(e, HttpAbort):
            code, text, status = e.code, e.message, e.status
        else:
            code, text = status_of(e)
            status = http_status(code)
            text = f"authorization: {text}" if code == grpc.StatusCode.UNAUTHENTICATED else text
        try:
            await ws.send_text(json.dumps(error_body(code, text)))
            await ws.close(4000 + status)
        except (RuntimeError, WebSocketDisconnect):  # the client is already gone
            pass
    finally:
        server.metrics.http_requests.labels("VerifyStream", str(status)).inc()
        server.metrics.http_latency.labels("VerifyStream").observe(time.perf_counter() - t0)
