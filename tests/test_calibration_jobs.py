"""Offline jobs behind trustworthy scores: channel simulation, cohort + calibration, robustness report,
and the real-speech evaluation set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPOSITORY


@pytest.fixture(scope="module")
def utterance(speech_files) -> np.ndarray:
    return sf.read(speech_files["espeak-en-1"], dtype="float32")[0]


def test_every_condition_degrades_as_named(utterance):
    from training.channels import CONDITIONS, apply_condition, apply_conditions

    rng = np.random.default_rng(0)
    seconds = len(utterance) / 16000
    for name in CONDITIONS:
        y, rate = apply_condition(name, utterance, rng, [utterance])
        assert y.dtype == np.float32 and np.isfinite(y).all() and rate in (8000, 16000), name
        dur = len(y) / rate
        expect = {"silence_pad": seconds + 6, "noise_pad": seconds + 6, "pause": seconds + 2, "short": 1.0}.get(name, seconds)
        assert abs(dur - expect) < 0.05, (name, dur, expect)
    tel, rate = apply_condition("telephone", utterance, rng)
    spec = np.abs(np.fft.rfft(tel)) ** 2
    freqs = np.fft.rfftfreq(len(tel), 1 / rate)
    assert rate == 8000 and spec[freqs > 3600].sum() < 0.01 * spec.sum()  # the telephone band
    gsm, _ = apply_condition("gsm", utterance, rng)
    assert not np.allclose(gsm[:1000], tel[:1000])
    noisy, _ = apply_condition("noise", utterance, rng, [utterance])
    assert 5 <= 10 * np.log10(np.mean(utterance ** 2) / np.mean((noisy - utterance) ** 2)) <= 25.5
    mic, _ = apply_condition("mic", utterance, rng)  # same level, a different long-term spectrum
    assert abs(np.sqrt(np.mean(mic ** 2) / np.mean(utterance ** 2)) - 1) < 1e-3
    bands = [np.log10(np.add.reduceat(np.abs(np.fft.rfft(z)) ** 2, np.arange(0, len(z) // 2, len(z) // 32)))
             for z in (utterance, mic, apply_condition("mic", utterance, rng)[0])]
    assert np.abs(bands[1] - bands[0]).max() > 0.3 and np.abs(bands[2] - bands[1]).max() > 0.3  # > 3 dB somewhere
    both, rate = apply_conditions(["reverb", "amr"], utterance, rng)
    assert rate == 8000 and abs(len(both) / rate - seconds) < 0.05
    with pytest.raises(ValueError, match="unknown condition 'vinyl'"):
        apply_condition("vinyl", utterance, rng)


def _uncalibrated_ge2e(tmp_path):
    d = tmp_path / "ge2e"
    shutil.copytree(REPOSITORY / "ge2e", d)
    (d / "cohort.npy").unlink(missing_ok=True)
    card = json.loads((d / "model.json").read_text())
    card.update(cohort=None, calibration=None, operating_point=None)
    (d / "model.json").write_text(json.dumps(card))
    return d


def test_calibrate_writes_a_cohort_and_map_the_server_loads(mini_corpus, tmp_path):
    from models.runtime import SpeakerModel
    from training.calibrate import calibrate_model

    d = _uncalibrated_ge2e(tmp_path)
    report = calibrate_model(d, mini_corpus, draws=1, cohort_per_speaker=1, cohort_utts=3, heldout_split=None,
                             log=lambda *_: None)
    model = SpeakerModel(d)
    assert model.scorer.cohort.shape == (3, 256) and model.scorer.calibration.scale > 0
    assert (model.scorer.scale, model.scorer.threshold) == ("llr", 3.0)
    assert model.card.cohort["size"] == 3 and len(model.card.cohort["sha256"]) == 64
    fitted = report["calibration_trials"]["snorm"]
    assert 0 <= fitted["cllr"] and fitted["min_cllr"] <= fitted["cllr"] + 1e-9
    assert report["operating_point"]["rule"].startswith("LLR >= 3")
    cosine = calibrate_model(d, mini_corpus, draws=1, cohort_per_speaker=1, cohort_utts=3, heldout_split=None,
                             operating_point="cosine-eer", write=False, log=lambda *_: None)
    assert cosine["operating_point"]["scale"] == "cosine" and -1 <= cosine["operating_point"]["threshold"] <= 1
    with pytest.raises(ValueError, match="operating-point"):
        calibrate_model(d, mini_corpus, operating_point="median", write=False)


def test_calibrate_cli_refuses_bad_counts(mini_corpus, tmp_path, capsys):
    from training.calibrate import main

    with pytest.raises(SystemExit):
        main(["--corpus", str(mini_corpus), "--model-dir", str(tmp_path), "--draws", "0"])
    assert "--draws must be >= 1" in capsys.readouterr().err
    assert main(["--corpus", str(tmp_path / "nowhere"), "--model-dir", str(REPOSITORY / "ge2e"), "--dry-run"]) == 2


def test_robustness_report(mini_corpus, tmp_path):
    from training.robustness import main

    out = tmp_path / "robust"
    assert main(["--wav-scp", str(mini_corpus / "eval" / "wav.scp"), "--trials", str(mini_corpus / "eval" / "trials"),
                 "--models", str(REPOSITORY / "ge2e"), "--conditions", "clean,silence_pad,pause,telephone",
                 "--min-probe-speech", "0.3", "--out", str(out)]) == 0  # the mini corpus has 1.5 s crops
    res = json.loads((out / "results.json").read_text())["ge2e"]
    assert set(res) == {"clean", "silence_pad", "pause", "telephone", "non_speech_accepted"}
    assert res["clean"]["same_utterance_accepted"] == 1.0 and res["silence_pad"]["same_utterance_accepted"] == 1.0
    assert all(v == 0.0 for v in res["non_speech_accepted"]["accept_rate"].values())
    assert "| ge2e | telephone |" in (out / "results.md").read_text()


def test_robustness_names_unknown_conditions(mini_corpus, tmp_path, capsys):
    from training.robustness import main

    with pytest.raises(SystemExit):
        main(["--wav-scp", str(mini_corpus / "eval" / "wav.scp"), "--trials", str(mini_corpus / "eval" / "trials"),
              "--conditions", "clean,vinyl", "--out", str(tmp_path)])
    assert "unknown ['vinyl']" in capsys.readouterr().err
