"""Mixed-length traffic: the service vs raw ONNX Runtime in audio seconds per second, length
bucketing on vs off, next to an equal-length workload.

    .venv/bin/python bench/bench_mixed.py [--model ge2e] [--utterances 96] [--repeats 3]

One run, the same model and audio throughout (speech tiled to length):
- workloads: *mixed* (lengths uniform in 1-10 s, seeded) and *equal* (every utterance the
  mixed workload's mean length);
- raw: ``SpeakerModel.embed`` in this process, batches of 1..32 formed after sorting the
  workload by length (the best a batcher could do; the best batch size is the baseline), and
  in arrival order (what batching without regard to length does);
- the server (``spkserve serve``, VAD off so that both sides do the same work; fsync off) at
  concurrency 32 with length bucketing (``batch_min_fill`` 0.9, the default) and without
  (``batch_min_fill`` 0), and with VAD on (the default) for reference.
Figures are audio seconds embedded per second (median of ``--repeats``). Prints Markdown.

``--interleaved N`` then runs N rounds on the mixed workload with the three servers started
once: each round times raw ONNX Runtime (sorted, at the best batch found above) and then each
server, and the table gives the medians of the per-round ratios, so that a shared, noisy machine
moves both sides of every ratio together.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embed import Server, utterance  # noqa: E402


def raw(model, waves: list[np.ndarray], sort: bool, repeats: int, sizes=(1, 4, 8, 16, 32), steps_pool=None
        ) -> dict[int, float]:
    """Audio seconds per second of in-process batches of each size (median of ``repeats``; ``steps_pool``: each
    batch's input steps run side by side on it, as the server's inference workers run theirs)."""
    audio = sum(len(w) for w in waves) / 16000
    order = sorted(waves, key=len) if sort else waves
    out = {}
    for bs in sizes:
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(0, len(order), bs):
                model.embed(order[i:i + bs], steps_pool)
            rates.append(audio / (time.perf_counter() - t0))
        out[bs] = statistics.median(rates)
    return out


async def served(target: str, model: str, files: list[bytes], seconds: list[float], concurrency: int) -> float:
    """Audio seconds per second a server embeds for mixed-length files at a concurrency."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.SpeakerServiceStub(ch)
        reqs = [pb.EmbedRequest(model=model, audio=pb.Audio(encoded=f)) for f in files]
        await stub.Embed(reqs[0])
        queue = list(range(len(reqs)))

        async def worker():
            while queue:
                await stub.Embed(reqs[queue.pop()])

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return sum(seconds) / (time.perf_counter() - t0)


SETUPS = (("service, VAD off, bucketing on", {"vad": "false"}),
          ("service, VAD off, bucketing off", {"vad": "false", "batch_min_fill": 0}),
          ("service, VAD on, bucketing on", {}))


def interleaved(repo: Path, model, name: str, waves: list[np.ndarray], files: list[bytes], lengths: list[float],
                best_bs: int, rounds: int, fill: dict) -> None:
    """Per-round ratios of each server to raw ORT (sorted, ``best_bs``) on one workload; prints a table."""
    from concurrent.futures import ThreadPoolExecutor

    servers = {label: Server(repo, None, models=model.name, max_queue_wait_ms=0, **{**fill, **opts})
               for label, opts in SETUPS}
    ratios: dict[str, list[float]] = {label: [] for label in servers}
    pool = ThreadPoolExecutor(2)
    serial, pooled = [], []
    try:
        for srv in servers.values():
            asyncio.run(served(srv.target, model.name, files[:8], lengths[:8], 8))  # connect and warm up
        for _ in range(rounds):
            serial.append(raw(model, waves, True, 1, sizes=(best_bs,))[best_bs])
            pooled.append(raw(model, waves, True, 1, sizes=(best_bs,), steps_pool=pool)[best_bs])
            base = max(serial[-1], pooled[-1])  # raw best of this round
            for label, srv in servers.items():
                ratios[label].append(asyncio.run(served(srv.target, model.name, files, lengths, 32)) / base)
    finally:
        pool.shutdown()
        for srv in servers.values():
            srv.close()
    print(f"\nInterleaved, {name}: {rounds} rounds of raw ORT (batches of {best_bs} sorted by length; the better of "
          "input steps on one thread and on two) then each server at concurrency 32; medians of the per-round "
          f"ratios (raw with the steps on two threads / on one: "
          f"{statistics.median([p / s for p, s in zip(pooled, serial)]):.2f})\n")
    print("| setup | / raw best, same round | per round |")
    print("|---|---:|---|")
    for label, r in ratios.items():
        print(f"| {label} | {statistics.median(r):.2f} | {', '.join(f'{x:.2f}' for x in r)} |")


