"""The card's input steps (``models.input_steps``): their order, and one definition shared by the runtime and the
tilt fit."""

from __future__ import annotations

import numpy as np

from models.artifact import load_card
from models.input_steps import InputSteps
from models.mains_hum import find_hum
from models.spectral_tilt import TiltLimit, band_levels_db, tilt_slope
from tests.conftest import REPOSITORY, ge2e_with
from tests.test_mains_hum import SR, _clips, _hum


def _slope(wav: np.ndarray, limit: TiltLimit) -> float:
    return tilt_slope(band_levels_db(wav, SR), limit.reference_db)[0]


def test_the_tilt_step_measures_the_input_after_the_hum_is_out():
    """Strong hum raises the lowest bands and darkens the measured slope; ``repair`` takes it out before the tilt
    step measures, so the slope it sees is the voice's (and ``repair`` leaves the slope itself alone)."""
    steps = InputSteps(load_card(REPOSITORY / "ge2e"))
    assert steps.remove_mains_hum and steps.tilt is not None and steps.level_dbfs is not None
    bent, left = [], []
    for wave in _clips():
        wave = np.tile(wave, 2)
        hummed = wave + _hum(len(wave), 50.0, 3.0, wave) + np.float32(0.05)  # and a DC offset
        repaired = steps.repair(hummed)
        assert find_hum(hummed, SR) is not None and find_hum(repaired, SR) is None
        assert abs(float(repaired.mean())) < 1e-4
        clean = _slope(wave, steps.tilt)
        bent.append(abs(_slope(hummed - np.float32(0.05), steps.tilt) - clean))  # what the hum would do to the fit
        left.append(abs(_slope(repaired, steps.tilt) - clean))
        out = steps(hummed)
        assert out.shape == hummed.shape and out.dtype == np.float32
        assert abs(10 * np.log10(np.mean(out.astype(np.float64) ** 2)) - steps.level_dbfs) < 0.01
    assert np.median(bent) > 0.5 and max(left) < 0.15 and all(a < b for a, b in zip(left, bent)), (bent, left)


def test_a_card_without_the_optional_steps_only_loses_its_dc(tmp_path):
    card = load_card(ge2e_with(tmp_path, remove_mains_hum=False, input_tilt=None, input_level_dbfs=None))
    steps = InputSteps(card)
    wave = np.tile(_clips()[0], 2)
    hummed = wave + _hum(len(wave), 60.0, 6.0, wave)
    out = steps(hummed + np.float32(0.2))
    assert np.allclose(out, hummed - hummed.mean(), atol=1e-5)
    assert find_hum(out, SR) is not None  # the hum stays without the card's flag


def test_the_runtime_and_the_tilt_fit_share_the_steps(mini_real, tmp_path, monkeypatch):
    """``SpeakerModel.embed`` runs every step on each input; ``fit_tilt`` measures speech after ``repair`` only."""
    from models.runtime import SpeakerModel
    from training.evaluation.tilt import fit_tilt

    seen = {"repair": 0, "all": 0}
    repair, every = InputSteps.repair, InputSteps.__call__

    def counted_repair(self, wav):
        seen["repair"] += 1
        return repair(self, wav)

    def counted_all(self, wav):
        seen["all"] += 1
        return every(self, wav)

    monkeypatch.setattr(InputSteps, "repair", counted_repair)
    monkeypatch.setattr(InputSteps, "__call__", counted_all)
    entry = ge2e_with(tmp_path)
    wave = np.tile(_clips()[0], 2)
    model = SpeakerModel(entry)
    seen.update(repair=0, all=0)  # the warm-up embeds too
    model.embed([wave, wave[:SR]])
    assert seen == {"repair": 2, "all": 2}
    seen.update(repair=0, all=0)
    spec = fit_tilt(entry, mini_real, min_speech=0.3, min_utterances=10, write=False, log=lambda *_: None)
    assert seen["all"] == 0 and seen["repair"] >= spec["fitted_on"]["utterances"] >= 10


def test_the_tilt_fit_can_leave_hummed_recordings_out(mini_real, tmp_path, capsys):
    """``--skip-hummed``: recordings in which hum is found are left out (and counted); without it they are fitted on
    with the hum taken out."""
    import soundfile as sf

    from training.evaluation.tilt import fit_tilt, main

    pool = tmp_path / "pool"
    (pool / "calibration").mkdir(parents=True)
    rows = (mini_real / "calibration" / "wav.scp").read_text().splitlines()
    for name in ("utt2spk", "trials"):
        (pool / "calibration" / name).write_text((mini_real / "calibration" / name).read_text())
    out = []
    for i, row in enumerate(rows):
        utt, path = row.split(maxsplit=1)
        if i % 3 == 0:  # every third recording gets strong hum
            wave, rate = sf.read(path, dtype="float32")
            path = str(tmp_path / f"{utt}-hum.wav")
            sf.write(path, wave + _hum(len(wave), 50.0, 0.0, wave, seed=i), rate)
        out.append(f"{utt} {path}")
    (pool / "calibration" / "wav.scp").write_text("\n".join(out) + "\n")
    entry = ge2e_with(tmp_path)
    quiet = {"min_speech": 0.3, "min_utterances": 5, "write": False, "log": lambda *_: None}
    kept = fit_tilt(entry, pool, **quiet)["fitted_on"]
    skipped = fit_tilt(entry, pool, skip_hummed=True, **quiet)["fitted_on"]
    assert "hummed_left_out" not in kept and skipped["hummed_left_out"] >= len(rows) // 6
    assert skipped["utterances"] + skipped["hummed_left_out"] == kept["utterances"]
    argv = ["--model-dir", str(entry), "--real", str(pool), "--dry-run", "--min-speech", "0.3"]
    assert main(argv + ["--skip-hummed"]) == 2  # the command line's default asks for 20 utterances
    assert f"only {skipped['utterances']} utterances with 0.3 s of speech, need 20" in capsys.readouterr().err


def test_the_input_steps_of_a_batch_can_run_side_by_side():
    """``SpeakerModel.embed`` with a ``steps_pool`` gives the embeddings it gives running the steps in turn."""
    from concurrent.futures import ThreadPoolExecutor

    from models.runtime import SpeakerModel

    model = SpeakerModel(REPOSITORY / "ge2e", ["CPUExecutionProvider"])
    clips = _clips()[:3]
    waves = [clips[0], clips[1] + _hum(len(clips[1]), 50.0, 3.0, clips[1]), 0.3 * clips[2] + np.float32(0.05)]
    with ThreadPoolExecutor(2) as pool:
        side_by_side = model.embed(waves, pool)
    np.testing.assert_array_equal(side_by_side, model.embed(waves))
