"""Sweep the diarization's count rules and sticky HMM on conversation sets: the tables their defaults were chosen from.

    .venv/bin/python -m training.evaluation.diarization_tune --conversations corpus-conv-cal corpus-one-cal \\
        [--min-speaker-s 5,7.5,10] [--one-speaker-cosine 0.84,0.87,0.9] \\
        [--hmm-kappa 0,5,10] [--hmm-switch 0.01,0.05] [--hmm-pause-switch 0.2,0.5] [--cache tune-cache.npz]

Every recording of every set (outputs of ``training.data.conversations``: tune on the
*calibration* split only, e.g. ``--split calibration --n 60 --seed 1`` and the same with
``--speakers 1-1``) is decoded, VAD'd and embedded once as the service does
(``diarization_eval.embed_path``); the window embeddings can be kept in ``--cache`` and
reused. Then every combination of ``min_speaker_s``, ``one_speaker_cosine`` and the sticky HMM's
``hmm_kappa``, ``hmm_switch`` and ``hmm_pause_switch`` (the HMM's lists default to the shipped value
alone) clusters and resegments the cached windows (``models.diarization.diarize_embedded``, number of
speakers unknown) and is scored as ``diarization_eval`` scores (pyannote.metrics, 0.25 s collar each side).
Prints one row per combination: DER and count exact per set, and the DER pooled over all sets
(reference-weighted), best first; the current defaults are marked.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from itertools import product
from pathlib import Path

import numpy as np

from models.diarization import DiarizationOptions, diarize_embedded
from models.runtime import SpeakerModel
from models.vad import SileroVad
from training.evaluation.diarization_eval import embed_path, read_rttm, score

__all__ = ["embed_sets", "sweep", "main"]


def embed_sets(sets: list[Path], model: SpeakerModel, opts: DiarizationOptions, cache: Path | None = None,
               log=print) -> dict[str, dict]:
    """{"<set>:<id>": {windows (N, 2) samples, emb (N, D), seconds, speech (M, 2) samples, ref rows}} for every
    recording of ``sets``.

    Embeddings come from ``cache`` (an ``.npz`` written by an earlier call) when it holds the recording
    for the same model, window and hop; new ones are added to it.
    """
    stored: dict[str, np.ndarray] = dict(np.load(cache)) if cache is not None and cache.is_file() else {}
    tag = f"{model.name},{opts.window_s},{opts.hop_s}"
    vad = SileroVad()
    out, added = {}, False
    for conv in sets:
        manifest = json.loads((conv / "manifest.json").read_text())["conversations"]
        for cid in sorted(manifest):
            key = f"{conv.name}:{cid}"
            if f"{key};{tag};spc" not in stored:
                windows, emb, seconds, speech = embed_path(conv / "wav" / f"{cid}.wav", model, vad, opts)
                stored[f"{key};{tag};win"] = np.array(windows, np.int64).reshape(-1, 2)
                stored[f"{key};{tag};emb"] = emb
                stored[f"{key};{tag};sec"] = np.array([seconds])
                stored[f"{key};{tag};spc"] = np.array(speech, np.int64).reshape(-1, 2)
                added = True
                log(f"  embedded {key}: {len(windows)} windows")
            out[key] = {"windows": stored[f"{key};{tag};win"], "emb": stored[f"{key};{tag};emb"],
                        "seconds": float(stored[f"{key};{tag};sec"][0]), "speech": stored[f"{key};{tag};spc"],
                        "ref": read_rttm(conv / "rttm" / f"{cid}.rttm"), "set": conv.name}
    if cache is not None and added:
        np.savez(cache, **stored)
    return out


RULES = ("min_speaker_s", "one_speaker_cosine", "hmm_kappa", "hmm_switch", "hmm_pause_switch")


def sweep(recordings: dict[str, dict], rate: int, base: DiarizationOptions, grid: dict[str, list[float]]) -> list[dict]:
    """One row per combination of ``grid`` ({option name in ``RULES``: values}; options left out keep ``base``'s):
    {rules: {name: value}, sets: {name: (DER %, count exact %)}, pooled}, best pooled DER first."""
    rows = []
    names = [n for n in RULES if n in grid]
    for values in product(*(grid[n] for n in names)):
        rules = dict(zip(names, values))
        opts = replace(base, **rules).validate()
        err: dict[str, float] = {}
        ref: dict[str, float] = {}
        exact: dict[str, list[bool]] = {}
        for key, r in recordings.items():
            windows = [tuple(w) for w in r["windows"].tolist()]
            turns, k = diarize_embedded(windows, r["emb"], rate, opts, [tuple(seg) for seg in r["speech"].tolist()])
            hyp = [(t.start, t.end, f"S{t.speaker}") for t in turns]
            s = score(r["ref"], hyp, key, r["seconds"])
            name = r["set"]
            err[name] = err.get(name, 0.0) + s["total"]
            ref[name] = ref.get(name, 0.0) + s["reference"]
            exact.setdefault(name, []).append(k == len({spk for *_, spk in r["ref"]}))
        sets = {n: (100 * err[n] / ref[n], 100 * float(np.mean(exact[n]))) for n in err}
        rows.append({"rules": rules, "sets": sets, "pooled": 100 * sum(err.values()) / sum(ref.values())})
    return sorted(rows, key=lambda r: r["pooled"])


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.diarization_tune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", required=True, type=Path, nargs="+",
                    help="outputs of training.data.conversations")
    ap.add_argument("--model", default="ge2e", help="model name in --repository, or a model directory")
    ap.add_argument("--repository", type=Path, default=Path("models/repository"))
    ap.add_argument("--min-speaker-s", type=_floats, default=[5.0, 7.5, 10.0])
    ap.add_argument("--one-speaker-cosine", type=_floats, default=[0.84, 0.87, 0.9])
    ap.add_argument("--hmm-kappa", type=_floats, default=None, help="0: no HMM (closest voiceprint, median filter)")
    ap.add_argument("--hmm-switch", type=_floats, default=None)
    ap.add_argument("--hmm-pause-switch", type=_floats, default=None)
    ap.add_argument("--cache", type=Path, default=None, help="keep the window embeddings here (.npz)")
    args = ap.parse_args(argv)
    path = Path(args.model) if Path(args.model).is_dir() else args.repository / args.model
    base = DiarizationOptions()
    try:
        if len({c.name for c in args.conversations}) != len(args.conversations):
            raise ValueError("--conversations: the sets' folder names must differ (they label the columns)")
        grid = {n: getattr(args, n) if getattr(args, n) is not None else [getattr(base, n)] for n in RULES}
        for name, values in grid.items():
            if not values:
                raise ValueError(f"--{name.replace('_', '-')}: give at least one value")
            for v in values:
                try:
                    replace(base, **{name: v}).validate()
                except ValueError as e:
                    raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        if args.cache is not None and args.cache.suffix != ".npz":
            raise ValueError(f"--cache: must end in .npz, got {args.cache}")
        for conv in args.conversations:
            if not (conv / "manifest.json").is_file():
                raise ValueError(f"--conversations: {conv} has no manifest.json "
                                 "(build it with training.data.conversations)")
        model = SpeakerModel(path, ["CPUExecutionProvider"])
    except (OSError, ValueError) as e:
        print(f"diarization_tune: {e}", file=sys.stderr)
        return 2
    recordings = embed_sets(args.conversations, model, base, args.cache)
    rows = sweep(recordings, model.sample_rate, base, grid)
    names = [c.name for c in args.conversations]
    print("| " + " | ".join(RULES) + " | " + " | ".join(f"{n} DER % (count exact %)" for n in names)
          + " | pooled DER % |")
    print("|" + "---:|" * (len(RULES) + len(names) + 1))
    for r in rows:
        mark = " (default)" if all(r["rules"][n] == getattr(base, n) for n in RULES) else ""
        rules = " | ".join(f"{r['rules'][n]:g}" for n in RULES)
        cells = " | ".join(f"{r['sets'][n][0]:.1f} ({r['sets'][n][1]:.0f})" for n in names)
        print(f"| {rules.replace(' |', mark + ' |', 1)} | {cells} | {r['pooled']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
