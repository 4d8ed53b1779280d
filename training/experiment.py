"""The compression experiment: unpruned vs norm-only vs speaker-neuron-protected FFN pruning.

    .venv/bin/python -m training.experiment --out DIR [--checkpoint models/checkpoints/ssl-sv-small.pt]
                                            [--corpus corpus] [--ratios 0.3 0.5 0.7 0.9]

Stages (numbered like a recipe; each prints what it did):
1. load the speaker model checkpoint and the corpus (if missing: the TTS voices are installed
   with scripts/install_voices.sh when running as root, and the corpus is built with
   ``training.corpus``);
2. calibration set (training utterances): MFCC -> UBM -> T -> i-vectors -> k-means (k_ivec);
   frame features of ``ssl_layer`` -> k-means (k_ssl);
3. activation statistics over the calibration set -> speaker neurons (sigma) -> neuron sets
   artifact (``neurons.json``) and per-layer bar chart (``neurons.png``);
4. for every ratio: norm-only ("baseline") and protected pruning, physically sliced, each
   without and with recovery (a short distillation from the unpruned model);
5. every model exported to ONNX through ``models.export`` and evaluated on the corpus's
   evaluation trials: EER (%), minDCF (p=0.01), identification accuracy (%), parameters,
   ONNX Runtime real-time factor;
6. ``results.json`` (a list of rows: method, ratio, recovery, eer, mindcf, id_accuracy,
   params, rtf, ffn_widths, ...), ``results.md`` and ``eer_vs_ratio.png``.

Protection "once" (sets from the unpruned model) is the default; ``--variant recompute``
recomputes the sets layer by layer on the partially pruned model. When a layer has more
speaker neurons than the ratio lets it keep, the most speaker-specific ones are protected up
to the budget and the row says so (``protected_truncated``).
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from models.artifact import ModelCard
from models.export import export_model
from models.ssl import SSLSpeakerModel, ffn_layers, load_checkpoint, save_checkpoint
from training.corpus import read_scp
from training.evaluate import EvalSet, evaluate_embeddings, embed_with_model, rtf
from training.common import load_split
from training.distributed import all_reduce_stats, shard
from training.features import mfcc
from training.ivector import IVectorExtractor, baum_welch, length_norm, train_ubm
from training.neurons import ActivationStats, NeuronSets, kmeans_labels, neuron_sets, plot_neuron_counts, ssl_frames
from training.prune import PruneError, apply_plan, neuron_scores, plan_pruning

__all__ = ["ExperimentConfig", "run_experiment", "speaker_neuron_sets", "load_speaker_model", "main"]

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ExperimentConfig:
    """Every parameter of the experiment (saved to config.json)."""

    out: str
    checkpoint: str = str(ROOT / "models" / "checkpoints" / "ssl-sv-small.pt")
    corpus: str = str(ROOT / "corpus")
    ratios: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 0.9])
    scope: str = "layer"
    variant: str = "once"  # once | recompute
    recovery: list[bool] = field(default_factory=lambda: [False, True])
    k_ssl: int = 3
    k_ivec: int = 2
    ssl_layer: int = -1  # hidden state used for SSL clusters; -1: the middle layer
    sigma: float = 0.8
    top_fraction: float = 0.01
    calib_utts: int = 400
    ubm_components: int = 64
    ivector_rank: int = 100
    recovery_steps: int = 60
    recovery_batch: int = 16
    recovery_lr: float = 1e-4
    eval_max_utts: int | None = None
    seed: int = 0


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def speaker_neuron_sets(model: SSLSpeakerModel, waves: list[np.ndarray], cfg: ExperimentConfig,
                        layers: list[int] | None = None) -> tuple[NeuronSets, ActivationStats, dict]:
    """Steps 1-4 of the method on calibration waveforms; returns (sets, stats, cluster report)."""
    # utterance clusters of i-vectors
    feats = [mfcc(w, cmn=False) for w in waves]
    allf = np.concatenate(feats)
    rng = np.random.default_rng(cfg.seed)
    sample = allf[rng.choice(len(allf), min(100_000, len(allf)), replace=False)]
    ubm = train_ubm(sample, min(cfg.ubm_components, max(2, len(sample) // 50)), 8, cfg.seed)
    stats_bw = [baum_welch(ubm, f) for f in feats]
    rank = min(cfg.ivector_rank, len(waves) - 1)
    ivecs = length_norm(IVectorExtractor(ubm, rank, cfg.seed).fit(stats_bw, 4).transform(stats_bw))
    utt_labels, _ = kmeans_labels(ivecs, cfg.k_ivec, cfg.seed, "utterances (i-vectors)")
    # frame clusters of SSL features
    n_states = model.encoder.config.num_hidden_layers + 1
    layer = cfg.ssl_layer if cfg.ssl_layer >= 0 else n_states // 2
    frames = [ssl_frames(model, w, layer) for w in waves]
    allfr = np.concatenate(frames)
    pick = allfr[rng.choice(len(allfr), min(50_000, len(allfr)), replace=False)]
    _, centroids = kmeans_labels(pick, cfg.k_ssl, cfg.seed, "frames")
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(centroids)
    frame_labels = [index.search(np.ascontiguousarray(f, dtype=np.float32), 1)[1][:, 0] for f in frames]
    # activation statistics and neuron sets
    # (under torchrun each rank takes a shard of the utterances; the counts are summed across ranks)
    stats = ActivationStats(model, cfg.k_ivec, cfg.k_ssl, cfg.top_fraction)
    for w, u, fl in shard(list(zip(waves, utt_labels, frame_labels))):
        stats.update(w, int(u), fl)
    all_reduce_stats(stats)
    sets = neuron_sets(stats, cfg.sigma)
    share = np.bincount(np.concatenate(frame_labels), minlength=cfg.k_ssl) / len(allfr)
    report = {"ssl_layer": layer, "ssl_cluster_frame_share": share.round(4).tolist(),
              "ivector_cluster_utterances": np.bincount(utt_labels, minlength=cfg.k_ivec).tolist(),
              "utt_labels": utt_labels.tolist()}
    return sets, stats, report


def _specificity(stats: ActivationStats, sets: NeuronSets) -> list[np.ndarray]:
    """Per layer, for each speaker neuron: P(active | own cluster) - P(active | other clusters)."""
    out = []
    for probs, idx, own in zip(stats.probabilities(), sets.speaker, sets.speaker_cluster):
        p = probs.mean(1)  # (C, ffn): averaged over SSL clusters
        idx, own = np.array(idx, dtype=np.int64), np.array(own, dtype=np.int64)
        if len(idx) == 0:
            out.append(np.zeros(0))
            continue
        mine = p[own, idx]
        other = (p[:, idx].sum(0) - mine) / max(p.shape[0] - 1, 1)
        out.append(mine - other)
    return out


def _protect(sets: NeuronSets, spec: list[np.ndarray], widths: list[int], ratio: float) -> tuple[list[list[int]], bool]:
    """Speaker neurons to protect, capped per layer at what the ratio lets it keep."""
    protected, truncated = [], False
    for idx, s, w in zip(sets.speaker, spec, widths):
        budget = w - int(round(ratio * w))
        if len(idx) > budget:
            truncated = True
            idx = list(np.array(idx)[np.argsort(-s, kind="stable")[:budget]])
        protected.append([int(i) for i in idx])
    return protected, truncated


def _recover(student: SSLSpeakerModel, teacher_emb: np.ndarray, waves: list[np.ndarray], cfg: ExperimentConfig) -> None:
    """Short distillation of the pruned model toward the unpruned model's utterance embeddings."""
    rng = np.random.default_rng(cfg.seed + 1)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.recovery_lr)
    crop = 32000
    student.train()
    for _ in range(cfg.recovery_steps):
        idx = rng.integers(0, len(waves), cfg.recovery_batch)
        batch = np.zeros((len(idx), crop), dtype=np.float32)
        lengths = np.zeros(len(idx), dtype=np.int64)
        for b, i in enumerate(idx):
            s = int(rng.integers(0, max(1, len(waves[i]) - crop + 1)))
            seg = waves[i][s:s + crop]
            batch[b, :len(seg)] = seg
            lengths[b] = len(seg)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = student(torch.from_numpy(batch), torch.from_numpy(lengths))
        loss = (1 - (emb.float() * torch.from_numpy(teacher_emb[idx])).sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    student.eval()


def _evaluate(model: SSLSpeakerModel, name: str, es: EvalSet, workdir: Path) -> dict:
    card = ModelCard(name=name, version="experiment", family="wavlm-speaker", sample_rate=16000,
                     embedding_dim=model.embedding_dim, description="compression experiment model")
    export_model(model, card, workdir / name, int8=False, force=True)
    r = evaluate_embeddings(es, embed_with_model(workdir / name, es.waves, vad=False)[0])
    r.pop("_scores"), r.pop("_labels")
    return {**r, "params": int(sum(p.numel() for p in model.parameters())), "rtf": rtf(workdir / name),
            "onnx_bytes": (workdir / name / "model.onnx").stat().st_size,
            "ffn_widths": [ff.intermediate_dense.out_features for ff in ffn_layers(model.encoder)]}


def _prune_recompute(model: SSLSpeakerModel, waves: list[np.ndarray], cfg: ExperimentConfig, ratio: float) -> bool:
    """"Recompute per layer": sets from the partially pruned model, one layer at a time."""
    truncated = False
    for li in range(len(ffn_layers(model.encoder))):
        sets, stats, _ = speaker_neuron_sets(model, waves, cfg)
        scores = neuron_scores(model)
        widths = [len(s) for s in scores]
        protected, t = _protect(sets, _specificity(stats, sets), widths, ratio)
        truncated |= t
        plan = plan_pruning([scores[li]], ratio, [protected[li]], "layer")
        keep = [np.arange(w) for w in widths]
        keep[li] = plan.keep[0]
        from training.prune import PrunePlan

        apply_plan(model, PrunePlan(keep, [0] * len(widths), [0] * len(widths), ratio, "layer"))
    return truncated


def load_speaker_model(path: str | Path) -> tuple[SSLSpeakerModel, dict]:
    """A speaker model from a ``{state_dict, config}`` file, or an SSL ``save_pretrained`` directory.

    A bare encoder directory (WavLM, HuBERT, wav2vec 2.0; base or large) gets a mean+std
    pooling head with a fixed random projection: the neuron analysis and pruning concern the
    encoder, and the verification figures then measure what the encoder's features carry.
    """
    from models.ssl import SSLSpeakerConfig, load_encoder

    path = Path(path)
    if path.is_dir():
        family, encoder = load_encoder(path)
        torch.manual_seed(0)
        model = SSLSpeakerModel(SSLSpeakerConfig(family=family, encoder=encoder.config.to_dict(), pooling="meanstd",
                                                 embedding_dim=256), encoder=encoder).eval()
        return model, {"source": str(path), "head": "random mean+std projection (encoder-only checkpoint)"}
    return load_checkpoint(path)


def run_experiment(cfg: ExperimentConfig) -> list[dict]:
    """Run every stage; returns the result rows (also written to ``cfg.out``)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
    for r in cfg.ratios:
        if not 0 <= r < 1:
            raise PruneError(f"ratio {r} is outside [0, 1)")
    if cfg.variant not in ("once", "recompute"):
        raise ValueError(f"variant must be 'once' or 'recompute', got {cfg.variant!r}")
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()

    _log("stage 1: model and corpus")
    model, ckpt = load_speaker_model(cfg.checkpoint)
    corpus = Path(cfg.corpus)
    if not (corpus / "eval" / "trials").exists():
        import os
        import shutil

        from training.corpus import build_corpus, discover_voices

        if len({v.speaker for v in discover_voices()}) < 2 and os.geteuid() == 0 and shutil.which("apt-get"):
            _log("no TTS voices installed: running scripts/install_voices.sh (Debian packages)")
            subprocess.run(["bash", str(ROOT / "scripts" / "install_voices.sh")], check=True)
        _log(f"building the corpus at {corpus} (training.corpus, about 6 minutes)")
        build_corpus(corpus, "full")
    es = EvalSet(corpus, max_utts=cfg.eval_max_utts)
    rng = np.random.default_rng(cfg.seed)
    all_utts = sorted(read_scp(corpus / "train" / "wav.scp")) if (corpus / "train" / "wav.scp").is_file() else []
    pick = sorted(rng.choice(all_utts, min(cfg.calib_utts, len(all_utts)), replace=False)) if all_utts else None
    calib_utts, waves, utt2spk = load_split(corpus, "train", pick, progress=False)
    short = [u for u, w in zip(calib_utts, waves) if len(w) < 16000 * 0.5]
    if short:
        raise ValueError(f"{len(short)} calibration utterances are shorter than 0.5 s (e.g. {short[0]}): too short to yield frames")

    _log("stage 2-3: clusters, activation statistics, neuron sets")
    sets, stats, report = speaker_neuron_sets(model, waves, cfg)
    composition = {}
    for c in range(cfg.k_ivec):
        spk = [utt2spk.get(u, "?").split("-sp")[0] for u, lab in zip(calib_utts, report["utt_labels"]) if lab == c]
        names, counts = np.unique(spk, return_counts=True) if spk else (np.array([]), np.array([]))
        top = sorted(zip(counts.tolist(), names.tolist()), reverse=True)[:8]
        composition[f"ivector_cluster_{c}"] = {"utterances": len(spk), "speakers": len(names),
                                               "top_speakers": {n: k for k, n in top}}
    report["ivector_cluster_composition"] = composition
    (out / "clusters.json").write_text(json.dumps({k: v for k, v in report.items() if k != "utt_labels"}, indent=1) + "\n")
    sets.save(out / "neurons.json", stats)
    plot_neuron_counts(sets, out / "neurons.png", f"speaker neurons per layer (sigma={cfg.sigma}, k_ssl={cfg.k_ssl})")
    spec = _specificity(stats, sets)
    _log(f"speaker neurons per layer: {sets.counts()} of {stats.widths}; clusters: {json.dumps({k: v for k, v in report.items() if k != 'utt_labels'})}")

    with torch.no_grad():
        teacher = np.concatenate([model(torch.from_numpy(w)[None], torch.tensor([len(w)])).numpy() for w in waves])

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _log("stage 5: unpruned")
        rows.append({"method": "unpruned", "ratio": 0.0, "recovery": False, **_evaluate(model, "unpruned", es, work)})
        scores = neuron_scores(model)
        widths = [len(s) for s in scores]
        for ratio in cfg.ratios:
            for method in ("baseline", "protected"):
                pruned = copy.deepcopy(model)
                truncated = False
                if method == "protected" and cfg.variant == "recompute":
                    truncated = _prune_recompute(pruned, waves, cfg, ratio)
                    plan_summary = {"ratio": ratio, "scope": "layer", "variant": "recompute"}
                else:
                    protected, truncated = _protect(sets, spec, widths, ratio) if method == "protected" else (None, False)
                    plan = plan_pruning(scores, ratio, protected, cfg.scope)
                    apply_plan(pruned, plan)
                    plan_summary = plan.summary()
                for recovery in cfg.recovery:
                    m = copy.deepcopy(pruned)
                    if recovery:
                        _recover(m, teacher, waves, cfg)
                    name = f"{method}-r{int(round(ratio * 100))}{'-rec' if recovery else ''}"
                    row = {"method": method, "ratio": ratio, "recovery": recovery, "protected_truncated": truncated,
                           **_evaluate(m, name, es, work)}
                    rows.append(row)
                    _log(f"{name}: EER {row['eer']:.2f}% minDCF {row['mindcf']:.3f} params {row['params']:,}")
                    if method == "protected" and abs(ratio - 0.5) < 1e-9 and not recovery:
                        save_checkpoint(m, out / "protected-r50.pt", pruning={**plan_summary, "method": "protected",
                                                                            "sigma": cfg.sigma, "k_ssl": cfg.k_ssl,
                                                                            "k_ivec": cfg.k_ivec},
                                        training=ckpt.get("training", {}))
    minutes = (time.monotonic() - t0) / 60
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    _write_table(rows, out / "results.md", minutes)
    _plot(rows, out / "eer_vs_ratio.png")
    _log(f"done in {minutes:.1f} min: {out / 'results.json'}")
    return rows


def _write_table(rows: list[dict], path: Path, minutes: float) -> None:
    lines = ["| method | removed | recovery | EER % | minDCF | ID acc % | params | RTF |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']}{' (trunc.)' if r.get('protected_truncated') else ''} | {r['ratio']:.0%} | "
                     f"{'yes' if r['recovery'] else 'no'} | {r['eer']:.2f} | {r['mindcf']:.3f} | {r['id_accuracy']:.1f} | "
                     f"{r['params']:,} | {r['rtf']:.4f} |")
    path.write_text("\n".join(lines) + f"\n\n(total {minutes:.1f} min)\n")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    base = next(r["eer"] for r in rows if r["method"] == "unpruned")
    ax.axhline(base, color="gray", ls=":", label="unpruned")
    for method, color in (("baseline", "tab:blue"), ("protected", "tab:red")):
        for recovery, ls in ((False, "--"), (True, "-")):
            pts = sorted((r["ratio"], r["eer"]) for r in rows if r["method"] == method and r["recovery"] == recovery)
            if pts:
                ax.plot(*zip(*pts), ls, color=color, marker="o",
                        label=f"{'norm only' if method == 'baseline' else 'protected'}{' + recovery' if recovery else ''}")
    ax.set_xlabel("fraction of FFN neurons removed")
    ax.set_ylabel("EER (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.experiment", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--checkpoint")
    ap.add_argument("--corpus")
    ap.add_argument("--ratios", type=float, nargs="+")
    ap.add_argument("--scope", choices=("layer", "global"))
    ap.add_argument("--variant", choices=("once", "recompute"))
    ap.add_argument("--no-recovery", action="store_true")
    for f in ("k_ssl", "k_ivec", "ssl_layer", "calib_utts", "recovery_steps", "eval_max_utts", "seed", "ubm_components",
              "ivector_rank"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    ap.add_argument("--sigma", type=float)
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "no_recovery"}
    if args.no_recovery:
        given["recovery"] = [False]
    try:
        run_experiment(ExperimentConfig(**given))
    except (PruneError, ValueError, RuntimeError, OSError, subprocess.CalledProcessError) as e:
        print(f"experiment: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
