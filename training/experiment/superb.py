"""The published protocol: prune the SSL-pretrained upstream, train a fresh downstream on its frozen features.

Stages (each prints what it did):
1. downstream data: up to ``utts_per_speaker`` utterances of every training speaker (cropped to
   ``crop_seconds``) for speaker identification, the evaluation split's utterances and trials
   (unseen speakers) for verification, optionally passed through a channel
   (``downstream_condition``: telephone, codecs, noise...); checked before any long work;
2. controls: the unpruned upstream and the upstream with every FFN neuron removed, a fresh head per
   seed (the gate; ``gate_only`` stops here);
3. an i-vector extractor trained on the training split, then for each of ``calibration_draws``
   calibration subsets: i-vector and SSL clusters (their speaker and pitch-class purity recorded),
   activation statistics, speaker neurons, the count's null distribution over ``permutations``
   label permutations, and the kept sets of ``protected`` and ``shuffled_protect`` (a random
   neuron set of the same size protected instead) per ratio;
4. for every ratio: norm-only ("baseline"), protected (every draw); at the primary ratio also
   shuffled_protect (every draw) and random pruning (``random_seeds`` draws); one head per seed;
5. the SSL-stage protocol (``training.experiment.ssl_stage``) at ``ssl_stage_ratios``: norm-only and protected
   upstreams continue their own pretraining objective for one fixed budget, then the frozen
   downstream;
6. ``results.json`` (rows), ``controls.json`` (neuron counts, nulls, cluster purity, SSL-stage runs),
   ``summary.json`` (``training.experiment.summary``: the gate, controls, the declared primary comparison and
   its verdict), ``results.md`` and plots (``training.experiment.report``).

A head seed fixes the head's initialisation, its minibatch order and which utterances of each
training speaker are held out for identification, so rows with the same seed are paired.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import cosine_scores, evaluate_scores, read_trials
from models.ssl import SSLSpeakerModel, ffn_layers
from training.common import load_split
from training.compression.clusters import IVectorModel, cluster_purity, pitch_class, pitch_hz, train_ivector_extractor
from training.compression.neurons import plot_neuron_counts
from training.compression.protection import (
    cluster_labels,
    neuron_sets_for,
    null_speaker_counts,
    protect,
    random_keep,
    remove_all_ffn,
    shuffled_protect,
    specificity,
)
from training.compression.prune import PrunePlan, apply_plan, neuron_scores, plan_pruning
from training.data.corpus import read_scp
from training.data.features import logmel_stats
from training.distributed import gather_shards, is_main, shard
from training.experiment.downstream import (
    HeadConfig,
    crop,
    layer_means,
    sid_accuracy,
    split_by_speaker,
    train_head,
    verification,
)
from training.experiment.summary import gate_of, summarize

__all__ = ["DownstreamData", "DrawSets", "load_downstream_data", "run_superb"]


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

    ``condition`` (a ``training.data.channels`` condition such as ``telephone``) passes every cropped
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
    from training.data.channels import apply_condition

    out = []
    for w in waves:
        y, rate = apply_condition(condition, w, rng)
        out.append((resample(y, rate, 16000) if rate != 16000 else y).astype(np.float32))
    return out


def _upstream_rows(model: SSLSpeakerModel, data: DownstreamData, seeds: list[int], cfg: Any, hcfg: HeadConfig,
                   base: dict) -> list[dict]:
    """Features of one upstream, a fresh head per seed -> one row per seed (``base`` gives protocol,
    method, ratio, calibration_draw and random_draw)."""
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
        rows.append({"protocol": "superb", "calibration_draw": None, **base, "seed": s,
                     "sid_acc": sid_accuracy(head, x_sid[test], data.sid_labels[test]), "eer": eer, "mindcf": mindcf,
                     "params": params, "rtf": rtf,
                     "ffn_widths": [ff.intermediate_dense.out_features for ff in ffn_layers(model.encoder)],
                     "layer_weights": [round(w, 4) for w in head.layer_weights()]})
    return rows


def _logmel_eer(data: DownstreamData) -> float:
    """EER (%) of cosine-scored log-mel mean/std vectors on the verification trials (the spectral baseline)."""
    emb = np.stack([logmel_stats(w) for w in data.eval_waves])  # (N, 80)
    emb = emb - emb.mean(0)
    scores, labels = cosine_scores(dict(zip(data.eval_utts, emb)), data.trials)
    return float(evaluate_scores(scores, labels).eer)


@dataclass
class DrawSets:
    """What one calibration draw decides: the kept neurons of every method per ratio, and its controls."""

    kept: dict[float, dict[str, list[np.ndarray]]]  # ratio -> {"protected", "shuffled_protect"} -> per layer
    neuron_count: int
    null: list[int]
    truncated: dict[str, bool]
    purity: dict


def _speaker_pitch(utts: list[str], waves: list[np.ndarray], utt2spk: dict[str, str]) -> dict[str, str]:
    """Each calibration speaker's estimated pitch class (median F0 over its utterances)."""
    per: dict[str, list[float]] = {}
    for u, w in zip(utts, waves):
        per.setdefault(utt2spk[u], []).append(pitch_hz(w))
    return {s: pitch_class(float(np.nanmedian(f)) if np.isfinite(f).any() else float("nan")) for s, f in per.items()}


