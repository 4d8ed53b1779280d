"""``spkserve pull``: the catalogue, downloads from a local HTTP server (resume, checksum, 404, truncation),
import + parity + calibration into the repository, a local Hugging Face cache, licences, nothing half-written."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from models.catalog import CatalogError, load_catalog
from models.download import DownloadError, fetch_file
from models.pull import PullError, pull
from tests.test_import_onnx import export


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``files``; honours Range. ``cut``: the next response of a path stops there (a dropped line);
    ``cut_at``: every response stops at that byte of the file."""

    files: dict[str, bytes] = {}
    cut: dict[str, int] = {}
    cut_at: dict[str, int] = {}
    ranges: list[str] = []

    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):
        if self.path.startswith("http://"):  # asked as a proxy: the request line holds the whole URL
            self.ranges.append("proxied " + self.path)
            self.path = "/" + self.path.split("/", 3)[3]
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        if rng := self.headers.get("Range"):
            self.ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
        body = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        limit = self.cut.pop(self.path, None)
        if self.path in self.cut_at:
            limit = max(0, self.cut_at[self.path] - start)
        self.wfile.write(body[:limit] if limit is not None else body)


@pytest.fixture(scope="module")
def http_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", _Handler
    server.shutdown()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory) -> bytes:
    """A small fbank-input speaker graph (WeSpeaker's signature: feats -> embs, 192-d)."""
    return export(tmp_path_factory.mktemp("tiny"), "feats", "embs").read_bytes()


