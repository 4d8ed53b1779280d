"""The corpus builder (needs flite/espeak-ng/mbrola from scripts/install_voices.sh; skipped without them)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from training.data.corpus import (
    RESERVED,
    Voice,
    _Job,
    _render,
    build_corpus,
    discover_voices,
    make_trials,
    read_scp,
)
from training.data.sentences import _sentence_table, sentences

needs_voices = pytest.mark.skipif(shutil.which("flite") is None or shutil.which("sox") is None,
                                  reason="TTS voices not installed (bash scripts/install_voices.sh --small)")


def test_sentences_are_varied_and_seeded():
    a, b = sentences(60, 1), sentences(60, 1)
    assert a == b and len(set(a)) > 50
    assert sentences(60, 2) != a


@pytest.mark.parametrize("language", sorted(_sentence_table()))
def test_every_language_gives_distinct_seeded_sentences(language):
    a = sentences(144, 3, language)
    assert a == sentences(144, 3, language) and len(set(a)) == 144
    assert all(s.strip() for s in a)


def test_unknown_language_is_named():
    with pytest.raises(ValueError, match="'xx'"):
        sentences(3, 0, "xx")
    with pytest.raises(ValueError, match="n=100000: language 'de' has only 10 sentences"):
        sentences(100_000, 0, "de")


def test_trials_pair_distinct_utterances():
    rows = [(f"{s}-{i}", s, None) for s in "abc" for i in range(4)]
    trials = make_trials(rows, 2, 5, 0)
    assert all(x != y for x, y, _ in trials)
    assert all((x[0] == y[0]) == bool(t) for x, y, t in trials)
    assert {t for *_, t in trials} == {0, 1}


def _median_f0(wave, sr=16000):
    """Median autocorrelation F0 (Hz) of the loudest 30 ms frames (60-400 Hz search)."""
    n = int(0.03 * sr)
    frames = [wave[i:i + n] for i in range(0, len(wave) - n, n)]
    frames = sorted(frames, key=lambda f: -float((f ** 2).sum()))[: max(3, len(frames) // 3)]
    f0 = []
    for f in frames:
        f = f - f.mean()
        ac = np.correlate(f, f, "full")[n - 1:]
        lo, hi = sr // 400, sr // 60
        f0.append(sr / (lo + int(np.argmax(ac[lo:hi]))))
    return float(np.median(f0))


@needs_voices
def test_pitch_perturbation_shifts_f0_and_keeps_tempo(tmp_path):
    voice = Voice("flite-kal", "cmu-kal", "flite", "kal", "en", "flite", "BSD")
    text = "The museum opens at nine o'clock and closes at half past five."
    jobs = [_Job(voice, f"p{cents}", f"p{cents}-0", text, 1.0, cents, "eval", seed=5) for cents in (0, 200)]
    out = {cents: sf.read(path, dtype="float32")[0] for cents, (_, _, path) in zip((0, 200), _render(jobs, tmp_path))}
    assert abs(len(out[200]) - len(out[0])) < 0.02 * len(out[0])
    ratio = _median_f0(out[200]) / _median_f0(out[0])
    assert 1.06 < ratio < 1.19, ratio  # 200 cents = x1.122


@needs_voices
def test_small_corpus(tmp_path):
    voices = discover_voices()
    assert not any(v.engine == "espeak-mbrola" and v.name.split("-")[1] in RESERVED for v in voices)
    assert all(v.language == "en" for v in voices if v.name.endswith("-en"))
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
    assert manifest["reserved_voices"] == sorted(RESERVED)
    assert m["counts"]["eval"]["speakers"] >= 2
    reserved = {v["speaker"] for v in manifest["voices"] if v["split"] == "reserved"}
    assert reserved == {f"mbrola-{v.arg.split('-')[1]}" for v in discover_voices(include_reserved=True) if v.reserved}
    assert not reserved & (train_spk | eval_spk)  # reserved voices never train, nor mix into eval
    if reserved:
        assert set(read_scp(tmp_path / "c" / "reserved" / "utt2spk").values()) == reserved
        assert (tmp_path / "c" / "reserved" / "trials").read_text().strip()
    assert manifest["voices_left_out"] == {}
    utts = [u for split in ("train", "eval", "reserved") if (tmp_path / "c" / split).is_dir()
            for u in read_scp(tmp_path / "c" / split / "utt2spk")]
    for v in manifest["voices"]:  # every voice, in every language, produced its utterances
        assert sum(f"-{v['name']}-" in u for u in utts) >= 2, v["name"]
