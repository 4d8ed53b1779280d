"""Diarization: the clustering steps (models.diarization), Diarize / DiarizeStream over gRPC, the CLI."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import grpc
import numpy as np
import pytest
import soundfile as sf

from models.diarization import (
    DiarizationOptions,
    Turn,
    centered,
    cluster,
    diarization_speech_vad,
    diarization_vad,
    diarize_embedded,
    speech_windows,
    to_rttm,
)
from models.diarization_hmm import sticky_hmm
from models.vad_rules import VadOptions
from service._proto.spkserve.v1 import speaker_pb2 as pb
from tests.conftest import REFERENCE, ServerThread, make_config, wav_bytes

SR = 16000


# -- pure steps ---------------------------------------------------------------------------
def _blobs(sizes: list[int], dim: int = 32, spread: float = 0.15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) unit vectors in len(sizes) tight groups around unrelated (orthogonal) directions, and their (N,)
    group."""
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:len(sizes)]
    rows, truth = [], []
    for g, n in enumerate(sizes):
        rows.append(centres[g] + spread * np.linalg.norm(centres[g]) * rng.standard_normal((n, dim)) / np.sqrt(dim))
        truth += [g] * n
    x = np.concatenate(rows)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array(truth)


def _agrees(labels: np.ndarray, truth: np.ndarray) -> float:
    """Share of items whose label is their group's most common label."""
    hits = sum(np.bincount(labels[truth == g]).max() for g in np.unique(truth))
    return hits / len(truth)


@pytest.mark.parametrize("sizes", [[40, 40], [30, 50, 20], [25, 25, 25, 25]])
def test_cluster_finds_the_number_of_speakers(sizes):
    emb, truth = _blobs(sizes)
    labels, k = cluster(emb, np.full(len(emb), 1.0), DiarizationOptions())
    assert k == len(sizes)
    assert _agrees(labels, truth) > 0.95


def test_cluster_one_speaker_stays_one():
    """Centring a one-speaker recording leaves noise; the raw voiceprints keep it one speaker."""
    emb, _ = _blobs([120], spread=0.2)
    labels, k = cluster(emb, np.full(len(emb), 1.0), DiarizationOptions())
    assert k == 1 and set(labels.tolist()) == {0}


def test_cluster_given_number_and_bounds():
    emb, _ = _blobs([40, 40, 40])
    assert cluster(emb, np.ones(len(emb)), DiarizationOptions(num_speakers=2))[1] == 2
    assert cluster(emb, np.ones(len(emb)), DiarizationOptions(max_speakers=2))[1] == 2
    assert cluster(emb, np.ones(len(emb)), DiarizationOptions(min_speakers=4))[1] == 4


