"""Publishing a finished pretraining run: its encoder copied out with ``provenance.json``.

The provenance records what supervision went into the encoder (following the chain of runs it
continues), the command, the run's config and summary, the code's git commit and the SHA-256 of
the corpus manifest, so a checkpoint in ``models/checkpoints`` says how it was made.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

__all__ = ["publish"]


def _encoder_kind(cfg: dict, summary: dict) -> str:
    """What supervision went into an encoder, following the chain of runs it continues."""
    while True:
        if cfg.get("distill_weight", 0) > 0:
            return "SSL-pretrained encoder, further trained with GE2E speaker-teacher distillation (no corpus labels)"
        prev = summary.get("init_run") or {}
        if not prev.get("config"):
            return "SSL-pretrained encoder (no speaker supervision)"
        cfg, summary = prev["config"], prev.get("summary", {})


def publish(run: str | Path, dest: str | Path, command: str) -> Path:
    """Copy a finished run's encoder to ``dest`` with ``provenance.json``: the run's config and summary,
    the command that made it, the code's git commit and the corpus manifest's SHA-256."""
    run, dest = Path(run), Path(dest)
    if not (run / "encoder" / "config.json").is_file():
        raise FileNotFoundError(f"{run / 'encoder'}: no finished encoder in this run")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(run / "encoder", dest)
    cfg = json.loads((run / "config.json").read_text())
    manifest = Path(cfg["corpus"]) / "manifest.json"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    summary = json.loads((run / "summary.json").read_text())
    prov = {"kind": _encoder_kind(cfg, summary), "command": command, "config": cfg, "summary": summary,
            "code_commit": commit or None,
            "corpus_manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None}
    (dest / "provenance.json").write_text(json.dumps(prov, indent=1) + "\n")
    return dest
