"""Decisions on real-world audio, through a real server with the shipped defaults: VAD, net-speech
rules, verdicts, score scales, enrollment feedback and their metrics."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
import soundfile as sf

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config, wav_bytes

SR = 16000


@pytest.fixture(scope="module")
def srv(model_repo, tmp_path_factory):
    # the shipped defaults: VAD on, 1 s of speech per probe, 3 s per enrolled speaker
    s = ServerThread(make_config(model_repo, tmp_path_factory.mktemp("data"), min_enroll_speech_seconds=3.0,
                                 model_settings={"tiny-nolen": {"vad": False}}))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield pb_grpc.SpeakerServiceStub(ch)


def wave(speech_files, name: str) -> np.ndarray:
    return sf.read(speech_files[name], dtype="float32")[0]


def audio(x: np.ndarray, sr: int = SR) -> pb.Probe:
    return pb.Probe(audio=pb.Audio(encoded=wav_bytes(x, sr)))


def noise_signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SR) / SR
    spec = np.fft.rfft(rng.standard_normal(t.size))
    pink = np.fft.irfft(spec / np.sqrt(np.maximum(np.arange(spec.size), 1)), t.size)
    return {k: v.astype(np.float32) for k, v in {
        "silence": np.zeros(t.size), "silence2": np.zeros(2 * SR), "white": 0.2 * rng.standard_normal(t.size),
        "pink": 0.3 * pink / np.abs(pink).max(), "tone": 0.5 * np.sin(2 * np.pi * 440 * t),
        "dc": np.full(t.size, 0.3), "clipping": np.clip(5 * np.sin(2 * np.pi * 120 * t), -1, 1),
    }.items()}


def test_silence_noise_and_tones_never_verify(stub, speech_files):
    sigs = noise_signals()
    speech = wave(speech_files, "flite-rms-1")
    pairs = [("silence", "silence2"), ("white", "pink"), ("tone", "tone"), ("dc", "dc"), ("clipping", "clipping")]
    for a, b in pairs:
        r = stub.Verify(pb.VerifyRequest(a=audio(sigs[a]), b=audio(sigs[b])))
        assert r.verdict == pb.VERDICT_NOT_ENOUGH_SPEECH and not r.decision, (a, b)
        assert "a.audio: no speech found" in r.reason and r.a_speech.speech_seconds == 0
    for name, x in sigs.items():
        r = stub.Verify(pb.VerifyRequest(a=audio(x), b=audio(speech)))
        assert r.verdict == pb.VERDICT_NOT_ENOUGH_SPEECH and not r.decision, name
        assert r.b_speech.speech_seconds > 1


def test_padded_paused_and_noisy_copies_still_verify(stub, speech_files):
    rng = np.random.default_rng(1)
    for name in ("flite-slt-1", "flite-awb-1", "flite-rms-1", "espeak-en-1"):
        x = wave(speech_files, name)
        z = np.zeros(3 * SR, np.float32)
        low = lambda n: (0.003 * rng.standard_normal(n)).astype(np.float32)  # noqa: E731
        copies = {
            "silence": np.concatenate([z, x, z]),
            "low_noise": np.concatenate([low(3 * SR), x + low(len(x)), low(3 * SR)]),
            "pause": np.concatenate([x[: len(x) // 2], np.zeros(2 * SR, np.float32), x[len(x) // 2:]]),
        }
        for kind, y in copies.items():
            r = stub.Verify(pb.VerifyRequest(a=audio(x), b=audio(y)))
            assert r.verdict == pb.VERDICT_ACCEPT and r.decision, (name, kind, r.score, r.llr)
            assert r.score > 0.95, (name, kind, r.score)
            assert abs(r.b_speech.speech_seconds - r.a_speech.speech_seconds) < 0.35
        # and as 8 kHz telephone audio (resampled band) against the wideband original
        from models.audio import resample

        r = stub.Verify(pb.VerifyRequest(a=audio(x), b=audio(resample(x, SR, 8000), 8000)))
        assert r.verdict == pb.VERDICT_ACCEPT, (name, "8 kHz", r.score, r.llr)


def test_verify_reports_every_scale_and_decides_on_the_operating_point(stub, speech_files):
    a, b, other = (audio(wave(speech_files, n)) for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    info = stub.GetModelInfo(pb.GetModelInfoRequest(name="ge2e"))
    assert info.calibrated and info.cohort_size > 100 and info.decision_scale == pb.SCORE_SCALE_LLR and info.vad
    assert info.min_probe_speech_seconds == 1.0 and info.min_enroll_speech_seconds == 3.0
    same = stub.Verify(pb.VerifyRequest(a=a, b=b))
    diff = stub.Verify(pb.VerifyRequest(a=a, b=other))
    for r in (same, diff):
        assert r.HasField("llr") and r.HasField("normalized_score")
        assert r.decision_scale == pb.SCORE_SCALE_LLR and r.decision_threshold == pytest.approx(info.decision_threshold)
        assert r.decision == (r.llr >= r.decision_threshold) == (r.score >= r.threshold)
    assert same.verdict == pb.VERDICT_ACCEPT and diff.verdict == pb.VERDICT_REJECT
    assert same.llr > diff.llr and same.normalized_score > diff.normalized_score
    # a threshold on each scale, said which
    for scale, field in ((pb.SCORE_SCALE_COSINE, "score"), (pb.SCORE_SCALE_NORMALIZED, "normalized_score"),
                         (pb.SCORE_SCALE_LLR, "llr")):
        value = getattr(same, field)
        hi = stub.Verify(pb.VerifyRequest(a=a, b=b, threshold=value + 0.01, threshold_scale=scale))
        lo = stub.Verify(pb.VerifyRequest(a=a, b=b, threshold=value - 0.01, threshold_scale=scale))
        assert not hi.decision and hi.verdict == pb.VERDICT_REJECT and lo.decision, scale
        assert hi.decision_scale == scale and hi.decision_threshold == pytest.approx(value + 0.01, abs=1e-5)
    # no scale means cosine, as `threshold` always meant
    legacy = stub.Verify(pb.VerifyRequest(a=a, b=b, threshold=0.5))
    assert legacy.decision_scale == pb.SCORE_SCALE_COSINE and legacy.threshold == pytest.approx(0.5)


def expect(fn, code, *words):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w in e.value.details(), e.value.details()


def test_bad_thresholds_name_the_field(stub, speech_files):
    a = audio(wave(speech_files, "flite-slt-1"))
    bad = [(dict(threshold=1.5), grpc.StatusCode.INVALID_ARGUMENT, ["threshold", "outside the cosine scale"]),
           (dict(threshold=2000.0, threshold_scale=pb.SCORE_SCALE_LLR), grpc.StatusCode.INVALID_ARGUMENT,
            ["threshold", "llr scale"]),
           (dict(threshold=float("nan"), threshold_scale=pb.SCORE_SCALE_NORMALIZED), grpc.StatusCode.INVALID_ARGUMENT,
            ["threshold"]),
           (dict(threshold_scale=pb.SCORE_SCALE_LLR), grpc.StatusCode.INVALID_ARGUMENT, ["threshold_scale", "is set but"]),
           (dict(threshold=0.0, threshold_scale=7), grpc.StatusCode.INVALID_ARGUMENT, ["threshold_scale", "unknown"]),
           (dict(model="tiny-wavlm", threshold=0.0, threshold_scale=pb.SCORE_SCALE_LLR), grpc.StatusCode.FAILED_PRECONDITION,
            ["threshold_scale", "tiny-wavlm", "no 'llr' scale"])]
    for kw, code, words in bad:
        expect(lambda: stub.Verify(pb.VerifyRequest(a=a, b=a, **kw)), code, *words)


def test_embed_needs_speech(stub, speech_files):
    expect(lambda: stub.Embed(pb.EmbedRequest(audio=audio(noise_signals()["silence"]).audio)),
           grpc.StatusCode.INVALID_ARGUMENT, "audio: no speech found in 3.00 s of audio")
    expect(lambda: stub.Embed(pb.EmbedRequest(audio=audio(noise_signals()["white"]).audio)),
           grpc.StatusCode.INVALID_ARGUMENT, "no speech")
    # VAD off for one model (model_settings): everything counts as speech there
    r = stub.Embed(pb.EmbedRequest(model="tiny-nolen", audio=audio(noise_signals()["tone"]).audio))
    assert not r.speech.vad_applied and r.speech_seconds == pytest.approx(3.0)
    assert not stub.GetModelInfo(pb.GetModelInfoRequest(name="tiny-nolen")).vad


def test_too_little_speech_is_a_verdict(stub, speech_files):
    x = wave(speech_files, "espeak-en-1")
    seg = x[4000:4000 + int(0.7 * SR)]  # 0.7 s of speech
    r = stub.Verify(pb.VerifyRequest(a=audio(x), b=audio(np.concatenate([np.zeros(SR, np.float32), seg]))))
    assert r.verdict == pb.VERDICT_NOT_ENOUGH_SPEECH and not r.decision and not r.HasField("llr")
    assert "b.audio:" in r.reason and "at least 1.00 s needed" in r.reason
    assert 0.4 < r.b_speech.speech_seconds < 1.0 and r.a_speech.speech_seconds > 3


def test_enrollment_feedback_and_readiness(stub, speech_files):
    slt1, slt2, awb = (pb.Audio(encoded=wav_bytes(wave(speech_files, n))) for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    silent = pb.Audio(encoded=wav_bytes(noise_signals()["silence"]))
    # an utterance without speech refuses the whole request: nothing written
    expect(lambda: stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="slt", audio=[slt1, silent])),
           grpc.StatusCode.INVALID_ARGUMENT, "audio[1]: no speech found", "nothing was enrolled")
    expect(lambda: stub.GetSpeaker(pb.GetSpeakerRequest(collection="fb", speaker_id="slt")), grpc.StatusCode.NOT_FOUND)

    r = stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="slt", audio=[slt1]))
    assert r.status == pb.ENROLLMENT_STATUS_NEEDS_MORE_SPEECH and r.speaker.status == pb.ENROLLMENT_STATUS_NEEDS_MORE_SPEECH
    assert 2 < r.speaker.speech_seconds < 3 and r.speaker.required_speech_seconds == 3.0
    assert r.utterances[0].field == "audio[0]" and not r.utterances[0].HasField("consistency")
    # not ready: Verify against it says so, Identify skips it
    probe = pb.Probe(audio=slt2)
    v = stub.Verify(pb.VerifyRequest(a=probe, b=pb.Probe(speaker=pb.SpeakerRef(collection="fb", speaker_id="slt"))))
    assert v.verdict == pb.VERDICT_NOT_ENOUGH_SPEECH and "speaker 'slt' has" in v.reason
    assert not stub.Identify(pb.IdentifyRequest(collection="fb", probe=probe)).candidates

    r = stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="slt", audio=[slt2]))
    assert r.status == pb.ENROLLMENT_STATUS_READY and r.speaker.speech_seconds > 3
    fb = r.utterances[0]
    assert fb.HasField("consistency") and fb.HasField("consistency_llr") and fb.consistent and fb.consistency > 0.7
    assert stub.GetSpeaker(pb.GetSpeakerRequest(collection="fb", speaker_id="slt")).status == pb.ENROLLMENT_STATUS_READY
    hit = stub.Identify(pb.IdentifyRequest(collection="fb", probe=pb.Probe(audio=slt1)))
    assert hit.candidates[0].speaker_id == "slt" and hit.verdict == pb.VERDICT_ACCEPT and hit.is_match
    assert hit.candidates[0].HasField("llr") and hit.probe_speech.speech_seconds > 2

    # another voice appended to the same speaker is flagged
    r = stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="slt", audio=[awb]))
    assert r.status == pb.ENROLLMENT_STATUS_INCONSISTENT_UTTERANCE and not r.utterances[0].consistent

    # embeddings carry the speech they declare; none declared counts as none
    emb = stub.Embed(pb.EmbedRequest(audio=slt1))
    r = stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="e0", embeddings=[pb.Embedding(values=emb.embedding)]))
    assert r.status == pb.ENROLLMENT_STATUS_NO_SPEECH
    r = stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="e1", embeddings=[
        pb.Embedding(values=emb.embedding, speech_seconds=emb.speech_seconds)] * 2))
    assert r.status == pb.ENROLLMENT_STATUS_READY and r.speaker.speech_seconds == pytest.approx(2 * emb.speech_seconds)
    expect(lambda: stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="e2", embeddings=[
        pb.Embedding(values=emb.embedding, speech_seconds=-1)])), grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].speech_seconds")
    # an EmbedStream embedding of a long recording (past max_audio_seconds, within max_stream_audio_seconds) enrolls
    r = stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="e3", embeddings=[
        pb.Embedding(values=emb.embedding, speech_seconds=1800.0)]))
    assert r.speaker.speech_seconds == pytest.approx(1800.0)
    expect(lambda: stub.Enroll(pb.EnrollRequest(collection="fb", speaker_id="e2", embeddings=[
        pb.Embedding(values=emb.embedding, speech_seconds=3601.0)])), grpc.StatusCode.INVALID_ARGUMENT,
        "embeddings[0].speech_seconds: must be in 0..3600 (max_stream_audio_seconds)")


def test_identify_with_too_little_speech_and_scales(stub, speech_files):
    slt1, slt2 = (pb.Audio(encoded=wav_bytes(wave(speech_files, n))) for n in ("flite-slt-1", "flite-slt-2"))
    stub.Enroll(pb.EnrollRequest(collection="id", speaker_id="slt", audio=[slt1, slt2]))
    short = wave(speech_files, "flite-kal-1")[: int(0.5 * SR)]
    r = stub.Identify(pb.IdentifyRequest(collection="id", probe=audio(short)))
    assert r.verdict == pb.VERDICT_NOT_ENOUGH_SPEECH and not r.candidates and not r.is_match and "probe.audio" in r.reason
    r = stub.Identify(pb.IdentifyRequest(collection="id", probe=pb.Probe(audio=slt1), min_score=1000.0,
                                         min_score_scale=pb.SCORE_SCALE_LLR))
    assert not r.candidates and r.verdict == pb.VERDICT_REJECT
    r = stub.Identify(pb.IdentifyRequest(collection="id", probe=pb.Probe(audio=slt1), threshold=-1000.0,
                                         threshold_scale=pb.SCORE_SCALE_LLR))
    assert r.is_match and r.decision_scale == pb.SCORE_SCALE_LLR


def test_speech_and_score_metrics(srv, stub, speech_files):
    stub.Verify(pb.VerifyRequest(a=audio(noise_signals()["silence"]), b=audio(wave(speech_files, "flite-rms-1"))))
    stub.Verify(pb.VerifyRequest(a=audio(wave(speech_files, "flite-slt-1")), b=audio(wave(speech_files, "flite-slt-2"))))
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.server.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'spkserve_speech_seconds_bucket{le="1.0",method="Verify",model="ge2e"}' in text
    assert 'spkserve_speech_insufficient_total{method="Verify",model="ge2e",reason="no_speech"}' in text
    assert 'spkserve_verdicts_total{method="Verify",model="ge2e",verdict="accept"}' in text
    assert 'spkserve_verdicts_total{method="Verify",model="ge2e",verdict="not_enough_speech"}' in text
    assert 'spkserve_decision_llr_bucket{le="0.0",method="Verify",model="ge2e",verdict="accept"}' in text


def test_voiceprints_keep_their_cohort_statistics(srv, stub, speech_files):
    from models.scoring import cohort_stats

    store = srv.server.engine.store
    stub.Enroll(pb.EnrollRequest(collection="stats", speaker_id="rms", audio=[
        pb.Audio(encoded=wav_bytes(wave(speech_files, "flite-rms-1")))] * 2))
    rec = store.get("stats", "rms")
    scorer = srv.server.engine.models["ge2e"].scorer
    want = cohort_stats(rec.voiceprint, scorer.cohort, scorer.groups, scorer.centroids)  # (mean, std, channel group)
    np.testing.assert_allclose(rec.stats, want, rtol=1e-6)
    assert scorer.group_name(rec.stats) in scorer.group_names


@pytest.mark.parametrize("settings,words", [
    ({"nope": {"vad": False}}, ["model_settings", "nope"]),
    ({"ge2e": {"vad_threshold": 2.0}}, ["model_settings.ge2e", "vad_threshold"]),
    ({"ge2e": {"colour": 1}}, ["model_settings.ge2e", "colour"]),
    ({"tiny-wavlm": {"decision_scale": "llr", "decision_threshold": 0.0}}, ["tiny-wavlm", "decision_threshold", "llr"]),
])
def test_bad_model_settings_stop_startup(model_repo, tmp_path, settings, words):
    import asyncio

    from service.config import ConfigError
    from service.server import SpeakerServer

    async def start():
        s = SpeakerServer(make_config(model_repo, tmp_path, model_settings=settings))
        await s.start()
        try:
            await s.wait_ready(60)
        finally:
            await s.stop(0)

    with pytest.raises(ConfigError) as e:
        asyncio.run(start())
    for w in words:
        assert w in str(e.value)
