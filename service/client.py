"""A Python client of spkserve: one object per server, one method per call, protobuf replies.

    from service.client import SpeakerClient, speaker

    with SpeakerClient("localhost:50051", token=None) as spk:
        v = spk.verify("a.wav", "b.wav")                 # pb.VerifyResponse
        spk.enroll("bank", "alice", ["alice1.wav", "alice2.flac"], metadata={"name": "Alice"})
        hit = spk.identify("bank", "caller.wav")          # pb.IdentifyResponse
        v = spk.verify(speaker("bank", "alice"), "caller.wav")
        turns = spk.diarize("meeting.wav", max_speakers=6)  # any length: streamed
        for r in spk.verify_stream(speaker("bank", "alice"), pcm_chunks, sample_rate=8000):
            print(r.speech_seconds, r.verdict, r.speaker_changed)

Audio is a path, the bytes of a file in any format the server reads, or ``(samples, sample_rate)`` with
a NumPy array of float (-1..1) or int16 samples (mono, or (T, C)). Files too large for one message go
through ``EmbedStream`` and are sent as their embedding (with its model and net speech), as the
command line does. Errors are ``grpc.RpcError`` with the server's status code and a message naming
the field. The replies are the protobuf messages of ``protos/spkserve/v1/speaker.proto``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import grpc
import numpy as np

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

__all__ = ["SpeakerClient", "speaker", "embedding", "embed_stream", "file_chunks", "ONE_MESSAGE_BYTES", "CHUNK_BYTES"]

_SCALES = {"cosine": pb.SCORE_SCALE_COSINE, "normalized": pb.SCORE_SCALE_NORMALIZED, "llr": pb.SCORE_SCALE_LLR}
ONE_MESSAGE_BYTES = 8 << 20  # larger audio goes through the streaming calls (the server's default limit is 16 MiB)
CHUNK_BYTES = 1 << 20  # the size of each streamed message's audio

Audio = Any  # a path (str or Path), bytes of an encoded file, or (samples, sample_rate)


def speaker(collection: str, speaker_id: str) -> pb.Probe:
    """A probe naming an enrolled speaker (for ``verify`` and ``verify_stream``)."""
    return pb.Probe(speaker=pb.SpeakerRef(collection=collection, speaker_id=speaker_id))


def embedding(reply: pb.EmbedResponse) -> pb.Embedding:
    """An ``embed`` reply as an embedding to send back (a probe, or an enrollment utterance): its vector, net
    speech and model, so the server refuses it for another model and counts its speech."""
    return pb.Embedding(values=reply.embedding, speech_seconds=reply.speech_seconds, model=reply.model)


def file_chunks(path: str | Path) -> Iterator[bytes]:
    """A file's bytes, ``CHUNK_BYTES`` at a time (for the streaming calls)."""
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            yield chunk


def embed_stream(stub: pb_grpc.SpeakerServiceStub, chunks: Iterable[bytes], model: str = "",
                 pcm: pb.PcmFormat | None = None, **call: Any) -> pb.EmbedResponse:
    """Embed audio of any length through EmbedStream: the config (``model``; ``pcm`` for raw PCM, None for an
    encoded file), then each chunk as it comes. ``call``: the gRPC call's options (metadata, timeout)."""

    def messages() -> Iterator[pb.EmbedStreamRequest]:
        yield pb.EmbedStreamRequest(config=pb.StreamConfig(model=model, pcm=pcm))
        for chunk in chunks:
            yield pb.EmbedStreamRequest(chunk=chunk)

    return stub.EmbedStream(messages(), **call)


def _pcm(samples: np.ndarray, rate: int) -> pb.Audio:
    x = np.asarray(samples)
    channels = 1 if x.ndim == 1 else x.shape[1]
    if x.dtype == np.int16:
        data, encoding = x.astype("<i2").tobytes(), pb.PCM_S16LE
    else:
        data, encoding = x.astype("<f4").tobytes(), pb.PCM_F32LE
    return pb.Audio(pcm=pb.RawPcm(data=data, format=pb.PcmFormat(sample_rate=int(rate), encoding=encoding,
                                                                  channels=channels)))


def _audio(audio: Audio) -> pb.Audio:
    """One ``Audio`` message: a file's bytes, given bytes, or raw PCM of (samples, rate)."""
    if isinstance(audio, pb.Audio):
        return audio
    if isinstance(audio, tuple):
        return _pcm(*audio)
    if isinstance(audio, (bytes, bytearray)):
        return pb.Audio(encoded=bytes(audio))
    return pb.Audio(encoded=Path(audio).read_bytes())


def _size(audio: Audio) -> int:
    if isinstance(audio, tuple):
        return np.asarray(audio[0]).nbytes
    if isinstance(audio, (bytes, bytearray)):
        return len(audio)
    if isinstance(audio, (str, Path)):
        return Path(audio).stat().st_size
    return 0