def _draw_sets(model: SSLSpeakerModel, calib: Any, draw: int, ivectors: IVectorModel, cfg: Any,
               scores: list[np.ndarray], ratios: list[float], out: Path) -> DrawSets:
    """Stage 2 for one calibration draw: clusters (with their purity), statistics, speaker neurons, the
    permutation null of their count, and the protected / shuffled-protect kept sets per ratio."""
    utt_labels, frame_labels, clusters = cluster_labels(model, calib.waves, cfg, ivectors)
    sets, stats = neuron_sets_for(model, calib.waves, utt_labels, frame_labels, cfg, per_utterance=True)
    null = null_speaker_counts(stats, utt_labels, cfg.sigma, cfg.permutations, cfg.seed + 100 + draw)
    pitch = _speaker_pitch(calib.utts, calib.waves, calib.utt2spk)
    spk = [calib.utt2spk[u] for u in calib.utts]
    frame_spk = [s for s, fl in zip(spk, frame_labels) for _ in range(len(fl))]
    purity = {"ivector": cluster_purity(utt_labels, spk, [pitch[s] for s in spk], 20, cfg.seed + draw),
              "ssl_frames": cluster_purity(np.concatenate(frame_labels), frame_spk, [pitch[s] for s in frame_spk],
                                           20, cfg.seed + draw),
              "pitch_classes": {c: sum(v == c for v in pitch.values()) for c in ("low", "high", "unknown")},
              "ivector_cluster_utterances": clusters["ivector_cluster_utterances"],
              "ssl_cluster_frame_share": clusters["ssl_cluster_frame_share"]}
    spec = specificity(stats, sets)
    widths = [len(x) for x in scores]
    kept, truncated = {}, {}
    for ratio in ratios:
        prot, truncated[str(ratio)] = protect(sets, spec, widths, ratio)
        kept[ratio] = {"protected": plan_pruning(scores, ratio, prot, "layer").keep,
                       "shuffled_protect": plan_pruning(scores, ratio, shuffled_protect(prot, widths,
                                                                                        cfg.seed + 200 + draw),
                                                        "layer").keep}
    if is_main() and draw == 0:
        sets.save(out / "neurons.json", stats)
        plot_neuron_counts(sets, out / "neurons.png", f"speaker neurons per layer (sigma={cfg.sigma}, k_ssl={cfg.k_ssl})")
    _log(f"draw {draw}: speaker neurons {sets.counts()} (total {sum(sets.counts())}); label-permutation null "
         f"p95 {np.percentile(null, 95):.0f}; i-vector clusters speaker consistency "
         f"{purity['ivector']['speaker_consistency']} (chance {purity['ivector']['speaker_consistency_chance']}), "
         f"pitch-class purity {purity['ivector']['pitch_class_purity']}")
    return DrawSets(kept, int(sum(sets.counts())), null, truncated, purity)


