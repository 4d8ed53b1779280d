"""The compression experiment: does protecting speaker neurons make FFN pruning keep speaker accuracy?

    .venv/bin/python -m training.experiment --out DIR                       # the published protocol
    .venv/bin/python -m training.experiment --out DIR --protocol finetuned  # the fine-tuned-model protocol
    torchrun --nproc-per-node 2 -m training.experiment --out DIR ...        # statistics/features sharded
    .venv/bin/python -m training.experiment --out DIR --gate-only [--downstream-condition telephone]
                                                    # is this testbed able to show anything? (minutes)

Every row is labelled with its ``protocol``:
- ``superb`` (default, the published one; ``training.experiment.superb``): the SSL-pretrained upstream
  (a ``save_pretrained`` directory; default the committed ``models/checkpoints/ssl-distilled``, the
  first testbed here whose FFNs carry speaker information, see training/README.md) is pruned, and for each
  pruned upstream a fresh SUPERB-style downstream is trained per head seed on its frozen features:
  identification accuracy on held-out utterances of the training speakers, verification
  EER/minDCF on the unseen evaluation speakers. Methods: unpruned, all_ffn (every FFN neuron
  removed), random, baseline (norm-only), protected, shuffled_protect; speaker neurons identified
  on several calibration draws.
- ``ssl_stage`` (run inside the superb job at ``ssl_stage_ratios``; ``training.experiment.ssl_stage``): the
  pruned upstream first continues its own pretraining objective for a fixed budget.
- ``finetuned`` (``--protocol finetuned``, ``training.experiment.finetuned``): prune a speaker-fine-tuned
  model and score it with its own head (optionally after a short distillation).

The design is declared in the config before the run (``primary_protocol``, ``primary_ratio``,
``metric``, ``sesoi``) and ``summary.json`` (``training.experiment.summary``) gives the verdict: ``benefit``,
``no_benefit`` or ``inconclusive``.

Bad input stops before the long work with a message that says what to change: a checkpoint that
is not an SSL encoder, a corpus without enough speakers, a seed count below what the gate needs,
ratios outside [0, 1). Under ``torchrun`` every rank computes (sharded statistics and features,
DDP heads) and only rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from training.common import load_split
from training.compression.protection import load_speaker_model, speaker_neuron_sets
from training.compression.prune import PruneError
from training.data.corpus import read_scp
from training.distributed import finish, init, is_main
from training.experiment.stats import HIGHER_IS_BETTER, GateError

__all__ = ["ExperimentConfig", "Calibration", "check_config", "run_experiment", "speaker_neuron_sets",
           "load_speaker_model", "main"]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINTS = {"superb": ROOT / "models" / "checkpoints" / "ssl-distilled",
                       "finetuned": ROOT / "models" / "checkpoints" / "ssl-sv-small.pt"}


@dataclass
class ExperimentConfig:
    """Every parameter of the experiment (saved to config.json)."""

    out: str
    protocol: str = "superb"  # superb | finetuned
    checkpoint: str | None = None  # None: the protocol's committed default
    corpus: str = str(ROOT / "corpus")
    ratios: list[float] = field(default_factory=lambda: [0.9, 0.97])
    k_ssl: int = 3
    k_ivec: int = 2
    ssl_layer: int = -1  # hidden state used for SSL clusters; -1: the middle one
    sigma: float = 0.8
    top_fraction: float = 0.01
    calib_utts: int = 200
    ubm_components: int = 64
    ivector_rank: int = 100
    seed: int = 0
    # superb protocol: the declared design (primary comparison, smallest effect of interest)
    primary_protocol: str = "superb"  # superb | ssl_stage: whose protected-minus-baseline decides the verdict
    primary_ratio: float = 0.9
    sesoi: float = 1.0  # points of the metric (training/README.md: about the paper's effect scaled to this testbed)
    seeds: int = 16  # head seeds per upstream
    calibration_draws: int = 3  # neuron identification on this many different calibration subsets
    random_seeds: int = 3  # random-pruning draws (each with every head seed)
    permutations: int = 50  # label permutations for the speaker-neuron count's null distribution
    ivector_utts: int = 0  # utterances training the i-vector extractor (0: the whole training split)
    ssl_stage_ratios: list[float] = field(default_factory=lambda: [0.9])  # [] skips the SSL-stage protocol
    ssl_stage_steps: int = 150
    ssl_stage_head_steps: int = 200
    ssl_stage_lr: float = 1e-4
    ssl_stage_utts: int = 2000
    metric: str = "sid_acc"
    gate_factor: float = 5.0  # the attempts table's older gate (headroom >= factor x unpruned seed SD)
    utts_per_speaker: int = 8
    crop_seconds: float = 3.0
    held_out: float = 0.25
    min_speakers: int = 4
    head_epochs: int = 40
    save_upstreams: bool = False  # superb: write the most-pruned upstreams to out/upstreams/*.pt
    gate_only: bool = False  # superb: stop after the controls and the gate (a cheap check of a testbed)
    downstream_condition: str | None = None  # superb: a training.data.channels condition applied to the downstream's audio
    device: str = "auto"  # auto (a GPU when there is one) | cpu | cuda | cuda:N
    # finetuned protocol
    scope: str = "layer"
    variant: str = "once"  # once | recompute
    recovery: list[bool] = field(default_factory=lambda: [False, True])
    recovery_steps: int = 60
    recovery_batch: int = 16
    recovery_lr: float = 1e-4
    eval_max_utts: int | None = None


@dataclass
class Calibration:
    """The calibration utterances the neuron statistics read."""

    utts: list[str]
    waves: list[np.ndarray]
    utt2spk: dict[str, str]


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def check_config(cfg: ExperimentConfig) -> None:
    """Refuse a configuration that cannot give a result, before any work.

    Raises:
        ValueError, PruneError, GateError: with a message that names the option to change.
    """
    if cfg.protocol not in DEFAULT_CHECKPOINTS:
        raise ValueError(f"protocol must be one of {sorted(DEFAULT_CHECKPOINTS)}, got {cfg.protocol!r}")
    if not cfg.ratios:
        raise PruneError("ratios is empty; give at least one pruning ratio in [0, 1)")
    for r in cfg.ratios:
        if not 0 <= r < 1:
            raise PruneError(f"ratio {r} is outside [0, 1); 1 would remove every neuron (the all_ffn control does that)")
    if cfg.variant not in ("once", "recompute"):
        raise ValueError(f"variant must be 'once' or 'recompute', got {cfg.variant!r}")
    if cfg.protocol == "superb":
        if cfg.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {cfg.seeds}; use --seeds 5")
        if cfg.seeds < 2:
            raise GateError(f"--seeds {cfg.seeds}: the sensitivity gate needs the seed-to-seed spread, so at least 2 seeds")
        if cfg.random_seeds < 0:
            raise ValueError(f"random_seeds must be >= 0, got {cfg.random_seeds}")
        if cfg.metric not in HIGHER_IS_BETTER:
            raise GateError(f"metric must be one of {sorted(HIGHER_IS_BETTER)}, got {cfg.metric!r}")
        if not cfg.gate_factor > 0:
            raise GateError(f"gate_factor must be positive, got {cfg.gate_factor}")
        if not 0 < cfg.held_out < 1:
            raise ValueError(f"held_out must be in (0, 1), got {cfg.held_out}")
        _device(cfg.device)
        if cfg.downstream_condition is not None:
            from training.data.channels import CONDITIONS

            if cfg.downstream_condition not in CONDITIONS:
                raise ValueError(f"downstream_condition {cfg.downstream_condition!r} is not a condition; "
                                 f"use one of {sorted(CONDITIONS)}")
        if not cfg.sesoi > 0:
            raise GateError(f"sesoi must be positive (points of {cfg.metric}), got {cfg.sesoi}")
        if cfg.primary_protocol not in ("superb", "ssl_stage"):
            raise ValueError(f"primary_protocol must be 'superb' or 'ssl_stage', got {cfg.primary_protocol!r}")
        if not cfg.gate_only:
            if cfg.primary_ratio not in cfg.ratios:
                raise ValueError(f"primary_ratio {cfg.primary_ratio} is not in ratios {cfg.ratios}")
            if cfg.primary_protocol == "ssl_stage" and cfg.primary_ratio not in cfg.ssl_stage_ratios:
                raise ValueError(f"primary_ratio {cfg.primary_ratio} is not in ssl_stage_ratios {cfg.ssl_stage_ratios}")
            extra = sorted(set(cfg.ssl_stage_ratios) - set(cfg.ratios))
            if extra:
                raise ValueError(f"ssl_stage_ratios {extra} are not in ratios {cfg.ratios}: every SSL-stage ratio is "
                                 "also run under the published protocol")
        for name in ("calibration_draws", "permutations", "ssl_stage_steps"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(cfg, name)}")
        if cfg.utts_per_speaker < 2:
            raise ValueError(f"utts_per_speaker must be at least 2 (one to train, one held out), got {cfg.utts_per_speaker}")


def _check_checkpoint(cfg: ExperimentConfig) -> Path:
    """The checkpoint path, checked to be what the protocol prunes."""
    path = Path(cfg.checkpoint) if cfg.checkpoint else DEFAULT_CHECKPOINTS[cfg.protocol]
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if cfg.protocol == "superb":
        if path.is_file():
            raise ValueError(f"checkpoint {path} is a file (a speaker model's {{state_dict, config}}); the published "
                             "protocol prunes an SSL-pretrained encoder: pass its save_pretrained directory, or use "
                             "--protocol finetuned for a fine-tuned speaker model")
        cfg_json = path / "config.json"
        if not cfg_json.is_file():
            raise ValueError(f"checkpoint {path} has no config.json: not a save_pretrained SSL encoder directory")
        model_type = json.loads(cfg_json.read_text()).get("model_type")
        if model_type not in ("wavlm", "hubert", "wav2vec2"):
            raise ValueError(f"checkpoint {path}: model_type {model_type!r} is not an SSL speech encoder "
                             "(wavlm, hubert or wav2vec2)")
    return path


def _corpus(cfg: ExperimentConfig) -> Path:
    """The corpus, built (with the TTS voices installed when running as root) if it is missing."""
    corpus = Path(cfg.corpus)
    if not (corpus / "eval" / "trials").exists():
        from training.data.corpus import build_corpus, discover_voices

        if len({v.speaker for v in discover_voices()}) < 2 and os.geteuid() == 0 and shutil.which("apt-get"):
            _log("no TTS voices installed: running scripts/install_voices.sh (Debian packages)")
            subprocess.run(["bash", str(ROOT / "scripts" / "install_voices.sh")], check=True)
        _log(f"building the corpus at {corpus} (training.data.corpus, about 6 minutes)")
        build_corpus(corpus, "full")
    return corpus


def _calibration(cfg: ExperimentConfig, corpus: Path, draw: int = 0) -> Calibration:
    """Calibration draw ``draw``: ``calib_utts`` training utterances sampled with seed ``seed + draw``."""
    rng = np.random.default_rng(cfg.seed + draw)
    all_utts = sorted(read_scp(corpus / "train" / "wav.scp")) if (corpus / "train" / "wav.scp").is_file() else []
    pick = sorted(rng.choice(all_utts, min(cfg.calib_utts, len(all_utts)), replace=False)) if all_utts else None
    utts, waves, utt2spk = load_split(corpus, "train", pick, progress=False)
    short = [u for u, w in zip(utts, waves) if len(w) < 16000 * 0.5]
    if short:
        raise ValueError(f"{len(short)} calibration utterances are shorter than 0.5 s (e.g. {short[0]}): too short "
                         "to yield frames")
    if len(waves) < max(cfg.k_ivec, 2):
        raise ValueError(f"{len(waves)} calibration utterances cannot make {cfg.k_ivec} i-vector clusters; raise "
                         "--calib-utts or lower --k-ivec")
    return Calibration(utts, waves, utt2spk)


def _device(name: str) -> torch.device:
    """The device the superb protocol runs on; under torchrun each rank takes its LOCAL_RANK's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is visible to torch; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None


