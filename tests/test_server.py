"""Service tests against a real server on port 0: every RPC, bad inputs, batching, health, metrics."""

from __future__ import annotations

import concurrent.futures as cf
import json
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
from tests.conftest import REPOSITORY, speech_clip, wav_bytes


def audio_of(path) -> pb.Audio:
    return pb.Audio(encoded=path.read_bytes())


def tone(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 180 * t) + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


def expect_error(fn, code: grpc.StatusCode, *words: str):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    assert info.value.code() == code, info.value.details()
    for w in words:
        assert w in info.value.details(), info.value.details()
    return info.value


# -- Embed / EmbedStream ----------------------------------------------------------------

def test_embed_returns_unit_embedding_and_timings(stub, speech_files):
    r = stub.Embed(pb.EmbedRequest(audio=audio_of(speech_files["flite-slt-1"])))
    emb = np.array(r.embedding)
    assert r.model == "ge2e" and emb.shape == (256,)
    assert abs(np.linalg.norm(emb) - 1) < 1e-5
    # VAD keeps the speech: a little less than the file, every segment inside it
    assert r.speech.audio_seconds == pytest.approx(47440 / 16000, rel=1e-3) and r.speech.vad_applied
    assert 2.0 < r.speech_seconds < r.speech.audio_seconds and r.speech_seconds == r.speech.speech_seconds
    assert r.speech_seconds == pytest.approx(sum(g.end_seconds - g.start_seconds for g in r.speech.segments))
    assert all(0 <= g.start_seconds < g.end_seconds <= r.speech.audio_seconds for g in r.speech.segments)
    assert r.timings.inference_ms > 0 and r.timings.total_ms >= r.timings.inference_ms
    assert r.timings.execution_provider == "CPUExecutionProvider"  # what really ran it, per response


def test_embed_matches_resemblyzer_reference(model_repo, tmp_path, speech_files):
    """With VAD off the service embeds the whole file as the graph does after the card's hum removal, tilt limit
    and level normalisation; at the card's level the graph is Resemblyzer's encoder (tests/test_models.py)."""
    import onnxruntime as ort
    import soundfile as sf

    from models.audio import remove_dc, set_level
    from models.mains_hum import remove_hum
    from models.spectral_tilt import TiltLimit, limit_tilt
    from tests.conftest import REFERENCE, ServerThread, make_config

    card = json.loads((model_repo / "ge2e" / "model.json").read_text())
    ref = json.loads((REFERENCE / "ge2e_reference.json").read_text())["utterances"]
    graph = ort.InferenceSession(str(model_repo / "ge2e" / "model.onnx"), providers=["CPUExecutionProvider"])
    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], vad=False))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            for name in ("flite-slt-1", "flite-kal-1", "espeak-en-1"):
                r = s.Embed(pb.EmbedRequest(audio=audio_of(speech_files[name])))
                assert not r.speech.vad_applied
                wave = remove_dc(sf.read(REFERENCE / ref[name]["file"], dtype="float32")[0])
                if card.get("remove_mains_hum"):
                    wave = remove_hum(wave, 16000)
                wave = set_level(limit_tilt(wave, 16000, TiltLimit.from_card(card["input_tilt"])), card["input_level_dbfs"])
                want = graph.run(["embedding"], {"waveform": wave[None], "lengths": np.array([wave.size])})[0][0]
                assert float(np.dot(r.embedding, want)) > 0.999
                # at the file's own level (louder than Resemblyzer's -30 dBFS floor) it is Resemblyzer's embedding
                assert float(np.dot(r.embedding, ref[name]["embedding"])) < 0.999
    finally:
        srv.stop()


def test_embed_formats_agree(stub, speech_files):
    """WAV, FLAC, OGG, raw PCM s16 and other sample rates / stereo give the same speaker vector."""
    import soundfile as sf

    wave, sr = sf.read(speech_files["flite-rms-1"], dtype="float32")
    base = np.array(stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(wave)))).embedding)
    flac = stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(wave, fmt="FLAC")))).embedding
    assert np.dot(base, flac) > 0.9999
    pcm = (np.clip(wave, -1, 1) * 32767).astype("<i2").tobytes()
    raw = stub.Embed(pb.EmbedRequest(audio=pb.Audio(pcm=pb.RawPcm(
        data=pcm, format=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_S16LE, channels=1))))).embedding
    assert np.dot(base, raw) > 0.999
    from models.audio import resample

    w44 = resample(wave, 16000, 44100)
    stereo = np.stack([w44, w44], axis=1)
    st = stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(stereo, 44100)))).embedding
    assert np.dot(base, st) > 0.99
    ogg = stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(wave, fmt="OGG", subtype="VORBIS")))).embedding
    assert np.dot(base, ogg) > 0.97


