"""What the degraded-audio VAD steps and the one-talker check cost, side by side in one run.

    .venv/bin/python bench/bench_vad.py [--repeats 7]

Prints, for 10 s of speech (a reference utterance repeated), the median time of Silero VAD (one
thread) on wideband input, on the same input 25 dB quieter (level step), on its telephone-band
copy sent at 16 kHz and at 8 kHz (8 kHz graph), each with the steps on and off; and the median
time of one ``ge2e`` embedding of that speech against the embedding plus the one-talker check's
parts (what Verify/Identify/Enroll pay per input with 4 s of speech or more).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def _median(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Run and print the tables."""
    from models.audio import resample
    from models.consistency import speaker_chunks
    from models.runtime import SpeakerModel
    from models.vad import SileroVad, VadOptions
    from training.data.channels import apply_condition

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    x, _ = sf.read(ROOT / "models" / "reference" / "audio" / "espeak-en-1.wav", dtype="float32")
    wave = np.resize(x, 10 * 16000).astype(np.float32)  # (T,) 10 s of speech
    tel8, _ = apply_condition("telephone", wave, np.random.default_rng(0))
    inputs = {"wideband, 16 kHz": (wave, 16000), "wideband, 25 dB quieter": (wave * np.float32(10 ** (-25 / 20)), 16000),
              "telephone band, sent at 16 kHz": (resample(tel8, 8000, 16000), 16000),
              "telephone band, sent at 8 kHz": (tel8, 8000)}
    vad = SileroVad(intra_op_threads=1)
    old = VadOptions(normalize_level=False, narrowband=False)
    print("| input (10 s) | VAD ms, steps off | VAD ms, steps on | on / off | narrowband path |")
    print("|---|---:|---:|---:|---|")
    for name, (w, sr) in inputs.items():
        off = _median(lambda: vad.segments(w, sr, old), args.repeats)
        on = _median(lambda: vad.segments(w, sr), args.repeats)
        narrow = vad.analyse(w, sr)[1]
        print(f"| {name} | {off * 1000:.1f} | {on * 1000:.1f} | {on / off:.2f} | {'yes' if narrow else 'no'} |")
    model = SpeakerModel(ROOT / "models" / "repository" / "ge2e", intra_op_threads=1)
    chunks = speaker_chunks(wave, 16000, 4.0)
    whole = _median(lambda: model.embed_many([wave]), args.repeats)
    both = _median(lambda: model.embed_many([wave] + chunks), args.repeats)
    print(f"\n| ge2e, 10 s of speech, one thread | ms |\n|---|---:|\n| embedding | {whole * 1000:.1f} |\n"
          f"| embedding + one-talker check ({len(chunks)} parts, one batch) | {both * 1000:.1f} |\n"
          f"| check / embedding alone | {both / whole:.2f} |")


if __name__ == "__main__":
    main()
