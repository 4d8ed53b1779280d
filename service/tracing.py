"""OpenTelemetry tracing, on when ``otlp_endpoint`` is set (the ``otel`` extra installs the libraries).

Each call gets a server span from the official instrumentations (``opentelemetry-instrumentation-
grpc``'s aio server interceptor, ``-asgi``'s middleware for the HTTP API), with child spans for
the stages of the request: ``decode`` and ``vad`` (on the decode pool), ``queue`` and ``inference``
(in the batcher, shared with the other members of the batch) and ``store`` (speaker-store calls).
Stage spans are recorded from the timings the engine measures anyway, so tracing adds no work to
the hot path when it is off (every function here returns at once).

The tracer provider belongs to the server (not the process-global one), so several servers in
one process (tests) keep their spans apart.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any

__all__ = ["Tracing", "TracingUnavailable"]


class TracingUnavailable(RuntimeError):
    """``otlp_endpoint`` is set but the OpenTelemetry libraries are not installed."""


class Tracing:
    """The tracing of one server: no-ops until ``start`` configures a provider."""

    def __init__(self) -> None:
        self.provider = None
        self._tracer = None

    @property
    def on(self) -> bool:
        """Whether spans are being recorded."""
        return self._tracer is not None

    def start(self, endpoint: str = "", service_name: str = "spkserve", exporter: Any = None) -> None:
        """Export spans to the OTLP/gRPC collector at ``endpoint`` (or to ``exporter``, e.g. an in-memory one).

        Raises:
            TracingUnavailable: the OpenTelemetry SDK or exporter is not installed.
        """
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError:
            raise TracingUnavailable("option 'otlp_endpoint': OpenTelemetry is not installed; "
                                     "pip install 'spkserve[otel]'") from None
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:
            try:
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
            except ImportError:
                raise TracingUnavailable("option 'otlp_endpoint': the OTLP exporter is not installed; "
                                         "pip install 'spkserve[otel]'") from None
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint,
                                                                            insecure=endpoint.startswith("http://"))))
        else:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.provider = provider
        self._tracer = provider.get_tracer("spkserve")

    def grpc_interceptor(self):
        """The server interceptor that opens a span per gRPC call (None when tracing is off)."""
        if not self.on:
            return None
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return aio_server_interceptor(tracer_provider=self.provider)

    def asgi(self, app):
        """``app`` wrapped so each HTTP request opens a span (``app`` itself when tracing is off)."""
        if not self.on:
            return app
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        return OpenTelemetryMiddleware(app, tracer_provider=self.provider)

    def record(self, name: str, seconds: float, end_ns: int | None = None, **attributes: Any) -> int:
        """A finished child span of the current span, ``seconds`` long, ending at ``end_ns`` (now);
        returns its start (ns), so stages can be laid end to start."""
        end = time.time_ns() if end_ns is None else end_ns
        start = end - int(max(seconds, 0.0) * 1e9)
        if self._tracer is not None:
            span = self._tracer.start_span(name, start_time=start, attributes=attributes)
            span.end(end_time=end)
        return start

    @contextmanager
    def span(self, name: str, **attributes: Any):
        """A live child span of the current span around a block."""
        if self._tracer is None:
            yield
            return
        with self._tracer.start_as_current_span(name, attributes=attributes):
            yield

    def stop(self) -> None:
        """Flush and close the exporter."""
        if self.provider is not None:
            self.provider.shutdown()
            self.provider, self._tracer = None, None
