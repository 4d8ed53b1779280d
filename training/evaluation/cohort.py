"""Impostor cohorts made of channel groups, and the trials a score map is fitted on.

A *channel group* is the same set of speakers through one channel users send (``COHORT_GROUPS``);
``models.scoring`` normalises each side against the group it is closest to. The groups'
conditions are broad on purpose (noise at 5-20 dB, any of eight AMR modes, ...), so that
evaluation conditions (white noise at exactly 10 dB, say) are covered without being copied.

Calibration trials are scored with the cohort exactly as the service scores them, except that
a trial side is never normalised against voiceprints of its own speaker (``exclude``), because
the cohort's speakers are the calibration speakers here and will be strangers when served.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.scoring import cohort_stats, group_centroids
from training.evaluation.realembed import Rendered

__all__ = ["COHORT_GROUPS", "NARROWBAND_GROUPS", "BANDLIMITED_GROUPS", "CALIBRATION_SPECS", "Cohort", "build_cohort", "Trials",
           "score_trials"]

# group name -> the condition (training.data.channels) its voiceprints are rendered through
COHORT_GROUPS = {"clean": "clean", "telephone": "telephone", "gsm": "gsm", "amr": "amr", "opus": "opus", "mp3": "mp3",
                 "noise": "noise_wp", "babble": "babble", "reverb": "reverb"}
NARROWBAND_GROUPS = ["telephone", "gsm", "amr"]
BANDLIMITED_GROUPS = ["telephone"]  # 300-3400 Hz: no low harmonics either, unlike an 8 kHz codec alone

# calibration trial families: name -> (enrolment side's condition, probe side's condition)
CALIBRATION_SPECS = {
    "clean": ("clean", "clean"), "telephone": ("telephone", "telephone"), "telephone-probe": ("clean", "telephone"),
    "gsm": ("gsm", "gsm"), "amr": ("amr", "amr"), "amr-probe": ("clean", "amr"), "opus": ("opus", "opus"),
    "mp3": ("mp3", "mp3"), "noise": ("noise_wp", "noise_wp"), "babble": ("babble", "babble"),
    "reverb-probe": ("clean", "reverb"), "quiet-probe": ("clean", "quiet"), "silence": ("silence_pad", "silence_pad"),
    "short-probe": ("clean", "short15"),
}


@dataclass
class Cohort:
    """Cohort voiceprints with their channel group and speaker."""

    vectors: np.ndarray  # (M, D) unit
    groups: np.ndarray  # (M,) index into names
    speakers: np.ndarray  # (M,) speaker ids (for leaving a trial's own speaker out)
    names: list[str]

    @property
    def centroids(self) -> np.ndarray:
        """(G, D) unit group centroids."""
        return group_centroids(self.vectors, self.groups, len(self.names))

    def stats(self, emb: np.ndarray, speakers: np.ndarray | None = None) -> np.ndarray:
        """(N, 3) channel-matched statistics of (N, D) ``emb``, leaving out cohort rows of ``speakers``."""
        exclude = None if speakers is None else (np.asarray(speakers)[:, None] == self.speakers[None, :])  # (N, M)
        return cohort_stats(emb, self.vectors, self.groups, self.centroids, exclude)

    def concat(self, other: "Cohort") -> "Cohort":
        """Both cohorts' voiceprints (same group names)."""
        if other.names != self.names:
            raise ValueError(f"cohort groups differ: {self.names} vs {other.names}")
        return Cohort(np.concatenate([self.vectors, other.vectors]), np.concatenate([self.groups, other.groups]),
                      np.concatenate([self.speakers, other.speakers]), self.names)


def build_cohort(rendered: dict[str, Rendered], speakers: list[str], per_speaker: int, utts: int,
                 rng: np.random.Generator) -> Cohort:
    """Voiceprints of every speaker in every channel group.

    Args:
        rendered: condition name -> the split under that condition (every ``COHORT_GROUPS`` condition).
        speakers: (N,) the split's speaker of each row.
        per_speaker: voiceprints per speaker and group.
        utts: utterances averaged into each voiceprint (fewer when a speaker has fewer with speech).
        rng: which utterances.
    """
    names = list(COHORT_GROUPS)
    spk = np.asarray(speakers)
    vectors, groups, owners = [], [], []
    for g, name in enumerate(names):
        r = rendered[COHORT_GROUPS[name]]
        for s in sorted(set(spk.tolist())):
            rows = np.flatnonzero((spk == s) & r.ok)
            if len(rows) == 0:
                continue
            for _ in range(per_speaker):
                pick = rng.choice(rows, size=min(utts, len(rows)), replace=False)
                v = r.emb[pick].astype(np.float64).sum(axis=0)
                vectors.append(v / np.linalg.norm(v))
                groups.append(g)
                owners.append(s)
    if not vectors:
        raise ValueError("no cohort voiceprint: no utterance of the cohort speakers kept enough speech")
    missing = sorted(set(range(len(names))) - set(groups))
    if missing:
        raise ValueError(f"cohort groups {[names[i] for i in missing]} got no voiceprint")
    return Cohort(np.stack(vectors).astype(np.float32), np.array(groups, np.int64), np.array(owners), names)


@dataclass
class Trials:
    """Scored calibration or evaluation trials."""

    snorm: np.ndarray  # (N,)
    cosine: np.ndarray  # (N,)
    label: np.ndarray  # (N,) bool, True for same speaker
    mismatch: np.ndarray  # (N,) 1.0 where exactly one side is narrowband
    min_speech: np.ndarray  # (N,) seconds of the shorter side
    spec: np.ndarray  # (N,) trial family
    band: np.ndarray  # (N,) 1.0 where the narrowband side of a mismatch is band-limited

    @staticmethod
    def concat(parts: list["Trials"]) -> "Trials":
        """All trials of ``parts``."""
        return Trials(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                        ("snorm", "cosine", "label", "mismatch", "min_speech", "spec", "band")))


def score_trials(spec: str, enrol: Rendered, probe: Rendered, ia: np.ndarray, ib: np.ndarray, label: np.ndarray,
                 stats_e: np.ndarray, stats_p: np.ndarray, narrowband: np.ndarray, bandlimited: np.ndarray) -> Trials:
    """Trials (enrol[ia[k]], probe[ib[k]]) on which both sides kept enough speech.

    Args:
        spec: the trial family's name.
        enrol, probe: the two sides' renderings.
        ia, ib: (N,) row indices; label: (N,) same speaker.
        stats_e, stats_p: (rows, 3) cohort statistics of each rendering.
        narrowband: (G + 1,) whether each channel group is narrowband.
        bandlimited: (G + 1,) whether each channel group is band-limited (telephone band).
    """
    ok = enrol.ok[ia] & probe.ok[ib]
    ia, ib, label = ia[ok], ib[ok], np.asarray(label, bool)[ok]
    cos = np.einsum("nd,nd->n", enrol.emb[ia], probe.emb[ib]).astype(np.float64)  # (N,)
    se, sp = stats_e[ia], stats_p[ib]
    snorm = 0.5 * ((cos - se[:, 0]) / se[:, 1] + (cos - sp[:, 0]) / sp[:, 1])
    ge, gp = se[:, 2].astype(int), sp[:, 2].astype(int)
    mismatch = narrowband[ge] != narrowband[gp]
    band = mismatch & (bandlimited[ge] | bandlimited[gp])
    speech = np.minimum(enrol.speech[ia], probe.speech[ib])
    return Trials(snorm, cos, label, mismatch.astype(np.float64), speech, np.full(len(cos), spec), band.astype(np.float64))
