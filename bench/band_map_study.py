"""How a wideband voiceprint is best carried into a narrowband probe's band (BENCHMARKS.md section 9h).

    .venv/bin/python bench/band_map_study.py --real corpus-real [--model ge2e]

Embeds the real-speech pool's calibration and evaluation utterances as recorded, as their narrowband twins
(``models.band_match.match_band``, the 8 kHz band and the landline's) and through the telephone and GSM channels
(about 4 minutes on 2 cores), then prints three tables on the evaluation trials (a recording as recorded as the
enrolment side, the probe through a channel; FR / FA at the model's operating point):

1. maps fitted on the calibration utterances (clean -> landline twin), every voiceprint mapped, against telephone
   probes, without an LLR offset: none, the true twin, a mean shift, ridge towards zero, Procrustes, and ridge
   towards the identity (``models.band_map.fit_linear_map``);
2. the LLR correction of mapped pairs, fitted on cross-fitted calibration trials: an offset, or scale and offset;
3. which voiceprints the shipped map should carry: none, all, those outside the narrowband channel groups, those
   not already in the probe's band (``ModelScorer.in_band``, what the service does).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.band_map import BandMap, fit_linear_map  # noqa: E402
from models.band_match import match_band  # noqa: E402
from models.calibration import cllr, min_cllr  # noqa: E402
from models.evaluation import evaluate_scores, read_trials  # noqa: E402
from models.runtime import SpeakerModel  # noqa: E402
from models.vad import SileroVad  # noqa: E402
from training.evaluation.band_map import best_offset, cross_fitted  # noqa: E402
from training.evaluation.decisions import score_pairs  # noqa: E402
from training.evaluation.realembed import Rendered, load_kaldi_split, render_and_embed  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _with(r: Rendered, emb: np.ndarray) -> Rendered:
    return Rendered(emb * r.ok[:, None], r.speech, r.narrowband, r.ok, r.low_cut)


def _ridge_to_zero(x, y, lam):
    mx, my = x.mean(0), y.mean(0)
    w = np.linalg.solve((x - mx).T @ (x - mx) + lam * np.eye(x.shape[1]), (x - mx).T @ (y - my))
    return lambda z: _unit((z - mx) @ w + my)


def _procrustes(x, y):
    mx, my = x.mean(0), y.mean(0)
    u, _, vt = np.linalg.svd((x - mx).T @ (y - my))
    return lambda z: _unit((z - mx) @ (u @ vt) + my)


def _to_identity(x, y, lam):
    w, mx, my = fit_linear_map(x, y, lam)
    return lambda z: _unit((z - mx) @ w + my)


class Study:
    """The pool embedded every way the tables need, and its trials."""

    def __init__(self, model: SpeakerModel, real: Path):
        self.model, vad, rate = model, SileroVad(), model.sample_rate
        self.r, self.trials, self.spk = {}, {}, {}
        for split in ("calibration", "evaluation"):
            s = load_kaldi_split(real / split)
            idx = {u: i for i, u in enumerate(s.utts)}
            t = read_trials(real / split / "trials")
            self.trials[split] = (np.array([idx[a] for a, _, _ in t]), np.array([idx[b] for _, b, _ in t]),
                                  np.array([lab for *_, lab in t], bool))
            self.spk[split] = np.array(s.spk)
            r = {c: render_and_embed(model, vad, s, [c], 1.0) for c in ("clean", "telephone", "gsm")}
            for cut in (False, True):
                r[f"twin{int(cut)}"] = render_and_embed(model, vad, s, ["clean"], 1.0,
                                                        post=lambda w, cut=cut: match_band(w, rate, cut))
            self.r[split] = r
            print(f"  embedded {split}: {len(s.utts)} utterances", file=sys.stderr, flush=True)

    def llrs(self, split: str, a: Rendered, b: Rendered, offsets: np.ndarray | None = None):
        """(LLR, cosine, labels) of the split's trials where both sides were decided on (a per-trial when offsets)."""
        ia, ib, lab = self.trials[split]
        sc = self.model.scorer
        if offsets is None:  # a and b indexed by utterance
            dec = a.ok[ia] & b.ok[ib]
            s = score_pairs(self.model, a, b, ia[dec], ib[dec], sc.stats(a.emb), sc.stats(b.emb))
            return s["llr"], s["cosine"], lab[dec]
        dec = a.ok & b.ok[ib]  # a per trial
        k = np.flatnonzero(dec)
        s = score_pairs(self.model, a, b, k, ib[k], sc.stats(a.emb), sc.stats(b.emb))
        return s["llr"] + offsets[k], s["cosine"], lab[dec]

    def row(self, name: str, llr, cos, lab, far_ref: float | None = None) -> str:
        acc = llr >= self.model.scorer.threshold
        at = ""
        if far_ref is not None:
            t = np.quantile(llr[~lab], 1 - far_ref)
            at = f" | {100 * (llr[lab] < t).mean():.1f}%"
        return (f"| {name} | {evaluate_scores(cos, lab).eer:.2f} | {evaluate_scores(llr, lab).eer:.2f} | "
                f"{100 * (~acc[lab]).mean():.1f}% | {100 * acc[~lab].mean():.2f}% | {cllr(llr, lab):.3f} / "
                f"{min_cllr(llr, lab):.3f}{at} |")


