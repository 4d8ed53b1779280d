"""Goodput and tail latency under overload: admission by estimated wait vs the plain FIFO.

    .venv/bin/python bench/bench_overload.py [--load 4] [--seconds 20] [--deadline 2] [--repeats 3]
        [--before DIR]
    .venv/bin/python bench/bench_overload.py --concurrency 256 --deadline 1 [--seconds 20] [--repeats 3]

The second form is the short-deadline storm: ``--concurrency`` callers in a closed loop, each call
with a ``--deadline`` s deadline, waiting the server's ``grpc-retry-pushback-ms`` after a refusal
(as gRPC clients with a retry policy do), against the server as it is (and, with ``--before DIR``,
an older checkout's, the two measured in alternate rounds); it prints goodput against the capacity
measured first, the p50/p99 time to a refusal (RESOURCE_EXHAUSTED), and the share of the
utterances the model ran whose caller had already given up (``spkserve_batch_wasted_total`` over
the utterances run, read from the server's metrics).

One run, two servers in turn on the same machine and the same audio (a 3 s real recording,
resampled to 16 kHz): ``spkserve serve`` on ``ge2e``
1. as it is ("after": admission by estimated wait, ``max_queue_wait_ms`` 2000), and
2. with ``max_queue_wait_ms = 0`` and the deadline check off, or, with ``--before DIR``, the
   code of an older checkout in DIR (e.g. ``git worktree add /tmp/before <commit>``): "before".
For each, capacity is measured first (closed loop, 8 callers, 8 s), then Poisson arrivals at
``--load`` x capacity for ``--seconds``, every call with a ``--deadline`` s deadline. Goodput:
calls answered OK per second; p50/p99 of the OK calls; how many were refused at once
(RESOURCE_EXHAUSTED) and how many ran out of deadline. Medians over ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embed import free_port  # noqa: E402


def start(code_root: Path, port: int, data: str, extra: dict, metrics_port: int = -1) -> subprocess.Popen:
    """Start a server subprocess with the given options."""
    env = dict(os.environ, PYTHONPATH=str(code_root), SPKSERVE_MODELS="ge2e", SPKSERVE_INTRA_OP_THREADS="1",
               SPKSERVE_HTTP_PORT="0",
               **{f"SPKSERVE_{k.upper()}": str(v) for k, v in extra.items()})
    return subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port),
                             "--metrics-port", str(metrics_port),
                             "--host", "127.0.0.1", "--data-dir", data, "--log-level", "WARNING",
                             "--model-repository", str(code_root / "models" / "repository")],
                            cwd=code_root, env=env)


async def wait_ready(stub_mod, target: str) -> None:
    """Wait until the server's health check says SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(target) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for _ in range(600):
            try:
                r = await h.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("server did not become ready")


async def capacity(stub, request, seconds: float = 8.0, callers: int = 8) -> float:
    """Requests per second a server completes under closed-loop load."""
    done, end = 0, time.monotonic() + seconds

    async def caller():
        nonlocal done
        while time.monotonic() < end:
            await stub.Embed(request, timeout=30)
            done += 1

    await asyncio.gather(*[caller() for _ in range(callers)])
    return done / seconds


async def open_loop(stub, request, rate: float, seconds: float, deadline: float, seed: int) -> dict:
    """Offer requests at a fixed rate with a deadline; what was answered, refused and late."""
    import grpc

    rng = random.Random(seed)
    ok, refused, expired, other = [], 0, 0, 0

    async def one():
        nonlocal refused, expired, other
        t0 = time.monotonic()
        try:
            await stub.Embed(request, timeout=deadline)
            ok.append(time.monotonic() - t0)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                refused += 1
            elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                expired += 1
            else:
                other += 1

    tasks, t, start_t = [], 0.0, time.monotonic()
    while t < seconds:
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, start_t + t - time.monotonic()))
        tasks.append(asyncio.ensure_future(one()))
    await asyncio.gather(*tasks)
    ok.sort()
    pct = lambda q: ok[min(len(ok) - 1, int(q * len(ok)))] if ok else float("nan")  # noqa: E731
    return {"sent": len(tasks), "goodput": len(ok) / seconds, "p50": pct(0.5), "p99": pct(0.99),
            "refused": refused, "expired": expired, "other": other}


@contextlib.asynccontextmanager
async def served(code_root: Path, extra: dict, metrics_port: int = -1):
    """A server of ``code_root``'s code in its own process, stopped on exit: yields a SpeakerService stub."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    port = free_port()
    with tempfile.TemporaryDirectory() as data:
        proc = start(code_root, port, data, extra, metrics_port)
        try:
            target = f"127.0.0.1:{port}"
            await wait_ready(pb_grpc, target)
            async with grpc.aio.insecure_channel(target) as ch:
                yield pb_grpc.SpeakerServiceStub(ch)
        finally:
            proc.terminate()
            proc.wait(30)


async def measure(code_root: Path, extra: dict, args, audio: bytes) -> list[dict]:
    """The overload table's rows for one server configuration."""
    from service._proto.spkserve.v1 import speaker_pb2 as pb

    async with served(code_root, extra) as stub:
        req = pb.EmbedRequest(audio=pb.Audio(encoded=audio))
        rounds = []
        for r in range(args.repeats):
            cap = await capacity(stub, req)
            res = await open_loop(stub, req, args.load * cap, args.seconds, args.deadline, seed=r)
            res["capacity"] = cap
            rounds.append(res)
            print(f"  round {r + 1}: {res}", flush=True)
            await asyncio.sleep(2)
        return rounds


