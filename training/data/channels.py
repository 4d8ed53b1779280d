"""Channel and recording conditions real audio comes through, simulated on clean utterances.

Used to fit score calibration that holds beyond clean synthesis (``training.evaluation.calibrate``) and to
measure how verification degrades per condition (``training.evaluation.robustness``). Each condition
takes a mono 16 kHz float32 waveform and returns the audio a client would send, as
``(samples, sample_rate)``; codecs really encode and decode (sox for GSM and AMR-NB,
libsndfile for Opus and MP3), so their artefacts are the codecs' own.

Conditions:
    clean        unchanged
    telephone    300-3400 Hz band, 8 kHz, G.711 mu-law (a landline call)
    gsm          8 kHz GSM 06.10 full rate (sox)
    amr          8 kHz AMR-NB at a random mode, 4.75-12.2 kbit/s (sox; mobile calls)
    opus         Opus at 9-20 kbit/s (VoIP)
    mp3          MP3 at a low bitrate
    noise        white, pink or babble noise at 5-25 dB SNR
    reverb       a synthetic room impulse response, RT60 0.2-0.8 s
    mic          a random microphone/room frequency response: a spectral tilt of -6 to +6 dB per
                 octave and three resonances or notches of up to +-9 dB (session variability:
                 the same voice through a different device has a different long-term spectrum)
    silence_pad  3 s of digital silence before and after
    noise_pad    3 s of low noise (-60 to -45 dBFS) before and after, and under the speech
    pause        a 2 s pause inside the utterance
    quiet        25 dB quieter
    loud         10 dB louder, clipped at full scale as a 16-bit recording would be
    level        a gain of -10 to +10 dB, clipped at full scale (the recording level of another device)
    dc           a DC offset of 5% of full scale (a cheap converter), clipped at full scale
    hum          mains hum (50 or 60 Hz, drifting up to 0.2 Hz, 20 harmonics of random strength) 8-20 dB
                 under the utterance (a ground loop, a laptop on its charger)
    highpass     a 300 Hz high-pass (4th order; small microphones, VoIP front ends)
    short        cut to its first 1.0 s of speech (as VAD finds it, with the service's settings)
    short15      cut to its first 1.5 s of speech
    white10      white noise at 10 dB SNR
    babble10     babble (3-5 other talkers from ``bank``) at 10 dB SNR
    noise_wp     white or pink noise at 5-20 dB SNR (a cohort channel group)
    babble       babble at 5-20 dB SNR (a cohort channel group)
"""

from __future__ import annotations

import io
import shutil
import subprocess
from typing import Callable

import numpy as np

from models.audio import decode_encoded, resample, to_mono

__all__ = ["CONDITIONS", "add_hum", "apply_condition", "apply_conditions", "random_conditions", "CALIBRATION_MIX"]

SR = 16000


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-12))


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.size, dtype=np.float64)
    f[0] = 1.0
    y = np.fft.irfft(spec / np.sqrt(f), n)
    return (y / _rms(y)).astype(np.float32)


def _noise(kind: str, n: int, rng: np.random.Generator, bank: list[np.ndarray] | None) -> np.ndarray:
    """Unit-RMS noise of ``kind`` (white, pink, babble)."""
    if kind == "babble" and bank:
        out = np.zeros(n, np.float32)
        for _ in range(int(rng.integers(3, 6))):
            src = bank[int(rng.integers(len(bank)))]
            src = np.resize(src, n) if len(src) < n else src[int(rng.integers(0, len(src) - n + 1)):][:n]
            out += src / _rms(src)
        return out / _rms(out)
    if kind == "pink":
        return _pink(n, rng)
    return rng.standard_normal(n).astype(np.float32)


def _bandpass(x: np.ndarray, sr: int, lo: float, hi: float) -> np.ndarray:
    from scipy.signal import butter, sosfiltfilt

    sos = butter(6, [lo, hi], btype="bandpass", fs=sr, output="sos")
    return sosfiltfilt(sos, x).astype(np.float32)


def _mulaw(x: np.ndarray, mu: float = 255.0) -> np.ndarray:
    """G.711 mu-law companding with 8-bit quantisation, encode then decode."""
    x = np.clip(x, -1, 1)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    q = np.round((y + 1) * 127.5) / 127.5 - 1  # 8 bits
    return (np.sign(q) * np.expm1(np.abs(q) * np.log1p(mu)) / mu).astype(np.float32)


def _sox_codec(x: np.ndarray, sr: int, args: list[str], fmt: str) -> tuple[np.ndarray, int]:
    """Encode with sox to ``fmt`` and decode it back (8 kHz telephone codecs)."""
    if shutil.which("sox") is None:
        raise RuntimeError("sox is not installed (needed for the gsm and amr conditions: apt-get install sox libsox-fmt-all)")
    buf = io.BytesIO()
    import soundfile as sf

    sf.write(buf, np.clip(x, -1, 1), sr, format="WAV", subtype="PCM_16")
    enc = subprocess.run(["sox", "-t", "wav", "-", "-r", "8000", "-c", "1", *args, "-t", fmt, "-"],
                         input=buf.getvalue(), capture_output=True, check=True).stdout
    dec = subprocess.run(["sox", "-t", fmt, "-", "-t", "raw", "-e", "signed-integer", "-b", "16", "-c", "1",
                          "-r", "8000", "-"], input=enc, capture_output=True, check=True).stdout
    return np.frombuffer(dec, dtype="<i2").astype(np.float32) / 32768.0, 8000


