"""Score normalisation: cosine -> channel-matched S-norm -> calibrated log-likelihood ratio.

A raw cosine between two speaker embeddings means different things for different voices,
channels and amounts of speech, so a fixed cosine threshold calibrated on one kind of audio
does not hold on another. Two standard steps make scores comparable:

1. **S-norm** (symmetric score normalisation) against an impostor *cohort*, voiceprints of many
   speakers stored with the model: each side's scores against the cohort give a mean and a
   standard deviation, and ``snorm = ((s - mu_e) / sd_e + (s - mu_t) / sd_t) / 2``.

   A channel that both sides share (both on the telephone, both in the same noise) raises every
   cosine between them, impostors included; against a cohort of clean voiceprints S-norm then
   reads the channel as evidence for the same speaker (on real speech, impostor S-norm averaged
   +1.8 with both sides through the telephone band). The cohort is therefore made of *channel
   groups*: the same training speakers through each channel users send (clean, telephone band,
   GSM, AMR-NB, Opus, MP3, white and babble noise, reverberation, ...). Each side is assigned
   the group whose centroid (the mean of its voiceprints) it is closest to, and normalised
   against that group only (*channel-matched S-norm*). Two sides that share a channel are then
   each compared with impostors through the same channel, and impostor scores stay near 0.
   A cohort without groups is one group (plain S-norm). Adaptive top-N S-norm was measured too:
   it left impostors at -4.5 (clean) to -0.7 (telephone both sides) standard deviations.
2. **Calibration** (``models.calibration``): S-norm and two quality measures (a bandwidth
   mismatch between the sides and whether the narrowband side is band-limited, from their
   channel groups, and the shorter side's speech) ->
   a natural-log likelihood ratio.

Only numpy: the service applies these maps at request time; the offline job fits them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.band_map import BandMap
from models.calibration import Calibration, cllr, fit_calibration, min_cllr, pav, threshold_for_far

__all__ = ["cohort_stats", "group_centroids", "snorm", "snorm_inverse", "Calibration", "fit_calibration", "cllr",
           "min_cllr", "pav", "threshold_for_far", "Scores", "ModelScorer", "SCALE_RANGES"]

_MIN_SD = 1e-4  # a cohort whose scores against a vector barely vary would blow S-norm up


def group_centroids(cohort: np.ndarray, groups: np.ndarray, n_groups: int) -> np.ndarray:
    """(G, D) unit mean of each channel group's voiceprints."""
    onehot = np.zeros((len(groups), n_groups), np.float64)  # (M, G)
    onehot[np.arange(len(groups)), groups] = 1.0
    sums = onehot.T @ np.asarray(cohort, np.float64)  # (G, D)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def cohort_stats(vectors: np.ndarray, cohort: np.ndarray, groups: np.ndarray | None = None,
                 centroids: np.ndarray | None = None, exclude: np.ndarray | None = None) -> np.ndarray:
    """Channel-matched cohort statistics of unit vectors.

    Args:
        vectors: (N, D) or (D,) unit embeddings.
        cohort: (M, D) unit cohort voiceprints.
        groups: (M,) channel group of each voiceprint (None: one group).
        centroids: (G, D) unit group centroids (``group_centroids``); required with ``groups``.
        exclude: (N, M) bool, cohort entries left out for a row (e.g. the row's own speaker, offline).

    Returns:
        (N, 3) float64 rows of (mean, std, group) of each vector's scores against the members of
        its nearest group ((3,) for a (D,) input).
    """
    v = np.asarray(vectors, dtype=np.float32)
    single = v.ndim == 1
    v = np.atleast_2d(v)
    scores = (v @ np.asarray(cohort, dtype=np.float32).T).astype(np.float64)  # (N, M)
    if groups is None:
        member = np.ones((len(v), scores.shape[1]), bool)  # (N, M)
        g = np.zeros(len(v), np.int64)
    else:
        g = np.argmax(v @ np.asarray(centroids, np.float32).T, axis=1)  # (N,)
        member = groups[None, :] == g[:, None]  # (N, M)
    if exclude is not None:
        member = member & ~exclude
    n = np.maximum(member.sum(axis=1), 1)  # (N,)
    mean = np.where(member, scores, 0.0).sum(axis=1) / n
    var = np.where(member, (scores - mean[:, None]) ** 2, 0.0).sum(axis=1) / n
    stats = np.stack([mean, np.maximum(np.sqrt(var), _MIN_SD), g.astype(np.float64)], axis=1)  # (N, 3)
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
    """A model's scoring: channel-matched cohort statistics, S-norm, calibration, default operating point.

    Args:
        cohort: (M, D) unit cohort voiceprints, or None (then only cosine scores exist).
        calibration: S-norm (+ quality) -> LLR map, or None.
        scale: the scale of the default decision ("cosine", "normalized" or "llr").
        threshold: the default decision threshold on ``scale``.
        groups: (M,) channel group index of each cohort voiceprint (None: one group).
        group_names: the groups' names (``groups`` indexes them).
        narrowband_groups: names of the groups that are narrowband channels.
        far_table: [[false-accept rate, LLR threshold], ...] measured on real speech.
        bandlimited_groups: names of the narrowband groups that are also band-limited below 300 Hz.
    """

    def __init__(self, cohort: np.ndarray | None, calibration: Calibration | None, scale: str, threshold: float,
                 groups: np.ndarray | None = None, group_names: list[str] | None = None,
                 narrowband_groups: list[str] | None = None, far_table: list[list[float]] | None = None,
                 bandlimited_groups: list[str] | None = None):
        if calibration is not None and cohort is None:
            raise ValueError("a calibration needs a cohort")
        self.cohort = None if cohort is None else np.ascontiguousarray(cohort, dtype=np.float32)  # (M, D)
        self.calibration = calibration
        self.check_threshold(scale, threshold, "operating_point.threshold")
        self.scale = scale
        self.threshold = float(threshold)
        self.groups, self.centroids = None, None
        self.group_names = list(group_names or ["all"])
        if groups is not None:
            if self.cohort is None or groups.shape != (len(self.cohort),):
                raise ValueError(f"cohort groups: expected one group per cohort row, got shape {groups.shape}")
            if groups.min() < 0 or groups.max() >= len(self.group_names):
                raise ValueError(f"cohort groups: indices must be in 0..{len(self.group_names) - 1}")
            if len(np.unique(groups)) != len(self.group_names):
                raise ValueError(f"cohort groups: every one of {self.group_names} needs members")
            self.groups = groups.astype(np.int64)
            self.centroids = group_centroids(self.cohort, self.groups, len(self.group_names))  # (G, D)
        unknown = sorted(set(narrowband_groups or []) - set(self.group_names))
        if unknown:
            raise ValueError(f"cohort narrowband_groups: {unknown} are not groups ({self.group_names})")
        self._narrow = np.array([g in set(narrowband_groups or []) for g in self.group_names] + [False])  # (G + 1,)
        unknown = sorted(set(bandlimited_groups or []) - set(narrowband_groups or []))
        if unknown:
            raise ValueError(f"cohort bandlimited_groups: {unknown} are not narrowband groups")
        self._band = np.array([g in set(bandlimited_groups or []) for g in self.group_names] + [False])  # (G + 1,)
        self.far_table = [(float(r), float(t)) for r, t in (far_table or [])] if calibration is not None else []
        self.band_map: BandMap | None = None  # set by from_card when the card has one

    def llr_for_far(self, rate: float, field: str = "target_false_accept_rate") -> float:
        """The LLR threshold at false-accept rate ``rate``, interpolated in log-rate in ``far_table``.

        Raises:
            ValueError: no table, or ``rate`` outside the rates it measured (message names ``field``).
        """
        if not self.far_table:
            raise ValueError(f"{field}: this model has no false-accept table (calibrate it on real speech)")
        rates = np.log([r for r, _ in self.far_table])
        lo, hi = self.far_table[0][0], self.far_table[-1][0]
        if not (np.isfinite(rate) and lo <= rate <= hi):
            raise ValueError(f"{field}: {rate!r} is outside the rates this model's calibration measured "
                             f"({lo:g} to {hi:g})")
        return float(np.interp(np.log(rate), rates, [t for _, t in self.far_table]))

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
        """(N, 3) or (3,) channel-matched cohort statistics (mean, std, group) of unit vectors, or None."""
        if self.cohort is None:
            return None
        return cohort_stats(vectors, self.cohort, self.groups, self.centroids)

    def narrowband(self, stats: np.ndarray | None) -> bool:
        """Whether a side with these statistics is in a narrowband channel group."""
        if stats is None or len(stats) < 3:
            return False
        return bool(self._narrow[int(stats[2])])

    def narrowband_flags(self, stats: np.ndarray) -> np.ndarray:
        """(N,) whether each row of (N, 3) ``stats`` is in a narrowband channel group."""
        stats = np.atleast_2d(stats)
        if stats.shape[1] < 3:
            return np.zeros(len(stats), bool)
        return self._narrow[stats[:, 2].astype(np.int64)]

    def bandlimited_flags(self, stats: np.ndarray) -> np.ndarray:
        """(N,) whether each row of (N, 3) ``stats`` is in a band-limited (telephone-band) group."""
        stats = np.atleast_2d(stats)
        if stats.shape[1] < 3:
            return np.zeros(len(stats), bool)
        return self._band[stats[:, 2].astype(np.int64)]

    def in_band(self, stats: np.ndarray, low_cut: bool) -> np.ndarray:
        """(N,) whether sides with (N, 3) ``stats`` are already in a narrowband channel's band by their channel group:
        a band-limited (landline) group when ``low_cut``, any narrowband group otherwise. A band map
        (``models.band_map``) carries the other voiceprints into that band."""
        return self.bandlimited_flags(stats) if low_cut else self.narrowband_flags(stats)

    def pair_quality(self, a_stats: np.ndarray, b_stats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mismatch, band) flags of pairs of (N, 3) statistics: one side narrowband; and it band-limited."""
        na, nb = self.narrowband_flags(a_stats), self.narrowband_flags(b_stats)
        mismatch = na != nb
        band = mismatch & (self.bandlimited_flags(a_stats) | self.bandlimited_flags(b_stats))
        return mismatch.astype(np.float64), band.astype(np.float64)

    def group_name(self, stats: np.ndarray | None) -> str:
        """The channel group of a side ("" without groups)."""
        if stats is None or len(stats) < 3 or self.groups is None:
            return ""
        return self.group_names[int(stats[2])]

    def _quality(self, a_stats, b_stats, a_speech, b_speech) -> tuple[float, float | None, float]:
        """(bandwidth mismatch, shorter side's speech or None, band-limited mismatch) of a pair."""
        mismatch, band = self.pair_quality(a_stats, b_stats)
        known = [t for t in (a_speech, b_speech) if t is not None and t > 0]
        return float(mismatch[0]), (min(known) if known else None), float(band[0])

    def score(self, cosine: float, enroll_stats: np.ndarray | None, test_stats: np.ndarray | None,
              enroll_speech: float | None = None, test_speech: float | None = None, llr_offset: float = 0.0) -> Scores:
        """A cosine score on every scale this model has.

        Args:
            cosine: the pair's cosine.
            enroll_stats, test_stats: each side's ``stats`` (None: only the cosine).
            enroll_speech, test_speech: each side's net speech in seconds (None: not known).
            llr_offset: added to the calibrated LLR (a voiceprint mapped by ``band_map``).
        """
        cosine = float(np.clip(cosine, -1.0, 1.0))
        if self.cohort is None or enroll_stats is None or test_stats is None:
            return Scores(cosine)
        norm = snorm(cosine, enroll_stats, test_stats)
        if self.calibration is None:
            return Scores(cosine, norm)
        mismatch, speech, band = self._quality(enroll_stats, test_stats, enroll_speech, test_speech)
        return Scores(cosine, norm, self.calibration.llr(norm, mismatch, speech, band) + llr_offset)

    def cosine_threshold(self, scale: str, threshold: float, enroll_stats: np.ndarray | None,
                         test_stats: np.ndarray | None, enroll_speech: float | None = None,
                         test_speech: float | None = None, llr_offset: float = 0.0) -> float:
        """The cosine score at which this pair reaches ``threshold`` on ``scale`` (every map is increasing;
        ``llr_offset`` as in ``score``)."""
        if scale == "cosine" or enroll_stats is None or test_stats is None:
            return float(threshold)
        if scale == "normalized":
            norm = threshold
        else:
            mismatch, speech, band = self._quality(enroll_stats, test_stats, enroll_speech, test_speech)
            norm = self.calibration.normalized(threshold - llr_offset, mismatch, speech, band)
        return snorm_inverse(norm, enroll_stats, test_stats)

    @classmethod
    def from_card(cls, card, model_dir) -> "ModelScorer":
        """The scorer an artifact describes; raises ValueError naming the file or field at fault."""
        from pathlib import Path

        cohort = groups = None
        names, narrow, band = None, None, None
        if card.cohort is not None:
            path = Path(model_dir) / card.cohort["file"]
            cohort = _load_array(path, "the cohort")
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
            if card.cohort.get("groups_file"):
                gpath = Path(model_dir) / card.cohort["groups_file"]
                groups = _load_array(gpath, "the cohort groups")
                if groups.shape != (len(cohort),) or groups.dtype.kind not in "iu":
                    raise ValueError(f"{gpath}: expected {len(cohort)} integer group indices, got {groups.dtype} {groups.shape}")
                names = card.cohort.get("groups")
                if not isinstance(names, list) or not names:
                    raise ValueError("model.json cohort.groups: must list the channel groups' names")
                narrow = card.cohort.get("narrowband_groups", [])
                band = card.cohort.get("bandlimited_groups", [])
        calibration = None
        if card.calibration is not None:
            calibration = Calibration.from_card(card.calibration)
        if card.operating_point is not None:
            scale, threshold = card.operating_point["scale"], float(card.operating_point["threshold"])
        else:
            scale, threshold = "cosine", float(card.threshold)
        table = (card.operating_point or {}).get("far_table")
        scorer = cls(cohort, calibration, scale, threshold, groups, names, narrow, table, band)
        if card.band_map is not None:
            scorer.band_map = BandMap.load(Path(model_dir) / card.band_map["file"], card.embedding_dim)
        return scorer


def _load_array(path, what: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from None
