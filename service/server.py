"""The gRPC server: lifecycle, health, reflection, auth, metrics endpoint, graceful shutdown.

``SpeakerServer(config)`` is kept apart from ``serve(config)`` so tests start a real server on
port 0 inside their own event loop. Start-up binds the port at once with health NOT_SERVING,
then loads and warms up the models and opens the speaker store; only then does health turn
SERVING. SIGTERM/SIGINT: health goes NOT_SERVING (calls are still answered for
``shutdown_delay_seconds`` so load balancers can move away), then new calls are refused and
in-flight calls finish within ``grace_seconds``, the batchers drain and the store is snapshotted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from service.auth import Authorizer, load_tokens
from service.config import ConfigError, ServerConfig
from service.engine import Engine
from service.interceptors import ByteBudget, RequestGuard
from service.metrics import Metrics
from service.preflight import check_data_dir, read_tls
from service.reflection import enable_reflection
from service.servicer import SpeakerServicer
from service.store import StoreUnavailable
from service.store.keys import check_not_in_use
from service.tracing import TracingUnavailable

__all__ = ["SpeakerServer", "serve", "SERVICE_NAME"]

log = logging.getLogger("spkserve.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpeakerService"].full_name
STORE_HEALTH = "spkserve.store"  # SERVING while the speaker store accepts writes


def _check_port_free(host: str, port: int, option: str = "port", host_option: str = "host") -> None:
    """OSError naming the option when ``host:port`` cannot be bound (asked before gRPC, whose own failure
    prints a C-level log line and a traceback)."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"option '{host_option}': cannot resolve {host!r} ({e.strerror})") from None
    if port == 0:
        return
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as e:
            raise OSError(f"option '{option}': cannot listen on {host}:{port}: {e.strerror.lower()} "
                          "(another spkserve?)") from None