def run_experiment(cfg: ExperimentConfig) -> list[dict]:
    """Check, then run the configured protocol; returns the result rows (also written to ``cfg.out``)."""
    check_config(cfg)
    path = _check_checkpoint(cfg)
    init()
    out = Path(cfg.out)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps({**asdict(cfg), "checkpoint": str(path)}, indent=1) + "\n")
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    _log(f"stage 0: {cfg.protocol} protocol on {path}")
    model, ckpt = load_speaker_model(path)
    if cfg.protocol == "superb":
        model.to(_device(cfg.device))
        provenance = path / "provenance.json"
        ckpt = {"checkpoint": str(path), **(json.loads(provenance.read_text()) if provenance.is_file() else {})}
    corpus = _corpus(cfg)
    calib = _calibration(cfg, corpus)
    if cfg.protocol == "superb":
        from training.experiment.superb import load_downstream_data, run_superb

        load_downstream_data(corpus, cfg.utts_per_speaker, cfg.crop_seconds, cfg.min_speakers, cfg.seed,
                             load=False)  # check first
        return run_superb(cfg, model, ckpt, lambda d: calib if d == 0 else _calibration(cfg, corpus, d), t0)[0]
    from training.experiment.finetuned import run_finetuned

    return run_finetuned(cfg, model, ckpt, calib, t0)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--protocol", choices=tuple(DEFAULT_CHECKPOINTS))
    ap.add_argument("--checkpoint")
    ap.add_argument("--metric", choices=tuple(HIGHER_IS_BETTER))
    ap.add_argument("--device", help="auto (default: a GPU when there is one), cpu, cuda or cuda:N")
    ap.add_argument("--corpus")
    ap.add_argument("--ratios", type=float, nargs="+")
    ap.add_argument("--ssl-stage-ratios", type=float, nargs="*", help="superb: ratios also run under the SSL-stage "
                                                                      "protocol (none: skip it)")
    ap.add_argument("--primary-protocol", choices=("superb", "ssl_stage"))
    ap.add_argument("--scope", choices=("layer", "global"))
    ap.add_argument("--variant", choices=("once", "recompute"))
    ap.add_argument("--no-recovery", action="store_true")
    ap.add_argument("--save-upstreams", action="store_true", help="superb: keep the most-pruned upstreams as .pt")
    ap.add_argument("--gate-only", action="store_true", help="superb: stop after the controls and the sensitivity gate")
    ap.add_argument("--downstream-condition", help="superb: pass the downstream's audio through this channel "
                                                   "(training.data.channels: telephone, gsm, amr, opus, mp3, noise, reverb...)")
    for f in ("k_ssl", "k_ivec", "ssl_layer", "calib_utts", "recovery_steps", "eval_max_utts", "seed", "ubm_components",
              "ivector_rank", "seeds", "random_seeds", "utts_per_speaker", "min_speakers", "head_epochs",
              "calibration_draws", "permutations", "ivector_utts", "ssl_stage_steps", "ssl_stage_head_steps",
              "ssl_stage_utts"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    for f in ("sigma", "gate_factor", "crop_seconds", "held_out", "top_fraction", "sesoi", "primary_ratio",
              "ssl_stage_lr"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=float)
    args = ap.parse_args(argv)
    flags = ("save_upstreams", "gate_only")
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("no_recovery", *flags)}
    given.update({k: getattr(args, k) for k in flags})
    if args.no_recovery:
        given["recovery"] = [False]
    ok = False
    try:
        run_experiment(ExperimentConfig(**given))
        ok = True
    except (PruneError, ValueError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    finally:
        finish(ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
