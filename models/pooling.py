"""Pooling heads over time for frame-level speaker features: masked mean/std and attentive statistics."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AttentiveStatsPool", "MeanStdPool", "masked_mean_std"]


def masked_mean_std(x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None,
                    unbiased: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked (optionally weighted) mean and std over time: x (B, T, H), mask (B, T) -> (B, H), (B, H)."""
    m = mask.to(x.dtype).unsqueeze(2)  # (B, T, 1)
    w = m if weights is None else weights * m  # (B, T, 1|H)
    total = w.sum(dim=1).clamp(min=1e-6)  # (B, 1|H)
    mean = (x * w).sum(dim=1) / total  # (B, H)
    var = (((x - mean.unsqueeze(1)) ** 2) * w).sum(dim=1) / total  # (B, H)
    if unbiased:
        var = var * total / (total - 1).clamp(min=1e-6)
    return mean, torch.sqrt(var.clamp(min=1e-8))


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling (channel-wise attention); output size ``2 * in_dim``."""

    def __init__(self, in_dim: int, hidden: int = 128):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, in_dim))
        self.output_dim = 2 * in_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), mask (B, T) -> (B, 2H)."""
        logits = self.attention(x)  # (B, T, H)
        logits = logits.masked_fill(~mask.unsqueeze(2), -1e4)
        weights = torch.softmax(logits, dim=1)  # (B, T, H)
        mean, std = masked_mean_std(x, mask, weights)
        return torch.cat([mean, std], dim=1)


class MeanStdPool(nn.Module):
    """Masked mean and standard deviation over time; output size ``2 * in_dim``."""

    def __init__(self, in_dim: int):
        super().__init__()
        self.output_dim = 2 * in_dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, H), mask (B, T) -> (B, 2H)."""
        return torch.cat(masked_mean_std(x, mask), dim=1)
