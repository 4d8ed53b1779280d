"""Evaluate exported models (and the log-mel baseline) on a corpus's evaluation trials.

    .venv/bin/python -m training.evaluation.evaluate --corpus corpus --models ge2e ssl-sv-small --out runs/eval
    .venv/bin/python -m training.evaluation.evaluate --corpus corpus --split reserved --models ssl-sv-small --out runs/eval-reserved

For each system: EER (%), minDCF (p_target 0.01 and 0.05) on ``<split>/trials`` with cosine
scoring, closed-set identification accuracy (each evaluation speaker enrolled with the mean
of its first half of utterances, the second half identified), and ONNX Runtime real-time
factor (seconds of compute per second of audio, batch 1, one thread). Models with a cohort
and a calibration (``training.evaluation.calibrate``) also get the EER of their S-norm scores and the
Cllr and minCllr of their calibrated log-likelihood ratios. Utterances go through Silero
VAD first, as the service does (``--no-vad`` embeds whole files). Writes ``results.json``
and a DET plot ``det.png``. The log-mel baseline is the mean and standard deviation of 40
log-mel bands: it measures channel statistics, not speaker modelling.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.evaluation import cosine_scores, evaluate_scores, identification_accuracy, plot_det, read_trials
from models.runtime import SpeakerModel
from models.scoring import cllr, min_cllr
from training.data.corpus import read_scp
from training.data.features import load_wave, logmel_stats

__all__ = ["EvalSet", "evaluate_embeddings", "embed_with_model", "rtf", "main"]

REPO = Path(__file__).resolve().parents[2] / "models" / "repository"


class EvalSet:
    """The evaluation part of a corpus: waveforms, speakers and trials."""

    def __init__(self, corpus: str | Path, split: str = "eval", max_utts: int | None = None):
        d = Path(corpus) / split
        scp, utt2spk = read_scp(d / "wav.scp"), read_scp(d / "utt2spk")
        self.trials = read_trials(d / "trials")
        self.utts = sorted(scp)[:max_utts] if max_utts else sorted(scp)
        missing = [scp[u] for u in self.utts if not Path(scp[u]).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} files of {d / 'wav.scp'} are missing, e.g. {missing[0]}")
        self.waves = [load_wave(scp[u]) for u in self.utts]
        self.spk = [utt2spk[u] for u in self.utts]
        keep = set(self.utts)
        self.trials = [t for t in self.trials if t[0] in keep and t[1] in keep]


def evaluate_embeddings(es: EvalSet, emb: np.ndarray, scorer=None) -> dict:
    """Verification and identification figures of (N, D) embeddings of ``es.utts``.

    Args:
        scorer: a ``models.scoring.ModelScorer``; with a cohort, S-norm figures are added, and
            with a calibration, Cllr and minCllr of the log-likelihood ratios.
    """
    table = dict(zip(es.utts, emb))
    scores, labels = cosine_scores(table, es.trials)
    res = evaluate_scores(scores, labels)
    extra = {}
    if scorer is not None and scorer.cohort is not None:
        stats = dict(zip(es.utts, scorer.stats(emb)))
        a = np.stack([stats[u] for u, _, _ in es.trials])
        b = np.stack([stats[u] for _, u, _ in es.trials])
        norm = 0.5 * ((scores - a[:, 0]) / a[:, 1] + (scores - b[:, 0]) / b[:, 1])
        extra["eer_snorm"] = evaluate_scores(norm, labels).eer
        if scorer.calibration is not None:
            llr = scorer.calibration.llr(norm)
            extra.update(cllr=cllr(llr, labels), min_cllr=min_cllr(llr, labels))
            if scorer.scale == "llr":
                accept = llr >= scorer.threshold
                extra.update(far_at_operating_point=float(accept[labels == 0].mean()),
                             frr_at_operating_point=float((~accept[labels == 1]).mean()))
    by_spk: dict[str, list[int]] = {}
    for i, s in enumerate(es.spk):
        by_spk.setdefault(s, []).append(i)
    enroll, tests = {}, []
    for s, idx in by_spk.items():
        half = max(1, len(idx) // 2)
        v = emb[idx[:half]].mean(0)
        enroll[s] = v / np.linalg.norm(v)
        tests += [(emb[i], s) for i in idx[half:]]
    return {"eer": res.eer, "mindcf": res.min_dcf_01, "mindcf_p0.05": res.min_dcf_05, "eer_threshold": res.eer_threshold,
            "id_accuracy": identification_accuracy(enroll, tests), "n_target": res.n_target,
            "n_nontarget": res.n_nontarget, **extra, "_scores": scores, "_labels": labels}


def embed_with_model(model_dir: str | Path, waves: list[np.ndarray], vad: bool = True) -> tuple[np.ndarray, SpeakerModel]:
    """Embeddings of ``waves`` with an exported repository entry (after Silero VAD, as served), and the model."""
    model = SpeakerModel(model_dir, ["CPUExecutionProvider"])
    if vad:
        from models.vad import SileroVad, VadOptions, keep_speech

        detector = SileroVad()
        opts = VadOptions(**{k: v for k, v in (model.card.vad or {}).items() if v is not None})
        kept = []
        for w in waves:
            speech = keep_speech(w, detector.segments(w, model.sample_rate, opts))
            kept.append(speech if len(speech) >= model.card.min_audio_seconds * model.sample_rate else w)
        waves = kept
    return model.embed_many(waves), model


def rtf(model_dir: str | Path, seconds: float = 10.0, repeats: int = 5) -> float:
    """ONNX Runtime seconds per second of audio: batch 1, one intra-op thread, median of repeats."""
    m = SpeakerModel(model_dir, ["CPUExecutionProvider"], intra_op_threads=1)
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(seconds * m.sample_rate))).astype(np.float32)
    m.embed([wave])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        m.embed([wave])
        times.append(time.perf_counter() - t0)
    return float(np.median(times) / seconds)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--models", nargs="*", default=["ge2e"], help="repository entries (names or directories)")
    ap.add_argument("--repository", default=str(REPO))
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--split", default="eval", choices=("eval", "reserved"),
                    help="eval: the evaluation speakers; reserved: the MBROLA voices kept out of the corpus's splits")
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--no-vad", action="store_true", help="embed whole files (the service always runs VAD first)")
    args = ap.parse_args(argv)
    try:
        es = EvalSet(args.corpus, args.split)
    except (FileNotFoundError, ValueError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    results, curves = {}, {}
    systems = [] if args.no_baseline else [("logmel-meanstd", None)]
    systems += [(Path(m).name, Path(m) if Path(m).is_dir() else Path(args.repository) / m) for m in args.models]
    for name, path in systems:
        scorer = None
        if path is None:  # z-normalised over the evaluation set, so cosine compares deviations from the average
            emb = np.stack([logmel_stats(w) for w in es.waves])
            emb = (emb - emb.mean(0)) / (emb.std(0) + 1e-8)
        else:
            emb, model = embed_with_model(path, es.waves, vad=not args.no_vad)
            scorer = model.scorer
        r = evaluate_embeddings(es, emb, scorer)
        curves[name] = (r.pop("_scores"), r.pop("_labels"))
        if path is not None:
            r["rtf"] = rtf(path)
        results[name] = r
        print(name, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot_det(curves, args.out / "det.png", title=f"{Path(args.corpus).name} {args.split} trials")
    return 0


if __name__ == "__main__":
    sys.exit(main())
