"""The documentation: the README stays short and its links resolve, the configuration reference is
what the code generates, the docs site builds with no warnings, and the README's first request
runs as written against a real server."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links and all((ROOT / link).exists() for link in links), [x for x in links if not (ROOT / x).exists()]
    assert "../shared" not in text and "issue" not in text.lower()


def test_configuration_reference_is_generated_from_the_code():
    from service.config import ServerConfig
    from service.config_doc import render

    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == render(), "docs/configuration.md is stale: .venv/bin/python -m service.config_doc > docs/configuration.md"
    import dataclasses

    for f in dataclasses.fields(ServerConfig):
        assert f"| `{f.name}` |" in page


def test_docs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (the test extra has it)")
    proc = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()


def _bash_blocks(section: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    part = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", part, flags=re.S)


def test_the_readmes_first_request_runs_as_written(model_repo, tmp_path):
    """The shell lines of "A first request", with the test server's ports, give the answers the
    README shows (same voice accepted, the other voice rejected, the enrolled speaker identified)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    from tests.test_lifecycle import Proc

    srv = Proc(model_repo, tmp_path / "data")
    try:
        env = {**os.environ, "SPKSERVE_TARGET": srv.target, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        outputs = []
        for block in _bash_blocks("A first request"):
            script = block.replace("localhost:8080", f"127.0.0.1:{srv.http_port}").replace(".venv/bin/spkserve",
                                                                                           "spkserve")
            proc = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-3000:]
            outputs += [line for line in proc.stdout.splitlines() if line.strip()]
        objs, decoder = [], json.JSONDecoder()  # curl prints no newline after a body: objects may share a line
        for line in outputs:
            at = 0
            while line.startswith("{", at):
                obj, at = decoder.raw_decode(line, at)
                objs.append(obj)
        verified = [o for o in objs if "decision_scale" in o]  # the CLI's verify lines
        assert [o["verdict"] for o in verified] == ["ACCEPT", "REJECT"]
        shown = re.findall(r'spkserve verify \S+ \S+ +# \{"score": ([-\d.]+), "verdict": "\w+", "llr": ([-\d.]+)',
                           "".join(_bash_blocks("A first request")))
        assert len(shown) == 2, "README's verify lines no longer show a score and an llr"
        for got, (score, llr) in zip(verified, shown):  # the figures the README shows, to its precision
            assert got["score"] == pytest.approx(float(score), abs=0.01) and got["llr"] == pytest.approx(float(llr), abs=0.05)
        enrolled = [o["status"] for o in objs if "status" in o]
        assert enrolled == ["NEEDS_MORE_SPEECH", "ENROLLMENT_STATUS_READY"]
        assert next(o for o in objs if "speech_seconds" in o and "status" in o)["speech_seconds"] == pytest.approx(2.77, abs=0.01)
        assert next(o for o in objs if "isMatch" in o)["isMatch"] is False
        rttm = [line for line in outputs if line.startswith("SPEAKER b 1 ")]
        assert rttm and all(line.split()[7] == "SPEAKER_00" for line in rttm)
    finally:
        srv.term()
