"""Score normalisation and calibration: cosine -> S-norm -> log-likelihood ratio.

A raw cosine between two speaker embeddings means different things for different voices,
channels and amounts of speech, so a fixed cosine threshold calibrated on one kind of audio
does not hold on another. Two standard steps make scores comparable:

1. **S-norm** (symmetric score normalisation) against an impostor *cohort*, the voiceprints
   of many training speakers stored with the model: each side's score against the cohort
   gives a mean and a standard deviation, and
   ``snorm = ((s - mu_e) / sd_e + (s - mu_t) / sd_t) / 2``. The full cohort is used
   (adaptive top-N cohorts transferred worse from synthetic to real speech in our tests).
2. **Calibration**: a linear logistic map ``llr = scale * snorm + offset`` fitted offline
   (prior-weighted logistic regression, the usual Platt/FoCal recipe) on trials that were not
   used for training, under many channel conditions. The result is a natural-log
   likelihood ratio: ``llr > 0`` means the same-speaker hypothesis is the more likely one
   at equal priors, and a Bayes decision for prior ``p`` and costs ``c_miss``, ``c_fa``
   accepts when ``llr >= log(c_fa (1 - p) / (c_miss p))``.

Quality measures: ``cllr`` (the cost of the log-likelihood ratios, in bits: 0 is perfect, 1
is a system that always says "don't know") and ``min_cllr`` (the same after the best
possible monotone recalibration, via pool-adjacent-violators): their difference is the
calibration loss.

Only numpy: the service applies these maps at request time; the offline job fits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["cohort_stats", "snorm", "snorm_inverse", "Calibration", "fit_calibration", "cllr", "min_cllr",
           "pav", "threshold_for_far", "Scores", "ModelScorer", "SCALE_RANGES"]

_MIN_SD = 1e-4  # a cohort whose scores against a vector barely vary would blow S-norm up


def cohort_stats(vectors: np.ndarray, cohort: np.ndarray) -> np.ndarray:
    """Cohort statistics of unit vectors.

    Args:
        vectors: (N, D) or (D,) unit embeddings.
        cohort: (M, D) unit cohort voiceprints.

    Returns:
        (N, 2) float64 rows of (mean, std) of each vector's M cohort scores ((2,) for a (D,) input).
    """
    v = np.asarray(vectors, dtype=np.float32)
    single = v.ndim == 1
    scores = np.atleast_2d(v) @ np.asarray(cohort, dtype=np.float32).T  # (N, M)
    scores = scores.astype(np.float64)
    stats = np.stack([scores.mean(axis=1), np.maximum(scores.std(axis=1), _MIN_SD)], axis=1)  # (N, 2)
    return stats[0] if single else stats


def snorm(score: np.ndarray | float, enroll_stats: np.ndarray, test_stats: np.ndarray) -> np.ndarray | float:
    """Symmetric normalisation of cosine scores.

    Args:
        score: (N,) or scalar raw cosine scores.
        enroll_stats: (N, 2) or (2,) (mean, std) of the enrolment side.
        test_stats: (N, 2) or (2,) (mean, std) of the test side.
    """
    e, t = np.asarray(enroll_stats, dtype=np.float64), np.asarray(test_stats, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    out = 0.5 * ((s - e[..., 0]) / e[..., 1] + (s - t[..., 0]) / t[..., 1])
    return float(out) if out.ndim == 0 else out


def snorm_inverse(value: float, enroll_stats: np.ndarray, test_stats: np.ndarray) -> float:
    """The cosine score whose S-norm is ``value`` for this pair of sides (S-norm is linear in it)."""
    e, t = np.asarray(enroll_stats, dtype=np.float64), np.asarray(test_stats, dtype=np.float64)
    slope = 0.5 * (1.0 / e[1] + 1.0 / t[1])
    return float((value + 0.5 * (e[0] / e[1] + t[0] / t[1])) / slope)


@dataclass(frozen=True)
class Calibration:
    """The map from S-norm scores to natural-log likelihood ratios: ``llr = scale * snorm + offset``."""

    scale: float
    offset: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.scale) and np.isfinite(self.offset)):
            raise ValueError(f"calibration: scale and offset must be finite, got {self.scale!r}, {self.offset!r}")
        if self.scale <= 0:
            raise ValueError(f"calibration: scale must be > 0 (higher scores = more likely the same speaker), got {self.scale!r}")

    def llr(self, normalized: np.ndarray | float) -> np.ndarray | float:
        """Log-likelihood ratios of S-norm scores."""
        out = self.scale * np.asarray(normalized, dtype=np.float64) + self.offset
        return float(out) if out.ndim == 0 else out

    def normalized(self, llr: float) -> float:
        """The S-norm score with this log-likelihood ratio."""
        return float((llr - self.offset) / self.scale)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def fit_calibration(scores: np.ndarray, labels: np.ndarray, prior: float = 0.5, iterations: int = 50) -> Calibration:
    """Prior-weighted linear logistic regression of labels on scores (Newton's method).

    Target and non-target trials are weighted so that they count as ``prior`` and
    ``1 - prior`` whatever their numbers; the fitted ``llr`` is then the log-likelihood ratio
    (the prior's log-odds is removed from the logistic output), which minimises Cllr at that
    prior.

    Args:
        scores: (N,) scores (here S-norm).
        labels: (N,) 1 for same-speaker trials, 0 for different-speaker trials.
        prior: effective target prior of the fit.
    """
    x = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"scores {x.shape} and labels {y.shape} must be equal-length vectors")
    if not np.isfinite(x).all():
        raise ValueError("scores contain NaN or inf")
    n_t, n_n = int(y.sum()), int((~y).sum())
    if n_t < 2 or n_n < 2:
        raise ValueError(f"need at least 2 target and 2 non-target trials, got {n_t} / {n_n}")
    if not 0.0 < prior < 1.0:
        raise ValueError(f"prior must be in (0, 1), got {prior}")
    w = np.where(y, prior / n_t, (1.0 - prior) / n_n)  # (N,)
    logit_prior = np.log(prior / (1.0 - prior))
    X = np.stack([x, np.ones_like(x)], axis=1)  # (N, 2)
    theta = np.array([1.0 / max(x.std(), 1e-6), -x.mean() / max(x.std(), 1e-6)])
    for _ in range(iterations):
        p = _sigmoid(X @ theta + logit_prior)
        grad = X.T @ (w * (p - y))
        hess = (X * (w * p * (1 - p))[:, None]).T @ X + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return Calibration(float(theta[0]), float(theta[1]))


def cllr(llr: np.ndarray, labels: np.ndarray) -> float:
    """Cost of log-likelihood ratios (bits), the mean of the target and non-target log-losses."""
    llr = np.asarray(llr, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if not y.any() or y.all():
        raise ValueError("cllr needs both target and non-target trials")
    tar = np.logaddexp(0.0, -llr[y]).mean()
    non = np.logaddexp(0.0, llr[~y]).mean()
    return float(0.5 * (tar + non) / np.log(2.0))


def pav(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing fit of labels ordered by score.

    Returns:
        (N,) posterior probabilities in the input order (tied scores share one value).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    # start from blocks of tied scores, then merge while a block's mean exceeds its successor's
    starts = np.concatenate([[0], np.flatnonzero(np.diff(s_sorted)) + 1])
    sums = list(np.add.reduceat(y_sorted, starts))
    counts = list(np.diff(np.concatenate([starts, [len(s_sorted)]])).astype(float))
    out_sums, out_counts = [], []
    for total, n in zip(sums, counts):
        out_sums.append(total)
        out_counts.append(n)
        while len(out_sums) > 1 and out_sums[-2] / out_counts[-2] >= out_sums[-1] / out_counts[-1]:
            t, c = out_sums.pop(), out_counts.pop()
            out_sums[-1] += t
            out_counts[-1] += c
    fitted = np.repeat(np.array(out_sums) / np.array(out_counts), np.array(out_counts, dtype=int))
    result = np.empty_like(fitted)
    result[order] = fitted
    return result


def min_cllr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Cllr after the optimal monotone recalibration of ``scores`` (PAV at equal priors)."""
    y = np.asarray(labels).astype(bool)
    post = np.clip(pav(scores, y), 1e-12, 1 - 1e-12)
    n_t, n_n = int(y.sum()), int((~y).sum())
    llr = np.log(post / (1 - post)) - np.log(n_t / n_n)
    return cllr(llr, y)


def threshold_for_far(scores: np.ndarray, labels: np.ndarray, far: float) -> tuple[float, float, float]:
    """The lowest threshold whose false-accept rate is at most ``far``.

    Returns:
        (threshold, its false-accept rate, its false-reject rate); accept means ``score >= threshold``.
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    non = np.sort(s[~y])[::-1]  # descending
    allowed = int(np.floor(far * len(non)))  # non-targets we may accept
    if allowed >= len(non):
        thr = float(non[-1])
    else:
        thr = float(np.nextafter(non[allowed], np.inf))  # just above the first non-target we must reject
    return thr, float((s[~y] >= thr).mean()), float((s[y] < thr).mean())


@dataclass(frozen=True)
class Scores:
    """One comparison on the three scales (``normalized``/``llr`` are None without a cohort/calibration)."""

    cosine: float
    normalized: float | None = None
    llr: float | None = None

    def on(self, scale: str) -> float | None:
        """The score on ``scale`` ("cosine", "normalized" or "llr")."""
        return {"cosine": self.cosine, "normalized": self.normalized, "llr": self.llr}[scale]


# Valid thresholds per scale: cosine scores live in [-1, 1]; S-norm and LLR values are unbounded
# in principle, but anything beyond +-1000 is a mistake (a cosine meant for another scale, say).
SCALE_RANGES = {"cosine": (-1.0, 1.0), "normalized": (-1000.0, 1000.0), "llr": (-1000.0, 1000.0)}


class ModelScorer:
    """A model's scoring: cohort statistics, S-norm, calibration and its default operating point.

    Args:
        cohort: (M, D) unit cohort voiceprints, or None (then only cosine scores exist).
        calibration: S-norm -> LLR map, or None.
        scale: the scale of the default decision ("cosine", "normalized" or "llr").
        threshold: the default decision threshold on ``scale``.
    """

    def __init__(self, cohort: np.ndarray | None, calibration: Calibration | None, scale: str, threshold: float):
        if calibration is not None and cohort is None:
            raise ValueError("a calibration needs a cohort")
        self.cohort = None if cohort is None else np.ascontiguousarray(cohort, dtype=np.float32)  # (M, D)
        self.calibration = calibration
        self.check_threshold(scale, threshold, "operating_point.threshold")
        self.scale = scale
        self.threshold = float(threshold)

    @property
    def scales(self) -> tuple[str, ...]:
        """The scales this model can score on."""
        if self.calibration is not None:
            return ("cosine", "normalized", "llr")
        return ("cosine", "normalized") if self.cohort is not None else ("cosine",)

    def check_threshold(self, scale: str, value: float, field: str) -> None:
        """Raise ValueError (naming ``field``) for a scale this model lacks or a value out of its range."""
        if scale not in SCALE_RANGES:
            raise ValueError(f"{field}: unknown score scale {scale!r}; scales are {sorted(SCALE_RANGES)}")
        if scale == "normalized" and self.cohort is None or scale == "llr" and self.calibration is None:
            raise ValueError(f"{field}: this model has no {'cohort' if scale == 'normalized' else 'calibration'}, "
                             f"so it cannot score on the {scale!r} scale (it has {list(self.scales)})")
        lo, hi = SCALE_RANGES[scale]
        if not (np.isfinite(value) and lo <= value <= hi):
            raise ValueError(f"{field}: {value!r} is outside the {scale} scale's range [{lo:g}, {hi:g}]")

    def stats(self, vectors: np.ndarray) -> np.ndarray | None:
        """(N, 2) or (2,) cohort statistics of unit vectors, or None without a cohort."""
        return None if self.cohort is None else cohort_stats(vectors, self.cohort)

    def score(self, cosine: float, enroll_stats: np.ndarray | None, test_stats: np.ndarray | None) -> Scores:
        """A cosine score on every scale this model has."""
        cosine = float(np.clip(cosine, -1.0, 1.0))
        if self.cohort is None or enroll_stats is None or test_stats is None:
            return Scores(cosine)
        norm = snorm(cosine, enroll_stats, test_stats)
        llr = None if self.calibration is None else self.calibration.llr(norm)
        return Scores(cosine, norm, llr)

    def cosine_threshold(self, scale: str, threshold: float, enroll_stats: np.ndarray | None,
                         test_stats: np.ndarray | None) -> float:
        """The cosine score at which this pair reaches ``threshold`` on ``scale`` (every map is increasing)."""
        if scale == "cosine" or enroll_stats is None or test_stats is None:
            return float(threshold)
        norm = threshold if scale == "normalized" else self.calibration.normalized(threshold)
        return snorm_inverse(norm, enroll_stats, test_stats)

    @classmethod
    def from_card(cls, card, model_dir) -> "ModelScorer":
        """The scorer an artifact describes; raises ValueError naming the file or field at fault."""
        from pathlib import Path

        cohort = None
        if card.cohort is not None:
            path = Path(model_dir) / card.cohort["file"]
            try:
                cohort = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"{path}: cannot read the cohort ({e})") from None
            if cohort.ndim != 2 or cohort.shape[1] != card.embedding_dim:
                raise ValueError(f"{path}: cohort has shape {cohort.shape}, expected (M, {card.embedding_dim}) "
                                 f"for the model's embedding size")
            if cohort.shape[0] != card.cohort["size"]:
                raise ValueError(f"{path}: cohort has {cohort.shape[0]} rows, model.json cohort.size says {card.cohort['size']}")
            if not np.isfinite(cohort).all():
                raise ValueError(f"{path}: cohort contains NaN or inf")
            norms = np.linalg.norm(cohort, axis=1)
            if (norms < 1e-6).any():
                raise ValueError(f"{path}: cohort row {int(np.argmin(norms))} is the zero vector")
            cohort = cohort / norms[:, None]
        calibration = None
        if card.calibration is not None:
            calibration = Calibration(float(card.calibration["scale"]), float(card.calibration["offset"]))
        if card.operating_point is not None:
            scale, threshold = card.operating_point["scale"], float(card.operating_point["threshold"])
        else:
            scale, threshold = "cosine", float(card.threshold)
        return cls(cohort, calibration, scale, threshold)
