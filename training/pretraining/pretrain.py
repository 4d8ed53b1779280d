"""HuBERT-style SSL pretraining of a small WavLM from random initialisation, on CPU.

    .venv/bin/python -m training.pretraining.pretrain --corpus corpus --out runs/pretrain [--max-minutes 35]
    .venv/bin/python -m training.pretraining.pretrain --corpus corpus --out runs/pretrain2 \
        --init-encoder runs/pretrain/encoder --target-layer 3          # second iteration

Targets: k-means (FAISS) of MFCC+deltas frames at the encoder's 20 ms frame rate (first
iteration) or, as in HuBERT's second iteration, of the frame features of one layer of the
first iteration's encoder, which then continues training on them. The model
predicts the cluster of masked frames (spans of ``mask_length`` frames covering about
``mask_prob`` of each crop, replaced by the learned mask embedding) from its last layer,
with cross-entropy over masked frames only. This makes its frame features carry phonetic
structure, which is what the compression method (``training/``) clusters.

``--mix-prob P`` adds WavLM's utterance mixing (denoising masked prediction): each crop, with
probability P, gets a segment of another utterance (at most half the crop, at a primary-to-
interferer energy ratio drawn from [-5, 5] dB) added at a random place, while the targets stay
those of the primary crop. To predict them the model has to tell the two voices apart, which
is what WavLM credits for its speaker-task gains over HuBERT.

``--channel-prob P`` makes the task robust as well: each crop, with probability P, passes through
a random recording channel (``training.data.channels``: a random microphone/room response, noise,
reverberation or the telephone band), again with the clean crop's targets. Predicting clean
phonetic classes through an unknown channel means undoing it frame by frame, a nonlinear job,
and features that do so no longer carry the channel's long-term spectrum.

``--contrast-weight W`` adds an utterance-level self-supervised objective (SimCLR-style, as in
self-supervised speaker verification): the batch holds two crops of each utterance (different
segments; each through its own random channel with ``--channel-prob``), and the mean-pooled last
layer, through a small projection head, must pick out its sibling crop among the batch (NT-Xent,
temperature ``contrast_temperature``), weighted W against the masked prediction. No speaker labels
are used: the only supervision is "these two crops come from one recording". ``--contrast-head
linear`` replaces the MLP projection head by one linear map, so the nonlinear work of telling
recordings apart has to be done inside the encoder (by its FFNs) instead of in a head that is
thrown away after pretraining.

``--distill-weight W`` adds speaker-teacher distillation (``training.pretraining.distill``): every frame of the
last layer, through a linear map, must match the GE2E teacher's embedding of the clean crop.
``--freeze-feature-encoder`` keeps the convolutional front end fixed (as wav2vec 2.0 fine-tuning
does), so whatever the new objective teaches goes into the Transformer layers.

Resumable: ``out/last.pt`` holds model, optimiser, step and RNG states; the resolved
config is written to ``out/config.json``; seeds are fixed. bf16 autocast on CPU roughly
doubles throughput where the processor has native bf16 (AVX512-BF16, AMX); elsewhere
the job runs in fp32 (emulated bf16 is far slower).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.ssl import build_encoder, load_encoder
from training.common import RunState, cpu_bf16, load_split, start_run
from training.pretraining.distill import frame_distill_loss, load_teacher, teacher_center, teacher_targets
from training.pretraining.pretrain_data import (
    feature_targets,
    frames_of,
    kmeans_targets,
    mix_utterances,
    span_mask,
    through_channels,
)
from training.pretraining.publish import publish

__all__ = ["PretrainConfig", "SMALL_WAVLM", "utterance_contrast_loss", "CONTRAST_HEADS", "projection_head",
           "MaskedPredictor", "sample_batch", "crop_samples", "pretrain_step", "pretrain", "publish", "main"]

# 4-layer WavLM, hidden 256, FFN 1024, thin early convolutions (about 4 M parameters)
SMALL_WAVLM = dict(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
    conv_dim=(32, 64, 64, 128, 128, 256, 256), feat_extract_norm="group", num_buckets=160, max_bucket_distance=400,
    num_conv_pos_embeddings=64, num_conv_pos_embedding_groups=16, mask_time_prob=0.0, layerdrop=0.0,
    hidden_dropout=0.05, attention_dropout=0.05, activation_dropout=0.0, feat_proj_dropout=0.05,
)


@dataclass
class PretrainConfig:
    """Every parameter of a pretraining run (saved as config.json)."""

    corpus: str
    out: str
    encoder: dict = field(default_factory=lambda: dict(SMALL_WAVLM))
    init_encoder: str | None = None  # a save_pretrained directory to continue from (second iteration)
    target_layer: int = 0  # 0: MFCC k-means targets; L >= 1: k-means of init_encoder's layer-L features
    n_clusters: int = 100
    kmeans_frames: int = 300_000
    crop_seconds: float = 1.6
    batch_size: int = 16
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 300
    max_steps: int = 20_000
    max_minutes: float = 35.0
    mask_prob: float = 0.65
    mask_length: int = 10
    mix_prob: float = 0.0  # WavLM utterance mixing: share of crops overlaid with another utterance
    channel_prob: float = 0.0  # share of crops passed through a random channel (pretrain_data.PRETRAIN_CHANNELS)
    contrast_weight: float = 0.0  # weight of the two-crops-of-one-utterance contrastive loss (0: off)
    contrast_temperature: float = 0.1
    contrast_head: str = "mlp"  # projection head of the contrast: "mlp" (Linear-ReLU-Linear) or "linear"
    distill_weight: float = 0.0  # weight of per-frame distillation of the GE2E teacher's crop embedding (0: off)
    teacher: str | None = None  # resemblyzer wheel / pretrained.pt for --distill-weight (None: fetched with pip)
    distill_center: bool = False  # subtract the teacher's mean embedding from the distillation targets
    freeze_feature_encoder: bool = False  # keep the convolutional front end fixed
    checkpoint_every: int = 200
    bf16: bool = True
    threads: int = 0
    seed: int = 0


CONTRAST_HEADS = ("mlp", "linear")  # projection heads of the utterance contrast (--contrast-head)


def projection_head(kind: str, hidden: int, dim: int = 128) -> nn.Module:
    """The contrast's projection head, (B, hidden) -> (B, dim): "mlp" (Linear-ReLU-Linear) or "linear"."""
    if kind == "mlp":
        return nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim))
    if kind == "linear":
        return nn.Linear(hidden, dim)
    raise ValueError(f"contrast_head must be one of {list(CONTRAST_HEADS)}, got {kind!r}")


