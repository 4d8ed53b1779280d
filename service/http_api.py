"""The HTTP/JSON API and web console, served beside gRPC from the same process, event loop and Engine.

Every ``/v1`` route is one RPC of ``spkserve.v1.SpeakerService``: the body (multipart audio
upload or proto3 JSON, ``service.http_forms``) becomes the RPC's request message and the
servicer's own method answers it (``service.http_context``), so tokens, scopes, admission,
limits, metrics and errors are exactly the gRPC ones. Responses are the RPC's response message
in proto3 JSON; errors are ``{"error": {"code", "message"}}`` with the mapped HTTP status
(``Retry-After`` on 429). A request without a valid bearer token is refused before its body is
read; a body over ``max_message_mb`` answers 413 as soon as it passes the limit.

Live verification is a WebSocket, ``/v1/verify:stream`` (``service.http_live``). Also: ``GET /health/live``
(the process answers), ``GET /health/ready`` (models loaded: 200, else 503), ``GET /openapi.json``, ``GET /docs``, the web console at ``GET /`` and the shipped sample clips
at ``GET /samples/NAME`` (``slt-1.wav``, ``slt-2.wav``: one voice; ``awb-1.wav``: another).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from importlib import resources

import grpc
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route as StarletteRoute
from starlette.routing import WebSocketRoute

from service import package_version
from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.errors import ServiceError, http_status, status_of
from service.http_context import ClientGone, HttpAbort, HttpCallContext, error_body
from service.http_forms import assign_field, attach_files, form_message, json_message, parse_error, read_body
from service.http_live import verify_stream_socket
from service.logs import access
from service.openapi import docs_page, openapi_document

__all__ = ["Route", "ROUTES", "build_app"]

SERVICE = pb.DESCRIPTOR.services_by_name["SpeakerService"]


@dataclass(frozen=True)
class Route:
    """One HTTP route: the RPC it calls, where its uploaded files and path parameters go."""

    method: str
    path: str
    rpc: str
    summary: str
    tag: str
    files: dict[str, str] = field(default_factory=dict)  # form file field -> dotted Audio field of the request
    path_fields: tuple[str, ...] = ()  # path parameters, each a field of the request of the same name
    stream: bool = False  # a client-streamed RPC: the body is the audio itself, its config in the query string


_SPEAKER = ("collection", "speaker_id")
ROUTES = (
    Route("POST", "/v1/embed", "Embed", "Embed one recording", "audio", {"audio": "audio"}),
    Route("POST", "/v1/verify", "Verify", "Are two recordings (or enrolled speakers) the same speaker?", "audio",
          {"a": "a.audio", "b": "b.audio"}),
    Route("POST", "/v1/diarize", "Diarize", "Who spoke when in one recording", "audio", {"audio": "audio"}),
    Route("POST", "/v1/embed:stream", "EmbedStream", "Embed a recording of any length, sent as the body", "audio",
          stream=True),
    Route("POST", "/v1/diarize:stream", "DiarizeStream", "Who spoke when in a recording of any length, sent as the body",
          "audio", stream=True),
    Route("POST", "/v1/collections/{collection}/speakers/{speaker_id}/enroll", "Enroll",
          "Enroll (or add recordings to) a speaker", "speakers", {"audio": "audio"}, _SPEAKER),
    Route("POST", "/v1/collections/{collection}/identify", "Identify", "Who in the collection is speaking?",
          "speakers", {"audio": "probe.audio"}, ("collection",)),
    Route("GET", "/v1/collections/{collection}/speakers/{speaker_id}", "GetSpeaker", "An enrolled speaker",
          "speakers", path_fields=_SPEAKER),
    Route("PATCH", "/v1/collections/{collection}/speakers/{speaker_id}", "UpdateSpeaker",
          "Change a speaker's metadata (metadata: set these keys; removeMetadataKeys: remove these)", "speakers",
          path_fields=_SPEAKER),
    Route("DELETE", "/v1/collections/{collection}/speakers/{speaker_id}", "DeleteSpeaker",
          "Delete a speaker (optOut=true: also refuse its id from now on)", "speakers", path_fields=_SPEAKER),
    Route("GET", "/v1/collections", "ListCollections", "The collections this token can see", "speakers"),
    Route("DELETE", "/v1/collections/{collection}", "DeleteCollection",
          "Delete a collection and its model binding (force=true: with the speakers it holds)", "speakers",
          path_fields=("collection",)),
    Route("GET", "/v1/collections/{collection}/speakers", "ListSpeakers", "Speakers of a collection, a page at a time",
          "speakers", path_fields=("collection",)),
    Route("GET", "/v1/models", "ListModels", "The models this server serves", "models"),
    Route("GET", "/v1/models/{name}", "GetModelInfo", "One served model", "models", path_fields=("name",)),
    Route("POST", "/v1/models/{model}:load", "LoadModel", "Load (or reload) a model of the repository (admin)", "models",
          path_fields=("model",)),
    Route("POST", "/v1/models/{model}:unload", "UnloadModel", "Stop serving a model (admin)", "models",
          path_fields=("model",)),
    Route("POST", "/v1/compare", "Compare", "Cosine scores between two lists of embeddings (JSON)", "audio"),
    Route("POST", "/v1/collections/{collection}:migrate", "MigrateCollection",
          "Re-embed a collection's speakers with another model into a new collection (admin)", "speakers",
          path_fields=("collection",)),
)


def _request_id(request: Request) -> str:
    rid = request.headers.get("x-request-id", "")
    return rid if 0 < len(rid) <= 128 and rid.isprintable() else uuid.uuid4().hex


def _timeout(request: Request) -> float | None:
    raw = request.headers.get("x-request-timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 3600:
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, f"x-request-timeout: must be seconds in (0, 3600], got {raw[:20]!r}")
    return value


async def _message(request: Request, route: Route, message, limit: int) -> int:
    """Fill the request message from the body (POST, PATCH) or query (GET, DELETE); returns the body size."""
    if route.method in ("GET", "DELETE"):
        _query_message(request.query_params, message)
        return 0
    body = await read_body(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            async with request.form(max_files=256, max_fields=256, max_part_size=limit) as form:
                form_message(form, message, route.files)
                await attach_files(form, message, route.files)
        except HttpAbort:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed multipart body (python-multipart, starlette)
            raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT, f"body: not a valid multipart form ({e})") from None
    elif ctype in ("application/json", ""):
        json_message(body, message)
    else:
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"content-type: must be multipart/form-data or application/json, got {ctype[:60]!r}")
    return len(body)


def _query_message(query, message):
    """Fill ``message`` from a query string (``?pageSize=10&pageToken=...``) and return it; 400 naming the field."""
    data: dict = {}
    for key, value in query.multi_items():
        assign_field(data, message.DESCRIPTOR, key, value)
    try:
        json_format.ParseDict(data, message)
    except json_format.ParseError as e:
        raise parse_error(e, "query") from None
    return message


_STREAM_PIECE = 1 << 20  # body bytes per stream message (max_stream_messages counts messages)


def _streamed(request: Request, request_type, ctx: HttpCallContext):
    """The messages of a client-streamed RPC from an HTTP request: its config from the query string (checked now,
    so that a bad one answers 400 before the body is read), then the body in 1 MiB chunks as it arrives."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype in ("multipart/form-data", "application/json"):  # (curl --data-binary's default, urlencoded, is taken)
        raise HttpAbort(grpc.StatusCode.INVALID_ARGUMENT,
                        f"content-type: this route takes the audio file itself as the body (audio/*, "
                        f"application/octet-stream), its options in the query string; got {ctype!r}")
    limit = request.app.state.server.config.max_stream_mb << 20
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:  # refused before a byte of it is read
        too_large = HttpAbort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"request body: {int(declared):,} bytes is more "
                              f"than max_stream_mb ({limit >> 20} MiB) allows one stream")
        too_large.status = 413
        raise too_large
    config = request_type.DESCRIPTOR.fields_by_name["config"].message_type
    first = request_type(config=_query_message(request.query_params, getattr(pb, config.name)()))

    async def messages():
        yield first
        piece = bytearray()
        try:
            async for chunk in request.stream():
                piece += chunk
                if len(piece) >= _STREAM_PIECE:
                    yield request_type(chunk=bytes(piece))
                    piece.clear()
        except ClientDisconnect:
            ctx.client_gone = True
            raise ClientGone() from None
        if piece:
            yield request_type(chunk=bytes(piece))

    return messages()