class SpeakerServer:
    """One spkserve server; ``await start()``, ``await wait_ready()``, ``await stop()``."""

    def __init__(self, config: ServerConfig, span_exporter=None):
        self.config = config
        self.metrics = Metrics()
        self.engine = Engine(config, self.metrics)
        self._span_exporter = span_exporter  # tests: an in-memory OpenTelemetry exporter instead of OTLP
        self.servicer = SpeakerServicer(self.engine)
        self.servicer.on_models_changed = self._model_health
        self._model_health_names: set[str] = set()
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        self._http = None  # uvicorn.Server of the HTTP/JSON API
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self._ready = asyncio.Event()
        self._load_task: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self.load_error: BaseException | None = None
        self.request_bytes = ByteBudget(config.max_inflight_request_mb << 20)  # held by calls in progress

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING until models are ready); returns the port."""
        cfg = self.config
        limit = cfg.max_message_mb * 1024 * 1024
        auth = None
        if cfg.auth_token or cfg.auth_tokens_file:
            try:
                tokens = load_tokens(cfg.auth_tokens_file) if cfg.auth_tokens_file else []
            except ValueError as e:
                raise ConfigError(f"option 'auth_tokens_file': {e}") from None
            auth = Authorizer(tokens, cfg.auth_token)
            log.info("authentication: %d tokens (%s)", len(auth.tokens), ", ".join(sorted(t.name for t in auth.tokens.values())))
        self.servicer.auth = auth
        if cfg.index_backend == "faiss":
            check_data_dir(Path(cfg.data_dir))
            check_not_in_use(Path(cfg.data_dir))  # before binding: a second server stops with one line
        _check_port_free(cfg.host, cfg.port)
        if cfg.http_port:
            _check_port_free(cfg.http_host or cfg.host, cfg.http_port, "http_port", "http_host" if cfg.http_host else "host")
        if cfg.metrics_port >= 0:
            _check_port_free(cfg.metrics_host, cfg.metrics_port, "metrics_port", "metrics_host")
        tls = read_tls(cfg.tls_key, cfg.tls_cert) if cfg.tls_cert else None
        if cfg.otlp_endpoint or self._span_exporter is not None:
            self.engine.tracing.start(cfg.otlp_endpoint, exporter=self._span_exporter)
        traced = self.engine.tracing.grpc_interceptor()
        self._server = grpc.aio.server(
            interceptors=([traced] if traced is not None else []) + [RequestGuard(auth, self.request_bytes)],
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                     ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_SpeakerServiceServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        enable_reflection((SERVICE_NAME, health.SERVICE_NAME), self._server)
        try:
            return await self._listen(tls)
        except BaseException:  # nothing left listening (or for the garbage collector to stop after the loop)
            await self._server.stop(0)
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
                self._metrics_http = None
            raise

    async def _listen(self, tls: tuple[bytes, bytes] | None) -> int:
        """Bind gRPC, then the metrics and HTTP endpoints, and start loading the models; returns the gRPC port."""
        cfg = self.config
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{cfg.host}:{cfg.port}"
        try:
            if tls is not None:
                self.port = self._server.add_secure_port(address, grpc.ssl_server_credentials([tls]))
            else:
                self.port = self._server.add_insecure_port(address)
        except RuntimeError:  # grpc: "Failed to bind to address ..."
            self.port = 0
        if self.port == 0:
            raise OSError(f"option 'port': cannot listen on {address}: the address is in use (another spkserve?) "
                          "or not available here")
        log.info("configuration: %s", json.dumps(self.config.redacted(), sort_keys=True))
        if self.servicer.auth is None and cfg.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("serving %s without authentication: every client that reaches this address can enroll, "
                        "identify and delete speakers%s; set auth_token or auth_tokens_file", cfg.host,
                        " and load or unload models (model_control = true)" if cfg.model_control else "")
        await self._server.start()
        if cfg.metrics_port >= 0:
            from prometheus_client import start_http_server

            self._metrics_http, _ = start_http_server(cfg.metrics_port, addr=cfg.metrics_host,
                                                      registry=self.metrics.registry)
            self.metrics_port = self._metrics_http.server_port
        if cfg.http_port:
            self.http_port = await self._start_http()
        log.info("listening on %s:%d (%s), HTTP on %s, metrics on %s", cfg.host, self.port,
                 "TLS" if cfg.tls_cert else "plaintext", self._http_address(),
                 f"{cfg.metrics_host}:{self.metrics_port}" if self.metrics_port is not None else "off")
        await self.health.set(STORE_HEALTH, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._load_task = asyncio.get_running_loop().create_task(self._load())
        return self.port

    def reload_tokens(self) -> bool:
        """Re-read ``auth_tokens_file`` (on SIGHUP): new, changed and removed tokens apply to the next call. A file
        that does not load keeps the tokens in use (logged). Returns whether the new file was taken."""
        cfg, auth = self.config, self.servicer.auth
        if not cfg.auth_tokens_file or auth is None:
            log.warning("token reload: no auth_tokens_file is configured; nothing to reload")
            return False
        try:
            tokens = load_tokens(cfg.auth_tokens_file)
        except ValueError as e:
            log.error("token reload: kept the %d tokens in use: %s", len(auth.tokens), e)
            self.metrics.token_reloads.labels("error").inc()
            return False
        auth.replace(tokens, cfg.auth_token)
        self.metrics.token_reloads.labels("ok").inc()
        log.info("token reload: %d tokens (%s)", len(auth.tokens), ", ".join(sorted(t.name for t in auth.tokens.values())))
        return True

    def _http_address(self) -> str:
        cfg = self.config
        return f"{cfg.http_host or cfg.host}:{self.http_port}" if self.http_port else "off"

    async def _start_http(self) -> int:
        """Serve the HTTP/JSON API (``service.http_api``) from this event loop; returns its port."""
        import uvicorn

        from service.http_api import build_app

        cfg = self.config
        host = cfg.http_host or cfg.host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, cfg.http_port))
        except OSError as e:
            sock.close()
            raise OSError(f"option 'http_port': cannot listen on {host}:{cfg.http_port}: {e.strerror.lower()}") from None
        sock.listen(2048)
        sock.setblocking(False)
        config = uvicorn.Config(self.engine.tracing.asgi(build_app(self)), log_config=None, access_log=False, lifespan="off",
                                ssl_certfile=cfg.tls_cert or None, ssl_keyfile=cfg.tls_key or None,
                                timeout_graceful_shutdown=cfg.grace_seconds, server_header=False)
        config.load()
        self._http = uvicorn.Server(config)
        self._http.lifespan = config.lifespan_class(config)
        await self._http.startup(sockets=[sock])
        return sock.getsockname()[1]

    async def _set_health(self, status) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _load(self) -> None:
        try:
            await self.engine.load()
        except asyncio.CancelledError as e:  # stopped (SIGTERM) while loading, e.g. waiting for the store
            self.load_error = e
            log.info("start-up cancelled: the server is stopping before it was ready")
            self._ready.set()
            raise
        except BaseException as e:  # noqa: BLE001 - reported by wait_ready and the log
            self.load_error = e
            log.error("start-up failed: %s", e)
            self._ready.set()
            return
        self.servicer.ready = True
        self.metrics.ready.set(1)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        for m in self.engine.models.values():
            log.info("serving model %s v%s (dim %d, %d Hz) on %s%s", m.name, m.card.version, m.dim, m.sample_rate,
                     m.provider, " [default]" if m.name == self.engine.default_model else "")
        cfg = self.config
        log.info("ready: gRPC on %s:%d (%s), HTTP on %s, metrics on %s, models %s (default %s)", cfg.host, self.port,
                 "TLS" if cfg.tls_cert else "plaintext", self._http_address(),
                 f"{cfg.metrics_host}:{self.metrics_port}" if self.metrics_port is not None else "off",
                 ", ".join(sorted(self.engine.models)), self.engine.default_model)
        await self._model_health()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch_store()), loop.create_task(self.engine.retention_loop())]
        self._ready.set()

    async def _model_health(self) -> None:
        """Health entries ``spkserve.model.<name>``: SERVING for loaded models, NOT_SERVING once unloaded."""
        loaded = {f"spkserve.model.{name}" for name in self.engine.models}
        for name in loaded:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for name in self._model_health_names - loaded:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._model_health_names |= loaded

    async def _watch_store(self) -> None:
        """Keep the store's health entry and gauge in step with whether it accepts writes."""
        last = None
        while True:
            state = self.engine.store.state()
            writable = self.engine.store.writable
            if writable != last:
                self.metrics.store_writable.set(int(writable))
                await self.health.set(STORE_HEALTH, health_pb2.HealthCheckResponse.SERVING if writable
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
                (log.info if writable else log.error)("speaker store: %s", state)
                last = writable
            await asyncio.sleep(1.0)

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until models are loaded; re-raise a start-up failure."""
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self.load_error is not None:
            raise self.load_error

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, finish in-flight calls, drain, flush the store."""
        grace = self.config.grace_seconds if grace is None else grace
        log.info("shutting down (grace %.1f s)", grace)
        self.metrics.ready.set(0)
        await self.health.enter_graceful_shutdown()
        if self.config.shutdown_delay_seconds > 0 and self.servicer.ready:
            await asyncio.sleep(self.config.shutdown_delay_seconds)
        stopping = [self._server.stop(grace)] if self._server is not None else []
        if self._http is not None:
            stopping.append(self._http.shutdown())
        await asyncio.gather(*stopping)
        self.servicer.ready = False
        if self._load_task is not None and not self._load_task.done():
            self._load_task.cancel()
            await asyncio.gather(self._load_task, return_exceptions=True)  # its own line before "stopped"
        for task in self._tasks:
            task.cancel()
        await self.engine.close()
        self.engine.tracing.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        log.info("stopped")

    async def wait_for_termination(self) -> None:
        """Block until the gRPC server has stopped."""
        await self._server.wait_for_termination()


async def serve(config: ServerConfig) -> int:
    """Run a server until SIGTERM or SIGINT; returns the process exit status."""
    server = SpeakerServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload_tokens)  # rotate tokens without a restart
    try:
        await server.start()
    except ConfigError as e:  # an option that only proves bad at start (a tokens file, the data directory)
        log.error("cannot start: %s", e)
        return 2
    except (OSError, StoreUnavailable, TracingUnavailable) as e:  # a busy port or data directory: one line
        log.error("cannot start: %s", e)
        return 1
    waiter = asyncio.ensure_future(stop.wait())
    ready = asyncio.ensure_future(server.wait_ready())
    done, _ = await asyncio.wait({waiter, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done and ready.exception() is not None:
        await server.stop(0)
        return 1
    await waiter
    await server.stop()
    return 0
