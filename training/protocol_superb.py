"""The published protocol: prune the SSL-pretrained upstream, train a fresh downstream on its frozen features.

Stages (each prints what it did):
1. downstream data: up to ``utts_per_speaker`` utterances of every training speaker (cropped to
   ``crop_seconds``) for speaker identification, the evaluation split's utterances and trials
   (unseen speakers) for verification, optionally passed through a channel
   (``downstream_condition``: telephone, codecs, noise...); checked before any long work;
2. calibration clusters and activation statistics of the unpruned upstream -> speaker neurons
   (``neurons.json``, ``neurons.png``), with a label-shuffled control count (how many
   "speaker neurons" the same statistics mark when the i-vector clusters are random), and the
   kept neuron sets of every method and ratio (the recompute-per-layer variant's statistics
   passes included, so under torchrun every collective happens here);
3. controls: the unpruned upstream and the upstream with every FFN neuron removed, each with a
   fresh head per seed -> the sensitivity gate (stops here if it cannot be computed);
4. for every ratio: norm-only ("baseline"), protected with sets computed once, protected with
   sets recomputed per layer, and random pruning (``random_seeds`` draws); one head per seed
   (skipped with ``gate_only``, as are stage 2's kept sets: a cheap check of a testbed);
5. ``results.json`` (rows), ``summary.json`` (gate and paired comparisons), ``results.md``
   and plots (``training.report``).

A head seed fixes the head's initialisation, its minibatch order and which utterances of each
training speaker are held out for identification, so rows with the same seed are paired.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import cosine_scores, evaluate_scores, read_trials
from models.ssl import SSLSpeakerModel, ffn_layers, save_checkpoint
from training.common import load_split
from training.corpus import read_scp
from training.distributed import gather_shards, is_main, shard
from training.downstream import HeadConfig, crop, layer_means, sid_accuracy, split_by_speaker, train_head, verification
from training.features import logmel_stats
from training.neurons import plot_neuron_counts
from training.protection import (cluster_labels, neuron_sets_for, protect, prune_recompute, random_keep,
                                 remove_all_ffn, specificity)
from training.prune import PrunePlan, apply_plan, neuron_scores, plan_pruning
from training.stats import gate, jaccard, paired_difference

__all__ = ["DownstreamData", "load_downstream_data", "run_superb"]


def _log(msg: str) -> None:
    print(f"[experiment {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class DownstreamData:
    """Waveforms for the downstream: training speakers (SID) and the evaluation split (verification)."""

    def __init__(self, sid_waves: list[np.ndarray], sid_labels: np.ndarray, speakers: list[str],
                 eval_utts: list[str], eval_waves: list[np.ndarray], trials: list[tuple[str, str, int]]):
        self.sid_waves, self.sid_labels, self.speakers = sid_waves, sid_labels, speakers
        self.eval_utts, self.eval_waves, self.trials = eval_utts, eval_waves, trials

    @property
    def seconds(self) -> float:
        """Audio seconds one upstream pass reads."""
        return (sum(len(w) for w in self.sid_waves) + sum(len(w) for w in self.eval_waves)) / 16000


def load_downstream_data(corpus: str | Path, utts_per_speaker: int, crop_seconds: float, min_speakers: int,
                         seed: int, condition: str | None = None, load: bool = True) -> DownstreamData | None:
    """Pick, load and crop the downstream utterances; refuse a corpus too small for the split.

    ``condition`` (a ``training.channels`` condition such as ``telephone``) passes every cropped
    utterance through that channel and back to 16 kHz; ``load=False`` only checks the corpus.

    Raises:
        ValueError: fewer than ``min_speakers`` training speakers with at least two utterances, or
            evaluation trials without both target and non-target pairs.
    """
    corpus = Path(corpus)
    utt2spk = read_scp(corpus / "train" / "utt2spk") if (corpus / "train" / "utt2spk").is_file() else {}
    by_spk: dict[str, list[str]] = {}
    for u in sorted(read_scp(corpus / "train" / "wav.scp")):
        if u in utt2spk:
            by_spk.setdefault(utt2spk[u], []).append(u)
    usable = {s: us for s, us in by_spk.items() if len(us) >= 2}
    if len(usable) < min_speakers:
        raise ValueError(f"{corpus / 'train'}: {len(usable)} speakers have at least 2 utterances; the downstream split "
                         f"needs at least {min_speakers} (add speakers to the corpus or lower --min-speakers)")
    ev = corpus / "eval"
    if not (ev / "trials").is_file():
        raise FileNotFoundError(f"{ev / 'trials'}: missing; verification on unseen speakers needs the eval split's trials")
    trials = read_trials(ev / "trials")
    if not {t for _, _, t in trials} >= {0, 1}:
        raise ValueError(f"{ev / 'trials'}: needs both target (1) and non-target (0) trials")
    if not load:
        return None
    rng = np.random.default_rng(seed)
    speakers = sorted(usable)
    pick, labels = [], []
    for k, s in enumerate(speakers):
        us = usable[s]
        chosen = sorted(rng.choice(us, min(utts_per_speaker, len(us)), replace=False).tolist())
        pick += chosen
        labels += [k] * len(chosen)
    _, waves, _ = load_split(corpus, "train", pick, progress=False)
    waves = [crop(w, crop_seconds, rng) for w in waves]
    eval_utts = sorted({u for a, b, _ in trials for u in (a, b)})
    _, eval_waves, _ = load_split(corpus, "eval", eval_utts, progress=False)
    eval_waves = [crop(w, crop_seconds, rng) for w in eval_waves]
    if condition is not None:
        waves, eval_waves = _through(condition, waves, rng), _through(condition, eval_waves, rng)
    return DownstreamData(waves, np.asarray(labels, dtype=np.int64), speakers, eval_utts, eval_waves, trials)


def _through(condition: str, waves: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Every waveform through one channel condition, back at 16 kHz."""
    from models.audio import resample
    from training.channels import apply_condition

    out = []
    for w in waves:
        y, rate = apply_condition(condition, w, rng)
        out.append((resample(y, rate, 16000) if rate != 16000 else y).astype(np.float32))
    return out