def test_embed_stream_equals_unary(stub, speech_files):
    data = speech_files["flite-awb-1"].read_bytes()
    unary = np.array(stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=data))).embedding)

    def parts():
        yield pb.EmbedStreamRequest(config=pb.StreamConfig())
        for i in range(0, len(data), 7000):
            yield pb.EmbedStreamRequest(chunk=data[i:i + 7000])

    streamed = np.array(stub.EmbedStream(parts()).embedding)
    assert np.abs(unary - streamed).max() < 1e-6

    import soundfile as sf

    wave, _ = sf.read(speech_files["flite-awb-1"], dtype="float32")
    pcm = wave.astype("<f4").tobytes()

    def pcm_parts():
        yield pb.EmbedStreamRequest(config=pb.StreamConfig(pcm=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_F32LE)))
        for i in range(0, len(pcm), 4096):
            yield pb.EmbedStreamRequest(chunk=pcm[i:i + 4096])

    assert np.dot(unary, stub.EmbedStream(pcm_parts()).embedding) > 0.9999


def test_embed_stream_bad_order(stub):
    expect_error(lambda: stub.EmbedStream(iter([pb.EmbedStreamRequest(chunk=b"abc")])),
                 grpc.StatusCode.INVALID_ARGUMENT, "config")
    expect_error(lambda: stub.EmbedStream(iter([])), grpc.StatusCode.INVALID_ARGUMENT, "config")
    expect_error(lambda: stub.EmbedStream(iter([pb.EmbedStreamRequest(config=pb.StreamConfig()),
                                                pb.EmbedStreamRequest(config=pb.StreamConfig())])),
                 grpc.StatusCode.INVALID_ARGUMENT, "config")
    expect_error(lambda: stub.EmbedStream(iter([pb.EmbedStreamRequest(config=pb.StreamConfig()),
                                                pb.EmbedStreamRequest(chunk=b"RIFF"), pb.EmbedStreamRequest(chunk=b"")])),
                 grpc.StatusCode.INVALID_ARGUMENT, "chunk", "message 2 is an empty chunk")


def test_embed_stream_caps_its_messages(model_repo, tmp_path, speech_files):
    """Many tiny chunks are refused at max_stream_messages, not read for seconds and kept as objects."""
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], max_stream_messages=500))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            data = speech_files["flite-awb-1"].read_bytes()

            def tiny():
                yield pb.EmbedStreamRequest(config=pb.StreamConfig())
                for i in range(0, len(data), 2):
                    yield pb.EmbedStreamRequest(chunk=data[i:i + 2])

            expect_error(lambda: s.EmbedStream(tiny()), grpc.StatusCode.INVALID_ARGUMENT, "chunk",
                         "500 messages", "max_stream_messages")

            def fine():  # the same file in 499 chunks is accepted
                yield pb.EmbedStreamRequest(config=pb.StreamConfig())
                step = -(-len(data) // 499)
                for i in range(0, len(data), step):
                    yield pb.EmbedStreamRequest(chunk=data[i:i + step])

            assert len(s.EmbedStream(fine()).embedding) == 256
    finally:
        srv.stop()


# -- bad audio ---------------------------------------------------------------------------

@pytest.mark.parametrize("audio,words", [
    (pb.Audio(), ["audio", "empty"]),
    (pb.Audio(encoded=b""), ["audio", "empty"]),
    (pb.Audio(encoded=b"this is not audio at all" * 10), ["audio.encoded", "decoded"]),
    (pb.Audio(pcm=pb.RawPcm(data=b"\x00\x01\x02", format=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_S16LE))),
     ["audio.pcm.data", "multiple"]),
    (pb.Audio(pcm=pb.RawPcm(data=b"\x00" * 3200, format=pb.PcmFormat(sample_rate=0, encoding=pb.PCM_S16LE))),
     ["sample_rate"]),
    (pb.Audio(pcm=pb.RawPcm(data=b"\x00" * 3200, format=pb.PcmFormat(sample_rate=16000))), ["encoding"]),
    (pb.Audio(pcm=pb.RawPcm(data=np.full(8000, np.nan, "<f4").tobytes(),
                            format=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_F32LE))), ["non-finite"]),
    (pb.Audio(pcm=pb.RawPcm(data=np.full(8000, np.inf, "<f4").tobytes(),
                            format=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_F32LE))), ["non-finite"]),
    (pb.Audio(encoded=wav_bytes(tone(0.02))), ["shorter than the minimum"]),
])
def test_bad_audio_is_invalid_argument(stub, audio, words):
    expect_error(lambda: stub.Embed(pb.EmbedRequest(audio=audio)), grpc.StatusCode.INVALID_ARGUMENT, *words)


