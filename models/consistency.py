"""The one-talker check: do the parts of one input sound like one speaker?

An input that holds a second voice (a handover in a call, two people at one microphone) gives an
embedding of neither. Splitting its speech into 2-4 consecutive parts, embedding them and
scoring them against each other on the calibrated scale shows it: one talker's parts match each
other, two talkers' do not. The service runs it on Verify, Identify and Enroll audio
(``speaker_check``); ``training.evaluation.decisions`` measures how often it fires on real speech.
"""

from __future__ import annotations

import numpy as np

from models.scoring import ModelScorer

__all__ = ["speaker_chunks", "self_consistency"]


def speaker_chunks(wave: np.ndarray, rate: int, min_seconds: float, chunk_seconds: float = 2.0,
                   max_chunks: int = 4) -> list[np.ndarray]:
    """Equal consecutive parts of (T,) speech for the one-talker check ([] when shorter than ``min_seconds``).

    Up to ``max_chunks`` parts of at least ``chunk_seconds`` each.
    """
    seconds = len(wave) / rate
    if seconds < max(min_seconds, 2 * chunk_seconds):
        return []
    n = int(min(max_chunks, seconds // chunk_seconds))
    return [np.ascontiguousarray(c) for c in np.array_split(wave, n)]


def self_consistency(scorer: ModelScorer, vectors: np.ndarray, seconds: list[float]) -> float | None:
    """The lowest calibrated LLR between two parts of one input ((K, D) unit vectors), None without calibration.

    A second talker (a turn by someone else, a loud voice behind) makes some part of the speech
    fail to match another; one talker's parts match each other.
    """
    if scorer.calibration is None or len(vectors) < 2:
        return None
    stats = scorer.stats(vectors)
    worst = None
    for i in range(len(vectors)):
        for j in range(i + 1, len(vectors)):
            llr = scorer.score(float(np.dot(vectors[i], vectors[j])), stats[i], stats[j], seconds[i], seconds[j]).llr
            worst = llr if worst is None else min(worst, llr)
    return worst