def _endpoint(route: Route):
    request_type = getattr(pb, SERVICE.methods_by_name[route.rpc].input_type.name)

    async def call(request: Request) -> Response:
        server = request.app.state.server
        rid = _request_id(request)
        metadata = [("x-request-id", rid)]
        if "authorization" in request.headers:
            metadata.append(("authorization", request.headers["authorization"]))
        t0, status, held, code = time.perf_counter(), 200, 0, None  # code: an error answered before the RPC ran
        ctx = None
        try:
            servicer = server.servicer
            if servicer.auth is not None:  # before the body is read
                servicer.auth.token_of(metadata)
            ctx = HttpCallContext(metadata, _timeout(request))
            if route.stream:  # the upload streams into the RPC as it arrives (spooled there, up to max_stream_mb)
                messages = _streamed(request, request_type, ctx)
                code = "reached"
                reply = await getattr(servicer, route.rpc)(messages, ctx)
                return JSONResponse(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True),
                                    headers={"x-request-id": rid})
            message = request_type()
            size = await _message(request, route, message, server.config.max_message_mb << 20)
            if not server.request_bytes.take(size):
                raise HttpAbort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"request: its {size:,} bytes would take the requests in progress past "
                                f"max_inflight_request_mb ({server.config.max_inflight_request_mb} MiB); retry shortly", 1.0)
            held = size
            for name in route.path_fields:
                setattr(message, name, request.path_params[name])
            code = "reached"  # from here the RPC's own wrapper logs the call
            reply = await getattr(servicer, route.rpc)(message, ctx)
            return JSONResponse(json_format.MessageToDict(reply, always_print_fields_with_no_presence=True),
                                headers={"x-request-id": rid})
        except asyncio.CancelledError:
            if ctx is None or not ctx.client_gone:  # the server's own cancellation (shutdown): not ours to end
                raise
            status = 499  # the uploader went away mid-body: nobody reads an answer
            return Response(status_code=499)
        except HttpAbort as e:
            status, code = e.status, (code or e.code.name)
            return JSONResponse(error_body(e.code, e.message), status_code=e.status,
                                headers={**e.headers(), "x-request-id": rid})
        except ServiceError as e:  # raised before the servicer (authentication)
            grpc_code, text = status_of(e)
            status, code = http_status(grpc_code), grpc_code.name
            if code == "UNAUTHENTICATED":
                text = f"authorization: {text}"
            return JSONResponse(error_body(code, text), status_code=status, headers={"x-request-id": rid})
        finally:
            if held:
                server.request_bytes.give(held)
            elapsed = time.perf_counter() - t0
            server.metrics.http_requests.labels(route.rpc, str(status)).inc()
            server.metrics.http_latency.labels(route.rpc).observe(elapsed)
            if code not in (None, "reached") and server.config.access_log:
                access(route.rpc, code, elapsed, 0.0, "-", rid, "http")

    call.__name__ = route.rpc
    return call


