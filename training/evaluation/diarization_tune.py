"""Sweep the diarization's count rules on conversation sets: the table its defaults were chosen from.

    .venv/bin/python -m training.evaluation.diarization_tune --conversations corpus-conv-cal corpus-one-cal \\
        [--min-speaker-s 5,7.5,10] [--one-speaker-cosine 0.84,0.87,0.9] [--cache tune-cache.npz]

Every recording of every set (outputs of ``training.data.conversations``: tune on the
*calibration* split only, e.g. ``--split calibration --n 60 --seed 1`` and the same with
``--speakers 1-1``) is decoded, VAD'd and embedded once as the service does
(``diarization_eval.embed_path``); the window embeddings can be kept in ``--cache`` and
reused. Then every combination of ``min_speaker_s`` and ``one_speaker_cosine`` clusters and
resegments the cached windows (``models.diarization.diarize_embedded``, number of speakers
unknown) and is scored as ``diarization_eval`` scores (pyannote.metrics, 0.25 s collar each side).
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


def sweep(recordings: dict[str, dict], rate: int, base: DiarizationOptions, min_speaker_s: list[float],
          one_speaker_cosine: list[float]) -> list[dict]:
    """One row per combination: {min_speaker_s, one_speaker_cosine, sets: {name: (DER %, count exact %)}, pooled}."""
    rows = []
    for ms, cos in product(min_speaker_s, one_speaker_cosine):
        opts = replace(base, min_speaker_s=ms, one_speaker_cosine=cos).validate()
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
        rows.append({"min_speaker_s": ms, "one_speaker_cosine": cos, "sets": sets,
                     "pooled": 100 * sum(err.values()) / sum(ref.values())})
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
    ap.add_argument("--cache", type=Path, default=None, help="keep the window embeddings here (.npz)")
    args = ap.parse_args(argv)
    path = Path(args.model) if Path(args.model).is_dir() else args.repository / args.model
    base = DiarizationOptions()
    try:
        if len({c.name for c in args.conversations}) != len(args.conversations):
            raise ValueError("--conversations: the sets' folder names must differ (they label the columns)")
        for name, values in (("min-speaker-s", args.min_speaker_s), ("one-speaker-cosine", args.one_speaker_cosine)):
            if not values:
                raise ValueError(f"--{name}: give at least one value")
        if args.cache is not None and args.cache.suffix != ".npz":
            raise ValueError(f"--cache: must end in .npz, got {args.cache}")
        for ms, cos in product(args.min_speaker_s, args.one_speaker_cosine):
            replace(base, min_speaker_s=ms, one_speaker_cosine=cos).validate()
        for conv in args.conversations:
            if not (conv / "manifest.json").is_file():
                raise ValueError(f"--conversations: {conv} has no manifest.json "
                                 "(build it with training.data.conversations)")
        model = SpeakerModel(path, ["CPUExecutionProvider"])
    except (OSError, ValueError) as e:
        print(f"diarization_tune: {e}", file=sys.stderr)
        return 2
    recordings = embed_sets(args.conversations, model, base, args.cache)
    rows = sweep(recordings, model.sample_rate, base, args.min_speaker_s, args.one_speaker_cosine)
    names = [c.name for c in args.conversations]
    print("| min_speaker_s | one_speaker_cosine | " + " | ".join(f"{n} DER % (count exact %)" for n in names)
          + " | pooled DER % |")
    print("|---:|---:|" + "---:|" * (len(names) + 1))
    for r in rows:
        mark = " (default)" if (r["min_speaker_s"], r["one_speaker_cosine"]) == (base.min_speaker_s,
                                                                                base.one_speaker_cosine) else ""
        cells = " | ".join(f"{r['sets'][n][0]:.1f} ({r['sets'][n][1]:.0f})" for n in names)
        print(f"| {r['min_speaker_s']:g}{mark} | {r['one_speaker_cosine']:g} | {cells} | {r['pooled']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
