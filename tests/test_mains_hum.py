"""Mains hum (50/60 Hz and harmonics): found when it is there, taken out without touching inputs that have none,
and a card's ``remove_mains_hum`` applies it on every embedding path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from models.artifact import ArtifactError, load_card
from models.mains_hum import HARMONICS, find_hum, remove_hum
from tests.conftest import REFERENCE, ge2e_with

SR = 16000


def _clips() -> list[np.ndarray]:
    refs = json.loads((REFERENCE / "ge2e_reference.json").read_text())["utterances"]
    return [sf.read(REFERENCE / r["file"], dtype="float32")[0] for r in refs.values()]


def _hum(n: int, f0: float, below_db: float, ref: np.ndarray, seed: int = 0, harmonics: int = 20) -> np.ndarray:
    """(n,) hum of ``harmonics`` harmonics of ``f0`` (random strengths and phases), ``below_db`` under ``ref``'s RMS."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    k = np.arange(1, harmonics + 1)[:, None]
    hum = (k ** -0.8 * rng.uniform(0.3, 1.0, k.shape) * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6.3, k.shape))).sum(0)
    return (hum * np.sqrt(np.mean(ref ** 2) / np.mean(hum ** 2)) * 10 ** (-below_db / 20)).astype(np.float32)


def _line_power(x: np.ndarray, f0: float, harmonics: int = 20) -> float:
    """Power of ``x`` within 0.5 Hz of the first ``harmonics`` harmonics of ``f0`` (a windowed long FFT)."""
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / SR)
    near = np.zeros(len(freqs), bool)
    for k in range(1, harmonics + 1):
        near |= np.abs(freqs - k * f0) <= 0.5
    return float(spec[near].sum())


@pytest.mark.parametrize("f0", [50.0, 49.85, 60.0, 60.2])
def test_hum_under_speech_is_found_and_taken_out(f0):
    """Hum 12 dB under a voice, drifting off the nominal grid frequency: found at its fundamental; its lines lose
    more than 8 dB, and the output is closer to the clean voice than the hummed input was."""
    for wave in _clips():
        wave = np.tile(wave, 2)  # about 3 s: hum is told from a voice by staying put over time
        hummed = wave + _hum(len(wave), f0, 12.0, wave)
        hum = find_hum(hummed, SR)
        assert hum is not None and abs(hum.fundamental_hz - f0) < 0.05 and len(hum.harmonics) >= 3
        out = remove_hum(hummed, SR)
        assert out.dtype == np.float32 and out.shape == hummed.shape
        left = _line_power(out - wave, f0) / _line_power(hummed - wave, f0)
        assert left < 10 ** (-8 / 10), 10 * np.log10(left)
        error = np.mean((out - wave) ** 2) / np.mean((hummed - wave) ** 2)  # what is left of the hum, and what the
        assert error < 10 ** (-1 / 10), 10 * np.log10(error)  # clamps took from the voice, against the hum itself


