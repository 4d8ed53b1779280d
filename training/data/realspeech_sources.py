"""Where the real-speech pool comes from: human recordings inside Debian packages.

Every model here was trained on synthetic voices, and its scores must be calibrated and judged
on human speech. Debian's archive holds a few hours of it, recorded by volunteers and voice
talents for games, tutors and telephone systems. This module names the packages, where each
speaker's files lie in them and who the speakers are; ``training.data.realspeech`` builds the pool.

=============  ==============================================  ============================
source         package: what                                   speaker of a recording
=============  ==============================================  ============================
asterisk       asterisk-core-sounds-*-g722, asterisk-prompt-*  the voice talent of a prompt
               (IVR prompts; 3 of 7 speakers only at 8 kHz)    set (Allison: en and es)
tuxpaint       tuxpaint-stamps-default (spoken stamp           the language's recorded
               descriptions, one volunteer per language)       description set (French: two
                                                               sets, see below)
klettres       klettres-data (letters and syllables, one       the language directory (its
               native speaker per language)                    alpha/ and syllab/ parts)
ktuberling     ktuberling-data (object names, one speaker      the language directory
               per language)
=============  ==============================================  ============================

``gcompris-qt-data`` was checked too: its Qt resource bundles hold sound effects and music
only (the voice packs are downloaded by the game at run time), so it adds no speakers.

Never used, because they are reserved for independent evaluation: ``codec2-examples``,
``pocketsphinx-testdata`` and ``alsa-utils`` (``RESERVED_PACKAGES``; a test checks no source
names them).

Speaker identity comes from how each package is organised, not from a model. One language's
description set holds two recording sessions by two people: of the 928 French descriptions, 755
carry Vorbis track tags and 173 carry none (``TWO_SESSIONS``). The two sets are two voices: median
F0 133 Hz against 205 Hz, and GE2E embeddings of their clips have a mean cosine of 0.47 across
the sets against 0.69 and 0.65 within each (the Catalan, Romanian and Belarusian sets also mix
tagged and untagged files, but across their two parts the cosine, 0.66-0.72, is what it is within
them, 0.66-0.80: one voice each). The tagged set keeps the id ``tuxpaint-fr``; the untagged one
is ``tuxpaint-fr-b``, a speaker of its own, placed in its parent's split (``SAME_SPLIT_AS``) so
that splitting it moved no other speaker between splits. Two groups that
could still be one person (a volunteer recording for two projects) are listed in
``POSSIBLY_SAME_PERSON``: they are kept in the same split and never paired as impostors. The
one entry was found by comparing the GE2E centroids of every pair of groups: it was the only
pair of different groups scoring at within-speaker level (mean cosine 0.79; next 0.74).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import soundfile as sf

__all__ = ["Source", "SOURCES", "RESERVED_PACKAGES", "POSSIBLY_SAME_PERSON", "SAME_SPLIT_AS", "TWO_SESSIONS",
           "fetch_packages", "decode_clip"]

RESERVED_PACKAGES = ("codec2-examples", "pocketsphinx-testdata", "alsa-utils")

POSSIBLY_SAME_PERSON = {("ktuberling-ru", "tuxpaint-be")}

TWO_SESSIONS = {"fr"}  # Tux Paint languages whose untagged files are a second speaker's ("tuxpaint-<lang>-b")

SAME_SPLIT_AS = {f"tuxpaint-{lang}-b": f"tuxpaint-{lang}" for lang in TWO_SESSIONS}  # speaker -> its parent's split


@dataclass(frozen=True)
class Source:
    """A package family of human recordings.

    Attributes:
        name: short name, the prefix of its speaker ids.
        packages: Debian packages to download.
        licence: of the recordings (they are fetched, never shipped).
        speakers: unpacked root -> {speaker id: (language, [files])}.
    """

    name: str
    packages: tuple[str, ...]
    licence: str
    speakers: Callable[[Path], dict[str, tuple[str, list[Path]]]]


_ASTERISK = {  # speaker -> [(package, directory under usr/share/asterisk/sounds, suffix, language)]
    "allison": [("asterisk-core-sounds-en-g722", "en_US_f_Allison", ".g722", "en"),
                ("asterisk-core-sounds-es-g722", "es_MX_f_Allison", ".g722", "es")],
    "june": [("asterisk-core-sounds-fr-g722", "fr_CA_f_June", ".g722", "fr")],
    "carlo": [("asterisk-core-sounds-it-g722", "it_IT_m_Carlo", ".g722", "it")],
    "ivr-ru": [("asterisk-core-sounds-ru-g722", "ru_RU_f_IvrvoiceRU", ".g722", "ru")],
    "menardi": [("asterisk-prompt-it-menardi-wav", "it_IT_f_Menardi", ".wav", "it")],
    "armelle": [("asterisk-prompt-fr-armelle", "fr", ".gsm", "fr")],
    "es-co": [("asterisk-prompt-es-co", "es", ".gsm", "es")],
}


def _asterisk(root: Path) -> dict[str, tuple[str, list[Path]]]:
    base = root / "usr" / "share" / "asterisk" / "sounds"
    out = {}
    for spk, parts in _ASTERISK.items():
        files = sorted(f for _, d, suffix, _ in parts for f in (base / d).glob(f"*{suffix}"))
        out[f"asterisk-{spk}"] = ("+".join(sorted({lang for *_, lang in parts})), files)
    return out


def _tuxpaint(root: Path) -> dict[str, tuple[str, list[Path]]]:
    by_lang: dict[str, list[Path]] = {}
    for f in (root / "usr" / "share" / "tuxpaint" / "stamps").rglob("*_desc_*.ogg"):
        m = re.search(r"_desc_([a-zA-Z]+)\.ogg$", f.name)
        if m:
            by_lang.setdefault(m.group(1), []).append(f)
    out = {}
    for lang, files in by_lang.items():
        if lang in TWO_SESSIONS:
            tagged = [f for f in files if _has_track_tag(f)]
            out[f"tuxpaint-{lang}-b"] = (lang, sorted(set(files) - set(tagged)))
            files = tagged
        out[f"tuxpaint-{lang}"] = (lang, sorted(files))
    return out


def _has_track_tag(path: Path) -> bool:
    """Whether an Ogg Vorbis file carries a track-number tag."""
    with sf.SoundFile(path) as f:
        return bool(f.tracknumber)


def _klettres(root: Path) -> dict[str, tuple[str, list[Path]]]:
    base = root / "usr" / "share" / "klettres"
    out = {}
    for d in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        files = sorted(d.glob("alpha/*.ogg")) + sorted(d.glob("syllab/*.ogg"))
        if files:
            out[f"klettres-{d.name}"] = (d.name, files)
    return out


def _ktuberling(root: Path) -> dict[str, tuple[str, list[Path]]]:
    base = root / "usr" / "share" / "ktuberling" / "sounds"
    out = {}
    for d in sorted(p for p in base.iterdir() if p.is_dir()) if base.is_dir() else []:
        if "@" in d.name:  # Serbian script variants: copies of sr
            continue
        files = sorted(d.glob("*.ogg")) + sorted(d.glob("*.wav"))
        if files:
            out[f"ktuberling-{d.name}"] = (d.name, files)
    return out


SOURCES = {
    "asterisk": Source("asterisk", tuple(sorted({p for parts in _ASTERISK.values() for p, *_ in parts})),
                       "asterisk-core-sounds: CC BY-SA 3.0 (Digium); asterisk-prompt-*: GPL", _asterisk),
    "tuxpaint": Source("tuxpaint", ("tuxpaint-stamps-default",), "GPL-2 (Tux Paint stamps)", _tuxpaint),
    "klettres": Source("klettres", ("klettres-data",), "GPL-2+ (KDE KLettres)", _klettres),
    "ktuberling": Source("ktuberling", ("ktuberling-data",), "GPL-2+ (KDE KTuberling)", _ktuberling),
}


def fetch_packages(packages: list[str], into: Path) -> Path:
    """Download (``apt-get download``, no root needed) and unpack Debian packages; returns the root.

    Raises:
        RuntimeError: apt-get/dpkg-deb missing, or the download failed (the message says which).
        ValueError: a package reserved for independent evaluation was asked for.
    """
    reserved = sorted(set(packages) & set(RESERVED_PACKAGES))
    if reserved:
        raise ValueError(f"packages {reserved} are reserved for independent evaluation and must not be used")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("needs apt-get and dpkg-deb (Debian/Ubuntu)")
    debs, root = into / "debs", into / "root"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(exist_ok=True)
    missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        r = subprocess.run(["apt-get", "download", *missing], cwd=debs, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get download {' '.join(missing)} failed: {r.stderr.strip()[-500:]}")
    for p in packages:
        stamp = root / f".unpacked-{p}"
        if not stamp.exists():
            for deb in debs.glob(f"{p}_*.deb"):
                subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            stamp.touch()
    return root


def decode_clip(path: Path) -> tuple[np.ndarray, int]:
    """A recording as mono float32 samples and its rate (G.722 via the G722 package, GSM via sox)."""
    if path.suffix == ".g722":
        try:
            import G722
        except ImportError:
            raise RuntimeError("decoding G.722 needs the G722 package (pip install G722)") from None
        pcm = np.asarray(G722.G722(16000, 64000).decode(path.read_bytes()), dtype=np.float32)
        return pcm / 32768.0, 16000
    if path.suffix == ".gsm":
        if shutil.which("sox") is None:
            raise RuntimeError("decoding GSM 06.10 needs sox (apt-get install sox)")
        raw = subprocess.run(["sox", "-t", "gsm", str(path), "-t", "raw", "-e", "signed-integer", "-b", "16", "-"],
                             capture_output=True, check=True).stdout
        return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0, 8000
    wave, sr = sf.read(path, dtype="float32", always_2d=True)
    return wave.mean(axis=1), sr
