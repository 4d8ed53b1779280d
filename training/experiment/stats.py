"""Statistics of the compression experiment: seed noise, the sensitivity gate, paired differences, overlaps.

- ``gate``: can the testbed discriminate at all? Headroom is what removing every FFN neuron
  costs on the main metric (mean over seeds); noise is the seed-to-seed standard deviation of
  the unpruned upstream's metric. The testbed is called testable when headroom >= factor * noise.
- ``paired_difference``: protected minus norm-only per seed (same seed = same head init, same
  held-out split), with a t-based 95% confidence interval over seeds.
- ``crossed_difference``: a difference measured on a grid of calibration draws x head seeds (each
  cell one pruned upstream's head), with a 95% interval whose variance counts both sources
  (two-way crossed random effects, Satterthwaite degrees of freedom);
- ``verdict``: ``benefit`` / ``no_benefit`` / ``inconclusive`` from an interval and the declared
  smallest effect of interest (``sesoi``);
- ``jaccard``: overlap of the neuron sets two pruning methods keep.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GateError", "gate", "paired_difference", "crossed_difference", "paired_gate", "verdict", "jaccard",
           "mean_std", "VERDICTS"]

VERDICTS = ("benefit", "no_benefit", "inconclusive")

HIGHER_IS_BETTER = {"sid_acc": True, "eer": False, "mindcf": False}


class GateError(ValueError):
    """The sensitivity gate cannot be computed; the message says what to change."""


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def gate(unpruned: list[float], all_ffn: list[float], metric: str, factor: float = 5.0) -> dict:
    """The sensitivity gate on per-seed values of ``metric`` for the unpruned and all-FFN-removed upstreams.

    Raises:
        GateError: fewer than two seeds, unknown metric, or zero seed-to-seed noise.
    """
    if metric not in HIGHER_IS_BETTER:
        raise GateError(f"metric must be one of {sorted(HIGHER_IS_BETTER)}, got {metric!r}")
    if len(unpruned) < 2 or len(all_ffn) < 2:
        raise GateError(f"the gate needs the metric over at least 2 seeds, got {len(unpruned)}; use --seeds 2 or more")
    mu_u, sd_u = mean_std(unpruned)
    mu_a, _ = mean_std(all_ffn)
    if not math.isfinite(sd_u) or sd_u <= 0:
        raise GateError(f"the seed-to-seed standard deviation of {metric} is {sd_u}: every seed gave the same value, "
                        "so the gate's noise cannot be estimated; vary more per seed (a larger --held-out share or "
                        "more evaluation utterances)")
    headroom = (mu_u - mu_a) if HIGHER_IS_BETTER[metric] else (mu_a - mu_u)
    return {"testable": bool(headroom >= factor * sd_u), "headroom": float(headroom), "noise": float(sd_u),
            "metric": metric, "factor": factor, "ratio": float(headroom / sd_u)}


def _t975(df: int) -> float:
    """Two-sided 95% Student t quantile."""
    from scipy.stats import t

    return float(t.ppf(0.975, df))


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over paired seeds with a 95% t interval; ``ci95`` is [mean, mean] for one pair."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired values need equal, non-zero lengths, got {len(a)} and {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "ci95": [mean, mean], "n": 1}
    half = _t975(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": int(len(d))}


def crossed_difference(d: np.ndarray) -> dict:
    """Mean of a (draws, seeds) grid of paired differences with a 95% interval over both factors.

    Cell ``d[i, j]`` is one method minus its comparison under calibration draw ``i`` and head seed
    ``j`` (the seed is shared across draws, so the factors are crossed). The variance of the grand
    mean is (MS_draw + MS_seed - MS_residual) / (k n) with negative components set to zero, its
    degrees of freedom Satterthwaite's. With one draw this is the paired t interval over seeds.

    Raises:
        ValueError: not a 2-D grid, or fewer than two seeds.
    """
    d = np.asarray(d, dtype=np.float64)
    if d.ndim != 2 or d.shape[1] < 2 or d.shape[0] < 1 or not np.isfinite(d).all():
        raise ValueError(f"differences must be a finite (draws, seeds) grid with at least 2 seeds, got shape {d.shape}")
    k, n = d.shape
    grand = float(d.mean())
    if k == 1:
        r = paired_difference(d[0].tolist(), [0.0] * n)
        return {"mean": r["mean"], "ci95": r["ci95"], "n_draws": 1, "n_seeds": n, "df": n - 1,
                "se": float(d[0].std(ddof=1) / math.sqrt(n)), "draw_sd": 0.0}
    rows, cols = d.mean(1), d.mean(0)  # (k,), (n,)
    ms_d = n * float(((rows - grand) ** 2).sum()) / (k - 1)
    ms_s = k * float(((cols - grand) ** 2).sum()) / (n - 1)
    resid = d - rows[:, None] - cols[None, :] + grand
    ms_e = float((resid ** 2).sum()) / ((k - 1) * (n - 1))
    terms = [(max(ms_d - ms_e, 0.0), ms_d, k - 1), (max(ms_s - ms_e, 0.0), ms_s, n - 1), (ms_e, ms_e, (k - 1) * (n - 1))]
    var_sum = sum(t[0] for t in terms)  # k n Var(grand mean)
    # Satterthwaite on the mean squares that carry the variance (a zeroed component drops out)
    used = [(ms, df) for comp, ms, df in terms[:2] if comp > 0] + [(ms_e, (k - 1) * (n - 1))]
    denom = sum(ms ** 2 / df for ms, df in used)
    df = var_sum ** 2 / denom if denom > 0 else float(k * n - 1)
    se = math.sqrt(var_sum / (k * n))
    half = _t975(max(1, int(math.floor(df)))) * se
    return {"mean": grand, "ci95": [grand - half, grand + half], "n_draws": k, "n_seeds": n, "df": float(df),
            "se": se, "draw_sd": math.sqrt(max(ms_d - ms_e, 0.0) / n)}


def paired_gate(unpruned: dict[int, float], all_ffn: dict[int, float], metric: str, sesoi: float) -> dict:
    """The gate of a powered run: per-seed paired headroom (unpruned minus all-FFN-removed, oriented so
    positive is what removing every FFN neuron costs); passes when its 95% lower bound >= 2 x sesoi.

    Raises:
        GateError: unknown metric, fewer than two common seeds, or a non-positive sesoi.
    """
    if metric not in HIGHER_IS_BETTER:
        raise GateError(f"metric must be one of {sorted(HIGHER_IS_BETTER)}, got {metric!r}")
    if not sesoi > 0:
        raise GateError(f"sesoi must be positive, got {sesoi}")
    seeds = sorted(set(unpruned) & set(all_ffn))
    if len(seeds) < 2:
        raise GateError(f"the gate needs at least 2 seeds shared by unpruned and all_ffn, got {len(seeds)}")
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    h = [sign * (unpruned[s] - all_ffn[s]) for s in seeds]
    r = paired_difference(h, [0.0] * len(h))
    return {"headroom": r["mean"], "headroom_ci95": r["ci95"], "paired_sd": float(np.std(h, ddof=1)),
            "passes": bool(r["ci95"][0] >= 2 * sesoi), "n_seeds": len(seeds)}


def verdict(ci95: list[float], sesoi: float) -> str:
    """``benefit`` when the interval is above 0, ``no_benefit`` when it is below ``sesoi`` (equivalence:
    any benefit is smaller than the smallest one that matters), else ``inconclusive``."""
    lo, hi = ci95
    if lo > 0:
        return "benefit"
    if hi < sesoi:
        return "no_benefit"
    return "inconclusive"


def jaccard(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean over layers of |a ∩ b| / |a ∪ b| for per-layer kept-neuron index sets."""
    vals = []
    for x, y in zip(a, b):
        x, y = set(np.asarray(x).tolist()), set(np.asarray(y).tolist())
        vals.append(len(x & y) / len(x | y) if x | y else 1.0)
    return float(np.mean(vals))