def test_truncated_file(stub, speech_files):
    data = speech_files["flite-slt-1"].read_bytes()
    expect_error(lambda: stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=data[: len(data) // 2]))),
                 grpc.StatusCode.INVALID_ARGUMENT, "audio.encoded", "truncated")
    flac = wav_bytes(tone(2.0), fmt="FLAC")
    expect_error(lambda: stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=flac[:-300]))),
                 grpc.StatusCode.INVALID_ARGUMENT, "audio.encoded")


def test_too_long_audio(model_repo, tmp_path):
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(model_repo, tmp_path, max_audio_seconds=2.0, models=["ge2e"]))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

            s = pb_grpc.SpeakerServiceStub(ch)
            expect_error(lambda: s.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(speech_clip(3.0))))),
                         grpc.StatusCode.INVALID_ARGUMENT, "longer than the maximum 2.0")
            assert len(s.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=wav_bytes(speech_clip(1.5))))).embedding) == 256
    finally:
        srv.stop()


def test_oversized_message_is_rejected_and_server_keeps_serving(model_repo, tmp_path, speech_files):
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(model_repo, tmp_path, max_message_mb=1, models=["ge2e"]))
    try:
        with grpc.insecure_channel(srv.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            expect_error(lambda: s.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=b"\x00" * (2 << 20)))),
                         grpc.StatusCode.RESOURCE_EXHAUSTED)
            assert len(s.Embed(pb.EmbedRequest(audio=audio_of(speech_files["flite-kal-1"]))).embedding) == 256
    finally:
        srv.stop()


def test_unknown_model(stub, speech_files):
    expect_error(lambda: stub.Embed(pb.EmbedRequest(model="nope", audio=audio_of(speech_files["flite-kal-1"]))),
                 grpc.StatusCode.NOT_FOUND, "model", "nope")
    expect_error(lambda: stub.GetModelInfo(pb.GetModelInfoRequest(name="nope")), grpc.StatusCode.NOT_FOUND, "name")


# -- batching ------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["ge2e", "tiny-wavlm", "tiny-nolen"])
def test_batched_equals_single(stub, model):
    """Concurrent requests of different lengths (batched together) equal each one alone.

    tiny-wavlm has a GroupNorm conv front end (masked by lengths); tiny-nolen takes no lengths,
    so the batcher groups only equal lengths for it.
    """
    lengths = [0.8, 1.3, 2.2, 3.5, 1.3, 0.9, 2.2, 4.0]
    clips = [wav_bytes(speech_clip(s, seed=i)) for i, s in enumerate(lengths)]
    alone = [np.array(stub.Embed(pb.EmbedRequest(model=model, audio=pb.Audio(encoded=c))).embedding) for c in clips]
    with cf.ThreadPoolExecutor(len(clips)) as pool:
        for _ in range(3):
            together = list(pool.map(lambda c: np.array(stub.Embed(pb.EmbedRequest(
                model=model, audio=pb.Audio(encoded=c))).embedding), clips))
            for a, b in zip(alone, together):
                assert float(np.dot(a, b)) > 0.9999


def test_batching_happens(server, stub):
    clips = [wav_bytes(speech_clip(1.0, seed=i)) for i in range(16)]
    before = scrape(server)
    key = '{model="tiny-wavlm"}'
    utts0 = metric_value(before, "spkserve_batch_size_sum" + key, 0.0)
    batches0 = metric_value(before, "spkserve_batch_size_count" + key, 0.0)
    with cf.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda c: stub.Embed(pb.EmbedRequest(model="tiny-wavlm", audio=pb.Audio(encoded=c))), clips))
    after = scrape(server)
    utts = metric_value(after, "spkserve_batch_size_sum" + key) - utts0
    batches = metric_value(after, "spkserve_batch_size_count" + key) - batches0
    assert utts == 16
    assert batches < utts  # some batch held more than one utterance


# -- Verify / Compare -----------------------------------------------------------------------

