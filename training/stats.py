"""Statistics of the compression experiment: seed noise, the sensitivity gate, paired differences, overlaps.

- ``gate``: can the testbed discriminate at all? Headroom is what removing every FFN neuron
  costs on the main metric (mean over seeds); noise is the seed-to-seed standard deviation of
  the unpruned upstream's metric. The testbed is called testable when headroom >= factor * noise.
- ``paired_difference``: protected minus norm-only per seed (same seed = same head init, same
  held-out split), with a t-based 95% confidence interval over seeds.
- ``jaccard``: overlap of the neuron sets two pruning methods keep.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GateError", "gate", "paired_difference", "jaccard", "mean_std"]

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


def jaccard(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Mean over layers of |a ∩ b| / |a ∪ b| for per-layer kept-neuron index sets."""
    vals = []
    for x, y in zip(a, b):
        x, y = set(np.asarray(x).tolist()), set(np.asarray(y).tolist())
        vals.append(len(x & y) / len(x | y) if x | y else 1.0)
    return float(np.mean(vals))
