"""Speaker search at 1M voiceprints with the structure of real ones: exact vs HNSW vs IVF, tuned.

    .venv/bin/python bench/bench_search_real.py --real corpus-real [--size 1000000] [--queries 300]

Random unit vectors (``bench/bench_search.py``) make every neighbour but the probed speaker a
near-tie, which says nothing about speaker embeddings. Here the voiceprints come from a
two-covariance (PLDA-style) model fitted to real ones: every utterance of the real-speech pool
(both splits, as recorded) is embedded by ``ge2e`` as the service embeds it (VAD, model); the
speaker means give the between-speaker Gaussian (its covariance shrunk halfway to a scaled
identity: 49 speakers cannot estimate 256 x 256 on their own) and the deviations of utterances
from their speaker's mean the within-speaker one (about 1,200 degrees of freedom, shrunk by
0.1). A simulated speaker is a draw ``c`` of the first; its utterances are ``unit(c + w)``
with ``w`` from the second; its voiceprint is the unit mean of three utterances (as an
enrollment of three), and a probe is a fresh utterance of an enrolled speaker. The script
first prints how the simulated scores compare with the real ones (same-speaker and
different-speaker cosine, mean and percentiles), so the structure can be judged.

Then every index is built on the same voiceprints through the store's ``CollectionIndex`` and
swept over its search-time settings (HNSW ``efSearch``; IVF ``nprobe``; ``ivf_pq`` ``nprobe``
and ``rerank``); each row gives one query at a time latency (p50, p99), recall@10 against exact
search, hit@1 against exact search's first answer and the probed speaker's rank-1 rate, and
memory: the index's serialised size per million voiceprints (for ``ivf_pq``, its codes plus the
float32 voiceprints it re-scores candidates with).

With ``--milvus URI`` the same voiceprints and probes go to a Milvus server too, once per index
in ``--milvus-kinds``: one bare collection (INT64 id, vector) in a database of its own, bulk
inserted, indexed with the store's own index parameters (``MilvusStore.vector_index_params``:
hnsw -> HNSW, ivf -> IVF_FLAT, ivf_pq -> SCANN) and searched one query at a time with the
store's own search parameters (``search_params``), swept like the FAISS indexes. Build time is
from ``create_index`` until the collection is loaded; the memory column of these rows is the
server's whole resident memory (the ``milvus`` processes, MB) with the collection loaded, printed
with the figure before the insert: the server keeps memory it freed, so the difference is not the
index's size. The database is dropped afterwards.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length."""
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def real_embeddings(real: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) unit ``ge2e`` embeddings of the pool's utterances (both splits, as recorded) and (N,) speakers."""
    from models.runtime import SpeakerModel
    from models.vad import SileroVad
    from training.evaluation.realembed import load_kaldi_split, render_and_embed

    model = SpeakerModel(ROOT / "models" / "repository" / "ge2e")
    vad = SileroVad()
    embs, spks = [], []
    for name in ("calibration", "evaluation"):
        split = load_kaldi_split(real / name)
        r = render_and_embed(model, vad, split, ["clean"], 1.0)
        embs.append(r.emb[r.ok])
        spks += [s for s, ok in zip(split.spk, r.ok) if ok]
    return np.concatenate(embs), np.array(spks)