def test_verify_audio_embedding_and_speaker(stub, speech_files):
    a, b, other = (audio_of(speech_files[n]) for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    same = stub.Verify(pb.VerifyRequest(a=pb.Probe(audio=a), b=pb.Probe(audio=b)))
    diff = stub.Verify(pb.VerifyRequest(a=pb.Probe(audio=a), b=pb.Probe(audio=other)))
    assert same.score > diff.score
    for r in (same, diff):
        assert r.decision == (r.score >= r.threshold) == (r.verdict == pb.VERDICT_ACCEPT)
    emb = stub.Embed(pb.EmbedRequest(audio=b)).embedding
    via_emb = stub.Verify(pb.VerifyRequest(a=pb.Probe(audio=a), b=pb.Probe(embedding=pb.Embedding(values=emb)),
                                           threshold=0.99))
    assert via_emb.score == pytest.approx(same.score, abs=1e-5)
    assert via_emb.threshold == pytest.approx(0.99) and not via_emb.decision
    stub.Enroll(pb.EnrollRequest(collection="verify", speaker_id="slt", audio=[b]))
    via_spk = stub.Verify(pb.VerifyRequest(a=pb.Probe(audio=a), b=pb.Probe(speaker=pb.SpeakerRef(
        collection="verify", speaker_id="slt"))))
    assert via_spk.score == pytest.approx(same.score, abs=1e-5)


def test_verify_bad_inputs(stub, speech_files):
    a = pb.Probe(audio=audio_of(speech_files["flite-slt-1"]))
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=a)), grpc.StatusCode.INVALID_ARGUMENT, "b")
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=a, b=pb.Probe(embedding=pb.Embedding(values=[1.0] * 10)))),
                 grpc.StatusCode.INVALID_ARGUMENT, "b.embedding.values", "256")
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=a, b=pb.Probe(embedding=pb.Embedding(values=[0.0] * 256)))),
                 grpc.StatusCode.INVALID_ARGUMENT, "zero")
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=a, b=pb.Probe(embedding=pb.Embedding(values=[float("nan")] * 256)))),
                 grpc.StatusCode.INVALID_ARGUMENT, "NaN")
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=a, b=pb.Probe(speaker=pb.SpeakerRef(collection="nowhere", speaker_id="x")))),
                 grpc.StatusCode.NOT_FOUND, "collection")
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=a, b=a, threshold=3.0)), grpc.StatusCode.INVALID_ARGUMENT, "threshold")


def test_compare_matrix(stub):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 8)), rng.standard_normal((4, 8))
    r = stub.Compare(pb.CompareRequest(a=[pb.Embedding(values=v) for v in a], b=[pb.Embedding(values=v) for v in b]))
    an, bn = a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1, keepdims=True)
    assert (r.rows, r.cols) == (3, 4)
    np.testing.assert_allclose(np.array(r.scores).reshape(3, 4), an @ bn.T, atol=1e-5)
    expect_error(lambda: stub.Compare(pb.CompareRequest(a=[pb.Embedding(values=a[0])])), grpc.StatusCode.INVALID_ARGUMENT, "b")
    expect_error(lambda: stub.Compare(pb.CompareRequest(a=[pb.Embedding(values=a[0])], b=[pb.Embedding(values=[1.0, 2.0])])),
                 grpc.StatusCode.INVALID_ARGUMENT, "b[0].values")
    same = stub.Compare(pb.CompareRequest(a=[pb.Embedding(values=a[0], model="m1"), pb.Embedding(values=a[1])],
                                          b=[pb.Embedding(values=b[0], model="m1")]))
    assert same.rows == 2  # embeddings that name one model (or none) are compared
    expect_error(lambda: stub.Compare(pb.CompareRequest(a=[pb.Embedding(values=a[0]), pb.Embedding(values=a[1], model="m1")],
                                                        b=[pb.Embedding(values=b[0], model="m2")])),
                 grpc.StatusCode.INVALID_ARGUMENT, "b[0].model: is 'm2', but this request uses model 'm1'")


def test_an_embedding_of_another_model_is_refused_everywhere(stub):
    """Embeddings name the model that made them: Verify, Identify and Enroll refuse another model's (same size,
    other space), before anything is written; the right model's, or an unnamed one, pass."""
    vec = np.random.default_rng(2).standard_normal(256).tolist()
    other, own = pb.Embedding(values=vec, model="ssl-sv-small", speech_seconds=5), pb.Embedding(values=vec, model="ge2e")
    expect_error(lambda: stub.Verify(pb.VerifyRequest(a=pb.Probe(embedding=own), b=pb.Probe(embedding=other))),
                 grpc.StatusCode.INVALID_ARGUMENT, "b.embedding.model: is 'ssl-sv-small'", "model 'ge2e'")
    assert stub.Verify(pb.VerifyRequest(a=pb.Probe(embedding=own), b=pb.Probe(embedding=pb.Embedding(values=vec)))).score > 0.99
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(collection="models", speaker_id="x", embeddings=[other])),
                 grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].model")
    expect_error(lambda: stub.ListSpeakers(pb.ListSpeakersRequest(collection="models")), grpc.StatusCode.NOT_FOUND)
    stub.Enroll(pb.EnrollRequest(collection="models", speaker_id="x", embeddings=[pb.Embedding(values=vec, model="ge2e",
                                                                                                speech_seconds=5)]))
    expect_error(lambda: stub.Identify(pb.IdentifyRequest(collection="models", probe=pb.Probe(embedding=other))),
                 grpc.StatusCode.INVALID_ARGUMENT, "probe.embedding.model")
    # an enrolled speaker as Identify's probe is named as such (was: "probe: is empty")
    expect_error(lambda: stub.Identify(pb.IdentifyRequest(collection="models", probe=pb.Probe(
        speaker=pb.SpeakerRef(collection="models", speaker_id="x")))), grpc.StatusCode.INVALID_ARGUMENT,
        "probe.speaker: Identify takes audio or embedding here, not an enrolled speaker")


