"""Streaming audio: VAD carried across chunks (models.vad_stream) and chunk decoding (models.audio_stream)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile as sf

from models.audio import AudioError, resample
from models.audio_stream import ChunkDecoder
from models.vad import SileroVad, VadOptions, level_gain, speech_segments
from models.vad_stream import SegmentTracker, VadStream
from tests.conftest import REFERENCE

SR = 16000


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad()


def _talk(pause_s: float = 0.5) -> np.ndarray:
    """Reference utterances with silence before, between and after them (16 kHz)."""
    parts = [np.zeros(int(0.6 * SR), np.float32)]
    for name in ("flite-slt-1", "flite-awb-1", "espeak-en-1"):
        wave, _ = sf.read(REFERENCE / "audio" / f"{name}.wav", dtype="float32")
        parts += [wave, np.zeros(int(pause_s * SR), np.float32)]
    return np.concatenate(parts)


def _push_randomly(stream: VadStream, wave: np.ndarray, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    i = 0
    while i < wave.size:
        k = int(rng.integers(160, 12000))
        stream.push(wave[i:i + k])
        i += k
    stream.finish()


def _disagreement(a: list[tuple[int, int]], b: list[tuple[int, int]], n: int) -> float:
    """Samples on which two segmentations differ, as a share of the speech of ``a``."""
    ma, mb = np.zeros(n, bool), np.zeros(n, bool)
    for s, e in a:
        ma[s:e] = True
    for s, e in b:
        mb[s:e] = True
    return float((ma ^ mb).sum() / max(ma.sum(), 1))


@pytest.mark.parametrize("seed", range(40))
def test_tracker_gives_the_whole_file_segments_frame_by_frame(seed):
    """Segments before the horizon never change, and at the end they are speech_segments' exactly."""
    rng = np.random.default_rng(seed)
    n_frames = int(rng.integers(1, 400))
    runs = np.repeat(rng.random(n_frames // 8 + 1) > 0.5, 8)[:n_frames] * 0.9 + 0.05
    probs = np.where(rng.random(n_frames) < 0.8, runs, rng.random(n_frames)).astype(np.float32)
    opts = VadOptions(min_silence_ms=float(rng.choice([0, 20, 100, 300])), speech_pad_ms=float(rng.choice([0, 30, 100])),
                      min_speech_ms=float(rng.choice([0, 64, 250])))
    n = n_frames * 512 - int(rng.integers(0, 512))
    full = speech_segments(probs, n, opts)
    tracker, i, last = SegmentTracker(opts), 0, 0
    while i < n_frames:
        k = int(rng.integers(1, 30))
        tracker.push(probs[i:i + k])
        i += k
        h = tracker.horizon()
        assert h >= last  # the horizon never moves back
        last = h
        if i * 512 > n:  # (the last, partial frame only ever comes at the stream's end)
            continue
        h = min(h, n)
        clip = lambda segs: [(a, min(b, h)) for a, b in segs if a < h]  # noqa: E731
        assert clip(tracker.segments()) == clip(full)
        assert tracker.segments() == speech_segments(probs[:i], i * 512, opts)
    assert tracker.segments(n) == full


def test_stream_matches_whole_file_vad(vad):
    wave = _talk()
    whole, narrow = vad.analyse(wave, SR)
    stream = VadStream(vad, SR)
    _push_randomly(stream, wave)
    assert not narrow and stream.narrowband is False
    assert len(stream.segments()) == len(whole)
    assert _disagreement(whole, stream.segments(), wave.size) < 0.02
    probs = np.concatenate(stream.probs)
    centred = wave - wave.mean()
    ref = vad.probabilities(centred * np.float32(level_gain(centred)))  # what the whole-file VAD runs
    diff = np.abs(probs - ref)
    assert probs.shape == ref.shape and np.percentile(diff, 95) < 0.03 and diff.max() < 0.3


def test_stream_telephone_band_runs_the_8k_graph(vad):
    wave = resample(resample(_talk(), SR, 8000), 8000, SR)  # no energy above 4 kHz, with leading silence
    whole, narrow = vad.analyse(wave, SR)
    stream = VadStream(vad, SR)
    _push_randomly(stream, wave, seed=1)
    assert narrow and stream.narrowband is True
    assert _disagreement(whole, stream.segments(), wave.size) < 0.05


def test_wideband_with_leading_silence_is_not_called_narrowband(vad):
    wave = np.concatenate([np.zeros(SR, np.float32), _talk()])
    stream = VadStream(vad, SR)
    stream.push(wave[:int(1.2 * SR)])  # one second of silence is not enough to tell
    assert stream.narrowband is None and stream.segments() == []
    stream.push(wave[int(1.2 * SR):])
    stream.finish()
    assert stream.narrowband is False


def test_horizon_only_covers_final_segments(vad):
    wave = _talk()
    stream = VadStream(vad, SR)
    seen = []
    for i in range(0, wave.size, 4000):
        stream.push(wave[i:i + 4000])
        h = stream.horizon()
        seen.append((h, [(a, min(b, h)) for a, b in stream.segments() if a < h]))
    stream.finish()
    final = stream.segments()
    for h, segs in seen:
        assert segs == [(a, min(b, h)) for a, b in final if a < h]
    assert stream.horizon() == wave.size and stream.segments() == final
    with pytest.raises(RuntimeError):
        stream.push(wave[:10])


def test_stream_at_another_rate_maps_back(vad):
    wave = resample(_talk(), SR, 22050)
    stream = VadStream(vad, 22050)
    _push_randomly(stream, wave, seed=2)
    whole, _ = vad.analyse(wave, 22050)
    assert _disagreement(whole, stream.segments(), wave.size) < 0.02


# -- chunk decoding -------------------------------------------------------------------
@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_32", "FLOAT", "ULAW", "ALAW"])
@pytest.mark.parametrize("rate", [8000, 16000])
def test_wav_stream_split_anywhere_decodes_as_the_file(subtype, rate):
    x = _talk()[:3 * SR]
    x = resample(x, SR, rate) if rate != SR else x
    buf = io.BytesIO()
    sf.write(buf, np.stack([x, 0.5 * x], axis=1), rate, format="WAV", subtype=subtype)
    data = buf.getvalue()
    ref = sf.read(io.BytesIO(data), dtype="float32")[0].mean(axis=1)
    dec = ChunkDecoder("chunk", rate)
    rng = np.random.default_rng(0)
    out, i = [], 0
    while i < len(data):
        k = int(rng.integers(1, 900))
        out.append(dec.feed(data[i:i + k]))
        i += k
    out.append(dec.finish())
    got = np.concatenate(out)
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-6
    assert dec.seconds == pytest.approx(len(ref) / rate)


def test_raw_pcm_is_resampled_in_a_stream():
    x = _talk()[:2 * SR]
    x8 = resample(x, SR, 8000)
    data = (x8 * 32767).astype("<i2").tobytes()
    dec = ChunkDecoder("chunk", SR, ("PCM_S16LE", 8000, 1))
    got = np.concatenate([dec.feed(data[i:i + 801]) for i in range(0, len(data), 801)] + [dec.finish()])
    ref = resample((np.frombuffer(data, "<i2") / 32768.0).astype(np.float32), 8000, SR)
    assert abs(len(got) - len(ref)) <= 2
    n = min(len(got), len(ref))
    assert np.abs(got[100:n - 100] - ref[100:n - 100]).max() < 1e-3


@pytest.mark.parametrize("make,match", [
    (lambda: b"fLaC" + bytes(100), "not a WAV stream"),
    (lambda: b"RIFF\x00\x00\x00\x00WAVE" + b"data" + bytes(8), "data chunk before the fmt chunk"),
])
def test_undecodable_streams_name_the_field(make, match):
    with pytest.raises(AudioError, match=match) as e:
        ChunkDecoder("chunk", SR).feed(make())
    assert e.value.field == "chunk"


def test_24_bit_and_compressed_wav_are_refused():
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1000, np.float32), SR, format="WAV", subtype="PCM_24")
    with pytest.raises(AudioError, match="24-bit samples is not streamable"):
        ChunkDecoder("chunk", SR).feed(buf.getvalue())
    buf = io.BytesIO()
    sf.write(buf, np.zeros(1000, np.float32), SR, format="FLAC")
    with pytest.raises(AudioError, match="not a WAV stream"):
        ChunkDecoder("chunk", SR).feed(buf.getvalue())


