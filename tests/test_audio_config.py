"""models.audio, models.artifact and service.config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.artifact import ArtifactError, ModelCard, load_card, save_card
from models.audio import AudioError, AudioLimits, condition, decode_encoded, decode_pcm, resample
from service.config import ConfigError, load_config
from tests.conftest import wav_bytes


def test_resample_keeps_frequency_and_level():
    sr_in, sr_out, f = 44100, 16000, 440.0
    t = np.arange(sr_in) / sr_in
    out = resample(np.sin(2 * np.pi * f * t).astype(np.float32), sr_in, sr_out)
    assert abs(len(out) - sr_out) <= 1
    spec = np.abs(np.fft.rfft(out[1000:-1000] * np.hanning(len(out) - 2000)))
    peak = np.argmax(spec) * sr_out / (len(out) - 2000)
    assert abs(peak - f) < 2.0
    assert abs(np.sqrt(np.mean(out[1000:-1000] ** 2)) - np.sqrt(0.5)) < 0.01


def test_decode_and_downmix():
    stereo = np.stack([np.full(1600, 0.5, np.float32), np.full(1600, -0.25, np.float32)], axis=1)
    samples, sr = decode_encoded(wav_bytes(stereo, 8000, subtype="FLOAT"))
    assert sr == 8000 and samples.shape == (1600, 2)
    wave = condition(samples, sr, 8000)
    np.testing.assert_allclose(wave, 0.125, atol=1e-6)
    pcm, sr = decode_pcm(np.array([0, 16384, -32768], "<i2").tobytes(), 16000, "PCM_S16LE")
    np.testing.assert_allclose(pcm[:, 0], [0.0, 0.5, -1.0])
    f32, _ = decode_pcm(np.array([0.1, 0.2, 0.3, 0.4], "<f4").tobytes(), 16000, "PCM_F32LE", channels=2)
    assert f32.shape == (2, 2)


@pytest.mark.parametrize("call,field", [
    (lambda: decode_encoded(b""), "audio.encoded"),
    (lambda: decode_encoded(b"nonsense" * 50), "audio.encoded"),
    (lambda: decode_pcm(b"\x00" * 6, 16000, "PCM_S32LE"), "audio.pcm.data"),
    (lambda: decode_pcm(b"\x00" * 8, 16000, "PCM_U8"), "audio.pcm.format.encoding"),
    (lambda: decode_pcm(b"\x00" * 8, -1, "PCM_S16LE"), "audio.pcm.format.sample_rate"),
    (lambda: decode_pcm(b"\x00" * 8, 16000, "PCM_S16LE", channels=100), "audio.pcm.format.channels"),
    (lambda: condition(np.array([[np.nan]] * 4000, np.float32), 16000, 16000), "audio"),
    (lambda: condition(np.zeros((10, 1), np.float32), 16000, 16000), "audio"),
    (lambda: condition(np.zeros((16000 * 3, 1), np.float32), 16000, 16000, AudioLimits(0.1, 2.0)), "audio"),
])
def test_audio_errors_name_the_field(call, field):
    with pytest.raises(AudioError) as e:
        call()
    assert e.value.field == field


def test_truncated_wav_detected():
    data = wav_bytes(np.zeros(16000, np.float32))
    with pytest.raises(AudioError, match="truncated"):
        decode_encoded(data[:-1000])


def card(**kw) -> ModelCard:
    base = dict(name="m", version="1", sample_rate=16000, embedding_dim=8)
    base.update(kw)
    return ModelCard(**base)


def test_card_round_trip_and_validation(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "model.onnx").write_bytes(b"x")
    save_card(card(), d)
    assert load_card(d).embedding_dim == 8
    for kw, word in [(dict(sample_rate=5), "sample_rate"), (dict(embedding_dim=0), "embedding_dim"),
                     (dict(batching="sometimes"), "batching"), (dict(threshold=2.0), "threshold"),
                     (dict(batching="padded", lengths_input=None), "batching"), (dict(files={}), "files")]:
        with pytest.raises(ArtifactError, match=word):
            card(**kw).validate()


def test_card_load_errors(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        load_card(tmp_path / "missing")
    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(ArtifactError, match="model.json: missing"):
        load_card(d)
    (d / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_card(d)
    (d / "model.json").write_text(json.dumps({**card().__dict__, "colour": "red"}))
    with pytest.raises(ArtifactError, match="colour"):
        load_card(d)
    (d / "model.json").write_text(card().to_json())
    with pytest.raises(ArtifactError, match="model.onnx"):
        load_card(d)
    (d / "model.onnx").write_bytes(b"x")
    (d / "model.json").write_text(card(name="other").to_json())
    with pytest.raises(ArtifactError, match="directory"):
        load_card(d)


def test_config_precedence_and_errors(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('port = 1234\nmax_batch_size = 4\nproviders = ["CPUExecutionProvider"]\n')
    cfg = load_config(f, env={"SPKSERVE_MAX_BATCH_SIZE": "8", "SPKSERVE_FSYNC": "false"}, overrides={"port": 99, "data_dir": None})
    assert (cfg.port, cfg.max_batch_size, cfg.fsync, cfg.providers) == (99, 8, False, ["CPUExecutionProvider"])
    assert load_config(env={"SPKSERVE_PROVIDERS": "A,B"}).providers == ["A", "B"]
    with pytest.raises(ConfigError, match="max_batch_size"):
        load_config(env={"SPKSERVE_MAX_BATCH_SIZE": "lots"})
    with pytest.raises(ConfigError, match="index_type"):
        load_config(overrides={"index_type": "tree"})
    f.write_text("unknown_option = 1\n")
    with pytest.raises(ConfigError, match="unknown_option"):
        load_config(f, env={})
    assert load_config(env={}, overrides={"auth_token": "x"}).redacted()["auth_token"] == "***"
