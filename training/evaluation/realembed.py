"""Real-speech utterances under channel conditions, embedded as the service embeds them.

Shared by the calibration job (``training.evaluation.calibrate --real``) and the decision evaluation
(``training.evaluation.decisions``): each utterance of a Kaldi split is passed through a condition of
``training.data.channels`` (seeded per utterance and condition, so the same utterance under the same
condition is the same audio in every job), resampled to the model's rate, screened by the
service's VAD with the model's options, and embedded. Inputs with less than ``min_speech``
seconds of speech are kept as rows with ``ok = False`` and a zero embedding: the service would
answer NOT_ENOUGH_SPEECH for them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from models.audio import condition, decode_encoded
from models.band_match import has_low_cut
from models.runtime import SpeakerModel
from models.vad import SileroVad, VadOptions, keep_speech
from training.data.channels import apply_conditions

__all__ = ["Split", "Rendered", "load_kaldi_split", "render_and_embed", "model_vad_options"]


@dataclass
class Split:
    """A Kaldi directory's utterances: ids, speakers and (samples, rate) as recorded."""

    utts: list[str]
    spk: list[str]
    audio: list[tuple[np.ndarray, int]]

    def waves16k(self) -> list[np.ndarray]:
        """Every utterance at 16 kHz (what ``training.data.channels`` takes)."""
        return [x if sr == 16000 else condition(x[:, None], sr, 16000) for x, sr in self.audio]


@dataclass
class Rendered:
    """One split under one condition, prepared and embedded as the service would."""

    emb: np.ndarray  # (N, D) unit embeddings; zero rows where ``ok`` is False
    speech: np.ndarray  # (N,) net speech seconds
    narrowband: np.ndarray  # (N,) bool: VAD treated the input as narrowband
    ok: np.ndarray  # (N,) bool: enough speech to be decided on
    low_cut: np.ndarray | None = None  # (N,) bool: its kept speech lacks the fundamental (models.band_match)


def model_vad_options(card) -> VadOptions:
    """The service's default VAD options with the model's own overrides."""
    return VadOptions(**{k: v for k, v in (card.vad or {}).items() if v is not None})


def load_kaldi_split(d: Path) -> Split:
    """Read ``wav.scp`` and ``utt2spk`` of a Kaldi directory and decode every file.

    Raises:
        FileNotFoundError: a file is missing (named).
        ValueError: an utterance has no speaker, or the directory lists none.
    """
    d = Path(d)
    for name in ("wav.scp", "utt2spk"):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: missing (build the pool with python -m training.data.realspeech)")
    scp = dict(line.split(maxsplit=1) for line in (d / "wav.scp").read_text().splitlines() if line.strip())
    u2s = dict(line.split() for line in (d / "utt2spk").read_text().splitlines() if line.strip())
    if not scp:
        raise ValueError(f"{d / 'wav.scp'}: lists no utterances")
    utts = sorted(scp)
    missing = [u for u in utts if u not in u2s]
    if missing:
        raise ValueError(f"{d / 'utt2spk'}: no speaker for {missing[0]!r}")
    audio = []
    for u in utts:
        path = Path(scp[u])
        if not path.is_file():
            raise FileNotFoundError(f"{d / 'wav.scp'}: {u}: {path} does not exist")
        samples, rate = decode_encoded(path.read_bytes(), u)
        audio.append((samples.mean(axis=1).astype(np.float32), rate))
    return Split(utts, [u2s[u] for u in utts], audio)


def render_and_embed(model: SpeakerModel, vad: SileroVad, split: Split, conds: list[str], min_speech: float,
                     seed: int = 0, bank: list[np.ndarray] | None = None, chunk: int = 128,
                     post: Callable[[np.ndarray], np.ndarray] | None = None) -> Rendered:
    """Pass every utterance through ``conds`` (in order) and embed it as the service would.

    Args:
        model: the speaker model (its VAD options and minimum audio apply).
        vad: the VAD.
        split: the utterances.
        conds: condition names of ``training.data.channels`` (["clean"] for as recorded).
        min_speech: seconds of speech below which an input is not decided on.
        seed: with the utterance id and the conditions, seeds each rendering.
        bank: 16 kHz utterances mixed as babble (default: every 8th of ``split``).
        post: applied to the kept speech before it is embedded (e.g. ``models.band_match.match_band``); the
            net speech is the kept speech's.
    """
    opts = model_vad_options(model.card)
    waves = split.waves16k()
    bank = bank if bank is not None else waves[::8]
    tag = "+".join(conds)
    n = len(waves)
    emb = np.zeros((n, model.dim), np.float32)
    speech, narrow, low_cut = np.zeros(n), np.zeros(n, bool), np.zeros(n, bool)
    pending: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if pending:
            out = model.embed_many([w for _, w in pending])  # (B, D)
            for (i, _), v in zip(pending, out):
                emb[i] = v / max(float(np.linalg.norm(v)), 1e-12)
            pending.clear()

    for i, (utt, x) in enumerate(zip(split.utts, waves)):
        if conds == ["clean"] and split.audio[i][1] != 16000:
            samples, rate = split.audio[i]  # as recorded: keep a telephone recording at its own rate
        else:
            rng = np.random.default_rng([seed, zlib.crc32(f"{utt}|{tag}".encode())])
            samples, rate = apply_conditions(conds, x, rng, bank)
        wav = condition(np.asarray(samples, np.float32)[:, None], rate, model.sample_rate)
        segs, narrow[i] = vad.analyse(wav, model.sample_rate, opts)
        kept = keep_speech(wav, segs)
        speech[i] = len(kept) / model.sample_rate
        low_cut[i] = has_low_cut(kept, model.sample_rate)
        if speech[i] >= max(min_speech, model.card.min_audio_seconds) and speech[i] > 0:
            pending.append((i, kept if post is None else post(kept)))
            if len(pending) >= chunk:
                flush()
    flush()
    ok = np.linalg.norm(emb, axis=1) > 0
    return Rendered(emb, speech, narrow, ok, low_cut)
