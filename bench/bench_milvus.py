"""Speaker search and enrollment: the embedded FAISS store vs a Milvus server.

    bash scripts/milvus_server.sh start 19549
    .venv/bin/python bench/bench_milvus.py --uri http://127.0.0.1:19549 [--sizes 10000 100000] [--queries 200]
    bash scripts/milvus_server.sh stop

One run, the same voiceprints and probes for every setup: ``--sizes`` random unit 256-d
voiceprints are written straight into each store (FAISS: the local store with fsync off;
Milvus: rows inserted in batches into the collections ``MilvusStore`` uses, then indexed FLAT or
HNSW M=32), then ``--queries`` probes (a stored voiceprint plus noise, one at a time) go through
each store's ``search`` (top 10). Reported: p50/p99 latency, recall@10 against exact search,
hit@1 (the probed speaker first). Then enrollment throughput through ``MilvusStore.enroll``
(delta insert, recompute, verify) with one writer process and with two (two replicas writing
at once), each enrolling one speaker at a time and ``--enroll-threads`` at once (what a server's
store pool does under concurrent Enroll calls), against the embedded store's.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIM = 256
_NAMES = {"flat": "FLAT", "hnsw": "HNSW", "ivf": "IVF_FLAT"}


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def timed_search(store, probes: np.ndarray, k: int = 10) -> tuple[list[float], list[list[str]]]:
    """Each probe's search latency and top-k ids."""
    times, ids = [], []
    for p in probes:
        t0 = time.perf_counter()
        hits = store.search("bench", "m", p, k)
        times.append(time.perf_counter() - t0)
        ids.append([r.speaker_id for r, _ in hits])
    return times, ids


def quality(ids: list[list[str]], exact: list[list[str]], truth: list[str]) -> tuple[float, float]:
    """(recall@k against exact search, hit@1 against the true speaker)."""
    recall = float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, exact)]))
    hit1 = float(np.mean([a[:1] == [t] for a, t in zip(ids, truth)]))
    return recall, hit1


def index_options(index: str, n: int):
    """Search index settings of the benchmark: HNSW M=32 ef 128; IVF_FLAT with about 4 sqrt(N) lists, nprobe 32."""
    from service.store import IndexOptions

    return IndexOptions(index_type=index, hnsw_ef_search=128, ivf_nlist=int(4 * np.sqrt(n)), ivf_nprobe=32)


def milvus_store(uri: str, db: str, index: str, n: int = 0):
    """A MilvusStore on a server with one index kind."""
    from service.store.milvus import MilvusStore

    return MilvusStore(uri, db=db, options=index_options(index, max(n, 1)))


def reindex_milvus(uri: str, db: str, index: str, n: int) -> None:
    """Replace the voiceprint collection's index with ``index`` (the rows stay; saves inserting them again)."""
    from service.store.milvus import milvus_name

    store = milvus_store(uri, db, index, n)
    name = milvus_name("spkv_", "bench")
    store.client.release_collection(name)
    store.client.drop_index(name, "vec")
    store.client.create_index(name, store.vector_index_params(index))
    store.client.load_collection(name)
    store.close()


def populate_milvus(uri: str, vecs: np.ndarray, index: str) -> str:
    """Insert the vectors into a Milvus collection with one index kind; its name."""
    from pymilvus import MilvusClient

    from service.store.milvus import milvus_name

    db = f"b{uuid.uuid4().hex[:10]}"
    MilvusClient(uri=uri).create_database(db)
    store = milvus_store(uri, db, index, len(vecs))
    store._bind("bench", "m", "1", DIM)
    now = int(time.time() * 1000)
    name = milvus_name("spkv_", "bench")
    for i in range(0, len(vecs), 2000):
        rows = [{"pk": f"s{j:07d}", "sum": {"v": vecs[j].astype(float).tolist()}, "count": 1, "speech": 10.0,
                 "meta": {}, "created": now, "updated": now, "deltas": 1, "vec": vecs[j].tolist()}
                for j in range(i, min(i + 2000, len(vecs)))]
        store.client.insert(name, rows)
    store.client.flush(name)
    store.client.load_collection(name)
    return db


def _writer(args) -> tuple[int, list[float]]:
    """One replica: ``threads`` concurrent enrollers (a server's store pool) over ``n`` new speakers; returns (n, latencies)."""
    from concurrent.futures import ThreadPoolExecutor

    uri, db, start, n, threads = args
    store = milvus_store(uri, db, "flat")
    rng = np.random.default_rng(start)
    vecs = unit(rng.normal(size=(n, 1, DIM)))

    def one(i: int) -> float:
        t0 = time.perf_counter()
        store.enroll("enr", "m", f"w{start + i:06d}", vecs[i], model_version="1")
        return time.perf_counter() - t0

    with ThreadPoolExecutor(threads) as pool:
        latencies = list(pool.map(one, range(n)))
    return n, latencies


