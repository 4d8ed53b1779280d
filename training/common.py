"""Pieces every training job shares: run directories, seeding, loading a corpus split."""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from training.data.corpus import read_scp
from training.data.features import load_wave

__all__ = ["start_run", "load_split", "RunState", "cpu_bf16"]


def cpu_bf16(wanted: bool, job: str, cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether a CPU job should run under bf16 autocast: only when ``wanted`` and the processor
    has native bf16 arithmetic (AVX512-BF16 or AMX). Elsewhere PyTorch emulates it, measured
    about 30x slower than fp32 per pretraining step on an AVX2-only machine, so the job says so
    and runs in fp32."""
    if not wanted:
        return False
    try:
        flags = set(Path(cpuinfo).read_text().split())
    except OSError:
        flags = set()
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    if not native:
        print(f"{job}: this CPU has no native bf16 (avx512_bf16/amx_bf16); running in fp32", flush=True)
    return native


def start_run(out: str | Path, config: Any, seed: int) -> Path:
    """Create the run directory, save the resolved config next to the weights, fix the seeds."""
    import torch

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=1) + "\n")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return out


def load_split(corpus: str | Path, split: str = "train", utts: list[str] | None = None,
               progress: bool = True) -> tuple[list[str], list[np.ndarray], dict[str, str]]:
    """Utterance ids, 16 kHz waveforms and utt2spk of a corpus split (or of ``utts`` from it).

    Raises:
        FileNotFoundError: the split's wav.scp is missing or lists files that do not exist.
        ValueError: the split lists no utterances.
    """
    d = Path(corpus) / split
    if not (d / "wav.scp").is_file():
        raise FileNotFoundError(f"{d / 'wav.scp'}: missing (build the corpus with python -m training.data.corpus)")
    scp = read_scp(d / "wav.scp")
    utt2spk = read_scp(d / "utt2spk") if (d / "utt2spk").is_file() else {}
    if not scp:
        raise ValueError(f"{d / 'wav.scp'} lists no utterances")
    utts = sorted(scp) if utts is None else utts
    missing = [scp[u] for u in utts if not Path(scp[u]).is_file()]
    if missing:
        raise FileNotFoundError(f"{d / 'wav.scp'}: {len(missing)} listed files are missing, e.g. {missing[0]}")
    it = utts
    if progress:
        from tqdm import tqdm

        it = tqdm(utts, desc=f"loading {split}", unit="utt")
    return list(utts), [load_wave(scp[u]) for u in it], utt2spk


class RunState:
    """Resumable training state in ``out/last.pt``: the given modules/optimisers, step, elapsed
    minutes, loss history and both RNGs (numpy's and torch's), written atomically.

    Args:
        out: run directory.
        parts: name -> object with ``state_dict``/``load_state_dict`` (models, optimisers).
        seed: seed of the numpy generator (``self.rng``) on a fresh start.
    """

    def __init__(self, out: str | Path, parts: dict[str, Any], seed: int):
        self.path = Path(out) / "last.pt"
        self.parts = parts
        self.rng = np.random.default_rng(seed)
        self.step, self.elapsed, self.history = 0, 0.0, []
        if self.path.exists():
            import torch

            ck = torch.load(self.path, map_location="cpu", weights_only=False)
            for name, part in parts.items():
                part.load_state_dict(ck[name])
            self.step, self.elapsed, self.history = ck["step"], ck["elapsed"], ck["history"]
            self.rng.bit_generator.state = ck["rng"]
            torch.set_rng_state(ck["torch_rng"])

    def save(self) -> None:
        """Write the state (temp file, then rename)."""
        import torch

        tmp = self.path.with_suffix(".tmp")
        torch.save({**{n: p.state_dict() for n, p in self.parts.items()}, "step": self.step, "elapsed": self.elapsed,
                    "history": self.history, "rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state()},
                   tmp)
        tmp.replace(self.path)
