"""Protobuf <-> service values: audio inputs, speech reports, speakers, scales and verdicts.

Kept apart from the servicer so the RPC handlers read as validate -> engine -> respond.
"""

from __future__ import annotations

import numpy as np

from service._proto.spkserve.v1 import speaker_pb2 as pb
from service.decisions import ACCEPT, NOT_ENOUGH_SPEECH, REJECT, is_ready
from service.errors import InvalidArgument
from service.inputs import AudioInput, Speech
from service.store import SpeakerRecord

__all__ = ["audio_input", "speech_pb", "speaker_pb", "scale_of", "SCALE_PB", "VERDICT_PB", "speaker_status", "ms",
           "merge_timings"]

_ENCODINGS = {pb.PCM_S16LE: "PCM_S16LE", pb.PCM_S32LE: "PCM_S32LE", pb.PCM_F32LE: "PCM_F32LE"}
_SCALES = {pb.SCORE_SCALE_UNSPECIFIED: "cosine", pb.SCORE_SCALE_COSINE: "cosine",
           pb.SCORE_SCALE_NORMALIZED: "normalized", pb.SCORE_SCALE_LLR: "llr"}
SCALE_PB = {"cosine": pb.SCORE_SCALE_COSINE, "normalized": pb.SCORE_SCALE_NORMALIZED, "llr": pb.SCORE_SCALE_LLR}
VERDICT_PB = {ACCEPT: pb.VERDICT_ACCEPT, REJECT: pb.VERDICT_REJECT, NOT_ENOUGH_SPEECH: pb.VERDICT_NOT_ENOUGH_SPEECH}


def pcm_encoding(value: int, field: str) -> str:
    """The PCM encoding name of an enum value, or InvalidArgument naming ``field``."""
    if value not in _ENCODINGS:
        raise InvalidArgument(field, f"must be one of {sorted(_ENCODINGS.values())}, got {value}")
    return _ENCODINGS[value]


def audio_input(audio: pb.Audio, field: str) -> AudioInput:
    """The engine's view of an ``Audio`` message."""
    kind = audio.WhichOneof("source")
    if kind == "encoded":
        return AudioInput(audio.encoded, field)
    if kind == "pcm":
        fmt = audio.pcm.format
        encoding = pcm_encoding(fmt.encoding, f"{field}.pcm.format.encoding")
        return AudioInput(audio.pcm.data, field, encoding, fmt.sample_rate, fmt.channels or 1)
    raise InvalidArgument(field, "is empty: set audio.encoded or audio.pcm")


def check_embedding_model(embedding: pb.Embedding, model: str, field: str) -> None:
    """InvalidArgument naming ``field.model`` when a client-given embedding says another model made it.

    An embedding that names no model, or a request with no model yet (``model`` empty), passes.
    """
    if embedding.model and model and embedding.model != model:
        raise InvalidArgument(f"{field}.model", f"is {embedding.model!r}, but this request uses model {model!r}: "
                              "embeddings of different models live in different spaces and cannot be mixed")


def scale_of(value: int, field: str) -> str:
    """The scale name of a ``ScoreScale`` value (unspecified means cosine)."""
    if value not in _SCALES:
        raise InvalidArgument(field, f"unknown score scale {value}; use one of {sorted(pb.ScoreScale.keys())}")
    return _SCALES[value]


def speech_pb(speech: Speech | None) -> pb.SpeechInfo | None:
    """The ``SpeechInfo`` of a VAD result (None for non-audio sides)."""
    if speech is None:
        return None
    return pb.SpeechInfo(
        speech_seconds=speech.speech_seconds, audio_seconds=speech.audio_seconds, vad_applied=speech.vad_applied,
        segments=[pb.SpeechSegment(start_seconds=a, end_seconds=b) for a, b in speech.segments],
        narrowband=speech.narrowband, multiple_speakers=speech.multiple_speakers,
        self_consistency_llr=speech.self_consistency)


def speaker_status(speech: float | None, required: float) -> int:
    """READY, NEEDS_MORE_SPEECH or NO_SPEECH for a speaker's enrolled speech."""
    if is_ready(speech, required):
        return pb.ENROLLMENT_STATUS_READY
    return pb.ENROLLMENT_STATUS_NO_SPEECH if not speech else pb.ENROLLMENT_STATUS_NEEDS_MORE_SPEECH


def speaker_pb(collection: str, model: str, rec: SpeakerRecord, required: float, voiceprint: bool = False) -> pb.Speaker:
    """The ``Speaker`` message of a store record."""
    return pb.Speaker(
        collection=collection, speaker_id=rec.speaker_id, utterance_count=rec.count, metadata=rec.metadata,
        model=model, created_unix_ms=rec.created_ms, updated_unix_ms=rec.updated_ms,
        voiceprint=rec.voiceprint.tolist() if voiceprint else [],
        speech_seconds=rec.speech or 0.0, required_speech_seconds=required, status=speaker_status(rec.speech, required))


def ms(seconds: float) -> float:
    """Seconds to milliseconds."""
    return seconds * 1000.0


def merge_timings(parts: list[pb.Timings], total_s: float) -> pb.Timings:
    """Timings of a request made of parallel parts: the longest of each, and the request's total."""
    return pb.Timings(decode_ms=max((t.decode_ms for t in parts), default=0.0),
                      queue_ms=max((t.queue_ms for t in parts), default=0.0),
                      inference_ms=max((t.inference_ms for t in parts), default=0.0), total_ms=ms(total_s),
                      execution_provider=next((t.execution_provider for t in parts if t.execution_provider), ""))


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """(T,) float32 in [-1, 1] -> (T,) int16 (retained enrollment speech)."""
    return np.round(np.clip(wave, -1.0, 1.0) * 32767.0).astype(np.int16)