def _upstream_rows(model: SSLSpeakerModel, data: DownstreamData, seeds: list[int], cfg: Any, hcfg: HeadConfig,
                   base: dict) -> tuple[list[dict], np.ndarray]:
    """Features of one upstream, a fresh head per seed; returns (rows, SID features)."""
    t = time.monotonic()
    waves = data.sid_waves + data.eval_waves
    feats = gather_shards(layer_means(model, shard(waves)), len(waves))  # (N, L+1, H)
    rtf = (time.monotonic() - t) / data.seconds
    x_sid, x_eval = feats[:len(data.sid_waves)], feats[len(data.sid_waves):]
    params = int(sum(p.numel() for p in model.encoder.parameters()))
    rows = []
    for s in seeds:
        train, test = split_by_speaker(data.sid_labels, cfg.held_out, s)
        head = train_head(x_sid[train], data.sid_labels[train], len(data.speakers), s, hcfg)
        eer, mindcf = verification(head, x_eval, data.eval_utts, data.trials)
        rows.append({"protocol": "superb", **base, "seed": s,
                     "sid_acc": sid_accuracy(head, x_sid[test], data.sid_labels[test]), "eer": eer, "mindcf": mindcf,
                     "params": params, "rtf": rtf,
                     "ffn_widths": [ff.intermediate_dense.out_features for ff in ffn_layers(model.encoder)],
                     "layer_weights": [round(w, 4) for w in head.layer_weights()]})
    return rows, x_sid


def _logmel_eer(data: DownstreamData) -> float:
    """EER (%) of cosine-scored log-mel mean/std vectors on the verification trials (the spectral baseline)."""
    emb = np.stack([logmel_stats(w) for w in data.eval_waves])  # (N, 80)
    emb = emb - emb.mean(0)
    scores, labels = cosine_scores(dict(zip(data.eval_utts, emb)), data.trials)
    return float(evaluate_scores(scores, labels).eer)


def _shuffled_control(model: SSLSpeakerModel, waves: list[np.ndarray], utt_labels: np.ndarray,
                      frame_labels: list[np.ndarray], cfg: Any) -> list[int]:
    """Speaker neurons per layer when the utterance clusters are randomly permuted (chance level)."""
    rng = np.random.default_rng(cfg.seed + 7)
    sets, _ = neuron_sets_for(model, waves, rng.permutation(utt_labels), frame_labels, cfg)
    return sets.counts()


