"""GE2E d-vector speaker encoder (Resemblyzer's pretrained weights), waveform in.

The weights are the ones shipped inside the ``resemblyzer==0.1.4`` wheel (Apache-2.0,
Resemble AI; a 3-layer LSTM trained with the generalised end-to-end loss on thousands of
speakers). This module re-implements its inference exactly, with the whole frontend inside
the module so that the exported ONNX graph takes a raw 16 kHz waveform:

1. volume normalisation to -30 dBFS (increase only), per utterance;
2. power mel spectrogram: 25 ms Hann window, 10 ms hop, centred frames with zero padding,
   40 Slaney mel bands (Resemblyzer uses linear power, not log);
3. partial windows of 160 frames every 77 frames (``rate=1.3``), the last one kept only if
   it covers at least 75% of its window with audio;
4. LSTM -> last hidden state -> Linear -> ReLU -> L2 norm per partial, then the L2-normalised
   mean of the partials.

Batches are padding-invariant: every step masks by ``lengths``, so an utterance embedded in
a zero-padded batch gets the same embedding as alone. Resemblyzer's VAD silence trimming
(webrtcvad) is not part of the model; callers that want it trim before embedding.

Step 1 only raises quiet audio and step 2 reads linear power, so the graph alone is neither
level- nor offset-invariant: the exported card sets ``input_level_dbfs`` and the runtime
(``models.input_steps``, run by ``SpeakerModel.embed``) removes each input's DC offset and brings it to that
level before the graph. Linear power also reads a microphone's spectral slope as voice: the
card's ``input_tilt`` (fitted on real speech after export) has the runtime limit it first.
"""

from __future__ import annotations

import io
import math
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["GE2EConfig", "GE2E", "slaney_mel_filterbank", "load_resemblyzer_state", "fetch_resemblyzer_wheel"]

RESEMBLYZER_VERSION = "0.1.4"
RESEMBLYZER_WEIGHTS = "resemblyzer/pretrained.pt"


@dataclass(frozen=True)
class GE2EConfig:
    """Hyper-parameters of the GE2E encoder and its frontend (Resemblyzer's defaults)."""

    sample_rate: int = 16000
    n_fft: int = 400  # 25 ms
    hop_length: int = 160  # 10 ms
    n_mels: int = 40
    partial_frames: int = 160  # 1.6 s
    partial_step: int = 77  # round(16000 / 1.3 / 160)
    min_coverage: float = 0.75
    target_dbfs: float = -30.0
    hidden_size: int = 256
    num_layers: int = 3
    embedding_dim: int = 256


