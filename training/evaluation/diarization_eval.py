"""Diarization error of the served pipeline on conversations of real speech.

    .venv/bin/python -m training.evaluation.diarization_eval --conversations corpus-conv [--model ge2e] [--json out.json]

Runs every conversation of ``training.data.conversations`` through the steps the service runs
(streamed decode in 60 s blocks, the model's VAD options, windows embedded in batches,
``models.diarization`` clustering and resegmentation), once with the number of speakers unknown
and once given, and scores the output against the reference RTTMs with ``pyannote.metrics``:
DER with a 0.25 s collar on each side of every reference boundary (``collar=0.5`` in
pyannote's convention, the total width) and overlapped speech scored, split into missed
speech, false alarm and confusion; JER; the share of recordings whose speaker count is exact;
how well the segments' ``confidence`` tells turns labelled right from wrong (AUROC; a turn is
right when its speaker, mapped as DER maps them, holds most of the reference speech inside it);
and the speed (seconds of audio per second of computation, one process, the model's own
threads). Prints a table by channel and writes the figures as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from models.audio import stream_windows
from models.diarization import (
    DiarizationOptions,
    Turn,
    diarization_speech_vad,
    diarization_vad,
    diarize_embedded,
    speech_windows,
    to_rttm,
)
from models.runtime import SpeakerModel
from models.vad import SileroVad
from training.evaluation.realembed import model_vad_options

__all__ = ["diarize_path", "embed_path", "score", "evaluate", "main"]

BLOCK_SECONDS = 60.0


def diarize_path(path: Path, model: SpeakerModel, vad: SileroVad, opts: DiarizationOptions,
                 batch_windows: int = 64) -> tuple[list[Turn], int, float]:
    """Diarize one file as the service does: (turns, number of speakers, seconds of audio)."""
    windows, emb, seconds, speech = embed_path(path, model, vad, opts, batch_windows)
    turns, k = diarize_embedded(windows, emb, model.sample_rate, opts, speech)
    return turns, k, seconds


def embed_path(path: Path, model: SpeakerModel, vad: SileroVad, opts: DiarizationOptions,
               batch_windows: int = 64) -> tuple[list[tuple[int, int]], np.ndarray, float, list[tuple[int, int]]]:
    """The steps before clustering, as the service runs them: (windows in samples, (N, D) embeddings, seconds,
    the generous VAD's speech segments in samples)."""
    base = model_vad_options(model.card)
    vad_opts = [diarization_vad(base), diarization_speech_vad(base)]
    rate = model.sample_rate
    windows: list[tuple[int, int]] = []
    speech: list[tuple[int, int]] = []
    embs: list[np.ndarray] = []
    offset = 0
    with open(path, "rb") as f:
        for block in stream_windows(f, "audio", rate, 4 * 3600.0, None, BLOCK_SECONDS):
            (segments, generous), _ = vad.analyse_many(block, rate, vad_opts)
            wins = speech_windows(segments, rate, opts, min_samples=int(rate * max(model.card.min_audio_seconds, 0.1)))
            for i in range(0, len(wins), batch_windows):  # (B, D) per batch of windows
                part = wins[i:i + batch_windows]
                embs.append(model.embed([block[a:b] for a, b in part]))
            windows += [(a + offset, b + offset) for a, b in wins]
            speech += [(a + offset, b + offset) for a, b in generous]
            offset += len(block)
    emb = np.concatenate(embs) if embs else np.zeros((0, model.dim), np.float32)  # (N, D)
    return windows, emb, offset / rate, speech


def _annotation(rows: list[tuple[float, float, str]], uri: str):
    from pyannote.core import Annotation, Segment

    ann = Annotation(uri=uri)
    for i, (a, b, s) in enumerate(rows):
        ann[Segment(a, b), i] = s
    return ann


def read_rttm(path: Path) -> list[tuple[float, float, str]]:
    """(start, end, speaker) rows of an RTTM file."""
    rows = []
    for line in Path(path).read_text().splitlines():
        f = line.split()
        if len(f) >= 8 and f[0] == "SPEAKER":
            rows.append((float(f[3]), float(f[3]) + float(f[4]), f[7]))
    return rows


def score(ref: list[tuple[float, float, str]], hyp: list[tuple[float, float, str]], uri: str, seconds: float) -> dict:
    """DER parts (seconds) and JER of one recording of ``seconds`` (pyannote.metrics, collar 0.25 s each side,
    overlap scored)."""
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate, JaccardErrorRate

    r, h = _annotation(ref, uri), _annotation(hyp, uri)
    uem = Timeline([Segment(0, seconds)], uri=uri)
    der = DiarizationErrorRate(collar=0.5, skip_overlap=False)(r, h, uem=uem, detailed=True)
    jer = JaccardErrorRate(collar=0.5, skip_overlap=False)(r, h, uem=uem)
    return {"total": der["missed detection"] + der["false alarm"] + der["confusion"], "reference": der["total"],
            "missed": der["missed detection"], "false_alarm": der["false alarm"],
            "confusion": der["confusion"], "jer": float(jer)}


def turns_right(ref: list[tuple[float, float, str]], turns: list[Turn], uri: str) -> list[tuple[float, bool]]:
    """(confidence, right) of every turn that overlaps reference speech: right when, under the optimal mapping of
    output speakers to reference speakers (the one DER uses), the turn's speaker holds most of the reference
    speech inside it."""
    from pyannote.core import Segment
    from pyannote.metrics.diarization import DiarizationErrorRate

    r = _annotation(ref, uri)
    mapping = DiarizationErrorRate().optimal_mapping(r, _annotation([(t.start, t.end, f"S{t.speaker}") for t in turns],
                                                                    uri))
    out = []
    for t in turns:
        inside: dict[str, float] = {}
        for seg, _, spk in r.crop(Segment(t.start, t.end)).itertracks(yield_label=True):
            inside[spk] = inside.get(spk, 0.0) + seg.duration
        if inside:
            out.append((t.confidence, inside.get(mapping.get(f"S{t.speaker}"), 0.0) > 0.5 * sum(inside.values())))
    return out


def auroc(rows: list[tuple[float, bool]]) -> float | None:
    """Area under the ROC curve of ``(score, right)`` rows (scikit-learn's, which pyannote.metrics brings): the
    chance that a right row scores above a wrong one, ties counting half; None without both kinds."""
    right = [ok for _, ok in rows]
    if all(right) or not any(right):
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(right, [c for c, _ in rows]))


