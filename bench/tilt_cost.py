"""What the runtime's spectral-tilt limit costs beside the model it feeds, on real speech.

    .venv/bin/python bench/tilt_cost.py --real corpus-real [--split evaluation] [--seconds 3] [--n 200] [--rounds 5]

Takes ``--n`` utterances of the split (their first ``--seconds`` s, resampled to the model's rate),
half of them through a random microphone response (``training.data.channels``' ``mic`` condition:
the inputs the limit exists for) and half as recorded, and times, interleaved in each round on the
same inputs: the tilt limit alone (``models.spectral_tilt.limit_tilt``), and the model's whole
``embed`` (DC, tilt, level and the graph), one input per call. Prints the medians over rounds of the
per-input times, the limit's share of ``embed``, and how many inputs the limit changed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.audio import remove_dc  # noqa: E402
from models.runtime import SpeakerModel  # noqa: E402
from models.spectral_tilt import limit_tilt  # noqa: E402
from training.data.channels import apply_condition  # noqa: E402
from training.evaluation.realembed import load_kaldi_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print the per-input cost of the tilt limit and of the whole embedding."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--split", default="evaluation")
    ap.add_argument("--model", default="ge2e", help="a repository entry with input_tilt in its card")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    model = SpeakerModel(args.model if Path(args.model).is_dir() else ROOT / "models" / "repository" / args.model,
                         intra_op_threads=1)
    if model.tilt is None:
        ap.error(f"--model {args.model}: its card has no input_tilt")
    split = load_kaldi_split(args.real / args.split)
    rng = np.random.default_rng(0)
    n_samples = int(args.seconds * model.sample_rate)
    waves = [w[:n_samples] for w in split.waves16k() if len(w) >= n_samples]
    picked = [waves[i] for i in rng.choice(len(waves), size=min(args.n, len(waves)), replace=False)]
    inputs = [remove_dc(apply_condition("mic", w, rng)[0] if i % 2 else w) for i, w in enumerate(picked)]
    changed = sum(not np.array_equal(limit_tilt(w, model.sample_rate, model.tilt), w) for w in inputs)
    tilt_t, embed_t = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        for w in inputs:
            limit_tilt(w, model.sample_rate, model.tilt)
        t1 = time.perf_counter()
        for w in inputs:
            model.embed([w])
        t2 = time.perf_counter()
        tilt_t.append((t1 - t0) / len(inputs))
        embed_t.append((t2 - t1) / len(inputs))
    tilt_ms, embed_ms = 1e3 * float(np.median(tilt_t)), 1e3 * float(np.median(embed_t))
    print(f"{len(inputs)} inputs of {args.seconds:g} s ({len(inputs) // 2} through a random microphone response); "
          f"the limit changed {changed} ({100 * changed / len(inputs):.0f}%)")
    print(f"tilt limit {tilt_ms:.3f} ms per input, whole embed (1 ORT thread) {embed_ms:.2f} ms per input: "
          f"the limit is {100 * tilt_ms / embed_ms:.1f}% of it (medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
