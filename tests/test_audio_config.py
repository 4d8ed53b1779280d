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
    assert sr == 8000 and samples.shape == (1600, 1)  # downmixed while decoding
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
    with pytest.raises(ConfigError, match="live_change_reference_llr"):
        load_config(env={"SPKSERVE_LIVE_CHANGE_REFERENCE_LLR": "nan"})
    assert load_config(env={"SPKSERVE_LIVE_CHANGE_REFERENCE_LLR": "50"}).live_change_reference_llr == 50.0
    for bad in ("-1", "inf", "20000"):
        with pytest.raises(ConfigError, match="live_priority_ms"):
            load_config(env={"SPKSERVE_LIVE_PRIORITY_MS": bad})
    assert load_config(env={"SPKSERVE_LIVE_PRIORITY_MS": "0"}).live_priority_ms == 0.0
    for bad in ("-1", "nan", "20000"):
        with pytest.raises(ConfigError, match="live_reserve_ms"):
            load_config(env={"SPKSERVE_LIVE_RESERVE_MS": bad})
    assert load_config(env={"SPKSERVE_LIVE_RESERVE_MS": "0"}).live_reserve_ms == 0.0
    with pytest.raises(ConfigError, match="live_decode_workers"):
        load_config(env={"SPKSERVE_LIVE_DECODE_WORKERS": "0"})
    f.write_text("unknown_option = 1\n")
    with pytest.raises(ConfigError, match="unknown_option"):
        load_config(f, env={})


