"""Whether the service's answers hold on real speech: FA / FR / Cllr per channel, and open-set Identify.

    .venv/bin/python -m training.evaluation.decisions --real corpus-real --model ge2e --out runs/decisions

Runs the real-speech pool's *evaluation* speakers (never used to fit anything) through the
channels of ``EVAL_SPECS`` and scores every trial exactly as the service does: VAD with the
model's options, NOT_ENOUGH_SPEECH under ``--min-probe-speech`` seconds, channel-matched S-norm
against the model's cohort, the calibrated LLR with its quality terms, and the model's default
operating point. Prints one table (and writes ``results.json`` / ``results.md``):

* per condition: false accepts and false rejects at the operating point (of the trials where
  both sides had enough speech), the share answered NOT_ENOUGH_SPEECH, actual and minimum Cllr,
  EER, and the impostors' mean normalised score;
* per channel: the share of single recordings with too little speech (VAD on degraded audio);
* the one-talker check: how often one speaker, one speaker with babble behind, and two speakers
  in turn are flagged ``multiple_speakers``;
* open-set Identify: for collections of ``--identify-sizes`` speakers, how often a probe of a
  speaker who is *not* enrolled comes back ``is_match`` (stranger false match), and how often an
  enrolled speaker's probe is not matched to them (true-match miss), with the collection-size
  rule (LLR >= operating point + ln N) and, for comparison, the single-pair rule. Collections
  hold real evaluation speakers (3 clean utterances each); beyond them they are filled with
  *simulated* voiceprints, drawn from a Gaussian fitted to the real calibration speakers'
  voiceprints (shrunk towards a scaled identity; the report compares their scores against
  strangers with real impostors').
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from models.band_match import match_band, wider_than_pair
from models.calibration import cllr, min_cllr
from models.evaluation import evaluate_scores, read_trials
from models.runtime import SpeakerModel
from models.vad import SileroVad
from training.evaluation.open_set import open_set_identify, simulated_voiceprints, simulation_check
from training.evaluation.realembed import Rendered, load_kaldi_split, render_and_embed

__all__ = ["EVAL_SPECS", "EVAL_LABELS", "BAND_MATCHED", "BAND_MAPPED", "band_mapped_pairs", "matched_key", "band_match_needs", "band_matched_pairs", "score_pairs", "one_talker_rates", "evaluate_conditions",
           "markdown", "main"]

REPO = Path(__file__).resolve().parents[2] / "models" / "repository"

# condition -> (enrolment side, probe side): both sides through a channel, or the probe only
EVAL_SPECS = {
    "clean": ("clean", "clean"),
    "telephone-both": ("telephone", "telephone"),
    "telephone-probe": ("clean", "telephone"),
    "telephone-probe-mapped": ("clean", "telephone"),
    "telephone-probe-matched": ("clean", "telephone"),
    "gsm-probe": ("clean", "gsm"),
    "gsm-probe-mapped": ("clean", "gsm"),
    "gsm-probe-matched": ("clean", "gsm"),
    "amr-probe": ("clean", "amr"),
    "amr-probe-mapped": ("clean", "amr"),
    "amr-probe-matched": ("clean", "amr"),
    "gsm-both": ("gsm", "gsm"),
    "opus-both": ("opus", "opus"),
    "mp3-both": ("mp3", "mp3"),
    "white10-both": ("white10", "white10"),
    "babble10-both": ("babble10", "babble10"),
    "reverb-probe": ("clean", "reverb"),
    "quiet-probe": ("clean", "quiet"),
    "loud-probe": ("clean", "loud"),
    "level-both": ("level", "level"),
    "dc-probe": ("clean", "dc"),
    "mic-probe": ("clean", "mic"),
    "hum-probe": ("clean", "hum"),
    "highpass-probe": ("clean", "highpass"),
    "silence-both": ("silence_pad", "silence_pad"),
    "short-probe": ("clean", "short15"),
}
# Verify of two recordings: one narrowband, the other wideband, the wideband one embedded again in the narrow one's
# band (the service's band_match). The rows without it are a probe against a stored voiceprint or an embedding.
BAND_MATCHED = frozenset({"telephone-probe-matched", "gsm-probe-matched", "amr-probe-matched"})
# A narrowband recording against a wideband voiceprint, the voiceprint carried into the probe's band by the model's
# band map (models.band_map) and the pair's LLR offset added: what the service does with a voiceprint by default.
BAND_MAPPED = frozenset({"telephone-probe-mapped", "gsm-probe-mapped", "amr-probe-mapped"})
EVAL_LABELS = {
    "clean": "clean", "telephone-both": "telephone band (300-3400 Hz, 8 kHz mu-law), both sides",
    "telephone-probe": "telephone band, probe only (against a voiceprint, not band-mapped)",
    "telephone-probe-mapped": "telephone band, probe only (against a voiceprint, band-mapped)",
    "telephone-probe-matched": "telephone band, probe only, two recordings (band-matched)",
    "gsm-probe": "GSM 06.10, probe only (against a voiceprint, not band-mapped)",
    "gsm-probe-mapped": "GSM 06.10, probe only (against a voiceprint, band-mapped)",
    "gsm-probe-matched": "GSM 06.10, probe only, two recordings (band-matched)",
    "amr-probe": "AMR-NB, probe only (against a voiceprint, not band-mapped)",
    "amr-probe-mapped": "AMR-NB, probe only (against a voiceprint, band-mapped)",
    "amr-probe-matched": "AMR-NB, probe only, two recordings (band-matched)", "gsm-both": "GSM 06.10, both sides",
    "opus-both": "Opus 9-20 kbit/s, both sides", "mp3-both": "MP3, low bitrate, both sides",
    "white10-both": "white noise 10 dB SNR, both sides", "babble10-both": "babble 10 dB SNR, both sides",
    "reverb-probe": "reverberation, probe only", "quiet-probe": "25 dB quieter, probe only",
    "loud-probe": "10 dB louder (clipped at full scale), probe only",
    "level-both": "each side -10 to +10 dB (clipped at full scale)",
    "dc-probe": "a DC offset of 5% of full scale, probe only",
    "mic-probe": "another microphone (tilt +-6 dB/octave, three resonances +-9 dB), probe only",
    "hum-probe": "mains hum 8-20 dB under the speech, probe only",
    "highpass-probe": "300 Hz high-pass (small microphone, VoIP front end), probe only",
    "silence-both": "3 s silence before and after, both sides", "short-probe": "probe cut to 1.5 s of speech",
}


def score_pairs(model: SpeakerModel, a: Rendered, b: Rendered, ia: np.ndarray, ib: np.ndarray,
                stats_a: np.ndarray, stats_b: np.ndarray, speech_a: np.ndarray | None = None,
                speech_b: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Cosine, normalised and LLR scores of pairs (a[ia[k]], b[ib[k]]) as the service computes them."""
    scorer = model.scorer
    cos = np.clip(np.einsum("nd,nd->n", a.emb[ia], b.emb[ib]).astype(np.float64), -1, 1)
    sa, sb = stats_a[ia], stats_b[ib]
    norm = 0.5 * ((cos - sa[:, 0]) / sa[:, 1] + (cos - sb[:, 0]) / sb[:, 1])
    out = {"cosine": cos, "normalized": norm}
    if scorer.calibration is not None:
        ta = (a.speech if speech_a is None else speech_a)[ia]
        tb = (b.speech if speech_b is None else speech_b)[ib]
        mismatch, band = scorer.pair_quality(sa, sb)
        out["llr"] = scorer.calibration.llr(norm, mismatch, np.minimum(ta, tb), band)
    return out


