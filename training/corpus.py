"""Build a multi-speaker corpus offline from the recorded voices in Debian's archive.

    bash scripts/install_voices.sh            # flite, festival voices, espeak-ng, every mbrola voice
    .venv/bin/python -m training.corpus --out corpus [--size full|small] [--jobs 2]

Voices (each a real recorded speaker): flite's CMU ARCTIC voices, festival's diphone/HTS
voices, and every MBROLA diphone voice driven by espeak-ng (in English text, which each
voice reads with its own language's rules, and where espeak-ng maps it, in English proper).
Voices of one speaker (flite and festival ``kal``; flite ``slt`` and festival's HTS ``slt``;
``mb-de1`` and ``mb-de1-en``) share a speaker id.

The MBROLA voices af1, de3, de4, de5, de6, gr2, hu1, pl1, ro1, sw1, sw2 are reserved for
independent evaluation and never enter this corpus. Of the other speakers every fourth (in
sorted order) is an evaluation speaker; training and evaluation speakers are disjoint.
Training speakers also appear speed-perturbed (x0.9, x1.1) as new pseudo-speakers (the
wespeaker convention); training utterances get added noise (5-25 dB SNR) or simple
reverberation (sox) at random, evaluation utterances get mild noise (15-30 dB) so trials
are not studio-clean.

Output (Kaldi style): ``{train,eval}/wav.scp``, ``utt2spk``, ``spk2utt``, ``eval/trials``,
``manifest.json`` (voice -> engine, package, licence, language, split) and 16 kHz mono
16-bit WAV files under ``wav/``. Rebuilding with the same seed gives the same corpus.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from models.audio import resample, to_mono

__all__ = ["Voice", "RESERVED", "discover_voices", "sentences", "build_corpus", "main"]

RESERVED = frozenset({"af1", "de3", "de4", "de5", "de6", "gr2", "hu1", "pl1", "ro1", "sw1", "sw2"})
MBROLA_LICENCE = "non-free: MBROLA voice licence (non-commercial, non-military use; see the package's copyright file)"


@dataclass(frozen=True)
class Voice:
    """One synthesis voice and the speaker it records."""

    name: str  # unique voice name, e.g. "mb-de1-en"
    speaker: str  # speaker id shared by voices of one person
    engine: str  # flite | festival | espeak-mbrola
    arg: str  # engine-specific voice argument
    language: str
    package: str
    licence: str


def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def discover_voices() -> list[Voice]:
    """The installed recorded voices, reserved MBROLA voices left out."""
    voices: list[Voice] = []
    if _have("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split(":")[-1].split()
        for v in ("kal", "awb", "rms", "slt"):
            if v in listed:
                voices.append(Voice(f"flite-{v}", f"cmu-{v}", "flite", v, "en", "flite",
                                    "BSD-style (CMU flite / CMU ARCTIC)"))
    if _have("text2wave"):
        for d, spk, pkg in (("kal_diphone", "cmu-kal", "festvox-kallpc16k"), ("ked_diphone", "cmu-ked", "festvox-kdlpc16k"),
                            ("cmu_us_slt_arctic_hts", "cmu-slt", "festvox-us-slt-hts")):
            if list(Path("/usr/share/festival/voices").glob(f"*/{d}")):
                voices.append(Voice(f"festival-{d}", spk, "festival", d, "en", pkg, "free (festvox / CMU ARCTIC licence)"))
    mb_dir = Path("/usr/share/mbrola")
    espeak_mb = next((p for p in Path("/usr/lib").glob("*/espeak-ng-data/voices/mb")), None)
    if _have("espeak-ng") and mb_dir.is_dir() and espeak_mb is not None:
        for vfile in sorted(espeak_mb.iterdir()):
            parts = vfile.name.split("-")  # mb-de1 or mb-de1-en
            code = parts[1]
            if code in RESERVED or not (mb_dir / code).exists() or len(parts) > 3:
                continue
            lang = parts[2] if len(parts) == 3 else code[:2]
            voices.append(Voice(vfile.name, f"mbrola-{code}", "espeak-mbrola", vfile.name, lang, f"mbrola-{code}",
                                MBROLA_LICENCE))
    return voices


_SUBJECTS = ["the old man", "a young girl", "my neighbour", "the doctor", "our teacher", "the pilot", "a tired farmer",
             "the children", "her brother", "the musician", "a quiet student", "the baker", "his mother", "the captain"]
_VERBS = ["carried", "painted", "found", "opened", "watched", "bought", "cleaned", "forgot", "repaired", "described",
          "borrowed", "counted", "followed", "remembered"]
_OBJECTS = ["a heavy wooden box", "the red bicycle", "seven small apples", "an empty glass", "the broken window",
            "a long letter", "the blue umbrella", "twelve silver coins", "the kitchen door", "a strange old map",
            "the morning paper", "three green bottles"]
_TAILS = ["before the rain started", "near the railway station", "on a cold winter evening", "without saying a word",
          "while everyone was sleeping", "at the end of the long road", "in the middle of the market",
          "after the concert", "just after sunrise", "because nobody else would"]
_FIXED = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "She sells sea shells by the sea shore every summer.",
    "Numbers like four hundred and twenty seven are hard to say quickly.",
    "Is it going to rain tomorrow, or will the sun finally come out?",
    "The museum opens at nine o'clock and closes at half past five.",
    "Thank you very much for your help, I really appreciate it.",
    "My password is seven three nine one, please do not tell anyone.",
]


def sentences(n: int, seed: int) -> list[str]:
    """``n`` varied English sentences (fixed ones first, then seeded random compositions)."""
    rng = random.Random(seed)
    out = list(_FIXED[: min(n, len(_FIXED))])
    while len(out) < n:
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        if rng.random() < 0.3:
            s += f", and then {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        out.append(s[0].upper() + s[1:] + rng.choice([".", ".", "?", "!"]))
    return out


def synthesise(voice: Voice, text: str, out_wav: Path) -> None:
    """Render ``text`` with ``voice`` to a WAV file at the engine's own rate."""
    if voice.engine == "flite":
        cmd = ["flite", "-voice", voice.arg, "-t", text, "-o", str(out_wav)]
    elif voice.engine == "festival":
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write(text)
        cmd = ["text2wave", "-eval", f"(voice_{voice.arg})", f.name, "-o", str(out_wav)]
    elif voice.engine == "espeak-mbrola":
        cmd = ["espeak-ng", "-v", voice.arg, "-s", "150", "-w", str(out_wav), text]
    else:
        raise ValueError(f"unknown engine {voice.engine!r}")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not out_wav.exists() or out_wav.stat().st_size < 1000:
        raise RuntimeError(f"{voice.name}: synthesis failed ({res.stderr.strip()[:200]})")


