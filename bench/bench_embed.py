"""Embed throughput through gRPC vs raw in-process ONNX Runtime, and dynamic batching on vs off.

    .venv/bin/python bench/bench_embed.py [--model ge2e] [--seconds 3] [--requests 192] [--repeats 3]

Everything is measured in one run on the same model and the same audio:
1. raw: ``SpeakerModel.embed`` in this process at batch sizes 1..32 (utterances/s; the best is
   the baseline);
2. the server (``spkserve serve`` in a subprocess, batching on) under concurrency 1, 8, 32
   from an asyncio gRPC client, each request a WAV file;
3. the same server with batching off (max_batch_size=1) at concurrency 32;
4. the same server with voice activity detection off (``vad=false``) at concurrency 32, so
   VAD's share of the service's cost shows as a ratio measured in the same run;
5. Silero VAD alone (``models.vad``, one thread): seconds of VAD per second of audio at 3, 10
   and 60 s inputs.
6. interleaved rounds (``--pairs``): raw ORT at its best batch, then servers with VAD on, VAD off
   (both with the default inference threads: on CPU one single-threaded batch per core, up to 4),
   and VAD on with one inference worker using every core (the default before), each at concurrency 32;
   the ratios are medians of per-round ratios (robust to a shared machine's drift), with each
   server's CPU per request read from /proc.
Each figure of 1-5 is the median of ``--repeats`` runs; latencies are p50/p99 over all requests of
the median run. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def utterance(seconds: float) -> np.ndarray:
    """Real speech (committed reference audio) tiled to the requested length."""
    wave, _ = sf.read(ROOT / "models/reference/audio/espeak-en-1.wav", dtype="float32")
    reps = int(np.ceil(seconds * 16000 / len(wave)))
    return np.tile(wave, reps)[: int(seconds * 16000)]


def raw_rate(model, wave: np.ndarray, batch: int, n_batches: int, steps_pool=None) -> float:
    """Utterances per second of ``n_batches`` in-process batches of ``batch`` copies of ``wave`` (``steps_pool``: the
    input steps of a batch run side by side on it, as the server's inference workers run theirs)."""
    t0 = time.perf_counter()
    for _ in range(n_batches):
        model.embed([wave] * batch, steps_pool)
    return n_batches * batch / (time.perf_counter() - t0)


def bench_raw(model_dir: Path, wave: np.ndarray, threads: int, repeats: int) -> dict[int, float]:
    """Utterances per second of raw ONNX Runtime at each batch size."""
    from models.runtime import SpeakerModel

    model = SpeakerModel(model_dir, ["CPUExecutionProvider"], intra_op_threads=threads)
    model.warmup()
    out = {}
    for bs in (1, 4, 8, 16, 32):
        rates = []
        for _ in range(repeats):
            rates.append(raw_rate(model, wave, bs, max(2, 64 // bs)))
        out[bs] = statistics.median(rates)
    return out


def bench_vad(repeats: int) -> dict[float, float]:
    """Median seconds Silero VAD (one thread) takes for speech inputs of 3, 10 and 60 s."""
    from models.vad import SileroVad

    vad = SileroVad(intra_op_threads=1)
    out = {}
    for seconds in (3.0, 10.0, 60.0):
        wave = utterance(seconds)
        vad.segments(wave, 16000)
        times = []
        for _ in range(max(5, repeats)):
            t0 = time.perf_counter()
            vad.segments(wave, 16000)
            times.append(time.perf_counter() - t0)
        out[seconds] = statistics.median(times)
    return out


def die_with_parent() -> None:
    """Run in a child between fork and exec: Linux sends it SIGTERM when the process that started it dies, even by
    kill -9, so a bench that is stopped never leaves its server running (elsewhere: nothing)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Server:
    """A spkserve server subprocess for the benchmark (started on construction)."""
    def __init__(self, repo: Path, threads: int | None, **opts):
        """``threads``: ONNX Runtime intra-op threads per batch (None: the server's automatic setting)."""
        self.port, self.metrics_port = free_port(), free_port()
        self.tmp = tempfile.TemporaryDirectory()
        env = {**os.environ, **({"SPKSERVE_INTRA_OP_THREADS": str(threads)} if threads else {}), "SPKSERVE_FSYNC": "false",
               **{f"SPKSERVE_{k.upper()}": str(v) for k, v in opts.items()}}
        self.p = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
             "--metrics-port", str(self.metrics_port), "--http-port", "0", "--model-repository", str(repo),
             "--data-dir", self.tmp.name, "--log-level", "WARNING"],
            cwd=ROOT, env=env, preexec_fn=die_with_parent)
        self.target = f"127.0.0.1:{self.port}"
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        end = time.monotonic() + 120
        with grpc.insecure_channel(self.target) as ch:
            while time.monotonic() < end:
                try:
                    if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        return
                except grpc.RpcError:
                    time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def mean_batch(self) -> float:
        """Mean utterances per batch so far, from the server's metrics."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read().decode()
        vals = {ln.split("{")[0]: float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("spkserve_batch_size_")}
        return vals["spkserve_batch_size_sum"] / max(vals["spkserve_batch_size_count"], 1)

    def close(self) -> None:
        """Stop the server subprocess."""
        self.p.terminate()
        self.p.wait(30)
        self.tmp.cleanup()


async def load(target: str, model: str, data: bytes, concurrency: int, requests: int) -> tuple[float, list[float]]:
    """(requests per second, latencies) of concurrent Embed calls."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pb_grpc.SpeakerServiceStub(ch)
        req = pb.EmbedRequest(model=model, audio=pb.Audio(encoded=data))
        await stub.Embed(req)  # connect
        left = requests

        async def worker():
            nonlocal left
            while left > 0:
                left -= 1
                t0 = time.perf_counter()
                await stub.Embed(req)
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        return requests / (time.perf_counter() - t0), latencies


def run_load(target, model, data, concurrency, requests, repeats):
    """The median of several load runs."""
    runs = [asyncio.run(load(target, model, data, concurrency, requests)) for _ in range(repeats)]
    runs.sort(key=lambda r: r[0])
    rate, lat = runs[len(runs) // 2]
    return rate, float(np.percentile(lat, 50) * 1000), float(np.percentile(lat, 99) * 1000)


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def interleaved(repo: Path, model: str, wave: np.ndarray, data: bytes, threads: int, best_bs: int, requests: int,
                pairs: int) -> None:
    """The headline ratios from alternating runs: raw best batch, then each server, ``pairs`` times.

    On a shared machine throughput drifts by 20-40% between minutes; alternating short runs and
    taking the median of the per-round ratios cancels most of it. Server CPU per request comes
    from /proc (the whole process: gRPC, decode, VAD, batching, inference).
    """
    import resource

    from models.runtime import SpeakerModel

    from concurrent.futures import ThreadPoolExecutor

    model_rt = SpeakerModel(repo / model, ["CPUExecutionProvider"], intra_op_threads=threads)
    model_rt.warmup()
    steps_pool = ThreadPoolExecutor(max(2, threads))
    servers = {"VAD on (defaults)": Server(repo, None), "VAD off": Server(repo, None, vad="false"),
               f"VAD on, 1 inference worker x {threads} ORT threads": Server(repo, threads, inference_workers=1)}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
    idle: dict[str, list[float]] = {name: [] for name in servers}  # p50 ms at concurrency 1
    raw_rates, raw_serial, raw_pooled, client_cpu = [], [], [], []
    try:
        for srv in servers.values():
            asyncio.run(load(srv.target, model, data, 32, 64))  # connect and warm up
        for _ in range(pairs):
            raw_serial.append(raw_rate(model_rt, wave, best_bs, max(4, 128 // best_bs)))
            raw_pooled.append(raw_rate(model_rt, wave, best_bs, max(4, 128 // best_bs), steps_pool))
            raw_rates.append(max(raw_serial[-1], raw_pooled[-1]))  # raw best of this round
            for name, srv in servers.items():
                c0, cc0 = _proc_cpu(srv.p.pid), resource.getrusage(resource.RUSAGE_SELF)
                rate, _ = asyncio.run(load(srv.target, model, data, 32, requests))
                cc1 = resource.getrusage(resource.RUSAGE_SELF)
                rows[name].append((rate, (_proc_cpu(srv.p.pid) - c0) / requests))
                client_cpu.append((cc1.ru_utime + cc1.ru_stime - cc0.ru_utime - cc0.ru_stime) / requests)
                idle[name].append(float(np.percentile(asyncio.run(load(srv.target, model, data, 1, 30))[1], 50)) * 1000)
    finally:
        steps_pool.shutdown()
        for srv in servers.values():
            srv.close()
    med = statistics.median
    print(f"\nInterleaved: {pairs} rounds of raw ORT (batch {best_bs}) then each server at concurrency 32 "
          f"({requests} requests); medians of the per-round ratios")
    print("\n| server | utterances/s | / raw best, same round | / VAD off, same round | server CPU ms per request | "
          "p50 ms at concurrency 1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, runs in rows.items():
        vs_raw = med([r / raw for (r, _), raw in zip(runs, raw_rates)])
        vs_off = med([r / off for (r, _), (off, _) in zip(runs, rows["VAD off"])])  # noqa: B023
        print(f"| {name} | {med([r for r, _ in runs]):.1f} | {vs_raw:.2f} | {vs_off:.2f} | {med([c for _, c in runs]) * 1000:.1f} | "
              f"{med(idle[name]):.1f} |")
    print(f"| raw ORT in-process, batch {best_bs}, input steps on one thread | {med(raw_serial):.1f} | "
          f"{med([s / r for s, r in zip(raw_serial, raw_rates)]):.2f} | | | |")
    print(f"| raw ORT in-process, batch {best_bs}, input steps on {max(2, threads)} threads | {med(raw_pooled):.1f} | "
          f"{med([p / r for p, r in zip(raw_pooled, raw_rates)]):.2f} | | | |")
    print(f"\nload client CPU per request: {med(client_cpu) * 1000:.2f} ms")


def main() -> None:
    """Command line: service throughput against raw ONNX Runtime."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ge2e")
    ap.add_argument("--repository", default=str(ROOT / "models" / "repository"))
    ap.add_argument("--seconds", type=float, default=3.0, help="utterance length")
    ap.add_argument("--requests", type=int, default=192, help="requests per load run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="ONNX Runtime intra-op threads of raw ORT (the servers use their defaults)")
    ap.add_argument("--pairs", type=int, default=5, help="rounds of the interleaved comparison (0: skip it)")
    args = ap.parse_args()

    wave = utterance(args.seconds)
    buf = io.BytesIO()
    sf.write(buf, wave, 16000, format="WAV", subtype="PCM_16")
    data = buf.getvalue()
    repo = Path(args.repository)

    raw = bench_raw(repo / args.model, wave, args.threads, args.repeats)
    best_bs = max(raw, key=raw.get)
    rows = [("raw ORT in-process, batch " + str(bs), r, None, None) for bs, r in raw.items()]
    srv = Server(repo, None)
    try:
        results = {c: run_load(srv.target, args.model, data, c, args.requests, args.repeats) for c in (1, 8, 32)}
    finally:
        srv.close()
    srv = Server(repo, None, max_batch_size=1)
    try:
        nobatch = run_load(srv.target, args.model, data, 32, args.requests, args.repeats)
    finally:
        srv.close()
    srv = Server(repo, None, vad="false")
    try:
        novad = run_load(srv.target, args.model, data, 32, args.requests, args.repeats)
    finally:
        srv.close()
    vad_cost = bench_vad(args.repeats)

    print(f"\nmodel {args.model}, {args.seconds:.1f} s utterances (WAV), raw ORT {args.threads} threads, servers on their "
          f"default inference threads, "
          f"{os.cpu_count()} cores, median of {args.repeats} runs\n")
    print("| setup | utterances/s | vs raw best | p50 ms | p99 ms |")
    print("|---|---:|---:|---:|---:|")
    for name, rate, p50, p99 in rows:
        print(f"| {name} | {rate:.1f} | {rate / raw[best_bs]:.2f} | | |")
    for c, (rate, p50, p99) in results.items():
        print(f"| gRPC, batching on, concurrency {c} | {rate:.1f} | {rate / raw[best_bs]:.2f} | {p50:.1f} | {p99:.1f} |")
    rate, p50, p99 = nobatch
    print(f"| gRPC, batching off, concurrency 32 | {rate:.1f} | {rate / raw[best_bs]:.2f} | {p50:.1f} | {p99:.1f} |")
    rate_nv, p50_nv, p99_nv = novad
    print(f"| gRPC, batching on, VAD off, concurrency 32 | {rate_nv:.1f} | {rate_nv / raw[best_bs]:.2f} | {p50_nv:.1f} | {p99_nv:.1f} |")
    on = results[32][0]
    print(f"\nbatching on / off throughput at concurrency 32: {on / rate:.2f}x")
    print(f"VAD on / off throughput at concurrency 32: {on / rate_nv:.2f}")
    print(f"service at concurrency 32 / raw best (batch {best_bs}): {on / raw[best_bs]:.2f}")
    print("\n| input | VAD ms | VAD s per audio s |")
    print("|---:|---:|---:|")
    for seconds, took in vad_cost.items():
        print(f"| {seconds:.0f} s | {took * 1000:.2f} | {took / seconds:.5f} |")
    if args.pairs:
        interleaved(repo, args.model, wave, data, args.threads, best_bs, args.requests, args.pairs)


if __name__ == "__main__":
    main()
