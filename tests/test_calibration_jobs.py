"""Offline jobs behind trustworthy scores: channel simulation, cohort + calibration, robustness report,
and the real-speech evaluation set."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REPOSITORY

# the gsm and amr channel conditions encode with sox; scripts/test.sh installs it where it may (root with apt)
NO_SOX = "sox is not installed (the gsm and amr conditions need it: bash scripts/install_voices.sh)"
needs_sox = pytest.mark.skipif(shutil.which("sox") is None, reason=NO_SOX)

@pytest.fixture(scope="module")
def utterance(speech_files) -> np.ndarray:
    return sf.read(speech_files["espeak-en-1"], dtype="float32")[0]


@needs_sox
def test_every_condition_degrades_as_named(utterance):
    from training.data.channels import CONDITIONS, apply_condition, apply_conditions

    rng = np.random.default_rng(0)
    seconds = len(utterance) / 16000
    for name in CONDITIONS:
        y, rate = apply_condition(name, utterance, rng, [utterance])
        assert y.dtype == np.float32 and np.isfinite(y).all() and rate in (8000, 16000), name
        dur = len(y) / rate
        expect = {"silence_pad": seconds + 6, "noise_pad": seconds + 6, "pause": seconds + 2, "short": 1.0,
                  "short15": 1.5}.get(name, seconds)
        assert abs(dur - expect) < 0.05, (name, dur, expect)
    tel, rate = apply_condition("telephone", utterance, rng)
    spec = np.abs(np.fft.rfft(tel)) ** 2
    freqs = np.fft.rfftfreq(len(tel), 1 / rate)
    assert rate == 8000 and spec[freqs > 3600].sum() < 0.01 * spec.sum()  # the telephone band
    gsm, _ = apply_condition("gsm", utterance, rng)
    assert not np.allclose(gsm[:1000], tel[:1000])
    hum, _ = apply_condition("hum", utterance, rng)
    line = np.abs(np.fft.rfft(hum - utterance))  # the added hum: lines at multiples of 50 or 60 Hz only
    top = np.fft.rfftfreq(len(hum), 1 / 16000)[np.argsort(line)[-20:]]
    f0 = 50.0 if np.mean(np.abs(top / 50 - np.round(top / 50))) < np.mean(np.abs(top / 60 - np.round(top / 60))) else 60.0
    assert np.all(np.abs(top / f0 - np.round(top / f0)) * f0 < 1.5), top
    assert 8 - 0.1 <= 10 * np.log10(np.mean(utterance ** 2) / np.mean((hum - utterance) ** 2)) <= 20 + 0.1
    hp, _ = apply_condition("highpass", utterance, rng)
    band = np.fft.rfftfreq(len(hp), 1 / 16000)
    low = (band > 40) & (band < 150)
    assert np.sum(np.abs(np.fft.rfft(hp))[low] ** 2) < 0.01 * np.sum(np.abs(np.fft.rfft(utterance))[low] ** 2)
    noisy, _ = apply_condition("noise", utterance, rng, [utterance])
    assert 5 <= 10 * np.log10(np.mean(utterance ** 2) / np.mean((noisy - utterance) ** 2)) <= 25.5
    rng = np.random.default_rng(0)  # the draws below, whatever the conditions above took
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
    for f in ("cohort.npy", "cohort_groups.npy"):
        (d / f).unlink(missing_ok=True)
    card = json.loads((d / "model.json").read_text())
    card.update(cohort=None, calibration=None, operating_point=None, band_map=None)
    (d / "model.json").write_text(json.dumps(card))
    return d


@pytest.fixture(scope="module")
def calibrated(mini_real, tmp_path_factory):
    """ge2e calibrated on the mini pool (1.5 s crops: 0.3 s of speech is enough here)."""
    from training.evaluation.calibrate import calibrate_model

    if shutil.which("sox") is None:
        pytest.skip(NO_SOX)
    d = _uncalibrated_ge2e(tmp_path_factory.mktemp("cal"))
    report = calibrate_model(d, mini_real, per_speaker=1, cohort_utts=2, min_probe_speech=0.3, log=lambda *_: None)
    return d, report


def test_calibrate_writes_channel_groups_and_a_map_the_server_loads(calibrated):
    from models.runtime import SpeakerModel
    from training.evaluation.cohort import COHORT_GROUPS

    d, report = calibrated
    model = SpeakerModel(d)
    assert model.scorer.group_names == list(COHORT_GROUPS) and model.scorer.groups is not None
    assert model.scorer.cohort.shape == (3 * len(COHORT_GROUPS), 256)  # 3 speakers x 9 groups x 1
    assert (model.scorer.scale, model.scorer.threshold) == ("llr", 2.0) and model.card.format_version == 3
    assert len(model.card.cohort["sha256"]) == 64 and model.card.cohort["narrowband_groups"] == ["telephone", "gsm", "amr"]
    fitted = report["calibration_trials"]
    assert 0 <= fitted["min_cllr"] <= fitted["cllr"] + 1e-9
    assert report["operating_point"]["rule"].startswith("LLR >= 2")
    assert set(report["per_family"]) <= set(report["calibration_trials"]["families"])
    assert all(0 < r < 1 for r, _ in report["operating_point"]["far_table"])


def test_calibrate_options_are_checked(mini_real, tmp_path, capsys):
    from training.evaluation.calibrate import calibrate_model, main, parse_operating_point

    assert parse_operating_point("far:0.01") == ("far", 0.01) and parse_operating_point("cosine-eer")[0] == "cosine-eer"
    for bad in ("median", "far:2", "llr:x", "llr:"):
        with pytest.raises(ValueError, match="operating-point"):
            parse_operating_point(bad)
    with pytest.raises(SystemExit):
        main(["--real", str(mini_real), "--model-dir", str(tmp_path), "--per-speaker", "0"])
    assert "--per-speaker must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model-dir", str(REPOSITORY / "ge2e")])
    assert "give --real" in capsys.readouterr().err
    assert main(["--real", str(tmp_path / "nowhere"), "--model-dir", str(REPOSITORY / "ge2e"), "--dry-run"]) == 2
    assert "calibration/wav.scp: missing" in capsys.readouterr().err
    with pytest.raises(ValueError, match="synthetic-weight"):
        calibrate_model(REPOSITORY / "ge2e", mini_real, synthetic_weight=1.5, write=False)


def _own_trials(mini_corpus, tmp_path, n_targets=25, n_non=25):
    """An operator's wav.scp and trials over the mini corpus' 30 recordings."""
    import itertools

    scp = {}
    for split in ("train", "eval"):
        scp.update(dict(line.split() for line in (mini_corpus / split / "wav.scp").read_text().splitlines()))
    utts = sorted(scp)
    spk = {u: u.split("-")[0] for u in utts}
    pairs = list(itertools.combinations(utts, 2))
    tar = [p for p in pairs if spk[p[0]] == spk[p[1]]][:n_targets]
    non = [p for p in pairs if spk[p[0]] != spk[p[1]]][:n_non]
    (tmp_path / "wav.scp").write_text("".join(f"{u} {scp[u]}\n" for u in utts))
    (tmp_path / "trials").write_text("".join(f"{a} {b} target\n" for a, b in tar) +
                                     "".join(f"{a} {b} nontarget\n" for a, b in non))
    return tmp_path / "wav.scp", tmp_path / "trials"


def test_recalibrate_on_own_trials_writes_a_new_version(calibrated, mini_corpus, tmp_path):
    from models.runtime import SpeakerModel
    from training.evaluation.recalibrate import recalibrate_on_trials

    d, _ = calibrated
    scp, trials = _own_trials(mini_corpus, tmp_path)
    out = tmp_path / "repo" / "ge2e-mine"
    report = recalibrate_on_trials(d, scp, trials, out, min_probe_speech=0.3, log=lambda *_: None)
    model = SpeakerModel(out)
    assert model.name == "ge2e-mine" and model.card.version.endswith("+recal")
    assert model.card.calibration["refitted_from"].startswith("ge2e ")
    assert report["n_target"] == 25 and report["n_nontarget"] == 25 and report["min_cllr"] <= report["cllr"] + 1e-9
    np.testing.assert_array_equal(model.scorer.cohort, SpeakerModel(d).scorer.cohort)  # the cohort is kept
    assert not (tmp_path / "repo" / "ge2e-mine.partial").exists()


def test_a_band_map_fitted_on_a_calibration_is_reported_then_dropped_by_a_new_one(calibrated, mini_real, mini_corpus,
                                                                                  tmp_path, capsys):
    """The band map's offsets belong to the calibration they were fitted on: the decisions job reports its rows, and
    re-fitting the calibration leaves the map out (saying so) instead of keeping stale offsets."""
    from models.runtime import SpeakerModel
    from models.artifact import load_card
    from training.evaluation.band_map import fit_band_map
    from training.evaluation.calibrate import calibrate_model
    from training.evaluation.decisions import main
    from training.evaluation.recalibrate import recalibrate_on_trials

    d = tmp_path / "ge2e"
    shutil.copytree(calibrated[0], d)
    args = ["--real", str(mini_real), "--model", str(d), "--conditions", "telephone-probe,telephone-probe-mapped",
            "--identify-sizes", "", "--one-talker", "0", "--min-probe-speech", "0.3"]
    assert main(args + ["--out", str(tmp_path / "none")]) == 0  # no band map yet: its rows are left out, said so
    assert list(json.loads((tmp_path / "none" / "results.json").read_text())["conditions"]) == ["telephone-probe"]
    assert "has no band map" in capsys.readouterr().err
    fit_band_map(d, mini_real, folds=3, min_speech=0.3, log=lambda *_: None)
    assert SpeakerModel(d).scorer.band_map is not None
    out = tmp_path / "dec"
    assert main(args + ["--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["conditions"]
    assert rows["telephone-probe-mapped"]["band_mapped"] > 0.5 and "frr" in rows["telephone-probe-mapped"]
    scp, trials = _own_trials(mini_corpus, tmp_path)
    said = []
    recalibrate_on_trials(d, scp, trials, tmp_path / "repo" / "ge2e-mine", min_probe_speech=0.3, log=said.append)
    mine = SpeakerModel(tmp_path / "repo" / "ge2e-mine")
    assert mine.card.band_map is None and mine.scorer.band_map is None
    assert not (tmp_path / "repo" / "ge2e-mine" / "band_map.npz").exists()
    assert any("band map" in line for line in said)
    assert SpeakerModel(d).scorer.band_map is not None  # the source entry is untouched
    said.clear()
    calibrate_model(d, mini_real, per_speaker=1, cohort_utts=2, min_probe_speech=0.3, log=said.append)
    assert load_card(d).band_map is None and SpeakerModel(d).scorer.band_map is None
    assert any("band map was fitted on the old calibration" in line for line in said)


@pytest.mark.parametrize("damage, match", [
    ("scp_line", r"wav.scp:3: expected '<utterance-id> <path>'"),
    ("scp_missing", r"wav.scp:2: .*does not exist"),
    ("scp_twice", r"wav.scp:31: utterance .* is listed twice \(first on line 1\)"),
    ("trial_label", r"trials:4: expected '<utterance-id> <utterance-id> target\|nontarget'"),
    ("trial_unknown", r"trials:1: utterance 'nobody' is not in the wav.scp"),
    ("few", r"5 target and 25 non-target trials listed; at least 20 of each"),
    ("one_class", r"0 target and 25 non-target trials listed"),
    ("undecodable", r"wav.scp:1: cannot decode"),
])
def test_recalibrate_refuses_bad_input_naming_the_line(calibrated, mini_corpus, tmp_path, damage, match):
    from training.evaluation.recalibrate import recalibrate_on_trials

    d, _ = calibrated
    scp, trials = _own_trials(mini_corpus, tmp_path, n_targets=5 if damage == "few" else 0 if damage == "one_class" else 25)
    lines, tlines = scp.read_text().splitlines(), trials.read_text().splitlines()
    if damage == "scp_line":
        lines[2] = lines[2].split()[0]
    elif damage == "scp_missing":
        lines[1] = lines[1].split()[0] + " /nonexistent/x.wav"
    elif damage == "scp_twice":
        lines.append(lines[0])
    elif damage == "trial_label":
        tlines[3] = tlines[3].replace("target", "same")
    elif damage == "trial_unknown":
        tlines[0] = "nobody " + tlines[0].split(maxsplit=1)[1]
    elif damage == "undecodable":
        bad = tmp_path / "junk.wav"
        bad.write_bytes(b"not audio at all" * 10)
        lines[0] = lines[0].split()[0] + f" {bad}"
    scp.write_text("\n".join(lines) + "\n")
    trials.write_text("\n".join(tlines) + "\n")
    out = tmp_path / "out" / "ge2e-x"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        recalibrate_on_trials(d, scp, trials, out, min_probe_speech=0.3, log=lambda *_: None)
    assert not out.exists() and not (tmp_path / "out").exists()  # nothing written


def test_decisions_report_on_the_evaluation_split(calibrated, mini_real, tmp_path, capsys):
    from training.evaluation.decisions import main

    d, _ = calibrated
    out = tmp_path / "dec"
    assert main(["--real", str(mini_real), "--model", str(d), "--conditions",
                 "clean,telephone-both,short-probe,telephone-probe-matched", "--identify-sizes", "1,50",
                 "--min-probe-speech", "0.3", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["conditions"]) == ["clean", "telephone-both", "short-probe", "telephone-probe-matched"]
    assert res["conditions"]["telephone-probe-matched"]["band_matched"] > 0.9  # wideband voices, telephone probes
    clean = res["conditions"]["clean"]
    assert {"far", "frr", "cllr", "min_cllr", "not_enough_speech", "impostor_normalized_mean"} <= set(clean)
    assert res["identify"]["50"]["simulated"] == 50 - res["identify"]["50"]["enrolled_real"]
    assert res["identify"]["50"]["threshold_open_set"] == pytest.approx(2 + np.log(50), abs=1e-3)
    assert "| clean |" in capsys.readouterr().out and "| clean |" in (out / "results.md").read_text()


def test_robustness_report(mini_corpus, tmp_path):
    from training.evaluation.robustness import main

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
    from training.evaluation.robustness import main

    with pytest.raises(SystemExit):
        main(["--wav-scp", str(mini_corpus / "eval" / "wav.scp"), "--trials", str(mini_corpus / "eval" / "trials"),
              "--conditions", "clean,vinyl", "--out", str(tmp_path)])
    assert "unknown ['vinyl']" in capsys.readouterr().err


def test_calibrate_fit_tilt_fits_the_card_first(mini_real, tmp_path, capsys):
    """``--fit-tilt`` runs the tilt fit before anything is embedded: on the mini pool (18 utterances, under the fit's
    minimum of 20) it stops there with the fit's message, and it cannot be combined with a dry run."""
    from training.evaluation.calibrate import main

    entry = _uncalibrated_ge2e(tmp_path)
    assert main(["--real", str(mini_real), "--model-dir", str(entry), "--fit-tilt"]) == 2
    assert "need 20" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--real", str(mini_real), "--model-dir", str(entry), "--fit-tilt", "--dry-run"])
    assert "--fit-tilt writes the card" in capsys.readouterr().err