def _sox(in_wav: Path, out_wav: Path, effects: list[str]) -> None:
    subprocess.run(["sox", str(in_wav), "-r", "16000", "-c", "1", "-b", "16", str(out_wav), *effects],
                   check=True, capture_output=True, timeout=120)


def _add_noise(wave: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(len(wave)).astype(np.float32)
    if rng.random() < 0.5:  # brownish noise: integrate and normalise
        noise = np.cumsum(noise)
        noise -= np.convolve(noise, np.ones(400) / 400, mode="same")
    p_sig = float(np.mean(wave ** 2)) + 1e-10
    p_noise = float(np.mean(noise ** 2)) + 1e-10
    return wave + noise * np.sqrt(p_sig / p_noise / 10 ** (snr_db / 10))


@dataclass
class _Job:
    voice: Voice
    speaker: str
    utt: str
    text: str
    speed: float
    split: str
    seed: int


def _render(job: _Job, wav_dir: Path) -> tuple[str, str, Path] | None:
    rng = np.random.default_rng(job.seed)
    out = wav_dir / job.speaker / f"{job.utt}.wav"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        return job.utt, job.speaker, out
    with tempfile.TemporaryDirectory() as tmp:
        raw, conv = Path(tmp) / "raw.wav", Path(tmp) / "conv.wav"
        try:
            synthesise(job.voice, job.text, raw)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"warning: {e}", file=sys.stderr)
            return None
        effects = ["speed", str(job.speed)] if job.speed != 1.0 else []
        reverb = job.split == "train" and rng.random() < 0.3
        if reverb:
            effects += ["reverb", str(int(rng.integers(20, 70))), "50", str(int(rng.integers(30, 100)))]
        _sox(raw, conv, effects)
        wave, sr = sf.read(conv, dtype="float32", always_2d=True)
    wave = resample(to_mono(wave), sr, 16000)
    if job.split == "train" and not reverb and rng.random() < 0.6:
        wave = _add_noise(wave, float(rng.uniform(5, 25)), rng)
    elif job.split == "eval":
        wave = _add_noise(wave, float(rng.uniform(15, 30)), rng)
    peak = float(np.abs(wave).max()) or 1.0
    wave = wave / peak * float(rng.uniform(0.3, 0.9))
    sf.write(out, wave, 16000, subtype="PCM_16")
    return job.utt, job.speaker, out


