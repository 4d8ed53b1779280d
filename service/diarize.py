"""Diarization on the service's own VAD, models and batcher: who spoke when in one recording.

The audio (a unary request's bytes or a stream's spool) is decoded in blocks of
``BLOCK_SECONDS`` by one streaming decoder and resampler (``models.audio.stream_windows``), so a
recording of an hour holds a block, its windows and the window embeddings in memory, never the
whole waveform. Each block is screened by the model's VAD on the decode pool, with two rule sets
in one pass of the network: ``models.diarization.diarization_vad`` finds the speech that is cut
into windows and embedded, ``diarization_speech_vad`` where the output's turns extend to (and
what ``speech`` reports). The windows go to the model's batcher together, at
most ``WINDOWS_IN_FLIGHT`` at a time, where they are batched with everyone else's utterances. The
request is admitted once, at the start (its own windows queued ahead of each other never count
as queueing, see ``Batcher.submit``); the deadline holds for every window. Clustering and
resegmentation (``models.diarization``) run on the decode pool.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import IO

import numpy as np

from models.audio import AudioError, stream_windows
from models.diarization import (
    DiarizationOptions,
    Turn,
    diarization_speech_vad,
    diarization_vad,
    diarize_embedded,
    speakers_of,
    speech_windows,
)

__all__ = ["BLOCK_SECONDS", "WINDOWS_IN_FLIGHT", "Diarization", "diarize_source"]

BLOCK_SECONDS = 60.0
WINDOWS_IN_FLIGHT = 64


@dataclass
class Diarization:
    """The turns and speakers of one recording, with what it cost."""

    turns: list[Turn]
    speaker_seconds: np.ndarray  # (k,) speech of each speaker
    prints: np.ndarray  # (k, D) unit voiceprint of each speaker
    speech_seconds: float  # speech found by VAD
    audio_seconds: float
    segments: list[tuple[float, float]]  # VAD's speech regions, seconds
    narrowband: bool
    vad_applied: bool
    decode_s: float  # decoding, VAD, clustering
    queue_s: float  # longest wait of a window for its batch
    inference_s: float  # model time of the windows (each batch's time shared among its utterances)


async def diarize_source(engine, model, source: IO[bytes], field: str, max_seconds: float,
                         pcm: tuple[str, int, int] | None, deadline: float | None,
                         opts: DiarizationOptions) -> Diarization:
    """Diarize the audio in ``source`` with ``model`` (see the module docstring).

    Raises:
        AudioError: bad audio (named by ``field``) or longer than ``max_seconds``.
        Overloaded: the server cannot take the work (at admission) or meet the deadline.
    """
    loop = asyncio.get_running_loop()
    engine.batchers[model.name].admit(deadline)
    rate = model.sample_rate
    policy = engine.policies[model.name]
    vad_opts = None if policy.vad is None or engine.vad is None else \
        [diarization_vad(policy.vad), diarization_speech_vad(policy.vad)]
    blocks = stream_windows(source, field, rate, max_seconds, pcm, BLOCK_SECONDS)
    min_samples = int(rate * max(model.card.min_audio_seconds, 0.1))
    decode_s = 0.0

    def next_block(offset: int):
        """Decode and screen the next block: (windows in samples of the recording, their waves, speech regions
        (the generous VAD's), block length, narrowband); None at the end."""
        wave = next(blocks, None)
        if wave is None:
            return None
        if vad_opts is None:
            regions = speech = ([(0, len(wave))] if len(wave) else [])
            narrow = False
        else:
            (regions, speech), narrow = engine.vad.analyse_many(wave, rate, vad_opts)
        wins = speech_windows(regions, rate, opts, offset, min_samples)
        return wins, [wave[a - offset:b - offset] for a, b in wins], [(a + offset, b + offset) for a, b in speech], \
            len(wave), narrow

    windows: list[tuple[int, int]] = []
    embs: list[np.ndarray] = []
    regions: list[tuple[int, int]] = []
    audio_total, narrow_blocks, n_blocks = 0, 0, 0
    queue_s = inference_s = 0.0

    async def embed(wave: np.ndarray) -> np.ndarray:
        nonlocal queue_s, inference_s
        res = await engine.embed(model, wave, deadline, admitted=True)  # admitted above, as a whole
        queue_s, inference_s = max(queue_s, res.queue_s), inference_s + res.inference_s / max(res.batch_size, 1)
        return res.embedding

    pending = None
    try:
        while True:
            t0 = time.perf_counter()
            pending = engine.decode_pool.submit(next_block, audio_total)
            item = await asyncio.wrap_future(pending)
            decode_s += time.perf_counter() - t0
            if item is None:
                break
            kept, waves, block_regions, length, narrow = item
            audio_total += length
            n_blocks += 1
            narrow_blocks += narrow
            regions += block_regions
            for i in range(0, len(waves), WINDOWS_IN_FLIGHT):
                part = waves[i:i + WINDOWS_IN_FLIGHT]
                tasks = [asyncio.ensure_future(embed(w)) for w in part]
                try:
                    embs += await asyncio.gather(*tasks)
                finally:
                    for task in tasks:
                        task.cancel()
            windows += kept
            del waves
    finally:  # a cancelled call: let a decode in progress end, then close the decoder before the source goes
        if pending is not None and not pending.done():
            try:
                await asyncio.wrap_future(pending)
            except BaseException:
                pass
        blocks.close()
    if audio_total == 0:
        raise AudioError(field, "holds no audio samples")
    emb = np.stack(embs) if embs else np.zeros((0, model.dim), np.float32)  # (N, D)
    t0 = time.perf_counter()
    turns, k = await loop.run_in_executor(engine.decode_pool, diarize_embedded, windows, emb, rate, opts, regions)
    seconds, prints = speakers_of(turns, emb, k)
    decode_s += time.perf_counter() - t0
    return Diarization(turns, seconds, prints, sum(b - a for a, b in regions) / rate, audio_total / rate,
                       [(a / rate, b / rate) for a, b in regions], narrow_blocks > n_blocks / 2, vad_opts is not None,
                       decode_s, queue_s, inference_s)
