"""How verification holds up on the audio real users send: per model and recording condition.

    .venv/bin/python -m training.evaluation.robustness --wav-scp corpus/eval/wav.scp --trials corpus/eval/trials \\
        --models ge2e ssl-sv-small --out runs/robust

Builds a robustness set from any Kaldi trial list: the second utterance of every trial (the
"test" side) is passed through each condition of ``training.data.channels`` (silence and noise
padding, a pause, 8 kHz telephone band with G.711, GSM, AMR-NB, Opus, MP3, added noise,
reverberation, a 25 dB quieter level, and a cut to 1 s of speech), while the first stays as
recorded, like an enrolment. Each side is scored exactly as the service scores it: VAD with
the model's options, probes under ``--min-probe-speech`` seconds of speech answered
NOT_ENOUGH_SPEECH, cosine -> S-norm against the model's cohort -> calibrated LLR, decision at
the model's operating point.

Reported per model and condition: EER and minDCF (p=0.01) on the decided trials, Cllr and
minCllr (calibrated models), false-accept and false-reject rates at the operating point, the
share of trials answered NOT_ENOUGH_SPEECH, and the share of **same-utterance pairs** (an
utterance against its own conditioned copy) still accepted. Also: how often silence, noise,
tones, DTMF, hold music-like chords, DC and clipping are accepted against the trial
utterances (they must never be). Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.audio import condition, decode_encoded
from models.evaluation import evaluate_scores, read_trials
from models.runtime import SpeakerModel
from models.scoring import cllr, min_cllr
from models.vad import SileroVad, keep_speech
from training.data.channels import CONDITIONS, apply_condition
from training.evaluation.calibrate import model_vad_options

__all__ = ["ROBUSTNESS_CONDITIONS", "Scored", "embed_like_service", "non_speech_signals", "evaluate_model", "main"]

REPO = Path(__file__).resolve().parents[2] / "models" / "repository"
ROBUSTNESS_CONDITIONS = ("clean", "silence_pad", "noise_pad", "pause", "telephone", "gsm", "amr", "opus", "mp3",
                         "noise", "reverb", "quiet", "short")


@dataclass
class Scored:
    """Embeddings of inputs prepared as the service prepares them."""

    emb: np.ndarray  # (N, D) unit; rows of inputs without enough speech are zero
    stats: np.ndarray | None  # (N, 2) cohort statistics
    speech: np.ndarray  # (N,) net speech seconds
    ok: np.ndarray  # (N,) bool: enough speech to be decided on


def embed_like_service(model: SpeakerModel, vad: SileroVad, inputs: list[tuple[np.ndarray, int]],
                       min_speech: float) -> Scored:
    """Resample, VAD, keep the speech, embed: the service's path for a list of (samples, rate)."""
    opts = model_vad_options(model.card)
    waves, speech = [], []
    for samples, rate in inputs:
        wav = condition(np.asarray(samples, np.float32)[:, None], rate, model.sample_rate)
        kept = keep_speech(wav, vad.segments(wav, model.sample_rate, opts))
        waves.append(kept)
        speech.append(len(kept) / model.sample_rate)
    speech = np.array(speech)
    ok = (speech >= max(min_speech, model.card.min_audio_seconds)) & (speech > 0)
    emb = np.zeros((len(inputs), model.dim), np.float32)
    idx = np.flatnonzero(ok)
    if len(idx):
        emb[idx] = model.embed_many([waves[i] for i in idx])
    stats = model.scorer.stats(emb) if model.scorer.cohort is not None else None
    return Scored(emb, stats, speech, ok)


