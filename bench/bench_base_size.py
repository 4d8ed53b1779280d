"""The compression job at real size: a randomly initialised base-size WavLM checkpoint directory
(12 layers, hidden 768, 3072 FFN units per layer, ~94 M parameters) saved with
``save_pretrained`` and run through ``training.experiment`` unchanged.

    .venv/bin/python bench/bench_base_size.py --corpus corpus [--family wavlm] [--calib-utts 40]

Prints wall time and peak resident memory of the whole job (neuron statistics, pruning at 50%
with and without protection, ONNX export and evaluation of each model).
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--family", default="wavlm", choices=["wavlm", "hubert", "wav2vec2"])
    ap.add_argument("--calib-utts", type=int, default=40)
    ap.add_argument("--eval-max-utts", type=int, default=80)
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
        rows = run_experiment(ExperimentConfig(out=str(Path(tmp) / "exp"), protocol="finetuned", checkpoint=str(Path(tmp) / "base"),
                                               corpus=args.corpus, ratios=[0.5], recovery=[False],
                                               calib_utts=args.calib_utts, eval_max_utts=args.eval_max_utts))
        minutes = (time.monotonic() - t0) / 60
        neurons = json.loads((Path(tmp) / "exp" / "neurons.json").read_text())
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024
    print(json.dumps({"family": args.family, "encoder_params": n_params, "minutes": round(minutes, 2),
                      "peak_rss_gb": round(peak_gb, 2), "speaker_neurons_per_layer": [len(s) for s in neurons["speaker"]],
                      "rows": [{k: r[k] for k in ("method", "ratio", "eer", "params", "rtf", "onnx_bytes")} for r in rows]},
                     indent=1))


if __name__ == "__main__":
    main()
