"""Cluster purity and the pitch-class proxy the compression experiment records for every cluster set."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from tests.conftest import REFERENCE
from training.compression.clusters import cluster_purity, pitch_class, pitch_hz


def test_pitch_of_tones_and_of_recorded_voices():
    t = np.arange(16000) / 16000
    for f0 in (95.0, 140.0, 230.0):
        harmonic = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)).astype(np.float32)
        assert pitch_hz(0.2 * harmonic) == pytest.approx(f0, rel=0.03)
    assert np.isnan(pitch_hz(np.zeros(16000, np.float32)))  # silence: no voiced frame
    assert np.isnan(pitch_hz(np.zeros(100, np.float32)))  # shorter than a frame
    assert [pitch_class(x) for x in (110.0, 210.0, float("nan"))] == ["low", "high", "unknown"]
    # recorded voices: CMU ARCTIC's awb (male) and slt (female)
    male, _ = sf.read(REFERENCE / "audio" / "flite-awb-1.wav", dtype="float32")
    female, _ = sf.read(REFERENCE / "audio" / "flite-slt-1.wav", dtype="float32")
    assert pitch_class(pitch_hz(male)) == "low" and pitch_class(pitch_hz(female)) == "high"


def test_purity_tells_speaker_clusters_from_arbitrary_ones():
    rng = np.random.default_rng(0)
    speakers = [f"s{i}" for i in range(20) for _ in range(8)]
    classes = ["low" if i < 10 else "high" for i in range(20) for _ in range(8)]
    by_gender = np.array([0 if c == "low" else 1 for c in classes])
    g = cluster_purity(by_gender, speakers, classes, 20, 0)
    assert g["speaker_consistency"] == 1.0 and g["pitch_class_purity"] == 1.0 and g["speaker_like"]
    assert g["speaker_consistency_chance"] < 0.85 and g["pitch_class_purity_chance"] < 0.7
    arbitrary = rng.integers(0, 2, len(speakers))
    a = cluster_purity(arbitrary, speakers, classes, 20, 0)
    assert not a["speaker_like"] and a["speaker_consistency"] < 0.9
    with pytest.raises(ValueError, match="equal non-zero lengths"):
        cluster_purity(by_gender[:-1], speakers, classes)