def enroll_rate(uri: str, writers: int, n: int, threads: int = 1) -> tuple[float, float]:
    """(enrolls/s over all writers, median latency of one enroll in s)."""
    from pymilvus import MilvusClient

    from service.store.milvus import drop_database

    db = f"e{uuid.uuid4().hex[:10]}"
    MilvusClient(uri=uri).create_database(db)
    try:
        _writer((uri, db, 10 ** 6, 1, 1))  # create the collections first
        t0 = time.perf_counter()
        with mp.get_context("spawn").Pool(writers) as pool:
            results = pool.map(_writer, [(uri, db, k * n, n, threads) for k in range(writers)])
        rate = sum(r[0] for r in results) / (time.perf_counter() - t0)
        return rate, float(np.median([t for r in results for t in r[1]]))
    finally:
        drop_database(uri, db)


def main() -> int:
    """Command line: Milvus enrollment and search figures."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uri", required=True, help="a Milvus server (scripts/milvus_server.sh start PORT)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--enrolls", type=int, default=100, help="per writer")
    ap.add_argument("--indexes", nargs="+", default=["flat", "hnsw"], choices=["flat", "hnsw", "ivf"],
                    help="Milvus indexes, built one after the other on the same inserted rows")
    ap.add_argument("--no-enroll", action="store_true", help="skip the enrollment throughput part")
    ap.add_argument("--enroll-threads", type=int, default=16,
                    help="concurrent enrollments per writer (a server's store pool: store_workers)")
    args = ap.parse_args()
    from service.store import LocalStore
    from service.store.milvus import drop_database

    rows = []
    rng = np.random.default_rng(0)
    for n in args.sizes:
        vecs = unit(rng.normal(size=(n, DIM)))  # (N, D)
        pick = rng.choice(n, args.queries, replace=False)
        probes = unit(vecs[pick] + 0.05 * rng.normal(size=(args.queries, DIM)))  # (Q, D)
        truth = [f"s{j:07d}" for j in pick]
        exact = [[f"s{j:07d}" for j in np.argsort(-(vecs @ p))[:10]] for p in probes]
        with tempfile.TemporaryDirectory() as d:
            local = LocalStore(d, fsync=False, snapshot_every=10 ** 9)
            t0 = time.perf_counter()
            for j in range(n):
                local.enroll("bench", "m", f"s{j:07d}", vecs[j:j + 1])
            print(f"{n}: local store populated in {time.perf_counter() - t0:.0f} s", flush=True)
            local.search("bench", "m", probes[0], 10)  # build the index
            times, ids = timed_search(local, probes)
            rows.append((n, "embedded FAISS (flat)", times, *quality(ids, exact, truth)))
            local.close()
        db = None
        for index in args.indexes:
            t0 = time.perf_counter()
            if db is None:
                db = populate_milvus(args.uri, vecs, index)
                print(f"{n}: Milvus {index} populated and loaded in {time.perf_counter() - t0:.0f} s", flush=True)
            else:
                reindex_milvus(args.uri, db, index, n)
                print(f"{n}: Milvus re-indexed {index} and loaded in {time.perf_counter() - t0:.0f} s", flush=True)
            store = milvus_store(args.uri, db, index, n)
            timed_search(store, probes[:5])  # warm up
            times, ids = timed_search(store, probes)
            rows.append((n, f"Milvus server ({_NAMES[index]})", times, *quality(ids, exact, truth)))
            store.close()
            print(f"{n}: Milvus {index}: p50 {np.percentile(times, 50) * 1000:.2f} ms", flush=True)
        if db is not None:
            drop_database(args.uri, db)
    print("\n| voiceprints | store | p50 ms | p99 ms | recall@10 | hit@1 |")
    print("|---:|---|---:|---:|---:|---:|")
    for n, name, times, recall, hit1 in rows:
        t = np.array(times) * 1000
        print(f"| {n:,} | {name} | {np.percentile(t, 50):.2f} | {np.percentile(t, 99):.2f} | {recall:.3f} | {hit1:.3f} |")
    if args.no_enroll:
        return 0
    with tempfile.TemporaryDirectory() as d:
        local = LocalStore(d)  # fsync on: what a server does
        t0 = time.perf_counter()
        for i in range(args.enrolls):
            local.enroll("enr", "m", f"w{i}", unit(rng.normal(size=(1, DIM))))
        local_rate = args.enrolls / (time.perf_counter() - t0)
        local.close()
    t = args.enroll_threads
    runs = {(w, th): enroll_rate(args.uri, w, args.enrolls, th) for w in (1, 2) for th in (1, t)}
    print("\n| enrollment | enrolls/s | per replica | median ms per enroll |")
    print("|---|---:|---:|---:|")
    print(f"| embedded store, fsync on | {local_rate:.1f} | {local_rate:.1f} | {1000 / local_rate:.0f} |")
    for (w, th), (rate, lat) in runs.items():
        print(f"| Milvus server, {w} writer{'s' if w > 1 else ''} (replicas) x {th} concurrent | {rate:.1f} | "
              f"{rate / w:.1f} | {lat * 1000:.0f} |")
    print(f"\n2 writers / 1 writer on Milvus, {t} concurrent each: {runs[(2, t)][0] / runs[(1, t)][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
