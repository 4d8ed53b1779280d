"""Property-based fuzzing of Embed and Enroll: random bytes and arrays never crash the server,
never answer INTERNAL, and never change the speaker index."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service._proto.spkserve.v1 import speaker_pb2 as pb
from tests.conftest import wav_bytes

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.FAILED_PRECONDITION}
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

# bytes that look like audio headers, to get past the first check now and then
HEADERS = [b"", b"RIFF\x24\x00\x00\x00WAVEfmt ", b"fLaC\x00\x00\x00\x22", b"OggS\x00\x02", b"ID3\x03\x00"]
ENCODINGS = [pb.PCM_ENCODING_UNSPECIFIED, pb.PCM_S16LE, pb.PCM_S32LE, pb.PCM_F32LE, 7]


def code_of(fn) -> grpc.StatusCode:
    try:
        fn()
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        return e.code()


def snapshot(stub) -> list:
    colls = stub.ListCollections(pb.ListCollectionsRequest()).collections
    out = []
    for c in colls:
        for s in stub.ListSpeakers(pb.ListSpeakersRequest(collection=c.name, page_size=1000)).speakers:
            vp = stub.GetSpeaker(pb.GetSpeakerRequest(collection=c.name, speaker_id=s.speaker_id, include_voiceprint=True))
            out.append((c.name, s.speaker_id, s.utterance_count, tuple(vp.voiceprint)))
    return sorted(out)


audio_strategy = st.one_of(
    st.builds(lambda h, b: pb.Audio(encoded=h + b), st.sampled_from(HEADERS), st.binary(max_size=4096)),
    st.builds(lambda d, sr, enc, ch: pb.Audio(pcm=pb.RawPcm(data=d, format=pb.PcmFormat(sample_rate=sr, encoding=enc, channels=ch))),
              st.binary(max_size=8192), st.integers(-5, 500_000), st.sampled_from(ENCODINGS), st.integers(-2, 70)),
    st.builds(lambda a, sr, sub: pb.Audio(encoded=wav_bytes(a, sr, subtype=sub)),
              hnp.arrays(np.float32, st.integers(0, 24000), elements=st.floats(width=32, allow_nan=True,
                                                                               allow_infinity=True)),
              st.sampled_from([8000, 16000, 44100]), st.sampled_from([None, "FLOAT"])),
)


def test_fuzz_embed_and_enroll_keep_server_up_and_index_unchanged(server, stub, speech_files):
    stub.Enroll(pb.EnrollRequest(collection="fuzz", speaker_id="anchor",
                                 audio=[pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())]))
    before = snapshot(stub)

    @FUZZ
    @given(audio=audio_strategy, model=st.sampled_from(["", "ge2e", "tiny-wavlm", "missing"]))
    def embed(audio, model):
        assert code_of(lambda: stub.Embed(pb.EmbedRequest(model=model, audio=audio), timeout=60)) in ALLOWED

    @FUZZ
    @given(audio=st.lists(audio_strategy, min_size=1, max_size=3),
           vectors=st.lists(st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=300), max_size=2),
           speaker=st.text(max_size=300), collection=st.sampled_from(["fuzz", "", "bad name", "x" * 200]))
    def enroll(audio, vectors, speaker, collection):
        # always include one item that cannot be valid, so nothing may be written
        req = pb.EnrollRequest(collection=collection, speaker_id=speaker, audio=audio + [pb.Audio(encoded=b"junk")],
                               embeddings=[pb.Embedding(values=v) for v in vectors])
        assert code_of(lambda: stub.Enroll(req, timeout=60)) in ALLOWED - {grpc.StatusCode.OK}

    embed()
    enroll()
    assert snapshot(stub) == before
    ok = stub.Embed(pb.EmbedRequest(audio=pb.Audio(encoded=speech_files["flite-kal-1"].read_bytes())))
    assert len(ok.embedding) == 256
    text_codes = server.server.metrics.requests.collect()[0].samples
    assert not [s for s in text_codes if s.labels.get("code") == "INTERNAL"]


def _mutated(data: bytes, positions: list[int], values: list[int]) -> bytes:
    out = bytearray(data)
    for p, v in zip(positions, values):
        out[p % min(len(out), 64)] = v  # the header: rates, channel counts, declared lengths
    return bytes(out)


def test_fuzz_headers_tokens_ids_and_raw_messages(server, stub, speech_files):
    """Mutated file headers (declared rate/channels/length), page tokens, speaker ids with
    invisible characters, opt-out deletes and raw bytes as messages: no INTERNAL, index unchanged."""
    import io

    import soundfile as sf

    stub.Enroll(pb.EnrollRequest(collection="fuzz2", speaker_id="anchor",
                                 audio=[pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())]))
    before = snapshot(stub)
    flac = io.BytesIO()
    sf.write(flac, np.zeros(16000, np.float32), 16000, format="FLAC")
    files = [flac.getvalue(), speech_files["flite-slt-2"].read_bytes()[:20000]]
    channel = grpc.insecure_channel(server.target)
    unary = {m: channel.unary_unary(f"/spkserve.v1.SpeakerService/{m}", request_serializer=lambda b: b,
                                    response_deserializer=lambda b: b) for m in ("Embed", "Verify", "GetSpeaker")}

    @FUZZ
    @given(which=st.sampled_from([0, 1]), positions=st.lists(st.integers(0, 63), min_size=1, max_size=6),
           values=st.lists(st.integers(0, 255), min_size=6, max_size=6))
    def headers(which, positions, values):
        audio = pb.Audio(encoded=_mutated(files[which], positions, values))
        assert code_of(lambda: stub.Embed(pb.EmbedRequest(audio=audio), timeout=60)) in ALLOWED

    @FUZZ
    @given(token=st.text(max_size=30), speaker=st.text(max_size=40), opt_out=st.booleans(),
           junk=st.binary(max_size=64), method=st.sampled_from(sorted(unary)))
    def requests(token, speaker, opt_out, junk, method):
        assert code_of(lambda: stub.ListSpeakers(pb.ListSpeakersRequest(collection="fuzz2", page_token=token))) in ALLOWED
        if speaker != "anchor":
            got = code_of(lambda: stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection="fuzz2", speaker_id=speaker,
                                                                              opt_out=opt_out)))
            assert got in ALLOWED
        assert code_of(lambda: unary[method](junk, timeout=30)) in ALLOWED

    headers()
    requests()
    channel.close()
    assert snapshot(stub) == before
    text_codes = server.server.metrics.requests.collect()[0].samples
    assert not [s for s in text_codes if s.labels.get("code") in ("INTERNAL", "UNKNOWN")]


def test_long_client_values_are_never_echoed_whole(stub, speech_files):
    """A 10,000-character model name answers NOT_FOUND with a short message, not 'Stream removed'."""
    audio = pb.Audio(encoded=speech_files["flite-slt-1"].read_bytes())
    for call in (lambda: stub.Embed(pb.EmbedRequest(model="m" * 10_000, audio=audio)),
                 lambda: stub.GetModelInfo(pb.GetModelInfoRequest(name="x" * 50_000)),
                 lambda: stub.Verify(pb.VerifyRequest(model="v" * 9000, a=pb.Probe(audio=audio), b=pb.Probe(audio=audio)))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert len(e.value.details()) < 300 and "..." in e.value.details()


def test_error_messages_are_bounded():
    from service.rpc import MAX_MESSAGE, _bounded

    assert _bounded("short") == "short"
    long = _bounded("x" * 100_000)
    assert len(long) == MAX_MESSAGE and long.endswith("...")