def test_cluster_long_recordings_group_windows():
    """Past MAX_TREE_ITEMS windows the tree is built on every r-th window and the rest join its clusters
    (bounded memory), still right."""
    from models import diarization

    emb, truth = _blobs([1500, 1700], dim=16)
    order = np.argsort(np.random.default_rng(1).permutation(len(emb)) // 50, kind="stable")  # turns of 50 windows
    labels, k = cluster(emb[order], np.ones(len(emb)), DiarizationOptions())
    assert len(emb) > diarization.MAX_TREE_ITEMS and k == 2
    assert _agrees(labels, truth[order]) > 0.95


def test_repeated_audio_counts_once_in_the_eigengaps_graph():
    """Windows of a clip played again (near-copies) are one item of the graph; distinct windows all stay."""
    from models.diarization import MAX_GRAPH_ITEMS, graph_items

    emb, _ = _blobs([30, 30], dim=64, spread=0.5)
    repeated = np.tile(emb, (8, 1)) + 1e-4 * np.random.default_rng(2).standard_normal((480, 64)).astype(np.float32)
    repeated /= np.linalg.norm(repeated, axis=1, keepdims=True)
    assert len(graph_items(emb)) == 60 and len(graph_items(repeated)) == 60
    many, _ = _blobs([3000, 3000], dim=64, spread=0.5)
    assert len(graph_items(many)) <= MAX_GRAPH_ITEMS


@pytest.mark.parametrize("field,kw", [("num_speakers", dict(num_speakers=0)), ("num_speakers", dict(num_speakers=65)),
                                      ("min_speakers", dict(min_speakers=5, max_speakers=3)),
                                      ("max_speakers", dict(max_speakers=70))])
def test_options_name_the_bad_field(field, kw):
    with pytest.raises(ValueError, match=field):
        DiarizationOptions(**kw).validate()


def test_windows_turns_and_rttm():
    opts = DiarizationOptions()
    wins = speech_windows([(0, 5 * SR), (6 * SR, 6 * SR + 4000)], SR, opts)
    assert wins[0] == (0, SR) and wins[-1] == (6 * SR, 6 * SR + 4000)
    assert max(b for _, b in wins[:-1]) == 5 * SR  # the region's end is covered
    # two speakers: windows of the first 5 s say A, the short region says B
    emb = np.array([[1.0, 0.0]] * (len(wins) - 1) + [[0.0, 1.0]], np.float32)
    turns, k = diarize_embedded(wins, emb, SR, DiarizationOptions(num_speakers=2))
    assert k == 2 and [t.speaker for t in turns] == [0, 1]
    assert turns[0].start == 0.0 and abs(turns[0].end - 5.0) < 0.02 and abs(turns[1].start - 6.0) < 0.02
    ragged = [(0, SR), (SR // 2, 3 * SR // 2 + 37)]  # speech up to 37 samples past a 10 ms frame
    turns, _ = diarize_embedded(ragged, np.array([[1.0, 0.0]] * 2, np.float32), SR, DiarizationOptions())
    assert turns[-1].end == (3 * SR // 2 + 37) / SR  # not rounded up to the frame, past the end of the audio
    rttm = to_rttm([Turn(1.0, 2.5, 1)], ["SPEAKER_00", "alice"], "call-7")
    assert rttm == "SPEAKER call-7 1 1.000 1.500 <NA> <NA> alice <NA> <NA>\n"


@pytest.mark.parametrize("n, opts", [(2, {}), (3, {}), (60, {}), (60, {"num_speakers": 2})])
def test_identical_windows_are_one_speaker_not_an_error(n, opts):
    """Audio that repeats exactly gives windows equal to their mean: zero once centred (scipy's cosine is NaN there)."""
    emb = np.tile(np.array([[0.6, 0.8]], np.float32), (n, 1))  # (n, 2)
    wins = [(i * SR // 2, i * SR // 2 + SR) for i in range(n)]
    turns, k = diarize_embedded(wins, emb, SR, DiarizationOptions(**opts))
    assert k == 1 and [(t.start, t.end, t.speaker) for t in turns] == [(0.0, wins[-1][1] / SR, 0)]
    if n >= 60:  # two voices, each repeated exactly (long enough to count as speakers): still two
        mixed = np.concatenate([emb[:n // 2], np.tile([[0.8, -0.6]], (n // 2, 1))]).astype(np.float32)
        assert diarize_embedded(wins, mixed, SR, DiarizationOptions(**opts))[1] == 2


def test_generous_speech_extends_turns_with_the_closest_label():
    """Speech the generous VAD finds outside every window takes the closest window's speaker, up to fill_s away."""
    opts = DiarizationOptions(num_speakers=2)
    wins = speech_windows([(SR, 5 * SR), (6 * SR, 10 * SR)], SR, opts)
    emb = np.array([[1.0, 0.0] if a < 5.5 * SR else [0.0, 1.0] for a, _ in wins], np.float32)
    plain, _ = diarize_embedded(wins, emb, SR, opts)
    assert [(t.speaker, round(t.start, 2), round(t.end, 2)) for t in plain] == [(0, 1.0, 5.0), (1, 6.0, 10.0)]
    # a soft onset 0.4 s early, the 1 s pause between the two voices, a trailing 0.5 s, and speech 3 s away
    speech = [(int(0.6 * SR), 10 * SR + SR // 2), (13 * SR, 14 * SR)]
    turns, k = diarize_embedded(wins, emb, SR, opts, speech)
    assert k == 2 and [t.speaker for t in turns] == [0, 1]
    assert turns[0].start == pytest.approx(0.6, abs=0.011) and turns[1].end == pytest.approx(10.5, abs=0.011)
    assert turns[0].end == pytest.approx(5.5, abs=0.011) and turns[1].start == pytest.approx(5.5, abs=0.011)
    assert max(t.end for t in turns) < 11  # 13-14 s is more than fill_s (1 s) from any window: not labelled
    far, _ = diarize_embedded(wins, emb, SR, replace(opts, fill_s=4.0), speech)
    assert far[-1].speaker == 1 and far[-1].end == pytest.approx(14.0, abs=0.011)
    none, _ = diarize_embedded(wins, emb, SR, replace(opts, fill_s=0.0), speech)
    assert [(t.start, t.end) for t in none] == [(t.start, t.end) for t in plain]


def test_speech_vad_is_more_generous_than_the_windows_vad():
    """Lower thresholds, wider padding, longer pauses kept: never less permissive than the model's own rules."""
    base = VadOptions(threshold=0.5, narrowband_threshold=0.4, speech_pad_ms=30, min_silence_ms=100)
    windows, speech = diarization_vad(base), diarization_speech_vad(base)
    assert windows.speech_pad_ms == 100 and windows.threshold == 0.5
    assert (speech.threshold, speech.narrowband_threshold, speech.speech_pad_ms, speech.min_silence_ms) == \
        (0.35, 0.35, 200, 300)
    loose = VadOptions(threshold=0.2, narrowband_threshold=0.2, speech_pad_ms=400, min_silence_ms=500)
    assert diarization_speech_vad(loose) == loose  # a model whose own rules are looser keeps them
    with pytest.raises(ValueError, match="fill_s"):
        DiarizationOptions(fill_s=-1).validate()


def _between(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The unit vector a share ``t`` of the way from unit ``a`` to unit ``b``."""
    v = (1 - t) * a + t * b
    return v / np.linalg.norm(v)


def test_sticky_hmm_keeps_a_turn_together_and_lets_it_change_at_a_pause():
    """Two windows a little closer to B inside A's unbroken speech stay A; the same two windows between pauses
    (a short reply) become B; a plain closest-voiceprint rule would make them B in both cases."""
    a, b = np.eye(16)[0], np.eye(16)[1]
    x = np.array([a] * 10 + [_between(a, b, 0.7)] * 2 + [a] * 10 + [b] * 12)  # (34, 16)
    labels = np.array([0] * 22 + [1] * 12)  # the clustering's: the two windows went with A
    assert (x[10:12] @ np.array([a, b]).T).argmax(axis=1).tolist() == [1, 1]
    no_pause = np.zeros(len(x), bool)
    no_pause[22] = True  # only before B's own turn
    out, post = sticky_hmm(x, no_pause, labels, 2, kappa=5.0, switch=0.05, pause_switch=0.5, iters=3)
    assert out.tolist() == labels.tolist()
    assert post.shape == (34, 2) and np.allclose(post.sum(axis=1), 1)
    assert post[10, 0] < post[0, 0]  # kept in A's turn, but less surely than A's clear windows
    pauses = no_pause.copy()
    pauses[[10, 12]] = True  # the two windows are a stretch of speech of their own
    out = sticky_hmm(x, pauses, labels, 2, kappa=5.0, switch=0.05, pause_switch=0.5, iters=3)[0]
    assert out[10:12].tolist() == [1, 1] and out[:10].tolist() == [0] * 10 and out[12:22].tolist() == [0] * 10
    one = sticky_hmm(x, pauses, np.zeros(len(x), np.int64), 1, kappa=5.0, switch=0.05, pause_switch=0.5, iters=3)[0]
    assert not one.any()  # one speaker: nothing to refine


def test_the_hmm_refines_diarization_and_a_given_number_survives_it():
    """Through diarize_embedded: a stray window inside a turn no longer breaks it; with the number of speakers given,
    a speaker the HMM would absorb keeps their own short, separate stretch."""
    rng = np.random.default_rng(3)
    dirs = np.linalg.qr(rng.standard_normal((16, 16)))[0][:3]  # (3, 16) A, B, C
    opts = DiarizationOptions()
    # A speaks 0-6 s, B 7-13 s; one of A's windows (2-3 s) is mostly something else, a little nearer B than A
    wins = speech_windows([(0, 6 * SR), (7 * SR, 13 * SR)], SR, opts)
    emb = np.array([dirs[0] if a < 6.5 * SR else dirs[1] for a, _ in wins])
    stray = [i for i, (a, _) in enumerate(wins) if a == 2 * SR][0]
    emb[stray] = _between(_between(dirs[0], dirs[1], 0.6), dirs[2], 0.5)
    emb = (emb + 0.05 * rng.standard_normal(emb.shape)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    labels = np.array([0 if a < 6.5 * SR else 1 for a, _ in wins])
    labels[stray] = 1  # as a clustering that took the stray window for B would say
    x = centered(emb)
    pause = np.array([False] + [wins[i][0] > wins[i - 1][1] for i in range(1, len(wins))])
    hmm, post = sticky_hmm(x, pause, labels, 2, 5.0, 0.05, 0.5, 3)
    assert hmm[stray] == 0
    turns, k = diarize_embedded(wins, emb, SR, replace(opts, num_speakers=2))
    assert k == 2 and [(t.speaker, round(t.start), round(t.end)) for t in turns] == [(0, 0, 6), (1, 7, 13)]
    # a turn's confidence is the mean posterior of its windows' label
    assert turns[0].confidence == pytest.approx(float(post[turns[0].windows, 0].mean()), abs=1e-6)
    assert turns[0].confidence < turns[1].confidence  # A's turn holds the stray window
    # C says one word (1 s alone, between pauses), sounding somewhat like A: asked for three speakers, C stays
    wins3 = wins + [(15 * SR, 16 * SR)]
    emb3 = np.vstack([emb, _between(dirs[2], dirs[0], 0.45)[None].astype(np.float32)])
    three = replace(opts, num_speakers=3)
    labels3 = cluster(emb3, np.ones(len(wins3)), three)[0]
    pause3 = np.append(pause, True)
    assert len(np.unique(sticky_hmm(centered(emb3), pause3, labels3, 3, 5.0, 0.05, 0.5, 3)[0])) == 2  # absorbed
    turns, k = diarize_embedded(wins3, emb3, SR, three)
    assert k == 3 and turns[-1].speaker not in {t.speaker for t in turns[:-1]} and round(turns[-1].start) == 15
    with pytest.raises(ValueError, match="hmm_switch"):
        replace(opts, hmm_switch=1.0).validate()
    with pytest.raises(ValueError, match="hmm_kappa"):
        replace(opts, hmm_kappa=-1).validate()
    with pytest.raises(ValueError, match="hmm_iters"):
        replace(opts, hmm_iters=0).validate()


def test_no_windows_no_turns():
    turns, k = diarize_embedded([], np.zeros((0, 8), np.float32), SR, DiarizationOptions())
    assert turns == [] and k == 0


# -- over gRPC ----------------------------------------------------------------------------
def _voice(name: str) -> np.ndarray:
    wave, sr = sf.read(REFERENCE / "audio" / f"{name}.wav", dtype="float32")
    assert sr == SR
    return wave


def conversation(names: list[str], turns: int, pause: float = 0.6, seed: int = 0) -> tuple[np.ndarray, list]:
    """Turns of the reference voices ``names`` in rotation with pauses: (16 kHz wave, [(start, end, name)])."""
    rng = np.random.default_rng(seed)
    parts, ref, t = [np.zeros(int(0.5 * SR), np.float32)], [], 0.5
    for i in range(turns):
        name = names[i % len(names)]
        x = _voice(name)
        parts += [x, np.zeros(int(pause * SR), np.float32)]
        ref.append((t, t + len(x) / SR, name))
        t += len(x) / SR + pause
    wave = np.concatenate(parts)
    return wave + np.float32(0.002) * rng.standard_normal(len(wave)).astype(np.float32), ref


def frame_error(ref: list, segments) -> float:
    """Share of reference speech (10 ms frames) given to the wrong speaker or missed, best label mapping."""
    n = int(max(e for _, e, _ in ref) * 100) + 1
    names = sorted({r[2] for r in ref})
    truth = np.full(n, -1)
    for a, b, name in ref:
        truth[int(a * 100):int(b * 100)] = names.index(name)
    labels = sorted({s.speaker_label for s in segments})
    hyp = np.full(n, -1)
    for s in segments:
        hyp[int(s.start_seconds * 100):int(s.end_seconds * 100)] = labels.index(s.speaker_label)
    speech = truth >= 0
    best = 0
    from itertools import permutations
    for perm in permutations(range(max(len(labels), len(names))), len(names)):
        best = max(best, sum(int(((truth == g) & (hyp == perm[g])).sum()) for g in range(len(names))))
    return 1 - best / speech.sum()


@pytest.fixture(scope="module")
def two_voices():
    return conversation(["flite-slt-1", "flite-awb-1"], 12)


def test_diarize_two_speakers(stub, two_voices):
    wave, ref = two_voices
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(wave)),
                                       options=pb.DiarizationOptions(include_embeddings=True)), timeout=60)
    assert [s.speaker_label for s in r.speakers] == ["SPEAKER_00", "SPEAKER_01"]
    assert r.segments[0].speaker_label == "SPEAKER_00"
    assert frame_error(ref, r.segments) < 0.15
    assert all(len(s.embedding) == 256 and abs(np.linalg.norm(s.embedding) - 1) < 1e-3 for s in r.speakers)
    assert abs(sum(s.speech_seconds for s in r.speakers) - sum(s.end_seconds - s.start_seconds for s in r.segments)) < 1e-6
    starts = [s.start_seconds for s in r.segments]
    assert starts == sorted(starts) and all(0.5 <= s.confidence <= 1 for s in r.segments)
    assert r.model == "ge2e" and r.speech.speech_seconds > 0 and abs(r.speech.audio_seconds - len(wave) / SR) < 0.01


def test_diarize_turns_reach_the_generous_vads_speech(server, stub, two_voices):
    """The response's speech is the generous rules' segments; turns reach into them beyond the embedded windows."""
    from models.vad import SileroVad

    wave, _ = two_voices
    policy_vad = server.server.engine.policies["ge2e"].vad
    strict, generous = SileroVad().analyse_many(wave, SR, [diarization_vad(policy_vad),
                                                          diarization_speech_vad(policy_vad)])[0]
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(wave))), timeout=60)
    assert [(round(s.start_seconds * SR), round(s.end_seconds * SR)) for s in r.speech.segments] == generous
    assert r.speech.speech_seconds == pytest.approx(sum(b - a for a, b in generous) / SR, abs=1e-3)
    covered = sum(s.end_seconds - s.start_seconds for s in r.segments)
    assert covered > sum(b - a for a, b in strict) / SR + 1.0  # 12 turns: onsets, endings and pauses kept
    assert r.segments[0].start_seconds <= generous[0][0] / SR + 0.011


def test_diarize_one_speaker_one_label(stub):
    wave, _ = conversation(["flite-rms-1"], 8)
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(wave))), timeout=60)
    assert {s.speaker_label for s in r.segments} == {"SPEAKER_00"} and len(r.speakers) == 1
    cut = wave[:int(3.2 * SR) + 37]  # a recording that stops mid-word, off the 10 ms frame grid
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(cut))), timeout=60)
    assert r.segments and r.segments[-1].end_seconds <= r.speech.audio_seconds == len(cut) / SR


def test_diarize_silence_is_no_error(stub):
    rng = np.random.default_rng(0)
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(0.001 * rng.standard_normal(10 * SR)))),
                     timeout=60)
    assert len(r.segments) == 0 and len(r.speakers) == 0
    assert r.speech.speech_seconds == 0 and abs(r.speech.audio_seconds - 10) < 0.01


def test_diarize_stream_equals_unary_and_pcm(stub, two_voices):
    wave, _ = two_voices
    data = wav_bytes(wave)
    unary = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=data)), timeout=60)

    def chunks():
        yield pb.DiarizeStreamRequest(config=pb.DiarizeStreamConfig())
        for i in range(0, len(data), 7777):
            yield pb.DiarizeStreamRequest(chunk=data[i:i + 7777])

    streamed = stub.DiarizeStream(chunks(), timeout=60)
    assert [(s.start_seconds, s.end_seconds, s.speaker_label) for s in streamed.segments] == \
           [(s.start_seconds, s.end_seconds, s.speaker_label) for s in unary.segments]
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(pcm=pb.RawPcm(data=pcm, format=pb.PcmFormat(
        encoding=pb.PCM_S16LE, sample_rate=SR, channels=1)))), timeout=60)
    assert len(r.speakers) == 2


def test_diarize_telephone_band(stub):
    """An 8 kHz mu-law copy of the conversation still gives two speakers."""
    import soxr

    wave, ref = conversation(["flite-slt-1", "flite-awb-1"], 10, seed=3)
    narrow = soxr.resample(wave, SR, 8000).astype(np.float32)
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(narrow, 8000, subtype="ULAW"))), timeout=60)
    assert len(r.speakers) == 2 and r.speech.narrowband
    assert frame_error(ref, r.segments) < 0.25


@pytest.mark.parametrize("options,field", [
    (dict(num_speakers=65), "options.num_speakers"), (dict(num_speakers=-1), "options.num_speakers"),
    (dict(min_speakers=4, max_speakers=2), "options.min_speakers"), (dict(max_speakers=100), "options.max_speakers"),
    (dict(num_speakers=2, max_speakers=3), "options.num_speakers"), (dict(collection="bad name!"), "collection")])
def test_diarize_bad_options(stub, two_voices, options, field):
    with pytest.raises(grpc.RpcError) as e:
        stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(two_voices[0][:SR])),
                                       options=pb.DiarizationOptions(**options)), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in e.value.details()


def test_diarize_bad_audio_and_unknown_collection(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=b"RIFF....WAVEfmt not audio")), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "audio.encoded" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Diarize(pb.DiarizeRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "audio" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(np.zeros(SR, np.float32))),
                                       options=pb.DiarizationOptions(collection="never-made")), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_diarize_labels_enrolled_speakers(stub, two_voices):
    """With a collection, the enrolled speaker's cluster takes its id; the stranger keeps SPEAKER_nn."""
    stub.Enroll(pb.EnrollRequest(collection="diar-test", speaker_id="alice",
                                 audio=[pb.Audio(encoded=wav_bytes(_voice("flite-slt-2")))]), timeout=60)
    stub.Enroll(pb.EnrollRequest(collection="diar-test", speaker_id="bob",
                                 audio=[pb.Audio(encoded=wav_bytes(_voice("flite-kal-1")))]), timeout=60)
    r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(two_voices[0])),
                                       options=pb.DiarizationOptions(collection="diar-test")), timeout=60)
    labels = {s.speaker_label: s for s in r.speakers}
    assert "alice" in labels and labels["alice"].speaker_id == "alice" and labels["alice"].HasField("llr")
    assert labels["alice"].llr >= r.match_threshold
    others = [s for s in r.speakers if s.speaker_label != "alice"]
    assert len(others) == 1 and others[0].speaker_label.startswith("SPEAKER_") and others[0].speaker_id == ""
    assert {s.speaker_label for s in r.segments} == set(labels)


def test_diarize_metrics(server, stub, two_voices):
    import urllib.request

    stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(two_voices[0]))), timeout=60)
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    assert 'spkserve_diarization_audio_seconds_total{model="ge2e"}' in text
    assert 'spkserve_diarization_speakers_bucket{le="2.0",model="ge2e"}' in text
    assert 'spkserve_grpc_requests_total{code="OK",method="Diarize"}' in text


def test_diarize_limits_and_deadline(model_repo, tmp_path, two_voices):
    """Past max_diarize_audio_seconds: INVALID_ARGUMENT naming the field; a deadline shorter than the work:
    refused (RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED), not run to the end."""
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], max_diarize_audio_seconds=10))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SpeakerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as e:
                stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(two_voices[0]))), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "audio.encoded" in e.value.details() and "10" in e.value.details()
            long = np.tile(two_voices[0], 8)

            def chunks():
                yield pb.DiarizeStreamRequest(config=pb.DiarizeStreamConfig())
                yield pb.DiarizeStreamRequest(chunk=wav_bytes(long))

            with pytest.raises(grpc.RpcError) as e:
                stub.DiarizeStream(chunks(), timeout=0.3)
            assert e.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED)
            r = stub.DiarizeStream(chunks(), timeout=120)  # the stream's own limit is max_stream_audio_seconds
            assert abs(r.speech.audio_seconds - len(long) / SR) < 0.05 and len(r.speakers) >= 2
            # (8 copies of one 30 s recording: the eigengap may split a voice by position in its one repeated
            # clip; counts on real conversations are measured by training.evaluation.diarization_eval)
    finally:
        srv.stop()


