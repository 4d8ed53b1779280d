"""Identify latency and recall@10: exact (flat) vs HNSW vs IVF at 10k, 100k and 1M voiceprints.

    .venv/bin/python bench/bench_search.py [--sizes 10000 100000 1000000] [--dim 256] [--queries 200]

Voiceprints are random unit vectors (speaker-embedding sized); each query is an enrolled
voiceprint plus noise (cosine about 0.7 to it), as a probe of a known speaker would be.
Recall@10 is the overlap of each index's top 10 with the exact top 10 (a hard measure on
random vectors: beyond the true speaker, the other nine neighbours are near-ties around
cosine 0); hit@1 is how often the probed speaker comes first. Latency is one query
at a time through the store's collection search (what Identify calls), median and p99; build
is the time to construct the index from the voiceprints. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.store.base import IndexOptions, SpeakerRecord  # noqa: E402
from service.store.faiss_index import CollectionIndex as _Collection  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(kind: str, vecs: np.ndarray, opts: IndexOptions) -> tuple[_Collection, float]:
    """An index of one kind over the vectors, and the seconds it took."""
    coll = _Collection("bench", "m", vecs.shape[1], IndexOptions(**{**opts.__dict__, "index_type": kind}))
    for i, v in enumerate(vecs):
        coll.upsert(SpeakerRecord(f"s{i}", v.astype(np.float64), 1))
    t0 = time.perf_counter()
    coll.search(vecs[0], 1)  # builds the index
    return coll, time.perf_counter() - t0


def main() -> None:
    """Command line: exact against approximate search (recall, latency, memory)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"])
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-search", type=int, default=256)
    ap.add_argument("--nprobe", type=int, default=64)
    ap.add_argument("--hnsw-max", type=int, default=200_000,
                    help="skip HNSW above this many voiceprints (its build takes minutes per 100k on 2 cores)")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print("| voiceprints | index | build s | p50 ms | p99 ms | recall@10 | hit@1 |")
    print("|---:|---|---:|---:|---:|---:|---:|", flush=True)
    for n in args.sizes:
        vecs = unit(rng.standard_normal((n, args.dim)))
        targets = rng.integers(0, n, args.queries)
        queries = unit(vecs[targets] + rng.standard_normal((args.queries, args.dim)).astype(np.float32) / np.sqrt(args.dim))
        nlist = min(int(4 * np.sqrt(n)), n // 39)  # ~4 sqrt(N) lists, at least 39 points per list to train
        opts = IndexOptions(hnsw_m=args.hnsw_m, hnsw_ef_search=args.ef_search, ivf_nlist=nlist, ivf_nprobe=args.nprobe)
        exact = None
        for kind in args.kinds:
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"| {n:,} | HNSW | skipped (--hnsw-max {args.hnsw_max:,}) | | | | |", flush=True)
                continue
            coll, took = build(kind, vecs, opts)
            lat, found, first = [], [], []
            for q, t in zip(queries, targets):
                t0 = time.perf_counter()
                hits = coll.search(q, 10)
                lat.append(time.perf_counter() - t0)
                found.append({h[0].speaker_id for h in hits})
                first.append(bool(hits) and hits[0][0].speaker_id == f"s{t}")
            if kind == "flat":
                exact = found
            recall = np.mean([len(f & e) / 10 for f, e in zip(found, exact)]) if exact else float("nan")
            assert coll.info().index_type == kind, f"{kind} index not in use at {n} voiceprints"
            label = {"flat": "exact (flat IP)", "hnsw": f"HNSW M={args.hnsw_m} ef={args.ef_search}",
                     "ivf": f"IVF nlist={nlist} nprobe={args.nprobe}"}[kind]
            print(f"| {n:,} | {label} | {took:.1f} | {np.median(lat) * 1000:.2f} | {np.percentile(lat, 99) * 1000:.2f} | "
                  f"{recall:.3f} | {np.mean(first):.3f} |", flush=True)
            del coll


if __name__ == "__main__":
    main()
