#!/usr/bin/env bash
# Re-extract the Silero VAD models the service ships (models/assets/silero_vad_16k_sequence.onnx, the
# 16 kHz block graph, and models/assets/silero_vad.onnx, the frame graph with the 8 kHz mode used for
# narrowband input) from the silero-vad wheel on PyPI, and check they are the expected files. The
# files are committed, so this is only needed to verify their provenance or to restore them.
#   bash scripts/fetch_vad.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version=6.2.3
want=9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85
want_nb=1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" -m pip download -q --no-deps --only-binary=:all: "silero-vad==$version" -d "$tmp"
"$py" - "$tmp" <<'PY'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("silero_vad-*.whl"))
with zipfile.ZipFile(wheel) as z:
    pathlib.Path("models/assets/silero_vad_16k_sequence.onnx").write_bytes(z.read("silero_vad/data/silero_vad_16k_sequence.onnx"))
    pathlib.Path("models/assets/silero_vad.onnx").write_bytes(z.read("silero_vad/data/silero_vad.onnx"))
    pathlib.Path("models/assets/LICENSE.silero-vad").write_bytes(z.read(next(n for n in z.namelist() if n.endswith("LICENSE"))))
PY
got=$(sha256sum models/assets/silero_vad_16k_sequence.onnx | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "fetch_vad.sh: sha256 $got, expected $want" >&2; exit 1; }
got=$(sha256sum models/assets/silero_vad.onnx | cut -d' ' -f1)
[ "$got" = "$want_nb" ] || { echo "fetch_vad.sh: silero_vad.onnx sha256 $got, expected $want_nb" >&2; exit 1; }
echo "fetch_vad.sh: models/assets/silero_vad_16k_sequence.onnx and silero_vad.onnx from silero-vad==$version (sha256 ok)"
