"""How well mains hum is found and taken out, and what each way of taking it out does to a voiceprint.

    .venv/bin/python bench/hum_study.py --real corpus-real [--split evaluation] [--n 200] [--model ge2e]

On the split's utterances (every second one, up to ``--n``; DC removed, 16 kHz) prints:

* detection (``models.mains_hum.find_hum``): the share of clean recordings and of clean 1.5 s windows
  in which hum is found (false alarms, unless the recording really hums), and the share of the same
  recordings with ``training.data.channels``' ``hum`` condition (8-20 dB under the speech) in which it is, and
  in which it is at 8, 12, 16 and 20 dB under the speech;
* for each removal method, over the hummed recordings in which hum was found: the mean cosine of
  the model's voiceprint of the cleaned input to that of the clean recording (the hummed input's
  own cosine beside it), and the mean cosine when the method is applied to a clean recording at
  50 Hz (what a false alarm costs). The model is embedded without its own hum step.

Methods: ``shipped`` (``remove_hum``: clamps in 0.5 s blocks), ``clamp-2s`` and ``clamp-1s`` (the same
clamp in longer blocks), ``fft-notch`` (bins within 0.25 Hz of each harmonic zeroed in one FFT of the
whole input) and ``iir-notch`` (a 0.5 Hz wide IIR notch per harmonic, forwards and backwards).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import models.mains_hum as mh  # noqa: E402
from models.audio import condition, remove_dc  # noqa: E402
from models.runtime import SpeakerModel  # noqa: E402
from training.data.channels import add_hum, apply_condition  # noqa: E402
from training.evaluation.realembed import load_kaldi_split  # noqa: E402

SR = 16000


def _clamp(seconds: float):
    """The shipped clamp in blocks of ``seconds``, given the hum (so it can be forced onto a clean input)."""
    return lambda wav, hum: mh.remove_hum(wav, SR, hum, block_seconds=seconds)


def _fft_notch(wav: np.ndarray, hum: mh.Hum) -> np.ndarray:
    spec = np.fft.rfft(wav.astype(np.float64))
    freqs = np.fft.rfftfreq(len(wav), 1 / SR)
    for k in range(1, mh.HARMONICS + 1):
        spec[np.abs(freqs - k * hum.fundamental_hz) <= 0.25] = 0
    return np.fft.irfft(spec, len(wav)).astype(np.float32)


def _iir_notch(wav: np.ndarray, hum: mh.Hum) -> np.ndarray:
    from scipy import signal

    freqs = [k * hum.fundamental_hz for k in range(1, mh.HARMONICS + 1) if k * hum.fundamental_hz < 0.45 * SR]
    sos = np.array([np.concatenate(signal.iirnotch(f, f / 0.5, SR)) for f in freqs])
    return signal.sosfiltfilt(sos, wav).astype(np.float32)


METHODS = {"shipped": _clamp(mh.REMOVAL_BLOCK_SECONDS), "clamp-2s": _clamp(2.0), "clamp-1s": _clamp(1.0), "fft-notch": _fft_notch,
           "iir-notch": _iir_notch}


def main(argv: list[str] | None = None) -> int:
    """Print detection rates and, per removal method, the voiceprint cosines."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--split", default="evaluation")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--model", default="ge2e")
    args = ap.parse_args(argv)
    entry = Path(args.model) if Path(args.model).is_dir() else ROOT / "models" / "repository" / args.model
    model = SpeakerModel(entry)
    model.card.remove_mains_hum = False  # each method is applied here, before embed
    split = load_kaldi_split(args.real / args.split)
    rng = np.random.default_rng(1)
    clean = [remove_dc(condition(s[:, None], r, SR)) for s, r in split.audio[::2][: args.n]]
    hummed = [apply_condition("hum", x, rng)[0] for x in clean]
    windows = [x[s:s + 3 * SR // 2] for x in clean for s in range(0, len(x) - 3 * SR // 2, 3 * SR)]
    found_clean = sum(mh.find_hum(x, SR) is not None for x in clean)
    found_windows = sum(mh.find_hum(x, SR) is not None for x in windows)
    found = [mh.find_hum(y, SR) for y in hummed]
    hit = [i for i, h in enumerate(found) if h is not None]
    print(f"hum found: clean recordings {found_clean}/{len(clean)} ({100 * found_clean / len(clean):.1f}%), clean 1.5 s "
          f"windows {found_windows}/{len(windows)} ({100 * found_windows / len(windows):.1f}%), recordings with hum 8-20 dB "
          f"under the speech {len(hit)}/{len(hummed)} ({100 * len(hit) / len(hummed):.0f}%)")
    by_level = []
    for below in (8.0, 12.0, 16.0, 20.0):  # the same recordings with the hum at one level
        level_rng = np.random.default_rng(2)
        by_level.append(sum(mh.find_hum(add_hum(x, level_rng, below), SR) is not None for x in clean))
    print("hum found by its level under the speech: " + ", ".join(
        f"{b:g} dB {n}/{len(clean)}" for b, n in zip((8, 12, 16, 20), by_level)))
    ref = model.embed([clean[i] for i in hit])  # (H, D)
    as_hummed = np.einsum("nd,nd->n", ref, model.embed([hummed[i] for i in hit]))
    at_50 = mh.Hum(50.0, (1,), (0.0,))
    print(f"| method | cosine to the clean voiceprint, hummed -> cleaned ({len(hit)} found) | "
          f"cosine of a clean recording to itself cleaned at 50 Hz (a false alarm) |")
    print("|---|---:|---:|")
    for name, method in METHODS.items():
        cleaned = np.einsum("nd,nd->n", ref, model.embed([method(hummed[i], found[i]) for i in hit]))
        false_alarm = np.einsum("nd,nd->n", ref, model.embed([method(clean[i], at_50) for i in hit]))
        print(f"| {name} | {as_hummed.mean():.3f} -> {cleaned.mean():.3f} | {false_alarm.mean():.3f} "
              f"(lowest {false_alarm.min():.3f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