# -- speakers ---------------------------------------------------------------------------------

def test_enroll_identify_list_get_delete(stub, speech_files):
    coll = "crud"
    r = stub.Enroll(pb.EnrollRequest(collection=coll, speaker_id="slt", audio=[audio_of(speech_files["flite-slt-1"])],
                                     metadata={"name": "Sarah"}))
    assert r.created and r.speaker.utterance_count == 1 and r.speaker.metadata["name"] == "Sarah"
    r = stub.Enroll(pb.EnrollRequest(collection=coll, speaker_id="slt", audio=[audio_of(speech_files["flite-slt-2"])]))
    assert not r.created and r.speaker.utterance_count == 2 and r.speaker.metadata["name"] == "Sarah"
    for name in ("awb", "rms", "kal"):
        stub.Enroll(pb.EnrollRequest(collection=coll, speaker_id=name, audio=[audio_of(speech_files[f"flite-{name}-1"])]))
    # appending gives the voiceprint of enrolling both at once
    e1 = np.array(stub.Embed(pb.EmbedRequest(audio=audio_of(speech_files["flite-slt-1"]))).embedding)
    e2 = np.array(stub.Embed(pb.EmbedRequest(audio=audio_of(speech_files["flite-slt-2"]))).embedding)
    vp = np.array(stub.GetSpeaker(pb.GetSpeakerRequest(collection=coll, speaker_id="slt", include_voiceprint=True)).voiceprint)
    want = (e1 + e2) / np.linalg.norm(e1 + e2)
    assert np.abs(vp - want).max() < 1e-5

    ident = stub.Identify(pb.IdentifyRequest(collection=coll, probe=pb.Probe(audio=audio_of(speech_files["flite-slt-2"])), top_k=3))
    assert [c.speaker_id for c in ident.candidates][0] == "slt" and len(ident.candidates) == 3
    assert ident.candidates[0].score >= ident.candidates[1].score
    assert ident.candidates[0].metadata["name"] == "Sarah"
    assert ident.is_match == (ident.candidates[0].score >= ident.threshold)
    few = stub.Identify(pb.IdentifyRequest(collection=coll, probe=pb.Probe(embedding=pb.Embedding(values=e1)), top_k=10, min_score=0.9))
    assert [c.speaker_id for c in few.candidates] == ["slt"]

    page1 = stub.ListSpeakers(pb.ListSpeakersRequest(collection=coll, page_size=3))
    page2 = stub.ListSpeakers(pb.ListSpeakersRequest(collection=coll, page_size=3, page_token=page1.next_page_token))
    assert page1.total_size == 4 and page2.next_page_token == ""
    assert [s.speaker_id for s in page1.speakers] + [s.speaker_id for s in page2.speakers] == ["awb", "kal", "rms", "slt"]
    colls = {c.name: c for c in stub.ListCollections(pb.ListCollectionsRequest()).collections}
    assert colls[coll].speaker_count == 4 and colls[coll].model == "ge2e" and colls[coll].index_type == "flat"

    d = stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection=coll, speaker_id="slt"))
    assert d.speaker.speaker_id == "slt"
    expect_error(lambda: stub.GetSpeaker(pb.GetSpeakerRequest(collection=coll, speaker_id="slt")), grpc.StatusCode.NOT_FOUND, "slt")
    ident = stub.Identify(pb.IdentifyRequest(collection=coll, probe=pb.Probe(embedding=pb.Embedding(values=e1)), top_k=10))
    assert "slt" not in [c.speaker_id for c in ident.candidates]


