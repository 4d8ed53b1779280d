"""The steps a model's card asks for between the kept speech and the network, in the runtime's order.

1. the DC offset (the mean) is removed, always;
2. 50/60 Hz mains hum is taken out when the card has ``remove_mains_hum`` (``models.mains_hum``);
3. the spectral slope is brought into the card's ``input_tilt`` range (``models.spectral_tilt``);
4. the RMS level is set to the card's ``input_level_dbfs``.

Steps 1-2 repair recording faults; step 3 measures the input's spectrum, so what it sees must be the
input after them. ``SpeakerModel.embed`` runs all four and the tilt fit
(``training.evaluation.tilt``) measures speech after ``repair``, both through this one class, so the
fit and the runtime cannot drift apart.
"""

from __future__ import annotations

import numpy as np

from models.artifact import ModelCard
from models.audio import remove_dc, set_level
from models.mains_hum import remove_hum
from models.spectral_tilt import TiltLimit, limit_tilt

__all__ = ["InputSteps"]


class InputSteps:
    """A card's input steps for mono float32 waveforms at the model's rate.

    Raises:
        ValueError: the card's ``input_tilt`` is malformed (named by ``TiltLimit.from_card``).
    """

    def __init__(self, card: ModelCard):
        self.sample_rate = card.sample_rate
        self.remove_mains_hum = bool(card.remove_mains_hum)
        self.tilt = TiltLimit.from_card(card.input_tilt) if card.input_tilt else None
        self.level_dbfs = card.input_level_dbfs

    def repair(self, wav: np.ndarray) -> np.ndarray:
        """(T,) ``wav`` without its DC offset and, when the card asks, its mains hum: what the tilt step sees."""
        wav = remove_dc(wav)
        if self.remove_mains_hum:
            wav = remove_hum(wav, self.sample_rate)
        return wav

    def __call__(self, wav: np.ndarray) -> np.ndarray:
        """(T,) ``wav`` through every step: repaired, its slope limited, its level set (T unchanged)."""
        wav = self.repair(wav)
        if self.tilt is not None:
            wav = limit_tilt(wav, self.sample_rate, self.tilt)
        if self.level_dbfs is not None:
            wav = set_level(wav, self.level_dbfs)
        return wav
