"""Client-streamed uploads: ``EmbedStream`` (a mixin of ``SpeakerServicer``).

Messages arrive as a config then chunks of one file (encoded, split anywhere) or of raw PCM.
They are checked as they arrive (message count, empty chunks, the byte budget, an encoded
header's declared length) and spooled to a temporary file: in memory up to ``_SPOOL_IN_MEMORY``,
on disk beyond it. A stream whose audio fits ``max_audio_seconds`` is then embedded exactly as a
unary ``Embed`` of the same bytes; a longer one (up to ``max_stream_audio_seconds``) window by
window in bounded memory (``service.long_audio``).
"""

from __future__ import annotations

import asyncio
import tempfile

import soundfile as sf

from models.audio import AudioLimits, check_header, check_pcm_format, probe_header
from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.convert import merge_timings, ms, pcm_encoding, speech_pb
from service.errors import DeadlineExceeded, InvalidArgument
from service.inputs import AudioInput
from service.long_audio import embed_long
from service.rpc import call_deadline
from service.rpc import rpc as _rpc

__all__ = ["StreamRpcs"]

_SPOOL_IN_MEMORY = 8 << 20
_PCM_WIDTH = {pb.PCM_S16LE: 2, pb.PCM_S32LE: 4, pb.PCM_F32LE: 4}


class StreamRpcs:
    """Mixin of ``SpeakerServicer`` (uses its ``engine``, ``_allow``, ``_embed_only`` and ``_observe_speech``)."""

    async def _receive(self, request_iterator):
        """Check and spool a config-then-chunks stream: (config, spooled file, bytes)."""
        cfg = self.engine.config
        limit = cfg.max_stream_mb * 1024 * 1024
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY)
        config, size, index, probed, next_probe, head = None, 0, 0, False, 4096, bytearray()
        idle = cfg.stream_idle_timeout_seconds
        iterator = request_iterator.__aiter__()
        try:
            while True:
                try:  # an upload that stalls does not hold its spool and a handler forever
                    msg = await asyncio.wait_for(iterator.__anext__(), idle)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise DeadlineExceeded(f"chunk: no message for {idle:g} s after message {index} "
                                           "(stream_idle_timeout_seconds)") from None
                part = msg.WhichOneof("part")
                if index >= cfg.max_stream_messages:
                    raise InvalidArgument("chunk", f"the stream exceeds {cfg.max_stream_messages:,} messages "
                                                   "(max_stream_messages); send chunks of a few KiB or more")
                if index == 0 and part != "config":
                    raise InvalidArgument("config", "the first message must carry config")
                if index > 0 and part == "config":
                    raise InvalidArgument("config", f"sent again in message {index}; only the first message carries it")
                if part == "config":
                    config = msg.config
                    if config.HasField("pcm"):  # the byte budget of max_stream_audio_seconds, known up front
                        fmt = config.pcm
                        check_pcm_format(fmt.sample_rate, fmt.channels or 1, "config.pcm")
                        width = _PCM_WIDTH.get(fmt.encoding, 4) * (fmt.channels or 1)
                        limit = min(limit, int((cfg.max_stream_audio_seconds + 1) * fmt.sample_rate * width))
                elif part == "chunk":
                    if not msg.chunk:
                        raise InvalidArgument("chunk", f"message {index} is an empty chunk")
                    spool.write(msg.chunk)
                    size += len(msg.chunk)
                    if size > limit:
                        raise InvalidArgument("chunk", f"the stream exceeds {limit:,} bytes (max_stream_mb="
                                                       f"{cfg.max_stream_mb} MiB, max_stream_audio_seconds="
                                                       f"{cfg.max_stream_audio_seconds:g})")
                    if not probed and not config.HasField("pcm"):
                        # an encoded stream's header declares rate, channels and length: refuse bombs early
                        # (looked for at 4 KiB, 8 KiB, ... 1 MiB of the stream's head)
                        if len(head) < 1 << 20:
                            head += msg.chunk[: (1 << 20) - len(head)]
                        if size >= next_probe:
                            header = probe_header(bytes(head))
                            if header is not None:
                                check_header("chunk", *header, AudioLimits(0.0, cfg.max_stream_audio_seconds))
                            probed = header is not None or size >= 1 << 20
                            next_probe = 2 * size
                else:
                    raise InvalidArgument("part", f"message {index} is empty: set config or chunk")
                index += 1
        except BaseException:
            spool.close()
            raise
        if config is None:
            spool.close()
            raise InvalidArgument("config", "the stream carried no messages")
        spool.seek(0)
        return config, spool, size

    def _stream_seconds(self, config, spool, size: int) -> float | None:
        """The stream's audio duration, None when an encoded file does not declare it."""
        if config.HasField("pcm"):
            fmt = config.pcm
            return size / (_PCM_WIDTH.get(fmt.encoding, 4) * (fmt.channels or 1)) / fmt.sample_rate
        try:
            info = sf.info(spool)
        except Exception:  # noqa: BLE001 - not audio: the decoder says so with its field
            return 0.0
        finally:
            spool.seek(0)
        return info.frames / info.samplerate if 0 < info.frames < (1 << 62) and info.samplerate > 0 else None

    @_rpc
    async def EmbedStream(self, request_iterator, context) -> pb.EmbedResponse:
        """Client-streamed audio: config first, then chunks (see the proto)."""
        self._allow(context, "read")
        config, spool, size = await self._receive(request_iterator)
        with spool:
            model = self.engine.model(config.model, "config.model")
            pcm = None
            if config.HasField("pcm"):
                fmt = config.pcm
                pcm = (pcm_encoding(fmt.encoding, "config.pcm.encoding"), fmt.sample_rate, fmt.channels or 1)
            seconds = self._stream_seconds(config, spool, size)
            if seconds is not None and seconds <= self.engine.config.max_audio_seconds:
                data = spool.read()  # fits a unary request's limit: embedded exactly as Embed would
                audio = AudioInput(data, "chunk", *pcm) if pcm else AudioInput(data, "chunk")
                emb, speech, timings = await self._embed_only(model, audio, "EmbedStream", context)
            else:
                emb, speech, queue_s, inference_s = await embed_long(
                    self.engine, model, spool, "chunk", self.engine.config.max_stream_audio_seconds, pcm,
                    call_deadline(context))
                self._observe_speech(model, "EmbedStream", speech, "")
                timings = merge_timings([pb.Timings(decode_ms=ms(speech.decode_s), queue_ms=ms(queue_s),
                                                    inference_ms=ms(inference_s), execution_provider=model.provider)],
                                        speech.decode_s)
        return pb.EmbedResponse(embedding=emb.tolist(), model=model.name, model_version=model.card.version,
                                speech_seconds=speech.speech_seconds, timings=timings, speech=speech_pb(speech))