def test_enroll_embeddings_and_collections_are_namespaces(stub):
    rng = np.random.default_rng(5)
    v = rng.standard_normal(256)
    stub.Enroll(pb.EnrollRequest(collection="tenant-a", speaker_id="alice", embeddings=[pb.Embedding(values=v, speech_seconds=4)]))
    stub.Enroll(pb.EnrollRequest(collection="tenant-b", speaker_id="bob", embeddings=[pb.Embedding(values=-v, speech_seconds=4)]))
    a = stub.Identify(pb.IdentifyRequest(collection="tenant-a", probe=pb.Probe(embedding=pb.Embedding(values=v))))
    assert [c.speaker_id for c in a.candidates] == ["alice"]
    assert a.candidates[0].score == pytest.approx(1.0, abs=1e-5)


def test_update_speaker(stub):
    """UpdateSpeaker: sets and removes metadata keys, keeps the voiceprint; bad requests name their field."""
    v = np.random.default_rng(9).standard_normal(256)
    stub.Enroll(pb.EnrollRequest(collection="upd", speaker_id="s", metadata={"team": "blue", "tmp": "x"},
                                 embeddings=[pb.Embedding(values=v, speech_seconds=4)]))
    before = stub.GetSpeaker(pb.GetSpeakerRequest(collection="upd", speaker_id="s", include_voiceprint=True))
    r = stub.UpdateSpeaker(pb.UpdateSpeakerRequest(collection="upd", speaker_id="s", metadata={"team": "red"},
                                                   remove_metadata_keys=["tmp"])).speaker
    assert dict(r.metadata) == {"team": "red"} and r.utterance_count == 1
    after = stub.GetSpeaker(pb.GetSpeakerRequest(collection="upd", speaker_id="s", include_voiceprint=True))
    assert dict(after.metadata) == {"team": "red"} and list(after.voiceprint) == list(before.voiceprint)
    bad = [(pb.UpdateSpeakerRequest(collection="upd", speaker_id="s"), grpc.StatusCode.INVALID_ARGUMENT,
            ("metadata", "nothing to change")),
           (pb.UpdateSpeakerRequest(collection="upd", speaker_id="s", metadata={"a": "1"}, remove_metadata_keys=["a"]),
            grpc.StatusCode.INVALID_ARGUMENT, ("remove_metadata_keys[0]", "also set")),
           (pb.UpdateSpeakerRequest(collection="upd", speaker_id="s", remove_metadata_keys=["ok", ""]),
            grpc.StatusCode.INVALID_ARGUMENT, ("remove_metadata_keys[1]",)),
           (pb.UpdateSpeakerRequest(collection="upd", speaker_id="s", metadata={"a\u202e": "1"}),
            grpc.StatusCode.INVALID_ARGUMENT, ("metadata",)),
           (pb.UpdateSpeakerRequest(collection="upd", speaker_id="s", metadata={"a": "v" * 1025}),
            grpc.StatusCode.INVALID_ARGUMENT, ("metadata['a']", "1024")),
           (pb.UpdateSpeakerRequest(collection="upd", speaker_id="nobody", metadata={"a": "1"}),
            grpc.StatusCode.NOT_FOUND, ("nobody",)),
           (pb.UpdateSpeakerRequest(collection="nowhere", speaker_id="s", metadata={"a": "1"}),
            grpc.StatusCode.NOT_FOUND, ("nowhere",))]
    for request, code, words in bad:
        expect_error(lambda: stub.UpdateSpeaker(request), code, *words)
    assert dict(stub.GetSpeaker(pb.GetSpeakerRequest(collection="upd", speaker_id="s")).metadata) == {"team": "red"}


def test_delete_collection(server, stub):
    """DeleteCollection: bad names and unknown collections named; a collection with speakers kept unless forced;
    then gone from listings, Identify and the speakers gauge, and its name free for a new start."""
    v = np.random.default_rng(8).standard_normal((2, 256))
    for i in range(2):
        stub.Enroll(pb.EnrollRequest(collection="doomed", speaker_id=f"s{i}",
                                     embeddings=[pb.Embedding(values=v[i], speech_seconds=4)]))
    probe = pb.Probe(embedding=pb.Embedding(values=v[0]))
    assert stub.Identify(pb.IdentifyRequest(collection="doomed", probe=probe)).collection_size == 2  # cohort cached
    expect_error(lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(collection="bad name!")),
                 grpc.StatusCode.INVALID_ARGUMENT, "collection")
    expect_error(lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(collection="never")),
                 grpc.StatusCode.NOT_FOUND, "collection", "never")
    expect_error(lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(collection="doomed")),
                 grpc.StatusCode.FAILED_PRECONDITION, "holds 2 speakers", "force")
    gone = stub.DeleteCollection(pb.DeleteCollectionRequest(collection="doomed", force=True)).collection
    assert (gone.name, gone.model, gone.speaker_count, gone.embedding_dim) == ("doomed", "ge2e", 2, 256)
    assert "doomed" not in {c.name for c in stub.ListCollections(pb.ListCollectionsRequest()).collections}
    expect_error(lambda: stub.Identify(pb.IdentifyRequest(collection="doomed", probe=probe)),
                 grpc.StatusCode.NOT_FOUND, "doomed")
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(collection="doomed", speaker_id="s0", embeddings=[
        pb.Embedding(values=v[0], speech_seconds=4)])), grpc.StatusCode.FAILED_PRECONDITION, "allow_reenroll")
    stub.Enroll(pb.EnrollRequest(collection="doomed", speaker_id="s9", embeddings=[
        pb.Embedding(values=v[1], speech_seconds=4)]))
    r = stub.Identify(pb.IdentifyRequest(collection="doomed", probe=probe))  # a fresh cohort, not the dropped one
    assert r.collection_size == 1 and [c.speaker_id for c in r.candidates] == ["s9"]
    assert stub.DeleteCollection(pb.DeleteCollectionRequest(collection="doomed", force=True)).collection.speaker_count == 1