async def storm(stub, request, callers: int, seconds: float, deadline: float) -> dict:
    """``callers`` in a closed loop, every call with ``deadline``: OK count, refusal latencies, expiries."""
    import grpc

    ok, refusals, expired, other = 0, [], 0, 0
    end = time.monotonic() + seconds

    async def caller():
        nonlocal ok, expired, other
        while time.monotonic() < end:
            t0 = time.monotonic()
            try:
                await stub.Embed(request, timeout=deadline)
                ok += 1
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    refusals.append(time.monotonic() - t0)
                    # a client with a retry policy: it waits the server's pushback before trying again
                    pushback = dict(e.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
                    await asyncio.sleep(min(float(pushback) / 1000, 5.0) if pushback else 0.05)
                elif e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    expired += 1
                else:
                    other += 1

    await asyncio.gather(*[caller() for _ in range(callers)])
    refusals.sort()
    pct = lambda q: refusals[min(len(refusals) - 1, int(q * len(refusals)))] if refusals else float("nan")  # noqa: E731
    return {"goodput": ok / seconds, "refused": len(refusals), "refusal_p50": pct(0.5), "refusal_p99": pct(0.99),
            "expired": expired, "other": other}


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


async def measure_storm(args, audio: bytes, roots: dict[str, Path]) -> dict[str, list[dict]]:
    """Storm rounds against every code root's server, interleaved: all servers are started once, and each round
    measures each in turn (capacity, then the storm), so the machine's drift falls on all of them alike."""
    import urllib.request

    from service._proto.spkserve.v1 import speaker_pb2 as pb

    req = pb.EmbedRequest(audio=pb.Audio(encoded=audio))
    async with contextlib.AsyncExitStack() as stack:
        servers = {}
        for name, root in roots.items():
            mport = free_port()
            servers[name] = (await stack.enter_async_context(served(root, {}, mport)), mport)
        rounds: dict[str, list[dict]] = {name: [] for name in roots}
        for r in range(args.repeats):
            for name, (stub, mport) in servers.items():
                url = f"http://127.0.0.1:{mport}/metrics"
                scrape = lambda: urllib.request.urlopen(url).read().decode()  # noqa: E731
                cap = await capacity(stub, req)
                before = scrape()
                res = await storm(stub, req, args.concurrency, args.seconds, args.deadline)
                await asyncio.sleep(1.0)
                after = scrape()
                run = _metric(after, "spkserve_batch_size_sum") - _metric(before, "spkserve_batch_size_sum")
                # wasted: utterances the model ran that did not become an answer the client took in time
                res.update(capacity=cap, wasted_share=max(0.0, run - res["goodput"] * args.seconds) / max(run, 1.0))
                rounds[name].append(res)
                print(f"  round {r + 1}, {name}: {res}", flush=True)
                await asyncio.sleep(2)
        return rounds


def main() -> int:
    """Command line: admission by estimated wait against plain FIFO."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", type=float, default=4.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--deadline", type=float, default=2.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--before", type=Path, help="checkout of the older code to compare with")
    ap.add_argument("--concurrency", type=int, default=0, help="the closed-loop storm with this many callers")
    args = ap.parse_args()
    import io

    import soundfile as sf

    wav, sr = sf.read(sorted((ROOT / "models" / "reference" / "audio").glob("*.wav"))[0], dtype="float32")
    buf = io.BytesIO()
    sf.write(buf, wav[: 3 * sr] if wav.ndim == 1 else wav[: 3 * sr, 0], sr, format="WAV")
    audio = buf.getvalue()
    if args.concurrency:
        roots = {"this checkout": ROOT, **({"before": args.before.resolve()} if args.before else {})}
        results = asyncio.run(measure_storm(args, audio, roots))
        print("\n| code | callers | deadline s | capacity req/s | goodput req/s | goodput / capacity | refusal p50 ms | "
              "refusal p99 ms | wasted inference |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, rows in results.items():
            med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
            print(f"| {name} | {args.concurrency} | {args.deadline:g} | {med('capacity'):.1f} | {med('goodput'):.1f} | "
                  f"{statistics.median(r['goodput'] / r['capacity'] for r in rows):.2f} | "
                  f"{1000 * med('refusal_p50'):.0f} | "
                  f"{1000 * med('refusal_p99'):.0f} | {100 * med('wasted_share'):.1f}% |")
        return 0
    setups = {"after (admission by estimated wait)": (ROOT, {})}
    if args.before:
        setups["before"] = (args.before.resolve(), {})
    else:
        setups["before (max_queue_wait_ms=0: FIFO to max_queue)"] = (ROOT, {"max_queue_wait_ms": 0})
    table = {}
    for name, (root, extra) in setups.items():
        print(name, flush=True)
        table[name] = asyncio.run(measure(root, extra, args, audio))
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    print("\n| setup | capacity req/s | offered req/s | goodput req/s | p50 s | p99 s | refused | deadline expired |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, rows in table.items():
        print(f"| {name} | {med(rows, 'capacity'):.1f} | {args.load * med(rows, 'capacity'):.1f} | "
              f"{med(rows, 'goodput'):.1f} | {med(rows, 'p50'):.2f} | {med(rows, 'p99'):.2f} | "
              f"{med(rows, 'refused'):.0f} | {med(rows, 'expired'):.0f} |")
    names = list(table)
    print(f"\ngoodput ratio after/before: {med(table[names[0]], 'goodput') / max(med(table[names[1]], 'goodput'), 1e-9):.2f}; "
          f"p99 ratio: {med(table[names[0]], 'p99') / med(table[names[1]], 'p99'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
