"""Per-model setup of the engine: the screening and decision rules a model is served with, and its batcher."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from models.artifact import ArtifactError, load_card, scan_repository
from models.runtime import SpeakerModel
from models.vad import VadOptions
from service.batcher import BatchStats, DynamicBatcher
from service.config import ConfigError, ServerConfig
from service.metrics import Metrics

__all__ = ["ModelPolicy", "make_batcher", "model_policy", "select_models"]

log = logging.getLogger("spkserve.engine")


@dataclass(frozen=True)
class ModelPolicy:
    """How one model's inputs are screened and its scores decided (server options + model.json)."""

    vad: VadOptions | None  # None: VAD off, all audio counts as speech
    min_probe_speech: float  # seconds per Verify/Identify audio probe
    min_enroll_speech: float  # seconds per speaker, in total
    scale: str  # default decision scale
    threshold: float  # default decision threshold on ``scale``


def model_policy(config: ServerConfig, model: SpeakerModel) -> ModelPolicy:
    """The model's screening and decision rules: server options < model.json < [model_settings.<model>]."""
    cfg = config.for_model(model.name)
    table = config.model_settings.get(model.name, {})
    vad = None
    if cfg.vad:
        opts = {"threshold": cfg.vad_threshold, "min_speech_ms": cfg.vad_min_speech_ms,
                "min_silence_ms": cfg.vad_min_silence_ms, "speech_pad_ms": cfg.vad_speech_pad_ms}
        card_vad = {k: v for k, v in (model.card.vad or {}).items() if v is not None}
        opts.update(card_vad)
        for key in ("threshold", "min_speech_ms", "min_silence_ms", "speech_pad_ms"):
            if f"vad_{key}" in table:  # the operator's per-model setting wins over model.json
                opts[key] = getattr(cfg, f"vad_{key}")
        try:
            vad = VadOptions(**opts).validate(f"model {model.name} vad")
        except ValueError as e:
            raise ArtifactError(f"{model.dir / 'model.json'}: {e}") from None
    scale, threshold = model.scorer.scale, model.scorer.threshold
    if cfg.decision_scale:
        scale, threshold = cfg.decision_scale, cfg.decision_threshold
        try:
            model.scorer.check_threshold(scale, threshold, "option 'decision_threshold'")
        except ValueError as e:
            raise ConfigError(f"model {model.name}: {e}") from None
    return ModelPolicy(vad, cfg.min_probe_speech_seconds, cfg.min_enroll_speech_seconds, scale, threshold)

def make_batcher(config: ServerConfig, metrics: Metrics, model: SpeakerModel) -> DynamicBatcher:
    """A started batcher for ``model`` with the server's batching options, reporting to ``metrics``."""
    cfg, m, name = config, metrics, model.name
    stats = BatchStats(
        on_batch=lambda n, s: (m.batch_size.labels(name).observe(n), m.inference_time.labels(name).observe(s)),
        on_queue_time=lambda s: m.queue_time.labels(name).observe(s),
        on_depth=lambda d: m.queue_depth.labels(name).set(d),
        on_dropped=lambda why: m.dropped.labels(name, why).inc(),
        on_wasted=lambda n: m.wasted.labels(name).inc(n),
    )
    batcher = DynamicBatcher(
        model.embed,
        max_batch_size=cfg.max_batch_size,
        max_batch_samples=int(cfg.max_batch_seconds * model.sample_rate),
        max_wait_s=cfg.max_wait_ms / 1000.0,
        max_queue=cfg.max_queue,
        max_queue_wait_s=cfg.max_queue_wait_ms / 1000 or None,
        deadline_margin=cfg.deadline_margin,
        min_fill=cfg.batch_min_fill,
        same_length_only=not model.padded_batching,
        workers=cfg.inference_threads(model.provider != "CPUExecutionProvider")[0],
        priority_age_s=cfg.live_priority_ms / 1000,
        reserve_s=cfg.live_reserve_ms / 1000,
        stats=stats,
        name=name,
    )
    batcher.start()
    return batcher


def select_models(config: ServerConfig) -> list[Path]:
    """The repository entries a server with ``config`` loads: those named in ``models``, else every entry whose
    model.json does not forbid commercial use (the others load only when named). Raises ArtifactError /
    ConfigError naming the option when a named entry, any entry at all, or a ``model_settings`` model is missing."""
    dirs = scan_repository(config.model_repository)
    if config.models:
        by_name = {d.name: d for d in dirs}
        missing = [m for m in config.models if m not in by_name]
        if missing:
            raise ArtifactError(f"option 'models': {missing} not in {config.model_repository} (has {sorted(by_name)})")
        dirs = [by_name[m] for m in config.models]
    else:
        kept = []
        for d in dirs:
            card = load_card(d)
            if card.commercial_use is False:
                log.warning("not loading model %s: its licence (%s) does not permit commercial use; name it in the "
                            "'models' option to serve it anyway", card.name, card.license)
            else:
                kept.append(d)
        dirs = kept
    if not dirs:
        raise ArtifactError(f"{config.model_repository}: no model directories (each needs a model.json)")
    unknown = sorted(set(config.model_settings) - {d.name for d in dirs})
    if unknown:
        raise ConfigError(f"option 'model_settings': no model named {unknown} is loaded (loading {[d.name for d in dirs]})")
    return dirs
