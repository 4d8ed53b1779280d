"""Structured FFN pruning that protects speaker neurons (step 5 of the method).

Each FFN neuron j of a layer is scored ``L1(fc1 row j) + |fc1 bias j| + L1(fc2 column j)``;
the lowest-scoring neurons are removed until the target ratio is reached, never a protected
one. Removal is physical: fc1's rows and bias and fc2's columns are sliced, so the exported
graph is smaller and faster and the model's config records one FFN width per layer.
Ratios are per layer or global (one ranking of layer-normalised scores over all layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.ssl import SSLSpeakerModel, ffn_layers

__all__ = ["neuron_scores", "plan_pruning", "slice_ffn", "apply_plan", "PruneError", "PrunePlan"]


class PruneError(ValueError):
    """A pruning request that cannot be met; the message says what to change."""


@dataclass
class PrunePlan:
    """Neurons to keep per layer, and how they were chosen."""

    keep: list[np.ndarray]  # per layer: sorted indices of kept neurons
    removed: list[int]
    protected_kept: list[int]
    ratio: float
    scope: str

    def summary(self) -> dict:
        """JSON-able description for the model card."""
        return {"ratio": self.ratio, "scope": self.scope, "widths": [len(k) for k in self.keep],
                "removed": self.removed, "protected": self.protected_kept}


def neuron_scores(model: SSLSpeakerModel) -> list[np.ndarray]:
    """Per layer, the (ffn,) norm scores L1(fc1 row) + |fc1 bias| + L1(fc2 column)."""
    out = []
    for ff in ffn_layers(model.encoder):
        fc1, fc2 = ff.intermediate_dense, ff.output_dense
        s = fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0)  # (ffn,)
        out.append(s.detach().double().numpy())
    return out


def plan_pruning(scores: list[np.ndarray], ratio: float, protected: list[list[int]] | None = None,
                 scope: str = "layer") -> PrunePlan:
    """Choose the neurons to keep.

    Args:
        scores: per-layer neuron scores (higher is more important).
        ratio: fraction of FFN neurons to remove, in [0, 1).
        protected: per-layer neuron indices that must be kept (None: no protection).
        scope: "layer" (remove ``round(ratio * width)`` in every layer) or "global" (remove
            ``round(ratio * total)`` by one ranking of scores divided by their layer's mean).

    Raises:
        PruneError: ratio outside [0, 1), unknown scope, or more protected neurons than a
            layer (or the model) may keep.
    """
    if not 0 <= ratio < 1:
        raise PruneError(f"ratio must be in [0, 1), got {ratio}; a ratio of 1 would remove every neuron")
    if scope not in ("layer", "global"):
        raise PruneError(f"scope must be 'layer' or 'global', got {scope!r}")
    protected = protected or [[] for _ in scores]
    if len(protected) != len(scores):
        raise PruneError(f"protected sets for {len(protected)} layers, the model has {len(scores)}")
    masks = []
    for li, (s, p) in enumerate(zip(scores, protected)):
        m = np.zeros(len(s), dtype=bool)
        if len(p) and (min(p) < 0 or max(p) >= len(s)):
            raise PruneError(f"layer {li}: protected index out of range 0..{len(s) - 1}")
        m[list(p)] = True
        masks.append(m)
    removed_sets: list[np.ndarray] = []
    if scope == "layer":
        for li, (s, m) in enumerate(zip(scores, masks)):
            n_remove = int(round(ratio * len(s)))
            if m.sum() > len(s) - n_remove:
                raise PruneError(
                    f"layer {li}: {int(m.sum())} protected neurons but only {len(s) - n_remove} of {len(s)} may be kept "
                    f"at ratio {ratio}; lower the ratio or protect fewer neurons (e.g. a larger sigma)")
            order = np.argsort(np.where(m, np.inf, s), kind="stable")  # protected last
            removed_sets.append(np.sort(order[:n_remove]))
    else:
        total = sum(len(s) for s in scores)
        n_remove = int(round(ratio * total))
        n_protected = int(sum(m.sum() for m in masks))
        if n_protected > total - n_remove:
            raise PruneError(f"{n_protected} protected neurons but only {total - n_remove} of {total} may be kept at ratio "
                             f"{ratio}; lower the ratio or protect fewer neurons")
        flat = np.concatenate([np.where(m, np.inf, s / max(s.mean(), 1e-12)) for s, m in zip(scores, masks)])
        layer_of = np.concatenate([np.full(len(s), i) for i, s in enumerate(scores)])
        index_of = np.concatenate([np.arange(len(s)) for s in scores])
        order = np.argsort(flat, kind="stable")[:n_remove]
        # never empty a layer: keep at least one neuron per layer
        chosen = [[] for _ in scores]
        for k in order:
            chosen[layer_of[k]].append(index_of[k])
        for li, s in enumerate(scores):
            if len(chosen[li]) >= len(s):
                raise PruneError(f"global ratio {ratio} would remove every neuron of layer {li}; lower the ratio")
        removed_sets = [np.sort(np.array(c, dtype=np.int64)) for c in chosen]
    keep = [np.setdiff1d(np.arange(len(s)), r) for s, r in zip(scores, removed_sets)]
    return PrunePlan(keep, [len(r) for r in removed_sets], [int(m.sum()) for m in masks], ratio, scope)


@torch.no_grad()
def slice_ffn(ff: nn.Module, keep: np.ndarray) -> None:
    """Physically keep only neurons ``keep`` of one feed-forward block (fc1 rows/bias, fc2 columns)."""
    fc1, fc2 = ff.intermediate_dense, ff.output_dense
    idx = torch.as_tensor(keep, dtype=torch.long)
    idx = idx.to(fc1.weight.device)
    kw = {"device": fc1.weight.device, "dtype": fc1.weight.dtype}  # stays where the model is (a GPU too)
    new1 = nn.Linear(fc1.in_features, len(keep), bias=fc1.bias is not None, **kw)
    new1.weight.copy_(fc1.weight[idx])
    if fc1.bias is not None:
        new1.bias.copy_(fc1.bias[idx])
    new2 = nn.Linear(len(keep), fc2.out_features, bias=fc2.bias is not None, **kw)
    new2.weight.copy_(fc2.weight[:, idx])
    if fc2.bias is not None:
        new2.bias.copy_(fc2.bias)
    ff.intermediate_dense, ff.output_dense = new1, new2


def apply_plan(model: SSLSpeakerModel, plan: PrunePlan) -> SSLSpeakerModel:
    """Slice every layer of ``model`` in place to the plan's widths; returns the model."""
    layers = ffn_layers(model.encoder)
    if len(layers) != len(plan.keep):
        raise PruneError(f"plan has {len(plan.keep)} layers, the model {len(layers)}")
    for ff, keep in zip(layers, plan.keep):
        slice_ffn(ff, keep)
    model.config.ffn_widths = [len(k) for k in plan.keep]
    return model