class TwoCovariance:
    """Between- and within-speaker Gaussians fitted to unit embeddings, and samplers."""

    def __init__(self, emb: np.ndarray, spk: np.ndarray, between_shrink: float = 0.5, within_shrink: float = 0.1):
        speakers = sorted(set(spk.tolist()))
        means = np.stack([emb[spk == s].mean(axis=0) for s in speakers]).astype(np.float64)  # (S, D)
        dev = np.concatenate([emb[spk == s] - means[i] for i, s in enumerate(speakers)]).astype(np.float64)  # (N, D)
        d = emb.shape[1]
        self.mu = means.mean(axis=0)
        between = np.cov(means, rowvar=False)
        within = dev.T @ dev / max(len(dev) - len(speakers), 1)

        def shrunk(c: np.ndarray, a: float) -> np.ndarray:
            return (1 - a) * c + a * np.eye(d) * np.trace(c) / d

        self.between = np.linalg.cholesky(shrunk(between, between_shrink))
        self.within = np.linalg.cholesky(shrunk(within, within_shrink))

    def speakers(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, D) speaker centres."""
        return self.mu + rng.standard_normal((n, len(self.mu))) @ self.between.T

    def utterances(self, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """(n, D) one unit utterance embedding per centre."""
        return unit(centres + rng.standard_normal(centres.shape) @ self.within.T)


def score_check(emb: np.ndarray, spk: np.ndarray, model: TwoCovariance, rng: np.random.Generator) -> None:
    """Same- and different-speaker cosines (voiceprint of 3 vs a fourth utterance), real vs simulated."""
    real_t, real_n, prints, probes = [], [], [], []
    for s in sorted(set(spk.tolist())):
        rows = np.flatnonzero(spk == s)
        if len(rows) < 4:
            continue
        prints.append(unit(emb[rows[:3]].astype(np.float64).sum(axis=0)))
        probes.append(emb[rows[3:]])
    for i, p in enumerate(prints):
        for j, q in enumerate(probes):
            (real_t if i == j else real_n).extend((q @ p).tolist())
    c = model.speakers(2000, rng)
    sim_prints = unit(sum(model.utterances(c, rng).astype(np.float64) for _ in range(3)))
    sim_probes = model.utterances(c, rng)
    sim_t = np.sum(sim_prints * sim_probes, axis=1)
    sim_n = (sim_probes[:500] @ sim_prints[500:1500].T).ravel()
    print("| cosine, voiceprint of 3 vs another utterance | mean | p1 | p50 | p99 |")
    print("|---|---:|---:|---:|---:|")
    for name, x in (("real, same speaker", real_t), ("simulated, same speaker", sim_t),
                    ("real, different speakers", real_n), ("simulated, different speakers", sim_n)):
        x = np.asarray(x)
        print(f"| {name} ({len(x):,} pairs) | {x.mean():.3f} | {np.percentile(x, 1):.3f} | {np.percentile(x, 50):.3f} | "
              f"{np.percentile(x, 99):.3f} |")


def main() -> None:
    """Fit, generate, build, sweep, print."""
    import faiss

    from service.store.base import IndexOptions, SpeakerRecord
    from service.store.faiss_index import CollectionIndex

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, required=True, help="the real-speech pool (calibration/ and evaluation/)")
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--kinds", nargs="*", default=["flat", "ivf", "ivf_pq", "hnsw"], help="FAISS indexes (none: Milvus only)")
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-search", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--nlist", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--nprobe", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--rerank", type=int, nargs="+", default=[16, 32, 64], help="ivf_pq: candidates re-scored per result")
    ap.add_argument("--milvus", default="", help="a Milvus server's URI: measure its indexes too")
    ap.add_argument("--milvus-kinds", nargs="+", default=["ivf", "ivf_pq", "hnsw"], help="store index types on Milvus")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    emb, spk = real_embeddings(args.real)
    model = TwoCovariance(emb, spk)
    print(f"{len(emb)} real utterances of {len(set(spk.tolist()))} speakers embedded and fitted in "
          f"{time.perf_counter() - t0:.0f} s\n", flush=True)
    score_check(emb, spk, model, rng)

    vecs = np.empty((args.size, emb.shape[1]), np.float32)
    enrolled = rng.choice(args.size, args.queries, replace=False)
    probes = np.empty((args.queries, emb.shape[1]), np.float32)
    for first in range(0, args.size, 100_000):  # in blocks: bounded memory
        c = model.speakers(min(100_000, args.size - first), rng)
        vecs[first:first + len(c)] = unit(sum(model.utterances(c, rng).astype(np.float64) for _ in range(3)))
        inside = enrolled[(enrolled >= first) & (enrolled < first + len(c))]
        for q in inside:
            probes[np.flatnonzero(enrolled == q)[0]] = model.utterances(c[q - first][None], rng)[0]
    exact = np.empty((args.queries, 10), np.int64)  # (Q, 10) exact top 10, best first
    for first in range(0, args.queries, 32):
        scores = probes[first:first + 32] @ vecs.T  # (32, N)
        top = np.argpartition(-scores, 10, axis=1)[:, :10]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        exact[first:first + 32] = np.take_along_axis(top, order, axis=1)
    print(f"\n{args.size:,} voiceprints generated, exact top 10 found ({time.perf_counter() - t0:.0f} s)\n", flush=True)

    def measure(coll) -> tuple[float, float, float, float, float]:
        return measure_ids(lambda p: [int(r.speaker_id) for r, _ in coll.search(p, 10)])

    def measure_ids(search) -> tuple[float, float, float, float, float]:
        search(probes[0])
        times, tops = [], []
        for p in probes:
            t1 = time.perf_counter()
            ids = search(p)
            times.append(time.perf_counter() - t1)
            tops.append(ids)
        recall = float(np.mean([len(set(t) & set(e.tolist())) / 10 for t, e in zip(tops, exact)]))
        hit1 = float(np.mean([bool(t) and t[0] == int(e[0]) for t, e in zip(tops, exact)]))
        own = float(np.mean([bool(t) and t[0] == int(q) for t, q in zip(tops, enrolled)]))
        ms = np.array(times) * 1000
        return float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), recall, hit1, own

    print("| index | setting | build s | p50 ms | p99 ms | recall@10 | hit@1 vs exact | probed speaker first | MB per 1M |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    builds = [(kind, nlist) for kind in args.kinds for nlist in (args.nlist if kind.startswith("ivf") else [0])]
    for kind, nlist in builds:
        opts = IndexOptions(index_type=kind, hnsw_m=args.hnsw_m, hnsw_ef_search=args.ef_search[0],
                            ivf_nlist=nlist or 1, ivf_nprobe=args.nprobe[0], hnsw_ef_construction=args.ef_construction)
        coll = CollectionIndex("bench", "ge2e", vecs.shape[1], opts)
        for i, v in enumerate(vecs):
            coll.upsert(SpeakerRecord(str(i), v.astype(np.float64), 1))
        t1 = time.perf_counter()
        coll.search(probes[0], 1)  # builds the index
        build = time.perf_counter() - t1
        held = faiss.serialize_index(coll._index).nbytes + (coll._units.mat.nbytes if coll._units is not None else 0)
        mb = held / 2 ** 20 * 1e6 / args.size
        inner = faiss.downcast_index(coll._index.index) if kind == "hnsw" else None

        def apply(values: dict) -> None:
            """Set the built FAISS index's search-time settings (and the store's ivf_pq rerank) from ``values``."""
            for key, value in values.items():
                setattr(coll.options, key, value)
            if "hnsw_ef_search" in values:
                inner.hnsw.efSearch = values["hnsw_ef_search"]
            if "ivf_nprobe" in values:
                coll._index.nprobe = values["ivf_nprobe"]

        for label, values in sweep_settings(args, kind, nlist, "efSearch", "rerank={r}"):
            apply(values)
            p50, p99, recall, hit1, own = measure(coll)
            print(f"| {kind} | {label} | {build:.0f} | {p50:.2f} | {p99:.2f} | {recall:.3f} | {hit1:.3f} | {own:.3f} | "
                  f"{mb:.0f} |", flush=True)
        coll = None  # free the index before the next one is built
    if args.milvus:
        for kind, nlist in [(k, n) for k in args.milvus_kinds for n in (args.nlist if k.startswith("ivf") else [0])]:
            milvus_sweep(args, kind, nlist, vecs, measure_ids)


def sweep_settings(args, kind: str, nlist: int, ef_name: str, rerank_label: str) -> list[tuple[str, dict]]:
    """The search-time settings swept for one index: (label, {IndexOptions field: value}) per row.

    ``ef_name`` and ``rerank_label`` (formatted with ``r``) name the settings as the backend does.
    """
    if kind == "hnsw":
        return [(f"M={args.hnsw_m}, efConstruction={args.ef_construction}, {ef_name}={ef}", {"hnsw_ef_search": ef})
                for ef in args.ef_search]
    if kind == "ivf":
        return [(f"nlist={nlist}, nprobe={n}", {"ivf_nprobe": n}) for n in args.nprobe if n <= nlist]
    if kind == "ivf_pq":
        return [(f"nlist={nlist}, nprobe={n}, {rerank_label.format(r=r)}", {"ivf_nprobe": n, "ivf_pq_rerank": r})
                for n in args.nprobe if n <= nlist for r in args.rerank]
    return [("exact inner product", {})]


def milvus_rss_mb() -> float:
    """Resident memory of the Milvus server's processes on this machine, MB."""
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"milvus" in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                total += int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
        except (OSError, IndexError):
            continue
    return total / 1024


