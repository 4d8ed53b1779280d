"""`spkserve pull` end to end on a ResNet34-size model served by a local HTTP server.

    .venv/bin/python bench/bench_pull.py --real corpus-real [--repeats 1]

Builds a random-weight network with WeSpeaker ResNet34's shape (fbank (B, T, 80) in, four
residual stages of 3/4/6/3 basic blocks at 32/64/128/256 channels, statistics pooling, 256-d
embedding: about 6.6 M parameters, a 26 MB ONNX file like the real export), serves it over HTTP
from this process, writes a one-entry catalogue for it, and times ``spkserve pull`` as a user
runs it (download, checksum, import + parity, calibration on the real-speech pool). Prints the
stage timings as JSON. No internet is used: real downloads are reported separately when a
machine with internet runs them.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resnet34_like(path: Path) -> int:
    """Export the ResNet34-shaped fbank network to ``path``; returns its parameter count."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.short = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(x))))) + self.short(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()], 32
            for cout, n, stride in ((32, 3, 1), (64, 4, 2), (128, 6, 2), (256, 3, 2)):
                for i in range(n):
                    layers.append(Block(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.body = nn.Sequential(*layers)
            self.out = nn.Linear(256 * 10 * 2, 256)

        def forward(self, feats):  # (B, T, 80)
            h = self.body(feats.transpose(1, 2).unsqueeze(1))  # (B, 256, 10, T / 8)
            h = h.flatten(1, 2)  # (B, 2560, T / 8)
            return self.out(torch.cat([h.mean(-1), h.std(-1)], dim=1))  # (B, 256)

    torch.manual_seed(0)
    net = Net().eval()
    torch.onnx.export(net, (torch.randn(1, 200, 80),), str(path), input_names=["feats"], output_names=["embs"],
                      dynamic_axes={"feats": {0: "B", 1: "T"}, "embs": {0: "B"}}, opset_version=17, dynamo=False)
    return sum(p.numel() for p in net.parameters())


def main() -> None:
    """Command line: time spkserve pull on a locally made model file."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", type=Path, required=True, help="the real-speech pool (python -m training.data.realspeech)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        onnx = tmp / "serve" / "resnet34like.onnx"
        onnx.parent.mkdir()
        params = resnet34_like(onnx)
        data = onnx.read_bytes()
        handler = type("H", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(onnx.parent)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        catalog = tmp / "catalog.toml"
        catalog.write_text(f"""[resnet34-like]
description = "random-weight network of WeSpeaker ResNet34's shape"
format = "fbank-onnx"
urls = ["http://127.0.0.1:{server.server_port}/{onnx.name}"]
sha256 = "{hashlib.sha256(data).hexdigest()}"
size = {len(data)}
license = "Apache-2.0"
commercial_use = true
num_bins = 80
sample_rate = 16000
cmn = true
embedding_dim = 256
""")
        runs = []
        for i in range(args.repeats):
            env = {**os.environ, "SPKSERVE_CACHE": str(tmp / f"cache{i}")}
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "service.cli", "pull", "resnet34-like", "--catalog", str(catalog),
                                   "--repository", str(tmp / f"repo{i}"), "--real", str(args.real)],
                                  cwd=ROOT, env=env, capture_output=True, text=True)
            wall = time.monotonic() - t0
            if done.returncode != 0:
                raise SystemExit(done.stderr)
            out = json.loads(done.stdout)
            runs.append({"wall_s": round(wall, 1), **out["timings"], "cllr": out["calibration"]["cllr"],
                         "parity_min_cosine": out["parity"]["min_cosine"]})
        server.shutdown()
        print(json.dumps({"model_parameters": params, "onnx_mb": round(len(data) / 1e6, 1), "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
