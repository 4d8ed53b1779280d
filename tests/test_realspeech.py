"""The real-speech pool: utterances from clips, speaker-disjoint splits, trials, and the packages it may use."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import soundfile as sf

from training.data.realspeech import assign_splits, build_utterances, make_trials, trim_silence
from training.data.realspeech_sources import (POSSIBLY_SAME_PERSON, RESERVED_PACKAGES, SAME_SPLIT_AS, SOURCES,
                                               fetch_packages)


def test_no_source_uses_a_reserved_package():
    used = {p for s in SOURCES.values() for p in s.packages}
    assert not used & set(RESERVED_PACKAGES)
    with pytest.raises(ValueError, match="reserved for independent evaluation"):
        fetch_packages(["klettres-data", "codec2-examples"], None)


def test_trim_and_concatenate_clips():
    sr = 16000
    tone = (0.3 * np.sin(2 * np.pi * 200 * np.arange(sr) / sr)).astype(np.float32)
    clip = np.concatenate([np.zeros(sr, np.float32), tone, np.zeros(sr // 2, np.float32)])
    trimmed = trim_silence(clip, sr)
    assert abs(len(trimmed) - (sr + 0.2 * sr)) < 0.05 * sr  # the tone and 0.1 s margins
    assert len(trim_silence(np.zeros(sr, np.float32), sr)) == 0
    utts = build_utterances([tone] * 20, sr, random.Random(0))
    assert utts and all(3.0 * sr <= len(u) <= 7.0 * sr + len(tone) + 0.4 * sr for u in utts[:-1])
    assert sum(len(u) for u in utts) >= 20 * len(tone)  # gaps added, nothing lost but a short tail


def test_splits_are_speaker_disjoint_and_keep_linked_groups_together():
    speakers = [f"{src}-{i}" for src in ("asterisk", "tuxpaint", "klettres") for i in range(5)]
    links = {("asterisk-0", "tuxpaint-3")}
    split = assign_splits(speakers, links, seed=0)
    assert set(split) == set(speakers)
    assert split["asterisk-0"] == split["tuxpaint-3"]
    for src in ("asterisk", "tuxpaint", "klettres"):  # every source in both splits
        assert {split[f"{src}-{i}"] for i in range(5)} == {"calibration", "evaluation"}
    assert assign_splits(speakers, links, seed=0) == split  # seeded


def test_a_voice_found_inside_another_speakers_set_takes_its_split_and_moves_no_one_else():
    speakers = [f"{src}-{i}" for src in ("asterisk", "tuxpaint", "klettres") for i in range(5)]
    before = assign_splits(speakers, set(), seed=0)
    for parent in ("tuxpaint-1", "tuxpaint-2"):
        after = assign_splits(speakers + [parent + "-b"], set(), seed=0, same_split_as={parent + "-b": parent})
        assert after[parent + "-b"] == before[parent]
        assert {s: after[s] for s in speakers} == before  # nobody else moved
    assert assign_splits(speakers, set(), seed=0, same_split_as={"tuxpaint-9-b": "tuxpaint-9"}) == before  # absent


def test_tuxpaint_french_descriptions_are_two_speakers_by_their_vorbis_tags(tmp_path):
    """The French set's tagged and untagged recordings are two people (see realspeech_sources); other
    languages' sets stay one speaker whatever their tags."""
    sr = 16000
    stamps = tmp_path / "usr" / "share" / "tuxpaint" / "stamps" / "animals"
    stamps.mkdir(parents=True)
    tone = (0.1 * np.sin(2 * np.pi * 150 * np.arange(sr) / sr)).astype(np.float32)
    for i, (lang, tagged) in enumerate([("fr", True), ("fr", True), ("fr", False), ("ca", True), ("ca", False)]):
        with sf.SoundFile(stamps / f"s{i}_desc_{lang}.ogg", "w", sr, 1, format="OGG", subtype="VORBIS") as f:
            if tagged:
                f.tracknumber = str(i + 1)
            f.write(tone)
    got = SOURCES["tuxpaint"].speakers(tmp_path)
    assert {k: [p.name for p in v[1]] for k, v in got.items()} == {
        "tuxpaint-fr": ["s0_desc_fr.ogg", "s1_desc_fr.ogg"], "tuxpaint-fr-b": ["s2_desc_fr.ogg"],
        "tuxpaint-ca": ["s3_desc_ca.ogg", "s4_desc_ca.ogg"]}
    assert SAME_SPLIT_AS["tuxpaint-fr-b"] == "tuxpaint-fr"


