"""Speaker-teacher distillation during pretraining (``python -m training.pretrain --distill-weight W``).

A pretrained speaker encoder (Resemblyzer's GE2E, trained on thousands of real speakers) embeds
each clean training crop; through one linear map, **every frame** of the student's last layer
must point the same way (cosine loss, averaged over frames). The target is a property of the
whole crop, so each frame has to gather speaker evidence from its context (attention) and turn
spectra into speaker identity (a nonlinear job: with a frozen front end, ``--freeze-feature-
encoder``, only the Transformer's FFNs can do it). It is the "distillation target that needs
context" route to an upstream whose FFNs carry speaker information; the student never sees a
speaker label of the corpus, but the teacher was trained with speaker labels, so an encoder made
this way is labelled as distilled, not as purely self-supervised (``publish`` does so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from models.ge2e import GE2E

__all__ = ["load_teacher", "teacher_targets", "frame_distill_loss"]


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


def frame_distill_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over frames of 1 - cos(pred[b, t], target[b]): pred (B, T', D), target (B, D) -> scalar."""
    if pred.ndim != 3 or target.shape != (pred.shape[0], pred.shape[2]):
        raise ValueError(f"pred must be (B, T', D) and target (B, D); got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    cos = torch.nn.functional.cosine_similarity(pred.float(), target.float().unsqueeze(1), dim=-1)  # (B, T')
    return (1.0 - cos).mean()
