"""Kaldi-compatible log-mel filterbank features as a torch module that exports to ONNX.

The open speaker models (WeSpeaker, 3D-Speaker) take Kaldi ``fbank`` features, not waveforms.
This module computes them inside the graph, so that a wrapped model takes a waveform like every
spkserve artifact. It follows Kaldi's (and ``kaldi-native-fbank``'s) defaults with dither off:
25 ms frames every 10 ms with ``snip_edges`` (frames lie wholly inside the signal), DC removal
per frame, pre-emphasis 0.97, the Povey window, a 512-point power spectrum, triangular filters
on the mel scale ``1127 ln(1 + f / 700)`` from 20 Hz to Nyquist, and the log with a floor of
float32 epsilon. Waveforms in [-1, 1] are scaled to the 16-bit range first, as those toolkits
do before calling Kaldi. Optionally the features are mean-normalised over each utterance's own
frames (``lengths`` masks the padding), as both toolkits do before their networks.

The FFT is a matrix product with a fixed DFT basis (an exportable op everywhere).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["KaldiFbank", "kaldi_mel_banks"]


def kaldi_mel_banks(num_bins: int, n_fft: int, sample_rate: int, low_freq: float = 20.0,
                    high_freq: float = 0.0) -> np.ndarray:
    """Kaldi's triangular mel filters, (num_bins, n_fft // 2 + 1) float32 (the Nyquist column is 0, as in Kaldi)."""
    nyquist = sample_rate / 2
    high = nyquist + high_freq if high_freq <= 0 else high_freq

    def mel(f):
        return 1127.0 * np.log(1.0 + np.asarray(f, np.float64) / 700.0)

    lo, hi = mel(low_freq), mel(high)
    step = (hi - lo) / (num_bins + 1)
    fft_mel = mel(np.arange(n_fft // 2) * sample_rate / n_fft)  # (n_fft/2,) bin centres
    banks = np.zeros((num_bins, n_fft // 2 + 1), np.float64)
    for b in range(num_bins):
        left, centre, right = lo + b * step, lo + (b + 1) * step, lo + (b + 2) * step
        up = (fft_mel - left) / (centre - left)
        down = (right - fft_mel) / (right - centre)
        banks[b, : n_fft // 2] = np.maximum(0.0, np.minimum(up, down))
    return banks.astype(np.float32)


class KaldiFbank(nn.Module):
    """(B, T) waveform in [-1, 1] + (B,) lengths -> (B, F, num_bins) features and (B,) frame counts.

    Args:
        num_bins: mel bins (80 for the WeSpeaker and 3D-Speaker models).
        sample_rate: Hz.
        frame_ms, shift_ms: frame length and shift.
        preemph: pre-emphasis coefficient.
        low_freq, high_freq: filter range in Hz (``high_freq <= 0`` is an offset from Nyquist).
        scale: waveform multiplier before the features (32768: the 16-bit range).
        cmn: subtract each utterance's mean feature vector (over its valid frames).
    """

    def __init__(self, num_bins: int = 80, sample_rate: int = 16000, frame_ms: float = 25.0, shift_ms: float = 10.0,
                 preemph: float = 0.97, low_freq: float = 20.0, high_freq: float = 0.0, scale: float = 32768.0,
                 cmn: bool = True):
        super().__init__()
        self.frame = int(sample_rate * frame_ms / 1000)
        self.shift = int(sample_rate * shift_ms / 1000)
        self.n_fft = 1 << math.ceil(math.log2(self.frame))
        self.preemph, self.scale, self.cmn = preemph, scale, cmn
        n = np.arange(self.frame)
        window = (0.5 - 0.5 * np.cos(2 * np.pi * n / (self.frame - 1))) ** 0.85  # Povey
        k = np.arange(self.n_fft // 2 + 1)
        angle = 2 * np.pi * np.outer(n, k) / self.n_fft  # (frame, n_fft/2+1): zero padding is implicit
        self.register_buffer("window", torch.tensor(window, dtype=torch.float32))
        self.register_buffer("cos", torch.tensor(np.cos(angle), dtype=torch.float32))
        self.register_buffer("sin", torch.tensor(-np.sin(angle), dtype=torch.float32))
        self.register_buffer("banks", torch.tensor(kaldi_mel_banks(num_bins, self.n_fft, sample_rate, low_freq,
                                                                   high_freq).T))  # (n_fft/2+1, bins)
        self.eps = float(np.finfo(np.float32).eps)

    def num_frames(self, lengths: torch.Tensor) -> torch.Tensor:
        """Frames Kaldi makes of ``lengths`` samples (snip_edges): (B,) int64."""
        return torch.clamp(torch.div(lengths - self.frame, self.shift, rounding_mode="floor") + 1, min=0)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) waveforms and (B,) valid lengths -> ((B, F, bins) log-mel features, zero past each valid frame
        count (mean-normalised over the valid frames with ``cmn``), (B,) valid frame counts)."""
        x = waveform * self.scale  # (B, T)
        n_frames = torch.div(x.shape[1] - self.frame, self.shift, rounding_mode="floor") + 1
        starts = torch.arange(n_frames, device=x.device) * self.shift  # (F,)
        idx = starts[:, None] + torch.arange(self.frame, device=x.device)[None, :]  # (F, L)
        frames = x[:, idx]  # (B, F, L)
        frames = frames - frames.mean(dim=-1, keepdim=True)  # DC removal
        prev = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - self.preemph * prev) * self.window  # (B, F, L)
        re = frames @ self.cos  # (B, F, K)
        im = frames @ self.sin
        power = re * re + im * im
        feats = torch.log(torch.clamp(power @ self.banks, min=self.eps))  # (B, F, bins)
        valid = self.num_frames(lengths)  # (B,)
        mask = (torch.arange(feats.shape[1], device=x.device)[None, :] < valid[:, None]).to(feats.dtype)  # (B, F)
        if self.cmn:
            mean = (feats * mask[..., None]).sum(1, keepdim=True) / torch.clamp(valid, min=1)[:, None, None].to(feats.dtype)
            feats = feats - mean
        return feats * mask[..., None], valid