def test_trials_never_pair_linked_speakers_as_impostors():
    utt2spk = {f"{s}-{i}": s for s in ("a", "b", "c") for i in range(4)}
    trials = make_trials(utt2spk, {("a", "b")}, random.Random(0), max_targets=100, nontargets_per_utt=10)
    for x, y, kind in trials:
        pair = {utt2spk[x], utt2spk[y]}
        assert (kind == "target") == (len(pair) == 1)
        assert pair != {"a", "b"}
    assert sum(k == "target" for *_, k in trials) == 3 * 6


@pytest.mark.slow
def test_pool_from_debian_packages(tmp_path):
    """Builds a small pool from two sources of Debian's archive (skipped where it cannot be reached)."""
    pytest.importorskip("G722")
    if shutil.which("apt-get") is None or shutil.which("sox") is None:
        pytest.skip("needs apt-get and sox")
    from training.data.realspeech import build_pool

    try:
        manifest = build_pool(tmp_path / "real", ["asterisk", "klettres"], per_speaker=6,
                              cache=tmp_path / "cache", log=lambda *_: None)
    except RuntimeError as e:
        pytest.skip(f"Debian archive not reachable: {e}")
    assert set(manifest["splits"]) == {"calibration", "evaluation"}
    by_split = {}
    for spk, info in manifest["speakers"].items():
        by_split.setdefault(info["split"], set()).add(spk)
        assert info["utterances"] == 6 and info["source"] in ("asterisk", "klettres")
    assert not by_split["calibration"] & by_split["evaluation"]
    assert {"asterisk-allison", "asterisk-armelle"} <= set(manifest["speakers"])
    for split in ("calibration", "evaluation"):
        scp = dict(line.split() for line in (tmp_path / "real" / split / "wav.scp").read_text().splitlines())
        spk = dict(line.split() for line in (tmp_path / "real" / split / "utt2spk").read_text().splitlines())
        assert set(spk.values()) == by_split[split]
        rates = {sf.info(p).samplerate for p in scp.values()}
        assert rates <= {8000, 16000}
        lines = (tmp_path / "real" / split / "trials").read_text().splitlines()
        assert all(line.split()[0] in scp and line.split()[1] in scp for line in lines)
    assert json.loads((tmp_path / "real" / "manifest.json").read_text())["seed"] == 0
    assert POSSIBLY_SAME_PERSON  # the one link found by the GE2E centroid check is kept in the code

    # the decision evaluation on this small real subset, with the served model: loose bounds that a
    # broken VAD, cohort or calibration would fail (the full figures are in the docs)
    from training.evaluation.decisions import main as decisions

    out = tmp_path / "dec"
    assert decisions(["--real", str(tmp_path / "real"), "--model", "ge2e", "--conditions", "clean,telephone-both",
                      "--identify-sizes", "5", "--one-talker", "0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    clean, tel = res["conditions"]["clean"], res["conditions"]["telephone-both"]
    assert clean["far"] <= 0.03 and clean["cllr"] < 0.6 and tel["far"] <= 0.05 and tel["cllr"] < 1.0
    nes = res["not_enough_speech_by_channel"]
    assert nes["telephone"] - nes["clean"] <= 0.20  # a few dozen utterances, many of them spelled letters
    assert res["identify"]["5"]["stranger_false_match"] <= 0.1
