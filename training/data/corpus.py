"""Build a multi-speaker corpus offline from the recorded voices in Debian's archive.

    bash scripts/install_voices.sh            # flite, festival voices, espeak-ng, every mbrola voice
    .venv/bin/python -m training.data.corpus --out corpus [--size full|small] [--jobs 2]

Voices (each a real recorded speaker): flite's CMU ARCTIC voices; festival's diphone, cluster
unit and HTS voices in English, Catalan, Czech, Finnish, Italian, Russian, Hindi, Marathi and
Telugu; and every MBROLA diphone voice driven by espeak-ng, reading its own language and, where
espeak-ng maps the voice to English (``mb-de1-en``), English. Non-English text is drawn from
``training/sentences.json`` (ten everyday sentences per language, one to three per utterance);
English text from a seeded generator. Voices of one speaker (flite and festival ``kal``; flite
``slt`` and festival's HTS ``slt``; ``mb-de1`` and ``mb-de1-en``; festival's Hindi, Marathi and
Telugu ``NSK`` voices) share a speaker id, so target trials also cross languages. Voices of a
language without text (``mb-cn1``: Chinese, whose espeak-ng phoneme table is not packaged) are
not used; a voice that fails to synthesise a probe sentence is left out and listed in the
manifest.

The MBROLA voices af1, de3, de4, de5, de6, gr2, hu1, pl1, ro1, sw1, sw2 are reserved for
independent evaluation: they never enter ``train/`` or ``eval/`` and are written to a split of
their own, ``reserved/`` (with trials). Of the other speakers every fourth (in sorted order) is
an evaluation speaker; training and evaluation speakers are disjoint. Training speakers also
appear speed-perturbed (x0.9, x1.1) as new pseudo-speakers (the wespeaker convention); half of
the training utterances are pitch-shifted by up to +-80 cents (sox ``pitch``: the same speaker
at a slightly different F0, with the formants kept), and training utterances get added noise
(5-25 dB SNR) or simple reverberation (sox) at random; evaluation and reserved utterances get
mild noise (15-30 dB) so trials are not studio-clean.

Output (Kaldi style): ``{train,eval,reserved}/wav.scp``, ``utt2spk``, ``spk2utt``,
``{eval,reserved}/trials``, ``manifest.json`` (voice -> engine, package, licence, language,
split) and 16 kHz mono 16-bit WAV files under ``wav/``. Rebuilding with the same seed gives
the same corpus. WAV files already present are kept, so an interrupted build resumes; build
into an empty directory after changing voices or text.
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
from training.data.sentences import _sentence_table, sentences

__all__ = ["Voice", "RESERVED", "discover_voices", "sentences", "build_corpus", "write_kaldi_dir", "main"]

RESERVED = frozenset({"af1", "de3", "de4", "de5", "de6", "gr2", "hu1", "pl1", "ro1", "sw1", "sw2"})
MBROLA_LICENCE = "non-free: MBROLA voice licence (non-commercial, non-military use; see the package's copyright file)"

# festival voice directory -> (speaker id, Debian package, language, text encoding the voice reads, licence)
FESTIVAL_VOICES = {
    "kal_diphone": ("cmu-kal", "festvox-kallpc16k", "en", "latin-1", "free (festvox / CMU licence)"),
    "ked_diphone": ("cmu-ked", "festvox-kdlpc16k", "en", "latin-1", "free (festvox / CMU licence)"),
    "cmu_us_slt_arctic_hts": ("cmu-slt", "festvox-us-slt-hts", "en", "latin-1", "free (CMU ARCTIC licence)"),
    "upc_ca_ona_hts": ("upc-ona", "festvox-ca-ona-hts", "ca", "latin-1", "LGPL-2.1+"),
    "czech_dita": ("brailcom-dita", "festvox-czech-dita", "cs", "iso-8859-2", "GPL-3+"),
    "czech_krb": ("brailcom-krb", "festvox-czech-krb", "cs", "iso-8859-2", "GPL-3+"),
    "czech_machac": ("brailcom-machac", "festvox-czech-machac", "cs", "iso-8859-2", "GPL-3+"),
    "czech_ph": ("brailcom-ph", "festvox-czech-ph", "cs", "iso-8859-2", "GPL-2+"),
    "hy_fi_mv_diphone": ("suopuhe-mv", "festvox-suopuhe-mv", "fi", "latin-1", "LGPL"),
    "suo_fi_lj_diphone": ("suopuhe-lj", "festvox-suopuhe-lj", "fi", "latin-1", "LGPL"),
    "lp_diphone": ("ifm-lp", "festvox-italp16k", "it", "latin-1", "GPL-2+"),
    "pc_diphone": ("ifm-pc", "festvox-itapc16k", "it", "latin-1", "GPL-2+"),
    "msu_ru_nsh_clunits": ("msu-nsh", "festvox-ru", "ru", "utf-8", "BSD-like / GPL-3"),
    "hindi_NSK_diphone": ("cdac-nsk", "festvox-hi-nsk", "hi", "utf-8", "GPL-2+"),
    "marathi_NSK_diphone": ("cdac-nsk", "festvox-mr-nsk", "mr", "utf-8", "GPL-2+"),
    "telugu_NSK_diphone": ("cdac-nsk", "festvox-te-nsk", "te", "utf-8", "GPL-2+"),
}


@dataclass(frozen=True)
class Voice:
    """One synthesis voice and the speaker it records."""

    name: str  # unique voice name, e.g. "mb-de1-en"
    speaker: str  # speaker id shared by voices of one person
    engine: str  # flite | festival | espeak-mbrola
    arg: str  # engine-specific voice argument
    language: str  # text language: "en" or a key of sentences.json
    package: str
    licence: str
    encoding: str = "utf-8"  # how the engine wants its text file encoded (festival voices differ)
    reserved: bool = False  # a reserved MBROLA voice: independent evaluation only


def _have(cmd: str) -> bool:
    return shutil.which(cmd) is not None


def _espeak_language(voice_file: Path) -> str:
    """The base language code of an espeak-ng voice file (``pt-br`` -> ``pt``)."""
    for line in voice_file.read_text(errors="replace").splitlines():
        if line.startswith("language"):
            return line.split()[1].split("-")[0]
    return ""


def discover_voices(include_reserved: bool = False) -> list[Voice]:
    """The installed recorded voices whose language has text; reserved MBROLA voices only if asked."""
    languages = {"en", *_sentence_table()}
    voices: list[Voice] = []
    if _have("flite"):
        listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True).stdout.split(":")[-1].split()
        for v in ("kal", "awb", "rms", "slt"):
            if v in listed:
                voices.append(Voice(f"flite-{v}", f"cmu-{v}", "flite", v, "en", "flite",
                                    "BSD-style (CMU flite / CMU ARCTIC)"))
    if _have("text2wave"):
        for d, (spk, pkg, lang, enc, lic) in FESTIVAL_VOICES.items():
            if list(Path("/usr/share/festival/voices").glob(f"*/{d}")):
                voices.append(Voice(f"festival-{d}", spk, "festival", d, lang, pkg, lic, enc))
    mb_dir = Path("/usr/share/mbrola")
    espeak_mb = next((p for p in Path("/usr/lib").glob("*/espeak-ng-data/voices/mb")), None)
    if _have("espeak-ng") and mb_dir.is_dir() and espeak_mb is not None:
        for vfile in sorted(espeak_mb.iterdir()):
            parts = vfile.name.split("-")  # mb-de1 (its own language) or mb-de1-en (English)
            code = parts[1]
            reserved = code in RESERVED
            if (reserved and not include_reserved) or not (mb_dir / code).exists():
                continue
            lang = _espeak_language(vfile)
            if (len(parts) == 3 and parts[2] != "en") or lang not in languages:
                continue  # other mappings (mb-de6-grc) and languages without text (mb-cn1: zh)
            voices.append(Voice(vfile.name, f"mbrola-{code}", "espeak-mbrola", vfile.name, lang, f"mbrola-{code}",
                                MBROLA_LICENCE, reserved=reserved))
    return voices


def synthesise(voice: Voice, text: str, out_wav: Path) -> None:
    """Render ``text`` with ``voice`` to a WAV file at the engine's own rate.

    Raises:
        RuntimeError: the engine failed or wrote (almost) nothing.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if voice.engine == "flite":
            cmd = ["flite", "-voice", voice.arg, "-t", text, "-o", str(out_wav)]
        elif voice.engine == "festival":
            text_file = Path(tmp) / "text.txt"
            text_file.write_bytes(text.encode(voice.encoding))
            cmd = ["text2wave", "-eval", f"(voice_{voice.arg})", str(text_file), "-o", str(out_wav)]
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
    pitch: int  # cents; 0 = unchanged
    split: str
    seed: int