def test_inputs_without_hum_pass_unchanged():
    """Clean speech, silence, white noise and a steady tone between the mains grids are returned as they are; so is
    any input shorter than a second (too short to tell a line from a voice)."""
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    inputs = [np.tile(w, 2) for w in _clips()] + [
        np.zeros(2 * SR, np.float32), 0.1 * rng.standard_normal(3 * SR).astype(np.float32),
        (0.1 * sum(np.sin(2 * np.pi * 55.0 * k * t) / k for k in range(1, 20))).astype(np.float32)]
    for x in inputs:
        assert find_hum(x, SR) is None
        assert remove_hum(x, SR) is x or np.array_equal(remove_hum(x, SR), x)
    short = _clips()[0][: SR // 2]
    assert find_hum(short + _hum(len(short), 50.0, 0.0, short), SR) is None


def test_hum_on_a_telephone_line_is_found_above_the_band_edge():
    """An 8 kHz call resampled to 16 kHz keeps hum harmonics above 300 Hz only: still found and taken out."""
    from scipy import signal

    from models.audio import resample

    wave = np.tile(_clips()[1], 2)
    hummed = wave + _hum(len(wave), 60.0, 10.0, wave, harmonics=HARMONICS)
    sos = signal.butter(6, [300, 3400], btype="bandpass", fs=SR, output="sos")
    call = resample(resample(signal.sosfilt(sos, hummed).astype(np.float32), SR, 8000), 8000, SR)
    clean_call = resample(resample(signal.sosfilt(sos, wave).astype(np.float32), SR, 8000), 8000, SR)
    hum = find_hum(call, SR)
    assert hum is not None and abs(hum.fundamental_hz - 60.0) < 0.05 and max(hum.harmonics) > 20
    out = remove_hum(call, SR)
    assert _line_power(out - clean_call, 60.0, 40) < 0.05 * _line_power(call - clean_call, 60.0, 40)


def test_bad_remove_mains_hum_is_named(tmp_path):
    with pytest.raises(ArtifactError, match="remove_mains_hum"):
        load_card(ge2e_with(tmp_path, remove_mains_hum="yes"))


def test_a_card_with_remove_mains_hum_embeds_a_hummed_clip_closer_to_the_clean_one(tmp_path):
    """Through ``SpeakerModel.embed`` (every service path): with the card's flag a hummed clip's voiceprint moves back
    towards the clean clip's, and a clip without hum embeds exactly as without the flag."""
    from models.runtime import SpeakerModel

    with_step = SpeakerModel(ge2e_with(tmp_path / "a", remove_mains_hum=True))
    without = SpeakerModel(ge2e_with(tmp_path / "b", remove_mains_hum=False))
    gains = []
    for wave in _clips():
        wave = np.tile(wave, 2)
        hummed = wave + _hum(len(wave), 50.0, 10.0, wave)
        a, b = with_step.embed([wave, hummed]), without.embed([wave, hummed])  # (2, D) each
        assert np.array_equal(a[0], b[0])
        gains.append(float(a[1] @ a[0] - b[1] @ b[0]))
    assert np.median(gains) > 0.05 and min(gains) > 0.0


def test_a_long_input_is_transformed_in_chunks_with_the_same_result(monkeypatch):
    """Blocks are transformed a chunk at a time so that a 300 s input never holds all its spectra: a 40 s hummed input
    (more blocks than one chunk, both for finding and for removing) gives the same hum and output as in one chunk."""
    import models.mains_hum as mh

    wave = np.tile(np.concatenate(_clips()), 3)[: 40 * SR]
    hummed = wave + _hum(len(wave), 60.0, 12.0, wave)
    assert len(mh._blocks(hummed, int(mh.BLOCK_SECONDS * SR))) > mh._CHUNK_BLOCKS  # several chunks either way
    chunked = (find_hum(hummed, SR), remove_hum(hummed, SR))
    monkeypatch.setattr(mh, "_CHUNK_BLOCKS", 10_000)
    whole = (find_hum(hummed, SR), remove_hum(hummed, SR))
    assert chunked[0] is not None and chunked[0].fundamental_hz == whole[0].fundamental_hz
    np.testing.assert_allclose(chunked[1], whole[1], atol=1e-6)


def test_a_given_hum_is_taken_out_without_searching():
    """``remove_hum(..., hum=...)`` clamps the given fundamental's harmonics even where none would be found."""
    from models.mains_hum import Hum

    wave = np.tile(_clips()[0], 2)
    assert find_hum(wave, SR) is None and np.array_equal(remove_hum(wave, SR), wave)
    forced = remove_hum(wave, SR, hum=Hum(50.0, (1,), (0.0,)))
    assert forced.shape == wave.shape and not np.array_equal(forced, wave)
    assert np.mean((forced - wave) ** 2) < 0.05 * np.mean(wave ** 2)  # clamps, not a different signal
