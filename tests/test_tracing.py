"""OpenTelemetry tracing: a server span per call (gRPC and HTTP) with decode, VAD, queue, inference
and store children, exported to an in-memory exporter; off by default."""

from __future__ import annotations


import pytest

pytest.importorskip("opentelemetry.sdk")
pytest.importorskip("opentelemetry.instrumentation.grpc")

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402

from tests.conftest import REFERENCE, ServerThread, free_port, make_config  # noqa: E402


def _settled(exporter, ready, timeout: float = 10.0):
    """The finished spans once ``ready(spans)`` holds: a server span ends just after its response is
    sent, so the client can see the answer a moment before the span is exported."""
    import time

    end = time.monotonic() + timeout
    while not ready(exporter.get_finished_spans()) and time.monotonic() < end:
        time.sleep(0.05)
    return exporter.get_finished_spans()


def test_a_call_is_one_trace_with_a_span_per_stage(model_repo, tmp_path):
    import grpc
    import requests

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    http_port = free_port()
    exporter = InMemorySpanExporter()
    srv = ServerThread(make_config(model_repo, tmp_path / "d", http_port=http_port), span_exporter=exporter)
    try:
        audio = (REFERENCE / "audio" / "flite-slt-1.wav").read_bytes()
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SpeakerServiceStub(ch)
            stub.Enroll(pb.EnrollRequest(collection="t", speaker_id="slt", audio=[pb.Audio(encoded=audio)]))
        spans = _settled(exporter, lambda sp: any(s.name.endswith("SpeakerService/Enroll") for s in sp))
        root = next(s for s in spans if s.name.endswith("SpeakerService/Enroll"))
        children = {s.name for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
        assert {"decode", "vad", "queue", "inference", "store"} <= children, children
        assert all(s.context.trace_id == root.context.trace_id for s in spans
                   if s.parent is not None and s.parent.span_id == root.context.span_id)
        by_name = {s.name: s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id}
        assert by_name["decode"].end_time <= by_name["vad"].start_time + 1000  # laid end to start
        assert by_name["queue"].end_time <= by_name["inference"].start_time + 1000
        assert by_name["inference"].attributes["batch_size"] >= 1
        exporter.clear()
        r = requests.post(f"http://127.0.0.1:{srv.server.http_port}/v1/embed", files={"audio": ("a.wav", audio)},
                          timeout=60)
        assert r.status_code == 200
        http_spans = _settled(exporter, lambda sp: any(s.parent is None for s in sp))
        server_span = next(s for s in http_spans if s.parent is None)
        assert "/v1/embed" in server_span.name
        assert {"decode", "inference"} <= {s.name for s in http_spans if s.context.trace_id == server_span.context.trace_id}
    finally:
        srv.stop()


def test_tracing_is_off_unless_configured(server):
    assert not server.server.engine.tracing.on
    assert server.server.engine.tracing.record("x", 0.1) > 0  # a no-op that still returns the start
