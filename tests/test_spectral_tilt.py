"""A model card's ``input_tilt``: an input's spectral slope limited to what real voices show, so that a tinny or
boomy microphone (or pre-emphasis) does not change a voiceprint much, while inputs within the range pass as they are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from scipy import signal

from models.artifact import TILT_BANDS, ArtifactError, load_card
from models.audio import remove_dc, resample
from models.spectral_tilt import BAND_EDGES_HZ, TiltLimit, band_levels_db, limit_tilt, tilt_slope
from tests.conftest import REFERENCE, REPOSITORY, ge2e_with

SR = 16000


def _clips() -> list[np.ndarray]:
    refs = json.loads((REFERENCE / "ge2e_reference.json").read_text())["utterances"]
    return [sf.read(REFERENCE / r["file"], dtype="float32")[0] for r in refs.values()]


def _shipped() -> TiltLimit:
    return TiltLimit.from_card(load_card(REPOSITORY / "ge2e").input_tilt)


def _tilted(wave: np.ndarray, db_per_octave: float) -> np.ndarray:
    """``wave`` through a zero-phase gain of ``db_per_octave`` around 1 kHz (a microphone's tilt)."""
    freqs = np.fft.rfftfreq(len(wave), 1.0 / SR)
    gain_db = db_per_octave * np.log2(np.maximum(freqs, 50.0) / 1000.0)
    return np.fft.irfft(np.fft.rfft(wave.astype(np.float64)) * 10 ** (gain_db / 20), len(wave)).astype(np.float32)


def test_band_levels_of_white_noise_are_flat_and_empty_bands_are_nan():
    noise = np.random.default_rng(0).standard_normal(3 * SR).astype(np.float32)
    levels = band_levels_db(noise, SR)
    assert levels.shape == (TILT_BANDS,) and np.isfinite(levels).all()
    assert np.ptp(levels) < 1.5  # power per bin: flat within a dB or so
    narrow = band_levels_db(resample(noise, SR, 8000), 8000)
    low_edges = BAND_EDGES_HZ[:-1]  # a band is measured where it has bins below 0.45 of the rate
    assert np.isnan(narrow[low_edges >= 3600]).all() and np.isfinite(narrow[low_edges < 3500]).all()
    assert np.isnan(band_levels_db(noise[:500], SR)).all()  # shorter than one frame
    assert np.isnan(band_levels_db(np.zeros(SR, np.float32), SR)).all()  # silence


def test_slope_measures_a_known_tilt():
    noise = np.random.default_rng(1).standard_normal(3 * SR).astype(np.float32)
    flat = band_levels_db(noise, SR)
    for tilt in (-6.0, 3.0):
        slope, used = tilt_slope(band_levels_db(_tilted(noise, tilt), SR), flat)
        assert used.all() and slope == pytest.approx(-tilt, abs=0.3)  # reference minus input


def test_inputs_within_the_range_pass_unchanged():
    limit = _shipped()
    for wave in _clips():
        wave = remove_dc(wave)
        slope, _ = tilt_slope(band_levels_db(wave, SR), limit.reference_db)
        if limit.min_db_per_octave <= slope <= limit.max_db_per_octave:
            assert limit_tilt(wave, SR, limit) is wave or np.array_equal(limit_tilt(wave, SR, limit), wave)
    short = np.ones(100, np.float32)
    assert np.array_equal(limit_tilt(short, SR, limit), short)  # too short to measure: as it is


@pytest.mark.parametrize("tilt", [-4.0, 6.0])
def test_a_steep_tilt_is_brought_to_the_edge_of_the_range(tilt):
    limit = _shipped()
    wave = remove_dc(_clips()[0])
    out = limit_tilt(_tilted(wave, tilt), SR, limit)
    assert out.dtype == np.float32 and out.shape == wave.shape
    slope, _ = tilt_slope(band_levels_db(out, SR), limit.reference_db)
    assert limit.min_db_per_octave - 0.4 <= slope <= limit.max_db_per_octave + 0.4


def test_an_extreme_tilt_is_corrected_at_most_12_db_either_way_in_a_pass():
    limit = _shipped()
    noise = _tilted(np.random.default_rng(2).standard_normal(4 * SR).astype(np.float32), -10.0)
    before, _ = tilt_slope(band_levels_db(noise, SR), limit.reference_db)
    once = limit_tilt(noise, SR, limit, passes=1)
    change = band_levels_db(once, SR) - band_levels_db(noise, SR)  # (24,) dB
    assert np.ptp(change) <= 24.0 + 0.5
    after, _ = tilt_slope(band_levels_db(limit_tilt(noise, SR, limit), SR), limit.reference_db)
    assert after < before - 3  # much nearer the range (here: within it)


def test_an_empty_band_is_not_raised_and_a_narrowband_input_passes_unchanged():
    """The correction is flat beyond the bands with signal, so a band-limited input's empty top stays empty; and a
    telephone-band input (nothing above 4 kHz) is not limited at all: its band edges, not a microphone, set its slope."""
    limit = TiltLimit(_shipped().reference_db, -0.5, 0.5)  # a narrow range: these inputs are outside it
    wave = remove_dc(_clips()[0])
    sos = signal.butter(8, [300, 3400], "bandpass", fs=SR, output="sos")
    phone = resample(resample(signal.sosfiltfilt(sos, wave).astype(np.float32), SR, 8000), 8000, SR)
    assert np.array_equal(limit_tilt(phone, SR, limit), phone)
    sos = signal.butter(8, 5000, "lowpass", fs=SR, output="sos")  # wideband up to 5 kHz, empty above 6 kHz
    muffled = signal.sosfiltfilt(sos, wave).astype(np.float32)
    out = limit_tilt(muffled, SR, limit)
    assert not np.array_equal(out, muffled)

    def top_share(x):
        spec = np.abs(np.fft.rfft(x)) ** 2
        return spec[np.fft.rfftfreq(len(x), 1 / SR) > 6500].sum() / spec.sum()

    assert top_share(out) < 10 * top_share(muffled) + 1e-6


@pytest.mark.parametrize("change, field", [
    ({"reference_db": [0.0] * 23}, "input_tilt.reference_db"),
    ({"reference_db": [0.0] * 23 + [float("nan")]}, "input_tilt.reference_db"),
    ({"min_db_per_octave": "steep"}, "input_tilt.min_db_per_octave"),
    ({"max_db_per_octave": 40.0}, "input_tilt.max_db_per_octave"),
    ({"min_db_per_octave": 2.0, "max_db_per_octave": 1.0}, "input_tilt"),
    (None, "input_tilt"),
])
def test_bad_input_tilt_is_named(tmp_path, change, field):
    tilt = [1, 2] if change is None else {**load_card(REPOSITORY / "ge2e").input_tilt, **change}
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        load_card(ge2e_with(tmp_path, input_tilt=tilt))


def test_shipped_ge2e_hears_a_tinny_microphone_as_the_same_voice(tmp_path):
    """Pre-emphasis and a 6 dB per octave tilt moved ge2e's voiceprints far from the clean ones; with the card's
    tilt limit they stay closer, and a clip within the range embeds exactly as without the limit."""
    from models.runtime import SpeakerModel

    model = SpeakerModel(REPOSITORY / "ge2e")
    raw = SpeakerModel(ge2e_with(tmp_path, input_tilt=None))
    gains = []
    for wave in _clips():
        variants = [wave, signal.lfilter([1.0, -0.97], [1.0], wave).astype(np.float32), _tilted(wave, 6.0)]
        limited, unlimited = model.embed(variants), raw.embed(variants)  # (3, D) each
        gains += list(limited[1:] @ limited[0] - unlimited[1:] @ unlimited[0])
    assert np.median(gains) > 0.05 and min(gains) > -0.01


def test_fit_tilt_writes_a_card_the_runtime_loads(mini_real, tmp_path, capsys):
    from models.runtime import SpeakerModel
    from training.evaluation.tilt import fit_tilt, main

    entry = ge2e_with(tmp_path, input_tilt=None)
    quiet = {"min_speech": 0.3, "min_utterances": 10, "log": lambda *_: None}
    version = load_card(entry).version
    with pytest.raises(ValueError, match=f"--version: the fitted input_tilt differs from the one ge2e {version}"):
        fit_tilt(entry, mini_real, **quiet)  # a new limit under the old version would mix two embeddings
    with pytest.raises(ValueError, match="--version"):
        fit_tilt(entry, mini_real, version=version, **quiet)
    assert load_card(entry).input_tilt is None  # nothing written by the refusals
    spec = fit_tilt(entry, mini_real, version="9.9.9-mini", **quiet)
    assert len(spec["reference_db"]) == TILT_BANDS and spec["min_db_per_octave"] < spec["max_db_per_octave"]
    assert spec["fitted_on"]["utterances"] >= 10 and spec["fitted_on"]["percentiles"] == [5.0, 95.0]
    assert load_card(entry).version == "9.9.9-mini"
    assert fit_tilt(entry, mini_real, **quiet) == spec  # the same pool gives the same limit: the version stays
    assert load_card(entry).version == "9.9.9-mini"
    model = SpeakerModel(entry)
    assert model.input_steps.tilt is not None and model.input_steps.tilt.min_db_per_octave == spec["min_db_per_octave"]
    with pytest.raises(ValueError, match="low < high"):
        fit_tilt(entry, mini_real, low=60, high=40, write=False)
    with pytest.raises(ValueError, match="only 0 utterances with 100 s of speech, need 20"):
        fit_tilt(entry, mini_real, min_speech=100, write=False)
    assert main(["--model-dir", str(entry), "--real", str(tmp_path / "nowhere"), "--dry-run"]) == 2
    assert "calibration/wav.scp: missing" in capsys.readouterr().err


def test_a_re_export_of_ge2e_carries_the_shipped_limit(tmp_path):
    """``models.export ge2e`` writes the fitted limit (models/assets/ge2e-input-tilt.json) and the hum step into the
    card, so a re-export filters input exactly as the shipped version does; the asset is the shipped card's fit."""
    import argparse

    from models.export import GE2E_INPUT_TILT, GE2E_VERSION, _ge2e_card
    from models.ge2e import GE2E
    from training.evaluation.tilt import same_limit

    shipped = load_card(REPOSITORY / "ge2e")
    assert json.loads(GE2E_INPUT_TILT.read_text()) == shipped.input_tilt
    card = _ge2e_card(argparse.Namespace(out=str(tmp_path / "ge2e"), threshold=0.5), GE2E())
    assert card.version == GE2E_VERSION == shipped.version
    assert same_limit(card.input_tilt, shipped.input_tilt)
    assert card.remove_mains_hum is shipped.remove_mains_hum is True
    card.validate()  # the limit passes the card's own checks
