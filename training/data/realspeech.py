"""The real-speech pool: human recordings from Debian's archive, split by speaker.

    .venv/bin/python -m training.data.realspeech --out corpus-real [--sources asterisk,tuxpaint,klettres,ktuberling]

Scores and decisions are calibrated and judged on this pool (``training.evaluation.calibrate --real``,
``training.evaluation.decisions``). The recordings come from the packages ``training.data.realspeech_sources``
lists: about 45 speakers in 30 languages, volunteers and voice talents, wideband and
telephone-band. Most files are single words, letters or short phrases, so each speaker's
clips are trimmed of their silent ends and concatenated, in a random order seeded per speaker, with 0.15-0.4 s
of silence between them, into utterances of 3-7 s of audio (a clip longer than that, like most
telephone prompts, is an utterance on its own). A speaker's clips are used at the rate most of
them have (minority rates in a directory may be other recordings); utterances keep 16 kHz, or
8 kHz for speakers recorded only at telephone rates.

Speakers are split into ``calibration`` (fit cohorts and score maps there) and ``evaluation``
(report there, never tune there), about 60/40 within each source, seeded, with linked groups
(``POSSIBLY_SAME_PERSON``) kept together and a voice found inside another speaker's recordings in
its parent's split (``SAME_SPLIT_AS``). Each split is a Kaldi directory: ``wav.scp``,
``utt2spk``, ``spk2utt``, ``trials`` (same-speaker pairs, at most ``--max-targets`` per speaker,
and ``--nontargets-per-utt`` different-speaker pairs per utterance, never between linked groups).
``manifest.json`` lists every speaker with its source, language, split, utterances and seconds.
The recordings are GPL / CC BY-SA: they are fetched by this command, never committed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import soundfile as sf

from models.audio import resample
from training.data.corpus import write_kaldi_dir
from training.data.realspeech_sources import POSSIBLY_SAME_PERSON, SAME_SPLIT_AS, SOURCES, decode_clip, fetch_packages

__all__ = ["SPLITS", "trim_silence", "build_utterances", "assign_splits", "make_trials", "build_pool", "main"]

SPLITS = ("calibration", "evaluation")


def trim_silence(x: np.ndarray, sr: int, floor_db: float = -35.0, margin: float = 0.1) -> np.ndarray:
    """(T,) -> the stretch from the first to the last 20 ms frame within ``floor_db`` of the loudest, plus margins."""
    hop = max(1, int(0.02 * sr))
    n = len(x) // hop
    if n == 0:
        return x[:0]
    rms = np.sqrt(np.mean(np.square(x[:n * hop].reshape(n, hop), dtype=np.float64), axis=1) + 1e-12)  # (F,)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > floor_db)
    if rms.max() < 1e-4 or not len(loud):
        return x[:0]
    pad = int(margin * sr)
    return x[max(0, loud[0] * hop - pad):min(len(x), (loud[-1] + 1) * hop + pad)]


def build_utterances(clips: list[np.ndarray], sr: int, rng: random.Random, min_audio: float = 3.0,
                     max_audio: float = 7.0, keep_last: float = 2.0) -> list[np.ndarray]:
    """Concatenate trimmed clips (in the given order) with short silences into utterances of 3-7 s."""
    out, cur, length = [], [], 0
    target = rng.uniform(min_audio, max_audio) * sr
    for clip in clips:
        if cur:
            gap = np.zeros(int(rng.uniform(0.15, 0.4) * sr), np.float32)
            cur.append(gap)
            length += len(gap)
        cur.append(clip)
        length += len(clip)
        if length >= target:
            out.append(np.concatenate(cur).astype(np.float32))
            cur, length = [], 0
            target = rng.uniform(min_audio, max_audio) * sr
    if cur and length >= keep_last * sr:
        out.append(np.concatenate(cur).astype(np.float32))
    return out


def _components(speakers: list[str], links: set[tuple[str, str]]) -> list[list[str]]:
    """Groups of speakers joined by ``links`` (union-find), each sorted."""
    parent = {s: s for s in speakers}

    def find(s: str) -> str:
        while parent[s] != s:
            s = parent[s]
        return s

    for a, b in links:
        if a in parent and b in parent:
            parent[find(a)] = find(b)
    groups: dict[str, list[str]] = {}
    for s in speakers:
        groups.setdefault(find(s), []).append(s)
    return sorted(sorted(g) for g in groups.values())


def assign_splits(speakers: list[str], links: set[tuple[str, str]], seed: int,
                  evaluation_share: float = 0.4, same_split_as: dict[str, str] | None = None) -> dict[str, str]:
    """Speaker -> "calibration" or "evaluation": per source (the id's prefix), linked speakers together;
    a speaker of ``same_split_as`` (found inside another's recordings) takes its parent's split and plays
    no part in the draw, so finding one moves no other speaker between splits."""
    rng = random.Random(seed)
    follow = {s: p for s, p in (same_split_as or {}).items() if s in speakers and p in speakers}
    by_source: dict[str, list[list[str]]] = {}
    for group in _components([s for s in speakers if s not in follow], links):
        by_source.setdefault(group[0].split("-", 1)[0], []).append(group)
    out = {}
    for source in sorted(by_source):
        groups = by_source[source]
        rng.shuffle(groups)
        total = sum(len(g) for g in groups)
        want = max(1, round(evaluation_share * total)) if len(groups) > 1 else 0
        taken = 0
        for g in groups:
            split = "evaluation" if taken < want else "calibration"
            taken += len(g) if split == "evaluation" else 0
            out.update({s: split for s in g})
    out.update({s: out[p] for s, p in follow.items()})
    return out


def make_trials(utt2spk: dict[str, str], links: set[tuple[str, str]], rng: random.Random, max_targets: int,
                nontargets_per_utt: int) -> list[tuple[str, str, str]]:
    """Same-speaker pairs (at most ``max_targets`` per speaker) and different-speaker pairs, never across a link."""
    by_spk: dict[str, list[str]] = {}
    for u in sorted(utt2spk):
        by_spk.setdefault(utt2spk[u], []).append(u)
    linked = {(a, b) for a, b in links} | {(b, a) for a, b in links}
    trials = []
    for spk, us in sorted(by_spk.items()):
        pairs = [(a, b) for i, a in enumerate(us) for b in us[i + 1:]]
        trials += [(a, b, "target") for a, b in rng.sample(pairs, min(max_targets, len(pairs)))]
    utts = sorted(utt2spk)
    for u in utts:
        pool = [v for v in utts if utt2spk[v] != utt2spk[u] and (utt2spk[u], utt2spk[v]) not in linked]
        trials += [(u, v, "nontarget") for v in rng.sample(pool, min(nontargets_per_utt, len(pool)))]
    return trials


def build_pool(out: Path, sources: list[str] | None = None, per_speaker: int = 40, min_utterances: int = 6,
               max_targets: int = 200, nontargets_per_utt: int = 30, seed: int = 0, cache: Path | None = None,
               log=print) -> dict:
    """Fetch the packages, build every speaker's utterances, split, write both Kaldi directories.

    Returns:
        The manifest (also written to ``out/manifest.json``).

    Raises:
        ValueError: an unknown source name.
        RuntimeError: the packages could not be fetched or decoded.
    """
    names = sources or list(SOURCES)
    unknown = [s for s in names if s not in SOURCES]
    if unknown:
        raise ValueError(f"--sources: unknown {unknown}; sources are {list(SOURCES)}")
    cache = cache or Path(tempfile.gettempdir()) / "spkserve-realspeech"
    root = fetch_packages(sorted({p for s in names for p in SOURCES[s].packages}), cache)
    rng = random.Random(seed)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    speakers: dict[str, dict] = {}
    rows: list[tuple[str, str, Path]] = []
    for sname in names:
        for spk, (lang, files) in sorted(SOURCES[sname].speakers(root).items()):
            decoded = [decode_clip(f) for f in files]
            rate = Counter(sr for _, sr in decoded).most_common(1)[0][0] if decoded else 0
            out_sr = 16000 if rate >= 16000 else 8000
            clips = [trim_silence(w, sr) for w, sr in decoded if sr == rate]
            clips = [resample(c, rate, out_sr) if rate != out_sr else c for c in clips if len(c) >= 0.15 * rate]
            own = random.Random(f"{seed}:{spk}")  # each speaker's own draw: adding a speaker changes no other's
            own.shuffle(clips)
            utts = build_utterances(clips, out_sr, own)[:per_speaker]
            if len(utts) < min_utterances:
                log(f"realspeech: {spk}: {len(utts)} utterances, fewer than {min_utterances}: left out")
                continue
            for i, wave in enumerate(utts):
                utt = f"{spk}-{i:03d}"
                path = out / "wav" / f"{utt}.wav"
                sf.write(path, wave, out_sr, subtype="PCM_16")
                rows.append((utt, spk, path.resolve()))
            speakers[spk] = {"source": sname, "language": lang, "utterances": len(utts), "sample_rate": out_sr,
                             "seconds": round(sum(len(w) for w in utts) / out_sr, 1)}
    links = {(a, b) for a, b in POSSIBLY_SAME_PERSON if a in speakers and b in speakers}
    split_of = assign_splits(sorted(speakers), links, seed, same_split_as=SAME_SPLIT_AS)
    for spk, split in split_of.items():
        speakers[spk]["split"] = split
    counts = {}
    for split in SPLITS:
        part = [r for r in rows if split_of[r[1]] == split]
        if not part:
            continue
        write_kaldi_dir(out / split, part)
        trials = make_trials({u: s for u, s, _ in part}, links, rng, max_targets, nontargets_per_utt)
        (out / split / "trials").write_text("".join(f"{a} {b} {t}\n" for a, b, t in trials))
        counts[split] = {"speakers": len({s for _, s, _ in part}), "utterances": len(part),
                         "target_trials": sum(t == "target" for *_, t in trials),
                         "nontarget_trials": sum(t == "nontarget" for *_, t in trials)}
    manifest = {"splits": counts, "speakers": speakers, "linked": sorted(list(p) for p in links),
                "sources": {s: {"packages": list(SOURCES[s].packages), "licence": SOURCES[s].licence} for s in names},
                "seed": seed, "per_speaker": per_speaker}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.data.realspeech", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {list(SOURCES)}")
    ap.add_argument("--per-speaker", type=int, default=40, help="utterances per speaker at most")
    ap.add_argument("--min-utterances", type=int, default=6, help="speakers with fewer are left out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, help="where the downloaded packages are kept")
    args = ap.parse_args(argv)
    if args.per_speaker < 2 or args.min_utterances < 2:
        ap.error("--per-speaker and --min-utterances must be >= 2 (target trials need two utterances)")
    try:
        manifest = build_pool(args.out, [s for s in args.sources.split(",") if s], args.per_speaker,
                              args.min_utterances, seed=args.seed, cache=args.cache)
    except (ValueError, RuntimeError) as e:
        print(f"realspeech: {e}", file=sys.stderr)
        return 2
    print(json.dumps(manifest["splits"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