def table_maps(st: Study) -> None:
    cal, ev = st.r["calibration"], st.r["evaluation"]
    ok = cal["clean"].ok & cal["twin1"].ok
    x, y = cal["clean"].emb[ok], cal["twin1"].emb[ok]
    base = st.llrs("evaluation", ev["clean"], ev["telephone"])
    far = float((base[0][~base[2]] >= st.model.scorer.threshold).mean())
    print(f"\n1. telephone probes, every clean voiceprint mapped, no offset (FR at the unmapped FA {100 * far:.2f}%)\n")
    print("| map | EER % (cosine) | EER % (LLR) | FR | FA | Cllr (actual / min) | FR at that FA |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(st.row("none", *base, far))
    print(st.row("the true twin", *st.llrs("evaluation", ev["twin1"], ev["telephone"]), far))
    maps = {"mean shift": lambda z: _unit(z + y.mean(0) - x.mean(0)), "Procrustes, centred": _procrustes(x, y)}
    maps.update({f"ridge towards zero {lam}": _ridge_to_zero(x, y, lam) for lam in (0.1, 1.0, 10.0)})
    maps.update({f"ridge towards the identity {lam}": _to_identity(x, y, lam) for lam in (0.3, 1.0, 3.0)})
    for name, f in maps.items():
        mapped = _with(ev["clean"], f(ev["clean"].emb))
        print(st.row(name, *st.llrs("evaluation", mapped, ev["telephone"]), far))


def table_offsets(st: Study, ridge: float = 1.0, folds: int = 5) -> None:
    print(f"\n2. LLR correction of mapped pairs (ridge towards the identity {ridge}; fitted on cross-fitted "
          f"calibration trials)\n")
    print("| probe | correction | fitted | EER % (cosine) | EER % (LLR) | FR | FA | Cllr (actual / min) |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for probe, twin, cut in (("telephone", "twin1", True), ("gsm", "twin0", False)):
        cal, ev = st.r["calibration"], st.r["evaluation"]
        ok = cal["clean"].ok & cal[twin].ok
        held = cross_fitted(cal["clean"].emb, cal[twin].emb, st.spk["calibration"], ok, ridge, folds)
        llr, _, lab = st.llrs("calibration", Rendered(held, cal["clean"].speech, cal["clean"].narrowband, ok,
                                                     cal["clean"].low_cut), cal[probe])
        offset = best_offset(llr, lab)

        def cost(p):
            z = p[0] * llr + p[1]
            return np.mean(np.logaddexp(0, -z[lab])) + np.mean(np.logaddexp(0, z[~lab]))

        scale, shift = minimize(cost, [1.0, 0.0], method="Nelder-Mead").x
        w, mx, my = fit_linear_map(cal["clean"].emb[ok], cal[twin].emb[ok], ridge)
        bm = BandMap(np.stack([w, w]), np.stack([mx, mx]), np.stack([my, my]), np.zeros(2, np.float32))
        mapped = _with(ev["clean"], bm.apply(ev["clean"].emb, cut))
        llr_e, cos_e, lab_e = st.llrs("evaluation", mapped, ev[probe])
        for name, fitted, z in (("none", "", llr_e), ("offset", f"{offset:+.3f}", llr_e + offset),
                                ("scale and offset", f"x{scale:.3f} {shift:+.3f}", scale * llr_e + shift)):
            print(st.row(f"{probe} | {name} | {fitted}", z, cos_e, lab_e))


def table_rules(st: Study) -> None:
    scorer, bm, ev = st.model.scorer, st.model.scorer.band_map, st.r["evaluation"]
    ia, ib, _ = st.trials["evaluation"]
    print("\n3. which voiceprints the shipped band map carries into a narrowband probe's band (offsets added)\n")
    print("| enrolment | probe | rule | mapped | EER % (cosine) | EER % (LLR) | FR | FA | Cllr (actual / min) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for enr, probe in (("clean", "telephone"), ("clean", "gsm"), ("telephone", "telephone"), ("gsm", "gsm")):
        e, p = ev[enr], ev[probe]
        a = Rendered(e.emb[ia].copy(), e.speech[ia], e.narrowband[ia], e.ok[ia], e.low_cut[ia])
        stats, cut = scorer.stats(a.emb), p.low_cut[ib]
        rules = {"none": np.zeros(len(ia), bool), "all": np.ones(len(ia), bool),
                 "outside narrowband groups": ~scorer.narrowband_flags(stats),
                 "not in the probe's band (served)": ~np.where(cut, scorer.in_band(stats, True),
                                                               scorer.in_band(stats, False))}
        for name, rule in rules.items():
            m = rule & p.narrowband[ib] & a.ok
            emb, off = a.emb.copy(), np.zeros(len(ia))
            for c in (False, True):
                k = np.flatnonzero(m & (cut == c))
                emb[k], off[k] = bm.apply(emb[k], c), bm.offset(c)
            print(st.row(f"{enr} | {probe} | {name} | {100 * m[a.ok].mean():.0f}%",
                         *st.llrs("evaluation", _with(a, emb), p, off)))


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--model", default="ge2e", help="a repository entry with a calibration and a band map")
    args = ap.parse_args(argv)
    model = SpeakerModel(Path(__file__).resolve().parents[1] / "models" / "repository" / args.model,
                         ["CPUExecutionProvider"])
    if model.scorer.band_map is None:
        print(f"band_map_study: model {model.name} has no band map", file=sys.stderr)
        return 2
    st = Study(model, args.real)
    table_maps(st)
    table_offsets(st)
    table_rules(st)
    return 0


if __name__ == "__main__":
    sys.exit(main())
