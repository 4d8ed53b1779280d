"""Score calibration: normalised scores and quality measures -> log-likelihood ratios.

A linear logistic map (the Platt/FoCal recipe, fitted offline by prior-weighted logistic
regression) turns a normalised score into a natural-log likelihood ratio: ``llr > 0`` means the
same-speaker hypothesis is the more likely one at equal priors, and a Bayes decision for prior
``p`` and costs ``c_miss``, ``c_fa`` accepts when ``llr >= log(c_fa (1 - p) / (c_miss p))``.

One map for every channel was not enough on real speech: a clean enrolment against a telephone
probe scores far lower for the same speaker than two clean or two telephone recordings, and
short probes are less certain. The map therefore takes two *quality measures* of the pair next
to the score (the QMF recipe of the NIST evaluations), both known at request time for every
kind of side (audio, client embedding, enrolled speaker):

* ``bandwidth_mismatch``: exactly one side is narrowband (telephone band, 8 kHz codecs), as its
  channel group in the cohort says (``models.scoring``); it shifts the offset and the slope;
  ``band_limited``: the narrowband side of such a pair is also band-limited below 300 Hz (the
  telephone band proper, not only an 8 kHz codec); a further shift of offset and slope. On real
  speech a clean enrolment against a telephone-band probe lost far more than against an 8 kHz
  AMR-NB probe (EER 20% against 9%), so one mismatch term over-stated the telephone case
  (actual Cllr 1.14 bits, minimum 0.63) and the band term brought it under 1;
* ``log_speech``: the log of the shorter side's net speech, clipped to 1-8 s (``speech_reference``
  seconds when a side declares none).

``llr = (scale + mismatch_scale * m + band_scale * b) * s + offset + mismatch_offset * m + band_offset * b
+ speech * log(clip(t))`` with ``m``, ``b`` in {0, 1} (``b`` only with ``m``). With the quality weights
at 0 (maps of the first release) it is the plain linear map.

Quality of a calibration: ``cllr`` (the cost of the log-likelihood ratios, in bits: 0 is perfect,
1 is a system that always says "don't know") and ``min_cllr`` (after the best monotone
recalibration, via pool-adjacent-violators): their difference is the calibration loss.

Only numpy: the service applies these maps at request time; the offline job fits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Calibration", "fit_calibration", "speech_feature", "cllr", "min_cllr", "pav", "threshold_for_far"]

SPEECH_CLIP = (1.0, 8.0)  # seconds: the range of net speech the quality term distinguishes


def speech_feature(seconds: np.ndarray | float) -> np.ndarray | float:
    """``log(clip(seconds, 1, 8))``: the speech quality measure of a pair (its shorter side)."""
    out = np.log(np.clip(np.asarray(seconds, dtype=np.float64), *SPEECH_CLIP))
    return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class Calibration:
    """The map from normalised scores (and quality measures) to natural-log likelihood ratios.

    Attributes:
        scale, offset: the linear map of a matched-bandwidth pair at ``log_speech`` 0 (1 s).
        mismatch_scale, mismatch_offset: added to ``scale`` and ``offset`` when exactly one side
            is narrowband.
        band_scale, band_offset: added too when that narrowband side is band-limited (telephone band).
        speech: weight of ``speech_feature`` of the shorter side.
        speech_reference: seconds assumed for a side that declares no speech.
    """

    scale: float
    offset: float
    mismatch_scale: float = 0.0
    mismatch_offset: float = 0.0
    speech: float = 0.0
    speech_reference: float = 4.0
    band_scale: float = 0.0
    band_offset: float = 0.0

    def __post_init__(self) -> None:
        values = (self.scale, self.offset, self.mismatch_scale, self.mismatch_offset, self.speech, self.speech_reference,
                  self.band_scale, self.band_offset)
        if not all(np.isfinite(v) for v in values):
            raise ValueError(f"calibration: every weight must be finite, got {values!r}")
        slopes = (self.scale, self.scale + self.mismatch_scale, self.scale + self.mismatch_scale + self.band_scale)
        if min(slopes) <= 0:
            raise ValueError(f"calibration: scale must be > 0 with and without a bandwidth mismatch (higher scores = "
                             f"more likely the same speaker), got {slopes!r}")
        if self.speech_reference <= 0:
            raise ValueError(f"calibration: speech_reference must be > 0, got {self.speech_reference!r}")

    @property
    def has_quality(self) -> bool:
        """Whether any quality term is used."""
        return bool(self.mismatch_scale or self.mismatch_offset or self.speech or self.band_scale or self.band_offset)

    def _terms(self, mismatch, min_speech, band) -> tuple[np.ndarray, np.ndarray]:
        """(slope, intercept) of the pair(s): ``llr = slope * s + intercept``."""
        m = np.asarray(mismatch if mismatch is not None else 0.0, dtype=np.float64)
        b = m * np.asarray(band if band is not None else 0.0, dtype=np.float64)
        t = np.asarray(self.speech_reference if min_speech is None else min_speech, dtype=np.float64)
        t = np.where(t > 0, t, self.speech_reference)
        slope = self.scale + self.mismatch_scale * m + self.band_scale * b
        return slope, self.offset + self.mismatch_offset * m + self.band_offset * b + self.speech * speech_feature(t)

    def llr(self, normalized: np.ndarray | float, mismatch: np.ndarray | float | None = None,
            min_speech: np.ndarray | float | None = None,
            band: np.ndarray | float | None = None) -> np.ndarray | float:
        """Log-likelihood ratios of normalised scores.

        Args:
            normalized: (N,) or scalar normalised scores.
            mismatch: (N,) or scalar, 1 where exactly one side is narrowband (None: 0).
            min_speech: (N,) or scalar seconds of the shorter side (None or <= 0: ``speech_reference``).
            band: (N,) or scalar, 1 where the narrowband side of a mismatch is band-limited (None: 0).
        """
        slope, intercept = self._terms(mismatch, min_speech, band)
        out = slope * np.asarray(normalized, dtype=np.float64) + intercept
        return float(out) if out.ndim == 0 else out

    def normalized(self, llr: float, mismatch: float | None = None, min_speech: float | None = None,
                   band: float | None = None) -> float:
        """The normalised score with this log-likelihood ratio for a pair of this quality."""
        slope, intercept = self._terms(mismatch, min_speech, band)
        return float((llr - intercept) / slope)

    def to_card(self) -> dict:
        """The ``model.json`` fields of this map."""
        return {"scale": round(self.scale, 6), "offset": round(self.offset, 6),
                "mismatch_scale": round(self.mismatch_scale, 6), "mismatch_offset": round(self.mismatch_offset, 6),
                "band_scale": round(self.band_scale, 6), "band_offset": round(self.band_offset, 6),
                "speech": round(self.speech, 6), "speech_reference": round(self.speech_reference, 3)}

    @classmethod
    def from_card(cls, d: dict) -> "Calibration":
        """The map a ``model.json`` ``calibration`` object describes (first-release maps have scale/offset only)."""
        return cls(float(d["scale"]), float(d["offset"]), float(d.get("mismatch_scale", 0.0)),
                   float(d.get("mismatch_offset", 0.0)), float(d.get("speech", 0.0)),
                   float(d.get("speech_reference", 4.0)), float(d.get("band_scale", 0.0)),
                   float(d.get("band_offset", 0.0)))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def _logistic(X: np.ndarray, y: np.ndarray, prior: float, iterations: int,
              wts: np.ndarray | None = None) -> np.ndarray:
    """Prior-weighted logistic regression of ``y`` on the columns of (N, K) ``X`` (an intercept is added).

    Each class's trials share its prior (``prior`` for targets), in proportion to ``wts`` (default equal).
    """
    wts = np.ones(len(y)) if wts is None else wts
    w = np.where(y, prior * wts / wts[y].sum(), (1.0 - prior) * wts / wts[~y].sum())  # (N,)
    logit_prior = np.log(prior / (1.0 - prior))
    A = np.column_stack([X, np.ones(len(X))])  # (N, K + 1)
    theta = np.zeros(A.shape[1])
    sd = max(float(X[:, 0].std()), 1e-6)
    theta[0], theta[-1] = 1.0 / sd, -float(X[:, 0].mean()) / sd
    for _ in range(iterations):
        p = _sigmoid(A @ theta + logit_prior)
        grad = A.T @ (w * (p - y))
        hess = (A * (w * p * (1 - p))[:, None]).T @ A + 1e-9 * np.eye(A.shape[1])
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def fit_calibration(scores: np.ndarray, labels: np.ndarray, prior: float = 0.5, iterations: int = 100,
                    mismatch: np.ndarray | None = None, min_speech: np.ndarray | None = None,
                    weights: np.ndarray | None = None, band: np.ndarray | None = None) -> Calibration:
    """Prior-weighted linear logistic regression of labels on scores (and quality measures).

    Target and non-target trials are weighted so that they count as ``prior`` and ``1 - prior``
    whatever their numbers; the fitted ``llr`` is then the log-likelihood ratio (the prior's
    log-odds is removed from the logistic output), which minimises Cllr at that prior.

    Args:
        scores: (N,) normalised scores.
        labels: (N,) 1 for same-speaker trials, 0 for different-speaker trials.
        prior: effective target prior of the fit.
        mismatch: (N,) 1 where exactly one side is narrowband; fits the mismatch terms.
        min_speech: (N,) seconds of the shorter side; fits the speech term.
        weights: (N,) relative weights of the trials within each class (default equal).
        band: (N,) 1 where the narrowband side of a mismatch is band-limited; fits the band terms.
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
    cols = [x]
    m = None if mismatch is None else np.asarray(mismatch, dtype=np.float64)
    use_mismatch = m is not None and 0 < m.sum() < len(m)
    if use_mismatch:
        cols += [x * m, m]
    b = None if band is None or not use_mismatch else m * np.asarray(band, dtype=np.float64)
    use_band = b is not None and 0 < b.sum() < m.sum()  # some mismatched pairs with, some without
    if use_band:
        cols += [x * b, b]
    t = None if min_speech is None else np.asarray(min_speech, dtype=np.float64)
    if t is not None:
        cols.append(speech_feature(t))
    X = np.column_stack(cols)  # (N, K)
    wts = None
    if weights is not None:
        wts = np.asarray(weights, dtype=np.float64)
        if wts.shape != x.shape or (wts < 0).any() or wts[y].sum() <= 0 or wts[~y].sum() <= 0:
            raise ValueError("weights must be non-negative, one per trial, with some weight in each class")
    theta = _logistic(X, y, prior, iterations, wts)
    i = 1
    mismatch_scale = mismatch_offset = band_scale = band_offset = speech = 0.0
    if use_mismatch:
        mismatch_scale, mismatch_offset = float(theta[1]), float(theta[2])
        i = 3
    if use_band:
        band_scale, band_offset = float(theta[i]), float(theta[i + 1])
        i += 2
    if t is not None:
        speech = float(theta[i])
    ref = float(np.exp(np.median(speech_feature(t)))) if t is not None else 4.0
    return Calibration(float(theta[0]), float(theta[-1]), mismatch_scale, mismatch_offset, speech, ref, band_scale,
                       band_offset)


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
