"""Where speaker information lives: layer-wise analysis of one or several SSL encoders.

    .venv/bin/python -m training.experiment.analysis --out DIR --model pretrained=models/checkpoints/ssl-pretrained \
        --model finetuned=models/checkpoints/ssl-sv-small.pt [--corpus corpus] [--utts-per-speaker 6]

For every model (an SSL ``save_pretrained`` directory or a ``{state_dict, config}`` speaker
checkpoint, pruned ones included):
- per-layer linear-probe speaker-identification accuracy on mean-pooled hidden states
  (held-out utterances of the training speakers);
- per-layer frame-cluster purity: k-means of the layer's frames against broad phone classes
  (silence / voiced / unvoiced, from energy, zero crossings and periodicity of the signal) and
  against speakers;
- linear CKA between every pair of layers of the model;
and for every pair of models: linear CKA between their layers on the same frames, and
neuron-level correspondence of their FFN activations (for each neuron of the first model,
its best absolute correlation with any neuron of the second model's same layer, and the share
whose best match has the same index). Writes ``analysis.json`` and heat maps (``cka-*.png``,
``probes.png``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch

__all__ = ["layer_probe", "linear_cka", "broad_classes", "purity", "neuron_correspondence", "analyse", "main"]

ROOT = Path(__file__).resolve().parents[2]


def layer_probe(x: np.ndarray, labels: np.ndarray, seed: int = 0, held_out: float = 0.25, epochs: int = 150) -> list[float]:
    """Per-layer linear-probe identification accuracy (%) on (N, L+1, H) mean-pooled features."""
    from training.experiment.downstream import split_by_speaker

    train, test = split_by_speaker(labels, held_out, seed)
    n_cls = int(labels.max()) + 1
    y_tr, y_te = torch.from_numpy(labels[train]), torch.from_numpy(labels[test])
    out = []
    for li in range(x.shape[1]):
        xl = torch.from_numpy(x[:, li])  # (N, H)
        mu, sd = xl[train].mean(0), xl[train].std(0) + 1e-4
        xtr, xte = (xl[train] - mu) / sd, (xl[test] - mu) / sd
        torch.manual_seed(seed)
        lin = torch.nn.Linear(xl.shape[1], n_cls)
        opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
        for _ in range(epochs):  # full batch
            loss = torch.nn.functional.cross_entropy(lin(xtr), y_tr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            out.append(round(float(100.0 * (lin(xte).argmax(1) == y_te).float().mean()), 2))
    return out


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA of two representations of the same n items, (n, d1) and (n, d2)."""
    a = a - a.mean(0)
    b = b - b.mean(0)
    cross = np.linalg.norm(b.T @ a) ** 2
    return float(cross / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b) + 1e-12))


def broad_classes(wave: np.ndarray, n_frames: int) -> np.ndarray:
    """Per encoder frame (25 ms window, 20 ms shift): 0 silence, 1 voiced, 2 unvoiced."""
    out = np.zeros(n_frames, dtype=np.int64)
    peak = max(float(np.abs(wave).max()), 1e-6)
    for i in range(n_frames):
        f = wave[i * 320:i * 320 + 400].astype(np.float64)
        if len(f) < 100 or np.sqrt(np.mean(f ** 2)) < 0.02 * peak:
            continue  # silence
        zcr = np.mean(np.abs(np.diff(np.sign(f)))) / 2
        ac = np.correlate(f - f.mean(), f - f.mean(), "full")[len(f) - 1:]
        lag = ac[32:320].max() / (ac[0] + 1e-12) if len(ac) > 320 else 0.0  # 50-500 Hz periodicity
        out[i] = 1 if (lag > 0.4 and zcr < 0.25) else 2
    return out


def purity(clusters: np.ndarray, classes: np.ndarray) -> float:
    """Share of items whose class is their cluster's majority class."""
    total = 0
    for c in np.unique(clusters):
        total += np.bincount(classes[clusters == c]).max()
    return float(total / len(clusters))


def neuron_correspondence(a: np.ndarray, b: np.ndarray) -> dict:
    """For each neuron (column) of ``a`` (M, Fa): best |correlation| with a column of ``b`` (M, Fb)."""
    za = (a - a.mean(0)) / (a.std(0) + 1e-8)
    zb = (b - b.mean(0)) / (b.std(0) + 1e-8)
    corr = np.abs(za.T @ zb) / len(a)  # (Fa, Fb)
    best = corr.argmax(1)
    same = float(np.mean(best == np.arange(len(best)))) if a.shape[1] == b.shape[1] else None
    return {"mean_best_abs_corr": float(corr.max(1).mean()), "same_index_share": same}


