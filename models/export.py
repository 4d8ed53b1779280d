"""Export a speaker model to a model repository entry the service loads.

    python -m models.export ge2e --out models/repository/ge2e [--wheel PATH]
    python -m models.export checkpoint --checkpoint ckpt.pt --out models/repository/NAME
    python -m models.export xvector --pretrained DIR --out models/repository/NAME
    (each takes --calibrate-trials TRIALS --calibrate-scp WAV_SCP to set the threshold at the EER point)

Writes ``model.onnx`` (raw waveform (B, T) + lengths (B,) in, embedding (B, D) out, dynamic
batch and time axes, every frontend inside the graph), ``model.int8.onnx`` (dynamic int8
quantisation of MatMul only: quantising the convolutional/LSTM parts made models slower
here) and ``model.json`` (see ``models.artifact``). Every export is checked: torch vs ONNX
Runtime on a padded batch of different lengths (max abs diff and cosine), int8 vs fp32
cosine. An existing entry is never overwritten without ``--force``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.artifact import ArtifactError, ModelCard, save_card

__all__ = ["export_model", "ParityReport", "check_parity", "calibrate", "main"]

log = logging.getLogger("models.export")


class _WaveformOnly(nn.Module):
    """Adapter for graphs without a lengths input: every row is taken as full length."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (B, D)."""
        lengths = torch.full((waveform.shape[0],), waveform.shape[1], dtype=torch.long, device=waveform.device)
        return self.model(waveform, lengths)


class ParityReport(dict):
    """Parity figures of an export: max_abs_diff, min_cosine (torch vs ORT), int8_min_cosine."""


# 0.2.0: inputs are brought to GE2E_INPUT_LEVEL_DBFS first. The encoder's power mel is not
# level-invariant and Resemblyzer's own normalisation only raises quiet audio, so the same
# recording 8 dB louder gave another voiceprint (BENCHMARKS.md section 9c: the level study).
# 0.3.0: the card's input_tilt limits each input's spectral slope (models.spectral_tilt), fitted on the real
# calibration speakers by `training.evaluation.tilt` (BENCHMARKS.md section 9e). The export writes that fit
# (GE2E_INPUT_TILT) so a re-export makes the shipped version's embeddings; a refit that moves the limit
# must name a new version (training.evaluation.tilt refuses otherwise).
# 0.4.0: 50/60 Hz mains hum is taken out first (remove_mains_hum, models.mains_hum; BENCHMARKS.md section 9f),
# and the tilt limit is refitted on the calibration speakers' speech as the tilt step then sees it.
GE2E_VERSION = "0.4.0"
GE2E_INPUT_LEVEL_DBFS = -25.0
GE2E_INPUT_TILT = Path(__file__).resolve().parent / "assets" / "ge2e-input-tilt.json"


