"""The API follows the ecosystem's tools: buf lint, buf breaking against the released API, promtool."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest

from service._proto.spkserve.v1 import speaker_pb2 as pb
from tests.conftest import ROOT

BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
PROMTOOL = ROOT / ".tools" / "bin" / "promtool"


def _tool(path):
    found = path if path.exists() else shutil.which(path.name)
    if not found:
        pytest.skip(f"{path.name} is not installed (bash scripts/install_tools.sh)")
    return str(found)


def test_buf_lint_and_breaking_pass():
    r = subprocess.run(["bash", "scripts/check_api.sh"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 2 and "buf not found" in r.stderr:
        pytest.skip(r.stderr)
    assert r.returncode == 0, r.stdout + r.stderr


def test_buf_breaking_catches_a_removed_field(tmp_path):
    buf = _tool(BUF)
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")  # its own workspace
    proto = tmp_path / "protos" / "spkserve" / "v1" / "speaker.proto"
    text = proto.read_text()
    assert "  string model_version = 3;\n" in text
    proto.write_text(text.replace("  string model_version = 3;\n", ""))
    r = subprocess.run([buf, "breaking", "protos", "--against", str(ROOT / "api-baseline")],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode != 0 and "model_version" in r.stdout + r.stderr


def test_metrics_pass_promtool(server, stub, speech_files):
    promtool = _tool(PROMTOOL)
    stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())))
    stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())))
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
        text = r.read()
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()
