#!/usr/bin/env bash
# Re-extract the Silero VAD model the service ships (models/assets/silero_vad_16k_sequence.onnx)
# from the silero-vad wheel on PyPI, and check it is the expected file. The file is committed,
# so this is only needed to verify its provenance or to restore it.
#   bash scripts/fetch_vad.sh
set -euo pipefail
cd "$(dirname "$0")/.."
version=6.2.3
want=9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85
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
    pathlib.Path("models/assets/LICENSE.silero-vad").write_bytes(z.read(next(n for n in z.namelist() if n.endswith("LICENSE"))))
PY
got=$(sha256sum models/assets/silero_vad_16k_sequence.onnx | cut -d' ' -f1)
[ "$got" = "$want" ] || { echo "fetch_vad.sh: sha256 $got, expected $want" >&2; exit 1; }
echo "fetch_vad.sh: models/assets/silero_vad_16k_sequence.onnx from silero-vad==$version (sha256 ok)"