def test_stream_limits_and_bad_samples():
    dec = ChunkDecoder("chunk", SR, ("PCM_S16LE", SR, 1), max_seconds=1.0)
    dec.feed(bytes(2 * SR))
    with pytest.raises(AudioError, match="longer than the maximum 1.0 s"):
        dec.feed(bytes(2 * 100))
    dec = ChunkDecoder("chunk", SR, ("PCM_F32LE", SR, 1))
    with pytest.raises(AudioError, match="non-finite"):
        dec.feed(np.array([0.0, np.nan], "<f4").tobytes())
    dec = ChunkDecoder("chunk", SR, ("PCM_S16LE", SR, 2))
    dec.feed(bytes(6))  # one frame and a half
    with pytest.raises(AudioError, match="2 bytes of an unfinished sample frame"):
        dec.finish()
    with pytest.raises(AudioError, match="carried no audio"):
        ChunkDecoder("chunk", SR).finish()
    with pytest.raises(AudioError, match="header was complete"):
        d = ChunkDecoder("chunk", SR)
        d.feed(b"RIFF")
        d.finish()
    with pytest.raises(AudioError, match="chunk.encoding"):
        ChunkDecoder("chunk", SR, ("PCM_U8", SR, 1))


def _sparse_telephone(words: int = 50) -> np.ndarray:
    """Short stretches of the reference voices (0.4-0.8 s) between pauses (0.6-1.4 s), through the simulated
    telephone channel (300-3400 Hz, 8 kHz mu-law): 8 kHz samples."""
    from tests.conftest import speech_clip
    from training.data.channels import apply_condition

    rng = np.random.default_rng(0)
    parts = []
    for i in range(words):
        word = speech_clip(float(rng.uniform(0.4, 0.8)), seed=i)
        parts += [word, np.zeros(int(rng.uniform(0.6, 1.4) * SR), np.float32)]
    x8, rate = apply_condition("telephone", np.concatenate(parts), np.random.default_rng(1))
    assert rate == 8000
    return x8