def _render(group: list[_Job], wav_dir: Path) -> list[tuple[str, str, Path] | None]:
    """Render jobs that share one voice and text: synthesised once, then perturbed per job."""
    outs = [wav_dir / job.speaker / f"{job.utt}.wav" for job in group]
    if all(out.exists() for out in outs):  # resuming an interrupted build
        return [(job.utt, job.speaker, out) for job, out in zip(group, outs)]
    results: list[tuple[str, str, Path] | None] = []
    with tempfile.TemporaryDirectory() as tmp:
        raw, conv = Path(tmp) / "raw.wav", Path(tmp) / "conv.wav"
        try:
            synthesise(group[0].voice, group[0].text, raw)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"warning: {e}", file=sys.stderr)
            return [None] * len(group)
        for job, out in zip(group, outs):
            rng = np.random.default_rng(job.seed)
            effects = ["pitch", str(job.pitch)] if job.pitch else []
            effects += ["speed", str(job.speed)] if job.speed != 1.0 else []
            reverb = job.split == "train" and rng.random() < 0.3
            if reverb:
                effects += ["reverb", str(int(rng.integers(20, 70))), "50", str(int(rng.integers(30, 100)))]
            _sox(raw, conv, effects)
            wave, sr = sf.read(conv, dtype="float32", always_2d=True)
            wave = resample(to_mono(wave), sr, 16000)
            if job.split == "train" and not reverb and rng.random() < 0.6:
                wave = _add_noise(wave, float(rng.uniform(5, 25)), rng)
            elif job.split != "train":
                wave = _add_noise(wave, float(rng.uniform(15, 30)), rng)
            peak = float(np.abs(wave).max()) or 1.0
            out.parent.mkdir(parents=True, exist_ok=True)
            sf.write(out, wave / peak * float(rng.uniform(0.3, 0.9)), 16000, subtype="PCM_16")
            results.append((job.utt, job.speaker, out))
    return results