def _console() -> str:
    return resources.files("service").joinpath("static/console.html").read_text(encoding="utf-8")


def build_app(server) -> Starlette:
    """The Starlette app of one ``SpeakerServer`` (its config, servicer, byte budget)."""
    doc = openapi_document(ROUTES, SERVICE, package_version())
    docs, console = docs_page(doc), _console()

    async def live(_request: Request) -> Response:
        return JSONResponse({"status": "SERVING"})

    async def ready(request: Request) -> Response:
        ok = request.app.state.server.servicer.ready
        return JSONResponse({"status": "SERVING" if ok else "NOT_SERVING"}, status_code=200 if ok else 503)

    async def openapi(_request: Request) -> Response:
        return JSONResponse(doc)

    async def docs_route(_request: Request) -> Response:
        return HTMLResponse(docs)

    async def console_route(_request: Request) -> Response:
        return HTMLResponse(console)

    samples = resources.files("service").joinpath("static/samples")
    sample_names = sorted(p.name for p in samples.iterdir() if p.name.endswith(".wav"))

    async def sample(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in sample_names:  # only the shipped files: no paths
            return JSONResponse(error_body("NOT_FOUND", f"name: no sample {name[:60]!r}; samples: {sample_names}"),
                                status_code=404)
        return Response(samples.joinpath(name).read_bytes(), media_type="audio/wav")

    async def not_found(request: Request, _exc) -> Response:
        return JSONResponse(error_body("NOT_FOUND", f"path: no route {request.method} {request.url.path}"),
                            status_code=404, headers={"x-request-id": _request_id(request)})

    async def not_allowed(request: Request, _exc) -> Response:
        return JSONResponse(error_body("UNIMPLEMENTED", f"method: {request.method} is not allowed on {request.url.path}"),
                            status_code=405, headers={"x-request-id": _request_id(request)})

    routes = [StarletteRoute(r.path, _endpoint(r), methods=[r.method]) for r in ROUTES]
    routes.append(WebSocketRoute("/v1/verify:stream", verify_stream_socket))  # VerifyStream (service.http_live)
    routes += [StarletteRoute("/health/live", live, methods=["GET"]),
               StarletteRoute("/health/ready", ready, methods=["GET"]),
               StarletteRoute("/openapi.json", openapi, methods=["GET"]),
               StarletteRoute("/docs", docs_route, methods=["GET"]),
               StarletteRoute("/samples/{name}", sample, methods=["GET"]),
               StarletteRoute("/", console_route, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})
    app.state.server = server
    return app