@torch.inference_mode()
def _frames(model, waves: list[np.ndarray], per_utt: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list]:
    """Sampled frames: hidden states per layer [(M, H)], FFN activations per layer [(M, F)], (utt, frame) ids."""
    from models.ssl import ffn_layers

    rng = np.random.default_rng(seed)
    acts: list = []
    hooks = [ff.output_dense.register_forward_pre_hook(lambda m, inp: acts.append(inp[0][0])) for ff in
             ffn_layers(model.encoder)]
    states_out, acts_out, ids = None, None, []
    try:
        for u, w in enumerate(waves):
            acts.clear()
            states, _ = model.frames(torch.from_numpy(w)[None], torch.tensor([len(w)]))
            t = states[0].shape[1]
            pick = np.sort(rng.choice(t, min(per_utt, t), replace=False))
            if states_out is None:
                states_out, acts_out = [[] for _ in states], [[] for _ in acts]
            for li, s in enumerate(states):
                states_out[li].append(s[0, pick].float().numpy())
            for li, a in enumerate(acts):
                acts_out[li].append(a[pick].float().numpy())
            ids += [(u, int(f)) for f in pick]
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(s) for s in states_out], [np.concatenate(a) for a in acts_out], ids


def analyse(models: dict[str, str], corpus: str | Path, out: str | Path, utts_per_speaker: int = 6,
            frames_per_utt: int = 12, k: int = 3, seed: int = 0) -> dict:
    """Run every analysis on ``models`` ({name: checkpoint}); writes analysis.json and PNGs to ``out``."""
    from training.compression.neurons import kmeans_labels
    from training.compression.protection import load_speaker_model
    from training.experiment.downstream import layer_means
    from training.experiment.superb import load_downstream_data

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_downstream_data(corpus, utts_per_speaker, 3.0, 2, seed)
    loaded = {name: load_speaker_model(path)[0].eval() for name, path in models.items()}
    frames, acts, res = {}, {}, {"models": dict(models), "per_model": {}, "cross_model": {}}
    for name, model in loaded.items():
        x = layer_means(model, data.sid_waves)
        frames[name], acts[name], ids = _frames(model, data.sid_waves, frames_per_utt, seed)
        last: dict[int, int] = {}
        for u, f in ids:
            last[u] = max(last.get(u, 0), f + 1)
        by_utt = {u: broad_classes(data.sid_waves[u], n) for u, n in last.items()}
        phone = np.array([by_utt[u][f] for u, f in ids])
        spk = np.array([data.sid_labels[u] for u, _ in ids])
        clusters = [kmeans_labels(h, k, seed, "frames")[0] for h in frames[name]]
        res["per_model"][name] = {
            "probe_sid_acc": layer_probe(x, data.sid_labels, seed),
            "phone_class_purity": [round(purity(c, phone), 4) for c in clusters],
            "speaker_purity": [round(purity(c, spk), 4) for c in clusters],
            "cka_layers": [[round(linear_cka(a, b), 4) for b in frames[name]] for a in frames[name]],
            "ffn_widths": [a.shape[1] for a in acts[name]]}
        _heatmap(np.array(res["per_model"][name]["cka_layers"]), f"CKA between layers: {name}", name, name,
                 out / f"cka-{name}.png")
    for a, b in itertools.combinations(loaded, 2):
        n = min(len(frames[a][0]), len(frames[b][0]))
        cka = [[round(linear_cka(fa[:n], fb[:n]), 4) for fb in frames[b]] for fa in frames[a]]
        corr = [neuron_correspondence(x[:n], y[:n]) if x.shape[1] and y.shape[1] else None
                for x, y in zip(acts[a], acts[b])] if len(acts[a]) == len(acts[b]) else None
        res["cross_model"][f"{a}|{b}"] = {"cka": cka, "neuron_correspondence": corr}
        _heatmap(np.array(cka), "CKA across models", a, b, out / f"cka-{a}-vs-{b}.png")
    _probe_plot(res["per_model"], out / "probes.png")
    (out / "analysis.json").write_text(json.dumps(res, indent=1) + "\n")
    return res


def _heatmap(m: np.ndarray, title: str, ylab: str, xlab: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", origin="lower")
    ax.set_xlabel(f"{xlab} layer")
    ax.set_ylabel(f"{ylab} layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _probe_plot(per_model: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for name, r in per_model.items():
        axes[0].plot(r["probe_sid_acc"], marker="o", label=name)
        axes[1].plot(r["phone_class_purity"], marker="o", label=f"{name} phone class")
        axes[1].plot(r["speaker_purity"], marker="x", ls="--", label=f"{name} speaker")
    axes[0].set(xlabel="hidden state (0 = CNN features)", ylabel="linear-probe SID accuracy (%)")
    axes[1].set(xlabel="hidden state", ylabel="frame-cluster purity")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.experiment.analysis", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--corpus", default=str(ROOT / "corpus"))
    ap.add_argument("--utts-per-speaker", type=int, default=6)
    ap.add_argument("--frames-per-utt", type=int, default=12)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    models = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            print(f"analysis: --model must be NAME=PATH, got {spec!r}", file=sys.stderr)
            return 2
        if not Path(path).exists():
            print(f"analysis: --model {name}: {path} does not exist", file=sys.stderr)
            return 2
        models[name] = path
    try:
        res = analyse(models, args.corpus, args.out, args.utts_per_speaker, args.frames_per_utt, args.k, args.seed)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"analysis: {e}", file=sys.stderr)
        return 2
    for name, r in res["per_model"].items():
        print(f"{name}: probe SID acc per layer {r['probe_sid_acc']}")
    print(f"wrote {Path(args.out) / 'analysis.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
