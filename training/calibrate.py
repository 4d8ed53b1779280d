"""Give an exported model an impostor cohort and a score calibration that hold across channels.

    .venv/bin/python -m training.calibrate --corpus corpus --model-dir models/repository/ge2e

The last step of exporting a model. Every embedding here is made the way the service makes
it: decode, resample to the model's rate, Silero VAD with the model's options, keep the
speech, embed; inputs the service would refuse (under ``--min-probe-speech`` seconds of speech)
are left out. Each utterance first passes through random recording and channel conditions
(``training.channels``: telephone band and G.711, GSM, AMR-NB, Opus, MP3, noise, reverberation,
silence and noise padding, pauses, low level), so neither the cohort nor the calibration has
seen only clean synthesis.

1. **Cohort**: ``--cohort-per-speaker`` voiceprints of every training speaker, each the mean of
   ``--cohort-utts`` utterances under random conditions; saved as ``cohort.npy`` (M, D) float32.
2. **Calibration trials** from the evaluation speakers (never used for training): every
   utterance under ``--draws`` random condition draws; single-utterance pairs and
   enrolled-voiceprint (mean of 3 utterances) vs utterance pairs, as the service scores them.
   S-norm against the cohort, then ``llr = a * snorm + b`` by prior-weighted logistic
   regression (``models.scoring.fit_calibration``).
3. **Operating point**: ``--operating-point llr:3`` (default) accepts when the evidence for the
   same speaker is at least e^3 = 20 times that against: the Bayes decision at even prior
   odds when a false accept costs 20 false rejects. ``far:RATE`` instead puts the threshold
   where RATE of the calibration trials' impostor pairs are accepted; ``cosine-eer`` decides on
   the cosine scale at the calibration trials' equal-error point (for models whose S-norm scores
   separate speakers worse than their cosines, as the small SSL students here).
4. **Held-out check** on ``--heldout-split`` (the reserved voices): the same trials with the
   fitted cohort, map and threshold: EER, minDCF, Cllr and minCllr overall and per condition.

Writes ``cohort.npy`` and the ``cohort``, ``calibration``, ``operating_point`` and (cosine,
for requests that ask for it) ``threshold`` fields of ``model.json``, plus a JSON report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.artifact import load_card, save_card
from models.audio import condition
from models.evaluation import evaluate_scores
from models.runtime import SpeakerModel
from models.scoring import cllr, cohort_stats, fit_calibration, min_cllr, threshold_for_far
from models.vad import SileroVad, VadOptions, keep_speech
from training.channels import apply_conditions, random_conditions
from training.common import load_split

__all__ = ["Embedded", "embed_conditions", "pair_trials", "build_cohort", "calibrate_model", "main"]


@dataclass
class Embedded:
    """Embeddings of utterances under conditions, with what they came from."""

    emb: np.ndarray  # (N, D) unit
    speech: np.ndarray  # (N,) net speech seconds
    utt: list[str]
    spk: list[str]
    cond: list[str]

    def subset(self, idx: np.ndarray) -> "Embedded":
        """The rows ``idx``."""
        return Embedded(self.emb[idx], self.speech[idx], [self.utt[i] for i in idx], [self.spk[i] for i in idx],
                        [self.cond[i] for i in idx])


def model_vad_options(card) -> VadOptions:
    """The service's default VAD options with the model's own overrides."""
    return VadOptions(**{k: v for k, v in (card.vad or {}).items() if v is not None})


def embed_conditions(model: SpeakerModel, vad: SileroVad, items: list[tuple[str, str, np.ndarray, list[str]]],
                     rng: np.random.Generator, bank: list[np.ndarray], min_speech: float,
                     chunk: int = 256) -> Embedded:
    """Render every (utt, spk, 16 kHz wave, conditions) item and embed it as the service would.

    Items whose speech (after VAD) is shorter than ``min_speech`` seconds are left out.
    """
    opts = model_vad_options(model.card)
    rows, embs = [], []
    pending: list[np.ndarray] = []

    def flush() -> None:
        if pending:
            embs.append(model.embed_many(pending))
            pending.clear()

    for utt, spk, wave, conds in items:
        samples, rate = apply_conditions(conds, wave, rng, bank)
        wav = condition(samples[:, None], rate, model.sample_rate)  # the service's resampling
        speech = keep_speech(wav, vad.segments(wav, model.sample_rate, opts))
        seconds = len(speech) / model.sample_rate
        if seconds < max(min_speech, model.card.min_audio_seconds):
            continue
        rows.append((utt, spk, "+".join(conds), seconds))
        pending.append(speech)
        if len(pending) >= chunk:
            flush()
    flush()
    if not rows:
        raise ValueError("no utterance kept enough speech after VAD; is the corpus silent?")
    emb = np.concatenate(embs).astype(np.float32)
    return Embedded(emb, np.array([r[3] for r in rows]), [r[0] for r in rows], [r[1] for r in rows],
                    [r[2] for r in rows])


def build_cohort(model: SpeakerModel, vad: SileroVad, corpus: Path, per_speaker: int, utts_per_print: int,
                 rng: np.random.Generator, min_speech: float) -> tuple[np.ndarray, dict]:
    """Cohort voiceprints of the training speakers under random conditions: (M, D) and a description."""
    utts, waves, utt2spk = load_split(corpus, "train")
    by_spk: dict[str, list[int]] = {}
    for i, u in enumerate(utts):
        by_spk.setdefault(utt2spk[u], []).append(i)
    items, owner = [], []
    for spk in sorted(by_spk):
        idx = rng.permutation(by_spk[spk])
        for p in range(per_speaker):
            for i in idx[p * utts_per_print:(p + 1) * utts_per_print]:
                items.append((utts[i], spk, waves[i], random_conditions(rng)))
                owner.append(f"{spk}#{p}")
    bank = [waves[i] for i in rng.choice(len(waves), size=min(64, len(waves)), replace=False)]
    # owner tags ride in the utt field so voiceprints can be grouped after filtering
    items = [(owner[j], spk, w, c) for j, (_, spk, w, c) in enumerate(items)]
    e = embed_conditions(model, vad, items, rng, bank, min_speech)
    groups: dict[str, list[int]] = {}
    for i, tag in enumerate(e.utt):
        groups.setdefault(tag, []).append(i)
    prints = []
    for tag in sorted(groups):
        v = e.emb[groups[tag]].astype(np.float64).sum(0)
        prints.append(v / np.linalg.norm(v))
    cohort = np.stack(prints).astype(np.float32)  # (M, D)
    desc = {"file": "cohort.npy", "size": int(len(cohort)), "embedding_dim": int(cohort.shape[1]),
            "source": f"{corpus}/train: {len(by_spk)} training speakers x {per_speaker} voiceprints, each the mean "
                      f"of up to {utts_per_print} utterances under random channel conditions (VAD as served)",
            "speakers": len(by_spk)}
    return cohort, desc


def _voiceprints(e: Embedded, per_speaker: int, utts: int, rng: np.random.Generator) -> tuple[np.ndarray, list[str], list[set]]:
    """Enrolment voiceprints: means of ``utts`` random rows of a speaker; (P, D), speakers, source utterances."""
    by_spk: dict[str, list[int]] = {}
    for i, s in enumerate(e.spk):
        by_spk.setdefault(s, []).append(i)
    prints, spks, srcs = [], [], []
    for s in sorted(by_spk):
        rows = by_spk[s]
        if len(rows) < utts + 1:
            continue
        for _ in range(per_speaker):
            pick = rng.choice(rows, size=utts, replace=False)
            v = e.emb[pick].astype(np.float64).sum(0)
            prints.append(v / np.linalg.norm(v))
            spks.append(s)
            srcs.append({e.utt[i] for i in pick})
    return np.stack(prints).astype(np.float32), spks, srcs


def pair_trials(e: Embedded, cohort: np.ndarray, rng: np.random.Generator, max_nontarget: int = 200_000,
                voiceprints_per_speaker: int = 8) -> dict[str, np.ndarray]:
    """Trials as the service scores them: utterance pairs and voiceprint-vs-utterance pairs.

    Same-utterance pairs (the same recording under two conditions) are left out of the target
    trials. Returns arrays ``cosine``, ``snorm``, ``label``, ``cond`` (the test side's
    condition) and ``kind`` ("pair" or "voiceprint").
    """
    stats = cohort_stats(e.emb, cohort)  # (N, 2)
    spk = np.array(e.spk)
    utt = np.array(e.utt)
    cond = np.array(e.cond)
    out = {k: [] for k in ("cosine", "snorm", "label", "cond", "kind")}

    def add(cos, es, ts, lab, c, kind):
        out["cosine"].append(cos)
        out["snorm"].append(0.5 * ((cos - es[:, 0]) / es[:, 1] + (cos - ts[:, 0]) / ts[:, 1]))
        out["label"].append(lab)
        out["cond"].append(c)
        out["kind"].append(np.full(len(cos), kind))

    # utterance pairs (i < j)
    iu, ju = np.triu_indices(len(spk), k=1)
    same = spk[iu] == spk[ju]
    target = same & (utt[iu] != utt[ju])
    non = np.flatnonzero(~same)
    if len(non) > max_nontarget:
        non = rng.choice(non, size=max_nontarget, replace=False)
    for sel, lab in ((np.flatnonzero(target), 1), (non, 0)):
        a, b = iu[sel], ju[sel]
        cos = np.einsum("nd,nd->n", e.emb[a], e.emb[b]).astype(np.float64)
        add(cos, stats[a], stats[b], np.full(len(sel), lab), cond[b], "pair")
    # enrolled voiceprints (3 utterances) vs single utterances
    prints, pspk, psrc = _voiceprints(e, voiceprints_per_speaker, 3, rng)
    pstats = cohort_stats(prints, cohort)
    cos = prints @ e.emb.T  # (P, N)
    for p in range(len(prints)):
        keep = np.array([u not in psrc[p] for u in e.utt])
        lab = (spk == pspk[p]).astype(int)
        idx = np.flatnonzero(keep)
        add(cos[p, idx].astype(np.float64), np.repeat(pstats[p:p + 1], len(idx), 0), stats[idx], lab[idx],
            cond[idx], "voiceprint")
    return {k: np.concatenate(v) for k, v in out.items()}


def _figures(scores: np.ndarray, labels: np.ndarray, llr: np.ndarray | None = None) -> dict:
    r = evaluate_scores(scores, labels)
    d = {"eer": round(r.eer, 3), "min_dcf_p0.01": round(r.min_dcf_01, 4), "n_target": r.n_target,
         "n_nontarget": r.n_nontarget}
    if llr is not None:
        d["cllr"] = round(cllr(llr, labels), 4)
        d["min_cllr"] = round(min_cllr(llr, labels), 4)
    return d


def _per_condition(t: dict, llr: np.ndarray, decided: np.ndarray, threshold: float) -> dict:
    """Figures per test-side condition; FAR/FRR of ``decided`` (the decision scale's scores) at ``threshold``."""
    out = {}
    for c in sorted(set(t["cond"].tolist())):
        m = t["cond"] == c
        lab = t["label"][m]
        if lab.sum() < 5 or (1 - lab).sum() < 5:
            continue
        f = _figures(t["snorm"][m], lab, llr[m])
        f["far"] = round(float((decided[m][lab == 0] >= threshold).mean()), 4)
        f["frr"] = round(float((decided[m][lab == 1] < threshold).mean()), 4)
        out[c] = f
    return out


def calibrate_model(model_dir: Path, corpus: Path, *, seed: int = 0, draws: int = 2, cohort_per_speaker: int = 2,
                    cohort_utts: int = 6, min_probe_speech: float = 1.0, operating_point: str = "llr:3",
                    heldout_split: str | None = "reserved", write: bool = True, log=print) -> dict:
    """Build the cohort, fit the calibration, choose the operating point, check on held-out voices.

    Returns:
        The report (also written into the card's fields when ``write``).
    """
    kind, _, value = operating_point.partition(":")
    if not (kind in ("far", "llr") and value or operating_point == "cosine-eer"):
        raise ValueError(f"--operating-point must be llr:THRESHOLD, far:RATE or cosine-eer, got {operating_point!r}")
    rng = np.random.default_rng(seed)
    model = SpeakerModel(model_dir, ["CPUExecutionProvider"])
    vad = SileroVad()
    t0 = time.time()
    cohort, cohort_desc = build_cohort(model, vad, corpus, cohort_per_speaker, cohort_utts, rng, min_probe_speech)
    log(f"cohort: {len(cohort)} voiceprints ({time.time() - t0:.0f} s)")

    def trials_of(split: str) -> dict:
        utts, waves, utt2spk = load_split(corpus, split, progress=False)
        bank = [waves[i] for i in rng.choice(len(waves), size=min(48, len(waves)), replace=False)]
        items = [(u, utt2spk[u], w, random_conditions(rng)) for _ in range(draws) for u, w in zip(utts, waves)]
        e = embed_conditions(model, vad, items, rng, bank, min_probe_speech)
        return pair_trials(e, cohort, rng), len(items), len(e.utt)

    cal, n_items, n_kept = trials_of("eval")
    log(f"calibration trials: {int(cal['label'].sum())} target / {int((1 - cal['label']).sum())} non-target "
        f"from {n_kept} of {n_items} rendered utterances ({time.time() - t0:.0f} s)")
    fit = fit_calibration(cal["snorm"], cal["label"])
    llr = fit.llr(cal["snorm"])
    cos_eer = evaluate_scores(cal["cosine"], cal["label"])
    scale = "llr"
    if kind == "cosine-eer":
        scale, threshold = "cosine", round(cos_eer.eer_threshold, 4)
        far = float((cal["cosine"][cal["label"] == 0] >= threshold).mean())
        frr = float((cal["cosine"][cal["label"] == 1] < threshold).mean())
        rule = ("the cosine at the calibration trials' equal-error point (for models whose S-norm scores "
                "separate speakers worse than their cosines)")
    elif kind == "far":
        threshold, far, frr = threshold_for_far(llr, cal["label"], float(value))
        rule = f"the LLR at which {100 * float(value):g}% of the calibration trials' impostor pairs are accepted"
    else:
        threshold = float(value)
        far = float((llr[cal["label"] == 0] >= threshold).mean())
        frr = float((llr[cal["label"] == 1] < threshold).mean())
        rule = (f"LLR >= {threshold:g}: accept when the same-speaker hypothesis is at least {np.exp(threshold):.0f} times "
                f"as likely as the other (Bayes decision at even prior odds when a false accept costs "
                f"{np.exp(threshold):.0f} false rejects)")
    table = [[t, round(float((llr[cal["label"] == 0] >= t).mean()), 5), round(float((llr[cal["label"] == 1] < t).mean()), 5)]
             for t in (-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)]
    report = {
        "model": model.name,
        "cohort": cohort_desc,
        "calibration_trials": {"split": f"{corpus}/eval", "draws_per_utterance": draws, "rendered": n_items,
                               "kept": n_kept, "min_probe_speech_seconds": min_probe_speech, "seed": seed,
                               "raw_cosine": _figures(cal["cosine"], cal["label"]),
                               "snorm": _figures(cal["snorm"], cal["label"], llr)},
        "map": {"scale": fit.scale, "offset": fit.offset},
        "operating_point": {"scale": scale, "threshold": round(threshold, 4), "rule": rule,
                            "far": round(far, 5), "frr": round(frr, 5), "table_llr_far_frr": table},
        "per_condition": _per_condition(cal, llr, cal["cosine"] if scale == "cosine" else llr, threshold),
        "cosine_eer_threshold": round(cos_eer.eer_threshold, 4),
    }
    log(f"fit: llr = {fit.scale:.4f} * snorm + {fit.offset:.4f}; {json.dumps(report['calibration_trials']['snorm'])}")
    if heldout_split and (corpus / heldout_split / "wav.scp").is_file():
        held, _, _ = trials_of(heldout_split)
        hl = fit.llr(held["snorm"])
        hd = held["cosine"] if scale == "cosine" else hl
        report["heldout"] = {"split": f"{corpus}/{heldout_split}", "raw_cosine": _figures(held["cosine"], held["label"]),
                             "snorm": _figures(held["snorm"], held["label"], hl),
                             "far": round(float((hd[held["label"] == 0] >= threshold).mean()), 5),
                             "frr": round(float((hd[held["label"] == 1] < threshold).mean()), 5),
                             "per_condition": _per_condition(held, hl, hd, threshold)}
        log(f"held out ({heldout_split}): {json.dumps(report['heldout']['snorm'])} far {report['heldout']['far']} "
            f"frr {report['heldout']['frr']}")
    if write:
        np.save(model_dir / "cohort.npy", cohort)
        cohort_desc["sha256"] = hashlib.sha256((model_dir / "cohort.npy").read_bytes()).hexdigest()
        card = load_card(model_dir)
        card.cohort = cohort_desc
        card.calibration = {"score": "snorm", "scale": round(fit.scale, 6), "offset": round(fit.offset, 6),
                            "fitted_on": report["calibration_trials"], "heldout": report.get("heldout")}
        card.operating_point = report["operating_point"]
        card.threshold = report["cosine_eer_threshold"]
        card.format_version = 2
        save_card(card, model_dir)
        log(f"wrote {model_dir / 'cohort.npy'} and {model_dir / 'model.json'}")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True, type=Path)
    ap.add_argument("--model-dir", required=True, type=Path, help="the repository entry to calibrate (updated in place)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--draws", type=int, default=2, help="condition draws per calibration utterance")
    ap.add_argument("--cohort-per-speaker", type=int, default=2)
    ap.add_argument("--cohort-utts", type=int, default=6)
    ap.add_argument("--min-probe-speech", type=float, default=1.0)
    ap.add_argument("--operating-point", default="llr:3", help="llr:THRESHOLD, far:RATE or cosine-eer")
    ap.add_argument("--heldout-split", default="reserved")
    ap.add_argument("--report", type=Path, help="also write the report here")
    ap.add_argument("--dry-run", action="store_true", help="fit and report, change nothing")
    args = ap.parse_args(argv)
    for name in ("draws", "cohort_per_speaker", "cohort_utts"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        report = calibrate_model(args.model_dir, args.corpus, seed=args.seed, draws=args.draws,
                                 cohort_per_speaker=args.cohort_per_speaker, cohort_utts=args.cohort_utts,
                                 min_probe_speech=args.min_probe_speech, operating_point=args.operating_point,
                                 heldout_split=args.heldout_split, write=not args.dry_run)
    except (FileNotFoundError, ValueError) as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
