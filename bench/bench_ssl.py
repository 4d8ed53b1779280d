"""SSL speaker models: ONNX Runtime's options against torch eager, and pruned against unpruned.

Usage:
    .venv/bin/python bench/bench_ssl.py [--models ssl-sv-small ssl-sv-small-p50] [--threads 1 2]
        [--rounds 7] [--profile]

For each repository entry it rebuilds the torch model from the card's ``source`` checkpoint and
times, interleaved round by round (so a noisy machine moves every column together). The order of the
variants rotates from round to round, and every timing follows one untimed call of the same variant:
without it, whatever ran right after torch eager shared the cores with torch's still-spinning OpenMP
threads (ORT fp32 timed 14% slower there at 1 x 3 s than later in the same round), and an idle pause
instead measures thread wake-up (ORT fp32 then looked no faster than torch at 1 x 3 s):

- ``torch eager``: the checkpoint in torch, ``inference_mode``;
- ``ort fp32``: the exported ``model.onnx`` with the service's session options;
- ``ort fp32 fused``: the same graph after ONNX Runtime's offline transformer fusions
  (SkipLayerNormalization, BiasGelu; WavLM's gated relative-position attention matches none of
  its attention patterns);
- ``ort int8``: the shipped ``model.int8.onnx`` (dynamic int8 MatMuls, one scale per tensor);
- ``ort int8 per-channel``: dynamic int8 MatMuls with one scale per output channel.

First it counts multiply-accumulates by part of the network (conv feature encoder, positional
conv, attention, FFN) on the real modules, which bounds what FFN pruning can buy.

Shapes: one 3 s utterance, eight 3 s utterances in one batch, one 10 s utterance. Every
variant's embeddings are compared with torch on the reference recordings (cosine). ``--profile``
prints ONNX Runtime's per-operator profile of the fp32 graph first.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {"1 x 3 s": (1, 3.0), "8 x 3 s": (8, 3.0), "1 x 10 s": (1, 10.0)}


def _session(path: Path, threads: int, profile_prefix: str | None = None):
    """An ONNX Runtime CPU session with the service's options (ENABLE_ALL, no spinning)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def build_variants(entry: Path, card: dict, out: Path) -> dict[str, Path]:
    """Write the ONNX variants of one repository entry under ``out``; returns name -> path."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    fp32 = entry / card["files"]["fp32"]
    enc = card.get("encoder_shape") or {}
    heads, hidden = enc.get("heads", 0), enc.get("hidden", 0)
    fused = out / "fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=heads, hidden_size=hidden, opt_level=0).save_model_to_file(str(fused))
    per_channel = out / "int8_pc.onnx"
    quantize_dynamic(str(fp32), str(per_channel), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=True)
    variants = {"ort fp32": fp32, "ort fp32 fused": fused}
    if "int8" in card["files"]:
        variants["ort int8"] = entry / card["files"]["int8"]
    variants["ort int8 per-channel"] = per_channel
    for path in variants.values():
        onnx.checker.check_model(str(path))
    return variants


def profile(path: Path, threads: int, wave: np.ndarray, runs: int = 20) -> None:
    """Print ONNX Runtime's per-operator share of one graph's kernel time on ``wave`` (1, T)."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(path, threads, profile_prefix=str(Path(tmp) / "p"))
        feeds = {"waveform": wave, "lengths": np.array([wave.shape[1]], dtype=np.int64)}
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: collections.Counter = collections.Counter()
    nodes = 0
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"]
            nodes += 1
    total = sum(by_op.values())
    print(f"\nProfile of {path.name} ({threads} threads, {wave.shape[1] / 16000:.0f} s, "
          f"{nodes // runs} kernels per run, {total / runs / 1000:.1f} ms of kernel time per run):\n")
    print("| operator | share of kernel time |")
    print("|---|---:|")
    for op, dur in by_op.most_common(12):
        print(f"| {op} | {100 * dur / total:.1f}% |")