def test_cli_diarize_rttm_and_json(server, two_voices, tmp_path):
    path = tmp_path / "call-42.wav"
    sf.write(path, two_voices[0], SR)
    base = [sys.executable, "-m", "service.cli", "diarize", "--target", server.target]
    out = subprocess.run(base + [str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all(line.split()[:3] == ["SPEAKER", "call-42", "1"] and line.split()[5:7] == ["<NA>", "<NA>"]
                         and line.split()[8:] == ["<NA>", "<NA>"] for line in lines)
    assert {line.split()[7] for line in lines} == {"SPEAKER_00", "SPEAKER_01"}
    out = subprocess.run(base + ["--format", "json", "--num-speakers", "2", str(path)], capture_output=True, text=True,
                         timeout=120)
    import json
    obj = json.loads(out.stdout)
    assert obj["file"] == str(path) and len(obj["speakers"]) == 2 and obj["segments"][0]["speaker"] == "SPEAKER_00"
    bad = subprocess.run(base + ["--min-speakers", "5", "--max-speakers", "2", str(path)], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "min_speakers" in bad.stderr
    both = subprocess.run(base + ["--num-speakers", "2", "--min-speakers", "1", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert both.returncode == 2 and "not allowed with" in both.stderr
    for flag in ("--num-speakers", "--min-speakers", "--max-speakers"):  # 0 would reach the API as "not given"
        zero = subprocess.run(base + [flag, "0", str(path)], capture_output=True, text=True, timeout=120)
        assert zero.returncode == 1 and f"{flag} must be at least 1, got 0" in zero.stderr and not zero.stdout


def test_diarize_own_windows_are_not_queueing(model_repo, tmp_path, two_voices):
    """A recording's windows wait behind each other in the batcher; on an idle server that is the request's own
    work, not queueing: a max_queue_wait far below it does not refuse the call."""
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], max_queue_wait_ms=5))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pb_grpc.SpeakerServiceStub(ch)
            for _ in range(3):  # measured throughput first: the estimate needs it
                stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(two_voices[0][:3 * SR]))), timeout=30)
            r = stub.Diarize(pb.DiarizeRequest(audio=pb.Audio(encoded=wav_bytes(np.tile(two_voices[0], 2)))),
                             timeout=60)
            assert len(r.speakers) == 2 and r.timings.queue_ms > 5
    finally:
        srv.stop()


def test_one_enrolled_id_labels_one_speaker():
    from service.decisions import Threshold, open_set_threshold
    from service.servicer_diarize import one_id_each

    assert one_id_each([("alice", 3.0), None, ("alice", 5.0), ("bob", 2.0)]) == ["", "", "alice", "bob"]
    assert one_id_each([("alice", 3.0), ("alice", 3.0)]) == ["alice", ""]
    assert one_id_each([]) == []
    assert open_set_threshold(Threshold("llr", 2.0), 100).value == pytest.approx(2.0 + np.log(100))
    assert open_set_threshold(Threshold("llr", 2.0), 1).value == 2.0
    assert open_set_threshold(Threshold("cosine", 0.7), 100).value == 0.7
