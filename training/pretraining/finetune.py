"""Fine-tune a pretrained SSL encoder into a speaker model: GE2E distillation + AAM softmax.

    .venv/bin/python -m training.pretraining.finetune --corpus corpus --encoder runs/pretrain/encoder --out runs/finetune

The student is ``models.ssl.SSLSpeakerModel`` (encoder + weighted layer sum + attentive
statistics pooling + 256-d projection). Loss per crop: ``distill_weight * (1 - cos(student,
teacher))`` with the teacher's (GE2E, from the committed ONNX model) embedding of the whole
utterance, plus an additive-angular-margin softmax over the training (pseudo-)speakers.
Augmentation: random crops, random gain, additive noise. Resumable like pretraining; the
final model is saved as ``{state_dict, config, training}`` in ``out/model.pt``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.ssl import SSLSpeakerConfig, SSLSpeakerModel, load_encoder, save_checkpoint
from training.common import RunState, cpu_bf16, load_split, start_run

__all__ = ["FinetuneConfig", "AAMSoftmax", "teacher_embeddings", "finetune", "main"]

REPO = Path(__file__).resolve().parents[2] / "models" / "repository"


@dataclass
class FinetuneConfig:
    """Every parameter of a fine-tuning run (saved as config.json)."""

    corpus: str
    encoder: str  # save_pretrained directory of the pretrained encoder
    out: str
    teacher: str = str(REPO / "ge2e")
    embedding_dim: int = 256
    pooling: str = "asp"
    crop_seconds: float = 2.0
    batch_size: int = 24
    lr_encoder: float = 1e-4
    lr_head: float = 1e-3
    warmup_steps: int = 100
    max_steps: int = 5000
    max_minutes: float = 20.0
    margin: float = 0.2
    scale: float = 30.0
    distill_weight: float = 5.0
    checkpoint_every: int = 100
    bf16: bool = True
    seed: int = 0


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace) over ``n_classes``."""

    def __init__(self, dim: int, n_classes: int, margin: float = 0.2, scale: float = 30.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.margin, self.scale = margin, scale

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """emb (B, D) unit, labels (B,) -> scalar loss."""
        cos = emb @ nn.functional.normalize(self.weight, dim=1).T  # (B, C)
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        target = torch.cos(theta + self.margin)
        onehot = nn.functional.one_hot(labels, cos.shape[1]).to(cos.dtype)
        logits = self.scale * (onehot * target + (1 - onehot) * cos)
        return nn.functional.cross_entropy(logits, labels)


def teacher_embeddings(teacher_dir: str, waves: list[np.ndarray]) -> np.ndarray:
    """GE2E embeddings (N, 256) of whole utterances, batched on ONNX Runtime."""
    from models.runtime import SpeakerModel

    return SpeakerModel(teacher_dir, ["CPUExecutionProvider"]).embed_many(waves)


def finetune(cfg: FinetuneConfig) -> Path:
    """Run (or resume) fine-tuning; returns the path of the saved model checkpoint."""
    from tqdm import tqdm

    from models.artifact import load_card

    teacher_dim = load_card(cfg.teacher).embedding_dim
    if teacher_dim != cfg.embedding_dim:
        raise ValueError(f"embedding_dim {cfg.embedding_dim} must equal the teacher's embedding size {teacher_dim} "
                         f"({cfg.teacher}) for the distillation loss")
    out = start_run(cfg.out, cfg, cfg.seed)
    utts, waves, utt2spk = load_split(cfg.corpus, "train")
    speakers = sorted({utt2spk[u] for u in utts})
    spk_index = {s: i for i, s in enumerate(speakers)}
    labels = np.array([spk_index[utt2spk[u]] for u in utts])
    tpath = out / "teacher.npy"
    if tpath.exists():
        teacher = np.load(tpath)
    else:
        teacher = teacher_embeddings(cfg.teacher, waves)
        np.save(tpath, teacher)

    family, encoder = load_encoder(cfg.encoder)
    model = SSLSpeakerModel(SSLSpeakerConfig(family=family, encoder=encoder.config.to_dict(),
                                             embedding_dim=cfg.embedding_dim, pooling=cfg.pooling), encoder=encoder)
    aam = AAMSoftmax(cfg.embedding_dim, len(speakers), cfg.margin, cfg.scale)
    enc_params = list(model.encoder.parameters())
    enc_ids = {id(p) for p in enc_params}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids] + list(aam.parameters())
    opt = torch.optim.AdamW([{"params": enc_params, "lr": cfg.lr_encoder, "base": cfg.lr_encoder},
                             {"params": head_params, "lr": cfg.lr_head, "base": cfg.lr_head}], weight_decay=0.01)

    state = RunState(out, {"model": model, "aam": aam, "opt": opt}, cfg.seed)
    rng = state.rng

    crop = int(cfg.crop_seconds * 16000)
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="finetune", unit="step")
    t_start = time.monotonic() - state.elapsed * 60
    bf16 = cpu_bf16(cfg.bf16, "finetune")
    while state.step < cfg.max_steps and (time.monotonic() - t_start) / 60 < cfg.max_minutes:
        idx = rng.integers(0, len(waves), cfg.batch_size)
        batch = np.zeros((cfg.batch_size, crop), dtype=np.float32)
        lengths = np.zeros(cfg.batch_size, dtype=np.int64)
        for b, i in enumerate(idx):
            w = waves[i]
            s = int(rng.integers(0, max(1, len(w) - crop + 1)))
            seg = w[s:s + crop] * float(rng.uniform(0.3, 1.5))
            if rng.random() < 0.3:
                seg = seg + rng.standard_normal(len(seg)).astype(np.float32) * float(np.std(seg)) * float(rng.uniform(0.03, 0.2))
            batch[b, :len(seg)] = seg
            lengths[b] = len(seg)
        frac = state.step / cfg.max_steps
        for g in opt.param_groups:
            warm = min(1.0, (state.step + 1) / cfg.warmup_steps)
            g["lr"] = g["base"] * warm * 0.5 * (1 + math.cos(math.pi * frac))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = model(torch.from_numpy(batch), torch.from_numpy(lengths))  # (B, D)
        emb = emb.float()
        t = torch.from_numpy(teacher[idx])
        distill = (1 - (emb * t).sum(1)).mean()
        cls = aam(emb, torch.from_numpy(labels[idx]))
        loss = cfg.distill_weight * distill + cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(list(model.parameters()) + list(aam.parameters()), 5.0)
        opt.step()
        state.history.append((state.step, float(loss.item()), float(distill.item()), float(cls.item())))
        state.step += 1
        state.elapsed = (time.monotonic() - t_start) / 60
        bar.update(1)
        bar.set_postfix(distill=f"{distill.item():.3f}", aam=f"{cls.item():.2f}", min=f"{state.elapsed:.1f}")
        if state.step % cfg.checkpoint_every == 0:
            state.save()
    bar.close()
    state.save()
    model.eval()
    summary = {"steps": state.step, "minutes": state.elapsed, "speakers": len(speakers), "utterances": len(utts),
               "final_distill": float(np.mean([h[2] for h in state.history[-50:]])),
               "final_aam": float(np.mean([h[3] for h in state.history[-50:]]))}
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    pre = json.loads((Path(cfg.encoder).parent / "summary.json").read_text()) if (Path(cfg.encoder).parent / "summary.json").exists() else {}
    return save_checkpoint(model, out / "model.pt", training={"finetune": asdict(cfg), "finetune_summary": summary,
                                                               "pretrain_summary": pre})


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.pretraining.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--out", required=True)
    for f in ("batch_size", "max_steps", "seed", "embedding_dim"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=int)
    for f in ("max_minutes", "lr_encoder", "lr_head", "crop_seconds", "distill_weight", "margin"):
        ap.add_argument(f"--{f.replace('_', '-')}", type=float)
    ap.add_argument("--no-bf16", action="store_true")
    args = ap.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None and k != "no_bf16"}
    try:
        path = finetune(FinetuneConfig(**given, bf16=not args.no_bf16))
    except (ValueError, FileNotFoundError) as e:
        print(f"finetune: {e}", file=sys.stderr)
        return 2
    print(f"model saved to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
