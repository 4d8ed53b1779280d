"""Frame features for the offline jobs (kaldi-native-fbank: Kaldi-compatible, no hand-written DSP).

- ``mfcc``: MFCC (+ deltas) for HuBERT-style k-means targets and for i-vectors;
- ``logmel``: log-mel filterbanks, and ``logmel_stats`` (mean + std over time): the trivial
  utterance vector used as the "channel statistics" baseline in evaluations.
"""

from __future__ import annotations

import numpy as np

__all__ = ["mfcc", "logmel", "logmel_stats", "deltas", "load_wave"]


def load_wave(path: str, sample_rate: int = 16000) -> np.ndarray:
    """Read an audio file as a mono float32 waveform at ``sample_rate`` (via models.audio)."""
    import soundfile as sf

    from models.audio import resample, to_mono

    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    return resample(to_mono(wave), sr, sample_rate)


def _frame_opts(opts, shift_ms: float, length_ms: float, sample_rate: int) -> None:
    opts.frame_opts.samp_freq = sample_rate
    opts.frame_opts.frame_shift_ms = shift_ms
    opts.frame_opts.frame_length_ms = length_ms
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = True


def _compute(extractor, wave: np.ndarray, sample_rate: int) -> np.ndarray:
    extractor.accept_waveform(sample_rate, (wave * 32768.0).astype(np.float32).tolist())
    extractor.input_finished()
    n = extractor.num_frames_ready
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([extractor.get_frame(i) for i in range(n)]).astype(np.float32)


def deltas(feats: np.ndarray, window: int = 2) -> np.ndarray:
    """Regression deltas over time (Kaldi's formula): (T, F) -> (T, F)."""
    if len(feats) == 0:
        return feats
    padded = np.pad(feats, ((window, window), (0, 0)), mode="edge")  # (T + 2w, F)
    num = sum(k * (padded[window + k: len(feats) + window + k] - padded[window - k: len(feats) + window - k])
              for k in range(1, window + 1))
    return num / (2 * sum(k * k for k in range(1, window + 1)))


def mfcc(wave: np.ndarray, sample_rate: int = 16000, num_ceps: int = 13, with_deltas: bool = True,
         shift_ms: float = 10.0, length_ms: float = 25.0, cmn: bool = True) -> np.ndarray:
    """MFCC (T, num_ceps) or with deltas and delta-deltas (T, 3 * num_ceps), mean-normalised."""
    import kaldi_native_fbank as knf

    opts = knf.MfccOptions()
    _frame_opts(opts, shift_ms, length_ms, sample_rate)
    opts.num_ceps = num_ceps
    opts.mel_opts.num_bins = 23
    feats = _compute(knf.OnlineMfcc(opts), wave, sample_rate)  # (T, C)
    if len(feats) == 0:
        return np.zeros((0, num_ceps * (3 if with_deltas else 1)), dtype=np.float32)
    if cmn:
        feats = feats - feats.mean(axis=0, keepdims=True)
    if with_deltas:
        d1 = deltas(feats)
        feats = np.concatenate([feats, d1, deltas(d1)], axis=1)
    return feats.astype(np.float32)


def logmel(wave: np.ndarray, sample_rate: int = 16000, num_bins: int = 40) -> np.ndarray:
    """Log-mel filterbank energies (T, num_bins), 25 ms / 10 ms frames."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    _frame_opts(opts, 10.0, 25.0, sample_rate)
    opts.mel_opts.num_bins = num_bins
    return _compute(knf.OnlineFbank(opts), wave, sample_rate)


def logmel_stats(wave: np.ndarray, sample_rate: int = 16000, num_bins: int = 40) -> np.ndarray:
    """Mean and standard deviation of log-mel over time, (2 * num_bins,)."""
    f = logmel(wave, sample_rate, num_bins)
    if len(f) == 0:
        raise ValueError(f"audio of {len(wave)} samples is too short for one 25 ms frame")
    return np.concatenate([f.mean(axis=0), f.std(axis=0)]).astype(np.float32)