def milvus_sweep(args, kind: str, nlist: int, vecs: np.ndarray, measure_ids) -> None:
    """Insert `vecs` into a bare Milvus collection indexed as the store indexes `kind`, sweep its search settings."""
    from pymilvus import DataType, MilvusClient

    from service.store.base import IndexOptions
    from service.store.milvus import MilvusStore, drop_database
    from service.store.milvus_schema import _MILVUS_INDEX

    db, name = "bench_search_real", "voiceprints"
    admin = MilvusClient(uri=args.milvus)
    if db in admin.list_databases():
        drop_database(args.milvus, db)
    admin.create_database(db)
    admin.close()
    opts = IndexOptions(index_type=kind, hnsw_m=args.hnsw_m, hnsw_ef_search=args.ef_search[0], ivf_nlist=nlist or 1,
                        ivf_nprobe=args.nprobe[0], hnsw_ef_construction=args.ef_construction)
    store = MilvusStore(args.milvus, db=db, options=opts)
    client = store.client
    try:
        rss0 = milvus_rss_mb()
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("pk", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=vecs.shape[1])
        client.create_collection(name, schema=schema)
        for first in range(0, len(vecs), 10_000):
            block = vecs[first:first + 10_000]
            client.insert(name, [{"pk": first + i, "vec": v} for i, v in enumerate(block.tolist())])
        client.flush(name)
        t1 = time.perf_counter()
        client.create_index(name, store.vector_index_params(kind), sync=False)  # polled below, with a deadline
        while True:
            info = client.describe_index(name, "vec")
            if info.get("state") == "Finished" and int(info.get("indexed_rows", 0)) >= len(vecs):
                break
            if info.get("state") == "Failed" or time.perf_counter() - t1 > 3600:
                raise SystemExit(f"Milvus {kind}: the index was not built: {info}")
            time.sleep(2)
        client.load_collection(name)
        build = time.perf_counter() - t1
        rss1 = milvus_rss_mb()
        print(f"(Milvus {kind}: the server's resident memory {rss0:.0f} MB before the insert, {rss1:.0f} MB with the "
              f"collection loaded; index built and loaded in {build:.0f} s)", flush=True)

        def search(p: np.ndarray) -> list[int]:
            hits = client.search(name, data=[p.tolist()], anns_field="vec", limit=10,
                                 search_params=store.search_params(10), consistency_level="Bounded")[0]
            return [int(h["id"]) for h in hits]

        for label, values in sweep_settings(args, kind, nlist, "ef", "reorder_k={r} x 10"):
            for key, value in values.items():
                setattr(store.options, key, value)
            p50, p99, recall, hit1, own = measure_ids(search)
            print(f"| Milvus {kind} ({_MILVUS_INDEX[kind]}) | {label} | {build:.0f} | {p50:.2f} | {p99:.2f} | "
                  f"{recall:.3f} | {hit1:.3f} | {own:.3f} | {rss1:.0f} (server) |", flush=True)
    finally:
        store.close()
        drop_database(args.milvus, db)


if __name__ == "__main__":
    main()
