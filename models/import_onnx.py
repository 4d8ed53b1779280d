"""Wrap a community speaker model that takes Kaldi fbank features (WeSpeaker, 3D-Speaker exports)
into a spkserve artifact that takes waveforms.

    python -m models.import_onnx --onnx resnet34.onnx --out models/repository/wespeaker-resnet34 \\
        --license "Apache-2.0 (WeSpeaker)" --commercial-use [--input feats] [--output embs] \\
        [--num-bins 80] [--sample-rate 16000] [--no-cmn] [--version 1.0.0] [--threshold 0.5]

What it does: builds the Kaldi-compatible front end (``models.fbank``: 25/10 ms frames, Povey
window, ``--num-bins`` mel bins, log, per-utterance mean normalisation over the valid frames)
as ONNX, joins it in front of the graph (waveform ``(B, T)`` and ``lengths`` ``(B,)`` in, the
graph's embedding out), checks parity against ``kaldi-native-fbank`` + the original graph in
ONNX Runtime on recorded speech (cosine >= 0.999, else it stops), and writes ``model.onnx`` and
``model.json``. Input and output names are found in the graph when there is one candidate.

Without torch: the front ends of the usual configurations (80 bins at 16 kHz, with and without
mean normalisation: WeSpeaker and 3D-Speaker) ship prebuilt in ``models/assets`` (``fbank-*.onnx``,
made by ``build_front_ends()``), so importing needs only onnx, onnxruntime and kaldi-native-fbank
(``pip install 'spkserve[import]'``); another configuration is built with torch.

Batching: these networks pool over every frame they get, padding included, so the artifact is
``batching: same_length`` (the server batches only equal-length inputs; exact, never padded).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["import_fbank_model", "ImportError_"]

REFERENCE_AUDIO = Path(__file__).resolve().parent / "reference" / "audio"


class ImportError_(ValueError):
    """The graph or the options cannot make an artifact; the message says what to change."""


def _io(model, name: str | None, kind: str) -> str:
    values = model.graph.input if kind == "input" else model.graph.output
    inits = {i.name for i in model.graph.initializer}
    names = [v.name for v in values if v.name not in inits]
    if name:
        if name not in names:
            raise ImportError_(f"--{kind} {name!r}: the graph's {kind}s are {names}")
        return name
    if len(names) != 1:
        raise ImportError_(f"the graph has {kind}s {names}: name the {kind} with --{kind}")
    return names[0]


def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value.type.tensor_type.shape.dim]


ASSETS = Path(__file__).resolve().parent / "assets"
FRONT_OPSET = 17  # the shipped front ends' opset; the joined graph takes the higher of this and the model's
SHIPPED_FRONT_ENDS = [(80, 16000, True), (80, 16000, False)]  # (num_bins, sample_rate, cmn): WeSpeaker, 3D-Speaker


def front_end_asset(num_bins: int, sample_rate: int, cmn: bool) -> Path:
    """Where the prebuilt fbank front end of this configuration lives (``models/assets``)."""
    return ASSETS / f"fbank-{num_bins}-{sample_rate}-{'cmn' if cmn else 'raw'}.onnx"


def build_front_ends() -> list[Path]:
    """Export the shipped front-end configurations into ``models/assets`` (needs torch)."""
    paths = []
    for bins, rate, cmn in SHIPPED_FRONT_ENDS:
        _front_end(bins, rate, cmn, FRONT_OPSET, front_end_asset(bins, rate, cmn))
        paths.append(front_end_asset(bins, rate, cmn))
    return paths


def _front_end_model(num_bins: int, sample_rate: int, cmn: bool, tmp: Path):
    """The front end as an ONNX model at ``FRONT_OPSET``: the shipped file, else built with torch."""
    import onnx

    asset = front_end_asset(num_bins, sample_rate, cmn)
    if asset.is_file():
        return onnx.load(str(asset))
    try:
        import torch  # noqa: F401
    except ImportError:
        shipped = ", ".join(f"--num-bins {b} --sample-rate {r}{'' if c else ' --no-cmn'}" for b, r, c in SHIPPED_FRONT_ENDS)
        raise ImportError_(f"--num-bins {num_bins} --sample-rate {sample_rate}{'' if cmn else ' --no-cmn'}: no shipped "
                           f"front end for this configuration (shipped: {shipped}); building one needs torch "
                           "(pip install 'spkserve[train]')") from None
    path = tmp / "front.onnx"
    _front_end(num_bins, sample_rate, cmn, FRONT_OPSET, path)
    return onnx.load(str(path))


def _front_end(num_bins: int, sample_rate: int, cmn: bool, opset: int, path: Path) -> None:
    import torch

    from models.fbank import KaldiFbank

    class Front(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fbank = KaldiFbank(num_bins=num_bins, sample_rate=sample_rate, cmn=cmn)

        def forward(self, waveform, lengths):
            return self.fbank(waveform, lengths)[0]

    wave = torch.zeros(2, sample_rate)
    lengths = torch.tensor([sample_rate, sample_rate], dtype=torch.int64)
    torch.onnx.export(Front().eval(), (wave, lengths), str(path), input_names=["waveform", "lengths"],
                      output_names=["fbank_feats"], opset_version=opset, dynamo=False,
                      dynamic_axes={"waveform": {0: "B", 1: "T"}, "lengths": {0: "B"}, "fbank_feats": {0: "B", 1: "F"}})


def _kaldi_features(wave: np.ndarray, sample_rate: int, num_bins: int, cmn: bool) -> np.ndarray:
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.frame_opts.samp_freq = sample_rate
    opts.mel_opts.num_bins = num_bins
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(sample_rate, (wave * 32768.0).tolist())
    fb.input_finished()
    feats = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]).astype(np.float32)  # (F, bins)
    return feats - feats.mean(0, keepdims=True) if cmn else feats


def import_fbank_model(onnx_path: Path, out_dir: Path, *, name: str | None = None, input_name: str | None = None,
                       output_name: str | None = None, num_bins: int = 80, sample_rate: int = 16000,
                       cmn: bool = True, version: str = "1.0.0", threshold: float = 0.5, license: str = "",
                       commercial_use: bool | None = None, description: str = "", family: str = "",
                       force: bool = False) -> dict:
    """Make a spkserve artifact of an fbank-input speaker graph; returns the parity report."""
    import onnx
    import onnxruntime as ort
    from onnx import compose, version_converter

    from models.artifact import ModelCard, save_card

    onnx_path = Path(onnx_path)
    if not 8000 <= sample_rate <= 48000:
        raise ImportError_(f"--sample-rate must be in 8000..48000 Hz, got {sample_rate}")
    if not 20 <= num_bins <= 128:
        raise ImportError_(f"--num-bins must be in 20..128, got {num_bins}")
    out_dir = Path(out_dir)
    if (out_dir / "model.json").exists() and not force:
        raise ImportError_(f"{out_dir} already holds a model; pass --force to replace it")
    try:
        net = onnx.load(str(onnx_path))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad file
        raise ImportError_(f"--onnx {onnx_path}: not a readable ONNX model ({type(e).__name__})") from None
    inp, out = _io(net, input_name, "input"), _io(net, output_name, "output")
    in_dims = _dims(next(v for v in net.graph.input if v.name == inp))
    if len(in_dims) != 3 or (isinstance(in_dims[2], int) and in_dims[2] not in (0, num_bins)):
        raise ImportError_(f"input {inp!r} has shape {in_dims}; expected (batch, frames, {num_bins}) fbank features "
                           "(set --num-bins to the model's feature size)")
    net_opset = next((o.version for o in net.opset_import if o.domain in ("", "ai.onnx")), 13)
    opset = max(FRONT_OPSET, net_opset)
    if net_opset != opset:
        net = version_converter.convert_version(net, opset)
    with tempfile.TemporaryDirectory() as tmp:
        front = _front_end_model(num_bins, sample_rate, cmn, Path(tmp))
    if opset != FRONT_OPSET:
        front = version_converter.convert_version(front, opset)
    net = compose.add_prefix(net, prefix="net/")
    merged = compose.merge_models(front, net, io_map=[("fbank_feats", "net/" + inp)],
                                  outputs=["net/" + out], producer_name="spkserve.models.import_onnx")
    merged.graph.output[0].name = "embedding"
    for node in merged.graph.node:
        node.output[:] = ["embedding" if o == "net/" + out else o for o in node.output]
    onnx.checker.check_model(merged)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(merged, str(out_dir / "model.onnx"))

    # parity: kaldi-native-fbank + the original graph vs the artifact on waveforms
    orig = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    wrapped = ort.InferenceSession(str(out_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    import soundfile as sf

    from models.audio import resample

    cosines = []
    for f in sorted(REFERENCE_AUDIO.glob("*.wav"))[:4]:
        wave, sr = sf.read(f, dtype="float32")
        wave = resample(wave, sr, sample_rate)
        ref = orig.run([out], {inp: _kaldi_features(wave, sample_rate, num_bins, cmn)[None]})[0][0]
        got = wrapped.run(["embedding"], {"waveform": wave[None], "lengths": np.array([len(wave)], np.int64)})[0][0]
        cosines.append(float(np.dot(ref, got) / (np.linalg.norm(ref) * np.linalg.norm(got) + 1e-12)))
    dim = int(got.shape[-1])
    report = {"reference": "kaldi-native-fbank + the original graph in ONNX Runtime", "utterances": len(cosines),
              "min_cosine": round(min(cosines), 6)}
    if min(cosines) < 0.999:
        raise ImportError_(f"parity check failed: cosine {min(cosines):.4f} between the wrapped graph and "
                           f"kaldi-native-fbank + the original (need >= 0.999); check --num-bins, --sample-rate, --no-cmn")
    params = int(sum(np.prod(t.dims) for t in net.graph.initializer))
    card = ModelCard(
        name=name or out_dir.name, version=version, sample_rate=sample_rate, embedding_dim=dim,
        waveform_input="waveform", lengths_input="lengths", output="embedding", batching="same_length",
        threshold=threshold, min_audio_seconds=0.5, opset=opset, family=family or "imported-fbank-onnx",
        description=description or f"{onnx_path.name} behind a Kaldi fbank front end ({num_bins} bins"
                                    f"{', CMN' if cmn else ''})",
        license=license, commercial_use=commercial_use, source=str(onnx_path), parameters=params,
        evaluation={"import_parity": report},
        training_config={"front_end": {"kind": "kaldi-fbank", "num_bins": num_bins, "frame_ms": 25, "shift_ms": 10,
                                       "window": "povey", "preemph": 0.97, "cmn": cmn, "dither": 0.0},
                         "original_io": {"input": inp, "output": out}},
    )
    save_card(card, out_dir)
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m models.import_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", required=True, type=Path, help="the fbank-input speaker graph")
    ap.add_argument("--out", required=True, type=Path, help="repository entry to write (its name is the model name)")
    ap.add_argument("--input", help="the graph's feature input (default: its only input)")
    ap.add_argument("--output", help="the graph's embedding output (default: its only output)")
    ap.add_argument("--num-bins", type=int, default=80)
    ap.add_argument("--sample-rate", type=int, default=16000)
    ap.add_argument("--no-cmn", action="store_true", help="the model takes features without mean normalisation")
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--threshold", type=float, default=0.5, help="cosine threshold until it is calibrated")
    ap.add_argument("--license", default="")
    ap.add_argument("--commercial-use", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--description", default="")
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        report = import_fbank_model(args.onnx, args.out, input_name=args.input, output_name=args.output,
                                    num_bins=args.num_bins, sample_rate=args.sample_rate, cmn=not args.no_cmn,
                                    version=args.version, threshold=args.threshold, license=args.license,
                                    commercial_use=args.commercial_use, description=args.description, force=args.force)
    except ImportError_ as e:
        print(f"import_onnx: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "parity": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
