"""A model card's ``input_level_dbfs``: inputs brought to one level, so recording gain does not
change a voiceprint (the shipped ``ge2e`` declares it; its power-mel encoder is level-sensitive); and every
input's DC offset removed, for the same reason."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from models.artifact import ArtifactError, load_card
from models.audio import remove_dc, set_level
from tests.conftest import REFERENCE, REPOSITORY, ge2e_with


def _clips() -> list[np.ndarray]:
    refs = json.loads((REFERENCE / "ge2e_reference.json").read_text())["utterances"]
    return [sf.read(REFERENCE / r["file"], dtype="float32")[0] for r in refs.values()]


def test_set_level_sets_the_rms_and_leaves_silence_silent():
    rng = np.random.default_rng(0)
    wave = (0.05 * rng.standard_normal(16000)).astype(np.float32)
    for dbfs in (-40.0, -25.0, -6.0):
        out = set_level(wave, dbfs)
        assert out.dtype == np.float32 and out.shape == wave.shape
        assert 20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2))) == pytest.approx(dbfs, abs=1e-3)
    assert not set_level(np.zeros(800, np.float32), -25.0).any()
    assert set_level(np.zeros(0, np.float32), -25.0).size == 0


@pytest.mark.parametrize("value", [5.0, -61.0, float("nan"), "loud", True, [-25]])
def test_bad_input_level_is_named(tmp_path, value):
    with pytest.raises(ArtifactError, match="input_level_dbfs"):
        load_card(ge2e_with(tmp_path, input_level_dbfs=value))


def test_shipped_ge2e_embeds_the_same_at_any_gain(tmp_path):
    """The same clip 14 dB quieter or 8 dB louder gives the same voiceprint; without the card's
    level (Resemblyzer's own normalisation only raises audio below -30 dBFS) it does not."""
    from models.runtime import SpeakerModel

    assert load_card(REPOSITORY / "ge2e").input_level_dbfs == -25.0
    model = SpeakerModel(REPOSITORY / "ge2e")
    raw = SpeakerModel(ge2e_with(tmp_path, input_level_dbfs=None))
    for wave in _clips():
        gains = [0.2, 1.0, 2.5]  # -14 dB, as recorded, +8 dB (float samples, no clipping)
        levelled = model.embed([wave * g for g in gains])  # (3, D)
        assert float((levelled @ levelled[1]).min()) > 0.9999
        unlevelled = raw.embed([wave * g for g in gains])
        assert float(unlevelled[2] @ unlevelled[1]) < 0.995


def test_remove_dc():
    wave = np.sin(np.linspace(0, 60, 8000)).astype(np.float32)
    out = remove_dc(wave + np.float32(0.3))
    assert out.dtype == np.float32 and abs(float(out.mean())) < 1e-6
    assert np.allclose(out, wave - wave.mean(), atol=1e-5)
    assert remove_dc(np.zeros(0, np.float32)).size == 0


def test_a_dc_offset_does_not_change_a_voiceprint():
    """A constant offset (2% and 10% of full scale) moved ge2e's voiceprint to cosine 0.77-0.94 of the clean one;
    the runtime removes it before the level step and the graph."""
    from models.runtime import SpeakerModel

    model = SpeakerModel(REPOSITORY / "ge2e")
    for wave in _clips():
        emb = model.embed([wave, wave + np.float32(0.02), wave - np.float32(0.1)])  # (3, D)
        assert float((emb @ emb[0]).min()) > 0.9999
