"""Conversations built from real recorded speech, with reference RTTMs, for scoring diarization.

    .venv/bin/python -m training.data.conversations --real corpus-real --split evaluation --out corpus-conv [--n 30]
        [--speakers 2-6]

Each conversation takes 2-6 speakers of a split of the real-speech pool (``training.data.realspeech``:
the *evaluation* speakers by default, never used to tune anything) and lays their utterances
one after another as turns: a pause of 0.2-1.2 s between turns, and for 10-20% of the turns
(drawn per conversation) an overlap of 0.3-1.0 s with the end of the previous one. Every
speaker has a level of its own (within +-6 dB), the turn order is random (never the same
speaker twice in a row), and the whole mixture goes through a channel: clean for most,
the telephone band (300-3400 Hz, 8 kHz mu-law) for a quarter, noise at 15 dB SNR for a sixth.
Durations are 1-10 minutes (most 1-4). ``--speakers 1-1`` builds single-speaker recordings the
same way (turns of one voice with pauses, no overlap), to check that one voice stays one speaker.

The reference of a turn is where its source utterance has speech: frames within 35 dB of the
utterance's loudest, gaps under 0.3 s bridged (an energy rule on the clean source, independent
of the system's VAD). Output: ``wav/<id>.wav`` (16 kHz, or 8 kHz for telephone-band ones),
``rttm/<id>.rttm`` and ``manifest.json`` (speakers, duration, overlap share, channel per
conversation). Utterances of a speaker are reused within a conversation when it is long.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from training.evaluation.realembed import Split, load_kaldi_split

__all__ = ["reference_regions", "build_conversation", "build_conversations", "main"]

SR = 16000


def reference_regions(x: np.ndarray, sr: int = SR, floor_db: float = -35.0, bridge_s: float = 0.3,
                      frame_s: float = 0.02) -> list[tuple[float, float]]:
    """Speech regions (seconds) of a clean utterance by energy: frames within ``floor_db`` of its loudest."""
    hop = int(frame_s * sr)
    n = len(x) // hop
    if n == 0:
        return []
    rms = np.sqrt(np.mean(np.square(x[:n * hop].reshape(n, hop), dtype=np.float64), axis=1) + 1e-12)  # (F,)
    active = 20 * np.log10(rms / rms.max()) > floor_db
    regions, start = [], None
    for i, a in enumerate(active.tolist() + [False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            regions.append([start * frame_s, i * frame_s])
            start = None
    bridged: list[list[float]] = []
    for r in regions:
        if bridged and r[0] - bridged[-1][1] < bridge_s:
            bridged[-1][1] = r[1]
        else:
            bridged.append(r)
    return [(a, b) for a, b in bridged if b - a >= 0.1]


def build_conversation(split: Split, waves: list[np.ndarray], speakers: list[str], seconds: float,
                       overlap_share: float, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """(16 kHz mixture, reference turns (start, end, speaker)) of one conversation."""
    spk = np.array(split.spk)
    pools = {s: list(rng.permutation(np.flatnonzero(spk == s))) for s in speakers}
    used = {s: 0 for s in speakers}
    gains = {s: float(10 ** (rng.uniform(-6, 6) / 20)) for s in speakers}
    placed, ref = [], []
    t, prev = 0.0, None
    while t < seconds:
        choices = [s for s in speakers if s != prev] or speakers  # one speaker: turns of the same voice
        s = choices[int(rng.integers(len(choices)))]
        idx = pools[s][used[s] % len(pools[s])]
        used[s] += 1
        x = waves[idx] * gains[s]
        start = t + rng.uniform(0.2, 1.2)
        if prev is not None and len(speakers) > 1 and rng.uniform() < overlap_share:
            start = max(0.0, t - rng.uniform(0.3, 1.0))  # talks over the end of the previous turn
        placed.append((start, x))
        ref += [(start + a, start + b, s) for a, b in reference_regions(waves[idx])]
        t = max(t, start + len(x) / SR)
        prev = s
    total = int(max(st * SR + len(x) for st, x in placed)) + SR // 2
    mix = np.zeros(total, np.float32)
    for st, x in placed:
        a = int(st * SR)
        mix[a:a + len(x)] += x
    peak = float(np.abs(mix).max())
    if peak > 0.99:
        mix *= np.float32(0.99 / peak)
    return mix, ref


def build_conversations(real: Path, split: str, out: Path, n: int = 30, seed: int = 0, log=print,
                        speakers_range: tuple[int, int] = (2, 6)) -> dict:
    """Write ``n`` conversations of ``real/split`` to ``out`` (see the module docstring), each of
    ``speakers_range`` speakers (inclusive; ``(1, 1)``: single-speaker recordings); returns the manifest."""
    from training.data.channels import apply_condition

    data = load_kaldi_split(Path(real) / split)
    waves = data.waves16k()
    speakers = sorted(set(data.spk))
    lo, hi = speakers_range
    if not 1 <= lo <= hi:
        raise ValueError(f"speakers: need 1 <= min <= max, got {lo}-{hi}")
    if len(speakers) < lo:
        raise ValueError(f"{real}/{split}: needs at least {lo} speakers, has {len(speakers)}")
    rng = np.random.default_rng(seed)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    (out / "rttm").mkdir(exist_ok=True)
    manifest = {"source": f"{real}/{split}", "seed": seed, "conversations": {}}
    for i in range(n):
        k = int(rng.integers(lo, min(hi, len(speakers)) + 1))
        who = sorted(rng.choice(speakers, size=k, replace=False).tolist())
        minutes = float(rng.choice([rng.uniform(1, 4), rng.uniform(4, 10)], p=[0.8, 0.2]))
        share = float(rng.uniform(0.10, 0.20))
        mix, ref = build_conversation(data, waves, who, 60 * minutes, share, rng)
        channel = str(rng.choice(["clean", "telephone", "noise15"], p=[7 / 12, 3 / 12, 2 / 12]))
        rate = SR
        if channel == "telephone":
            mix, rate = apply_condition("telephone", mix, rng)
        elif channel == "noise15":
            noise = rng.standard_normal(len(mix)).astype(np.float32)
            mix = mix + noise * np.float32(np.sqrt(np.mean(mix ** 2)) / 10 ** (15 / 20))
        cid = f"conv{i:03d}"
        sf.write(out / "wav" / f"{cid}.wav", np.clip(mix, -1, 1), rate, subtype="PCM_16")
        (out / "rttm" / f"{cid}.rttm").write_text(
            "".join(f"SPEAKER {cid} 1 {a:.3f} {b - a:.3f} <NA> <NA> {s} <NA> <NA>\n" for a, b, s in sorted(ref)))
        manifest["conversations"][cid] = {"speakers": who, "seconds": round(len(mix) / rate, 1), "channel": channel,
                                          "overlap_share_of_turns": round(share, 3)}
        log(f"{cid}: {k} speakers, {len(mix) / rate:.0f} s, {channel}")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.data.conversations", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", required=True, type=Path)
    ap.add_argument("--split", default="evaluation")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speakers", default="2-6",
                    help="speakers per recording, MIN-MAX (1-1: single-speaker recordings)")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    try:
        lo, _, hi = args.speakers.partition("-")
        speakers_range = (int(lo), int(hi or lo))
    except ValueError:
        ap.error(f"--speakers: expected MIN-MAX, got {args.speakers!r}")
    try:
        build_conversations(args.real, args.split, args.out, args.n, args.seed, speakers_range=speakers_range)
    except (OSError, ValueError) as e:
        print(f"conversations: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