def mac_breakdown(model, seconds: float, rate: int) -> dict[str, float]:
    """Multiply-accumulates (millions) of one utterance by part of the network, counted on the real modules.

    Convolutions and linear layers are counted by forward hooks (output elements x inputs per output).
    WavLM's attention passes its Q/K/V/out weights to ``F.multi_head_attention_forward`` without calling
    the Linear modules, so those (and the attention products, 2 x T'^2 x hidden per layer) are counted
    from the frame count T'.
    """
    import torch
    from torch import nn

    from models.ssl import ffn_layers

    ffn = {id(m) for ff in ffn_layers(model.encoder) for m in (ff.intermediate_dense, ff.output_dense)}
    frontend = {id(m) for m in model.frontend.modules()}
    macs: collections.Counter = collections.Counter()
    fired: set[int] = set()

    def hook(module, _inputs, output):
        fired.add(id(module))
        if isinstance(module, nn.Conv1d):
            per_out = module.in_channels // module.groups * module.kernel_size[0]
        else:
            per_out = module.in_features
        part = ("FFN" if id(module) in ffn else "conv feature encoder" if id(module) in frontend
                else "positional conv" if isinstance(module, nn.Conv1d) else "other linear (feature projection, gates, head)")
        macs[part] += output.numel() * per_out

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    n = int(seconds * rate)
    try:
        with torch.inference_mode():
            states, _ = model.frames(torch.zeros(1, n), torch.tensor([n]))
    finally:
        for h in handles:
            h.remove()
    t, hidden = states[0].shape[1], states[0].shape[2]
    for name, m in model.encoder.named_modules():
        if isinstance(m, nn.Linear) and id(m) not in fired and name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj", "out_proj"):
            macs["attention projections"] += t * m.in_features * m.out_features
    macs["attention products"] = 2 * t * t * hidden * (len(states) - 1)
    return {k: v / 1e6 for k, v in macs.items()}


