"""``summary.json`` of the compression experiment, computed from ``results.json`` (the rows), the
experiment's declared design (``config.json``) and the neuron-count controls (``controls.json``).

Every difference is oriented so that a positive value favours the first-named method (protected
over norm-only, norm-only over random, shuffled protection over norm-only), whatever the metric's
direction. Differences over calibration draws x head seeds use ``stats.crossed_difference`` (both
sources of variance in the interval); the gate uses the paired per-seed headroom.

The verdict (declared before the run: the primary comparison and ``sesoi``):
- ``inconclusive`` when the testbed cannot decide: the gate fails (headroom's 95% lower bound below
  2 x sesoi) or norm-only does not beat random pruning (the testbed does not tell pruning
  criteria apart);
- else ``benefit`` when the primary interval lies above 0, ``no_benefit`` when it lies below sesoi,
  ``inconclusive`` otherwise (then ``verdict_reason`` says why: too wide an interval, or one that
  straddles sesoi).
"""

from __future__ import annotations

import numpy as np

from training.experiment.stats import HIGHER_IS_BETTER, crossed_difference, paired_gate, verdict

__all__ = ["summarize", "gate_of", "METHODS"]

METHODS = ("unpruned", "all_ffn", "random", "baseline", "protected", "shuffled_protect")


def _by_seed(rows: list[dict], protocol: str, method: str, ratio: float, metric: str,
             draw_key: str | None = None) -> dict:
    """{draw: {seed: value}} (draw None when ``draw_key`` is None)."""
    out: dict = {}
    for r in rows:
        if r["protocol"] == protocol and r["method"] == method and abs(r["ratio"] - ratio) < 1e-9:
            d = r.get(draw_key) if draw_key else None
            out.setdefault(d, {})[r["seed"]] = r[metric]
    return out


def _grid(first: dict, second: dict[int, float], sign: float) -> np.ndarray:
    """(draws, seeds) of sign * (first[draw][seed] - second[seed]) over the seeds every draw shares."""
    seeds = sorted(set(second).intersection(*[set(v) for v in first.values()]))
    return np.array([[sign * (v[s] - second[s]) for s in seeds] for _, v in sorted(first.items(), key=lambda kv: str(kv[0]))])


def _diff(first: dict, second: dict, sign: float) -> dict | None:
    if not first or None not in second:
        return None
    g = _grid(first, second[None], sign)
    if g.size == 0 or g.shape[1] < 2:
        return None
    d = crossed_difference(g)
    return {"diff": d["mean"], "ci95": d["ci95"], "n_seeds": d["n_seeds"], "n_draws": d["n_draws"], "df": d["df"],
            "draw_sd": d["draw_sd"]}


def _protection(rows: list[dict], protocol: str, ratio: float, metric: str, sign: float) -> dict | None:
    return _diff(_by_seed(rows, protocol, "protected", ratio, metric, "calibration_draw"),
                 _by_seed(rows, protocol, "baseline", ratio, metric), sign)


def gate_of(rows: list[dict], config: dict) -> dict:
    """The paired gate (``stats.paired_gate``) from the unpruned and all_ffn rows of the published protocol."""
    metric, sesoi = config["metric"], float(config["sesoi"])
    unpruned = _by_seed(rows, "superb", "unpruned", 0.0, metric).get(None, {})
    all_ffn = _by_seed(rows, "superb", "all_ffn", 1.0, metric).get(None, {})
    g = paired_gate(unpruned, all_ffn, metric, sesoi)
    return {"headroom": g["headroom"], "headroom_ci95": g["headroom_ci95"], "paired_sd": g["paired_sd"],
            "passes": g["passes"], "threshold": 2 * sesoi}