@pytest.mark.parametrize("rate", [16000, 8000])
def test_refresh_keeps_short_inputs_and_scores_each_block_from_a_warmed_fresh_state(rate):
    """Inputs up to one block are scored exactly as without the refresh; in longer ones every block's frames
    are what the network gives on that block alone, preceded by its warm-up audio."""
    frame = 512 if rate == SR else 256
    plain, fresh = SileroVad(refresh_s=None), SileroVad(refresh_s=2.048, warmup_s=0.512)
    block, warm = fresh.refresh_frames(rate)
    assert (block, warm) == (64, 16)
    wave = _talk() if rate == SR else resample(_talk(), SR, rate)
    short = wave[:block * frame]
    np.testing.assert_array_equal(fresh.probabilities_batch([short], rate)[0],
                                  plain.probabilities_batch([short], rate)[0])
    got = fresh.probabilities_batch([wave], rate)[0]
    assert got.shape == plain.probabilities_batch([wave], rate)[0].shape
    for first in range(block, got.size, block):
        alone = plain.probabilities_batch([wave[(first - warm) * frame:(first + block) * frame]], rate)[0][warm:]
        np.testing.assert_allclose(got[first:first + block], alone[:got.size - first], atol=1e-5, err_msg=str(first))


def test_stream_refreshes_as_the_whole_file_does():
    """Frames pushed in chunks of any size get the refreshed whole-input probabilities, at both rates."""
    from models.vad_stream import run_refreshing

    vad = SileroVad(refresh_s=1.0, warmup_s=0.3)
    rng = np.random.default_rng(5)
    for rate, frame in ((16000, 512), (8000, 256)):
        wave = _talk() if rate == SR else _sparse_telephone(10)
        want = vad.probabilities_batch([wave], rate)[0]
        frames = np.zeros((want.size, frame), np.float32)
        frames.reshape(-1)[:wave.size] = wave
        got, state, i = [], None, 0
        while i < want.size:
            k = int(rng.integers(1, 50))
            probs, state = run_refreshing(vad, frames[i:i + k], rate, state)
            got.append(probs)
            i += k
        np.testing.assert_allclose(np.concatenate(got), want, atol=1e-5, err_msg=str(rate))


def test_refresh_keeps_sparse_telephone_speech_that_the_carried_state_loses():
    """Silero's state carried over a long recording of short words and long pauses drifts until it scores
    speech as silence (its 8 kHz network on telephone speech worst); the refresh keeps finding it."""
    x8 = _sparse_telephone()  # 83 s, 50 words
    (plain, narrow), (fresh, _) = SileroVad(refresh_s=None).analyse(x8, 8000), SileroVad().analyse(x8, 8000)
    late = lambda segs: sum(b - max(a, 20 * 8000) for a, b in segs if b > 20 * 8000) / 8000  # noqa: E731
    assert narrow
    assert len(fresh) >= len(plain) + 4, (len(fresh), len(plain))  # words found (one segment each; 47 vs 41)
    assert late(fresh) > 1.3 * late(plain), (late(fresh), late(plain))  # seconds of speech found after 20 s
