"""What the degraded-audio VAD steps and the one-talker check cost, side by side in one run.

    .venv/bin/python bench/bench_vad.py [--repeats 7] [--real corpus-real/evaluation]

Prints, for 10 s of speech (a reference utterance repeated), the median time of Silero VAD (one
thread) on wideband input, on the same input 25 dB quieter (level step), on its telephone-band
copy sent at 16 kHz and at 8 kHz (8 kHz graph), each with the steps on and off; and the median
time of Silero's own graphs against the rebuilt batched ones (``models.vad_graph``), and of one
input per call against 16; with ``--real``, whether the rebuilt graphs give Silero's segments on
real speech; and the median time of one ``ge2e`` embedding of that speech against the embedding plus the one-talker check's
parts (what Verify/Identify/Enroll pay per input with 4 s of speech or more).
"""

from __future__ import annotations

import argparse
import statistics
import sys
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


def _silero_own(rate: int):
    """Silero's own graph for ``rate`` as a (T,) -> (F,) probability function (the reference the rebuilt graphs replace)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_vad_graph import _original_16k, _original_8k

    return _original_16k if rate == 16000 else _original_8k


def graphs_table(vad, wave: np.ndarray, tel8: np.ndarray, repeats: int) -> None:
    """Silero's own graphs vs the rebuilt batched ones, and one input per call vs 16 per call."""
    print("\n| 10 s input | Silero's graph ms | rebuilt graph ms | speed-up | rebuilt, 16 inputs per call, ms per input |")
    print("|---|---:|---:|---:|---:|")
    for name, x, rate in (("16 kHz (wideband)", wave, 16000), ("8 kHz (narrowband)", tel8, 8000)):
        own = _median(lambda: _silero_own(rate)(x), max(3, repeats // 2))
        ours = _median(lambda: vad.probabilities_batch([x], rate), repeats)
        sixteen = _median(lambda: vad.probabilities_batch([x] * 16, rate), repeats) / 16
        print(f"| {name} | {own * 1000:.1f} | {ours * 1000:.1f} | {own / ours:.1f}x | {sixteen * 1000:.1f} |")


def parity_on_real(vad, split: Path) -> None:
    """Count utterances of a real-speech split whose segments equal Silero's own graphs', clean and telephone."""
    from models.audio import resample
    from models.vad import VadOptions, speech_segments
    from training.data.channels import apply_condition

    rows = [line.split() for line in (split / "wav.scp").read_text().splitlines() if line.strip()][::3]
    rng = np.random.default_rng(0)
    same = {16000: 0, 8000: 0}
    worst = {16000: 0.0, 8000: 0.0}
    for _, path in rows:
        x, sr = sf.read(path, dtype="float32", always_2d=True)
        x = resample(x.mean(axis=1), sr, 16000) if sr != 16000 else x.mean(axis=1)
        tel, _ = apply_condition("telephone", x, rng)
        for rate, w, opts, frame in ((16000, x, VadOptions(), 512), (8000, tel, VadOptions(threshold=0.4), 256)):
            ours, own = vad.probabilities_batch([w], rate)[0], _silero_own(rate)(w)
            worst[rate] = max(worst[rate], float(np.abs(ours - own).max()))
            same[rate] += speech_segments(ours, w.size, opts, rate, frame) == speech_segments(own, w.size, opts, rate, frame)
    print(f"\n{len(rows)} real utterances of {split}: same segments as Silero's graphs at 16 kHz {same[16000]}/{len(rows)} "
          f"(max |p - p_silero| {worst[16000]:.1e}), telephone at 8 kHz {same[8000]}/{len(rows)} "
          f"(max {worst[8000]:.1e})")


def main() -> None:
    """Run and print the tables."""
    from models.audio import resample
    from models.consistency import speaker_chunks
    from models.runtime import SpeakerModel
    from models.vad import SileroVad, VadOptions
    from training.data.channels import apply_condition

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--real", type=Path, help="a real-speech split (Kaldi wav.scp): check the rebuilt graphs give "
                                             "Silero's segments on every third utterance, clean and telephone")
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
    graphs_table(vad, wave, tel8, args.repeats)
    if args.real:
        parity_on_real(vad, args.real)
    model = SpeakerModel(ROOT / "models" / "repository" / "ge2e", intra_op_threads=1)
    chunks = speaker_chunks(wave, 16000, 4.0)
    whole = _median(lambda: model.embed_many([wave]), args.repeats)
    both = _median(lambda: model.embed_many([wave] + chunks), args.repeats)
    print(f"\n| ge2e, 10 s of speech, one thread | ms |\n|---|---:|\n| embedding | {whole * 1000:.1f} |\n"
          f"| embedding + one-talker check ({len(chunks)} parts, one batch) | {both * 1000:.1f} |\n"
          f"| check / embedding alone | {both / whole:.2f} |")


if __name__ == "__main__":
    main()