def main() -> int:
    """Command line: mixed 1-10 s traffic, raw ONNX Runtime against the servers."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ge2e")
    ap.add_argument("--utterances", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--min-fill", type=float, default=None, help="batch_min_fill of the bucketing runs (default: the server's)")
    ap.add_argument("--only", choices=["mixed", "equal"], help="run one workload")
    ap.add_argument("--interleaved", type=int, default=0, metavar="N", help="then N interleaved rounds on the mixed workload")
    args = ap.parse_args()
    from models.runtime import SpeakerModel

    repo = ROOT / "models" / "repository"
    rng = np.random.default_rng(0)
    mixed = [float(x) for x in rng.uniform(1.0, 10.0, args.utterances)]
    workloads = {"mixed 1-10 s": mixed, f"equal {np.mean(mixed):.1f} s": [float(np.mean(mixed))] * args.utterances}
    model = SpeakerModel(repo / args.model, ["CPUExecutionProvider"], intra_op_threads=args.threads)
    model.warmup()
    rows = []
    if args.only:
        workloads = {k: v for k, v in workloads.items() if k.startswith(args.only)}
    fill = {} if args.min_fill is None else {"batch_min_fill": args.min_fill}
    for name, lengths in workloads.items():
        waves = [utterance(s) for s in lengths]
        files = []
        for w in waves:
            buf = io.BytesIO()
            sf.write(buf, w, 16000, format="WAV")
            files.append(buf.getvalue())
        by_len = raw(model, waves, True, args.repeats)
        arrival = raw(model, waves, False, args.repeats)
        best_bs = max(by_len, key=by_len.get)
        best = by_len[best_bs]
        rows.append((name, f"raw ORT, batches of {best_bs} sorted by length (best)", best))
        rows.append((name, f"raw ORT, batches of {best_bs} in arrival order", arrival[best_bs]))
        print(f"  {name}: raw sorted {by_len}, arrival {arrival}", flush=True)
        if args.interleaved and name.startswith("mixed"):
            interleaved(repo, model, name, waves, files, lengths, best_bs, args.interleaved, fill)
        for label, opts in SETUPS:
            opts = {**fill, **opts}
            srv = Server(repo, None, models=args.model, max_queue_wait_ms=0, **opts)  # closed loop: no refusals
            try:
                rates = [asyncio.run(served(srv.target, args.model, files, lengths, 32)) for _ in range(args.repeats)]
            finally:
                srv.close()
            rows.append((name, f"{label}, concurrency 32", statistics.median(rates)))
            print(f"  {name}: {label}: {statistics.median(rates):.1f} audio s/s", flush=True)
    print(f"\nmodel {args.model}, {args.utterances} utterances per workload, {args.threads} ORT threads, "
          f"median of {args.repeats}\n")
    print("| workload | setup | audio s per s | vs raw best |")
    print("|---|---|---:|---:|")
    for name in workloads:
        best = next(r[2] for r in rows if r[0] == name)
        for wl, setup, rate in rows:
            if wl == name:
                print(f"| {wl} | {setup} | {rate:.1f} | {rate / best:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
