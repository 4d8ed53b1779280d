"""The second protocol: prune a speaker-fine-tuned model and score it with its own head.

This is the project's first experiment, kept as a clearly labelled second protocol
(``--protocol finetuned``; rows carry ``"protocol": "finetuned"``). It is not the published
protocol (that prunes the SSL-pretrained upstream and retrains a downstream on it; see
``training.experiment.superb``). Stages:
1. load the speaker model checkpoint and the corpus;
2. calibration set (training utterances): i-vector and SSL-frame clusters;
3. activation statistics -> speaker neurons -> ``neurons.json`` and ``neurons.png``;
4. for every ratio: norm-only ("baseline") and protected pruning, physically sliced, each
   without and with recovery (a short distillation toward the unpruned model's embeddings);
5. every model exported to ONNX and evaluated on the corpus's evaluation trials: EER (%),
   minDCF (p=0.01), identification accuracy of the evaluation speakers (``sid_acc``, %),
   parameters, ONNX Runtime real-time factor;
6. ``results.json``, ``results.md`` and ``eer_vs_ratio.png``.
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.artifact import ModelCard
from models.export import export_model
from models.ssl import SSLSpeakerModel, ffn_layers, save_checkpoint
from training.common import cpu_bf16
from training.compression.neurons import plot_neuron_counts
from training.compression.protection import cluster_labels, neuron_sets_for, protect, prune_recompute, specificity
from training.compression.prune import apply_plan, neuron_scores, plan_pruning
from training.evaluation.evaluate import EvalSet, embed_with_model, evaluate_embeddings, rtf

__all__ = ["run_finetuned"]


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _recover(student: SSLSpeakerModel, teacher_emb: np.ndarray, waves: list[np.ndarray], cfg: Any) -> None:
    """Short distillation of the pruned model toward the unpruned model's utterance embeddings."""
    rng = np.random.default_rng(cfg.seed + 1)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.recovery_lr)
    crop = 32000
    student.train()
    bf16 = cpu_bf16(True, "recovery")
    for _ in range(cfg.recovery_steps):
        idx = rng.integers(0, len(waves), cfg.recovery_batch)
        batch = np.zeros((len(idx), crop), dtype=np.float32)
        lengths = np.zeros(len(idx), dtype=np.int64)
        for b, i in enumerate(idx):
            s = int(rng.integers(0, max(1, len(waves[i]) - crop + 1)))
            seg = waves[i][s:s + crop]
            batch[b, :len(seg)] = seg
            lengths[b] = len(seg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
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
            "ffn_widths": [ff.intermediate_dense.out_features for ff in ffn_layers(model.encoder)],
            "sid_acc": r["id_accuracy"]}


def run_finetuned(cfg: Any, model: SSLSpeakerModel, ckpt: dict, calib: Any, t0: float) -> list[dict]:
    """Stages 2-6 of the fine-tuned-model protocol; returns the rows (also written to ``cfg.out``).

    ``calib`` holds the calibration utterances (``utts``, ``waves``, ``utt2spk``) that
    ``training.experiment`` loaded and checked.
    """
    out = Path(cfg.out)
    corpus = Path(cfg.corpus)
    calib_utts, waves, utt2spk = calib.utts, calib.waves, calib.utt2spk
    es = EvalSet(corpus, max_utts=cfg.eval_max_utts)
    _log("stage 2-3: clusters, activation statistics, neuron sets")
    utt_labels, frame_labels, report = cluster_labels(model, waves, cfg)
    sets, stats = neuron_sets_for(model, waves, utt_labels, frame_labels, cfg)
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
    spec = specificity(stats, sets)
    _log(f"speaker neurons per layer: {sets.counts()} of {stats.widths}; clusters: {json.dumps({k: v for k, v in report.items() if k != 'utt_labels'})}")

    with torch.no_grad():
        teacher = np.concatenate([model(torch.from_numpy(w)[None], torch.tensor([len(w)])).numpy() for w in waves])

    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _log("stage 5: unpruned")
        rows.append({"protocol": "finetuned", "method": "unpruned", "ratio": 0.0, "seed": cfg.seed, "recovery": False, **_evaluate(model, "unpruned", es, work)})
        scores = neuron_scores(model)
        widths = [len(s) for s in scores]
        for ratio in cfg.ratios:
            for method in ("baseline", "protected"):
                pruned = copy.deepcopy(model)
                truncated = False
                if method == "protected" and cfg.variant == "recompute":
                    _, truncated = prune_recompute(pruned, waves, utt_labels, frame_labels, cfg, ratio)
                    plan_summary = {"ratio": ratio, "scope": "layer", "variant": "recompute"}
                else:
                    protected, truncated = protect(sets, spec, widths, ratio) if method == "protected" else (None, False)
                    plan = plan_pruning(scores, ratio, protected, cfg.scope)
                    apply_plan(pruned, plan)
                    plan_summary = plan.summary()
                for recovery in cfg.recovery:
                    m = copy.deepcopy(pruned)
                    if recovery:
                        _recover(m, teacher, waves, cfg)
                    name = f"{method}-r{int(round(ratio * 100))}{'-rec' if recovery else ''}"
                    row = {"protocol": "finetuned", "method": method, "ratio": ratio, "seed": cfg.seed, "recovery": recovery, "protected_truncated": truncated,
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


