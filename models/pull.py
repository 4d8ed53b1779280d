"""``spkserve pull``: a catalogued community model, downloaded, imported, checked and calibrated in one command.

    spkserve pull --list
    spkserve pull NAME [--repository DIR] [--from FILE_OR_URL] [--real POOL] [--corpus CORPUS] [--no-calibrate]

Steps, each of which stops the command with a message naming what failed:

1. **Fetch** (``models.download``): the catalogue's URL(s), or ``--from`` a local file or mirror,
   into the download cache (``$SPKSERVE_CACHE``, default ``~/.cache/spkserve``), resumable, with
   a progress bar; size and sha256 must match the catalogue. Hugging Face entries go through
   ``huggingface_hub`` at the pinned revision (``HF_HOME``, ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``
   are honoured; ``--from`` a local snapshot directory works offline).
2. **Import**: fbank-input graphs get the Kaldi fbank front end inside the graph without torch
   (``models.import_onnx``), checked against kaldi-native-fbank + the original graph on the shipped
   reference audio (cosine >= 0.999); Hugging Face x-vector checkpoints are exported with the
   SSL export path (``models.export xvector``: needs the torch extras), checked torch vs ONNX Runtime.
3. **Calibrate**: cohort and score map fitted on the real-speech pool (``--real``, default
   ``<cache>/real-speech``, built from Debian's archive on first use by
   ``python -m training.data.realspeech``) and the channel mix (``training.evaluation.calibrate``,
   run as its own process: this module stays free of torch and of ``training``).
4. **Install**: everything is built in ``<repository>/.pull/<name>`` (hidden: servers never load
   it) and renamed to ``<repository>/<name>`` only when every step passed; a failure removes it.
   ``model.json`` records the licence, the source and its sha256, the parity and the measured Cllr.

A model whose licence does not permit commercial use is pulled with a warning and marked so in
its model.json: a server loading "every model" skips it, and serves it only when named in
``models``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from models.catalog import CatalogEntry, CatalogError, load_catalog
from models.download import DownloadError, fetch_file

__all__ = ["PullError", "pull", "catalog_rows", "main", "cache_dir"]

ROOT = Path(__file__).resolve().parents[1]
# utterances per real calibration speaker a pull calibrates on (--thorough: all of them): a ResNet34-size
# model embeds each one under 12 channel conditions; on 2 cores the whole pool took over 25 minutes,
# 8 per speaker 7.2 minutes (bench/bench_pull.py)
QUICK_PER_SPEAKER = 5


class PullError(RuntimeError):
    """A pull that cannot finish; the message names the step and what to do."""


def cache_dir() -> Path:
    """Where downloads and the real-speech pool are kept (``$SPKSERVE_CACHE`` or ``~/.cache/spkserve``)."""
    return Path(os.environ.get("SPKSERVE_CACHE") or Path.home() / ".cache" / "spkserve")


def catalog_rows(catalog: dict[str, CatalogEntry]) -> list[dict]:
    """The catalogue as ``pull --list`` prints it."""
    return [{"name": e.name, "license": e.license, "commercial_use": e.commercial_use, "format": e.format,
             "embedding_dim": e.embedding_dim, "published_eer": e.published_eer, "test_set": e.published_test_set,
             "source": e.source, "description": e.description} for e in catalog.values()]


def _run(cmd: list[str], step: str, log: Callable[[str], None]) -> None:
    """Run a job of this repository as its own process; PullError with its last lines when it fails."""
    log(f"{step}: {' '.join(cmd[1:])}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise PullError(f"{step} failed (exit {proc.returncode}):\n{tail}")


def _fetch(entry: CatalogEntry, source: str | None, cache: Path, log) -> Path:
    """The model file (fbank-onnx) or snapshot directory (hf-xvector), downloaded and checked."""
    if entry.format == "hf-xvector":
        if source:
            path = Path(source)
            if not (path / "config.json").is_file():
                raise PullError(f"--from {source}: not a Hugging Face snapshot directory (no config.json)")
            return path
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise PullError("Hugging Face models need huggingface_hub: pip install 'spkserve[train]'") from None
        try:
            return Path(snapshot_download(entry.repo_id, revision=entry.revision,
                                          allow_patterns=["config.json", "preprocessor_config.json", "*.bin",
                                                          "*.safetensors"]))
        except Exception as e:  # noqa: BLE001 - offline, not cached, unknown repo: say which
            raise PullError(f"{entry.repo_id}@{entry.revision[:8]}: {type(e).__name__}: {str(e).splitlines()[0][:300]}"
                            " (offline: set HF_HUB_OFFLINE=1 with the snapshot in HF_HOME, or pull --from a snapshot "
                            "directory)") from None
    sources = [source] if source else entry.urls
    dest = cache / "downloads" / entry.name / Path(entry.urls[0].split("?")[0]).name.replace("%2B", "+")
    errors = []
    for src in sources:
        try:
            return fetch_file(src, dest, entry.sha256, entry.size, log=log)
        except DownloadError as e:
            errors.append(str(e))
    raise PullError("download failed: " + "; ".join(errors))


def _real_pool(real: Path | None, cache: Path, log) -> Path:
    if real is not None:
        if not (real / "calibration" / "trials").is_file():
            raise PullError(f"--real {real}: not a real-speech pool (no calibration/trials; build one with "
                            "python -m training.data.realspeech --out DIR)")
        return real
    pool = cache / "real-speech"
    if not (pool / "calibration" / "trials").is_file():
        log(f"building the real-speech pool in {pool} from Debian's archive (once; a few minutes)")
        _run([sys.executable, "-m", "training.data.realspeech", "--out", str(pool), "--cache", str(cache / "debian")],
             "real-speech pool", log)
    return pool


def pull(name: str, repository: Path, *, source: str | None = None, catalog: dict[str, CatalogEntry] | None = None,
         cache: Path | None = None, real: Path | None = None, corpus: Path | None = None, calibrate: bool = True,
         max_per_speaker: int = QUICK_PER_SPEAKER, force: bool = False,
         log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> dict:
    """Fetch, import, check and calibrate catalogued model ``name`` into ``repository/name``; returns what was measured."""
    catalog = load_catalog() if catalog is None else catalog
    if name not in catalog:
        raise PullError(f"unknown model {name!r}; catalogued: {sorted(catalog)} (spkserve pull --list)")
    entry = catalog[name]
    repository, cache = Path(repository), Path(cache) if cache else cache_dir()
    final, staging = repository / name, repository / ".pull" / name  # the artifact's directory carries its name
    if (final / "model.json").exists() and not force:
        raise PullError(f"{final} already holds a model; pass --force to replace it")
    if calibrate and importlib.util.find_spec("training") is None:
        raise PullError("calibration runs the repository's training jobs: run spkserve pull from a checkout, "
                        "or pass --no-calibrate")
    if not entry.commercial_use:
        log(f"warning: {name}'s licence ({entry.license}) does not permit commercial use; servers load it only "
            "when it is named in the 'models' option")
    t0, timings = time.monotonic(), {}
    fetched = _fetch(entry, source, cache, log)
    timings["fetch_s"] = round(time.monotonic() - t0, 1)
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    try:
        t = time.monotonic()
        if entry.format == "fbank-onnx":
            from models.import_onnx import ImportError_, import_fbank_model

            try:
                parity = import_fbank_model(fetched, staging, name=name, num_bins=entry.num_bins,
                                            sample_rate=entry.sample_rate, cmn=entry.cmn, license=entry.license,
                                            commercial_use=entry.commercial_use, description=entry.description,
                                            family=f"{name} (fbank ONNX)", force=True)
            except ImportError_ as e:
                raise PullError(f"import failed: {e}") from None
            except ImportError as e:  # onnx / kaldi-native-fbank missing
                raise PullError(f"import needs {e.name or 'onnx'}: pip install -e '.[pull]'") from None
        else:
            flag = "--commercial-use" if entry.commercial_use else "--no-commercial-use"
            _run([sys.executable, "-m", "models.export", "xvector", "--pretrained", str(fetched), "--out", str(staging),
                  "--license", entry.license, flag, "--description", entry.description, "--no-int8", "--force"],
                 "export (torch -> ONNX, parity checked)", log)
            parity = json.loads((staging / "model.json").read_text()).get("evaluation", {}).get("parity", {})
        timings["import_s"] = round(time.monotonic() - t, 1)
        card = json.loads((staging / "model.json").read_text())
        if card.get("embedding_dim") != entry.embedding_dim:
            raise PullError(f"the model embeds in {card.get('embedding_dim')} dimensions, the catalogue says "
                            f"{entry.embedding_dim}: wrong file or wrong entry")
        measured = None
        if calibrate:
            t = time.monotonic()
            pool = _real_pool(real, cache, log)
            report = staging.with_name(staging.name + ".calibration.json")
            cmd = [sys.executable, "-m", "training.evaluation.calibrate", "--model-dir", str(staging), "--real", str(pool),
                   "--report", str(report), "--max-per-speaker", str(max_per_speaker)]
            if corpus is not None:
                cmd += ["--corpus", str(corpus)]
            _run(cmd, "calibration on the real-speech pool", log)
            fitted = json.loads(report.read_text())["calibration_trials"]
            report.unlink(missing_ok=True)
            measured = {"cllr": round(fitted["cllr"], 4), "min_cllr": round(fitted["min_cllr"], 4),
                        "utterances_per_speaker": max_per_speaker or "all",
                        "measured_on": "real-speech pool, calibration speakers, on the trials the map was fitted to"}
            timings["calibrate_s"] = round(time.monotonic() - t, 1)
        card = json.loads((staging / "model.json").read_text())
        card["source"] = entry.source if not source else f"{source} (catalogued as {entry.source})"
        card["evaluation"] = {**card.get("evaluation", {}), "pull": {
            "catalog_entry": name, "sha256": entry.sha256 or None, "revision": entry.revision or None,
            "published_eer": entry.published_eer, "published_test_set": entry.published_test_set,
            "published_setting": entry.published_setting, "real_speech_calibration": measured}}
        (staging / "model.json").write_text(json.dumps(card, indent=2) + "\n")
        if final.exists():
            old = repository / f".old-{name}"
            shutil.rmtree(old, ignore_errors=True)
            final.replace(old)
            staging.replace(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.replace(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        staging.with_name(staging.name + ".calibration.json").unlink(missing_ok=True)
        raise
    finally:
        try:
            staging.parent.rmdir()  # only when no other pull is under way
        except OSError:
            pass
    timings["total_s"] = round(time.monotonic() - t0, 1)
    return {"model": name, "dir": str(final), "license": entry.license, "commercial_use": entry.commercial_use,
            "source": card["source"], "parity": parity, "calibration": measured, "published_eer": entry.published_eer,
            "published_test_set": entry.published_test_set, "timings": timings,
            "next": f"spkserve load-model {name}   (on a running server with model control)"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``pull`` verb's options (shared by ``spkserve pull`` and ``python -m models.pull``)."""
    p.add_argument("name", nargs="?", metavar="NAME", help="a catalogued model (see --list)")
    p.add_argument("--list", action="store_true", help="show the catalogue with licences and published accuracy")
    p.add_argument("--repository", type=Path, default=ROOT / "models" / "repository", help="model repository directory")
    p.add_argument("--from", dest="source", help="a local file, file:// or http(s) mirror of the model file "
                                                  "(checked against the catalogue), or a Hugging Face snapshot directory")
    p.add_argument("--real", type=Path, help="the real-speech pool to calibrate on (default: <cache>/real-speech)")
    p.add_argument("--corpus", type=Path, help="also the synthetic corpus' channel mix (training.data.corpus)")
    p.add_argument("--no-calibrate", action="store_true", help="import and check only (cosine threshold, no LLR)")
    p.add_argument("--thorough", action="store_true", help=f"calibrate on every utterance of the pool's calibration "
                                                            f"speakers (default: {QUICK_PER_SPEAKER} each; slower)")
    p.add_argument("--force", action="store_true", help="replace a model of the same name")
    p.add_argument("--catalog", type=Path, help="another catalogue file (a private mirror's)")


def run(args: argparse.Namespace) -> int:
    """Run the verb; returns the exit status (prints JSON on stdout, progress on stderr)."""
    try:
        catalog = load_catalog(args.catalog)
        if args.list:
            for row in catalog_rows(catalog):
                print(json.dumps(row))
            return 0
        if not args.name:
            print("spkserve pull: give a model NAME, or --list", file=sys.stderr)
            return 2
        out = pull(args.name, args.repository, source=args.source, catalog=catalog, real=args.real, corpus=args.corpus,
                   calibrate=not args.no_calibrate, max_per_speaker=0 if args.thorough else QUICK_PER_SPEAKER,
                   force=args.force)
    except (PullError, CatalogError) as e:
        print(f"spkserve pull: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m models.pull``: the same as ``spkserve pull``."""
    ap = argparse.ArgumentParser(prog="spkserve pull", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
