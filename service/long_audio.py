"""Recordings too long to hold decoded: streamed to disk, decoded, screened and embedded window by window.

``EmbedStream`` accepts up to ``max_stream_audio_seconds`` (an hour by default), far more than a
unary request's ``max_audio_seconds``. Its bytes are spooled to a temporary file as they arrive
(in memory up to a few MiB, then on disk), and a stream whose audio fits ``max_audio_seconds`` is
decoded and embedded whole, exactly as a unary ``Embed``. A longer one is decoded in windows of
``LONG_WINDOW_SECONDS``: each window is resampled (one streaming resampler for the whole file),
screened by VAD and its speech embedded through the model's batcher, at most
``WINDOWS_IN_FLIGHT`` windows at a time; the recording's embedding is the mean of the windows'
unit embeddings weighted by their speech, normalised. Memory stays at a few windows whatever
the length; the price is that a window boundary can cut a speech segment (VAD restarts there)
and the mean of window embeddings is not bit-identical to one embedding of all the speech.
"""

from __future__ import annotations

import asyncio
import time
from typing import IO

import numpy as np

from models.audio import stream_windows
from models.vad import keep_speech

__all__ = ["LONG_WINDOW_SECONDS", "WINDOWS_IN_FLIGHT", "embed_long"]

LONG_WINDOW_SECONDS = 60.0
WINDOWS_IN_FLIGHT = 2


async def embed_long(engine, model, source: IO[bytes], field: str, max_seconds: float,
                     pcm: tuple[str, int, int] | None, deadline: float | None):
    """Embed a long recording held in ``source``: (unit embedding (D,), Speech summary, queue s, inference s).

    Raises:
        AudioError: bad audio (named by ``field``), or no speech the model can embed.
    """
    from models.audio import AudioError
    from service.inputs import Speech

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    windows = stream_windows(source, field, model.sample_rate, max_seconds, pcm, LONG_WINDOW_SECONDS)
    policy = engine.policies[model.name]
    rate = model.sample_rate

    def next_window():
        """Decode, VAD and keep the speech of the next window (on the decode pool); None at the end."""
        wave = next(windows, None)
        if wave is None:
            return None
        if policy.vad is None or engine.vad is None:
            return wave, [(0, len(wave))], len(wave), False
        segments, narrow = engine.vad.analyse(wave, rate, policy.vad)
        return keep_speech(wave, segments), segments, len(wave), narrow

    sums = np.zeros(model.dim, np.float64)
    speech_total, audio_total, narrow_windows, n_windows = 0.0, 0, 0, 0
    segments_all: list[tuple[float, float]] = []
    queue_s = inference_s = 0.0
    in_flight: set[asyncio.Task] = set()

    async def embed(speech: np.ndarray) -> None:
        nonlocal queue_s, inference_s, sums
        res = await engine.embed(model, speech, deadline)
        sums += res.embedding.astype(np.float64) * (len(speech) / rate)
        queue_s, inference_s = max(queue_s, res.queue_s), inference_s + res.inference_s

    try:
        while (item := await loop.run_in_executor(engine.decode_pool, next_window)) is not None:
            speech, segments, length, narrow = item
            offset = audio_total / rate
            segments_all += [(offset + a / rate, offset + b / rate) for a, b in segments]
            audio_total += length
            n_windows += 1
            narrow_windows += narrow
            if len(speech) / rate >= max(model.card.min_audio_seconds, 0.5):
                speech_total += len(speech) / rate
                in_flight.add(asyncio.ensure_future(embed(speech)))
            if len(in_flight) >= WINDOWS_IN_FLIGHT:
                done, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()
        if in_flight:
            for task in await asyncio.gather(*in_flight, return_exceptions=True):
                if isinstance(task, BaseException):
                    raise task
    finally:
        for task in in_flight:
            task.cancel()
    norm = float(np.linalg.norm(sums))
    if speech_total == 0 or norm == 0:
        raise AudioError(field, f"no speech found in {audio_total / rate:.2f} s of audio")
    summary = Speech(np.zeros(0, np.float32), speech_total, audio_total / rate, segments_all, policy.vad is not None,
                     time.perf_counter() - t0, narrow_windows > n_windows / 2)
    return (sums / norm).astype(np.float32), summary, queue_s, inference_s
