"""A SUPERB-style speaker downstream trained on a frozen (possibly pruned) upstream.

The published protocol trains the speaker-identification downstream on the frozen upstream's
hidden states: a learnable softmax-weighted sum of all layers (the CNN output included), a
linear projector (256), mean pooling over frames and a linear classifier (SUPERB's SID recipe).
Projector and mean pooling are both linear, so they commute: the head sees exactly the same
function if it is given each layer's per-utterance mean of hidden states. ``layer_means``
computes that cache once per upstream, (N, L+1, H), and every head (every seed) then trains in
seconds on it instead of re-running the upstream.

Verification on unseen speakers uses the projector output as the embedding and cosine scoring
(EER and minDCF at p_target 0.01); identification accuracy is measured on held-out utterances of
the speakers the head was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.evaluation import cosine_scores, evaluate_scores
from models.ssl import SSLSpeakerModel

__all__ = ["HeadConfig", "SpeakerHead", "layer_means", "split_by_speaker", "train_head", "sid_accuracy",
           "verification", "crop"]


@dataclass
class HeadConfig:
    """Hyper-parameters of the downstream head (SUPERB SID: projector 256, Adam lr 1e-2)."""

    proj_dim: int = 256
    lr: float = 1e-2
    epochs: int = 40
    batch_size: int = 64
    weight_decay: float = 1e-4
    layers: str = "all"  # "all": learnable weights over every hidden state; "last": the last layer only


def crop(wave: np.ndarray, seconds: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """At most ``seconds`` of ``wave`` (a random window with ``rng``, else the start)."""
    n = int(seconds * 16000)
    if len(wave) <= n:
        return wave
    s = int(rng.integers(0, len(wave) - n + 1)) if rng is not None else 0
    return wave[s:s + n]


@torch.inference_mode()
def layer_means(model: SSLSpeakerModel, waves: list[np.ndarray], batch_seconds: float = 40.0,
                bf16: bool = True) -> np.ndarray:
    """Per-utterance mean of every hidden state over its valid frames: (N, L+1, H) float32.

    Utterances are batched by similar length (at most ``batch_seconds`` of padded audio per batch),
    on the model's device (bf16 autocast there when it is a GPU and ``bf16``).
    """
    dev = next(model.parameters()).device
    order = np.argsort([len(w) for w in waves])
    out: list[np.ndarray | None] = [None] * len(waves)
    i = 0
    while i < len(order):
        longest = len(waves[order[i]])
        j = i + 1
        while j < len(order) and (j - i + 1) * len(waves[order[j]]) <= batch_seconds * 16000:
            longest = len(waves[order[j]])
            j += 1
        idx = order[i:j]
        batch = np.zeros((len(idx), longest), dtype=np.float32)
        lengths = np.array([len(waves[k]) for k in idx], dtype=np.int64)
        for b, k in enumerate(idx):
            batch[b, :lengths[b]] = waves[k]
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16 and dev.type == "cuda"):
            states, mask = model.frames(torch.from_numpy(batch).to(dev), torch.from_numpy(lengths).to(dev))  # [(B, T', H)]
        m = mask.float().unsqueeze(-1)  # (B, T', 1)
        n = m.sum(1).clamp(min=1.0)  # (B, 1)
        means = torch.stack([(s.float() * m).sum(1) / n for s in states], dim=1)  # (B, L+1, H)
        for b, k in enumerate(idx):
            out[k] = means[b].float().cpu().numpy()
        i = j
    return np.stack(out).astype(np.float32)


def split_by_speaker(labels: np.ndarray, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``held_out`` of each speaker's utterances (at least one) go to test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for s in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == s))
        n_test = max(1, int(round(held_out * len(idx))))
        test += idx[:n_test].tolist()
        train += idx[n_test:].tolist()
    return np.sort(train), np.sort(test)


class SpeakerHead(nn.Module):
    """Standardise each layer, softmax-weighted layer sum, linear projector, linear classifier."""

    def __init__(self, n_layers: int, dim: int, n_classes: int, cfg: HeadConfig, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)  # (L+1, H), from the head's training features
        self.register_buffer("std", std)
        self.layer_logits = nn.Parameter(torch.zeros(n_layers), requires_grad=cfg.layers == "all")
        if cfg.layers == "last":
            with torch.no_grad():
                self.layer_logits.fill_(-1e4)
                self.layer_logits[-1] = 0.0
        self.proj = nn.Linear(dim, cfg.proj_dim)
        self.cls = nn.Linear(cfg.proj_dim, n_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L+1, H) layer means -> (B, proj_dim) projector output (the verification embedding)."""
        z = (x - self.mean) / self.std  # (B, L+1, H)
        w = torch.softmax(self.layer_logits, 0)  # (L+1,)
        return self.proj((z * w[None, :, None]).sum(1))  # (B, P)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L+1, H) -> (B, n_classes) logits."""
        return self.cls(self.embed(x))

    def layer_weights(self) -> list[float]:
        """The learned softmax weights over hidden states (layer 0 = CNN features)."""
        return torch.softmax(self.layer_logits.detach(), 0).tolist()


def train_head(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, cfg: HeadConfig | None = None) -> SpeakerHead:
    """Train a fresh head on (N, L+1, H) layer means with speaker labels (N,) in 0..n_classes-1.

    Under ``torchrun`` the head is wrapped in DistributedDataParallel and each rank trains on its
    share of every minibatch (same seed, so all ranks draw the same batches and end equal).
    """
    import torch.distributed as dist

    cfg = cfg or HeadConfig()
    if cfg.layers not in ("all", "last"):
        raise ValueError(f"head layers must be 'all' or 'last', got {cfg.layers!r}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    mean, std = xt.mean(0), xt.std(0)  # (L+1, H)
    # a floor per layer: dimensions that barely vary (against the layer's spread and magnitude) stay small
    std = std + 1e-2 * std.mean(-1, keepdim=True) + 1e-3 * xt.abs().mean((0, 2))[:, None] + 1e-8
    head = SpeakerHead(x.shape[1], x.shape[2], n_classes, cfg, mean, std)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    model: nn.Module = head
    rank, world = 0, 1
    if distributed:
        model = nn.parallel.DistributedDataParallel(head)
        rank, world = dist.get_rank(), dist.get_world_size()
    steps = max(1, len(x) // cfg.batch_size)  # whole batches only, so every rank gets a share of each
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps, pct_start=0.1)
    head.train()
    for _ in range(cfg.epochs):
        perm = rng.permutation(len(x))
        for k in range(steps):
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size][rank::world]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return head.eval()


@torch.no_grad()
def sid_accuracy(head: SpeakerHead, x: np.ndarray, y: np.ndarray) -> float:
    """Identification accuracy (%) of ``head`` on (N, L+1, H) features with labels (N,)."""
    pred = head(torch.from_numpy(x)).argmax(1).numpy()
    return float(100.0 * (pred == y).mean())


@torch.no_grad()
def verification(head: SpeakerHead, x: np.ndarray, utts: list[str],
                 trials: list[tuple[str, str, int]]) -> tuple[float, float]:
    """(EER %, minDCF p=0.01) of the head's projector embeddings of unseen speakers, cosine scored."""
    emb = head.embed(torch.from_numpy(x)).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    scores, labels = cosine_scores(dict(zip(utts, emb)), trials)
    res = evaluate_scores(scores, labels)
    return float(res.eer), float(res.min_dcf_01)