def print_macs(names: list[str], seconds: float = 3.0) -> None:
    """Table of MACs per part for each entry, and the speed-up that removing the FFN difference alone allows."""
    from models.ssl import load_checkpoint

    rows = {}
    for name in names:
        card = json.loads((REPO / "models/repository" / name / "model.json").read_text())
        model, _ = load_checkpoint(REPO / card["source"])
        rows[name] = mac_breakdown(model.eval(), seconds, card["sample_rate"])
    parts = sorted({p for r in rows.values() for p in r})
    print(f"\nMultiply-accumulates of one {seconds:.0f} s utterance, millions (share of the total)\n")
    print("| part | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for p in parts + ["total"]:
        cells = []
        for r in rows.values():
            v = sum(r.values()) if p == "total" else r.get(p, 0.0)
            cells.append(f"{v:.0f} ({100 * v / sum(r.values()):.0f}%)")
        print(f"| {p} | " + " | ".join(cells) + " |")
    if len(names) == 2:
        base, pruned = (sum(rows[n].values()) for n in names)
        print(f"\nCompute ratio {names[0]} / {names[1]}: {base / pruned:.2f} (the most pruning can buy if time "
              "followed multiply-accumulates)")


def _inputs(batch: int, seconds: float, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Speech-like noise: (B, T) float32 and lengths (B,) int64."""
    rng = np.random.default_rng(batch * 100 + int(seconds))
    n = int(seconds * rate)
    return (0.1 * rng.standard_normal((batch, n))).astype(np.float32), np.full(batch, n, dtype=np.int64)


def parity(model, sessions: dict, rate: int) -> dict[str, float]:
    """Smallest cosine between torch and each ONNX variant over the reference recordings."""
    import soundfile as sf
    import torch

    clips = []
    for path in sorted((REPO / "models/reference/audio").glob("*.wav")):
        audio, sr = sf.read(path, dtype="float32")
        if sr == rate:
            clips.append(audio)
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    batch = np.zeros((len(clips), int(lengths.max())), dtype=np.float32)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    with torch.inference_mode():
        ref = model(torch.from_numpy(batch), torch.from_numpy(lengths)).numpy()  # (N, D)
    out = {}
    for name, sess in sessions.items():
        emb = sess.run(None, {"waveform": batch, "lengths": lengths})[0]
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        out[name] = float(np.min(np.sum(emb * ref, axis=1)))
    return out


def _prepare(name: str, threads: int, tmp: Path, do_profile: bool) -> tuple[dict, dict[str, float]]:
    """Runners (variant -> fn(wave, lengths)) and parity cosines of one repository entry."""
    import torch

    from models.ssl import load_checkpoint

    entry = REPO / "models/repository" / name
    card = json.loads((entry / "model.json").read_text())
    model, ckpt = load_checkpoint(REPO / card["source"])
    enc = ckpt["config"]["encoder"]
    card["encoder_shape"] = {"heads": enc["num_attention_heads"], "hidden": enc["hidden_size"]}
    variants = build_variants(entry, card, tmp)
    sessions = {v: _session(p, threads) for v, p in variants.items()}
    if do_profile:
        for seconds in (3.0, 10.0):
            profile(variants["ort fp32"], threads, _inputs(1, seconds, card["sample_rate"])[0])
    cos = parity(model, sessions, card["sample_rate"])

    def run_torch(wave: np.ndarray, lengths: np.ndarray) -> None:
        with torch.inference_mode():
            model(torch.from_numpy(wave), torch.from_numpy(lengths))

    runners = {"torch eager": run_torch}
    for v, sess in sessions.items():
        runners[v] = (lambda w, n, s=sess: s.run(None, {"waveform": w, "lengths": n}))
    return runners, cos


def bench(names: list[str], threads: int, rounds: int, do_profile: bool) -> dict:
    """Interleaved timings of torch and every ONNX variant of each entry; returns name -> shape -> variant -> ms."""
    import torch

    torch.set_num_threads(threads)
    times: dict = {n: {s: collections.defaultdict(list) for s in SHAPES} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = {}
        for n in names:
            (Path(tmp) / n).mkdir()
            prepared[n] = _prepare(n, threads, Path(tmp) / n, do_profile)
        for shape, (batch, seconds) in SHAPES.items():
            wave, lengths = _inputs(batch, seconds, 16000)
            reps = max(1, int(round(1.5 / (batch * seconds))))  # about 1.5 s of audio per timing
            for runners, _ in prepared.values():  # warm-up
                for fn in runners.values():
                    fn(wave, lengths)
            for r in range(rounds):
                for n, (runners, _) in prepared.items():
                    order = list(runners.items())
                    order = order[r % len(order):] + order[:r % len(order)]  # each variant follows each other
                    for v, fn in order:
                        fn(wave, lengths)  # untimed: see the module docstring (warm, and torch's threads stopped)
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            fn(wave, lengths)
                        times[n][shape][v].append((time.perf_counter() - t0) / reps / batch * 1000)  # ms per utterance
    for n, (runners, cos) in prepared.items():
        print(f"\n### {n}, {threads} thread(s): ms per utterance (median of {rounds} interleaved rounds), "
              "speed-up over torch eager (median of per-round ratios)\n")
        print("| variant | min cosine vs torch | " + " | ".join(f"{s} ms | {s} x torch" for s in SHAPES) + " |")
        print("|---|---:|" + "---:|---:|" * len(SHAPES))
        for v in runners:
            cells = []
            for s in SHAPES:
                ms = times[n][s][v]
                ratio = statistics.median([t / m for t, m in zip(times[n][s]["torch eager"], ms)])
                cells.append(f"{statistics.median(ms):.1f} | {ratio:.2f}")
            cosine = "1 (reference)" if v == "torch eager" else f"{cos[v]:.5f}"
            print(f"| {v} | {cosine} | " + " | ".join(cells) + " |")
    return times


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print markdown tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ssl-sv-small", "ssl-sv-small-p50"])
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="print ONNX Runtime's operator profile of each fp32 graph")
    args = ap.parse_args(argv)
    print_macs(args.models)
    for threads in args.threads:
        results = bench(args.models, threads, args.rounds, args.profile)
        if len(args.models) == 2:
            base, pruned = args.models
            print(f"\n{pruned} / {base}, {threads} thread(s): speed-up of the pruned model "
                  "(median of per-round ratios)\n")
            print("| variant | " + " | ".join(SHAPES) + " |")
            print("|---|" + "---:|" * len(SHAPES))
            for v in results[base][next(iter(SHAPES))]:
                cells = [statistics.median([b / p for b, p in zip(results[base][s][v], results[pruned][s][v])])
                         for s in SHAPES]
                print(f"| {v} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
