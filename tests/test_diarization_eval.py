"""The diarization evaluation: conversations of the real-speech pool with reference RTTMs, and their scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("pyannote.metrics")

from training.data.conversations import build_conversations, reference_regions
from training.evaluation.diarization_eval import main as eval_main
from models.diarization import Turn
from training.evaluation.diarization_eval import auroc, read_rttm, score, turns_right


def test_score_parts():
    ref = [(0.0, 10.0, "a"), (10.0, 20.0, "b")]
    same = score(ref, [(0.0, 10.0, "x"), (10.0, 20.0, "y")], "r", 20.0)
    assert same["total"] == 0 and same["reference"] == pytest.approx(19.0)  # 0.25 s each side of 0, 10 and 20 s
    swapped = score(ref, [(0.0, 20.0, "x")], "r", 20.0)  # one label for both: half the speech confused
    assert swapped["confusion"] == pytest.approx(9.5, abs=0.01)  # b's 10 s less the collars at 10 and 20 s
    missed = score(ref, [(0.0, 10.0, "x")], "r", 20.0)
    assert missed["missed"] == pytest.approx(9.5, abs=0.01)
    assert 0 < missed["jer"] <= 1


def test_turns_are_judged_under_the_der_mapping_and_ranked_by_confidence():
    ref = [(0.0, 10.0, "a"), (10.0, 20.0, "b"), (20.0, 24.0, "a")]
    turns = [Turn(0.0, 10.0, 1, 0.9), Turn(10.0, 20.0, 0, 0.8), Turn(20.0, 24.0, 0, 0.6), Turn(30.0, 31.0, 1, 0.1)]
    # speaker 1 maps to a, speaker 0 to b: the last a-turn labelled 0 is wrong; 30-31 s holds no reference speech
    assert turns_right(ref, turns, "r") == [(0.9, True), (0.8, True), (0.6, False)]
    assert auroc([(0.9, True), (0.8, True), (0.6, False)]) == 1.0
    assert auroc([(0.5, True), (0.9, False), (0.5, False)]) == 0.25  # a tie counts half
    assert auroc([(0.5, True)]) is None


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
    assert res["turns"] > 0 and 0 <= res["turns_wrong"] <= res["turns"]
    assert res["confidence_auroc"] is None or 0 <= res["confidence_auroc"] <= 1
    out = capsys.readouterr().out
    assert "| given | all | 2 |" in out and "turns labelled wrong" in out


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


def test_tuning_sweep_reuses_cached_embeddings_and_ranks_the_rules(mini_real, tmp_path, capsys):
    """``diarization_tune``: one row per rule combination, best pooled DER first, embeddings cached once."""
    from training.evaluation.diarization_tune import main as tune_main

    conv = tmp_path / "conv"
    build_conversations(mini_real, "evaluation", conv, n=2, seed=0, log=lambda *_: None)
    cache = tmp_path / "cache.npz"
    args = ["--conversations", str(conv), "--min-speaker-s", "7.5", "--one-speaker-cosine", "0.1,0.87",
            "--cache", str(cache)]
    assert tune_main(args) == 0
    first = capsys.readouterr().out
    assert first.count("embedded conv:") == 2 and cache.is_file()
    rows = [line for line in first.splitlines() if line.startswith("| 7.5")]
    assert len(rows) == 2 and "(default)" in "".join(rows)
    by_cos = {float(r.split("|")[2]): r for r in rows}
    assert "(0)" in by_cos[0.1].split("|")[6]  # every pair of voices "one voice": no 2-speaker count is exact
    assert [float(v) for v in by_cos[0.87].split("|")[3:6]] == [5, 0.05, 0.5]  # the HMM's defaults
    pooled = [float(r.split("|")[7]) for r in rows]
    assert pooled == sorted(pooled)
    assert tune_main(args) == 0  # from the cache: nothing embedded again, the same table
    again = capsys.readouterr().out
    assert "embedded" not in again and [line for line in again.splitlines() if line.startswith("| 7.5")] == rows


@pytest.mark.parametrize("extra, field", [
    (["--one-speaker-cosine", ""], "--one-speaker-cosine"),
    (["--cache", "x.pkl"], "--cache"),
    (["--min-speaker-s", "7.5", "--one-speaker-cosine", "0.9"], None),
    (["--hmm-switch", "1.5"], "--hmm-switch"),
    (["--hmm-kappa", "0,5", "--hmm-pause-switch", "0.5"], None),
])
def test_tuning_sweep_refuses_bad_arguments(tmp_path, capsys, extra, field):
    from training.evaluation.diarization_tune import main as tune_main

    missing = tmp_path / "nothing"
    assert tune_main(["--conversations", str(missing)] + extra) == 2
    assert (field or "--conversations") in capsys.readouterr().err