def _stream_parts(audio: Audio) -> tuple[pb.PcmFormat | None, Iterator[bytes]]:
    """(the PCM format, None for an encoded file; its bytes 1 MiB at a time)."""
    if isinstance(audio, tuple):
        msg = _pcm(*audio)
        data = msg.pcm.data
        return msg.pcm.format, (data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES))
    if isinstance(audio, (bytes, bytearray)):
        data = bytes(audio)
        return None, (data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES))
    return None, file_chunks(audio)


class SpeakerClient:
    """A connection to one spkserve server.

    Args:
        target: ``HOST:PORT`` of its gRPC port.
        token: the bearer token, when the server wants one.
        tls_ca: a CA certificate (PEM file) for a TLS server; None: plaintext.
        timeout: each call's deadline in seconds (None: none).
    """

    def __init__(self, target: str = "localhost:50051", token: str | None = None, tls_ca: str | None = None,
                 timeout: float | None = 60.0):
        opts = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        self.channel = (grpc.secure_channel(target, grpc.ssl_channel_credentials(Path(tls_ca).read_bytes()), opts)
                        if tls_ca else grpc.insecure_channel(target, opts))
        self.stub = pb_grpc.SpeakerServiceStub(self.channel)
        self._kw = {"metadata": [("authorization", f"Bearer {token}")] if token else [], "timeout": timeout}

    def close(self) -> None:
        """Close the connection."""
        self.channel.close()

    def __enter__(self) -> SpeakerClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- single recordings ------------------------------------------------------------
    def embed(self, audio: Audio, model: str = "") -> pb.EmbedResponse:
        """The embedding of a recording's speech (a large one through EmbedStream)."""
        if _size(audio) <= ONE_MESSAGE_BYTES:
            return self.stub.Embed(pb.EmbedRequest(model=model, audio=_audio(audio)), **self._kw)
        fmt, chunks = _stream_parts(audio)
        return embed_stream(self.stub, chunks, model, fmt, **self._kw)

    def _probe(self, probe: Audio | pb.Probe | pb.Embedding, model: str) -> pb.Probe:
        if isinstance(probe, pb.Probe):
            return probe
        if isinstance(probe, pb.Embedding):
            return pb.Probe(embedding=probe)
        if _size(probe) > ONE_MESSAGE_BYTES:
            return pb.Probe(embedding=embedding(self.embed(probe, model)))
        return pb.Probe(audio=_audio(probe))

    def verify(self, a: Audio | pb.Probe | pb.Embedding, b: Audio | pb.Probe | pb.Embedding, model: str = "",
               threshold: float | None = None, scale: str = "cosine",
               target_far: float | None = None) -> pb.VerifyResponse:
        """Are ``a`` and ``b`` one speaker? Each is audio, an embedding, or ``speaker(collection, id)``."""
        req = pb.VerifyRequest(model=model, a=self._probe(a, model), b=self._probe(b, model))
        if threshold is not None:
            req.threshold, req.threshold_scale = threshold, _SCALES[scale]
        if target_far is not None:
            req.target_false_accept_rate = target_far
        return self.stub.Verify(req, **self._kw)

    def compare(self, a: list[pb.Embedding], b: list[pb.Embedding]) -> np.ndarray:
        """(len(a), len(b)) cosine scores between two lists of embeddings."""
        r = self.stub.Compare(pb.CompareRequest(a=a, b=b), **self._kw)
        return np.asarray(r.scores, np.float32).reshape(r.rows, r.cols)

    def diarize(self, audio: Audio, num_speakers: int | None = None, min_speakers: int | None = None,
                max_speakers: int | None = None, collection: str = "", exclusive: bool = False,
                include_embeddings: bool = False, model: str = "") -> pb.DiarizeResponse:
        """Who spoke when, in a recording of any length (sent through DiarizeStream)."""
        options = pb.DiarizationOptions(num_speakers=num_speakers or 0, min_speakers=min_speakers or 0,
                                        max_speakers=max_speakers or 0, collection=collection, exclusive=exclusive,
                                        include_embeddings=include_embeddings)
        for name, value in (("num_speakers", num_speakers), ("min_speakers", min_speakers),
                            ("max_speakers", max_speakers)):
            if value is not None and value < 1:  # 0 would mean "not given" to the server
                raise ValueError(f"{name}: must be at least 1, got {value}")
        fmt, chunks = _stream_parts(audio)

        def messages() -> Iterator[pb.DiarizeStreamRequest]:
            yield pb.DiarizeStreamRequest(config=pb.DiarizeStreamConfig(model=model, options=options, pcm=fmt))
            for chunk in chunks:
                yield pb.DiarizeStreamRequest(chunk=chunk)

        return self.stub.DiarizeStream(messages(), **self._kw)

    def verify_stream(self, reference: Audio | pb.Probe | pb.Embedding, chunks: Iterable[bytes],
                      sample_rate: int | None = None, model: str = "", interim_seconds: float = 0.0,
                      threshold: float | None = None, scale: str = "cosine",
                      target_far: float | None = None) -> Iterator[pb.VerifyStreamResponse]:
        """Live verification: yields a provisional result every ``interim_seconds`` of new speech (default 1 s)
        while ``chunks`` (16-bit little-endian mono PCM at ``sample_rate``, or a WAV stream when it is None) are
        sent as they come, and the final one (``final``) when they end. A live call has no deadline (the client's
        ``timeout`` is for calls that end on their own)."""
        config = pb.VerifyStreamConfig(model=model, reference=self._probe(reference, model),
                                       interim_seconds=interim_seconds)
        if sample_rate is not None:
            config.pcm.CopyFrom(pb.PcmFormat(sample_rate=sample_rate, encoding=pb.PCM_S16LE, channels=1))
        if threshold is not None:
            config.threshold, config.threshold_scale = threshold, _SCALES[scale]
        if target_far is not None:
            config.target_false_accept_rate = target_far

        def messages() -> Iterator[pb.VerifyStreamRequest]:
            yield pb.VerifyStreamRequest(config=config)
            for chunk in chunks:
                yield pb.VerifyStreamRequest(chunk=bytes(chunk))

        yield from self.stub.VerifyStream(messages(), **{**self._kw, "timeout": None})

    # -- enrolled speakers ------------------------------------------------------------
    def enroll(self, collection: str, speaker_id: str, audio: Iterable[Audio | pb.Embedding] = (),
               metadata: dict[str, str] | None = None, model: str = "",
               allow_reenroll: bool = False) -> pb.EnrollResponse:
        """Add recordings (or embeddings) to a speaker of a collection, creating either."""
        recordings, embeddings = [], []
        for item in audio:
            if isinstance(item, pb.Embedding):
                embeddings.append(item)
            elif _size(item) > ONE_MESSAGE_BYTES:
                embeddings.append(embedding(self.embed(item, model)))
            else:
                recordings.append(_audio(item))
        return self.stub.Enroll(pb.EnrollRequest(model=model, collection=collection, speaker_id=speaker_id,
                                                 audio=recordings, embeddings=embeddings, metadata=metadata or {},
                                                 allow_reenroll=allow_reenroll), **self._kw)

    def identify(self, collection: str, probe: Audio | pb.Embedding, top_k: int = 5, model: str = "",
                 target_far: float | None = None, single_pair: bool = False) -> pb.IdentifyResponse:
        """The enrolled speakers of ``collection`` closest to ``probe``, and whether the best one matches."""
        req = pb.IdentifyRequest(model=model, collection=collection, probe=self._probe(probe, model), top_k=top_k,
                                 rule=pb.IDENTIFY_RULE_SINGLE_PAIR if single_pair else pb.IDENTIFY_RULE_OPEN_SET)
        if target_far is not None:
            req.target_false_accept_rate = target_far
        return self.stub.Identify(req, **self._kw)

    def get_speaker(self, collection: str, speaker_id: str, include_voiceprint: bool = False) -> pb.Speaker:
        """An enrolled speaker's record."""
        return self.stub.GetSpeaker(pb.GetSpeakerRequest(collection=collection, speaker_id=speaker_id,
                                                         include_voiceprint=include_voiceprint), **self._kw)

    def update_speaker(self, collection: str, speaker_id: str, metadata: dict[str, str] | None = None,
                       remove_metadata_keys: Iterable[str] = ()) -> pb.Speaker:
        """Change an enrolled speaker's metadata: set ``metadata``'s keys, then remove ``remove_metadata_keys``."""
        return self.stub.UpdateSpeaker(pb.UpdateSpeakerRequest(
            collection=collection, speaker_id=speaker_id, metadata=metadata or {},
            remove_metadata_keys=list(remove_metadata_keys)), **self._kw).speaker

    def speakers(self, collection: str, page_size: int = 100) -> Iterator[pb.Speaker]:
        """Every speaker of a collection, page after page."""
        token = ""
        while True:
            r = self.stub.ListSpeakers(pb.ListSpeakersRequest(collection=collection, page_size=page_size,
                                                              page_token=token), **self._kw)
            yield from r.speakers
            token = r.next_page_token
            if not token:
                return

    def delete(self, collection: str, speaker_id: str, opt_out: bool = False) -> pb.DeleteSpeakerResponse:
        """Delete a speaker (crypto-shredded); ``opt_out``: also refuse its id from now on."""
        return self.stub.DeleteSpeaker(pb.DeleteSpeakerRequest(collection=collection, speaker_id=speaker_id,
                                                               opt_out=opt_out), **self._kw)

    def delete_collection(self, collection: str, force: bool = False) -> pb.DeleteCollectionResponse:
        """Delete a collection and its binding to a model; ``force``: with the speakers it holds."""
        return self.stub.DeleteCollection(pb.DeleteCollectionRequest(collection=collection, force=force), **self._kw)

    def models(self) -> pb.ListModelsResponse:
        """The served models and the default one."""
        return self.stub.ListModels(pb.ListModelsRequest(), **self._kw)