def _parity_batch(sample_rate: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A zero-padded batch of three noise-plus-tone signals of different lengths: (3, T), (3,)."""
    rng = np.random.default_rng(seed)
    lengths = np.array([int(3.1 * sample_rate), int(1.7 * sample_rate), int(0.9 * sample_rate)])
    batch = np.zeros((len(lengths), lengths.max()), dtype=np.float32)
    for i, n in enumerate(lengths):
        t = np.arange(n) / sample_rate
        tone = 0.3 * np.sin(2 * np.pi * (120 + 40 * i) * t * (1 + 0.1 * np.sin(3 * t)))
        batch[i, :n] = tone + 0.05 * rng.standard_normal(n)
    return batch, lengths.astype(np.int64)


def _ort_embed(path: Path, card: ModelCard, wave: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {card.waveform_input: wave}
    if card.lengths_input:
        feeds[card.lengths_input] = lengths
    return sess.run([card.output], feeds)[0]


def check_parity(model: nn.Module, card: ModelCard, out_dir: Path) -> ParityReport:
    """Compare torch and ONNX Runtime (fp32 and int8) on a padded batch, and batch vs single.

    Raises:
        RuntimeError: when fp32 parity is worse than max abs diff 1e-3 / cosine 0.9999.
    """
    wave, lengths = _parity_batch(card.sample_rate)  # (B, T), (B,)
    if not card.lengths_input:  # such graphs batch only equal lengths: test on one length
        lengths = np.full_like(lengths, wave.shape[1])
    with torch.no_grad():
        ref = model(torch.from_numpy(wave), torch.from_numpy(lengths)).numpy()  # (B, D)
    got = _ort_embed(out_dir / card.files["fp32"], card, wave, lengths)  # (B, D)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    report = ParityReport(max_abs_diff=float(np.abs(ref - got).max()), min_cosine=float(cos.min()))
    singles = np.stack([
        _ort_embed(out_dir / card.files["fp32"], card, wave[i : i + 1, : lengths[i]], lengths[i : i + 1])[0]
        for i in range(len(lengths))
    ])  # (B, D)
    report["batch_vs_single_min_cosine"] = float((singles * got).sum(1).min())
    if "int8" in card.files:
        q = _ort_embed(out_dir / card.files["int8"], card, wave, lengths)
        qcos = (q * got).sum(1) / (np.linalg.norm(q, axis=1) * np.linalg.norm(got, axis=1))
        report["int8_min_cosine"] = float(qcos.min())
    if report["max_abs_diff"] > 1e-3 or report["min_cosine"] < 0.9999:
        raise RuntimeError(f"ONNX export does not match torch: {dict(report)}")
    return report


def export_model(
    model: nn.Module,
    card: ModelCard,
    out_dir: str | Path,
    *,
    force: bool = False,
    int8: bool = True,
    opset: int = 17,
) -> ParityReport:
    """Export ``model`` (forward(waveform (B, T), lengths (B,)) -> (B, D)) as a repository entry.

    Args:
        model: the torch module; it is put in eval mode.
        card: the model card to write; its file names, opset and parameter count are filled in.
        out_dir: the entry's directory; its name must equal ``card.name``.
        force: replace an existing entry.
        int8: also write a dynamically int8-quantised variant.
        opset: ONNX opset.

    Returns:
        The parity report, also stored in ``card.evaluation['parity']``.
    """
    out_dir = Path(out_dir)
    if out_dir.name != card.name:
        raise ArtifactError(f"--out directory name {out_dir.name!r} must equal the model name {card.name!r}")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(f"{out_dir}: model repository entry exists; pass --force to overwrite it")
    model = model.eval()
    card.opset = opset
    card.parameters = int(sum(p.numel() for p in model.parameters()))
    card.files = {"fp32": "model.onnx"}
    with tempfile.TemporaryDirectory(dir=out_dir.parent if out_dir.parent.exists() else None) as tmp:
        tmp = Path(tmp)
        wave, lengths = _parity_batch(card.sample_rate)
        dynamic_axes = {card.waveform_input: {0: "batch", 1: "samples"}, card.output: {0: "batch"}}
        if card.lengths_input:
            graph, args, inputs = model, (torch.from_numpy(wave), torch.from_numpy(lengths)), [card.waveform_input, card.lengths_input]
            dynamic_axes[card.lengths_input] = {0: "batch"}
        else:
            graph, args, inputs = _WaveformOnly(model).eval(), (torch.from_numpy(wave),), [card.waveform_input]
        torch.onnx.export(
            graph, args, str(tmp / "model.onnx"), input_names=inputs, output_names=[card.output],
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
        )
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            quantize_dynamic(
                str(tmp / "model.onnx"), str(tmp / "model.int8.onnx"),
                op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
            )
            card.files["int8"] = "model.int8.onnx"
        report = check_parity(model, card, tmp)
        card.evaluation = {**card.evaluation, "parity": dict(report)}
        save_card(card, tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(tmp, out_dir)
        out_dir.chmod(0o755)
    log.info("exported %s to %s: %s", card.name, out_dir, dict(report))
    return report


def calibrate(model_dir: str | Path, wav_scp: str | Path, trials: str | Path, variant: str = "fp32") -> dict[str, Any]:
    """Embed a trial list's utterances with an exported entry and find its EER threshold.

    Args:
        model_dir: the repository entry.
        wav_scp: Kaldi ``utt path`` list covering every utterance of ``trials``.
        trials: Kaldi-style trial list.

    Returns:
        The verification figures (EER %, threshold, minDCF) and where they came from.
    """
    from models.audio import condition, decode_encoded
    from models.evaluation import cosine_scores, evaluate_scores, read_trials
    from models.runtime import SpeakerModel

    runtime = SpeakerModel(model_dir, ["CPUExecutionProvider"], variant)
    trial_list = read_trials(trials)
    paths = dict(line.split(maxsplit=1) for line in Path(wav_scp).read_text().splitlines() if line.strip())
    needed = sorted({u for a, b, _ in trial_list for u in (a, b)})
    missing = [u for u in needed if u not in paths]
    if missing:
        raise ValueError(f"{wav_scp}: no path for {len(missing)} trial utterances, e.g. {missing[0]!r}")
    waves = []
    for u in needed:
        samples, sr = decode_encoded(Path(paths[u]).read_bytes(), u)
        waves.append(condition(samples, sr, runtime.sample_rate, field=u))
    emb = dict(zip(needed, runtime.embed_many(waves)))
    result = evaluate_scores(*cosine_scores(emb, trial_list))
    return {"eer_percent": result.eer, "threshold": result.eer_threshold, "min_dcf_p0.01": result.min_dcf_01,
            "min_dcf_p0.05": result.min_dcf_05, "trials": str(trials), "n_target": result.n_target,
            "n_nontarget": result.n_nontarget}


def _apply_calibration(out_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    """With --calibrate-trials, set the card's threshold to the EER point on those trials."""
    if not args.calibrate_trials:
        return None
    from models.artifact import load_card

    cal = calibrate(out_dir, args.calibrate_scp, args.calibrate_trials)
    card = load_card(out_dir)
    card.threshold = round(float(cal["threshold"]), 4)
    card.evaluation = {**card.evaluation, "calibration": cal}
    save_card(card, out_dir)
    return cal


def _ge2e_card(args: argparse.Namespace, model: nn.Module) -> ModelCard:
    return ModelCard(
        name=Path(args.out).name,
        version=GE2E_VERSION,
        family="ge2e",
        sample_rate=16000,
        embedding_dim=256,
        batching="padded",
        threshold=args.threshold,
        min_audio_seconds=0.1,
        description="GE2E d-vector (3-layer LSTM over 40-band mel, 1.6 s partials averaged), "
        "waveform in; weights of Resemblyzer 0.1.4's pretrained encoder",
        license="Apache-2.0 (Resemblyzer, Copyright Resemble AI / Corentin Jemine)", commercial_use=True,
        source="PyPI resemblyzer==0.1.4, file resemblyzer/pretrained.pt",
        training_config={"frontend": model.config_dict(), "loss": "GE2E (upstream training)"},
        input_level_dbfs=GE2E_INPUT_LEVEL_DBFS,
        input_tilt=json.loads(GE2E_INPUT_TILT.read_text()),
        remove_mains_hum=True,
    )


def _checkpoint_card(args: argparse.Namespace, model: nn.Module, ckpt: dict[str, Any]) -> ModelCard:
    cfg = ckpt["config"]
    return ModelCard(
        name=Path(args.out).name, version=args.version, family=f"{cfg['family']}-speaker",
        sample_rate=cfg.get("sample_rate", 16000), embedding_dim=model.embedding_dim, batching="padded",
        threshold=args.threshold, min_audio_seconds=0.5,
        description=args.description or f"{cfg['family']} SSL encoder + weighted layer sum + {cfg['pooling']} pooling",
        license=args.license, commercial_use=args.commercial_use, source=str(args.checkpoint),
        training_config={k: v for k, v in ckpt.items() if k not in ("state_dict", "config")} | {"model": cfg},
        pruning=ckpt.get("pruning"),
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m models.export", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="kind", required=True)
    g = sub.add_parser("ge2e", help="Resemblyzer's pretrained GE2E encoder")
    g.add_argument("--wheel", help="resemblyzer-0.1.4 wheel or pretrained.pt (default: pip download)")
    c = sub.add_parser("checkpoint", help="an SSL speaker model saved as {state_dict, config}")
    c.add_argument("--checkpoint", required=True, type=Path)
    x = sub.add_parser("xvector", help="a transformers WavLMForXVector save_pretrained directory")
    x.add_argument("--pretrained", required=True, type=Path)
    for p in (c, x):
        p.add_argument("--version", default="1.0.0")
        p.add_argument("--license", default="")
        p.add_argument("--commercial-use", action=argparse.BooleanOptionalAction, default=None,
                       help="whether the weights' licence permits commercial use (model.json commercial_use); "
                            "--no-commercial-use keeps a server that loads every model from loading it")
        p.add_argument("--description", default="")
    for p in (g, c, x):
        p.add_argument("--out", required=True, help="model repository entry directory (its name is the model name)")
        p.add_argument("--threshold", type=float, default=0.5, help="cosine threshold when not calibrated")
        p.add_argument("--calibrate-trials", help="trial list: set the threshold at its EER point")
        p.add_argument("--calibrate-scp", help="wav.scp with the trial utterances")
        p.add_argument("--force", action="store_true", help="overwrite an existing entry")
        p.add_argument("--no-int8", action="store_true", help="skip the int8 variant")
    args = ap.parse_args(argv)
    if bool(args.calibrate_trials) != bool(args.calibrate_scp):
        ap.error("--calibrate-trials and --calibrate-scp go together")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.kind == "ge2e":
            from models.ge2e import GE2E

            model = GE2E.from_resemblyzer(args.wheel)
            card = _ge2e_card(args, model)
        elif args.kind == "checkpoint":
            from models.ssl import load_checkpoint

            model, ckpt = load_checkpoint(args.checkpoint)
            card = _checkpoint_card(args, model, ckpt)
        else:
            from models.ssl import XVectorSpeakerModel

            model = XVectorSpeakerModel.from_pretrained(args.pretrained)
            card = ModelCard(name=Path(args.out).name, version=args.version, family="wavlm-xvector", sample_rate=16000,
                             embedding_dim=model.embedding_dim, threshold=args.threshold, license=args.license,
                             commercial_use=args.commercial_use, source=str(args.pretrained), description=args.description or "WavLMForXVector checkpoint")
        report = export_model(model, card, args.out, force=args.force, int8=not args.no_int8)
        cal = _apply_calibration(Path(args.out), args)
    except (ArtifactError, FileExistsError, FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"export failed: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"exported": card.name, "out": str(args.out), "parity": dict(report), "calibration": cal}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