def write_kaldi_dir(d: Path, rows: list[tuple[str, str, Path]]) -> None:
    """Write ``wav.scp``, ``utt2spk`` and ``spk2utt`` of (utterance, speaker, wav path) rows into ``d``."""
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


def _usable(voices: list[Voice], jobs: int) -> tuple[list[Voice], dict[str, str]]:
    """The voices that synthesise a probe sentence, and why each other one failed."""
    def probe(v: Voice) -> str | None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                synthesise(v, sentences(1, 0, v.language)[0], Path(tmp) / "probe.wav")
            except (RuntimeError, subprocess.TimeoutExpired, UnicodeEncodeError) as e:
                return str(e)[:200]
        return None

    with ThreadPoolExecutor(jobs) as pool:
        errors = list(pool.map(probe, voices))
    failed = {v.name: e for v, e in zip(voices, errors) if e is not None}
    for name, e in failed.items():
        print(f"warning: voice {name} left out: {e}", file=sys.stderr)
    return [v for v in voices if v.name not in failed], failed


def _write_split(out: Path, split: str, rows: list[tuple[str, str, Path]], seed: int) -> dict | None:
    """Kaldi files (and trials, except for train) of one split; the trial counts."""
    if not rows:
        return None
    write_kaldi_dir(out / split, rows)
    if split == "train":
        return None
    trials = make_trials(rows, 4, 40, seed)
    (out / split / "trials").write_text("".join(f"{a} {b} {'target' if t else 'nontarget'}\n" for a, b, t in trials))
    return {"target": sum(t for *_, t in trials), "nontarget": sum(1 - t for *_, t in trials)}


