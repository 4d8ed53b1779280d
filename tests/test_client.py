"""The Python client (service.client.SpeakerClient) against a real server: every method, every audio form,
large inputs through the streaming calls, and the server's errors as grpc.RpcError."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import soundfile as sf

from service._proto.spkserve.v1 import speaker_pb2 as pb
from tests.conftest import REFERENCE

AUDIO = REFERENCE / "audio"


@pytest.fixture
def spk(server):
    from service.client import SpeakerClient

    with SpeakerClient(server.target) as client:
        yield client


def test_audio_forms_give_the_same_embedding(spk):
    """A path, a file's bytes, (float samples, rate), (int16 samples, rate) and stereo samples are one recording."""
    path = AUDIO / "flite-slt-1.wav"
    wave, rate = sf.read(path, dtype="float32")
    base = np.array(spk.embed(path).embedding)
    for audio in (str(path), path.read_bytes(), (wave, rate), ((wave * 32767).astype(np.int16), rate),
                  (np.stack([wave, wave], axis=1), rate)):
        assert np.dot(base, spk.embed(audio).embedding) > 0.999


def test_large_inputs_go_through_the_streams(spk, monkeypatch):
    """Past the one-message size, embed uses EmbedStream, and verify / identify / enroll send the embedding."""
    import service.client as client_module
    from service.client import embedding, speaker

    slt1, slt2, awb = (AUDIO / f"{n}.wav" for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    small = spk.verify(slt1, slt2)
    monkeypatch.setattr(client_module, "ONE_MESSAGE_BYTES", 1000)  # every input is "large" now
    big = spk.verify(slt1, slt2)
    assert big.verdict == small.verdict and abs(big.score - small.score) < 1e-4
    assert not big.HasField("a_speech")  # it went as an embedding, not audio
    r = spk.enroll("client", "slt", [slt1])
    assert r.speaker.speech_seconds > 1 and r.utterances[0].speech.speech_seconds > 1  # the stream's speech counted
    assert spk.identify("client", slt2).candidates[0].speaker_id == "slt"
    assert spk.verify(speaker("client", "slt"), slt2).verdict == small.verdict
    e = embedding(spk.embed(awb))
    assert e.model == "ge2e" and spk.compare([e], [embedding(spk.embed(slt1))]).shape == (1, 1)


def test_speakers_diarize_and_live(spk):
    from service.client import speaker

    slt1, slt2, awb = (AUDIO / f"{n}.wav" for n in ("flite-slt-1", "flite-slt-2", "flite-awb-1"))
    spk.enroll("client2", "slt", [slt1, slt2], metadata={"team": "blue"})
    spk.enroll("client2", "awb", [awb])
    assert {s.speaker_id for s in spk.speakers("client2", page_size=1)} == {"slt", "awb"}
    assert spk.get_speaker("client2", "slt").metadata["team"] == "blue"
    assert dict(spk.update_speaker("client2", "slt", {"desk": "7"}, ["team"]).metadata) == {"desk": "7"}
    d = spk.diarize(slt1, num_speakers=1, include_embeddings=True)
    assert len(d.speakers) == 1 and len(d.speakers[0].embedding) == 256
    with pytest.raises(ValueError, match="num_speakers: must be at least 1, got 0"):
        spk.diarize(slt1, num_speakers=0)
    wave, rate = sf.read(slt2, dtype="int16")
    pcm = np.tile(wave, 3).astype("<i2").tobytes()
    results = list(spk.verify_stream(speaker("client2", "slt"), (pcm[i:i + rate] for i in range(0, len(pcm), rate)),
                                     sample_rate=rate))
    assert results[-1].final and results[-1].verdict == pb.VERDICT_ACCEPT and len(results) > 2
    buf = io.BytesIO()
    sf.write(buf, np.tile(wave, 3), rate, format="WAV")
    wav = buf.getvalue()  # a WAV stream, no sample_rate
    results = list(spk.verify_stream(speaker("client2", "slt"), [wav[:5000], wav[5000:]]))
    assert results[-1].final and results[-1].verdict == pb.VERDICT_ACCEPT
    assert spk.delete("client2", "awb").speaker.speaker_id == "awb"
    assert spk.delete_collection("client2", force=True).collection.speaker_count == 1
    assert "ge2e" in {m.name for m in spk.models().models}


def test_errors_are_the_servers(spk, server):
    from service.client import SpeakerClient, speaker

    with pytest.raises(grpc.RpcError) as e:
        spk.verify(b"RIFF not audio", AUDIO / "flite-slt-1.wav")
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and e.value.details().startswith("a.audio")
    with pytest.raises(grpc.RpcError) as e:
        spk.verify(speaker("nowhere", "x"), AUDIO / "flite-slt-1.wav")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with SpeakerClient("127.0.0.1:1", timeout=3) as down, pytest.raises(grpc.RpcError) as e:
        down.models()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
