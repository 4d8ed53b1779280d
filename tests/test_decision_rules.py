"""Decisions that hold on real audio, through a real server: open-set Identify, thresholds by target
false-accept rate, the one-talker check, narrowband inputs, and a collection as its own cohort."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import soundfile as sf

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from tests.conftest import ServerThread, make_config, wav_bytes

SR = 16000
VOICES = ["flite-slt-1", "flite-awb-1", "flite-rms-1", "espeak-en-1", "flite-kal-1"]


@pytest.fixture(scope="module")
def srv(model_repo, tmp_path_factory):
    s = ServerThread(make_config(model_repo, tmp_path_factory.mktemp("data"), min_enroll_speech_seconds=1.0,
                                 collection_cohort_min_speakers=12))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def stub(srv):
    with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield pb_grpc.SpeakerServiceStub(ch)


def _wave(speech_files, name: str) -> np.ndarray:
    return sf.read(speech_files[name], dtype="float32")[0]


def _audio(x: np.ndarray, sr: int = SR) -> pb.Audio:
    return pb.Audio(encoded=wav_bytes(x, sr))


def _code(fn, *args) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        fn(*args)
    return e.value.code(), e.value.details()


def test_model_info_reports_the_real_speech_table_and_channel_groups(stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(name="ge2e"))
    assert "telephone" in info.cohort_groups and "clean" in info.cohort_groups
    rates = [p.false_accept_rate for p in info.false_accept_table]
    assert rates == sorted(rates) and rates[0] <= 0.01 <= rates[-1]
    llrs = [p.llr_threshold for p in info.false_accept_table]
    assert llrs == sorted(llrs, reverse=True)  # fewer false accepts need a higher threshold


def test_identify_applies_the_open_set_rule(stub, speech_files):
    for i, name in enumerate(VOICES):
        stub.Enroll(pb.EnrollRequest(collection="openset", speaker_id=f"s{i}", audio=[_audio(_wave(speech_files, name))]))
    op = stub.GetModelInfo(pb.GetModelInfoRequest(name="ge2e")).decision_threshold
    probe = pb.Probe(audio=_audio(_wave(speech_files, "flite-slt-2")))
    r = stub.Identify(pb.IdentifyRequest(collection="openset", probe=probe))
    assert r.rule == pb.IDENTIFY_RULE_OPEN_SET and r.collection_size == len(VOICES)
    assert r.decision_threshold == pytest.approx(op + np.log(len(VOICES)), abs=1e-4)
    assert r.is_match == (r.candidates[0].llr >= r.decision_threshold)
    single = stub.Identify(pb.IdentifyRequest(collection="openset", probe=probe, rule=pb.IDENTIFY_RULE_SINGLE_PAIR))
    assert single.rule == pb.IDENTIFY_RULE_SINGLE_PAIR and single.decision_threshold == pytest.approx(op, abs=1e-5)
    assert single.candidates[0].llr == pytest.approx(r.candidates[0].llr, abs=1e-4)
    cosine = stub.Identify(pb.IdentifyRequest(collection="openset", probe=probe, threshold=0.7,
                                              threshold_scale=pb.SCORE_SCALE_COSINE))
    assert cosine.rule == pb.IDENTIFY_RULE_SINGLE_PAIR and cosine.decision_threshold == pytest.approx(0.7)
    code, msg = _code(stub.Identify, pb.IdentifyRequest(collection="openset", probe=probe, rule=7))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith("rule:")


def test_threshold_by_target_false_accept_rate(stub, speech_files):
    a = pb.Probe(audio=_audio(_wave(speech_files, "flite-slt-1")))
    b = pb.Probe(audio=_audio(_wave(speech_files, "flite-slt-2")))
    strict = stub.Verify(pb.VerifyRequest(a=a, b=b, target_false_accept_rate=0.001))
    loose = stub.Verify(pb.VerifyRequest(a=a, b=b, target_false_accept_rate=0.1))
    assert strict.decision_scale == pb.SCORE_SCALE_LLR and strict.decision_threshold > loose.decision_threshold
    assert strict.llr == pytest.approx(loose.llr) and strict.decision == (strict.llr >= strict.decision_threshold)
    for req, field in [(pb.VerifyRequest(a=a, b=b, target_false_accept_rate=0.01, threshold=0.5), "target_false_accept_rate"),
                       (pb.VerifyRequest(a=a, b=b, target_false_accept_rate=0.9), "target_false_accept_rate"),
                       (pb.VerifyRequest(a=a, b=b, target_false_accept_rate=float("nan")), "target_false_accept_rate")]:
        code, msg = _code(stub.Verify, req)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and msg.startswith(field), msg
    code, msg = _code(stub.Verify, pb.VerifyRequest(model="tiny-wavlm", a=a, b=b, target_false_accept_rate=0.01))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "no false-accept table" in msg


def test_one_talker_check_flags_a_second_voice(stub, speech_files):
    one = np.concatenate([_wave(speech_files, "flite-slt-1"), _wave(speech_files, "flite-slt-2")])
    two = np.concatenate([_wave(speech_files, "flite-slt-1"), _wave(speech_files, "flite-awb-1")])
    ref = pb.Probe(audio=_audio(_wave(speech_files, "flite-slt-1")))
    single = stub.Verify(pb.VerifyRequest(a=ref, b=pb.Probe(audio=_audio(one))))
    mixed = stub.Verify(pb.VerifyRequest(a=ref, b=pb.Probe(audio=_audio(two))))
    assert single.b_speech.HasField("self_consistency_llr") and not single.b_speech.multiple_speakers
    assert mixed.b_speech.multiple_speakers and mixed.b_speech.self_consistency_llr < single.b_speech.self_consistency_llr
    short = stub.Verify(pb.VerifyRequest(a=ref, b=ref))  # under 4 s of speech: not checked
    assert not short.b_speech.HasField("self_consistency_llr") and not short.b_speech.multiple_speakers
    # enrolling a two-voice utterance flags it
    r = stub.Enroll(pb.EnrollRequest(collection="check", speaker_id="x", audio=[_audio(one), _audio(two)]))
    assert [u.speech.multiple_speakers for u in r.utterances] == [False, True]
    assert not r.utterances[1].consistent and r.status == pb.ENROLLMENT_STATUS_INCONSISTENT_UTTERANCE


def test_narrowband_input_is_reported(stub, speech_files):
    from models.audio import resample

    tel, rate = resample(_wave(speech_files, "espeak-en-1"), SR, 8000), 8000  # an 8 kHz recording
    r = stub.Embed(pb.EmbedRequest(audio=_audio(tel, rate)))
    assert r.speech.narrowband and r.speech_seconds > 3
    assert not stub.Embed(pb.EmbedRequest(audio=_audio(_wave(speech_files, "espeak-en-1")))).speech.narrowband


def _unit(rng, n, d=256):
    v = rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _in_domain_snorm(prints: dict[str, np.ndarray], a: str, b: str) -> float:
    others = np.stack([v for k, v in prints.items() if k not in (a, b)])

    def stats(x):
        s = others @ x
        return s.mean(), s.std()

    cos = float(prints[a] @ prints[b])
    (ma, sa), (mb, sb) = stats(prints[a]), stats(prints[b])
    return 0.5 * ((cos - ma) / sa + (cos - mb) / sb)


def test_a_large_enough_collection_is_its_own_cohort(stub):
    rng = np.random.default_rng(4)
    prints = {}

    def enroll(i):
        v = _unit(rng, 1)[0]
        prints[f"p{i:02d}"] = v
        stub.Enroll(pb.EnrollRequest(collection="domain", speaker_id=f"p{i:02d}",
                                     embeddings=[pb.Embedding(values=v.tolist(), speech_seconds=5.0)]))

    def verify():
        return stub.Verify(pb.VerifyRequest(a=pb.Probe(speaker=pb.SpeakerRef(collection="domain", speaker_id="p00")),
                                            b=pb.Probe(speaker=pb.SpeakerRef(collection="domain", speaker_id="p01"))))

    for i in range(11):
        enroll(i)
    below = verify()  # 11 speakers, fewer than collection_cohort_min_speakers = 12: the model's cohort
    assert below.normalized_score != pytest.approx(_in_domain_snorm(prints, "p00", "p01"), abs=1e-3)
    enroll(11)
    at = verify()
    assert at.normalized_score == pytest.approx(_in_domain_snorm(prints, "p00", "p01"), abs=1e-3)
    enroll(12)  # the cohort follows the collection at once
    assert verify().normalized_score == pytest.approx(_in_domain_snorm(prints, "p00", "p01"), abs=1e-3)
    stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="domain", speaker_id="p12"))
    del prints["p12"]
    assert verify().normalized_score == pytest.approx(_in_domain_snorm(prints, "p00", "p01"), abs=1e-3)
    # Identify normalises each candidate against the collection without that candidate
    probe = pb.Probe(embedding=pb.Embedding(values=prints["p05"].tolist(), speech_seconds=5.0))
    r = stub.Identify(pb.IdentifyRequest(collection="domain", probe=probe, top_k=1))
    assert r.candidates[0].speaker_id == "p05" and r.collection_size == 12
    assert r.candidates[0].normalized_score == pytest.approx(_in_domain_snorm({**prints, "probe": prints["p05"]},
                                                                             "probe", "p05"), abs=1e-3)


def test_new_options_are_checked():
    from service.config import ConfigError, ServerConfig

    for bad, name in [(dict(collection_cohort_min_speakers=3), "collection_cohort_min_speakers"),
                      (dict(collection_cohort_min_speakers=100, collection_cohort_max_speakers=50),
                       "collection_cohort_max_speakers"),
                      (dict(collection_cohort_refresh_seconds=0), "collection_cohort_refresh_seconds"),
                      (dict(speaker_check_min_seconds=1.0), "speaker_check_min_seconds"),
                      (dict(speaker_check_llr=float("inf")), "speaker_check_llr")]:
        with pytest.raises(ConfigError, match=name):
            ServerConfig(**bad).validate()
