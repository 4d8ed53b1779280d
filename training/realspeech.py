"""A small evaluation set of real recorded speech, from voice prompts in Debian's archive.

    .venv/bin/python -m training.realspeech --out corpus-real [--per-speaker 60]

Every model here is trained on synthetic voices; this set checks what happens on human
recordings. It takes the recorded IVR prompts of Asterisk's sound packages (professional voice
talents, studio recordings, a few words to a sentence each), downloaded with ``apt-get
download`` (no root needed) and unpacked with ``dpkg-deb``:

=================  ======================================  ==============  ===================
speaker            package                                 language        audio
=================  ======================================  ==============  ===================
allison            asterisk-core-sounds-en-g722, -es-g722   English, Spanish 16 kHz G.722 (wideband)
june               asterisk-core-sounds-fr-g722             French (CA)     16 kHz G.722
carlo              asterisk-core-sounds-it-g722             Italian         16 kHz G.722
ivr-ru             asterisk-core-sounds-ru-g722             Russian         16 kHz G.722
menardi            asterisk-prompt-it-menardi-wav           Italian         8 kHz PCM (telephone)
armelle            asterisk-prompt-fr-armelle               French          8 kHz GSM 06.10
es-co              asterisk-prompt-es-co                    Spanish (CO)    8 kHz GSM 06.10
=================  ======================================  ==============  ===================

Allison Smith recorded both the US English and the Mexican Spanish core sounds, so her target
trials cross languages; three speakers exist only as 8 kHz telephone audio, so trials also
cross bandwidths. Prompts of ``--min-seconds`` to ``--max-seconds`` are kept, ``--per-speaker``
of them per speaker (seeded). Output (Kaldi style): ``wav.scp``, ``utt2spk``, ``spk2utt``,
``trials`` (every same-speaker pair, and ``--nontargets-per-utt`` random different-speaker
pairs per utterance) and WAV files at each recording's own rate under ``wav/``. The sounds
are CC BY-SA 3.0 (Digium) and GPL (the prompt packages): they are fetched, not shipped.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

from training.corpus import write_kaldi_dir

__all__ = ["SPEAKERS", "build_real_set", "main"]

# speaker -> [(Debian package, directory under usr/share/asterisk/sounds, file suffix), ...]
SPEAKERS = {
    "allison": [("asterisk-core-sounds-en-g722", "en_US_f_Allison", ".g722"),
                ("asterisk-core-sounds-es-g722", "es_MX_f_Allison", ".g722")],
    "june": [("asterisk-core-sounds-fr-g722", "fr_CA_f_June", ".g722")],
    "carlo": [("asterisk-core-sounds-it-g722", "it_IT_m_Carlo", ".g722")],
    "ivr-ru": [("asterisk-core-sounds-ru-g722", "ru_RU_f_IvrvoiceRU", ".g722")],
    "menardi": [("asterisk-prompt-it-menardi-wav", "it_IT_f_Menardi", ".wav")],
    "armelle": [("asterisk-prompt-fr-armelle", "fr", ".gsm")],
    "es-co": [("asterisk-prompt-es-co", "es", ".gsm")],
}


def _decode(path: Path) -> tuple[np.ndarray, int]:
    """A prompt file as float32 samples and its rate (G.722 via the G722 package, GSM via sox)."""
    if path.suffix == ".g722":
        try:
            import G722
        except ImportError:
            raise RuntimeError("decoding G.722 needs the G722 package (pip install G722)") from None
        pcm = np.asarray(G722.G722(16000, 64000).decode(path.read_bytes()), dtype=np.float32)
        return pcm / 32768.0, 16000
    if path.suffix == ".gsm":
        raw = subprocess.run(["sox", "-t", "gsm", str(path), "-t", "raw", "-e", "signed-integer", "-b", "16", "-"],
                             capture_output=True, check=True).stdout
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, 8000
    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    return wave[:, 0], sr


def _fetch(packages: list[str], into: Path) -> Path:
    """Download and unpack Debian packages; returns the unpacked root."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    debs = into / "debs"
    root = into / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        r = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download failed: {r.stderr.strip()[-500:]}")
    for deb in debs.glob("*.deb"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def build_real_set(out: Path, per_speaker: int = 60, min_seconds: float = 1.5, max_seconds: float = 8.0,
                   nontargets_per_utt: int = 20, seed: int = 0, cache: Path | None = None) -> dict:
    """Fetch the prompt packages and write the Kaldi-style real-speech set to ``out``."""
    packages = sorted({p for srcs in SPEAKERS.values() for p, _, _ in srcs})
    cache = cache or Path(tempfile.gettempdir()) / "spkserve-realspeech"
    root = _fetch(packages, cache) / "usr" / "share" / "asterisk" / "sounds"
    rng = random.Random(seed)
    (out / "wav").mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, Path]] = []
    counts = {}
    for spk, sources in SPEAKERS.items():
        files = sorted(f for _, d, suffix in sources for f in (root / d).glob(f"*{suffix}"))
        rng.shuffle(files)
        kept = 0
        for f in files:
            if kept >= per_speaker:
                break
            wave, sr = _decode(f)
            if not min_seconds <= len(wave) / sr <= max_seconds:
                continue
            utt = f"{spk}-{f.parent.name}-{f.stem}".replace("_", "-")
            path = out / "wav" / f"{utt}.wav"
            sf.write(path, wave, sr, subtype="PCM_16")
            rows.append((utt, spk, path))
            kept += 1
        counts[spk] = kept
    rows = sorted((u, s, p.resolve()) for u, s, p in rows)
    write_kaldi_dir(out, rows)
    by_spk: dict[str, list[str]] = {}
    for u, s, _ in rows:
        by_spk.setdefault(s, []).append(u)
    trials = []
    for s, us in by_spk.items():
        trials += [(a, b, "target") for i, a in enumerate(us) for b in us[i + 1:]]
    others = [(u, s) for u, s, _ in rows]
    for u, s, _ in rows:
        pool = [o for o, t in others if t != s]
        trials += [(u, b, "nontarget") for b in rng.sample(pool, min(nontargets_per_utt, len(pool)))]
    (out / "trials").write_text("".join(f"{a} {b} {t}\n" for a, b, t in trials))
    manifest = {"speakers": counts, "utterances": len(rows), "target_trials": sum(t == "target" for *_, t in trials),
                "nontarget_trials": sum(t == "nontarget" for *_, t in trials), "packages": packages,
                "licences": "asterisk-core-sounds: CC BY-SA 3.0 (Digium); asterisk-prompt-*: GPL"}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.realspeech", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--per-speaker", type=int, default=60)
    ap.add_argument("--min-seconds", type=float, default=1.5)
    ap.add_argument("--max-seconds", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        print(json.dumps(build_real_set(args.out, args.per_speaker, args.min_seconds, args.max_seconds, seed=args.seed)))
    except (RuntimeError, subprocess.CalledProcessError) as e:
        print(f"realspeech: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