def run_superb(cfg: Any, model: SSLSpeakerModel, ckpt: dict, calibration: Callable[[int], Any],
               t0: float) -> tuple[list[dict], dict]:
    """Stages 1-6 (see the module docstring); returns (rows, summary), also written to ``cfg.out``."""
    from training.experiment import report

    out = Path(cfg.out)
    seeds = list(range(cfg.seeds))
    hcfg = HeadConfig(epochs=cfg.head_epochs)
    _log("stage 1: downstream data")
    data = load_downstream_data(cfg.corpus, cfg.utts_per_speaker, cfg.crop_seconds, cfg.min_speakers, cfg.seed,
                                cfg.downstream_condition)
    ratios = [] if cfg.gate_only else sorted(set(cfg.ratios))
    _log(f"{len(data.sid_waves)} SID utterances of {len(data.speakers)} speakers, {len(data.eval_utts)} evaluation "
         f"utterances, {len(data.trials)} trials; {data.seconds / 60:.1f} min of audio per upstream")

    rows: list[dict] = []
    _log("stage 2: controls (unpruned, every FFN neuron removed)")
    rows += _upstream_rows(model, data, seeds, cfg, hcfg, {"method": "unpruned", "ratio": 0.0})
    rows += _upstream_rows(remove_all_ffn(copy.deepcopy(model)), data, seeds, cfg, hcfg,
                           {"method": "all_ffn", "ratio": 1.0})
    controls: dict = {}
    if ratios:
        _log(f"stage 3: i-vector extractor on the training split, then {cfg.calibration_draws} calibration draws")
        ivectors = train_ivector_extractor(cfg.corpus, cfg.ubm_components, cfg.ivector_rank, cfg.seed,
                                           cfg.ivector_utts or None)
        scores = neuron_scores(model)
        draws = [_draw_sets(model, calibration(d), d, ivectors, cfg, scores, ratios, out)
                 for d in range(cfg.calibration_draws)]
        controls = {"neuron_count": draws[0].neuron_count, "neuron_count_null": draws[0].null,
                    "per_draw": [{"draw": d, "neuron_count": x.neuron_count,
                                  "null_p95": float(np.percentile(x.null, 95)), "truncated": x.truncated,
                                  "clusters": x.purity} for d, x in enumerate(draws)],
                    "ivector_extractor_utterances": ivectors.utterances}
        _log("stage 4: pruned upstreams")
        for ratio in ratios:
            controls_here = ratio == cfg.primary_ratio
            rows += _upstream_rows(apply_plan(copy.deepcopy(model), _plan(plan_pruning(scores, ratio, None, "layer")
                                                                            .keep, ratio)),
                                   data, seeds, cfg, hcfg, {"method": "baseline", "ratio": ratio})
            for d, x in enumerate(draws):
                for method in ("protected", "shuffled_protect") if controls_here else ("protected",):
                    up = apply_plan(copy.deepcopy(model), _plan(x.kept[ratio][method], ratio))
                    rows += _upstream_rows(up, data, seeds, cfg, hcfg,
                                           {"method": method, "ratio": ratio, "calibration_draw": d})
            for j in range(cfg.random_seeds if controls_here else 0):
                up = apply_plan(copy.deepcopy(model), _plan(random_keep([len(x) for x in scores], ratio, 1000 + j),
                                                            ratio))
                rows += _upstream_rows(up, data, seeds, cfg, hcfg, {"method": "random", "ratio": ratio,
                                                                   "random_draw": j})
            _log(f"ratio {ratio}: " + ", ".join(f"{r['method']} {cfg.metric} {np.mean([q[cfg.metric] for q in rows if q['method'] == r['method'] and q['ratio'] == ratio]):.2f}"
                                                for r in rows if r["ratio"] == ratio and r["seed"] == 0
                                                and r.get("calibration_draw") in (None, 0)
                                                and r.get("random_draw") in (None, 0)))
        if cfg.ssl_stage_ratios:
            rows += _ssl_stage_rows(cfg, model, ckpt, data, seeds, hcfg, scores, draws, controls)

    if is_main():
        (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "controls.json").write_text(json.dumps(controls, indent=1) + "\n")
    declared = _declared(cfg)
    summary = (summarize(rows, declared, controls) if ratios else
               {"gate_only": True, "metric": cfg.metric, "sesoi": cfg.sesoi, "gate": gate_of(rows, declared)})
    summary["run"] = {"minutes": (time.monotonic() - t0) / 60, "logmel_eer": _logmel_eer(data),
                      "data": {"sid_utterances": len(data.sid_waves), "speakers": len(data.speakers),
                               "eval_utterances": len(data.eval_utts), "trials": len(data.trials),
                               "crop_seconds": cfg.crop_seconds, "condition": cfg.downstream_condition},
                      "upstream": ckpt}
    if is_main():
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        report.write_results_page(rows, summary, controls, out)
    _log(f"done in {summary['run']['minutes']:.1f} min: {out / 'summary.json'}")
    return rows, summary


