"""Does a voiceprint depend on recording level? The model card's ``input_level_dbfs``, measured on real speech.

    .venv/bin/python bench/level_study.py --real corpus-real [--split evaluation] [--model ge2e]
        [--targets -30 -25 -20] [--gain-db 10]

Every utterance of the split goes through the service's VAD; its speech is then embedded at its
own level (the card's level step off: for ``ge2e`` that is Resemblyzer's own normalisation, which
only raises speech below -30 dBFS) and brought to each of ``--targets`` dBFS first. Each is
scored by cosine on the split's trial list, with recordings as they are, with the probe side at a
random gain of -gain..+gain dB, and with both sides at independent random gains (clipped at full
scale, as 16-bit files would be). Also printed: how well the level alone tells speakers apart (the
absolute difference of two recordings' speech levels as a score), and the control that separates
the two effects of the level step: each utterance brought to its speaker's median level (the level
cue kept, the within-speaker variation removed).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.audio import condition, decode_encoded, set_level  # noqa: E402
from models.evaluation import eer  # noqa: E402
from models.runtime import SpeakerModel  # noqa: E402
from models.vad import SileroVad, VadOptions, keep_speech  # noqa: E402


def _level_db(wave: np.ndarray) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(wave, dtype=np.float64))) + 1e-12))


def _eer_percent(scores: list[float], labels: list[bool]) -> float:
    return 100.0 * eer(np.asarray(scores), np.asarray(labels, dtype=bool))[0]


def main() -> None:
    """Print the level study's tables for one split of a real-speech pool."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, required=True, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--split", default="evaluation")
    ap.add_argument("--model", default="ge2e", help="a repository entry name or directory")
    ap.add_argument("--targets", type=float, nargs="+", default=[-30.0, -25.0, -20.0])
    ap.add_argument("--gain-db", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    model_dir = Path(args.model) if Path(args.model).is_dir() else ROOT / "models" / "repository" / args.model
    model = SpeakerModel(model_dir, ["CPUExecutionProvider"])
    shipped = model.card.input_level_dbfs
    split = args.real / args.split
    paths = dict(line.split(maxsplit=1) for line in (split / "wav.scp").read_text().splitlines() if line.strip())
    u2s = dict(line.split() for line in (split / "utt2spk").read_text().splitlines() if line.strip())
    trials = [line.split() for line in (split / "trials").read_text().splitlines() if line.strip()]
    labels = [t == "target" for _, _, t in trials]
    vad, opts = SileroVad(), VadOptions(**(model.card.vad or {}))
    speech = {}
    for utt, path in paths.items():
        samples, sr = decode_encoded(Path(path.strip()).read_bytes(), utt)
        wave = condition(samples, sr, model.sample_rate, field=utt)  # (T,) mono at the model's rate
        segments, _ = vad.analyse(wave, model.sample_rate, opts)
        speech[utt] = keep_speech(wave, segments) if segments else wave  # (T',)
    level = {u: _level_db(w) for u, w in speech.items()}
    by_speaker = collections.defaultdict(list)
    for u, db in level.items():
        by_speaker[u2s[u]].append(db)
    rng = np.random.default_rng(args.seed)
    gain = {u: float(rng.uniform(-args.gain_db, args.gain_db)) for u in speech}

    def gained(u: str) -> np.ndarray:
        return np.clip(speech[u] * np.float32(10 ** (gain[u] / 20)), -1.0, 1.0).astype(np.float32)

    def embed(waves: dict[str, np.ndarray], target: float | None) -> dict[str, np.ndarray]:
        model.card.input_level_dbfs = target
        names = sorted(waves)
        return dict(zip(names, model.embed_many([waves[n] for n in names])))

    def score(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
        return _eer_percent([float(a[x] @ b[y]) for x, y, _ in trials], labels)

    print(f"{args.model} (card: input_level_dbfs {shipped}), {split}: {len(speech)} utterances of "
          f"{len(by_speaker)} speakers, {sum(labels)} target / {len(labels) - sum(labels)} non-target trials")
    print(f"speech level dBFS: p5 {np.percentile(list(level.values()), 5):.1f}, median "
          f"{np.median(list(level.values())):.1f}, p95 {np.percentile(list(level.values()), 95):.1f}; within-speaker SD "
          f"{np.mean([np.std(v) for v in by_speaker.values()]):.1f} dB, SD of speaker medians "
          f"{np.std([np.median(v) for v in by_speaker.values()]):.1f} dB")
    print(f"level alone as a score: EER {_eer_percent([-abs(level[a] - level[b]) for a, b, _ in trials], labels):.2f}%")
    print()
    print(f"| input level | as recorded EER % | probe at +-{args.gain_db:g} dB EER % | both at +-{args.gain_db:g} dB EER % "
          "| same recording, gained: median / min cosine |")
    print("|---|---:|---:|---:|---:|")
    loud = {u: gained(u) for u in speech}
    for target in [None, *args.targets]:
        plain, moved = embed(speech, target), embed(loud, target)
        same = [float(plain[u] @ moved[u]) for u in speech]
        name = "own level (step off)" if target is None else f"{target:g} dBFS"
        print(f"| {name} | {score(plain, plain):.2f} | {score(plain, moved):.2f} | {score(moved, moved):.2f} | "
              f"{np.median(same):.4f} / {min(same):.4f} |")
    medians = {s: float(np.median(v)) for s, v in by_speaker.items()}
    cue = {u: set_level(w, medians[u2s[u]]) for u, w in speech.items()}
    kept = embed(cue, None)
    print(f"\ncontrol: each utterance at its speaker's median level, step off: EER {score(kept, kept):.2f}% "
          "(the level cue kept, the within-speaker variation removed)")
    model.card.input_level_dbfs = shipped


if __name__ == "__main__":
    main()
