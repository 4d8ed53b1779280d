"""Fit a model's ``band_map``: wideband voiceprints carried into the 8 kHz and the telephone band.

    .venv/bin/python -m training.evaluation.band_map --model-dir models/repository/ge2e --real corpus-real

Reads the real-speech pool's *calibration* speakers, keeps each utterance's speech as the service
does, and embeds it three ways: as recorded, and after ``models.band_match.match_band`` in the
8 kHz band and in the landline's 300-3400 Hz band (its narrowband twins). Per band, a linear map
from the recorded embedding to its twin is fitted by ridge regression towards the identity
(``models.band_map.fit_linear_map``, ``--ridge``). The LLR offset of a mapped pair is then fitted on
the pool's calibration trials, a mapped recording against a real narrowband rendering of the other
utterance (GSM 06.10 for the 8 kHz band, the telephone channel for the other), each map
*cross-fitted*: the voiceprints of one fold of speakers are mapped by a map fitted without them,
so the offset sees the map's error on speakers it was not fitted on, as the service will. The
offset is the one that minimises those trials' Cllr.

Run it after ``training.evaluation.calibrate`` (the offsets are on the calibrated LLR scale; a new
calibration needs a new band map). The embeddings do not change, so the card's version stays.
Nothing here looks at the evaluation speakers; ``training.evaluation.decisions`` reports the
held-out figures (rows ``*-probe-mapped``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from models.artifact import load_card, save_card
from models.band_map import BANDS, BandMap, fit_linear_map
from models.band_match import match_band
from models.calibration import cllr
from models.evaluation import read_trials
from models.runtime import SpeakerModel
from models.vad import SileroVad
from training.evaluation.decisions import score_pairs
from training.evaluation.realembed import Rendered, load_kaldi_split, render_and_embed

__all__ = ["PROBES", "fit_band_map", "cross_fitted", "best_offset", "main"]

PROBES = {"narrowband": "gsm", "telephone": "telephone"}  # the real channel each band's offset is fitted against
FILE = "band_map.npz"


def cross_fitted(x: np.ndarray, y: np.ndarray, speakers: np.ndarray, ok: np.ndarray, ridge: float, folds: int,
                 seed: int = 0) -> np.ndarray:
    """(N, D) rows of ``x`` mapped by maps fitted without their own speaker's fold (rows where ``ok`` is False
    are neither fitted on nor mapped: left zero)."""
    names = np.unique(speakers)
    if len(names) < folds:
        raise ValueError(f"--folds {folds} needs at least {folds} speakers, the pool has {len(names)}")
    order = np.random.default_rng(seed).permutation(names)
    fold_of = {s: i % folds for i, s in enumerate(order)}
    fold = np.array([fold_of[s] for s in speakers])  # (N,)
    out = np.zeros_like(x)
    for k in range(folds):
        train, held = ok & (fold != k), ok & (fold == k)
        w, mx, my = fit_linear_map(x[train], y[train], ridge)
        bm = BandMap(np.stack([w, w]), np.stack([mx, mx]), np.stack([my, my]), np.zeros(2, np.float32))
        out[held] = bm.apply(x[held], low_cut=False)
    return out


def best_offset(llr: np.ndarray, labels: np.ndarray) -> float:
    """The offset o that minimises the Cllr of ``llr + o`` for (N,) bool ``labels`` (True: same speaker)."""
    from scipy.optimize import minimize_scalar

    tar, non = llr[labels], llr[~labels]
    if not len(tar) or not len(non):
        raise ValueError("band map: the calibration trials need target and non-target pairs")

    def cost(o: float) -> float:
        return float(np.mean(np.logaddexp(0, -(tar + o))) + np.mean(np.logaddexp(0, non + o)))

    return float(minimize_scalar(cost, bounds=(-10.0, 10.0), method="bounded").x)


def fit_band_map(model_dir: Path, real: Path, ridge: float = 1.0, folds: int = 5, min_speech: float = 1.0,
                 seed: int = 0, write: bool = True, log=print) -> dict:
    """Fit both bands' maps and offsets on the calibration speakers; returns (and, with ``write``, stores)
    the card's ``band_map`` (the arrays go to ``band_map.npz`` beside it).

    Raises:
        FileNotFoundError, ValueError: a missing pool, a model without calibration, too few speakers.
    """
    if not ridge > 0:
        raise ValueError(f"--ridge must be > 0, got {ridge!r}")
    if folds < 2:
        raise ValueError(f"--folds must be >= 2, got {folds!r}")
    model_dir, real = Path(model_dir), Path(real)
    model = SpeakerModel(model_dir, ["CPUExecutionProvider"])
    if model.scorer.calibration is None:
        raise ValueError(f"model {model.name} has no calibration: run training.evaluation.calibrate first")
    split = load_kaldi_split(real / "calibration")
    trials = read_trials(real / "calibration" / "trials")
    index = {u: i for i, u in enumerate(split.utts)}
    ia = np.array([index[a] for a, _, _ in trials])
    ib = np.array([index[b] for _, b, _ in trials])
    labels = np.array([lab for *_, lab in trials], bool)
    speakers = np.array(split.spk)
    vad, rate, t0 = SileroVad(), model.sample_rate, time.time()
    clean = render_and_embed(model, vad, split, ["clean"], min_speech, seed)
    weights, mean_x, mean_y, offsets, report = [], [], [], [], {}
    for band in BANDS:
        low_cut = band == "telephone"
        twin = render_and_embed(model, vad, split, ["clean"], min_speech, seed,
                                post=lambda w, low_cut=low_cut: match_band(w, rate, low_cut))
        probe = render_and_embed(model, vad, split, [PROBES[band]], min_speech, seed)
        ok = clean.ok & twin.ok
        held = cross_fitted(clean.emb, twin.emb, speakers, ok, ridge, folds, seed)
        mapped = Rendered(held, clean.speech, clean.narrowband, ok, clean.low_cut)
        decided = mapped.ok[ia] & probe.ok[ib]
        k_a, k_b = ia[decided], ib[decided]
        llr = score_pairs(model, mapped, probe, k_a, k_b, model.scorer.stats(mapped.emb), model.scorer.stats(probe.emb))["llr"]
        offset = best_offset(llr, labels[decided])
        w, mx, my = fit_linear_map(clean.emb[ok], twin.emb[ok], ridge)
        weights.append(w), mean_x.append(mx), mean_y.append(my), offsets.append(offset)
        report[band] = {"probe": PROBES[band], "pairs": int(ok.sum()), "trials": int(decided.sum()),
                        "llr_offset": round(offset, 4), "cllr_before_offset": round(cllr(llr, labels[decided]), 4),
                        "cllr": round(cllr(llr + offset, labels[decided]), 4)}
        log(f"band_map: {band}: {report[band]} ({time.time() - t0:.0f} s)")
    bm = BandMap(np.stack(weights), np.stack(mean_x), np.stack(mean_y), np.array(offsets, np.float32))
    spec = {"file": FILE, "ridge": ridge,
            "fitted_on": {"pool": str(real), "split": "calibration", "speakers": len(set(split.spk)),
                          "utterances": len(split.utts), "folds": folds, "seed": seed, "bands": report}}
    if write:
        card = load_card(model_dir)
        tmp = model_dir / (FILE + ".tmp")
        bm.save(tmp)
        tmp.replace(model_dir / FILE)
        card.band_map = spec
        save_card(card, model_dir)
        log(f"band_map: wrote {model_dir / FILE} and model.json band_map")
    return spec


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.band_map", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path, help="the repository entry to fit")
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--ridge", type=float, default=1.0, help="shrinkage of each map towards the identity")
    ap.add_argument("--folds", type=int, default=5, help="speaker folds for the cross-fitted offsets")
    ap.add_argument("--min-speech", type=float, default=1.0, help="seconds of speech an utterance needs to count")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="fit and print, change nothing")
    args = ap.parse_args(argv)
    try:
        fit_band_map(args.model_dir, args.real, args.ridge, args.folds, args.min_speech, args.seed,
                     write=not args.dry_run)
    except (FileNotFoundError, ValueError) as e:
        print(f"band_map: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
