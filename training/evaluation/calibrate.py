"""Give an exported model a channel-grouped impostor cohort and a score map that hold on real speech.

    .venv/bin/python -m training.evaluation.calibrate --model-dir models/repository/ge2e --real corpus-real [--corpus corpus]
    .venv/bin/python -m training.evaluation.calibrate --model-dir models/repository/ge2e --wav-scp my/wav.scp \\
        --trials my/trials --out models/repository/ge2e-mine          # re-fit on your own labelled trials

The last step of exporting a model. Every embedding is made the way the service makes it:
decode, resample, VAD with the model's options, keep the speech, embed; inputs under
``--min-probe-speech`` seconds of speech are left out (the service answers NOT_ENOUGH_SPEECH).

0. **Spectral tilt** (with ``--fit-tilt``; ``training.evaluation.tilt``): the reference spectrum and
   the range of slopes the real calibration speakers show, written into the card first, so that
   everything below is embedded with the runtime's tilt limit in place.
1. **Cohort** (``training.evaluation.cohort``): the *calibration* speakers of the real-speech pool
   (``python -m training.data.realspeech``) and, with ``--corpus``, ``--synthetic-speakers`` training
   speakers of the synthetic corpus, each through every channel group (clean, telephone band,
   GSM, AMR-NB, Opus, MP3, noise, babble, reverberation): ``--per-speaker`` voiceprints per
   speaker and group, each the mean of ``--cohort-utts`` utterances. Saved as ``cohort.npy``
   (M, D) and ``cohort_groups.npy`` (M,).
2. **Calibration trials**: the real calibration split's trial list under every family of
   ``CALIBRATION_SPECS`` (both sides through the same channel, or only the probe), and with
   ``--corpus`` the same families on a subset of the synthetic evaluation speakers, weighted
   ``--synthetic-weight`` of the total. Scored with channel-matched S-norm, never against the
   side's own speaker.
3. **Map**: ``llr = f(snorm, bandwidth mismatch, band limit, shorter side's speech)`` by prior-weighted
   logistic regression (``models.calibration``).
4. **Operating point**: ``--operating-point llr:2`` (default) accepts when the evidence for the
   same speaker is at least e^2 = 7.4 times that against (the Bayes decision at even prior odds
   when a false accept costs 7.4 false rejects); ``far:RATE`` puts the threshold where RATE of
   the real calibration impostors are accepted; ``cosine-eer`` decides on the cosine scale.
   A table of LLR thresholds per false-accept rate (measured on the real calibration trials)
   serves requests that ask for a target false-accept rate.

Nothing here looks at the real pool's *evaluation* speakers: ``python -m training.evaluation.decisions``
reports on them. With ``--trials`` the model's cohort is kept and only the map is re-fitted on
the operator's trials (``training.evaluation.recalibrate``), written as a new model version under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.artifact import load_card, save_card
from models.calibration import cllr, fit_calibration, min_cllr, threshold_for_far
from models.evaluation import evaluate_scores, read_trials
from models.runtime import SpeakerModel
from models.vad import SileroVad
from training.evaluation.cohort import (
    BANDLIMITED_GROUPS,
    CALIBRATION_SPECS,
    COHORT_GROUPS,
    NARROWBAND_GROUPS,
    Cohort,
    Trials,
    build_cohort,
    score_trials,
)
from training.evaluation.operating_point import FAR_TABLE_RATES, far_table, parse_operating_point
from training.evaluation.realembed import Rendered, Split, load_kaldi_split, model_vad_options, render_and_embed

__all__ = ["FAR_TABLE_RATES", "model_vad_options", "calibrate_model", "parse_operating_point", "far_table",
           "per_spec_figures", "main"]

def per_spec_figures(t: Trials, llr: np.ndarray, decided: np.ndarray, threshold: float) -> dict:
    """EER, Cllr, minCllr, FAR and FRR at ``threshold`` (on ``decided``) per trial family."""
    out = {}
    for spec in dict.fromkeys(t.spec.tolist()):
        m = t.spec == spec
        lab = t.label[m]
        if lab.sum() < 5 or (~lab).sum() < 5:
            continue
        out[spec] = {"eer": round(evaluate_scores(t.snorm[m], lab).eer, 3), "cllr": round(cllr(llr[m], lab), 4),
                     "min_cllr": round(min_cllr(llr[m], lab), 4),
                     "far": round(float((decided[m][~lab] >= threshold).mean()), 5),
                     "frr": round(float((decided[m][lab] < threshold).mean()), 5),
                     "n_target": int(lab.sum()), "n_nontarget": int((~lab).sum())}
    return out


def _render_all(model, vad, split: Split, conditions: list[str], min_speech: float, seed: int, log) -> dict[str, Rendered]:
    out = {}
    for c in conditions:
        t0 = time.time()
        out[c] = render_and_embed(model, vad, split, [c], min_speech, seed)
        log(f"  {c}: {int(out[c].ok.sum())}/{len(split.utts)} with enough speech ({time.time() - t0:.0f} s)")
    return out


def _spec_trials(rendered: dict[str, Rendered], cohort: Cohort, spk: np.ndarray, ia: np.ndarray, ib: np.ndarray,
                 label: np.ndarray, prefix: str = "") -> Trials:
    narrow = np.array([n in NARROWBAND_GROUPS for n in cohort.names] + [False])
    band = np.array([n in BANDLIMITED_GROUPS for n in cohort.names] + [False])
    stats = {c: cohort.stats(r.emb, spk) for c, r in rendered.items()}
    parts = [score_trials(prefix + name, rendered[e], rendered[p], ia, ib, label, stats[e], stats[p], narrow, band)
             for name, (e, p) in CALIBRATION_SPECS.items()]
    return Trials.concat(parts)


def _synthetic(corpus: Path, n_speakers: int, n_eval: int, rng: np.random.Generator,
               log) -> tuple[Split, Split, np.ndarray]:
    """A subset of the synthetic corpus: training speakers for the cohort, evaluation utterances for trials."""
    from training.common import load_split

    utts, waves, u2s = load_split(corpus, "train", progress=False)
    speakers = sorted(set(u2s[u] for u in utts))
    keep = set(rng.choice(speakers, size=min(n_speakers, len(speakers)), replace=False).tolist())
    rows = [(u, w) for u, w in zip(utts, waves) if u2s[u] in keep]
    per: dict[str, list] = {}
    for u, w in rows:
        per.setdefault(u2s[u], []).append((u, w))
    rows = [r for s in sorted(per) for r in per[s][:6]]
    train = Split([u for u, _ in rows], [f"syn:{u2s[u]}" for u, _ in rows], [(w, 16000) for _, w in rows])
    e_utts, e_waves, e_u2s = load_split(corpus, "eval", progress=False)
    pick = sorted(rng.choice(len(e_utts), size=min(n_eval, len(e_utts)), replace=False).tolist())
    ev = Split([e_utts[i] for i in pick], [f"syn:{e_u2s[e_utts[i]]}" for i in pick], [(e_waves[i], 16000) for i in pick])
    log(f"synthetic: {len(keep)} cohort speakers ({len(train.utts)} utterances), {len(ev.utts)} trial utterances")
    return train, ev, np.array(ev.spk)


def _pairs(spk: np.ndarray, rng: np.random.Generator, nontargets_per_utt: int = 20):
    """All same-speaker pairs and random different-speaker pairs of a split: (ia, ib, label)."""
    iu, ju = np.triu_indices(len(spk), k=1)
    same = spk[iu] == spk[ju]
    non = np.flatnonzero(~same)
    non = rng.choice(non, size=min(len(non), nontargets_per_utt * len(spk)), replace=False)
    idx = np.concatenate([np.flatnonzero(same), non])
    return iu[idx], ju[idx], same[idx]


def calibrate_model(model_dir: Path, real: Path, corpus: Path | None = None, *, seed: int = 0, per_speaker: int = 3,
                    cohort_utts: int = 3, synthetic_speakers: int = 60, synthetic_trial_utts: int = 240,
                    synthetic_weight: float = 0.25, min_probe_speech: float = 1.0, operating_point: str = "llr:2",
                    max_per_speaker: int = 0, write: bool = True, log=print) -> dict:
    """Build the cohort, fit the map, choose the operating point (see the module docstring).

    Returns:
        The report (also written into the card's fields when ``write``).

    Raises:
        FileNotFoundError, ValueError: missing or unusable inputs (the message names them).
    """
    kind, value = parse_operating_point(operating_point)
    if not 0.0 <= synthetic_weight < 1.0:
        raise ValueError(f"--synthetic-weight must be in [0, 1), got {synthetic_weight}")
    rng = np.random.default_rng(seed)
    model = SpeakerModel(model_dir, ["CPUExecutionProvider"])
    vad = SileroVad()
    t0 = time.time()
    split = load_kaldi_split(Path(real) / "calibration")
    listed = read_trials(Path(real) / "calibration" / "trials")
    if max_per_speaker:  # a quicker fit: the first N utterances of every speaker, and the trials among them
        if max_per_speaker < 3:
            raise ValueError(f"--max-per-speaker must be 0 (all) or >= 3, got {max_per_speaker}")
        seen: dict[str, int] = {}
        keep = []
        for i, spk in enumerate(split.spk):
            seen[spk] = seen.get(spk, 0) + 1
            if seen[spk] <= max_per_speaker:
                keep.append(i)
        split = type(split)([split.utts[i] for i in keep], [split.spk[i] for i in keep], [split.audio[i] for i in keep])
        kept = set(split.utts)
        listed = [t for t in listed if t[0] in kept and t[1] in kept]
    index = {u: i for i, u in enumerate(split.utts)}
    unknown = [a for a, b, _ in listed if a not in index or b not in index]
    if unknown:
        raise ValueError(f"{Path(real) / 'calibration' / 'trials'}: utterance {unknown[0]!r} is not in wav.scp")
    ia = np.array([index[a] for a, _, _ in listed])
    ib = np.array([index[b] for _, b, _ in listed])
    label = np.array([lab for *_, lab in listed], bool)
    conditions = list(dict.fromkeys(list(COHORT_GROUPS.values()) + [c for pair in CALIBRATION_SPECS.values() for c in pair]))
    log(f"real calibration speakers: {len(set(split.spk))}, {len(split.utts)} utterances, rendering {len(conditions)} conditions")
    rendered = _render_all(model, vad, split, conditions, min_probe_speech, seed, log)
    cohort = build_cohort(rendered, split.spk, per_speaker, cohort_utts, rng)
    syn_parts = None
    if corpus is not None and synthetic_weight > 0:
        train, ev, ev_spk = _synthetic(Path(corpus), synthetic_speakers, synthetic_trial_utts, rng, log)
        syn_cohort = build_cohort(_render_all(model, vad, train, list(COHORT_GROUPS.values()), min_probe_speech, seed, log),
                                  train.spk, 1, cohort_utts, rng)
        cohort = cohort.concat(syn_cohort)
        syn_rendered = _render_all(model, vad, ev, conditions, min_probe_speech, seed, log)
        syn_parts = (syn_rendered, ev_spk)
    log(f"cohort: {len(cohort.vectors)} voiceprints in {len(cohort.names)} channel groups ({time.time() - t0:.0f} s)")
    trials = _spec_trials(rendered, cohort, np.array(split.spk), ia, ib, label)
    weights = np.ones(len(trials.label))
    n_real = len(trials.label)
    if syn_parts is not None:
        syn_rendered, ev_spk = syn_parts
        sa, sb, sl = _pairs(ev_spk, rng)
        syn = _spec_trials(syn_rendered, cohort, ev_spk, sa, sb, sl, prefix="synthetic ")
        weights = np.concatenate([weights, np.ones(len(syn.label))])
        for cls in (True, False):  # each class: real trials 1 - w of its weight, synthetic w
            r, s = trials.label == cls, syn.label == cls
            weights[:n_real][r] = (1 - synthetic_weight) / r.sum()
            weights[n_real:][s] = synthetic_weight / max(s.sum(), 1)
        trials = Trials.concat([trials, syn])
    fit = fit_calibration(trials.snorm, trials.label, mismatch=trials.mismatch, min_speech=trials.min_speech,
                          weights=weights, band=trials.band)
    llr = fit.llr(trials.snorm, trials.mismatch, trials.min_speech, trials.band)
    real_rows = np.arange(len(trials.label)) < n_real
    log(f"map: {json.dumps(fit.to_card())}; {int(trials.label.sum())} target / {int((~trials.label).sum())} "
        f"non-target trials ({time.time() - t0:.0f} s)")
    cos_eer = evaluate_scores(trials.cosine[real_rows], trials.label[real_rows])
    r_llr, r_lab = llr[real_rows], trials.label[real_rows]
    scale = "llr"
    if kind == "cosine-eer":
        scale, threshold = "cosine", round(cos_eer.eer_threshold, 4)
        rule = ("the cosine at the real calibration trials' equal-error point (for models whose normalised scores "
                "separate speakers worse than their cosines)")
    elif kind == "far":
        threshold, _, _ = threshold_for_far(r_llr, r_lab, value)
        rule = f"the LLR at which {100 * value:g}% of the real calibration trials' impostor pairs are accepted"
    else:
        threshold = value
        rule = (f"LLR >= {threshold:g}: accept when the same-speaker hypothesis is at least {np.exp(threshold):.1f} times "
                f"as likely as the other (Bayes decision at even prior odds when a false accept costs "
                f"{np.exp(threshold):.1f} false rejects)")
    decided = trials.cosine if scale == "cosine" else llr
    far = float((decided[real_rows][~r_lab] >= threshold).mean())
    frr = float((decided[real_rows][r_lab] < threshold).mean())
    report = {
        "model": model.name,
        "cohort": {"file": "cohort.npy", "groups_file": "cohort_groups.npy", "size": int(len(cohort.vectors)),
                   "embedding_dim": int(cohort.vectors.shape[1]), "groups": cohort.names,
                   "narrowband_groups": NARROWBAND_GROUPS, "bandlimited_groups": BANDLIMITED_GROUPS,
                   "normalization": "channel-matched S-norm",
                   "speakers": int(len(set(cohort.speakers.tolist()))),
                   "source": f"{real}/calibration: {len(set(split.spk))} real speakers"
                             + (f"; {corpus}/train: {synthetic_speakers} synthetic speakers" if syn_parts else "")
                             + f"; each through {len(cohort.names)} channel groups, {per_speaker} (real) / 1 (synthetic) "
                               f"voiceprints per group of up to {cohort_utts} utterances (VAD as served)"},
        "calibration_trials": {"real": f"{real}/calibration", "synthetic": str(corpus) if syn_parts else None,
                               "synthetic_weight": synthetic_weight if syn_parts else 0.0, "seed": seed,
                               "families": CALIBRATION_SPECS, "min_probe_speech_seconds": min_probe_speech,
                               "n_target": int(r_lab.sum()), "n_nontarget": int((~r_lab).sum()),
                               "cllr": round(cllr(r_llr, r_lab), 4), "min_cllr": round(min_cllr(r_llr, r_lab), 4),
                               "eer_cosine": round(cos_eer.eer, 3)},
        "map": fit.to_card(),
        "operating_point": {"scale": scale, "threshold": round(float(threshold), 4), "rule": rule,
                            "far": round(far, 5), "frr": round(frr, 5), "measured_on": "real calibration trials",
                            "far_table": far_table(r_llr, r_lab)},
        "per_family": per_spec_figures(trials, llr, decided, threshold),
        "cosine_eer_threshold": round(cos_eer.eer_threshold, 4),
    }
    log(f"operating point: {scale} >= {threshold:g}: FAR {far:.4f} FRR {frr:.4f} on the real calibration trials")
    if write:
        np.save(model_dir / "cohort.npy", cohort.vectors)
        np.save(model_dir / "cohort_groups.npy", cohort.groups.astype(np.int16))
        desc = dict(report["cohort"])
        desc["sha256"] = hashlib.sha256((model_dir / "cohort.npy").read_bytes()).hexdigest()
        card = load_card(model_dir)
        card.cohort = desc
        card.calibration = {"score": "snorm", **fit.to_card(), "fitted_on": report["calibration_trials"],
                            "per_family": report["per_family"]}
        card.operating_point = report["operating_point"]
        card.threshold = report["cosine_eer_threshold"]
        card.format_version = 3
        stale_band_map = card.band_map is not None
        card.band_map = None  # its LLR offsets were fitted on the old calibration
        save_card(card, model_dir)
        log(f"wrote {model_dir / 'cohort.npy'}, cohort_groups.npy and {model_dir / 'model.json'}")
        if stale_band_map:
            log("the card's band map was fitted on the old calibration and is dropped: fit it again with "
                f"python -m training.evaluation.band_map --model-dir {model_dir} --real <pool>")
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.calibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path, help="the repository entry to calibrate")
    ap.add_argument("--real", type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--corpus", type=Path, help="the synthetic corpus (python -m training.data.corpus), optional")
    ap.add_argument("--wav-scp", type=Path, help="your own recordings: 'utt path' per line (with --trials)")
    ap.add_argument("--trials", type=Path, help="your own trials: 'utt1 utt2 target|nontarget' per line")
    ap.add_argument("--out", type=Path, help="with --trials: the new repository entry to write")
    ap.add_argument("--version", help="with --trials: the new model version (default: <version>+recal); with --fit-tilt: "
                         "the new version, needed when the fitted limit differs from the card's")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-speaker", type=int, default=3, help="cohort voiceprints per real speaker and channel group")
    ap.add_argument("--cohort-utts", type=int, default=3)
    ap.add_argument("--synthetic-speakers", type=int, default=60)
    ap.add_argument("--synthetic-weight", type=float, default=0.25)
    ap.add_argument("--min-probe-speech", type=float, default=1.0)
    ap.add_argument("--max-per-speaker", type=int, default=0,
                    help="use at most this many utterances of each real calibration speaker (0: all; quicker fits)")
    ap.add_argument("--operating-point", default=None, help="llr:THRESHOLD (default llr:2), far:RATE or cosine-eer")
    ap.add_argument("--fit-tilt", action="store_true",
                    help="first fit the card's input_tilt on the real calibration speakers (training.evaluation.tilt)")
    ap.add_argument("--report", type=Path, help="also write the report here")
    ap.add_argument("--dry-run", action="store_true", help="fit and report, change nothing")
    args = ap.parse_args(argv)
    for name in ("per_speaker", "cohort_utts", "synthetic_speakers"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        if args.trials or args.wav_scp:
            from training.evaluation.recalibrate import recalibrate_on_trials

            if not (args.trials and args.wav_scp and (args.out or args.dry_run)):
                ap.error("--trials needs --wav-scp and --out (or --dry-run)")
            report = recalibrate_on_trials(args.model_dir, args.wav_scp, args.trials, args.out, version=args.version,
                                           operating_point=args.operating_point, min_probe_speech=args.min_probe_speech,
                                           write=not args.dry_run)
        else:
            if args.real is None:
                ap.error("give --real (the real-speech pool), or --wav-scp and --trials (your own data)")
            if args.fit_tilt:
                if args.dry_run:
                    ap.error("--fit-tilt writes the card before embedding; run training.evaluation.tilt --dry-run alone")
                from training.evaluation.tilt import fit_tilt

                fit_tilt(args.model_dir, args.real, version=args.version)
            report = calibrate_model(args.model_dir, args.real, args.corpus, seed=args.seed, per_speaker=args.per_speaker,
                                     cohort_utts=args.cohort_utts, synthetic_speakers=args.synthetic_speakers,
                                     synthetic_weight=args.synthetic_weight, min_probe_speech=args.min_probe_speech,
                                     max_per_speaker=args.max_per_speaker,
                                     operating_point=args.operating_point or "llr:2", write=not args.dry_run)
    except (FileNotFoundError, ValueError) as e:
        print(f"calibrate: {e}", file=sys.stderr)
        return 2
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
