"""The SSL-stage protocol (the one the method's authors report their largest effect under): prune the
upstream, continue **its own pretraining objective** for a fixed budget, then train the frozen
downstream as in the published protocol.

The objective is the one the upstream was made with, read from its ``provenance.json`` (the
``training.pretraining.pretrain`` run config): masked prediction of MFCC k-means targets, plus, for a distilled
upstream, per-frame distillation of the GE2E teacher, with the same crop length, batch size,
masking, channel augmentation and frozen front end. Every pruned upstream gets the same budget:
the same number of steps, the same batches (one seeded stream) and the same learning-rate
schedule, so the methods differ only in which neurons they kept.

A ``save_pretrained`` encoder does not carry its pretraining heads (cluster classifier,
distillation projection), so they are fitted once on the unpruned, frozen upstream
(``head_steps``) and every pruned upstream starts from a copy: pruning then has to recover against
the heads the unpruned model already predicts through, not against random ones.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from models.ssl import SSLSpeakerModel
from training.pretraining.pretrain import MaskedPredictor, PretrainConfig, crop_samples, pretrain_step

__all__ = ["SSLStageConfig", "SSLStage"]


@dataclass
class SSLStageConfig:
    """The fixed budget every pruned upstream gets (declared in the experiment config)."""

    steps: int = 150  # continued-pretraining steps per pruned upstream
    head_steps: int = 200  # steps fitting the pretraining heads on the frozen unpruned upstream
    lr: float = 1e-4  # peak learning rate of continued pretraining (10% linear warm-up, cosine to 0)
    head_lr: float = 1e-3  # peak learning rate of the head fit (fresh linear layers)
    utterances: int = 2000  # training utterances the stream draws from (seeded sample)
    seed: int = 0


def _objective(provenance: dict, corpus: str | Path, steps: int) -> PretrainConfig:
    """The upstream's own pretraining objective as a PretrainConfig (checked to be continuable)."""
    run = provenance.get("config")
    if not isinstance(run, dict):
        raise ValueError("the upstream has no provenance.json with its pretraining config ('config'); the SSL-stage "
                         "protocol continues the objective the upstream was made with, so it needs that record")
    known = {f.name for f in fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in run.items() if k in known and k not in ("corpus", "out")},
                         corpus=str(corpus), out="", )
    if cfg.target_layer:
        raise ValueError(f"the upstream was pretrained on layer-{cfg.target_layer} targets of another encoder; the "
                         "SSL-stage protocol continues MFCC-target (first iteration) objectives only")
    cfg.max_steps = steps
    return cfg


class SSLStage:
    """Continued pretraining of pruned upstreams under one fixed budget.

    Args:
        unpruned: the upstream before pruning (its heads are fitted on it; it is not changed).
        provenance: the upstream's provenance.json (its pretraining run's ``config``).
        corpus: the corpus whose training split the stream draws from.
        cfg: the budget.

    Raises:
        ValueError: no pretraining record, or one this protocol cannot continue.
    """

    def __init__(self, unpruned: SSLSpeakerModel, provenance: dict, corpus: str | Path, cfg: SSLStageConfig):
        from training.common import load_split
        from training.data.corpus import read_scp
        from training.pretraining.pretrain_data import kmeans_targets

        self.cfg = cfg
        self.objective = _objective(provenance, corpus, cfg.steps)
        crop = crop_samples(self.objective.crop_seconds)
        rng = np.random.default_rng(cfg.seed)
        utts = sorted(read_scp(Path(corpus) / "train" / "wav.scp"))
        if cfg.utterances and cfg.utterances < len(utts):
            utts = sorted(rng.choice(utts, cfg.utterances, replace=False).tolist())
        _, waves, _ = load_split(corpus, "train", utts, progress=False)
        self.waves = [w for w in waves if len(w) >= crop]
        if len(self.waves) < self.objective.batch_size:
            raise ValueError(f"{len(self.waves)} training utterances are at least {self.objective.crop_seconds} s "
                             f"long; continued pretraining needs {self.objective.batch_size}")
        self.labels, _ = kmeans_targets(self.waves, self.objective.n_clusters,
                                        min(self.objective.kmeans_frames, 100_000), cfg.seed)
        self.teacher, self.center = None, None
        if self.objective.distill_weight > 0:
            from training.pretraining.distill import load_teacher, teacher_center

            self.teacher = load_teacher(self.objective.teacher)
            if self.objective.distill_center:
                self.center = teacher_center(self.teacher, self.waves, crop, 1024, cfg.seed)
        self.heads, self.head_summary = self._fit_heads(unpruned)

    def _predictor(self, model: SSLSpeakerModel) -> MaskedPredictor:
        o = self.objective
        return MaskedPredictor(model.encoder, o.n_clusters, contrast=o.contrast_weight > 0,
                               contrast_head=o.contrast_head,
                               distill_dim=self.teacher.embedding_dim if self.teacher is not None else 0)

    def _train(self, predictor: MaskedPredictor, params: list[torch.nn.Parameter], steps: int, seed: int,
               lr: float) -> dict:
        """``steps`` steps of the objective on ``params`` (warm-up then cosine from ``lr``); returns a
        loss/accuracy summary."""
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=self.objective.weight_decay)
        rng = np.random.default_rng(seed)
        warm = max(1, steps // 10)
        history, t0 = [], time.monotonic()
        predictor.train()
        for step in range(steps):
            frac = (step + 1) / warm if step < warm else 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, steps - warm)))
            for g in opt.param_groups:
                g["lr"] = lr * float(frac)
            history.append(pretrain_step(predictor, opt, self.waves, self.labels, self.objective, rng, self.teacher,
                                         self.center, False))
        predictor.eval()
        last = history[-20:]
        return {"steps": steps, "minutes": (time.monotonic() - t0) / 60,
                "final_loss": float(np.mean([h[0] for h in last])) if last else None,
                "final_masked_acc": float(np.mean([h[1] for h in last])) if last else None}

    def _fit_heads(self, unpruned: SSLSpeakerModel) -> tuple[dict, dict]:
        model = copy.deepcopy(unpruned)
        predictor = self._predictor(model)
        for p in model.encoder.parameters():
            p.requires_grad_(False)
        heads = [p for n, p in predictor.named_parameters() if not n.startswith("encoder.")]
        summary = self._train(predictor, heads, self.cfg.head_steps, self.cfg.seed + 1, self.cfg.head_lr)
        state = {n: t.detach().clone() for n, t in predictor.state_dict().items() if not n.startswith("encoder.")}
        return state, summary

    def recover(self, model: SSLSpeakerModel) -> dict:
        """Continue pretraining ``model`` (pruned; changed in place, left in eval mode) for the budget;
        returns the run's summary (steps, minutes, final loss and masked accuracy)."""
        predictor = self._predictor(model)
        predictor.load_state_dict({**predictor.state_dict(), **copy.deepcopy(self.heads)})
        for p in model.encoder.parameters():
            p.requires_grad_(True)
        if self.objective.freeze_feature_encoder:
            model.encoder.freeze_feature_encoder()
        params = [p for p in predictor.parameters() if p.requires_grad]
        summary = self._train(predictor, params, self.cfg.steps, self.cfg.seed + 2, self.cfg.lr)  # one stream for all
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        return summary
