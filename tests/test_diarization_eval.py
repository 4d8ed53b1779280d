"""The diarization evaluation: conversations of the real-speech pool with reference RTTMs, and their scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pyannote.metrics")

from training.data.conversations import build_conversations, reference_regions
from training.evaluation.diarization_eval import main as eval_main
from training.evaluation.diarization_eval import read_rttm, score


def test_score_parts():
    ref = [(0.0, 10.0, "a"), (10.0, 20.0, "b")]
    same = score(ref, [(0.0, 10.0, "x"), (10.0, 20.0, "y")], "r", 20.0)
    assert same["total"] == 0 and same["reference"] == pytest.approx(19.0)  # 0.25 s each side of 0, 10 and 20 s
    swapped = score(ref, [(0.0, 20.0, "x")], "r", 20.0)  # one label for both: half the speech confused
    assert swapped["confusion"] == pytest.approx(9.5, abs=0.01)  # b's 10 s less the collars at 10 and 20 s
    missed = score(ref, [(0.0, 10.0, "x")], "r", 20.0)
    assert missed["missed"] == pytest.approx(9.5, abs=0.01)
    assert 0 < missed["jer"] <= 1


def test_reference_regions_follow_energy():
    x = np.zeros(48000, np.float32)
    x[8000:24000] = 0.3 * np.sin(np.arange(16000) / 5)
    assert reference_regions(x) == [(0.5, 1.5)]


def test_conversations_and_eval_end_to_end(mini_real, tmp_path, capsys):
    out = tmp_path / "conv"
    manifest = build_conversations(mini_real, "evaluation", out, n=2, seed=0, log=lambda *_: None)
    for cid, meta in manifest["conversations"].items():
        wave, rate = sf.read(out / "wav" / f"{cid}.wav")
        rows = read_rttm(out / "rttm" / f"{cid}.rttm")
        assert len(wave) / rate == pytest.approx(meta["seconds"], abs=0.1) and meta["seconds"] >= 60
        assert {s for *_, s in rows} == set(meta["speakers"]) and all(b > a for a, b, _ in rows)
        assert max(b for _, b, _ in rows) <= meta["seconds"]
    assert eval_main(["--conversations", str(out), "--json", str(tmp_path / "r.json"), "--modes", "given"]) == 0
    res = json.loads((tmp_path / "r.json").read_text())["results"]["given"]
    assert set(res["per_recording"]) == set(manifest["conversations"])
    pooled = res["pooled"]["all"]
    assert 0 <= pooled["total"] < 60 and pooled["count_exact"] == 100 and pooled["x_realtime"] > 1
    assert "| given | all | 2 |" in capsys.readouterr().out


def test_single_speaker_recordings_have_one_voice_and_no_overlap(mini_real, tmp_path):
    """``--speakers 1-1``: turns of one voice with pauses (to check that one voice stays one speaker)."""
    from training.data.conversations import main as conv_main

    out = tmp_path / "one"
    assert conv_main(["--real", str(mini_real), "--split", "evaluation", "--out", str(out), "--n", "2",
                      "--speakers", "1-1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())["conversations"]
    for cid, meta in manifest.items():
        rows = sorted(read_rttm(out / "rttm" / f"{cid}.rttm"))
        assert len(meta["speakers"]) == 1 and {s for *_, s in rows} == set(meta["speakers"])
        assert all(b[0] >= a[1] - 1e-6 for a, b in zip(rows, rows[1:]))  # never over itself
    assert conv_main(["--real", str(mini_real), "--out", str(tmp_path / "x"), "--speakers", "3-2"]) == 2
    with pytest.raises(SystemExit):
        conv_main(["--real", str(mini_real), "--out", str(tmp_path / "y"), "--speakers", "two"])
