"""Fit a model's ``input_tilt``: the reference spectrum and the range of slopes that real voices show.

    .venv/bin/python -m training.evaluation.tilt --model-dir models/repository/ge2e --real corpus-real

Reads the real-speech pool's *calibration* speakers as recorded (clean), keeps each utterance's
speech as the service does (VAD with the model's options), repairs it as the runtime does before
its tilt step (``models.input_steps``: the DC offset, and mains hum where the card says so), and
measures its long-term spectrum in the bands of ``models.spectral_tilt`` (narrowband recordings, which the
runtime leaves alone, are left out). The reference is the mean of
those spectra; each utterance's slope against it (dB per octave) spreads the speakers' own
tilts and their recordings'; the range kept is from the ``--low``-th to the ``--high``-th
percentile of those slopes (5 and 95 by default). Written into the card's ``input_tilt``
(with how it was fitted); the runtime then limits every input's slope to that range.

Run it before ``training.evaluation.calibrate`` (``calibrate --fit-tilt`` does both): the
cohort and the score map must be fitted on embeddings made with the limit in place. A limit
that differs from the one the card carries changes the model's embeddings, so writing it needs
``--version`` (a new version): voiceprints enrolled under the old version then refuse to mix
with the new ones instead of silently scoring against them. Refitting on the same pool gives
the same limit and keeps the version. Nothing here looks at the evaluation speakers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from models.artifact import load_card, save_card
from models.audio import condition, remove_dc
from models.input_steps import InputSteps
from models.mains_hum import find_hum
from models.spectral_tilt import band_levels_db, tilt_slope
from models.vad import SileroVad, is_narrowband, keep_speech
from training.evaluation.realembed import load_kaldi_split, model_vad_options

__all__ = ["fit_tilt", "main", "same_limit"]


def same_limit(a: dict | None, b: dict | None) -> bool:
    """Whether two ``input_tilt`` specs filter input alike (reference and range; how each was fitted aside)."""
    if a is None or b is None:
        return a is b
    return all(a[k] == b[k] for k in ("reference_db", "min_db_per_octave", "max_db_per_octave"))


def fit_tilt(model_dir: Path, real: Path, low: float = 5.0, high: float = 95.0, min_speech: float = 1.0,
             min_utterances: int = 20, write: bool = True, version: str | None = None, skip_hummed: bool = False,
             log=print) -> dict:
    """Measure the calibration speakers' spectra; returns (and, with ``write``, stores) the card's ``input_tilt``.

    ``version``: the card's new version, needed when the fitted limit differs from the one the card
    carries (the embeddings change); with the same limit it may stay unset. ``skip_hummed``: leave out
    recordings in which ``models.mains_hum`` finds hum (to see how much they move the range).

    Raises:
        FileNotFoundError, ValueError: a missing pool, percentiles out of order, or a changed limit
            written under the card's old version (named).
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"--low/--high must satisfy 0 <= low < high <= 100, got {low} and {high}")
    model_dir = Path(model_dir)
    card = load_card(model_dir)
    if version is not None and not version.strip():
        raise ValueError(f"--version must be a non-empty version string, got {version!r}")
    split = load_kaldi_split(Path(real) / "calibration")
    vad, opts = SileroVad(), model_vad_options(card)
    repair = InputSteps(card).repair  # the spectrum as the runtime's tilt step sees it
    levels, narrow, hummed = [], 0, 0
    for samples, rate in split.audio:
        wav = condition(samples[:, None], rate, card.sample_rate)
        segs, _ = vad.analyse(wav, card.sample_rate, opts)
        speech = keep_speech(wav, segs)
        if len(speech) >= min_speech * card.sample_rate:  # by default 1 s, the service's probe minimum
            if skip_hummed and find_hum(remove_dc(speech), card.sample_rate) is not None:
                hummed += 1
                continue
            speech = repair(speech)
            if is_narrowband(speech, card.sample_rate):
                narrow += 1  # the runtime leaves narrowband input alone: it says nothing of wideband slopes
            else:
                levels.append(band_levels_db(speech, card.sample_rate))
    if len(levels) < min_utterances:
        raise ValueError(f"{Path(real) / 'calibration'}: only {len(levels)} utterances with {min_speech:g} s of speech, "
                         f"need {min_utterances}")
    levels_db = np.array(levels)  # (N, 24)
    reference = np.nanmean(levels_db, axis=0)  # (24,)
    if not np.isfinite(reference).all():
        raise ValueError(f"model sample rate {card.sample_rate} Hz leaves tilt bands empty; input_tilt needs >= 16 kHz")
    slopes = np.array([fit[0] for fit in (tilt_slope(row, reference) for row in levels_db) if fit is not None])
    lo, hi = np.percentile(slopes, [low, high])
    spec = {"reference_db": [round(float(v), 3) for v in reference], "min_db_per_octave": round(float(lo), 3),
            "max_db_per_octave": round(float(hi), 3),
            "fitted_on": {"pool": str(Path(real).name) + "/calibration", "speakers": len(set(split.spk)),
                          "utterances": len(slopes), "narrowband_left_out": narrow, "percentiles": [low, high]}}
    if skip_hummed:
        spec["fitted_on"]["hummed_left_out"] = hummed
    left_out = f"{narrow} narrowband" + (f", {hummed} hummed" if skip_hummed else "")
    log(f"tilt: {len(slopes)} wideband utterances of {len(set(split.spk))} speakers ({left_out} left out); "
        f"slopes against the reference (dB/octave) p{low:g} {lo:+.2f}, median {np.median(slopes):+.2f}, "
        f"p{high:g} {hi:+.2f}")
    if write:
        changed = not same_limit(spec, card.input_tilt)
        if changed and version in (None, card.version):
            raise ValueError(f"--version: the fitted input_tilt differs from the one {card.name} {card.version} carries, "
                             f"so the model's embeddings change; give a new version (got {version!r})")
        if version is not None:
            card.version = version
        card.input_tilt = spec
        save_card(card, model_dir)
        log(f"wrote input_tilt into {model_dir / 'model.json'} (version {card.version}; "
            f"{'limit changed' if changed else 'same limit as before'})")
    return spec


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.tilt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, type=Path, help="the repository entry to fit")
    ap.add_argument("--real", required=True, type=Path, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--low", type=float, default=5.0, help="percentile of the slopes where the kept range starts")
    ap.add_argument("--high", type=float, default=95.0, help="percentile of the slopes where the kept range ends")
    ap.add_argument("--min-speech", type=float, default=1.0, help="seconds of speech an utterance needs to count")
    ap.add_argument("--version", help="the card's new version: needed when the fitted limit differs from the card's")
    ap.add_argument("--skip-hummed", action="store_true",
                    help="leave out recordings with mains hum (the shipped fit keeps them, with the hum taken out)")
    ap.add_argument("--dry-run", action="store_true", help="fit and print, change nothing")
    args = ap.parse_args(argv)
    try:
        fit_tilt(args.model_dir, args.real, args.low, args.high, args.min_speech, write=not args.dry_run,
                 version=args.version, skip_hummed=args.skip_hummed)
    except (FileNotFoundError, ValueError) as e:
        print(f"tilt: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
