"""Make the reference embeddings that the GE2E re-implementation is tested against.

Run once (needs network access to PyPI, espeak-ng and flite from Debian, and librosa):

    .venv/bin/pip install librosa && python -m models.reference.make_ge2e_reference

It synthesises a few short utterances (flite's recorded CMU ARCTIC voices and espeak-ng) as
16 kHz WAV into ``models/reference/audio/``, embeds each with Resemblyzer's own
``VoiceEncoder.embed_utterance`` (its code and weights read from the wheel, after its own
``normalize_volume``; VAD trimming skipped, as in spkserve), and writes
``models/reference/ge2e_reference.json``. Resemblyzer's webrtcvad import is stubbed: the VAD
is not used.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import soundfile as sf

from models.audio import resample, to_mono
from models.ge2e import fetch_resemblyzer_wheel

HERE = Path(__file__).resolve().parent
UTTERANCES = [
    ("flite-slt-1", ["flite", "-voice", "slt", "-t", "The quick brown fox jumps over the lazy dog."]),
    ("flite-slt-2", ["flite", "-voice", "slt", "-t", "Please call Stella and ask her to bring these things."]),
    ("flite-awb-1", ["flite", "-voice", "awb", "-t", "The quick brown fox jumps over the lazy dog."]),
    ("flite-rms-1", ["flite", "-voice", "rms", "-t", "She sells sea shells by the sea shore, every summer."]),
    ("flite-kal-1", ["flite", "-voice", "kal", "-t", "A short one."]),
    ("espeak-en-1", ["espeak-ng", "-v", "en-us", "Speaker verification compares two voices, "
                     "and decides whether the same person spoke both recordings."]),
]


def synthesise(out_dir: Path) -> dict[str, Path]:
    """Render every utterance to a 16 kHz mono WAV; returns name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cmd in UTTERANCES:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.wav"
            flag = ["-o", str(raw)] if cmd[0] == "flite" else ["-w", str(raw)]
            subprocess.run(cmd + flag, check=True, capture_output=True)
            samples, sr = sf.read(raw, dtype="float32", always_2d=True)
        wav = resample(to_mono(samples), sr, 16000)
        path = out_dir / f"{name}.wav"
        sf.write(path, wav, 16000, subtype="PCM_16")
        paths[name] = path
    return paths


def load_voice_encoder(wheel: Path):
    """Import Resemblyzer from its wheel file (no install), with webrtcvad stubbed."""
    sys.modules.setdefault("webrtcvad", types.ModuleType("webrtcvad"))
    import scipy.ndimage

    sys.modules.setdefault("scipy.ndimage.morphology", scipy.ndimage)
    extract = Path(tempfile.mkdtemp())
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(extract)
    sys.path.insert(0, str(extract))
    from resemblyzer import VoiceEncoder, audio  # noqa: E402

    return VoiceEncoder(device="cpu", verbose=False), audio


def main() -> None:
    """Synthesise the audio, embed it with Resemblyzer, write the reference JSON."""
    import librosa

    wheel = fetch_resemblyzer_wheel()
    encoder, rz_audio = load_voice_encoder(wheel)
    paths = synthesise(HERE / "audio")
    refs = {}
    for name, path in paths.items():
        wav, _ = sf.read(path, dtype="float32")
        wav = rz_audio.normalize_volume(wav, -30, increase_only=True)
        refs[name] = {
            "file": f"audio/{path.name}",
            "samples": int(len(wav)),
            "embedding": [float(x) for x in encoder.embed_utterance(wav)],
        }
    out = {
        "generator": "models/reference/make_ge2e_reference.py",
        "resemblyzer": "0.1.4",
        "librosa": librosa.__version__,
        "utterances": refs,
    }
    (HERE / "ge2e_reference.json").write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {len(refs)} reference embeddings to {HERE / 'ge2e_reference.json'}")


if __name__ == "__main__":
    main()