def slaney_mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-style mel filterbank (area-normalised triangles), shape (n_mels, n_fft // 2 + 1).

    Same construction as librosa's default ``filters.mel`` (``htk=False, norm='slaney'``),
    from 0 Hz to Nyquist.
    """

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, dtype=np.float64)
        f_sp, min_log_hz = 200.0 / 3, 1000.0
        min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, dtype=np.float64)
        f_sp, min_log_hz = 200.0 / 3, 1000.0
        min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, sample_rate / 2, 1 + n_fft // 2)  # (F,)
    mel_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))  # (M+2,)
    fdiff = np.diff(mel_pts)  # (M+1,)
    ramps = mel_pts[:, None] - fft_freqs[None, :]  # (M+2, F)
    lower = -ramps[:-2] / fdiff[:-1, None]  # (M, F)
    upper = ramps[2:] / fdiff[1:, None]  # (M, F)
    weights = np.maximum(0.0, np.minimum(lower, upper))  # (M, F)
    weights *= (2.0 / (mel_pts[2:] - mel_pts[:-2]))[:, None]
    return weights.astype(np.float32)


def _dft_basis(n_fft: int) -> np.ndarray:
    """Periodic-Hann-windowed real DFT basis, shape (n_fft, 2 * (n_fft // 2 + 1)): [cos | -sin]."""
    n = np.arange(n_fft)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * n / n_fft)  # periodic Hann (librosa / scipy fftbins)
    k = np.arange(n_fft // 2 + 1)
    angle = 2 * np.pi * np.outer(n, k) / n_fft  # (N, F)
    basis = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) * window[:, None]
    return basis.astype(np.float32)


class GE2E(nn.Module):
    """Waveform -> GE2E embedding, padding-invariant over a batch.

    Input ``waveform`` (B, T) float32 at 16 kHz, ``lengths`` (B,) int64 valid samples;
    output (B, D) L2-normalised embeddings.
    """

    def __init__(self, config: GE2EConfig = GE2EConfig()):
        super().__init__()
        self.config = config
        c = config
        self.lstm = nn.LSTM(c.n_mels, c.hidden_size, c.num_layers, batch_first=True)
        self.linear = nn.Linear(c.hidden_size, c.embedding_dim)
        self.register_buffer("dft", torch.from_numpy(_dft_basis(c.n_fft)), persistent=False)
        self.register_buffer(
            "mel_fb", torch.from_numpy(slaney_mel_filterbank(c.sample_rate, c.n_fft, c.n_mels).T.copy()),
            persistent=False,
        )  # (F, M)

    @property
    def embedding_dim(self) -> int:
        """Size of the output embedding."""
        return self.config.embedding_dim

    def num_partials(self, lengths: torch.Tensor) -> torch.Tensor:
        """Number of partial windows Resemblyzer uses for utterances of ``lengths`` samples, (B,)."""
        c = self.config
        n_frames = torch.div(lengths + 1 + c.hop_length - 1, c.hop_length, rounding_mode="floor")  # ceil((n+1)/hop)
        steps = torch.clamp(n_frames - c.partial_frames + c.partial_step + 1, min=1)
        count = torch.div(steps - 1, c.partial_step, rounding_mode="floor") + 1
        last_start = (count - 1) * c.partial_step * c.hop_length  # in samples
        coverage = (lengths - last_start).to(torch.float32) / float(c.partial_frames * c.hop_length)
        drop = (coverage < c.min_coverage) & (count > 1)
        return count - drop.to(count.dtype)

    def partial_embeddings(self, mels: torch.Tensor) -> torch.Tensor:
        """(N, partial_frames, n_mels) mel windows -> (N, D) L2-normalised partial embeddings."""
        _, (hidden, _) = self.lstm(mels)  # hidden: (layers, N, H)
        raw = torch.relu(self.linear(hidden[-1]))  # (N, D)
        return raw / torch.clamp(raw.norm(dim=1, keepdim=True), min=1e-12)

    def forward(self, waveform: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Embed a zero-padded batch: waveform (B, T) float32, lengths (B,) int64 -> (B, D)."""
        c = self.config
        B, T = waveform.shape[0], waveform.shape[1]
        t_idx = torch.arange(T, device=waveform.device)
        valid = t_idx.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        wav = waveform * valid.to(waveform.dtype)  # (B, T)

        # 1. volume normalisation to target dBFS, increase only (Resemblyzer's int16 scale)
        n = torch.clamp(lengths, min=1).to(torch.float32)  # (B,)
        rms = torch.sqrt(((wav * 32767.0) ** 2).sum(dim=1) / n) / 32767.0  # (B,)
        dbfs = 20.0 * torch.log10(torch.clamp(rms, min=1e-6))  # (B,)
        gain = torch.pow(10.0, torch.clamp(c.target_dbfs - dbfs, min=0.0) / 20.0)  # (B,)
        wav = wav * gain.unsqueeze(1)  # (B, T)

        # 2. framing: frame f covers samples [f * hop - n_fft/2, f * hop + n_fft/2) of the
        #    zero-extended utterance (centred frames, zero padding on both sides)
        counts = self.num_partials(lengths)  # (B,)
        p_max = counts.max()
        n_frames = (p_max - 1) * c.partial_step + c.partial_frames  # frames the partials touch
        f_idx = torch.arange(n_frames, device=wav.device)  # (F,)
        s_idx = f_idx.unsqueeze(1) * c.hop_length + torch.arange(c.n_fft, device=wav.device) - c.n_fft // 2  # (F, N)
        inside = (s_idx >= 0) & (s_idx < T)  # (F, N)
        frames = wav[:, torch.clamp(s_idx, 0, T - 1)] * inside.to(wav.dtype)  # (B, F, N)

        # 3. power mel spectrogram
        spec = frames @ self.dft  # (B, F, 2K)
        k = self.dft.shape[1] // 2
        power = spec[..., :k] ** 2 + spec[..., k:] ** 2  # (B, F, K)
        mel = power @ self.mel_fb  # (B, F, M)

        # 4. partial windows -> LSTM -> mean per utterance. Only valid partials go through the
        #    LSTM (all are partial_frames long): utterances of different lengths share a batch
        #    without computing padded windows, so mixed-length batches waste almost nothing.
        p_idx = torch.arange(p_max, device=wav.device)  # (P,)
        w_idx = p_idx.unsqueeze(1) * c.partial_step + torch.arange(c.partial_frames, device=wav.device)  # (P, W)
        partials = mel[:, w_idx].reshape(-1, c.partial_frames, c.n_mels)  # (B*P, W, M)
        keep = (p_idx.unsqueeze(0) < counts.unsqueeze(1)).reshape(-1)  # (B*P,)
        chosen = torch.nonzero(keep).squeeze(1)  # (N,) valid partials
        partial_emb = self.partial_embeddings(partials[chosen])  # (N, D)
        owner = torch.div(chosen, p_max, rounding_mode="floor")  # (N,) utterance of each partial
        assign = (owner.unsqueeze(0) == torch.arange(B, device=wav.device).unsqueeze(1)).to(partial_emb.dtype)  # (B, N)
        mean = (assign @ partial_emb) / counts.unsqueeze(1).to(partial_emb.dtype)  # (B, D)
        return mean / torch.clamp(mean.norm(dim=1, keepdim=True), min=1e-12)

    @classmethod
    def from_resemblyzer(cls, wheel_or_pt: str | Path | None = None) -> "GE2E":
        """Build the model with Resemblyzer's pretrained weights.

        Args:
            wheel_or_pt: the ``Resemblyzer-0.1.4-py3-none-any.whl`` file, a ``pretrained.pt``
                extracted from it, or None to fetch the wheel with pip into the cache.
        """
        model = cls()
        model.load_state_dict(load_resemblyzer_state(wheel_or_pt))
        return model.eval()

    def config_dict(self) -> dict:
        """The resolved configuration, for the artifact's model.json."""
        return asdict(self.config)


def fetch_resemblyzer_wheel(cache_dir: str | Path | None = None) -> Path:
    """Download (once) the resemblyzer wheel with pip, without installing it; return its path."""
    import subprocess
    import sys

    cache = Path(cache_dir or Path.home() / ".cache" / "spkserve")
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"[Rr]esemblyzer-{RESEMBLYZER_VERSION}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache),
           f"resemblyzer=={RESEMBLYZER_VERSION}"]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"could not download resemblyzer=={RESEMBLYZER_VERSION} with pip: {e.stderr.strip()}") from None
    found = sorted(cache.glob(f"[Rr]esemblyzer-{RESEMBLYZER_VERSION}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download left no resemblyzer wheel in {cache}")
    return found[0]


def load_resemblyzer_state(wheel_or_pt: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Read the LSTM/linear weights of Resemblyzer's encoder from its wheel or .pt file."""
    path = Path(wheel_or_pt) if wheel_or_pt else fetch_resemblyzer_wheel()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: resemblyzer wheel or pretrained.pt not found")
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            try:
                blob = zf.read(RESEMBLYZER_WEIGHTS)
            except KeyError:
                raise ValueError(f"{path}: wheel has no {RESEMBLYZER_WEIGHTS}") from None
    else:
        blob = path.read_bytes()
    ckpt = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    state = ckpt.get("model_state", ckpt)
    # GE2E's training-only similarity scale/bias are not part of the encoder
    return {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
