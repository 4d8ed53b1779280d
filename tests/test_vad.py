"""models.vad: Silero VAD probabilities and segments against the silero-vad package's own output."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from models.audio import resample
from models.vad import DEFAULT_VAD_MODEL, NARROWBAND_VAD_MODEL, SileroVad, VadOptions, is_narrowband, keep_speech, level_gain, speech_segments

SR = 16000


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(refresh_s=None)  # the network as Silero runs it (the refresh has tests of its own)


def _speechy(speech_files) -> dict[str, np.ndarray]:
    """Real utterances with the edits real recordings have: silence, low noise, pauses."""
    rng = np.random.default_rng(0)
    slt, _ = sf.read(speech_files["flite-slt-1"], dtype="float32")
    awb, _ = sf.read(speech_files["flite-awb-1"], dtype="float32")
    z = lambda s: np.zeros(int(s * SR), np.float32)  # noqa: E731
    low = lambda s: (0.003 * rng.standard_normal(int(s * SR))).astype(np.float32)  # noqa: E731
    return {
        "padded": np.concatenate([z(3), slt, z(3)]),
        "noise_padded": np.concatenate([low(3), slt, low(3)]) + low(3 + len(slt) / SR + 3)[: 6 * SR + len(slt)],
        "pause": np.concatenate([slt[: len(slt) // 2], z(2), slt[len(slt) // 2:], z(0.5), awb]),
        "long": np.concatenate([awb, z(1), slt] * 6),  # > 512 frames: several ONNX blocks
    }


def test_probabilities_equal_the_package(vad, speech_files):
    pytest.importorskip("silero_vad")
    from silero_vad.sequence_vad import SileroVADSequence

    ref = SileroVADSequence(str(DEFAULT_VAD_MODEL))
    for name, x in _speechy(speech_files).items():
        # the batched graph sums in another order (GEMMs, not per-frame convolutions): float32 rounding only
        np.testing.assert_allclose(vad.probabilities(x), ref.audio_forward(x), atol=2e-5, err_msg=name)


@pytest.mark.parametrize("opts", [
    {},
    {"threshold": 0.3, "min_speech_duration_ms": 100, "min_silence_duration_ms": 300, "speech_pad_ms": 100},
    {"threshold": 0.7, "min_speech_duration_ms": 500, "min_silence_duration_ms": 50, "speech_pad_ms": 0},
])
def test_segments_equal_the_package(vad, speech_files, opts):
    pytest.importorskip("silero_vad")
    from silero_vad.sequence_vad import SileroVADSequence, get_speech_timestamps_sequence

    ref = SileroVADSequence(str(DEFAULT_VAD_MODEL))
    ours = VadOptions(threshold=opts.get("threshold", 0.5), min_speech_ms=opts.get("min_speech_duration_ms", 250),
                      min_silence_ms=opts.get("min_silence_duration_ms", 100), speech_pad_ms=opts.get("speech_pad_ms", 30))
    for name, x in _speechy(speech_files).items():
        x = x - np.float32(x.mean(dtype=np.float64))  # SileroVad.segments removes the DC offset first
        expected = [(d["start"], d["end"]) for d in get_speech_timestamps_sequence(x, ref, **opts)]
        assert speech_segments(vad.probabilities(x), x.size, ours) == expected, name
        assert vad.segments(x, SR, ours) == expected, name
        assert expected, name


def test_dc_offset_does_not_move_segments(vad, speech_files):
    x = _speechy(speech_files)["padded"]
    assert vad.segments(x + 0.3, SR) == vad.segments(x, SR)


def test_padding_and_pauses_leave_the_speech(vad, speech_files):
    slt, _ = sf.read(speech_files["flite-slt-1"], dtype="float32")
    x = _speechy(speech_files)["padded"]
    segs = vad.segments(x, SR)
    kept = keep_speech(x, segs)
    assert segs[0][0] >= 2.9 * SR and segs[-1][1] <= 3.1 * SR + len(slt)
    assert abs(len(kept) - len(slt)) < 0.25 * SR


@pytest.mark.parametrize("name", ["silence", "white", "pink", "tone", "dtmf", "dc", "square", "clipped_noise", "sweep"])
def test_non_speech_has_no_segments(vad, name):
    rng = np.random.default_rng(1)
    t = np.arange(3 * SR) / SR
    spec = np.fft.rfft(rng.standard_normal(t.size))
    pink = np.fft.irfft(spec / np.sqrt(np.maximum(np.arange(spec.size), 1)), t.size)
    signals = {
        "silence": np.zeros(t.size), "white": 0.3 * rng.standard_normal(t.size), "pink": 0.3 * pink / np.abs(pink).max(),
        "tone": 0.5 * np.sin(2 * np.pi * 440 * t), "dtmf": 0.3 * (np.sin(2 * np.pi * 697 * t) + np.sin(2 * np.pi * 1209 * t)),
        "dc": np.full(t.size, 0.5), "square": np.sign(np.sin(2 * np.pi * 100 * t)),
        "clipped_noise": np.clip(3 * rng.standard_normal(t.size), -1, 1),
        "sweep": 0.3 * np.sin(2 * np.pi * (100 + 1000 * t / 3) * t),
    }
    assert vad.segments(signals[name].astype(np.float32), SR) == []


def test_other_rates_map_back_and_state_resets(vad, speech_files):
    x = _speechy(speech_files)["pause"]
    base = vad.segments(x, SR)
    for rate in (8000, 44100):
        y = resample(x, SR, rate)
        got = [(a / rate, b / rate) for a, b in vad.segments(y, rate)]
        assert len(got) == len(base)
        for (a, b), (c, d) in zip(got, [(a / SR, b / SR) for a, b in base]):
            assert abs(a - c) < 0.2 and abs(b - d) < 0.2  # 8 kHz loses the band above 4 kHz
    vad.probabilities(np.random.default_rng(2).standard_normal(SR * 5).astype(np.float32))  # another request first
    assert vad.segments(x, SR) == base


def test_segment_rules_on_synthetic_probabilities():
    frame = 512
    # 10 frames of speech, 2 quiet frames (too short a silence), 10 speech, 10 silent, 3 speech (too short)
    probs = np.array([0.9] * 10 + [0.1] * 2 + [0.9] * 10 + [0.1] * 10 + [0.9] * 3 + [0.0] * 5, np.float32)
    opts = VadOptions(min_speech_ms=100, min_silence_ms=100, speech_pad_ms=0)
    segs = speech_segments(probs, len(probs) * frame, opts)
    assert segs == [(0, 22 * frame)]
    # between neg_threshold and threshold nothing changes: the segment continues
    probs = np.array([0.9] * 10 + [0.4] * 20 + [0.9] * 10 + [0.0] * 10, np.float32)
    assert speech_segments(probs, len(probs) * frame, opts) == [(0, 40 * frame)]


@pytest.mark.parametrize("bad", [dict(threshold=0.0), dict(threshold=1.5), dict(neg_threshold=0.9),
                                 dict(min_speech_ms=-1), dict(speech_pad_ms=float("nan"))])
def test_bad_options_name_the_option(bad):
    with pytest.raises(ValueError) as e:
        VadOptions(**bad).validate("vad")
    assert f"vad.{next(iter(bad))}" in str(e.value)


# -- degraded audio: level and bandwidth ------------------------------------------------
def test_narrowband_probabilities_equal_the_package(vad, speech_files):
    """Our 8 kHz frame loop gives the package's own 8 kHz probabilities."""
    pytest.importorskip("silero_vad")
    import torch
    from silero_vad.utils_vad import OnnxWrapper

    ref = OnnxWrapper(str(NARROWBAND_VAD_MODEL))
    x = resample(_speechy(speech_files)["pause"], SR, 8000)
    want = ref.audio_forward(torch.from_numpy(x), 8000).numpy().reshape(-1)
    np.testing.assert_allclose(vad.probabilities_8k(x), want, atol=1e-5)


