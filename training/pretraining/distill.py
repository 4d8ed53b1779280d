"""Speaker-teacher distillation during pretraining (``python -m training.pretraining.pretrain --distill-weight W``).

A pretrained speaker encoder (Resemblyzer's GE2E, trained on thousands of real speakers) embeds
each clean training crop; through one linear map, **every frame** of the student's last layer
must point the same way (cosine loss, averaged over frames). The target is a property of the
whole crop, so each frame has to gather speaker evidence from its context (attention) and turn
spectra into speaker identity (a nonlinear job: with a frozen front end, ``--freeze-feature-
encoder``, only the Transformer's FFNs can do it). It is the "distillation target that needs
context" route to an upstream whose FFNs carry speaker information; the student never sees a
speaker label of the corpus, but the teacher was trained with speaker labels, so an encoder made
this way is labelled as distilled, not as purely self-supervised (``publish`` does so).

GE2E embeddings pass a ReLU, so any two of them are far from orthogonal (cosine about 0.7 between
different voices): predicting their common mean already brings the loss most of the way down.
``--distill-center`` subtracts the teacher's mean embedding over random training crops
(``teacher_center``) from every target before the cosine, so the loss rewards only the part that
tells voices apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.ge2e import GE2E

__all__ = ["load_teacher", "teacher_targets", "teacher_center", "frame_distill_loss"]


def load_teacher(path: str | Path | None) -> GE2E:
    """The GE2E teacher from a resemblyzer wheel, its ``pretrained.pt`` or a saved GE2E state dict
    (None: fetch the wheel with pip); frozen, in eval mode."""
    teacher = GE2E.from_resemblyzer(path)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def teacher_targets(teacher: GE2E, crops: np.ndarray) -> torch.Tensor:
    """crops (B, T) float32 at 16 kHz, all valid -> the teacher's L2-normalised embeddings (B, D)."""
    if crops.ndim != 2 or crops.shape[0] == 0:
        raise ValueError(f"crops must be a non-empty (batch, samples) array, got shape {crops.shape}")
    wave = torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32))  # (B, T)
    lengths = torch.full((wave.shape[0],), wave.shape[1], dtype=torch.int64)  # (B,)
    return teacher(wave, lengths)  # (B, D)


def teacher_center(teacher: GE2E, waves: list[np.ndarray], crop: int, n_crops: int, seed: int,
                   batch: int = 64) -> torch.Tensor:
    """The teacher's mean embedding (D,) over ``n_crops`` random crops of ``crop`` samples from ``waves``
    (each at least ``crop`` long), drawn with their own generator so the training stream is unchanged."""
    if n_crops < 1 or not waves or any(len(w) < crop for w in waves):
        raise ValueError(f"teacher_center needs n_crops >= 1 and waves of at least {crop} samples; got n_crops "
                         f"{n_crops}, {len(waves)} waves")
    rng = np.random.default_rng(seed)
    picks = [(int(i), int(rng.integers(0, len(waves[i]) - crop + 1))) for i in rng.integers(0, len(waves), n_crops)]
    total = None
    for start in range(0, n_crops, batch):  # the crops are fixed first: the batch size cannot change them
        rows = np.stack([waves[i][s:s + crop] for i, s in picks[start:start + batch]])  # (b, crop)
        emb = teacher_targets(teacher, rows).sum(0)  # (D,)
        total = emb if total is None else total + emb
    return total / n_crops


def frame_distill_loss(pred: torch.Tensor, target: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over frames of 1 - cos(pred[b, t], target[b] - center): pred (B, T', D), target (B, D),
    center (D,) or None -> scalar."""
    if pred.ndim != 3 or target.shape != (pred.shape[0], pred.shape[2]):
        raise ValueError(f"pred must be (B, T', D) and target (B, D); got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    target = target.float() - (center.float() if center is not None else 0.0)  # (B, D)
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.unsqueeze(1), dim=-1)  # (B, T')
    return (1.0 - cos).mean()