class MaskedPredictor(nn.Module):
    """Encoder + linear head over cluster ids (+ a projection head for the utterance contrast, + a
    linear per-frame head onto the distillation teacher's embedding space)."""

    def __init__(self, encoder: nn.Module, n_clusters: int, contrast: bool = False, contrast_head: str = "mlp",
                 distill_dim: int = 0):
        super().__init__()
        self.encoder = encoder
        h = encoder.config.hidden_size
        self.head = nn.Linear(h, n_clusters)
        self.proj = projection_head(contrast_head, h) if contrast else None
        self.distill = nn.Linear(h, distill_dim) if distill_dim else None

    def forward(self, wave: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                       torch.Tensor | None]:
        """wave (B, T), mask (B, T') bool -> logits (B, T', K), projected utterance means (B, 128) or None,
        per-frame teacher-space predictions (B, T', D) or None."""
        last = self.encoder(wave, mask_time_indices=mask).last_hidden_state  # (B, T', H)
        z = self.proj(last.mean(1)) if self.proj is not None else None
        return self.head(last), z, (self.distill(last) if self.distill is not None else None)


def utterance_contrast_loss(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over (B, D) embeddings where rows 2k and 2k+1 are two crops of one utterance.

    Each row's positive is its sibling (index ``i ^ 1``); every other row of the batch is a negative.
    """
    if z.shape[0] % 2:
        raise ValueError(f"utterance contrast needs pairs of crops, got a batch of {z.shape[0]}")
    z = nn.functional.normalize(z.float(), dim=-1)  # (B, D)
    sim = z @ z.T / temperature  # (B, B)
    sim = sim.masked_fill(torch.eye(len(z), dtype=torch.bool, device=z.device), float("-inf"))
    sibling = torch.arange(len(z), device=z.device) ^ 1  # (B,)
    return nn.functional.cross_entropy(sim, sibling)


def sample_batch(waves: list[np.ndarray], labels: list[np.ndarray], cfg: PretrainConfig,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training batch: crops (B, T) float32 at random gains and their frame targets (B, T') int64.

    With ``contrast_weight`` rows 2k and 2k+1 are two crops of one utterance.
    """
    crop = crop_samples(cfg.crop_seconds)
    n_frames = frames_of(crop)
    idx = rng.integers(0, len(waves), cfg.batch_size)
    if cfg.contrast_weight > 0:
        idx[1::2] = idx[0::2]
    batch = np.zeros((cfg.batch_size, crop), dtype=np.float32)
    tgt = np.zeros((cfg.batch_size, n_frames), dtype=np.int64)
    for b, i in enumerate(idx):
        start_frame = int(rng.integers(0, len(labels[i]) - n_frames + 1))
        s = start_frame * 320
        seg = waves[i][s:s + crop]
        batch[b, :len(seg)] = seg * float(rng.uniform(0.5, 1.5))
        tgt[b] = labels[i][start_frame:start_frame + n_frames]
    return batch, tgt


def crop_samples(seconds: float) -> int:
    """Crop length in samples for ``seconds``, trimmed to a whole number of encoder frames."""
    crop = int(seconds * 16000)
    return crop - (crop - 400) % 320


def pretrain_step(model: "MaskedPredictor", opt: torch.optim.Optimizer, waves: list[np.ndarray],
                  labels: list[np.ndarray], cfg: PretrainConfig, rng: np.random.Generator,
                  teacher: nn.Module | None, center: torch.Tensor | None, bf16: bool) -> tuple[float, float]:
    """One optimiser step of the pretraining objective (masked prediction, plus the contrast and the
    distillation when their weights are set); returns (loss, masked-frame accuracy)."""
    batch, tgt = sample_batch(waves, labels, cfg, rng)  # (B, T), (B, T')
    speaker = teacher_targets(teacher, batch) if teacher is not None else None  # (B, D), clean crops
    mix_utterances(batch, waves, cfg.mix_prob, rng)  # targets stay the primary crop's
    through_channels(batch, cfg.channel_prob, rng, waves)  # and the clean crop's
    mask = torch.from_numpy(span_mask(cfg.batch_size, tgt.shape[1], cfg.mask_prob, cfg.mask_length, rng))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits, z, d = model(torch.from_numpy(batch), mask)  # (B, T', K), (B, 128) / (B, T', D) or None
    loss = nn.functional.cross_entropy(logits.float()[mask], torch.from_numpy(tgt)[mask])
    if z is not None:
        loss = loss + cfg.contrast_weight * utterance_contrast_loss(z, cfg.contrast_temperature)
    if d is not None:
        loss = loss + cfg.distill_weight * frame_distill_loss(d, speaker, center)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 5.0)
    opt.step()
    with torch.no_grad():
        acc = (logits.float()[mask].argmax(-1) == torch.from_numpy(tgt)[mask]).float().mean().item()
    return float(loss.item()), acc


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pretraining; returns the path of the final encoder checkpoint."""
    from tqdm import tqdm

    if not 0.0 <= cfg.mix_prob <= 1.0:
        raise ValueError(f"mix_prob must be in [0, 1] (a share of crops), got {cfg.mix_prob}")
    if not 0.0 <= cfg.channel_prob <= 1.0:
        raise ValueError(f"channel_prob must be in [0, 1] (a share of crops), got {cfg.channel_prob}")
    if cfg.contrast_weight < 0 or (cfg.contrast_weight > 0 and cfg.batch_size % 2):
        raise ValueError(f"contrast_weight must be >= 0 and needs an even batch_size (pairs of crops); got "
                         f"contrast_weight {cfg.contrast_weight}, batch_size {cfg.batch_size}")
    if cfg.contrast_head not in CONTRAST_HEADS:
        raise ValueError(f"contrast_head must be one of {list(CONTRAST_HEADS)}, got {cfg.contrast_head!r}")
    if cfg.distill_weight < 0:
        raise ValueError(f"distill_weight must be >= 0, got {cfg.distill_weight}")
    teacher = load_teacher(cfg.teacher) if cfg.distill_weight > 0 else None
    init = None
    if cfg.init_encoder:
        family, init = load_encoder(cfg.init_encoder)
        if family != "wavlm":
            raise ValueError(f"init_encoder {cfg.init_encoder}: a {family} encoder; pretraining continues WavLM encoders")
        if getattr(init, "masked_spec_embed", None) is None:
            raise ValueError(f"init_encoder {cfg.init_encoder}: has no mask embedding (its config's mask_time_prob "
                             "is 0), so masked prediction cannot continue it")
        cfg.encoder = {k: getattr(init.config, k) for k in cfg.encoder}  # record what is actually trained
    elif cfg.target_layer:
        raise ValueError(f"target_layer {cfg.target_layer} needs init_encoder (the encoder whose features are clustered)")
    out = start_run(cfg.out, cfg, cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    crop = crop_samples(cfg.crop_seconds)
    _, all_waves, _ = load_split(cfg.corpus, "train")
    waves = [w for w in all_waves if len(w) >= crop]
    if len(waves) < cfg.batch_size:
        raise ValueError(f"only {len(waves)} utterances are at least {cfg.crop_seconds} s long; need {cfg.batch_size}")
    targets_path = out / "targets.npz"
    if targets_path.exists():
        z = np.load(targets_path, allow_pickle=False)
        labels = [z[f"u{i}"] for i in range(len(waves))]
    else:
        if cfg.target_layer:
            labels, centroids = feature_targets(init, waves, cfg.target_layer, cfg.n_clusters, cfg.kmeans_frames,
                                                cfg.seed)
        else:
            labels, centroids = kmeans_targets(waves, cfg.n_clusters, cfg.kmeans_frames, cfg.seed)
        np.savez(targets_path, centroids=centroids, **{f"u{i}": lab for i, lab in enumerate(labels)})

    center = None
    if teacher is not None and cfg.distill_center:
        center_path = out / "teacher_center.npy"
        if not center_path.exists():  # once per run: a resumed run keeps its centre
            np.save(center_path, teacher_center(teacher, waves, crop, 1024, cfg.seed).numpy())
        center = torch.from_numpy(np.load(center_path))  # (D,)
    encoder = init if init is not None else build_encoder("wavlm", {**cfg.encoder, "mask_time_prob": 0.05})
    if cfg.freeze_feature_encoder:
        encoder.freeze_feature_encoder()
    model = MaskedPredictor(encoder, cfg.n_clusters, contrast=cfg.contrast_weight > 0, contrast_head=cfg.contrast_head,
                            distill_dim=teacher.embedding_dim if teacher is not None else 0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))

    state = RunState(out, {"model": model, "opt": opt}, cfg.seed)
    rng = state.rng

    model.train()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="pretrain", unit="step")
    t_start = time.monotonic() - state.elapsed * 60
    bf16 = cpu_bf16(cfg.bf16, "pretrain")
    while state.step < cfg.max_steps and (time.monotonic() - t_start) / 60 < cfg.max_minutes:
        for g in opt.param_groups:
            g["lr"] = lr_at(state.step)
        loss, acc = pretrain_step(model, opt, waves, labels, cfg, rng, teacher, center, bf16)
        state.history.append((state.step, loss, acc))
        state.step += 1
        state.elapsed = (time.monotonic() - t_start) / 60
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.3f}", min=f"{state.elapsed:.1f}")
        if state.step % cfg.checkpoint_every == 0:
            state.save()
    bar.close()
    state.save()
    final = out / "encoder"
    model.encoder.save_pretrained(final)  # a standard save_pretrained directory
    last = state.history[-50:]  # empty when a run asked for no steps
    summary = {"steps": state.step, "minutes": state.elapsed,
               "final_loss": float(np.mean([h[1] for h in last])) if last else None,
               "final_masked_acc": float(np.mean([h[2] for h in last])) if last else None, "utterances": len(waves),
               "targets": f"layer {cfg.target_layer} of {cfg.init_encoder}" if cfg.target_layer else "MFCC",
               "mix_prob": cfg.mix_prob, "channel_prob": cfg.channel_prob, "contrast_weight": cfg.contrast_weight,
               "contrast_head": cfg.contrast_head, "distill_weight": cfg.distill_weight,
               "distill_center": cfg.distill_center, "freeze_feature_encoder": cfg.freeze_feature_encoder}
    if cfg.init_encoder:  # provenance of the run this one continues: its config and summary
        prev = Path(cfg.init_encoder).parent
        summary["init_run"] = {name: json.loads((prev / f"{name}.json").read_text())
                               for name in ("config", "summary") if (prev / f"{name}.json").is_file()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return final


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.pretraining.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--init-encoder", help="save_pretrained encoder directory to continue from (second iteration)")
    for f in ("n_clusters", "batch_size", "max_steps", "seed", "threads", "checkpoint_every", "target_layer"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    for f in ("max_minutes", "lr", "crop_seconds", "mask_prob", "mix_prob", "channel_prob", "contrast_weight",
              "contrast_temperature", "distill_weight"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=float)
    ap.add_argument("--contrast-head", choices=CONTRAST_HEADS,
                    help="projection head of the utterance contrast (default mlp; linear leaves the nonlinear "
                         "work to the encoder)")
    ap.add_argument("--teacher", help="GE2E teacher for --distill-weight: resemblyzer wheel or pretrained.pt "
                                      "(default: the wheel, fetched with pip)")
    ap.add_argument("--distill-center", action="store_true", default=None,
                    help="subtract the teacher's mean embedding from the distillation targets")
    ap.add_argument("--freeze-feature-encoder", action="store_true", default=None,
                    help="keep the convolutional front end fixed")
    ap.add_argument("--layers", type=int, help="encoder depth (num_hidden_layers; default %d)"
                    % SMALL_WAVLM["num_hidden_layers"])
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--publish", metavar="DEST", help="copy the finished encoder to DEST with provenance.json "
                                                      "(e.g. models/checkpoints/ssl-pretrained)")
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("no_bf16", "layers", "publish")}
    cfg = PretrainConfig(**given, bf16=not args.no_bf16)
    if args.layers is not None:
        if args.layers < 1:
            print(f"pretrain: --layers must be at least 1, got {args.layers}", file=sys.stderr)
            return 2
        cfg.encoder["num_hidden_layers"] = args.layers
    try:
        path = pretrain(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 2
    print(f"encoder saved to {path}")
    if args.publish:
        command = "python -m training.pretraining.pretrain " + " ".join(sys.argv[1:] if argv is None else argv)
        print(f"published to {publish(cfg.out, args.publish, command)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