def test_narrowband_is_detected_from_the_spectrum(speech_files):
    x, _ = sf.read(speech_files["flite-slt-1"], dtype="float32")
    assert not is_narrowband(x, SR)
    eight = resample(x, SR, 8000)
    assert is_narrowband(eight, 8000) and is_narrowband(resample(eight, 8000, SR), SR)  # 8 kHz audio sent at 16 kHz
    assert not is_narrowband(np.zeros(SR, np.float32), SR) and not is_narrowband(x[:1000], SR)


def test_telephone_codecs_are_narrowband(speech_files):
    pytest.importorskip("scipy")  # the channel simulation (training extra)
    from training.data.channels import apply_condition

    x, _ = sf.read(speech_files["flite-slt-1"], dtype="float32")
    rng = np.random.default_rng(0)
    for cond in ("telephone", "gsm", "amr"):
        y, rate = apply_condition(cond, x, rng)
        assert rate == 8000 and is_narrowband(y, rate)
        assert is_narrowband(resample(y, rate, SR), SR), cond  # telephone audio sent at 16 kHz


def test_quiet_speech_is_raised_before_vad_and_silence_is_not(vad, speech_files):
    x = _speechy(speech_files)["pause"]
    assert level_gain(x) == 1.0  # a normal level is left alone
    quiet = (x * 10 ** (-30 / 20)).astype(np.float32)
    raised = quiet * level_gain(quiet)  # its loudest frames (95th percentile of 32 ms RMS) now at -20 dBFS
    power = np.mean(raised[: len(raised) // 512 * 512].reshape(-1, 512) ** 2, axis=1)
    assert 10 * np.log10(np.percentile(power, 95)) == pytest.approx(-20.0, abs=0.01)
    assert level_gain(np.zeros(SR, np.float32)) == 1.0 and level_gain(np.full(SR, 1e-6, np.float32)) == 1.0
    base = sum(b - a for a, b in vad.segments(x, SR))
    found = sum(b - a for a, b in vad.segments(quiet, SR))
    assert abs(found - base) < 0.1 * SR
    # low noise and tones at any level stay non-speech once raised
    rng = np.random.default_rng(3)
    for level in (1e-3, 3e-3, 1e-2):
        assert vad.segments((level * rng.standard_normal(3 * SR)).astype(np.float32), SR) == []
    t = np.arange(3 * SR) / SR
    assert vad.segments((0.003 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), SR) == []


def test_options_turn_each_step_off(vad, speech_files):
    x, _ = sf.read(speech_files["espeak-en-1"], dtype="float32")
    wide = resample(resample(x, SR, 8000), 8000, SR)  # narrowband audio at 16 kHz
    _, narrow = vad.analyse(wide, SR)
    _, forced = vad.analyse(wide, SR, VadOptions(narrowband=False))
    assert narrow and not forced
    with pytest.raises(ValueError, match="vad.narrowband_threshold"):
        VadOptions(narrowband_threshold=1.0).validate("vad")


def test_several_rule_sets_from_one_pass_equal_one_call_each(vad, speech_files):
    """``analyse_many``: each option set's segments are what ``analyse`` gives it alone, wideband and narrowband."""
    x = _speechy(speech_files)["pause"]
    strict, generous = VadOptions(), VadOptions(threshold=0.35, narrowband_threshold=0.3, speech_pad_ms=200,
                                                 min_silence_ms=300)
    for wave, rate in ((x, SR), (resample(x, SR, 8000), 8000), (resample(x, SR, 22050), 22050)):
        many, narrow = vad.analyse_many(wave, rate, [strict, generous])
        assert many == [vad.analyse(wave, rate, strict)[0], vad.analyse(wave, rate, generous)[0]]
        assert narrow == vad.analyse(wave, rate, strict)[1]
        assert many[0] != many[1] and sum(b - a for a, b in many[1]) > sum(b - a for a, b in many[0])
    assert vad.analyse_many(np.zeros(0, np.float32), SR, [strict, generous]) == ([[], []], False)
    with pytest.raises(ValueError, match=r"options\[1\]: normalize_level and narrowband"):
        vad.analyse_many(x, SR, [strict, VadOptions(normalize_level=False)])
    with pytest.raises(ValueError, match="options: give at least one"):
        vad.analyse_many(x, SR, [])