def _write_kaldi(d: Path, rows: list[tuple[str, str, Path]]) -> None:
    d.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows)
    (d / "wav.scp").write_text("".join(f"{u} {p}\n" for u, _, p in rows))
    (d / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s, _ in rows))
    spk2utt: dict[str, list[str]] = {}
    for u, s, _ in rows:
        spk2utt.setdefault(s, []).append(u)
    (d / "spk2utt").write_text("".join(f"{s} {' '.join(us)}\n" for s, us in sorted(spk2utt.items())))


def make_trials(rows: list[tuple[str, str, Path]], targets_per_utt: int, nontargets_per_utt: int, seed: int) -> list[tuple[str, str, int]]:
    """Target and non-target pairs of distinct utterances, deduplicated, in a seeded order."""
    rng = random.Random(seed)
    by_spk: dict[str, list[str]] = {}
    for u, s, _ in rows:
        by_spk.setdefault(s, []).append(u)
    utts = sorted(u for u, _, _ in rows)
    spk_of = {u: s for u, s, _ in rows}
    pairs: set[tuple[str, str, int]] = set()
    for u in utts:
        same = [v for v in by_spk[spk_of[u]] if v != u]
        for v in rng.sample(same, min(targets_per_utt, len(same))):
            pairs.add((min(u, v), max(u, v), 1))
        others = [v for v in rng.sample(utts, min(len(utts), nontargets_per_utt * 3)) if spk_of[v] != spk_of[u]]
        for v in others[:nontargets_per_utt]:
            pairs.add((min(u, v), max(u, v), 0))
    return sorted(pairs)


def build_corpus(out: Path, size: str = "full", jobs: int = 2, seed: int = 0, max_voices: int | None = None) -> dict:
    """Synthesise the corpus into ``out``; returns the manifest.

    Raises:
        RuntimeError: no voices are installed (run scripts/install_voices.sh).
    """
    voices = discover_voices()
    if max_voices:
        voices = voices[:max_voices]
    if len({v.speaker for v in voices}) < 2:
        raise RuntimeError("fewer than two recorded voices installed: run scripts/install_voices.sh first")
    n_sent = {"full": 48, "small": 4}[size]
    speeds = {"full": (0.9, 1.0, 1.1), "small": (1.0,)}[size]
    speakers = sorted({v.speaker for v in voices})
    eval_speakers = set(speakers[3::4])
    if len(eval_speakers) < 2:  # a trial list needs two evaluation speakers
        eval_speakers = set(speakers[-2:])
    text = sentences(n_sent * 3, seed)
    rng = random.Random(seed)
    todo: list[_Job] = []
    for v in voices:
        split = "eval" if v.speaker in eval_speakers else "train"
        picks = rng.sample(text, n_sent)
        for speed in (speeds if split == "train" else (1.0,)):
            spk = v.speaker if speed == 1.0 else f"{v.speaker}-sp{speed}"
            for i, t in enumerate(picks):
                todo.append(_Job(v, spk, f"{spk}-{v.name}-{i:03d}", t, speed, split, rng.randrange(1 << 30)))
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "eval": []}
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        def tqdm(x, **_):
            return x
    with ThreadPoolExecutor(jobs) as pool:
        for job, res in zip(todo, tqdm(pool.map(lambda j: _render(j, out / "wav"), todo), total=len(todo),
                                       desc="synthesising", unit="utt")):
            if res is not None:
                rows[job.split].append(res)
    _write_kaldi(out / "train", rows["train"])
    _write_kaldi(out / "eval", rows["eval"])
    trials = make_trials(rows["eval"], 4, 40, seed)
    (out / "eval" / "trials").write_text("".join(f"{a} {b} {'target' if t else 'nontarget'}\n" for a, b, t in trials))
    manifest = {
        "seed": seed, "size": size, "reserved_voices_excluded": sorted(RESERVED),
        "voices": [{**asdict(v), "split": "eval" if v.speaker in eval_speakers else "train"} for v in voices],
        "counts": {s: {"utterances": len(r), "speakers": len({x[1] for x in r})} for s, r in rows.items()},
        "trials": {"target": sum(t for *_, t in trials), "nontarget": sum(1 - t for *_, t in trials)},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_scp(path: Path) -> dict[str, str]:
    """A Kaldi two-column file (``key value``) as a dict."""
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            k, v = line.split(maxsplit=1)
            out[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.corpus", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--size", choices=("full", "small"), default="full")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-voices", type=int, default=None)
    args = ap.parse_args(argv)
    try:
        m = build_corpus(args.out, args.size, args.jobs, args.seed, args.max_voices)
    except RuntimeError as e:
        print(f"corpus: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"counts": m["counts"], "trials": m["trials"], "voices": len(m["voices"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