def _declared(cfg: Any) -> dict:
    """The part of the config the summary reads (declared before the run)."""
    return {"metric": cfg.metric, "sesoi": cfg.sesoi, "primary_protocol": cfg.primary_protocol,
            "primary_ratio": cfg.primary_ratio}


def _ssl_stage_rows(cfg: Any, model: SSLSpeakerModel, ckpt: dict, data: DownstreamData, seeds: list[int],
                    hcfg: HeadConfig, scores: list[np.ndarray], draws: list[DrawSets], controls: dict) -> list[dict]:
    """Stage 5: norm-only and protected upstreams (every calibration draw) through continued pretraining
    of the same budget, then the frozen downstream."""
    from training.experiment.ssl_stage import SSLStage, SSLStageConfig

    scfg = SSLStageConfig(steps=cfg.ssl_stage_steps, head_steps=cfg.ssl_stage_head_steps, lr=cfg.ssl_stage_lr,
                          utterances=cfg.ssl_stage_utts, seed=cfg.seed)
    _log(f"stage 5: SSL-stage protocol ({scfg.steps} continued-pretraining steps per upstream)")
    stage = SSLStage(model, ckpt, cfg.corpus, scfg)
    controls["ssl_stage"] = {"heads": stage.head_summary, "budget": {"steps": scfg.steps, "lr": scfg.lr,
                                                                    "head_steps": scfg.head_steps,
                                                                    "utterances": scfg.utterances}, "runs": []}
    rows = []
    for ratio in sorted(set(cfg.ssl_stage_ratios)):
        jobs = [("baseline", None, plan_pruning(scores, ratio, None, "layer").keep)]
        jobs += [("protected", d, _kept_for(x, ratio)) for d, x in enumerate(draws)]
        for method, d, keep in jobs:
            up = apply_plan(copy.deepcopy(model), _plan(keep, ratio))
            run = stage.recover(up)
            controls["ssl_stage"]["runs"].append({"method": method, "ratio": ratio, "calibration_draw": d, **run})
            r = _upstream_rows(up, data, seeds, cfg, hcfg, {"protocol": "ssl_stage", "method": method,
                                                             "ratio": ratio, "calibration_draw": d})
            rows += r
            _log(f"ssl_stage {method} r{ratio} draw {d}: loss {run['final_loss']:.3f}, {cfg.metric} "
                 f"{np.mean([q[cfg.metric] for q in r]):.2f}")
    return rows


def _kept_for(x: DrawSets, ratio: float) -> list[np.ndarray]:
    if ratio not in x.kept:
        raise ValueError(f"ssl_stage ratio {ratio} is not in ratios {sorted(x.kept)}; every SSL-stage ratio must also "
                         "be run under the published protocol")
    return x.kept[ratio]["protected"]


def _plan(keep: list[np.ndarray], ratio: float) -> PrunePlan:
    return PrunePlan([np.asarray(k) for k in keep], [0] * len(keep), [0] * len(keep), ratio, "layer")