def test_unknown_keys_and_variables_name_the_option_they_resemble(tmp_path):
    """A misspelt key stops the server naming the option meant; a table of options says they are top-level; a
    misspelt SPKSERVE_* variable (which the resolution ignores) is reported as a warning, the CLI's own are not."""
    from service.config import unknown_environment

    f = tmp_path / "c.toml"
    f.write_text("max_batch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"unknown option 'max_batch_sise' \(did you mean 'max_batch_size'\?\)"):
        load_config(f, env={})
    f.write_text("[server]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"'server' \(options are top-level keys, not in a \[server\] table\)"):
        load_config(f, env={})
    f.write_text("zzz = 1\n")
    with pytest.raises(ConfigError, match="docs/configuration.md"):
        load_config(f, env={})
    with pytest.raises(ConfigError, match="did you mean 'port'"):
        load_config(env={}, overrides={"prot": 1})
    env = {"SPKSERVE_MAX_BATCHSIZE": "4", "SPKSERVE_PORT": "1", "SPKSERVE_TOKEN": "t", "SPKSERVE_TARGET": "h:1",
           "SPKSERVE_CONFIG": "c.toml", "SPKSERVE_CACHE": "/c", "SPKSERVE_TEST_MODEL_REPO": "/m", "SPKSERVE_QQQ": "1",
           "PATH": "/bin"}
    assert unknown_environment(env) == [
        "environment variable SPKSERVE_MAX_BATCHSIZE is not an option and is ignored (did you mean "
        "SPKSERVE_MAX_BATCH_SIZE?)",
        "environment variable SPKSERVE_QQQ is not an option and is ignored"]
    assert load_config(env=env).max_batch_size != 4  # ignored, as the warning says
    assert load_config(env={}, overrides={"auth_token": "x"}).redacted()["auth_token"] == "***"


@pytest.mark.parametrize("opts, gpu, cores, want", [
    ({}, False, 2, (2, 1)),  # CPU: several single-threaded batches, one per core
    ({}, False, 16, (4, 4)),  # at most 4 workers; the cores are split between them
    ({}, True, 16, (1, 0)),  # GPU: one batch at a time, ONNX Runtime's own thread default
    ({"inference_workers": 1}, False, 8, (1, 8)),  # one worker takes all cores
    ({"intra_op_threads": 3}, False, 2, (2, 3)),  # explicit settings win
    ({"inference_workers": 3, "intra_op_threads": 2}, True, 8, (3, 2)),
])
def test_inference_threads_resolve_the_automatic_settings(opts, gpu, cores, want):
    assert load_config(env={}, overrides=opts).inference_threads(gpu, cores) == want


def test_hnsw_build_breadth_is_checked_and_reaches_the_index():
    import faiss

    from service.store.base import IndexOptions, SpeakerRecord
    from service.store.faiss_index import CollectionIndex

    with pytest.raises(ConfigError, match="hnsw_ef_construction"):
        load_config(env={}, overrides={"hnsw_ef_construction": 8})  # below hnsw_m (32)
    assert load_config(env={}).hnsw_ef_construction == 0  # the backend's own default
    cfg = load_config(env={"SPKSERVE_HNSW_EF_CONSTRUCTION": "80"})
    assert cfg.hnsw_ef_construction == 80
    coll = CollectionIndex("c", "m", 4, IndexOptions(index_type="hnsw", hnsw_ef_construction=cfg.hnsw_ef_construction))
    coll.upsert(SpeakerRecord("a", np.ones(4), 1))
    coll.search(np.ones(4, np.float32) / 2, 1)  # builds the index
    assert faiss.downcast_index(coll._index.index).hnsw.efConstruction == 80


def test_ivf_pq_options_are_checked():
    assert load_config(env={}, overrides={"index_type": "ivf_pq"}).ivf_pq_rerank == 64
    with pytest.raises(ConfigError, match="ivf_pq_rerank"):
        load_config(env={}, overrides={"ivf_pq_rerank": 0})
    milvus = load_config(env={}, overrides={"index_type": "ivf_pq", "index_backend": "milvus", "milvus_uri": "http://m:19530"})
    assert milvus.index_type == "ivf_pq"  # Milvus' SCANN


def test_inference_workers_must_not_be_negative():
    with pytest.raises(ConfigError, match="inference_workers"):
        load_config(env={}, overrides={"inference_workers": -1})


def _flac_declaring(seconds: float, channels: int, sr: int = 16000) -> bytes:
    """A small FLAC of digital silence: it compresses to almost nothing whatever its length."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", sr, channels, format="FLAC") as f:
        block = np.zeros((sr * 10, channels), np.float32)
        for _ in range(int(seconds // 10)):
            f.write(block)
    return buf.getvalue()


def test_decompression_bomb_is_refused_from_its_header_without_decoding(monkeypatch):
    import soundfile as sf

    from models.audio import AudioLimits

    bomb = _flac_declaring(40 * 60, 8)  # 40 minutes of 8-channel silence
    assert len(bomb) < 2_000_000
    reads = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, *a, **k: reads.append(1) or real_read(self, *a, **k))
    with pytest.raises(AudioError, match=r"declares 2400.0 s of audio, longer than the maximum 300.0 s"):
        decode_encoded(bomb, "audio.encoded", AudioLimits(0.1, 300.0))
    assert not reads  # refused before a single frame was decoded


def test_header_that_lies_about_its_length_stops_at_the_limit():
    from models.audio import AudioLimits

    data = bytearray(_flac_declaring(20, 1))
    # FLAC STREAMINFO: total samples are the low 36 bits of bytes 21..25 after "fLaC" + block header
    data[21] = (data[21] & 0xF0)  # declare an unknown length: the decoder must stop by itself
    data[22:26] = b"\x00\x00\x00\x00"
    with pytest.raises(AudioError, match="encoded: is longer than the maximum 10.0 s"):
        decode_encoded(bytes(data), "audio.encoded", AudioLimits(0.1, 10.0))


@pytest.mark.parametrize("rate", [1, 3999, 400_000])
def test_sample_rate_bounds_are_the_same_for_encoded_and_raw_audio(rate):
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(64, np.float32), rate, format="WAV", subtype="FLOAT")
    with pytest.raises(AudioError, match="sample rate of"):
        decode_encoded(buf.getvalue())
    with pytest.raises(AudioError, match=r"audio.pcm.format.sample_rate: must be in 4000..384000 Hz"):
        decode_pcm(b"\x00\x00" * 64, rate, "PCM_S16LE")


def test_raw_pcm_longer_than_the_limit_is_refused_before_conversion():
    from models.audio import AudioLimits

    with pytest.raises(AudioError, match="audio.pcm.data: is 20.0 s long"):
        decode_pcm(bytes(2 * 8000 * 20), 8000, "PCM_S16LE", limits=AudioLimits(0.1, 10.0))


def test_decode_errors_do_not_echo_object_addresses():
    with pytest.raises(AudioError) as e:
        decode_encoded(b"RIFX" + bytes(100))
    assert "0x" not in str(e.value) and "BytesIO" not in str(e.value)


def test_stream_windows_equal_whole_decoding_and_check_their_input():
    import io

    import soundfile as sf

    from models.audio import AudioError, condition, stream_windows

    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal(16000 * 130)).astype(np.float32)  # 130 s
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="FLAC")
    buf.seek(0)
    windows = list(stream_windows(buf, "chunk", 16000, 3600, window_seconds=60))
    assert [len(w) for w in windows] == [960000, 960000, 160000]
    np.testing.assert_allclose(np.concatenate(windows), x, atol=1e-4)  # FLAC's 16-bit quantisation
    pcm = (x * 32767).astype("<i2").tobytes()
    eight = list(stream_windows(io.BytesIO(pcm), "chunk", 8000, 3600, pcm=("PCM_S16LE", 16000, 1), window_seconds=60))
    whole = condition(np.frombuffer(pcm, "<i2").astype(np.float32)[:, None] / 32768, 16000, 8000)
    np.testing.assert_allclose(np.concatenate(eight), whole, atol=1e-5)  # one streaming resampler, as whole
    with pytest.raises(AudioError, match="longer than the maximum 100.0 s"):
        list(stream_windows(io.BytesIO(pcm), "chunk", 16000, 100, pcm=("PCM_S16LE", 16000, 1)))
    with pytest.raises(AudioError, match="chunk.data: does not end on a whole frame"):
        list(stream_windows(io.BytesIO(pcm[:-1]), "chunk", 16000, 3600, pcm=("PCM_S16LE", 16000, 1)))
    with pytest.raises(AudioError, match="chunk: could not be decoded"):
        list(stream_windows(io.BytesIO(b"not audio" * 1000), "chunk", 16000, 3600))
    nan = np.full(1000, np.nan, "<f4").tobytes()
    with pytest.raises(AudioError, match="non-finite"):
        list(stream_windows(io.BytesIO(nan), "chunk", 16000, 3600, pcm=("PCM_F32LE", 16000, 1)))
