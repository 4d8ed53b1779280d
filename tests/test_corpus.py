"""The corpus builder (needs flite/espeak-ng/mbrola from scripts/install_voices.sh; skipped without them)."""

from __future__ import annotations

import json
import shutil

import pytest
import soundfile as sf

from training.corpus import RESERVED, build_corpus, discover_voices, make_trials, read_scp, sentences

needs_voices = pytest.mark.skipif(shutil.which("flite") is None or shutil.which("sox") is None,
                                  reason="TTS voices not installed (bash scripts/install_voices.sh --small)")


def test_sentences_are_varied_and_seeded():
    a, b = sentences(60, 1), sentences(60, 1)
    assert a == b and len(set(a)) > 50
    assert sentences(60, 2) != a


def test_trials_pair_distinct_utterances():
    rows = [(f"{s}-{i}", s, None) for s in "abc" for i in range(4)]
    trials = make_trials(rows, 2, 5, 0)
    assert all(x != y for x, y, _ in trials)
    assert all((x[0] == y[0]) == bool(t) for x, y, t in trials)
    assert {t for *_, t in trials} == {0, 1}


@needs_voices
def test_small_corpus(tmp_path):
    voices = discover_voices()
    assert not any(v.engine == "espeak-mbrola" and v.name.split("-")[1] in RESERVED for v in voices)
    m = build_corpus(tmp_path / "c", "small", jobs=2, max_voices=12)
    train_spk = set(read_scp(tmp_path / "c" / "train" / "utt2spk").values())
    eval_spk = set(read_scp(tmp_path / "c" / "eval" / "utt2spk").values())
    assert train_spk and eval_spk and not train_spk & eval_spk
    for split in ("train", "eval"):
        scp = read_scp(tmp_path / "c" / split / "wav.scp")
        for path in list(scp.values())[:5]:
            info = sf.info(path)
            assert info.samplerate == 16000 and info.channels == 1 and info.duration > 0.5
    trials = (tmp_path / "c" / "eval" / "trials").read_text().split("\n")
    assert any(t.endswith(" target") for t in trials) and any(t.endswith("nontarget") for t in trials)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert all(v["package"] and v["licence"] for v in manifest["voices"])
    assert manifest["reserved_voices_excluded"] == sorted(RESERVED)
    assert m["counts"]["eval"]["speakers"] >= 2
