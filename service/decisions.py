"""Verdicts from scores and speech: the rules Verify, Identify and Enroll share.

A comparison is between two *sides* (an audio probe, a client's embedding, an enrolled
speaker). A side that carries too little speech (an audio probe under the model's
``min_probe_speech`` seconds, an enrolled speaker under ``min_enroll_speech`` seconds) is
never decided on: the verdict is NOT_ENOUGH_SPEECH, whatever the score would have been.
Otherwise the score is computed on every scale the model has (cosine, S-norm, LLR) and the
decision is taken on the threshold's scale. Knows nothing of protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.scoring import ModelScorer, Scores
from service.inputs import Speech

__all__ = ["Side", "Threshold", "Decision", "decide", "carry_into_band", "open_set_threshold", "speech_shortfall", "speaker_shortfall", "is_ready",
           "ACCEPT", "REJECT", "NOT_ENOUGH_SPEECH"]

ACCEPT, REJECT, NOT_ENOUGH_SPEECH = "accept", "reject", "not_enough_speech"


@dataclass
class Side:
    """One side of a comparison.

    Attributes:
        field: the request field it came from ("a", "probe", ...).
        vector: (D,) unit embedding, None when it was not embedded (too little speech).
        stats: (3,) cohort statistics of ``vector`` (mean, std, channel group), None without a cohort.
        speech: VAD result, for audio.
        shortfall: why this side cannot be decided on ("" when it can).
        speech_seconds: net speech behind ``vector`` (a quality measure of the calibration; None:
            not known, as for an embedding that declares none).
        ref: (collection, speaker id) of an enrolled speaker.
        llr_offset: added to the pair's LLR (a voiceprint carried into the other side's band by the
            model's band map, ``models.band_map``).
    """

    field: str
    vector: np.ndarray | None = None
    stats: np.ndarray | None = None
    speech: Speech | None = None
    shortfall: str = ""
    speech_seconds: float | None = None
    ref: tuple[str, str] | None = None
    llr_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.speech_seconds is None and self.speech is not None:
            self.speech_seconds = self.speech.speech_seconds


@dataclass(frozen=True)
class Threshold:
    """A decision threshold: accept when the score on ``scale`` is >= ``value``."""

    scale: str
    value: float


@dataclass
class Decision:
    """The verdict of one comparison."""

    verdict: str  # ACCEPT, REJECT or NOT_ENOUGH_SPEECH
    scores: Scores | None  # None when a side could not be scored
    threshold: Threshold
    cosine_threshold: float  # the cosine this pair needed for an accept
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """True only for an accept."""
        return self.verdict == ACCEPT


def speech_shortfall(field: str, speech: Speech, required: float) -> str:
    """Why an audio probe has too little speech ("" when it has enough)."""
    if speech.speech_seconds >= required and speech.speech_seconds > 0:
        return ""
    if speech.speech_seconds == 0:
        return f"{field}: no speech found in {speech.audio_seconds:.2f} s of audio"
    return f"{field}: {speech.speech_seconds:.2f} s of speech in {speech.audio_seconds:.2f} s of audio, at least {required:.2f} s needed"


def is_ready(speech: float | None, required: float) -> bool:
    """Whether a speaker with ``speech`` enrolled seconds (None: not measured, legacy) is usable."""
    return speech is None or speech >= required


def speaker_shortfall(field: str, speaker_id: str, speech: float | None, required: float) -> str:
    """Why an enrolled speaker cannot be used yet ("" when it can)."""
    if is_ready(speech, required):
        return ""
    return f"{field}: speaker {speaker_id!r} has {speech:.2f} s of enrolled speech, at least {required:.2f} s needed"


def decide(scorer: ModelScorer, threshold: Threshold, a: Side, b: Side, nominal_cosine: float) -> Decision:
    """Score two sides and decide at ``threshold``.

    Args:
        scorer: the model's scorer.
        threshold: the decision threshold.
        a, b: the sides; a side with a shortfall makes the verdict NOT_ENOUGH_SPEECH.
        nominal_cosine: the cosine threshold reported when nothing could be scored.
    """
    reasons = [s.shortfall for s in (a, b) if s.shortfall]
    if reasons:
        return Decision(NOT_ENOUGH_SPEECH, None, threshold, nominal_cosine, "; ".join(reasons))
    offset = a.llr_offset + b.llr_offset
    scores = scorer.score(float(np.dot(a.vector, b.vector)), a.stats, b.stats, a.speech_seconds, b.speech_seconds,
                          offset)
    accepted = scores.on(threshold.scale) >= threshold.value
    cosine_threshold = scorer.cosine_threshold(threshold.scale, threshold.value, a.stats, b.stats, a.speech_seconds,
                                               b.speech_seconds, offset)
    return Decision(ACCEPT if accepted else REJECT, scores, threshold, cosine_threshold)



def carry_into_band(scorer: ModelScorer, side: Side, low_cut: bool) -> bool:
    """Carry a voiceprint ``side`` (an enrolled speaker, an embedding) into a narrowband recording's band with the
    model's band map (``models.band_map``; ``low_cut``: the landline's band), unless its channel group is already in
    that band (``ModelScorer.in_band``): sets its vector, statistics and LLR offset. Returns whether it did."""
    if scorer.band_map is None or side.vector is None or side.stats is None or scorer.in_band(side.stats, low_cut)[0]:
        return False
    side.vector = scorer.band_map.apply(side.vector, low_cut)
    side.stats = scorer.stats(side.vector)
    side.llr_offset = scorer.band_map.offset(low_cut)
    return True


def open_set_threshold(threshold: Threshold, size: int) -> Threshold:
    """The threshold a probe's best of ``size`` enrolled speakers must reach (Identify's open-set rule).

    Each enrolled speaker is then 1/N as likely a priori: the pair threshold + ln(N) on the calibrated
    LLR scale. Cosine and S-norm thresholds are no likelihood ratios and are returned unchanged.
    """
    if threshold.scale != "llr" or size <= 1:
        return threshold
    return Threshold("llr", threshold.value + float(np.log(size)))
