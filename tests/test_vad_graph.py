"""The batched Silero graphs (models.vad_graph): same network as Silero's own graphs, inputs batched exactly."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import soundfile as sf

from models.audio import resample
from models.vad import (DEFAULT_VAD_MODEL, NARROWBAND_VAD_MODEL, VAD_MODELS, SileroVad, VadOptions, VadState,
                        speech_segments)

SR = 16000


@pytest.fixture(scope="module")
def vad():
    return SileroVad(refresh_s=None)  # the network as Silero runs it (the refresh has tests of its own)


@pytest.fixture(scope="module")
def inputs(speech_files):
    """Speech with silence, pauses, noise and a >512-frame stretch, at 16 kHz."""
    rng = np.random.default_rng(3)
    read = {k: sf.read(v, dtype="float32")[0] for k, v in speech_files.items()}
    slt, awb = read["flite-slt-1"], read["flite-awb-1"]
    z = lambda s: np.zeros(int(s * SR), np.float32)  # noqa: E731
    return {
        "padded": np.concatenate([z(1.3), slt, z(0.7)]),
        "noisy": (awb + 0.02 * rng.standard_normal(awb.size)).astype(np.float32),
        "short": slt[:5000],
        "long": np.concatenate([awb, z(1), slt] * 6),
        "noise only": (0.05 * rng.standard_normal(3 * SR)).astype(np.float32),
    }


@functools.lru_cache(maxsize=None)
def _session(path: str):
    """One ONNX Runtime session (one thread, as the service's VAD) per graph file."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def _original_16k(x: np.ndarray) -> np.ndarray:
    """Silero's own 16 kHz sequence graph over (T,), one call per 512 frames, state carried."""
    sess = _session(str(DEFAULT_VAD_MODEL))
    n = -(-x.size // 512)
    frames = np.zeros((n, 512), np.float32)
    frames.reshape(-1)[:x.size] = x
    h = c = np.zeros((1, 1, 128), np.float32)
    ctx, out = np.zeros(64, np.float32), []
    for first in range(0, n, 512):
        part = frames[first:first + 512]
        block = np.concatenate([np.concatenate([ctx[None], part[:-1, -64:]]), part], axis=1)  # (F, 576)
        ctx = part[-1, -64:]
        p, h, c = sess.run(["speech_probs", "hn", "cn"], {"input": block, "h": h, "c": c})
        out.append(p.reshape(-1))
    return np.concatenate(out)


def _original_8k(x: np.ndarray) -> np.ndarray:
    """Silero's own frame graph in its 8 kHz mode, frame by frame."""
    sess = _session(str(NARROWBAND_VAD_MODEL))
    n = -(-x.size // 256)
    padded = np.zeros(32 + n * 256, np.float32)
    padded[32:32 + x.size] = x
    state, sr, out = np.zeros((2, 1, 128), np.float32), np.array(8000, np.int64), []
    for i in range(n):
        p, state = sess.run(None, {"input": padded[None, i * 256:(i + 1) * 256 + 32], "state": state, "sr": sr})
        out.append(float(p.reshape(-1)[0]))
    return np.array(out, np.float32)


def test_16k_graph_gives_silero_probabilities_and_segments(vad, inputs):
    for name, x in inputs.items():
        want = _original_16k(x)
        got = vad.probabilities(x)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)  # float32 summation order only
        assert speech_segments(got, x.size) == speech_segments(want, x.size), name


def test_8k_graph_gives_silero_probabilities_and_segments(vad, inputs):
    opts = VadOptions(threshold=0.4)
    for name, x in inputs.items():
        x8 = resample(x, SR, 8000)
        want = _original_8k(x8)
        got = vad.probabilities_8k(x8)
        np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)
        assert speech_segments(got, x8.size, opts, 8000, 256) == speech_segments(want, x8.size, opts, 8000, 256), name


@pytest.mark.parametrize("rate", [16000, 8000])
def test_a_batch_gives_each_input_its_own_probabilities(vad, inputs, rate):
    """Inputs of different lengths in one call: each equals its own call (padding after an input changes nothing)."""
    waves = [x if rate == SR else resample(x, SR, rate) for x in inputs.values()]
    batched = vad.probabilities_batch(waves, rate)
    for name, x, got in zip(inputs, waves, batched):
        alone = vad.probabilities_batch([x], rate)[0]
        assert got.shape == alone.shape, name
        np.testing.assert_allclose(got, alone, atol=1e-5, err_msg=name)
        frame = 512 if rate == SR else 256
        assert speech_segments(got, x.size, sample_rate=rate, frame=frame) == \
            speech_segments(alone, x.size, sample_rate=rate, frame=frame), name
    assert vad.probabilities_batch([], rate) == []


def test_state_carried_across_calls_equals_one_call(vad, inputs):
    x = inputs["long"]
    frames = x[:x.size // 512 * 512].reshape(1, -1, 512)  # (1, F, 512)
    whole, _ = vad.run_frames(frames, SR)
    state, parts = VadState.zeros(1, SR), []
    for cut in np.array_split(np.arange(frames.shape[1]), 7):
        p, state = vad.run_frames(frames[:, cut], SR, state)
        parts.append(p)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, atol=1e-6)


def test_dense_conv_is_the_convolution():
    from models.vad_graph import dense_conv

    rng = np.random.default_rng(0)
    for length, stride in ((4, 1), (4, 2), (2, 2), (1, 1), (5, 2)):
        w = rng.standard_normal((6, 3, 3)).astype(np.float32)  # (C_out, C_in, K)
        b = rng.standard_normal(6).astype(np.float32)
        x = rng.standard_normal((2, length, 3)).astype(np.float32)  # (N, L, C_in)
        dense, bias, l_out = dense_conv(w, b, length, stride)
        got = (x.reshape(2, -1) @ dense + bias).reshape(2, l_out, 6)
        xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))
        want = np.stack([np.einsum("nkc,ock->no", xp[:, lo * stride:lo * stride + 3], w) + b for lo in range(l_out)], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_shipped_graphs_are_what_the_builder_builds():
    pytest.importorskip("onnx")
    from models.vad_graph import build_graph, silero_weights

    for rate, weights in silero_weights().items():
        assert build_graph(weights).SerializeToString() == VAD_MODELS[rate].read_bytes(), \
            f"{VAD_MODELS[rate]} is stale: python -m models.vad_graph rebuilds it"


def test_bad_graph_paths_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.onnx"):
        SileroVad({16000: tmp_path / "nothing.onnx", 8000: VAD_MODELS[8000]})
    with pytest.raises(ValueError, match="silero_vad_16k_sequence.onnx: not a batched Silero VAD graph for 16000 Hz"):
        SileroVad({16000: DEFAULT_VAD_MODEL, 8000: VAD_MODELS[8000]})
    with pytest.raises(ValueError, match="rates"):
        SileroVad({16000: VAD_MODELS[16000]})