def _sndfile_codec(x: np.ndarray, sr: int, fmt: str, subtype: str, level: float) -> tuple[np.ndarray, int]:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(x, -1, 1), sr, format=fmt, subtype=subtype, compression_level=level)
    samples, rate = decode_encoded(buf.getvalue(), fmt)
    return to_mono(samples), rate


def _reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    from scipy.signal import fftconvolve

    rt60 = rng.uniform(0.2, 0.8)
    n = int(rt60 * SR)
    t = np.arange(n) / SR
    rir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    rir[: int(0.002 * SR)] = 0
    rir[0] = 1.0 + 2.0 * rng.uniform()  # direct path
    y = fftconvolve(x, rir)[: len(x)]
    return (y * (_rms(x) / _rms(y))).astype(np.float32)


def _mic(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Filter (T,) ``x`` with a random smooth zero-phase magnitude response (applied by FFT), level kept."""
    n = len(x)
    spec = np.fft.rfft(x.astype(np.float64))  # (n // 2 + 1,)
    octaves = np.log2(np.maximum(np.fft.rfftfreq(n, 1.0 / SR), 50.0) / 1000.0)  # octaves from 1 kHz
    gain_db = rng.uniform(-6.0, 6.0) * octaves
    for _ in range(3):  # resonances and notches at random places in 100 Hz - 6.4 kHz
        centre, width = rng.uniform(np.log2(0.1), np.log2(6.4)), rng.uniform(0.3, 1.0)
        gain_db += rng.uniform(-9.0, 9.0) * np.exp(-0.5 * ((octaves - centre) / width) ** 2)
    y = np.fft.irfft(spec * 10 ** (gain_db / 20), n)
    return (y * (_rms(x) / _rms(y))).astype(np.float32)


def add_hum(x: np.ndarray, rng: np.random.Generator, below_db: float | None = None) -> np.ndarray:
    """(T,) ``x`` plus mains hum ``below_db`` (default: 8-20 dB at random) under it: 20 harmonics of 50 or 60 Hz,
    each of random strength and phase."""
    t = np.arange(len(x)) / SR
    f0 = float(rng.choice([50.0, 60.0])) + rng.uniform(-0.2, 0.2)
    k = np.arange(1, 21)[:, None]  # (20, 1)
    amp = k ** -rng.uniform(0.3, 1.5) * rng.uniform(0.2, 1.0, size=k.shape)  # buzz: strong harmonics, not only 50 Hz
    hum = (amp * np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 2 * np.pi, size=k.shape))).sum(axis=0)  # (T,)
    below = rng.uniform(8.0, 20.0) if below_db is None else below_db
    return (x + hum * _rms(x) / (_rms(hum) * 10 ** (below / 20))).astype(np.float32)


def _highpass(x: np.ndarray, cutoff: float = 300.0) -> np.ndarray:
    from scipy.signal import butter, sosfilt

    return sosfilt(butter(4, cutoff, btype="highpass", fs=SR, output="sos"), x).astype(np.float32)


def _noise_at(x: np.ndarray, rng: np.random.Generator, bank, kind: str, snr: float) -> tuple[np.ndarray, int]:
    """``x`` plus ``kind`` noise at ``snr`` dB (signal power over the whole utterance)."""
    noise = _noise(kind, len(x), rng, bank)
    return (x + noise * _rms(x) / 10 ** (snr / 20)).astype(np.float32), SR


def _short(x: np.ndarray, seconds: float = 1.0) -> np.ndarray:
    from models.vad import SileroVad, keep_speech

    vad = _short.vad = getattr(_short, "vad", None) or SileroVad()
    speech = keep_speech(x, vad.segments(x, SR))
    return speech[: int(seconds * SR)] if len(speech) else x[: int(seconds * SR)]


def apply_condition(name: str, x: np.ndarray, rng: np.random.Generator,
                    bank: list[np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """Pass a (T,) 16 kHz utterance through condition ``name``; returns (samples, sample rate).

    Args:
        name: one of ``CONDITIONS``.
        x: mono float32 waveform at 16 kHz.
        rng: randomness of the condition's parameters.
        bank: other utterances, mixed as babble noise.
    """
    x = np.asarray(x, dtype=np.float32)
    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; conditions are {list(CONDITIONS)}")
    return CONDITIONS[name](x, rng, bank)


def _add_noise(x, rng, bank):
    kind = ["white", "pink", "babble"][int(rng.integers(3))]
    snr = rng.uniform(5.0, 25.0)
    noise = _noise(kind, len(x), rng, bank)
    return (x + noise * _rms(x) / 10 ** (snr / 20)).astype(np.float32), SR


def _pad(x, rng, noise_level: float | None):
    pad = int(3.0 * SR)
    y = np.concatenate([np.zeros(pad, np.float32), x, np.zeros(pad, np.float32)])
    if noise_level is not None:
        y = y + _noise(["white", "pink"][int(rng.integers(2))], len(y), rng, None) * noise_level
    return y.astype(np.float32), SR


def _pause(x, rng, bank):
    cut = int(len(x) * rng.uniform(0.35, 0.65))
    return np.concatenate([x[:cut], np.zeros(int(2.0 * SR), np.float32), x[cut:]]), SR


def _telephone(x, rng, bank):
    y = resample(_bandpass(x, SR, 300.0, 3400.0), SR, 8000)
    return _mulaw(y / max(1.0, float(np.abs(y).max()))), 8000


def _gain(x: np.ndarray, db: float) -> np.ndarray:
    """(T,) ``x`` made ``db`` dB louder, clipped to [-1, 1] (what a 16-bit file can hold)."""
    return np.clip(x * np.float32(10 ** (db / 20)), -1.0, 1.0).astype(np.float32)


CONDITIONS: dict[str, Callable] = {
    "clean": lambda x, rng, bank: (x, SR),
    "telephone": _telephone,
    "gsm": lambda x, rng, bank: _sox_codec(x, SR, [], "gsm"),
    "amr": lambda x, rng, bank: _sox_codec(x, SR, ["-C", str(int(rng.integers(0, 8)))], "amr-nb"),
    "opus": lambda x, rng, bank: _sndfile_codec(x, SR, "OGG", "OPUS", float(rng.uniform(0.95, 1.0 - 1e-6))),
    "mp3": lambda x, rng, bank: _sndfile_codec(x, SR, "MP3", "MPEG_LAYER_III", float(rng.uniform(0.9, 0.99))),
    "noise": _add_noise,
    "reverb": lambda x, rng, bank: (_reverb(x, rng), SR),
    "mic": lambda x, rng, bank: (_mic(x, rng), SR),
    "silence_pad": lambda x, rng, bank: _pad(x, rng, None),
    "noise_pad": lambda x, rng, bank: _pad(x, rng, 10 ** (rng.uniform(-60, -45) / 20)),
    "pause": _pause,
    "quiet": lambda x, rng, bank: (x * np.float32(10 ** (-25 / 20)), SR),
    "loud": lambda x, rng, bank: (_gain(x, 10.0), SR),
    "level": lambda x, rng, bank: (_gain(x, float(rng.uniform(-10.0, 10.0))), SR),
    "dc": lambda x, rng, bank: (np.clip(x + np.float32(0.05), -1.0, 1.0).astype(np.float32), SR),
    "hum": lambda x, rng, bank: (add_hum(x, rng), SR),
    "highpass": lambda x, rng, bank: (_highpass(x), SR),
    "short": lambda x, rng, bank: (_short(x), SR),
    "short15": lambda x, rng, bank: (_short(x, 1.5), SR),
    "white10": lambda x, rng, bank: _noise_at(x, rng, bank, "white", 10.0),
    "babble10": lambda x, rng, bank: _noise_at(x, rng, bank, "babble", 10.0),
    "noise_wp": lambda x, rng, bank: _noise_at(x, rng, bank, ["white", "pink"][int(rng.integers(2))],
                                               float(rng.uniform(5.0, 20.0))),
    "babble": lambda x, rng, bank: _noise_at(x, rng, bank, "babble", float(rng.uniform(5.0, 20.0))),
}

# What calibration is fitted on: clean and every channel, so the map holds across them.
# Weights are relative frequencies: clean audio is a quarter of the mix, each degradation
# one part (heavier mixes fitted flatter maps that were worse calibrated on real recordings:
# see the README). "short" is left out on purpose (the service refuses probes under
# min_probe_speech_seconds, so calibration need not cover them).
CALIBRATION_MIX = {"clean": 4, "telephone": 1, "gsm": 1, "amr": 1, "opus": 1, "mp3": 1, "noise": 1, "reverb": 1,
                   "silence_pad": 1, "noise_pad": 1, "pause": 1, "quiet": 1}


def random_conditions(rng: np.random.Generator, mix: dict[str, float] = CALIBRATION_MIX) -> list[str]:
    """One or two conditions drawn from ``mix`` (a channel plus, sometimes, noise or reverb on top)."""
    names = list(mix)
    p = np.array([mix[n] for n in names], dtype=np.float64)
    first = names[int(rng.choice(len(names), p=p / p.sum()))]
    out = [first]
    if first not in ("clean", "noise", "reverb") and rng.uniform() < 0.15:
        out.insert(0, ["noise", "reverb"][int(rng.integers(2))])  # acoustic degradation before the channel
    return out


def apply_conditions(names: list[str], x: np.ndarray, rng: np.random.Generator,
                     bank: list[np.ndarray] | None = None) -> tuple[np.ndarray, int]:
    """Apply several conditions in order (back at 16 kHz between them); returns (samples, rate)."""
    samples, rate = np.asarray(x, dtype=np.float32), SR
    for name in names:
        if rate != SR:
            samples, rate = resample(samples, rate, SR), SR
        samples, rate = apply_condition(name, samples, rng, bank)
    return samples, rate
