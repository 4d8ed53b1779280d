"""What the per-message idle timeout of the upload streams costs: ``asyncio.wait_for`` around each message.

EmbedStream and DiarizeStream (and so the HTTP ``:stream`` routes) wait for each message with
``asyncio.wait_for(..., stream_idle_timeout_seconds)``, so that a stalled upload ends instead of holding a handler.
This prints (1) that wrapper's own cost per message, timed in-process against a plain ``await`` on the same async
iterator (interleaved rounds, medians), and (2) EmbedStream calls on a server for a 30 s recording sent in chunks
of several sizes, with the wrapper's share of each call (messages x its cost / the call's time)::

    .venv/bin/python bench/bench_stream_messages.py [--rounds 5] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embed import Server  # noqa: E402


async def _drain(n: int, wrapped: bool) -> float:
    """Seconds to receive ``n`` messages from an async generator, each awaited plainly or through wait_for."""
    async def messages():
        for _ in range(n):
            yield b"x"

    it = messages().__aiter__()
    t0 = time.perf_counter()
    for _ in range(n):
        if wrapped:
            await asyncio.wait_for(it.__anext__(), 30.0)
        else:
            await it.__anext__()
    return time.perf_counter() - t0


def wrapper_cost_us(rounds: int, n: int = 100_000) -> tuple[float, float]:
    """(median µs per message plain, median µs per message through wait_for), interleaved rounds."""
    plain, wrapped = [], []
    for _ in range(rounds):
        plain.append(asyncio.run(_drain(n, False)) / n * 1e6)
        wrapped.append(asyncio.run(_drain(n, True)) / n * 1e6)
    return statistics.median(plain), statistics.median(wrapped)


def stream_call_ms(target: str, pcm: bytes, chunk: int, rounds: int) -> tuple[float, int]:
    """(median ms per EmbedStream call, messages per call) for ``pcm`` (16 kHz s16) sent ``chunk`` bytes at a time."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    config = pb.StreamConfig(pcm=pb.PcmFormat(sample_rate=16000, encoding=pb.PCM_S16LE, channels=1))

    def messages():
        yield pb.EmbedStreamRequest(config=config)
        for i in range(0, len(pcm), chunk):
            yield pb.EmbedStreamRequest(chunk=pcm[i:i + chunk])

    times = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.SpeakerServiceStub(ch)
        stub.EmbedStream(messages(), timeout=120)  # warm-up
        for _ in range(rounds):
            t0 = time.perf_counter()
            stub.EmbedStream(messages(), timeout=120)
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), 1 + -(-len(pcm) // chunk)


def main() -> None:
    """Print both tables."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of the streamed recording")
    args = ap.parse_args()
    plain, wrapped = wrapper_cost_us(args.rounds)
    cost = wrapped - plain
    print(f"per message: plain await {plain:.2f} us, through wait_for {wrapped:.2f} us: the wrapper costs {cost:.2f} us")
    import soundfile as sf

    wave, rate = sf.read(ROOT / "models" / "reference" / "audio" / "flite-slt-2.wav", dtype="int16")
    assert rate == 16000
    reps = int(np.ceil(args.seconds * rate / len(wave)))
    pcm = np.tile(wave, reps)[:int(args.seconds * rate)].astype("<i2").tobytes()
    server = Server(ROOT / "models" / "repository", None, models="ge2e")
    try:
        print(f"\n| {args.seconds:g} s in chunks of | messages | ms per EmbedStream call (median of {args.rounds}) | "
              "wait_for's share |")
        print("|---:|---:|---:|---:|")
        for chunk in (4 << 10, 64 << 10, 1 << 20):
            ms, n = stream_call_ms(server.target, pcm, chunk, args.rounds)
            print(f"| {chunk >> 10} KiB | {n} | {ms:.1f} | {100 * n * cost / 1000 / ms:.2f}% |")
    finally:
        server.close()


if __name__ == "__main__":
    main()
