#!/usr/bin/env bash
# Generates the Python gRPC code for protos/ into service/_proto/ (never edited by hand, not
# committed). grpcio-tools is needed only for this step; setup.sh installs it when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
"$py" -c "import grpc_tools" 2>/dev/null || "$py" -m pip install -q "grpcio-tools>=1.66"
out=service/_proto
rm -rf "$out"
mkdir -p "$out"
"$py" -m grpc_tools.protoc -Iprotos --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  protos/spkserve/v1/speaker.proto
# protoc writes absolute imports (`from spkserve.v1 import ...`); make the package importable
# as service._proto.spkserve.v1 by giving every folder an __init__.py and rewriting that import.
find "$out" -type d -exec touch {}/__init__.py \;
sed -i 's/^from spkserve\.v1 import/from service._proto.spkserve.v1 import/' "$out"/spkserve/v1/*_grpc.py
echo "gen_protos.sh: wrote $out"