def _catalog(tmp_path: Path, url: str, data: bytes, name: str = "tiny", **over) -> Path:
    entry = dict(description="tiny test model", format="fbank-onnx", urls=[url], sha256=hashlib.sha256(data).hexdigest(),
                 size=len(data), license="Apache-2.0", commercial_use=True, num_bins=80, sample_rate=16000, cmn=True,
                 embedding_dim=192, published_eer=1.0, published_test_set="none (test)", published_setting="test")
    entry.update(over)
    lines = [f"[{name}]"] + [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    path = tmp_path / "catalog.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shipped_catalogue_is_complete():
    cat = load_catalog()
    assert {"wespeaker-resnet34-lm", "wespeaker-ecapa512-lm", "wespeaker-campplus", "wavlm-base-plus-sv"} <= set(cat)
    for e in cat.values():
        assert e.license and isinstance(e.commercial_use, bool) and e.embedding_dim > 0
        assert (e.sha256 and e.size and e.urls) or (e.repo_id and len(e.revision) == 40)


@pytest.mark.parametrize("damage,match", [
    (dict(sha256="abc"), "sha256 must be 64"), (dict(format="zip"), "format 'zip'"), (dict(size=0), "size must be"),
    (dict(colour="red"), "unknown key 'colour'"), (dict(commercial_use="yes"), "commercial_use = 'yes' is not a bool"),
])
def test_bad_catalogue_entries_are_named(tmp_path, damage, match):
    path = _catalog(tmp_path, "http://x/y.onnx", b"x", **damage)
    with pytest.raises(CatalogError, match=match) as e:
        load_catalog(path)
    assert "[tiny]" in str(e.value)


def test_pull_downloads_imports_and_calibrates(http_server, tiny_onnx, tmp_path, mini_real, monkeypatch, capsys):
    from models.runtime import SpeakerModel
    from service.cli import main

    base, handler = http_server
    handler.files["/m/tiny.onnx"] = tiny_onnx
    handler.cut["/m/tiny.onnx"] = len(tiny_onnx) // 3  # the first connection drops: the download resumes
    handler.ranges.clear()
    monkeypatch.setenv("SPKSERVE_CACHE", str(tmp_path / "cache"))
    catalog = _catalog(tmp_path, f"{base}/m/tiny.onnx", tiny_onnx)
    repo = tmp_path / "repo"
    code = main(["pull", "tiny", "--repository", str(repo), "--catalog", str(catalog), "--real", str(mini_real)])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads(out.out)
    assert handler.ranges == [f"bytes={len(tiny_onnx) // 3}-"]
    assert report["parity"]["min_cosine"] >= 0.999 and report["calibration"]["cllr"] > 0
    assert report["timings"]["total_s"] >= report["timings"]["fetch_s"]
    card = json.loads((repo / "tiny" / "model.json").read_text())
    assert card["license"] == "Apache-2.0" and card["commercial_use"] is True
    assert card["evaluation"]["pull"]["sha256"] == hashlib.sha256(tiny_onnx).hexdigest()
    assert card["evaluation"]["pull"]["real_speech_calibration"]["cllr"] == report["calibration"]["cllr"]
    assert card["calibration"] is not None and (repo / "tiny" / "cohort.npy").is_file()
    assert sorted(p.name for p in repo.iterdir()) == ["tiny"]  # no staging left
    model = SpeakerModel(repo / "tiny")
    assert model.scorer.calibration is not None and model.card.embedding_dim == 192
    # pulled again: the download is not repeated, and an existing model needs --force
    assert main(["pull", "tiny", "--repository", str(repo), "--catalog", str(catalog), "--no-calibrate"]) == 1
    assert "already holds a model; pass --force" in capsys.readouterr().err
    assert main(["pull", "tiny", "--repository", str(repo), "--catalog", str(catalog), "--no-calibrate", "--force"]) == 0
    assert "already downloaded and checked" in capsys.readouterr().err


def test_pull_from_a_local_file_offline(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("SPKSERVE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "mirror.onnx"
    src.write_bytes(tiny_onnx)
    catalog = load_catalog(_catalog(tmp_path, "https://unreachable.invalid/tiny.onnx", tiny_onnx))
    out = pull("tiny", tmp_path / "repo", source=str(src), catalog=catalog, calibrate=False, log=lambda m: None)
    assert out["calibration"] is None and "mirror.onnx" in out["source"]
    assert (tmp_path / "repo" / "tiny" / "model.onnx").is_file()


@pytest.mark.parametrize("case", ["checksum", "truncated", "404", "unknown", "not-onnx"])
def test_bad_downloads_leave_nothing_behind(http_server, tiny_onnx, tmp_path, monkeypatch, case):
    base, handler = http_server
    monkeypatch.setenv("SPKSERVE_CACHE", str(tmp_path / "cache"))
    data, served, name = tiny_onnx, tiny_onnx, "tiny"
    if case == "checksum":
        served = tiny_onnx[:-4] + b"\x00\x00\x00\x00"  # same size, other bytes
    elif case == "not-onnx":
        data = served = b"this is not a model" * 100
    handler.files[f"/{case}/tiny.onnx"] = served
    if case == "truncated":
        handler.cut_at[f"/{case}/tiny.onnx"] = 1000  # every connection drops at byte 1000
    url = f"{base}/{case}/tiny.onnx" if case != "404" else f"{base}/missing/tiny.onnx"
    catalog = load_catalog(_catalog(tmp_path, url, data))
    repo = tmp_path / "repo"
    expected = {"checksum": "sha256 .* does not match", "truncated": "bytes kept in", "404": "HTTP 404",
                "unknown": "unknown model 'nope'", "not-onnx": "import failed: --onnx .*not a readable ONNX model"}[case]
    with pytest.raises(PullError, match=expected):
        pull("nope" if case == "unknown" else name, repo, catalog=catalog, calibrate=False, log=lambda m: None)
    assert not repo.exists() or list(repo.iterdir()) == []  # nothing half-written in the repository
    if case == "checksum":
        assert not list((tmp_path / "cache").rglob("*.onnx*"))  # the bad file is gone too


def test_downloads_go_through_the_configured_proxy(http_server, tiny_onnx, tmp_path, monkeypatch):
    base, handler = http_server
    handler.files["/p/tiny.onnx"] = tiny_onnx
    handler.ranges.clear()
    monkeypatch.setenv("HTTP_PROXY", base)  # the test server answers as the proxy
    monkeypatch.setenv("http_proxy", base)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    got = fetch_file("http://models.example.invalid/p/tiny.onnx", tmp_path / "tiny.onnx",
                     hashlib.sha256(tiny_onnx).hexdigest(), len(tiny_onnx), log=lambda m: None)
    assert got.read_bytes() == tiny_onnx and handler.ranges == ["proxied http://models.example.invalid/p/tiny.onnx"]


def test_fetch_file_resume_and_size(http_server, tmp_path):
    base, handler = http_server
    data = bytes(range(256)) * 4000
    handler.files["/r/blob"] = data
    part = tmp_path / "blob.part"
    part.write_bytes(data[:5000])  # an earlier, interrupted run
    handler.ranges.clear()
    got = fetch_file(f"{base}/r/blob", tmp_path / "blob", hashlib.sha256(data).hexdigest(), len(data), log=lambda m: None)
    assert got.read_bytes() == data and handler.ranges == ["bytes=5000-"] and not part.exists()
    with pytest.raises(DownloadError, match="the catalogue says"):
        fetch_file(f"{base}/r/blob", tmp_path / "b2", None, len(data) + 1, retries=0, log=lambda m: None)


def test_missing_import_extras_are_named(tiny_onnx, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("SPKSERVE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "onnx", None)  # as where the pull extras are not installed
    src = tmp_path / "m.onnx"
    src.write_bytes(tiny_onnx)
    catalog = load_catalog(_catalog(tmp_path, "https://unreachable.invalid/m.onnx", tiny_onnx))
    with pytest.raises(PullError, match=r"import needs onnx: pip install -e '\.\[pull\]'"):
        pull("tiny", tmp_path / "repo", source=str(src), catalog=catalog, calibrate=False, log=lambda m: None)
    assert not (tmp_path / "repo" / "tiny").exists()


def test_noncommercial_model_is_pulled_with_a_warning_and_served_only_when_named(tiny_onnx, tmp_path, monkeypatch):
    from models.artifact import ArtifactError
    from service.config import load_config
    from service.model_setup import select_models

    monkeypatch.setenv("SPKSERVE_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "nc.onnx"
    src.write_bytes(tiny_onnx)
    catalog = load_catalog(_catalog(tmp_path, "https://unreachable.invalid/nc.onnx", tiny_onnx, name="nc",
                                    license="CC-BY-NC-4.0", commercial_use=False))
    said = []
    pull("nc", tmp_path / "repo", source=str(src), catalog=catalog, calibrate=False, log=said.append)
    assert any("does not permit commercial use" in m for m in said)
    assert json.loads((tmp_path / "repo" / "nc" / "model.json").read_text())["commercial_use"] is False
    with pytest.raises(ArtifactError, match="no model directories"):  # "every model" skips it: none left
        select_models(load_config(env={}, overrides=dict(model_repository=str(tmp_path / "repo"))))
    named = load_config(env={}, overrides=dict(model_repository=str(tmp_path / "repo"), models=["nc"]))
    assert [d.name for d in select_models(named)] == ["nc"]


def test_hugging_face_snapshot_from_a_local_cache(tmp_path):
    """A WavLMForXVector checkpoint laid out as huggingface_hub's cache, pulled offline (HF_HOME, HF_HUB_OFFLINE
    are read by the library when the process starts: the command runs as its own process) and exported."""
    import os
    import subprocess
    import sys

    import torch
    from transformers import WavLMConfig, WavLMForXVector

    from tests.conftest import ROOT

    torch.manual_seed(0)
    cfg = WavLMConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      conv_dim=(16,) * 7, num_buckets=16, max_bucket_distance=50, num_conv_pos_embeddings=16,
                      num_conv_pos_embedding_groups=2, tdnn_dim=(16, 16, 16, 16, 32), xvector_output_dim=24)
    rev = "a" * 40
    snap = tmp_path / "hf" / "hub" / "models--org--tiny-sv" / "snapshots" / rev
    WavLMForXVector(cfg).eval().save_pretrained(snap, safe_serialization=True)
    (snap.parents[1] / "refs").mkdir(parents=True)
    (snap.parents[1] / "refs" / "main").write_text(rev)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text("".join(f'''[{name}]
description = "tiny"
format = "hf-xvector"
repo_id = "{repo}"
revision = "{rev}"
license = "MIT"
commercial_use = true
sample_rate = 16000
embedding_dim = 24
''' for name, repo in (("tiny-sv", "org/tiny-sv"), ("gone", "org/not-cached"))))
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "SPKSERVE_CACHE": str(tmp_path / "cache")}

    def run(name):
        return subprocess.run([sys.executable, "-m", "models.pull", name, "--catalog", str(catalog), "--repository",
                               str(tmp_path / "repo"), "--no-calibrate"], cwd=ROOT, env=env, capture_output=True, text=True)

    done = run("tiny-sv")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    card = json.loads((tmp_path / "repo" / "tiny-sv" / "model.json").read_text())
    assert card["family"] == "wavlm-xvector" and card["embedding_dim"] == 24 and out["source"] == f"huggingface:org/tiny-sv@{rev}"
    assert out["parity"]["min_cosine"] >= 0.999
    missing = run("gone")
    assert missing.returncode == 1 and "org/not-cached" in missing.stderr
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["tiny-sv"]


def test_readme_lists_every_catalogued_model_with_its_published_figure():
    from tests.conftest import ROOT

    text = (ROOT / "README.md").read_text()
    for e in load_catalog().values():
        row = next((ln for ln in text.splitlines() if ln.startswith(f"| `{e.name}`")), None)
        assert row is not None, e.name
        assert (f"{e.published_eer:g}%" in row) if e.published_eer is not None else "none published" in row