def test_a_deleted_collections_speaker_series_goes_with_it(model_repo, tmp_path):
    from tests.conftest import ServerThread, make_config

    srv = ServerThread(make_config(model_repo, tmp_path, models=["ge2e"], metrics_collection_labels=True))
    try:
        with grpc.insecure_channel(srv.target) as ch:
            s = pb_grpc.SpeakerServiceStub(ch)
            s.Enroll(pb.EnrollRequest(collection="gauged", speaker_id="a", embeddings=[
                pb.Embedding(values=np.ones(256), speech_seconds=4)]))
            registry = srv.server.metrics.registry
            assert registry.get_sample_value("spkserve_index_speakers", {"collection": "gauged"}) == 1.0
            s.DeleteCollection(pb.DeleteCollectionRequest(collection="gauged", force=True))
            assert registry.get_sample_value("spkserve_index_speakers", {"collection": "gauged"}) is None
    finally:
        srv.stop()


def test_speaker_bad_inputs(stub, speech_files):
    good = [audio_of(speech_files["flite-kal-1"])]
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(speaker_id="x")), grpc.StatusCode.INVALID_ARGUMENT, "audio")
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(audio=good)), grpc.StatusCode.INVALID_ARGUMENT, "speaker_id")
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(speaker_id="x", collection="bad name!", audio=good)),
                 grpc.StatusCode.INVALID_ARGUMENT, "collection")
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(speaker_id="x", audio=good, embeddings=[pb.Embedding(values=[1.0])])),
                 grpc.StatusCode.INVALID_ARGUMENT, "embeddings[0].values")
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(model="nope", speaker_id="x", audio=good)), grpc.StatusCode.NOT_FOUND, "model")
    expect_error(lambda: stub.Identify(pb.IdentifyRequest(collection="missing", probe=pb.Probe(audio=good[0]))),
                 grpc.StatusCode.NOT_FOUND, "collection")
    expect_error(lambda: stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="missing", speaker_id="x")), grpc.StatusCode.NOT_FOUND)
    expect_error(lambda: stub.ListSpeakers(pb.ListSpeakersRequest(collection="missing")), grpc.StatusCode.NOT_FOUND)
    stub.Enroll(pb.EnrollRequest(collection="bad-inputs", speaker_id="x", audio=good))
    expect_error(lambda: stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="bad-inputs", speaker_id="y")), grpc.StatusCode.NOT_FOUND, "y")
    expect_error(lambda: stub.ListSpeakers(pb.ListSpeakersRequest(collection="bad-inputs", page_token="zz")),
                 grpc.StatusCode.INVALID_ARGUMENT, "page_token")
    expect_error(lambda: stub.Identify(pb.IdentifyRequest(collection="bad-inputs", probe=pb.Probe(audio=good[0]), top_k=-1)),
                 grpc.StatusCode.INVALID_ARGUMENT, "top_k")
    # a collection is bound to its model
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(model="tiny-wavlm", collection="bad-inputs", speaker_id="z", audio=good)),
                 grpc.StatusCode.FAILED_PRECONDITION, "ge2e")
    expect_error(lambda: stub.Identify(pb.IdentifyRequest(model="tiny-wavlm", collection="bad-inputs", probe=pb.Probe(audio=good[0]))),
                 grpc.StatusCode.FAILED_PRECONDITION)
    # a bad utterance in a batch of good ones changes nothing
    expect_error(lambda: stub.Enroll(pb.EnrollRequest(collection="bad-inputs", speaker_id="x",
                                                      audio=[good[0], pb.Audio(encoded=b"junk")])),
                 grpc.StatusCode.INVALID_ARGUMENT, "audio[1].encoded")
    assert stub.GetSpeaker(pb.GetSpeakerRequest(collection="bad-inputs", speaker_id="x")).utterance_count == 1