def build_corpus(out: Path, size: str = "full", jobs: int = 2, seed: int = 0, max_voices: int | None = None) -> dict:
    """Synthesise the corpus into ``out``; returns the manifest.

    Raises:
        RuntimeError: fewer than two speakers can be synthesised (run scripts/install_voices.sh).
    """
    found = discover_voices(include_reserved=True)
    reserved = [v for v in found if v.reserved]
    voices = [v for v in found if not v.reserved]
    if max_voices:
        voices = voices[:max_voices]
    voices, failed = _usable(voices, jobs)
    reserved, failed_reserved = _usable(reserved, jobs)
    failed.update(failed_reserved)
    if len({v.speaker for v in voices}) < 2:
        raise RuntimeError("fewer than two recorded voices installed: run scripts/install_voices.sh first")
    n_sent = {"full": 48, "small": 4}[size]
    speeds = {"full": (0.9, 1.0, 1.1), "small": (1.0,)}[size]
    speakers = sorted({v.speaker for v in voices})
    eval_speakers = set(speakers[3::4])
    if len(eval_speakers) < 2:  # a trial list needs two evaluation speakers
        eval_speakers = set(speakers[-2:])
    split_of = {v.name: "reserved" if v.reserved else "eval" if v.speaker in eval_speakers else "train"
                for v in voices + reserved}
    text = {lang: sentences(n_sent * 3, seed, lang) for lang in sorted({v.language for v in voices + reserved})}
    rng = random.Random(seed)
    todo: list[list[_Job]] = []  # one group per (voice, sentence): synthesised once, then speed-perturbed
    for v in voices + reserved:
        split = split_of[v.name]
        picks = rng.sample(text[v.language], n_sent // 2 if split == "reserved" else n_sent)
        for i, t in enumerate(picks):
            group = []
            for speed in (speeds if split == "train" else (1.0,)):
                spk = v.speaker if speed == 1.0 else f"{v.speaker}-sp{speed}"
                pitch = int(rng.uniform(-80, 80)) if split == "train" and rng.random() < 0.5 else 0
                group.append(_Job(v, spk, f"{spk}-{v.name}-{i:03d}", t, speed, pitch, split, rng.randrange(1 << 30)))
            todo.append(group)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"train": [], "eval": [], "reserved": []}
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        def tqdm(x, **_):
            return x
    with ThreadPoolExecutor(jobs) as pool:
        for group, results in zip(todo, tqdm(pool.map(lambda g: _render(g, out / "wav"), todo), total=len(todo),
                                             desc="synthesising", unit="sentence")):
            for job, res in zip(group, results):
                if res is not None:
                    rows[job.split].append(res)
    trials = {split: _write_split(out, split, r, seed) for split, r in rows.items()}
    manifest = {
        "seed": seed, "size": size, "reserved_voices": sorted(RESERVED),
        "voices": [{**asdict(v), "split": split_of[v.name]} for v in voices + reserved],
        "voices_left_out": failed,
        "languages": sorted({v.language for v in voices + reserved}),
        "counts": {s: {"utterances": len(r), "speakers": len({x[1] for x in r})} for s, r in rows.items()},
        "trials": trials["eval"], "reserved_trials": trials["reserved"],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
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
    ap = argparse.ArgumentParser(prog="python -m training.data.corpus", description=__doc__,
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