def _figures(sc: dict, lab: np.ndarray, scale: str, threshold: float) -> dict:
    r = {}
    if lab.any() and (~lab).any():
        r["eer"] = round(evaluate_scores(sc["cosine"], lab).eer, 2)
        dec = sc[scale] >= threshold
        r.update(far=round(float(dec[~lab].mean()), 4), frr=round(float((~dec[lab]).mean()), 4))
        if "llr" in sc:
            r.update(cllr=round(cllr(sc["llr"], lab), 3), min_cllr=round(min_cllr(sc["llr"], lab), 3))
        r["impostor_normalized_mean"] = round(float(sc["normalized"][~lab].mean()), 2)
    return r


def matched_key(cond: str, low_cut: bool) -> str:
    """The ``rendered`` key of ``cond``'s recordings embedded in a narrowband channel's band (``match_band``)."""
    return f"{cond}|band-matched{'-low-cut' if low_cut else ''}"


def _trial_rows(r: Rendered, idx: np.ndarray) -> Rendered:
    """``r``'s rows ``idx`` (row k of the result is trial k), embeddings copied."""
    return Rendered(r.emb[idx].copy(), r.speech[idx], r.narrowband[idx], r.ok[idx], r.low_cut[idx])


def _wider(a: Rendered, b: Rendered) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For trial-aligned sides: (K,) whether a, and whether b, is wider than the pair's narrowest band when either
    side is narrowband (the service's band_match rule), and (K,) whether that band has the 300 Hz cut."""
    narrow = a.narrowband | b.narrowband
    low_cut = narrow & (a.low_cut | b.low_cut)
    return (narrow & wider_than_pair(a.narrowband, a.low_cut, low_cut),
            narrow & wider_than_pair(b.narrowband, b.low_cut, low_cut), low_cut)


def band_match_needs(rendered: dict[str, Rendered], ce: str, cp: str, ia: np.ndarray, ib: np.ndarray
                     ) -> set[tuple[str, bool]]:
    """The (condition, low_cut) renderings in a narrow band that ``band_matched_pairs`` will read for these trials."""
    a, b = _trial_rows(rendered[ce], ia), _trial_rows(rendered[cp], ib)
    wider_a, wider_b, low_cut = _wider(a, b)
    return {(cond, bool(cut)) for cond, wider in ((ce, wider_a), (cp, wider_b)) for cut in np.unique(low_cut[wider])}


def band_matched_pairs(rendered: dict[str, Rendered], ce: str, cp: str, ia: np.ndarray, ib: np.ndarray
                       ) -> tuple[Rendered, Rendered, np.ndarray]:
    """The trials (ia[k], ib[k]) as the service's Verify of two recordings scores them: when either side is
    narrowband, each side wider than the pair's narrowest band (8 kHz, with the 300 Hz cut when either side lacks
    its fundamental) takes the embedding made in that band (``rendered[matched_key(cond, low_cut)]``, for the keys
    ``band_match_needs`` names). Returns the two sides as per-trial ``Rendered`` (row k is trial k) and the (K,) mask
    of the trials where a side changed."""
    a, b = _trial_rows(rendered[ce], ia), _trial_rows(rendered[cp], ib)
    wider_a, wider_b, low_cut = _wider(a, b)
    for side, cond, idx, wider in ((a, ce, ia, wider_a), (b, cp, ib, wider_b)):
        for cut in (False, True):
            k = np.flatnonzero(wider & (low_cut == cut))
            if len(k):
                side.emb[k] = rendered[matched_key(cond, cut)].emb[idx[k]]
    return a, b, wider_a | wider_b


def band_mapped_pairs(model: SpeakerModel, rendered: dict[str, Rendered], ce: str, cp: str, ia: np.ndarray,
                      ib: np.ndarray) -> tuple[Rendered, np.ndarray, np.ndarray]:
    """The trials (ia[k], ib[k]) as the service scores a recording (side b) against a voiceprint (side a): when the
    probe is narrowband and the voiceprint's channel group is not already in its band (``ModelScorer.in_band``),
    the voiceprint is mapped into the probe's band (the landline's when the probe lacks its fundamental) by the
    model's band map. Returns side a as per-trial ``Rendered`` (row k is trial k), the (K,) LLR offsets and the
    (K,) mask of the mapped trials."""
    bm, scorer = model.scorer.band_map, model.scorer
    if bm is None:
        raise ValueError(f"model {model.name} has no band map (python -m training.evaluation.band_map)")
    a, b = _trial_rows(rendered[ce], ia), _trial_rows(rendered[cp], ib)
    stats = scorer.stats(a.emb)
    mapped = b.narrowband & a.ok & ~np.where(b.low_cut, scorer.in_band(stats, True), scorer.in_band(stats, False))
    offsets = np.zeros(len(ia))
    for cut in (False, True):
        k = np.flatnonzero(mapped & (b.low_cut == cut))
        if len(k):
            a.emb[k] = bm.apply(a.emb[k], cut)
            offsets[k] = bm.offset(cut)
    return a, offsets, mapped


def evaluate_conditions(model: SpeakerModel, rendered: dict[str, Rendered], ia: np.ndarray, ib: np.ndarray,
                        labels: np.ndarray, specs: dict[str, tuple[str, str]]) -> dict:
    """Figures per condition of ``specs`` (see the module docstring); the rows of ``BAND_MATCHED`` need
    ``rendered[matched_key(c, low_cut)]`` for their conditions c (``band_matched_pairs``), those of ``BAND_MAPPED``
    a model with a band map (``band_mapped_pairs``)."""
    scale, threshold = model.scorer.scale, model.scorer.threshold
    stats = {c: model.scorer.stats(r.emb) for c, r in rendered.items()}
    out = {}
    for name, (ce, cp) in specs.items():
        r = {"trials": int(len(labels))}
        if name in BAND_MATCHED:
            a, b, matched = band_matched_pairs(rendered, ce, cp, ia, ib)
            decided = a.ok & b.ok
            k = np.flatnonzero(decided)
            sc = score_pairs(model, a, b, k, k, model.scorer.stats(a.emb), model.scorer.stats(b.emb))
            r["band_matched"] = round(float(matched[decided].mean()), 4)
        elif name in BAND_MAPPED:
            a, offsets, mapped = band_mapped_pairs(model, rendered, ce, cp, ia, ib)
            decided = a.ok & rendered[cp].ok[ib]
            k = np.flatnonzero(decided)
            sc = score_pairs(model, a, rendered[cp], k, ib[k], model.scorer.stats(a.emb), stats[cp])
            if "llr" in sc:
                sc["llr"] = sc["llr"] + offsets[k]
            r["band_mapped"] = round(float(mapped[decided].mean()), 4)
        else:
            decided = rendered[ce].ok[ia] & rendered[cp].ok[ib]
            sc = score_pairs(model, rendered[ce], rendered[cp], ia[decided], ib[decided], stats[ce], stats[cp])
        r["not_enough_speech"] = round(float(1 - decided.mean()), 4)
        r.update(_figures(sc, labels[decided], scale, threshold))
        out[name] = r
    return out


def one_talker_rates(model: SpeakerModel, vad: SileroVad, split, rng: np.random.Generator, n: int = 150,
                     threshold: float = -2.0, min_seconds: float = 4.0, seed: int = 0) -> dict:
    """How often the one-talker check flags real inputs: one speaker, babble behind, two speakers in turn.

    Inputs are utterances (and pairs of utterances, one after the other) of the evaluation split,
    screened by VAD as served; only those with ``min_seconds`` of speech are checked, as the service does.
    """
    from models.audio import condition
    from models.consistency import self_consistency, speaker_chunks
    from models.vad import keep_speech
    from training.data.channels import apply_conditions
    from training.evaluation.realembed import model_vad_options

    opts = model_vad_options(model.card)
    waves = split.waves16k()
    spk = np.array(split.spk)

    def flagged(x: np.ndarray) -> bool | None:
        wav = condition(x[:, None], 16000, model.sample_rate)
        speech = keep_speech(wav, vad.segments(wav, model.sample_rate, opts))
        chunks = speaker_chunks(speech, model.sample_rate, min_seconds)
        if not chunks:
            return None
        llr = self_consistency(model.scorer, model.embed_many(chunks), [len(c) / model.sample_rate for c in chunks])
        return llr is not None and llr < threshold

    kinds = {"one speaker, one utterance": [], "one speaker, two utterances": [], "babble 10 dB behind": [],
             "two speakers in turn": []}
    for i in rng.choice(len(waves), size=min(n, len(waves)), replace=False):
        same = np.flatnonzero((spk == spk[i]) & (np.arange(len(spk)) != i))
        other = np.flatnonzero(spk != spk[i])
        babble, _ = apply_conditions(["babble10"], waves[i], np.random.default_rng([seed, int(i)]), waves[::8])
        inputs = {"one speaker, one utterance": waves[i], "babble 10 dB behind": babble,
                  "one speaker, two utterances": np.concatenate([waves[i], waves[rng.choice(same)]]) if len(same) else None,
                  "two speakers in turn": np.concatenate([waves[i], waves[rng.choice(other)]])}
        for kind, x in inputs.items():
            if x is not None and (f := flagged(np.asarray(x, np.float32))) is not None:
                kinds[kind].append(f)
    return {k: {"checked": len(v), "flagged": round(float(np.mean(v)), 4) if v else None} for k, v in kinds.items()}


def markdown(res: dict) -> str:
    """The results as the README/BENCHMARKS tables."""
    lines = [f"Model `{res['model']}`, operating point {res['operating_point']}; {res['pool']} "
             f"({res['speakers']} speakers, {res['utterances']} utterances, {res['target_trials']} target / "
             f"{res['nontarget_trials']} non-target trials); FA/FR of the trials with enough speech on both sides.", "",
             "| condition | FA | FR | NOT_ENOUGH_SPEECH | Cllr (actual / min) | EER % | impostor normalised mean |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["conditions"].items():
        lines.append(f"| {EVAL_LABELS.get(name, name)} | {100 * r.get('far', float('nan')):.2f}% | {100 * r.get('frr', float('nan')):.1f}% | "
                     f"{100 * r['not_enough_speech']:.1f}% | {r.get('cllr', '')} / {r.get('min_cllr', '')} | "
                     f"{r.get('eer', '')} | {r.get('impostor_normalized_mean', '')} |")
    lines += ["", "Single recordings with too little speech (VAD): " + ", ".join(
        f"{c} {100 * v:.1f}%" for c, v in res["not_enough_speech_by_channel"].items())]
    if res.get("identify"):
        lines += ["", "| enrolled speakers | real + simulated | threshold (LLR) | stranger is_match | true-match miss | "
                      "stranger is_match, single-pair rule |", "|---:|---|---:|---:|---:|---:|"]
        for n, r in res["identify"].items():
            lines.append(f"| {n} | {r['enrolled_real']} + {r['simulated']} | {r['threshold_open_set']} | "
                         f"{100 * r['stranger_false_match']:.2f}% | {100 * r['true_match_miss']:.1f}% | "
                         f"{100 * r['stranger_false_match_single_pair_rule']:.2f}% |")
        chk = res.get("simulated_check")
        one = res.get("one_talker")
        if one:
            lines += ["", "One-talker check (inputs with at least 4 s of speech): " + "; ".join(
                f"{k}: {100 * v['flagged']:.1f}% flagged of {v['checked']}" for k, v in one.items() if v["checked"])]
        if chk:
            lines += ["", f"Simulated voiceprints against stranger probes: mean LLR {chk['simulated_llr_mean']}, "
                          f"99th percentile {chk['simulated_llr_p99']}; real impostor voiceprints: {chk['real_llr_mean']}, "
                          f"{chk['real_llr_p99']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.decisions", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--split", default="evaluation")
    ap.add_argument("--model", default="ge2e", help="a repository entry (name or directory)")
    ap.add_argument("--repository", type=Path, default=REPO)
    ap.add_argument("--conditions", default=",".join(EVAL_SPECS), help="a subset of the conditions, comma-separated")
    ap.add_argument("--identify-sizes", default="5,100,10000")
    ap.add_argument("--min-probe-speech", type=float, default=1.0)
    ap.add_argument("--max-utts", type=int, default=0, help="evaluate a seeded subset of utterances (0: all)")
    ap.add_argument("--one-talker", type=int, default=150, help="utterances for the one-talker check's rates (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    names = [c for c in args.conditions.split(",") if c]
    unknown = [c for c in names if c not in EVAL_SPECS]
    if unknown:
        ap.error(f"--conditions: unknown {unknown}; known: {list(EVAL_SPECS)}")
    try:
        sizes = [int(x) for x in args.identify_sizes.split(",") if x]
        if any(n < 1 for n in sizes):
            raise ValueError
    except ValueError:
        ap.error(f"--identify-sizes: expected positive integers, got {args.identify_sizes!r}")
    t0 = time.time()
    path = Path(args.model) if Path(args.model).is_dir() else args.repository / args.model
    try:
        model = SpeakerModel(path, ["CPUExecutionProvider"])
        split = load_kaldi_split(args.real / args.split)
        trials = read_trials(args.real / args.split / "trials")
    except (OSError, ValueError) as e:
        print(f"decisions: {e}", file=sys.stderr)
        return 2
    if model.scorer.calibration is None:
        print(f"decisions: model {model.name} has no calibration (python -m training.evaluation.calibrate)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    keep = set(split.utts)
    if args.max_utts and args.max_utts < len(split.utts):
        keep = set(rng.choice(split.utts, size=args.max_utts, replace=False).tolist())
    index = {u: i for i, u in enumerate(split.utts)}
    trials = [t for t in trials if t[0] in keep and t[1] in keep]
    ia = np.array([index[a] for a, _, _ in trials])
    ib = np.array([index[b] for _, b, _ in trials])
    labels = np.array([lab for *_, lab in trials], bool)
    specs = {n: EVAL_SPECS[n] for n in names}
    if model.scorer.band_map is None and BAND_MAPPED & set(specs):
        print(f"decisions: model {model.name} has no band map (python -m training.evaluation.band_map): rows "
              f"{sorted(BAND_MAPPED & set(specs))} left out", file=sys.stderr)
        specs = {n: s for n, s in specs.items() if n not in BAND_MAPPED}
    vad = SileroVad()
    rendered = {}
    for c in dict.fromkeys(c for pair in list(specs.values()) + [("clean", "telephone"), ("gsm", "clean")] for c in pair):
        rendered[c] = render_and_embed(model, vad, split, [c], args.min_probe_speech, args.seed)
        print(f"  rendered {c} ({time.time() - t0:.0f} s)", flush=True)
    needs = set().union(*[band_match_needs(rendered, *specs[n], ia, ib) for n in specs if n in BAND_MATCHED])
    for c, low_cut in sorted(needs):  # only what some trial's pair needs (a narrowband side is rarely wider)
        rate = model.sample_rate
        rendered[matched_key(c, low_cut)] = render_and_embed(
            model, vad, split, [c], args.min_probe_speech, args.seed,
            post=lambda w, low_cut=low_cut: match_band(w, rate, low_cut))
        print(f"  rendered {matched_key(c, low_cut)} ({time.time() - t0:.0f} s)", flush=True)
    spk = np.array(split.spk)
    res = {"model": model.name, "version": model.card.version,
           "operating_point": f"{model.scorer.scale} >= {model.scorer.threshold:g}",
           "pool": f"{args.real}/{args.split}", "speakers": len(set(split.spk)), "utterances": len(split.utts),
           "target_trials": int(labels.sum()), "nontarget_trials": int((~labels).sum()),
           "conditions": evaluate_conditions(model, rendered, ia, ib, labels, specs),
           "not_enough_speech_by_channel": {c: round(float(1 - r.ok.mean()), 4) for c, r in rendered.items()}}
    if sizes:
        cal = load_kaldi_split(args.real / "calibration") if (args.real / "calibration" / "wav.scp").is_file() else None
        base = rendered["clean"]
        if cal is not None:
            cr = render_and_embed(model, vad, cal, ["clean"], args.min_probe_speech, args.seed)
            cspk = np.array(cal.spk)
            means = []
            for s in sorted(set(cal.spk)):
                rows = (cspk == s) & cr.ok
                if rows.any():
                    v = cr.emb[rows].astype(np.float64).mean(axis=0)
                    means.append(v / np.linalg.norm(v))
            distractors = simulated_voiceprints(np.stack(means), max(sizes), rng)
            res["simulated_check"] = simulation_check(model, base, spk, distractors)
        else:
            distractors = np.zeros((0, model.dim), np.float32)
        res["identify"] = open_set_identify(model, base, spk, sizes, distractors, rng)
    if args.one_talker:
        res["one_talker"] = one_talker_rates(model, vad, split, rng, n=args.one_talker, seed=args.seed)
    res["seconds"] = round(time.time() - t0, 1)
    table = markdown(res)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "results.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