# -- models, health, metrics -----------------------------------------------------------------

def test_list_models_and_info(stub):
    r = stub.ListModels(pb.ListModelsRequest())
    names = [m.name for m in r.models]
    assert r.default_model == "ge2e" and set(names) == {"ge2e", "tiny-wavlm", "tiny-nolen"}
    ge2e = stub.GetModelInfo(pb.GetModelInfoRequest(name="ge2e"))
    assert ge2e.embedding_dim == 256 and ge2e.sample_rate == 16000 and ge2e.is_default
    assert ge2e.execution_provider == "CPUExecutionProvider"
    assert ge2e.parameters > 1_000_000 and ge2e.license.startswith("Apache-2.0")
    assert ge2e.HasField("input_level_dbfs") and ge2e.input_level_dbfs == -25.0  # the card's, reported
    tilt = json.loads((REPOSITORY / "ge2e" / "model.json").read_text())["input_tilt"]
    assert ge2e.HasField("input_tilt") and ge2e.input_tilt.min_db_per_octave == tilt["min_db_per_octave"]
    assert ge2e.input_tilt.max_db_per_octave == tilt["max_db_per_octave"]
    assert ge2e.remove_mains_hum == json.loads((REPOSITORY / "ge2e" / "model.json").read_text()).get("remove_mains_hum", False)
    tiny = stub.GetModelInfo(pb.GetModelInfoRequest(name="tiny-wavlm"))
    assert not tiny.HasField("input_level_dbfs")  # no level on its card: inputs embedded as they come
    assert not tiny.HasField("input_tilt") and not tiny.remove_mains_hum


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=10) as r:
        return r.read().decode()


def metric_value(text: str, name: str, default: float | None = None) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    if default is not None:
        return default
    raise AssertionError(f"metric {name} not found")


def test_metrics_present_after_requests(server, stub, speech_files):
    stub.Embed(pb.EmbedRequest(audio=audio_of(speech_files["flite-kal-1"])))
    expect_error(lambda: stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=b"junk"))), grpc.StatusCode.INVALID_ARGUMENT)
    text = scrape(server)
    assert metric_value(text, 'spkserve_grpc_requests_total{code="OK",method="Embed"}') >= 1
    assert metric_value(text, 'spkserve_grpc_requests_total{code="INVALID_ARGUMENT",method="Embed"}') >= 1
    assert metric_value(text, 'spkserve_audio_seconds_total{model="ge2e"}') > 0
    assert 'spkserve_grpc_request_duration_seconds_bucket{le="0.5",method="Embed"}' in text
    assert 'spkserve_batch_queue_duration_seconds_count{model="ge2e"}' in text
    assert 'spkserve_batch_inference_duration_seconds_count{model="ge2e"}' in text
    assert 'spkserve_batch_queue_depth{model="ge2e"}' in text
    assert 'provider="CPUExecutionProvider"' in text
    assert metric_value(text, "spkserve_ready") == 1.0


def test_health_and_reflection(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        assert h.Check(health_pb2.HealthCheckRequest(service="")).status == health_pb2.HealthCheckResponse.SERVING
        assert h.Check(health_pb2.HealthCheckRequest(service="spkserve.v1.SpeakerService")).status == \
            health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        services = {s.name for s in resp.list_services_response.service}
        assert "spkserve.v1.SpeakerService" in services and "grpc.health.v1.Health" in services


def test_reflection_v1_and_v1alpha(server):
    """Both reflection services list the API; v1 clients (grpcurl) ask for v1 first."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2

    with grpc.insecure_channel(server.target) as ch:
        for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            call = ch.stream_stream(f"/{service}/ServerReflectionInfo",
                                    request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                                    response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
            reqs = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="spkserve.v1.SpeakerService"),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="grpc.reflection.v1.ServerReflection")]
            listed, desc, v1 = list(call(iter(reqs)))
            names = {s.name for s in listed.list_services_response.service}
            assert {"spkserve.v1.SpeakerService", "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
                    "grpc.reflection.v1alpha.ServerReflection"} <= names, service
            fd = descriptor_pb2.FileDescriptorProto.FromString(desc.file_descriptor_response.file_descriptor_proto[0])
            assert fd.package == "spkserve.v1" and "Verify" in {m.name for m in fd.service[0].method}
            fd = descriptor_pb2.FileDescriptorProto.FromString(v1.file_descriptor_response.file_descriptor_proto[0])
            assert fd.package == "grpc.reflection.v1"
