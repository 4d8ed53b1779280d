"""Importing fbank-input speaker graphs (WeSpeaker / 3D-Speaker export signatures) as artifacts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from models.fbank import KaldiFbank
from models.import_onnx import REFERENCE_AUDIO, ImportError_, import_fbank_model, main


class TinyTdnn(nn.Module):
    """Random-init stand-in: (B, T, 80) fbank -> (B, 192), statistics pooling over every frame."""

    def __init__(self, bins: int = 80, dim: int = 192):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv1d(bins, 64, 5, padding=2), nn.ReLU(), nn.Conv1d(64, 64, 3, dilation=2, padding=2),
                                  nn.ReLU())
        self.out = nn.Linear(128, dim)

    def forward(self, feats):
        h = self.conv(feats.transpose(1, 2))  # (B, C, T)
        return self.out(torch.cat([h.mean(-1), h.std(-1)], dim=1))


def export(tmp_path, input_name: str, output_name: str, bins: int = 80):
    torch.manual_seed(0)
    path = tmp_path / f"{input_name}.onnx"
    torch.onnx.export(TinyTdnn(bins).eval(), (torch.randn(1, 200, bins),), str(path), input_names=[input_name],
                      output_names=[output_name], dynamic_axes={input_name: {0: "B", 1: "T"}, output_name: {0: "B"}},
                      opset_version=17, dynamo=False)
    return path


def test_front_end_matches_kaldi_native_fbank():
    import kaldi_native_fbank as knf

    wave, _ = sf.read(REFERENCE_AUDIO / "flite-awb-1.wav", dtype="float32")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0.0
    opts.mel_opts.num_bins = 80
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, (wave * 32768).tolist())
    fb.input_finished()
    ref = np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])
    got, frames = KaldiFbank(cmn=False)(torch.tensor(wave)[None], torch.tensor([len(wave)]))
    assert int(frames) == len(ref)
    np.testing.assert_allclose(got[0].numpy(), ref, atol=2e-3)


@pytest.mark.parametrize("signature", [("feats", "embs"), ("feature", "embedding")])  # WeSpeaker, 3D-Speaker
def test_import_serves_waveforms_with_parity(tmp_path, signature):
    from models.runtime import SpeakerModel

    src = export(tmp_path, *signature)
    report = import_fbank_model(src, tmp_path / "repo" / "community", license="Apache-2.0", commercial_use=True)
    assert report["min_cosine"] >= 0.999
    card = json.loads((tmp_path / "repo" / "community" / "model.json").read_text())
    assert card["batching"] == "same_length" and card["embedding_dim"] == 192 and card["commercial_use"] is True
    model = SpeakerModel(tmp_path / "repo" / "community", ["CPUExecutionProvider"])
    wave, _ = sf.read(REFERENCE_AUDIO / "flite-slt-1.wav", dtype="float32")
    a = model.embed([wave])[0]
    b = model.embed([wave, wave])[1]  # equal lengths batch exactly
    assert a.shape == (192,) and float(np.dot(a, b)) > 0.9999


def test_bad_graphs_and_options_are_refused_before_writing(tmp_path):
    src = export(tmp_path, "feats", "embs", bins=40)
    with pytest.raises(ImportError_, match="num-bins"):
        import_fbank_model(src, tmp_path / "out")  # 40-bin model, 80-bin default
    assert not (tmp_path / "out" / "model.json").exists()
    with pytest.raises(ImportError_, match="--input 'x'"):
        import_fbank_model(src, tmp_path / "out", input_name="x", num_bins=40)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    assert main(["--onnx", str(tmp_path / "junk.onnx"), "--out", str(tmp_path / "out")]) == 2
    assert import_fbank_model(src, tmp_path / "out", num_bins=40)["min_cosine"] >= 0.999
    with pytest.raises(ImportError_, match="--force"):
        import_fbank_model(src, tmp_path / "out", num_bins=40)


def test_import_needs_no_torch_for_the_shipped_front_ends(tmp_path):
    """The 80-bin 16 kHz front ends ship prebuilt: an import runs with torch unavailable (as in the
    `import` extra), gives the same artifact outputs, and another configuration says what it needs."""
    import subprocess
    import sys

    from models.import_onnx import SHIPPED_FRONT_ENDS, front_end_asset

    assert all(front_end_asset(*c).is_file() for c in SHIPPED_FRONT_ENDS)
    src = export(tmp_path, "feats", "embs")
    src40 = export(tmp_path, "x40", "embs", bins=40)
    code = f"""
import sys, json
sys.modules["torch"] = None  # import torch fails, as on a machine without it
from models.import_onnx import import_fbank_model, ImportError_
r = import_fbank_model({str(src)!r}, {str(tmp_path / "a")!r}, license="Apache-2.0", commercial_use=True)
assert "torch" not in sys.modules or sys.modules["torch"] is None
try:
    import_fbank_model({str(src40)!r}, {str(tmp_path / "b")!r}, num_bins=40)
except ImportError_ as e:
    print("REFUSED", e)
print("COSINE", r["min_cosine"])
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED --num-bins 40" in proc.stdout and "needs torch" in proc.stdout
    assert float(proc.stdout.split("COSINE")[1]) >= 0.999
    # the shipped front end is what torch builds today
    import onnxruntime as ort

    from models.import_onnx import FRONT_OPSET, _front_end

    _front_end(80, 16000, True, FRONT_OPSET, tmp_path / "fresh.onnx")
    wave, _ = sf.read(REFERENCE_AUDIO / "flite-slt-1.wav", dtype="float32")
    feeds = {"waveform": wave[None], "lengths": np.array([len(wave)], dtype=np.int64)}
    shipped = ort.InferenceSession(str(front_end_asset(80, 16000, True)), providers=["CPUExecutionProvider"])
    fresh = ort.InferenceSession(str(tmp_path / "fresh.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(shipped.run(None, feeds)[0], fresh.run(None, feeds)[0], atol=1e-4)
