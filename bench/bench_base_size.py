"""The compression job at real size: a randomly initialised base-size WavLM checkpoint directory
(12 layers, hidden 768, 3072 FFN units per layer, ~94 M parameters) saved with
``save_pretrained`` and run through ``training.experiment`` unchanged.

    .venv/bin/python bench/bench_base_size.py --corpus corpus [--family wavlm] [--calib-utts 40]
    .venv/bin/python bench/bench_base_size.py --corpus corpus --protocol superb [--eval-utts 160]

Prints wall time and peak resident memory of the whole job. ``finetuned``: neuron statistics,
pruning at 50% with and without protection, ONNX export and evaluation of each model.
``superb`` (the published protocol): i-vector extractor and statistics (one calibration draw),
then the unpruned, all-FFN-removed, norm-only, protected, shuffled-protection and one random upstream at 50%, each
with its feature pass and 2 downstream heads, on 2 utterances per training speaker and the
trials among ``--eval-utts`` evaluation utterances (a view of the corpus in a temporary directory); also the
seconds of audio per upstream and the feature pass's real-time factor, from which a full
run's time follows.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    """Command line: time the base-size SSL model (see the module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--family", default="wavlm", choices=["wavlm", "hubert", "wav2vec2"])
    ap.add_argument("--calib-utts", type=int, default=40)
    ap.add_argument("--eval-max-utts", type=int, default=80)
    ap.add_argument("--protocol", default="finetuned", choices=["finetuned", "superb"])
    ap.add_argument("--eval-utts", type=int, default=160, help="superb: evaluation utterances kept")
    args = ap.parse_args()
    import torch

    from models.ssl import build_encoder
    from training.experiment import ExperimentConfig, run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        enc = build_encoder(args.family, {})  # the transformers defaults are the base-size model
        n_params = sum(p.numel() for p in enc.parameters())
        enc.save_pretrained(Path(tmp) / "base")
        del enc
        t0 = time.monotonic()
        if args.protocol == "finetuned":
            cfg = ExperimentConfig(out=str(Path(tmp) / "exp"), protocol="finetuned", checkpoint=str(Path(tmp) / "base"),
                                   corpus=args.corpus, ratios=[0.5], recovery=[False],
                                   calib_utts=args.calib_utts, eval_max_utts=args.eval_max_utts)
            keys = ("method", "ratio", "eer", "params", "rtf", "onnx_bytes")
        else:
            cfg = ExperimentConfig(out=str(Path(tmp) / "exp"), protocol="superb", checkpoint=str(Path(tmp) / "base"),
                                   corpus=str(corpus_view(Path(args.corpus), Path(tmp) / "corpus", args.eval_utts)),
                                   ratios=[0.5], primary_ratio=0.5, ssl_stage_ratios=[], calibration_draws=1,
                                   permutations=5, calib_utts=args.calib_utts, seeds=2, random_seeds=1,
                                   utts_per_speaker=2, device="cpu")
            keys = ("method", "calibration_draw", "ratio", "seed", "params", "rtf")
        rows = run_experiment(cfg)
        minutes = (time.monotonic() - t0) / 60
        out = Path(tmp) / "exp"
        neurons = json.loads((out / "neurons.json").read_text())
        extra = {}
        if args.protocol == "superb":
            summary = json.loads((out / "summary.json").read_text())
            extra = {"data": summary["run"]["data"],
                     "upstreams": len({(r["method"], r.get("calibration_draw"), r.get("random_draw")) for r in rows})}
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({"family": args.family, "protocol": args.protocol, "encoder_params": n_params,
                      "minutes": round(minutes, 2), "peak_rss_gb": round(peak_gb, 2),
                      "speaker_neurons_per_layer": [len(s) for s in neurons["speaker"]], **extra,
                      "rows": [{k: r.get(k) for k in keys} for r in rows]}, indent=1))


def corpus_view(corpus: Path, dest: Path, n_utts: int) -> Path:
    """A corpus whose eval split keeps ``n_utts`` random evaluation utterances and the trials between
    them (links to the original files, no audio copied)."""
    import numpy as np

    dest.mkdir(parents=True)
    for split in ("train", "eval"):
        (dest / split).mkdir()
        for f in (corpus / split).iterdir():
            if f.name != "trials":
                (dest / split / f.name).symlink_to(f.resolve())
    trials = [t.split() for t in (corpus / "eval" / "trials").read_text().splitlines() if t.strip()]
    utts = sorted({u for t in trials for u in t[:2]})
    keep = set(np.random.default_rng(0).choice(utts, min(n_utts, len(utts)), replace=False).tolist())
    (dest / "eval" / "trials").write_text("".join(" ".join(t) + "\n" for t in trials if t[0] in keep and t[1] in keep))
    return dest


if __name__ == "__main__":
    main()