def run_superb(cfg: Any, model: SSLSpeakerModel, ckpt: dict, calib: Any, t0: float) -> tuple[list[dict], dict]:
    """Stages 1-5 (see the module docstring); returns (rows, summary), also written to ``cfg.out``."""
    from training import report
    from training.analysis import layer_probe

    out = Path(cfg.out)
    seeds = list(range(cfg.seeds))
    hcfg = HeadConfig(epochs=cfg.head_epochs)
    _log("stage 1: downstream data")
    data = load_downstream_data(cfg.corpus, cfg.utts_per_speaker, cfg.crop_seconds, cfg.min_speakers, cfg.seed,
                                cfg.downstream_condition)
    ratios = [] if cfg.gate_only else list(cfg.ratios)
    _log(f"{len(data.sid_waves)} SID utterances of {len(data.speakers)} speakers, {len(data.eval_utts)} evaluation "
         f"utterances, {len(data.trials)} trials; {data.seconds / 60:.1f} min of audio per upstream")

    _log("stage 2: clusters, activation statistics, speaker neurons")
    utt_labels, frame_labels, clusters = cluster_labels(model, calib.waves, cfg)
    sets, stats = neuron_sets_for(model, calib.waves, utt_labels, frame_labels, cfg)
    spec = specificity(stats, sets)
    shuffled = _shuffled_control(model, calib.waves, utt_labels, frame_labels, cfg)
    if is_main():
        sets.save(out / "neurons.json", stats)
        plot_neuron_counts(sets, out / "neurons.png", f"speaker neurons per layer (sigma={cfg.sigma}, k_ssl={cfg.k_ssl})")
        (out / "clusters.json").write_text(json.dumps({k: v for k, v in clusters.items() if k != "utt_labels"},
                                                      indent=1) + "\n")
    _log(f"speaker neurons per layer {sets.counts()} of {stats.widths}; with shuffled clusters {shuffled}")
    scores = neuron_scores(model)
    widths = [len(s) for s in scores]
    kept: dict[float, dict[str, list[np.ndarray]]] = {}
    truncation = {}
    for ratio in ratios:  # every statistics pass (the recompute variant's too) happens here, on every rank
        prot, trunc = protect(sets, spec, widths, ratio)
        kept[ratio] = {"baseline": plan_pruning(scores, ratio, None, "layer").keep,
                       "protected-once": plan_pruning(scores, ratio, prot, "layer").keep}
        kept[ratio]["protected-recompute"], trunc_r = prune_recompute(copy.deepcopy(model), calib.waves, utt_labels,
                                                                      frame_labels, cfg, ratio)
        truncation[str(ratio)] = {"once": trunc, "recompute": trunc_r}

    _log("stage 3: controls and the sensitivity gate")
    rows: list[dict] = []
    probes: dict[str, list[float]] = {}
    r_unpruned, x = _upstream_rows(model, data, seeds, cfg, hcfg, {"method": "unpruned", "ratio": 0.0, "variant": None})
    probes["unpruned"] = layer_probe(x, data.sid_labels, cfg.seed)
    none = remove_all_ffn(copy.deepcopy(model))
    r_all, x = _upstream_rows(none, data, seeds, cfg, hcfg, {"method": "all_ffn", "ratio": 1.0, "variant": None})
    probes["all_ffn"] = layer_probe(x, data.sid_labels, cfg.seed)
    rows += r_unpruned + r_all
    g = gate([r[cfg.metric] for r in r_unpruned], [r[cfg.metric] for r in r_all], cfg.metric, cfg.gate_factor)
    _log(f"gate: headroom {g['headroom']:.2f} vs noise {g['noise']:.2f} ({cfg.metric}): "
         f"{'testable' if g['testable'] else 'NOT testable'}")

    _log("stage 4: pruned upstreams" if ratios else "stage 4 skipped (--gate-only)")
    overlap = []
    for ratio in ratios:
        k = kept[ratio]
        for method, variant, name in (("baseline", None, "baseline"), ("protected", "once", "protected-once"),
                                      ("protected", "recompute", "protected-recompute")):
            up = apply_plan(copy.deepcopy(model), _plan(k[name], ratio))
            r, x = _upstream_rows(up, data, seeds, cfg, hcfg, {"method": method, "ratio": ratio, "variant": variant})
            rows += r
            if ratio == max(ratios):
                probes[f"{name}-r{round(ratio * 100)}"] = layer_probe(x, data.sid_labels, cfg.seed)
                if cfg.save_upstreams and is_main():  # for training.analysis (pruned vs unpruned)
                    (out / "upstreams").mkdir(exist_ok=True)
                    save_checkpoint(up.cpu(), out / "upstreams" / f"{name}-r{round(ratio * 100)}.pt")
        random_sets = []
        for j in range(cfg.random_seeds):
            keep = random_keep(widths, ratio, 1000 + j)
            random_sets.append(keep)
            r, _ = _upstream_rows(apply_plan(copy.deepcopy(model), _plan(keep, ratio)), data, [seeds[j % len(seeds)]],
                                  cfg, hcfg, {"method": "random", "ratio": ratio, "variant": None})
            rows += r
        overlap.append({"ratio": ratio,
                        "baseline_vs_protected_once": jaccard(k["baseline"], k["protected-once"]),
                        "baseline_vs_protected_recompute": jaccard(k["baseline"], k["protected-recompute"]),
                        "protected_once_vs_recompute": jaccard(k["protected-once"], k["protected-recompute"]),
                        "baseline_vs_random": float(np.mean([jaccard(k["baseline"], r) for r in random_sets]))
                        if random_sets else None})
        _log(f"ratio {ratio}: " + ", ".join(f"{_name(r)} {cfg.metric} {r[cfg.metric]:.2f}" for r in rows
                                             if r["ratio"] == ratio and r["seed"] == 0))

    summary = _summary(rows, g, cfg, ratios, overlap, truncation)
    summary.update(logmel_eer=_logmel_eer(data), speaker_neurons=sets.counts(), speaker_neurons_shuffled=shuffled,
                   ffn_widths=stats.widths, layer_probe_sid_acc=probes, minutes=(time.monotonic() - t0) / 60,
                   data={"sid_utterances": len(data.sid_waves), "speakers": len(data.speakers),
                         "eval_utterances": len(data.eval_utts), "trials": len(data.trials),
                         "crop_seconds": cfg.crop_seconds, "condition": cfg.downstream_condition},
                   gate_only=cfg.gate_only,
                   upstream=ckpt)
    unpruned_eer = float(np.mean([r["eer"] for r in r_unpruned]))
    summary["ssl_beats_logmel"] = bool(unpruned_eer < summary["logmel_eer"])
    if is_main():
        (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        report.write_results_page(rows, summary, out)
    _log(f"done in {summary['minutes']:.1f} min: {out / 'summary.json'}")
    return rows, summary


def _plan(keep: list[np.ndarray], ratio: float) -> PrunePlan:
    return PrunePlan([np.asarray(k) for k in keep], [0] * len(keep), [0] * len(keep), ratio, "layer")


def _name(r: dict) -> str:
    return r["method"] + (f"-{r['variant']}" if r.get("variant") else "")


def _summary(rows: list[dict], g: dict, cfg: Any, ratios: list[float], overlap: list[dict], truncation: dict) -> dict:
    """The gate, paired protected-minus-baseline differences per ratio (both variants), overlaps."""
    def per_seed(method: str, variant: str | None, ratio: float) -> dict[int, float]:
        return {r["seed"]: r[cfg.metric] for r in rows
                if r["method"] == method and r.get("variant") == variant and r["ratio"] == ratio}

    comparisons, recompute = [], []
    for ratio in ratios:
        base = per_seed("baseline", None, ratio)
        for variant, dest in (("once", comparisons), ("recompute", recompute)):
            prot = per_seed("protected", variant, ratio)
            common = sorted(set(base) & set(prot))
            d = paired_difference([prot[s] for s in common], [base[s] for s in common])
            dest.append({"ratio": ratio, "protected_minus_baseline": d["mean"], "ci95": d["ci95"], "n_seeds": d["n"]})
    return {"testable": g["testable"], "headroom": g["headroom"], "noise": g["noise"], "metric": cfg.metric,
            "gate_factor": g["factor"], "comparisons": comparisons, "comparisons_recompute": recompute,
            "kept_overlap_jaccard": overlap, "protected_truncated": truncation, "seeds": cfg.seeds,
            "random_seeds": cfg.random_seeds}