def summarize(rows: list[dict], config: dict, controls: dict) -> dict:
    """The summary (see the module docstring) of ``rows`` under the declared ``config``.

    ``config`` needs metric, sesoi, primary_protocol, primary_ratio; ``controls`` holds the
    speaker-neuron counts of calibration draw 0 (``neuron_count``) and under label permutations
    (``neuron_count_null``).

    Raises:
        ValueError: the rows lack the primary comparison or the gate's controls.
    """
    unknown = sorted({r["method"] for r in rows} - set(METHODS))
    if unknown:
        raise ValueError(f"results: method(s) {unknown} are not among {list(METHODS)}")
    metric, sesoi = config["metric"], float(config["sesoi"])
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    p_proto, p_ratio = config["primary_protocol"], float(config["primary_ratio"])
    gate = gate_of(rows, config)
    primary = _protection(rows, p_proto, p_ratio, metric, sign)
    if primary is None:
        raise ValueError(f"results have no protected and baseline rows for the primary comparison "
                         f"(protocol {p_proto!r}, ratio {p_ratio})")
    random = _by_seed(rows, "superb", "random", p_ratio, metric, "random_draw")
    base = _by_seed(rows, "superb", "baseline", p_ratio, metric)
    nr = None
    if random and None in base:  # norm-only minus random: the random draws play the part of draws
        grid = -_grid(random, base[None], sign)
        if grid.size and grid.shape[1] >= 2:
            d = crossed_difference(grid)
            nr = {"ratio": p_ratio, "diff": d["mean"], "ci95": d["ci95"], "n_draws": d["n_draws"]}
    sp = _diff(_by_seed(rows, "superb", "shuffled_protect", p_ratio, metric, "calibration_draw"), base, sign)
    null = controls.get("neuron_count_null", [])
    ctrl = {"norm_minus_random": nr,
            "neuron_count": controls.get("neuron_count"),
            "neuron_count_null_p95": float(np.percentile(null, 95)) if null else None,
            "permutations": len(null),
            "shuffled_protect_minus_baseline": {"diff": sp["diff"], "ci95": sp["ci95"]} if sp else None}
    ctrl["norm_beats_random"] = bool(nr is not None and nr["ci95"][0] > 0)
    ctrl["neurons_above_null"] = bool(null and ctrl["neuron_count"] is not None
                                      and ctrl["neuron_count"] > ctrl["neuron_count_null_p95"])
    secondary = []
    for proto, ratio in sorted({(r["protocol"], r["ratio"]) for r in rows if r["method"] == "protected"}):
        if (proto, ratio) == (p_proto, p_ratio):
            continue
        d = _protection(rows, proto, ratio, metric, sign)
        if d is not None:
            secondary.append({"protocol": proto, "ratio": ratio, "diff": d["diff"], "ci95": d["ci95"],
                              "verdict": verdict(d["ci95"], sesoi), "n_seeds": d["n_seeds"], "n_draws": d["n_draws"]})
    half = (primary["ci95"][1] - primary["ci95"][0]) / 2
    out = {"metric": metric, "sesoi": sesoi, "gate": gate, "controls": ctrl,
           "primary": {"protocol": p_proto, "ratio": p_ratio, "diff": primary["diff"], "ci95": primary["ci95"],
                       "n_seeds": primary["n_seeds"], "n_calibration_draws": primary["n_draws"],
                       "df": primary["df"], "calibration_draw_sd": primary["draw_sd"], "ci_half_width": half,
                       "powered": bool(half <= sesoi)},
           "secondary": secondary}
    out["verdict"], out["verdict_reason"] = _verdict(out)
    return out


def _verdict(s: dict) -> tuple[str, str]:
    p, sesoi = s["primary"], s["sesoi"]
    if not s["gate"]["passes"]:
        return "inconclusive", (f"the gate fails: removing every FFN neuron costs {s['gate']['headroom']:.2f} "
                                f"(95% lower bound {s['gate']['headroom_ci95'][0]:.2f} < 2 x sesoi = {2 * sesoi:g}), "
                                "so the testbed cannot show an effect of the declared size")
    if not s["controls"]["norm_beats_random"]:
        return "inconclusive", ("norm-only pruning does not beat random pruning on this testbed (paired interval "
                                "includes 0), so it does not tell pruning criteria apart")
    v = verdict(p["ci95"], sesoi)
    lo, hi = p["ci95"]
    if v == "benefit":
        return v, f"protection helps: the primary interval [{lo:+.2f}, {hi:+.2f}] lies above 0"
    if v == "no_benefit":
        return v, (f"any benefit of protection is smaller than sesoi {sesoi:g}: the primary interval "
                   f"[{lo:+.2f}, {hi:+.2f}] lies below it")
    why = ("the interval is wider than 2 x sesoi (underpowered)" if not p["powered"] else
           "the interval straddles sesoi")
    return v, f"the primary interval [{lo:+.2f}, {hi:+.2f}] contains 0 and reaches sesoi {sesoi:g}: {why}"