def evaluate(conv: Path, model: SpeakerModel, opts: DiarizationOptions, given: bool, log=print,
             rttm_out: Path | None = None) -> dict:
    """Diarize every conversation in ``conv``: per-recording and pooled figures."""
    manifest = json.loads((conv / "manifest.json").read_text())["conversations"]
    vad = SileroVad()
    rows, per, judged = [], {}, []
    for cid, meta in sorted(manifest.items()):
        ref = read_rttm(conv / "rttm" / f"{cid}.rttm")
        n_ref = len({s for *_, s in ref})
        o = replace(opts, num_speakers=n_ref) if given else opts
        t0 = time.perf_counter()
        turns, k, seconds = diarize_path(conv / "wav" / f"{cid}.wav", model, vad, o)
        elapsed = time.perf_counter() - t0
        hyp = [(t.start, t.end, f"SPEAKER_{t.speaker:02d}") for t in turns]
        s = score(ref, hyp, cid, seconds)
        judged += turns_right(ref, turns, cid)
        if rttm_out is not None:
            rttm_out.mkdir(parents=True, exist_ok=True)
            names = [f"SPEAKER_{i:02d}" for i in range(k)]
            (rttm_out / f"{cid}.{'given' if given else 'unknown'}.rttm").write_text(to_rttm(turns, names, cid))
        s.update(channel=meta["channel"], speakers=n_ref, found=k, seconds=seconds, compute_s=elapsed)
        per[cid] = s
        log(f"  {cid} {meta['channel']:>9} {n_ref}->{k} spk  DER {100 * s['total'] / s['reference']:5.1f}%"
            f"  {seconds / elapsed:5.0f}x RT")
        rows.append(s)
    return {"per_recording": per, "pooled": _pool(per), "confidence_auroc": auroc(judged),
            "turns": len(judged), "turns_wrong": sum(not ok for _, ok in judged)}