def non_speech_signals(seconds: float = 4.0, sr: int = 16000, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs that are not speech and must never verify against anyone."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    spec = np.fft.rfft(rng.standard_normal(t.size))
    pink = np.fft.irfft(spec / np.sqrt(np.maximum(np.arange(spec.size), 1)), t.size)
    chord = sum(np.sin(2 * np.pi * f * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t)) for f in (262, 330, 392, 523))
    sig = {
        "digital_silence": np.zeros(t.size),
        "white_noise": 0.2 * rng.standard_normal(t.size),
        "pink_noise": 0.3 * pink / np.abs(pink).max(),
        "tone_1khz": 0.5 * np.sin(2 * np.pi * 1000 * t),
        "dtmf": 0.3 * (np.sin(2 * np.pi * 770 * t) + np.sin(2 * np.pi * 1336 * t)),
        "music_chord": 0.15 * chord,
        "dc_offset": np.full(t.size, 0.4),
        "clipping": np.clip(4 * np.sin(2 * np.pi * 150 * t), -1, 1),
    }
    return {k: v.astype(np.float32) for k, v in sig.items()}


def _pair_scores(model: SpeakerModel, a: Scored, ia: np.ndarray, b: Scored, ib: np.ndarray) -> dict[str, np.ndarray]:
    """Scores of pairs (a[ia[k]], b[ib[k]]) on every scale the model has."""
    cos = np.clip(np.einsum("nd,nd->n", a.emb[ia], b.emb[ib]).astype(np.float64), -1, 1)
    out = {"cosine": cos}
    if a.stats is not None:
        ea, eb = a.stats[ia], b.stats[ib]
        out["normalized"] = 0.5 * ((cos - ea[:, 0]) / ea[:, 1] + (cos - eb[:, 0]) / eb[:, 1])
        if model.scorer.calibration is not None:
            out["llr"] = model.scorer.calibration.llr(out["normalized"])
    return out


