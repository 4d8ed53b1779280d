"""What the runtime's input steps (hum removal, tilt limit) cost beside the model they feed, on real speech.

    .venv/bin/python bench/frontend_cost.py --real corpus-real [--split evaluation] [--seconds 3] [--n 200] [--rounds 5]

Takes ``--n`` utterances of the split (their first ``--seconds`` s, resampled to the model's rate):
a third as recorded, a third through a random microphone response and a third with mains hum
(``training.data.channels``' ``mic`` and ``hum`` conditions: the inputs the steps exist for), and
times, interleaved in each round on the same inputs: each step alone (``models.mains_hum.remove_hum``
where the card has ``remove_mains_hum``, ``models.spectral_tilt.limit_tilt`` where it has
``input_tilt``), and the model's whole ``embed`` (DC, hum, tilt, level and the graph), one input per
call. Prints the medians over rounds of the per-input times, each step's share of ``embed``, and how
many inputs each step changed.
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
from models.mains_hum import remove_hum  # noqa: E402
from models.runtime import SpeakerModel  # noqa: E402
from models.spectral_tilt import limit_tilt  # noqa: E402
from training.data.channels import apply_condition  # noqa: E402
from training.evaluation.realembed import load_kaldi_split  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print the per-input cost of each input step and of the whole embedding."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--split", default="evaluation")
    ap.add_argument("--model", default="ge2e", help="a repository entry with remove_mains_hum or input_tilt in its card")
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    model = SpeakerModel(args.model if Path(args.model).is_dir() else ROOT / "models" / "repository" / args.model,
                         intra_op_threads=1)
    rate = model.sample_rate
    steps = {}
    if model.card.remove_mains_hum:
        steps["hum removal"] = lambda w: remove_hum(w, rate)
    tilt = model.input_steps.tilt
    if tilt is not None:
        steps["tilt limit"] = lambda w: limit_tilt(w, rate, tilt)
    if not steps:
        ap.error(f"--model {args.model}: its card has neither remove_mains_hum nor input_tilt")
    split = load_kaldi_split(args.real / args.split)
    rng = np.random.default_rng(0)
    n_samples = int(args.seconds * rate)
    waves = [w[:n_samples] for w in split.waves16k() if len(w) >= n_samples]
    picked = [waves[i] for i in rng.choice(len(waves), size=min(args.n, len(waves)), replace=False)]
    conditions = ("clean", "mic", "hum")
    inputs = [remove_dc(apply_condition(conditions[i % 3], w, rng)[0]) for i, w in enumerate(picked)]
    print(f"{len(inputs)} inputs of {args.seconds:g} s (a third each as recorded, through a random microphone "
          f"response, with mains hum)")
    step_t = {(name, c): [] for name in steps for c in range(3)}
    embed_t = []
    for _ in range(args.rounds):
        for name, step in steps.items():
            for c in range(3):
                group = inputs[c::3]
                t0 = time.perf_counter()
                for w in group:
                    step(w)
                step_t[name, c].append((time.perf_counter() - t0) / len(group))
        t0 = time.perf_counter()
        for w in inputs:
            model.embed([w])
        embed_t.append((time.perf_counter() - t0) / len(inputs))
    embed_ms = 1e3 * float(np.median(embed_t))
    for name, step in steps.items():
        changed = [sum(not np.array_equal(step(w), w) for w in inputs[c::3]) for c in range(3)]
        ms = [1e3 * float(np.median(step_t[name, c])) for c in range(3)]
        print(f"{name}: {np.mean(ms):.3f} ms per input, {100 * np.mean(ms) / embed_ms:.1f}% of the whole embed ("
              + ", ".join(f"{k} {t:.3f} ms" for k, t in zip(conditions, ms)) + "); changed "
              + ", ".join(f"{k} {n}/{len(inputs[c::3])}" for c, (k, n) in enumerate(zip(conditions, changed))))
    print(f"whole embed (1 ORT thread): {embed_ms:.2f} ms per input (medians of {args.rounds} rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