def _pool(per: dict) -> dict:
    """Pooled DER (sum of errors over sum of reference speech) by channel and overall."""
    out = {}
    for name in ["all"] + sorted({v["channel"] for v in per.values()}):
        keys = [c for c, v in per.items() if name == "all" or v["channel"] == name]
        total = sum(per[c]["reference"] for c in keys)
        agg = {p: 100 * sum(per[c][p] for c in keys) / total for p in ("total", "missed", "false_alarm", "confusion")}
        agg["jer"] = 100 * float(np.mean([per[c]["jer"] for c in keys]))
        agg["count_exact"] = 100 * float(np.mean([per[c]["found"] == per[c]["speakers"] for c in keys]))
        agg["recordings"] = len(keys)
        agg["minutes"] = sum(per[c]["seconds"] for c in keys) / 60
        agg["x_realtime"] = sum(per[c]["seconds"] for c in keys) / sum(per[c]["compute_s"] for c in keys)
        out[name] = agg
    return out


def table(results: dict) -> str:
    """The pooled figures as a Markdown table."""
    header = ("| speakers | channel | recordings | minutes | DER % | missed | false alarm | confusion | JER % "
              "| count exact % | x real time |")
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, res in results.items():
        for ch, a in res["pooled"].items():
            lines.append(f"| {mode} | {ch} | {a['recordings']} | {a['minutes']:.0f} | {a['total']:.1f} | {a['missed']:.1f} "
                         f"| {a['false_alarm']:.1f} | {a['confusion']:.1f} | {a['jer']:.1f} | {a['count_exact']:.0f} "
                         f"| {a['x_realtime']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.diarization_eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", required=True, type=Path, help="output of training.data.conversations")
    ap.add_argument("--model", default="ge2e", help="model name in --repository, or a model directory")
    ap.add_argument("--repository", type=Path, default=Path("models/repository"))
    ap.add_argument("--one-speaker-cosine", type=float, default=None, help="override the one-speaker cosine (tuning)")
    ap.add_argument("--window", type=float, default=None, help="override the window length in seconds (tuning)")
    ap.add_argument("--modes", default="unknown,given", help="comma list of unknown, given")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--rttm-out", type=Path, default=None, help="write the system's RTTMs here")
    args = ap.parse_args(argv)
    path = Path(args.model) if Path(args.model).is_dir() else args.repository / args.model
    try:
        model = SpeakerModel(path, ["CPUExecutionProvider"])
        opts = DiarizationOptions()
        if args.one_speaker_cosine is not None:
            opts = replace(opts, one_speaker_cosine=args.one_speaker_cosine)
        if args.window is not None:
            opts = replace(opts, window_s=args.window, hop_s=args.window / 2)
        opts.validate()
    except (OSError, ValueError) as e:
        print(f"diarization_eval: {e}", file=sys.stderr)
        return 2
    results = {}
    for mode in [m for m in args.modes.split(",") if m]:
        if mode not in ("unknown", "given"):
            ap.error(f"--modes: unknown mode {mode!r}")
        print(f"{mode} number of speakers:", flush=True)
        results[mode] = evaluate(args.conversations, model, opts, mode == "given", rttm_out=args.rttm_out)
    print(table(results))
    for mode, res in results.items():
        a = res["confidence_auroc"]
        print(f"{mode}: {res['turns_wrong']} of {res['turns']} turns labelled wrong; their confidence tells right from "
              f"wrong with AUROC {'n/a' if a is None else f'{a:.3f}'}")
    if args.json:
        args.json.write_text(json.dumps({"model": model.name, "options": opts.__dict__, "results": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