def evaluate_model(model: SpeakerModel, vad: SileroVad, waves: dict[str, tuple[np.ndarray, int]],
                   trials: list[tuple[str, str, int]], conditions: tuple[str, ...], min_speech: float,
                   seed: int = 0, log=print) -> dict:
    """Figures per condition for one model (see the module docstring)."""
    scale, threshold = model.scorer.scale, model.scorer.threshold
    utts = sorted(waves)
    index = {u: i for i, u in enumerate(utts)}
    base = embed_like_service(model, vad, [waves[u] for u in utts], min_speech)
    ia = np.array([index[a] for a, _, _ in trials])
    ib = np.array([index[b] for _, b, _ in trials])
    labels = np.array([lab for *_, lab in trials])
    bank = [waves[u][0] for u in utts[:: max(1, len(utts) // 32)] if waves[u][1] == 16000]
    results = {}
    for cond in conditions:
        t0 = time.time()
        rng = np.random.default_rng(seed)
        inputs = []
        for u in utts:
            samples, rate = waves[u]
            x = samples if rate == 16000 else condition(samples[:, None], rate, 16000)
            inputs.append(apply_condition(cond, x, rng, bank))
        test = embed_like_service(model, vad, inputs, min_speech)
        decided = base.ok[ia] & test.ok[ib]
        sc = _pair_scores(model, base, ia[decided], test, ib[decided])
        lab = labels[decided]
        r = {"trials": int(len(trials)), "not_enough_speech": round(float(1 - decided.mean()), 4)}
        if lab.any() and (~lab.astype(bool)).any():
            ev = evaluate_scores(sc["cosine"], lab)
            r.update(eer=round(ev.eer, 2), min_dcf=round(ev.min_dcf_01, 4))
            if "llr" in sc:
                r.update(cllr=round(cllr(sc["llr"], lab), 4), min_cllr=round(min_cllr(sc["llr"], lab), 4))
            dec = sc[scale] >= threshold
            r.update(far=round(float(dec[lab == 0].mean()), 4), frr=round(float((~dec[lab == 1]).mean()), 4))
        same = np.arange(len(utts))
        both = base.ok & test.ok
        ss = _pair_scores(model, base, same[both], test, same[both])
        # accepted = decided and passing; a same-utterance pair without enough speech is not accepted
        r["same_utterance_accepted"] = round(float((ss[scale] >= threshold).sum() / len(utts)), 4)
        r["same_utterance_cosine_mean"] = round(float(ss["cosine"].mean()), 4) if len(ss["cosine"]) else None
        results[cond] = r
        log(f"  {model.name} {cond}: {json.dumps(r)} ({time.time() - t0:.0f} s)")
    noise = non_speech_signals()
    ns = embed_like_service(model, vad, [(v, 16000) for v in noise.values()], min_speech)
    accepted = {}
    for i, name in enumerate(noise):
        if not ns.ok[i]:
            accepted[name] = 0.0
            continue
        sc = _pair_scores(model, ns, np.full(len(utts), i), base, np.arange(len(utts)))
        accepted[name] = round(float((sc[scale] >= threshold)[base.ok].mean()), 4)
    results["non_speech_accepted"] = {"vad_passed": {n: bool(ns.ok[i]) for i, n in enumerate(noise)},
                                      "accept_rate": accepted}
    return results


def _load(wav_scp: Path, trials_path: Path, max_trials: int | None, seed: int):
    paths = dict(line.split(maxsplit=1) for line in wav_scp.read_text().splitlines() if line.strip())
    trials = read_trials(trials_path)
    if max_trials and len(trials) > max_trials:
        rng = np.random.default_rng(seed)
        trials = [trials[i] for i in sorted(rng.choice(len(trials), max_trials, replace=False))]
    needed = sorted({u for a, b, _ in trials for u in (a, b)})
    missing = [u for u in needed if u not in paths]
    if missing:
        raise ValueError(f"{wav_scp}: no path for {len(missing)} trial utterances, e.g. {missing[0]!r}")
    waves = {}
    for u in needed:
        samples, rate = decode_encoded(Path(paths[u]).read_bytes(), u)
        waves[u] = (samples.mean(axis=1).astype(np.float32), rate)
    return waves, trials


def _markdown(all_results: dict, title: str) -> str:
    lines = [f"# Robustness: {title}", "",
             "Test side under each condition, enrolment side as recorded; decisions at each model's operating point. "
             "NES = answered NOT_ENOUGH_SPEECH; same-utt = an utterance against its own conditioned copy.", "",
             "| model | condition | EER % | minDCF | Cllr | minCllr | FAR | FRR | NES | same-utt accepted |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for model, res in all_results.items():
        for cond, r in res.items():
            if cond == "non_speech_accepted":
                continue
            cells = [r.get(k, "") for k in ("eer", "min_dcf", "cllr", "min_cllr", "far", "frr", "not_enough_speech",
                                            "same_utterance_accepted")]
            lines.append(f"| {model} | {cond} | " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Non-speech inputs accepted against the trial utterances (must be 0):", ""]
    for model, res in all_results.items():
        acc = res["non_speech_accepted"]["accept_rate"]
        lines.append(f"- {model}: " + ", ".join(f"{k} {v}" for k, v in acc.items()))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m training.evaluation.robustness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wav-scp", required=True, type=Path)
    ap.add_argument("--trials", required=True, type=Path)
    ap.add_argument("--models", nargs="+", default=["ge2e"], help="repository entries (names or directories)")
    ap.add_argument("--repository", type=Path, default=REPO)
    ap.add_argument("--conditions", default=",".join(ROBUSTNESS_CONDITIONS))
    ap.add_argument("--min-probe-speech", type=float, default=1.0)
    ap.add_argument("--max-trials", type=int, default=None, help="a random subset of the trials")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    conditions = tuple(c for c in args.conditions.split(",") if c)
    unknown = [c for c in conditions if c not in CONDITIONS]
    if unknown:
        ap.error(f"--conditions: unknown {unknown}; known: {list(CONDITIONS)}")
    try:
        waves, trials = _load(args.wav_scp, args.trials, args.max_trials, args.seed)
    except (OSError, ValueError) as e:
        print(f"robustness: {e}", file=sys.stderr)
        return 2
    vad = SileroVad()
    results = {}
    for m in args.models:
        path = Path(m) if Path(m).is_dir() else args.repository / m
        model = SpeakerModel(path, ["CPUExecutionProvider"])
        results[model.name] = evaluate_model(model, vad, waves, trials, conditions, args.min_probe_speech, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "results.md").write_text(_markdown(results, f"{args.trials} ({len(trials)} trials)"))
    print(f"wrote {args.out / 'results.json'} and results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
