"""Request ids, access log (text and JSON), process and HTTP metrics, and the Grafana dashboard's
queries checked against what the server really exports."""

from __future__ import annotations

import json
import logging
import re
import urllib.request
from pathlib import Path

import grpc
import pytest

from tests.conftest import REFERENCE

ROOT = Path(__file__).resolve().parents[1]


def _metrics(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def test_request_id_is_returned_and_logged_with_an_access_line(server, stub, caplog):
    from service._proto.spkserve.v1 import speaker_pb2 as pb

    audio = pb.Audio(encoded=(REFERENCE / "audio" / "flite-slt-1.wav").read_bytes())
    with caplog.at_level(logging.INFO, logger="spkserve.access"):
        reply, call = stub.Embed.with_call(pb.EmbedRequest(audio=audio), metadata=[("x-request-id", "req-42")])
        _, generated = stub.ListModels.with_call(pb.ListModelsRequest())
        with pytest.raises(grpc.RpcError) as err:
            stub.GetSpeaker(pb.GetSpeakerRequest(collection="nobody", speaker_id="x"))
    assert dict(call.initial_metadata())["x-request-id"] == "req-42"
    assert re.fullmatch(r"[0-9a-f]{32}", dict(generated.initial_metadata())["x-request-id"])
    assert dict(err.value.initial_metadata())["x-request-id"]
    lines = [r for r in caplog.records if r.name == "spkserve.access"]
    embed = next(r for r in lines if r.request_id == "req-42")
    assert embed.method == "Embed" and embed.code == "OK" and embed.transport == "grpc" and embed.tenant == "-"
    assert embed.audio_seconds == pytest.approx(reply.speech.audio_seconds, abs=0.01) and embed.duration_ms > 0
    miss = next(r for r in lines if r.method == "GetSpeaker")
    assert miss.code == "NOT_FOUND" and "nobody" not in miss.getMessage()  # no collection or speaker ids in clear


def test_json_log_lines_carry_the_access_fields():
    from service.logs import JsonFormatter

    record = logging.LogRecord("spkserve.access", logging.INFO, __file__, 1, "Embed OK", (), None)
    record.request_id, record.duration_ms = "r1", 12.5
    out = json.loads(JsonFormatter().format(record))
    assert out["logger"] == "spkserve.access" and out["request_id"] == "r1" and out["duration_ms"] == 12.5
    assert out["level"] == "INFO" and out["message"] == "Embed OK" and out["ts"].endswith("Z")


def test_process_metrics_are_exported(server):
    text = _metrics(server)
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_objects_collected_total",
                 "spkserve_grpc_request_duration_seconds_bucket", "spkserve_batch_size_bucket"):
        assert f"\n{name}" in text, name
    import platform

    from service import package_version

    assert f'spkserve_build_info{{python="{platform.python_version()}",version="{package_version()}"}} 1.0' in text


def _exported_families(text: str) -> set[str]:
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_every_dashboard_query_names_an_exported_metric(server):
    dash = json.loads((ROOT / "deploy" / "grafana" / "spkserve.json").read_text())
    families = _exported_families(_metrics(server))
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(exprs) >= 15
    suffix = re.compile(r"_(bucket|sum|count)$")
    for expr in exprs:
        names = set(re.findall(r"\b((?:spkserve|process|python)_[a-z0-9_]+)", expr))
        assert names, expr
        for name in names:
            family = name if name in families else suffix.sub("", name)
            if family.endswith("_total") and family not in families:
                family = family[:-len("_total")]  # counters are typed without _total in the exposition
            assert family in families, f"{name} in {expr!r} is not exported"
