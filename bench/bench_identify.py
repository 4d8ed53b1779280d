"""Identify latency through the service with score normalisation on vs off, at 100k voiceprints.

    .venv/bin/python bench/bench_identify.py [--speakers 100000] [--queries 300] [--repeats 3]

One run, two servers on the same data: a collection of ``--speakers`` voiceprints (each a
cohort voiceprint of ``ge2e`` plus noise, so S-norm statistics are realistic) is written
straight into a data directory with the store (fsync off), then
1. ``spkserve serve`` on the shipped ``ge2e`` (cohort + calibration: every candidate gets its
   S-norm and LLR from the cohort statistics kept with its voiceprint; the probe's statistics
   are computed once per query), and
2. the same server on a copy of ``ge2e`` whose ``model.json`` has no cohort or calibration
   (plain cosine),
each answer ``--queries`` Identify calls (top 5, embedding probes, so no inference is timed)
from one client at a time. Prints p50/p99 per setup (median over ``--repeats`` rounds) and the
ratio, as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embed import free_port  # noqa: E402


def populate(data_dir: Path, cohort: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Write ``n`` speakers into collection 'bench' of model ge2e; returns their voiceprints."""
    from service.store import LocalStore as SpeakerStore

    rng = np.random.default_rng(seed)
    base = cohort[rng.integers(0, len(cohort), n)]
    vecs = base + rng.standard_normal(base.shape).astype(np.float32) * 0.04
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    store = SpeakerStore(data_dir, fsync=False, snapshot_every=10 ** 9)
    for i in range(0, n, 1):
        store.enroll("bench", "ge2e", f"s{i:07d}", vecs[i:i + 1], speech=10.0)
    store.close()
    return vecs


def serve(repo: Path, data: Path) -> tuple[subprocess.Popen, str]:
    """Start a server subprocess over a data directory; (process, target)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port = free_port()
    env = {**os.environ, "SPKSERVE_FSYNC": "false", "SPKSERVE_MODELS": "ge2e"}
    p = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                          "--metrics-port", "-1", "--http-port", "0", "--model-repository", str(repo), "--data-dir", str(data),
                          "--log-level", "WARNING"], cwd=ROOT, env=env)
    target = f"127.0.0.1:{port}"
    end = time.monotonic() + 300
    with grpc.insecure_channel(target) as ch:
        while time.monotonic() < end:
            try:
                if health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return p, target
            except grpc.RpcError:
                time.sleep(0.5)
    p.kill()
    raise TimeoutError("server did not become ready")


def query(target: str, probes: np.ndarray) -> list[float]:
    """Identify latencies of the probes."""
    import grpc

    from service._proto.spkserve.v1 import speaker_pb2 as pb
    from service._proto.spkserve.v1 import speaker_pb2_grpc as pb_grpc

    out = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.SpeakerServiceStub(ch)
        stub.Identify(pb.IdentifyRequest(collection="bench", probe=pb.Probe(embedding=pb.Embedding(values=probes[0]))))
        for v in probes:
            t0 = time.perf_counter()
            r = stub.Identify(pb.IdentifyRequest(collection="bench", top_k=5, probe=pb.Probe(embedding=pb.Embedding(values=v))))
            out.append(time.perf_counter() - t0)
            assert r.candidates
    return out


def main() -> None:
    """Command line: Identify at 100k voiceprints, score normalisation on and off."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speakers", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    src = ROOT / "models" / "repository" / "ge2e"
    cohort = np.load(src / "cohort.npy")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        vecs = populate(tmp / "data", cohort, args.speakers)
        print(f"populated {args.speakers} voiceprints in {time.time() - t0:.0f} s", flush=True)
        repos = {"normalisation on (S-norm + LLR)": tmp / "repo-on", "normalisation off (cosine)": tmp / "repo-off"}
        shutil.copytree(src, repos["normalisation on (S-norm + LLR)"] / "ge2e")
        off = repos["normalisation off (cosine)"] / "ge2e"
        shutil.copytree(src, off)
        card = json.loads((off / "model.json").read_text())
        card.update(cohort=None, calibration=None, operating_point=None)
        (off / "model.json").write_text(json.dumps(card))
        rng = np.random.default_rng(1)
        probes = vecs[rng.integers(0, len(vecs), args.queries)] + rng.standard_normal((args.queries, vecs.shape[1])) * 0.02
        results = {name: [] for name in repos}
        for _ in range(args.repeats):
            for name, repo in repos.items():  # alternate, so both see the same machine state
                data = tmp / f"data-{len(results[name])}-{abs(hash(name))}"
                shutil.copytree(tmp / "data", data)
                p, target = serve(repo, data)
                try:
                    lat = query(target, probes)
                finally:
                    p.terminate()
                    p.wait(60)
                results[name].append((np.percentile(lat, 50) * 1000, np.percentile(lat, 99) * 1000))
    print(f"\nIdentify, {args.speakers:,} voiceprints (flat index), top 5, embedding probes, one client, "
          f"{args.queries} queries, median of {args.repeats} rounds\n")
    print("| setup | p50 ms | p99 ms |")
    print("|---|---:|---:|")
    med = {}
    for name, runs in results.items():
        med[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"| {name} | {med[name][0]:.2f} | {med[name][1]:.2f} |")
    on, off = med["normalisation on (S-norm + LLR)"], med["normalisation off (cosine)"]
    print(f"\np50 on / off: {on[0] / off[0]:.2f}; p99 on / off: {on[1] / off[1]:.2f}")


if __name__ == "__main__":
    main()
