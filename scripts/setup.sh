#!/usr/bin/env bash
# One-step setup for spkserve on a fresh Debian/Ubuntu machine.
#
#   bash scripts/setup.sh            # serving install: .venv with the `spkserve` command
#   bash scripts/setup.sh --dev      # + torch (CPU), transformers, test tools: what tests and training need
#   bash scripts/setup.sh --milvus   # + pymilvus and Milvus Lite (index_backend = "milvus")
#   bash scripts/setup.sh --gpu      # onnxruntime-gpu instead of onnxruntime (CUDA 12 + cuDNN 9 from
#                                    # the system or the nvidia-*-cu12 wheels); combine with --dev
#
# It creates .venv/ in the checkout, installs the project in editable mode and generates the
# gRPC code from protos/. It is idempotent: running it again only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

extras="serve"
gpu=0
milvus=0
for arg in "$@"; do
  case "$arg" in
    --dev) extras="serve,train,test,otel" ;;
    --gpu) gpu=1 ;;
    --milvus) milvus=1 ;;
    *) echo "setup.sh: unknown argument '$arg' (expected --dev, --gpu, --milvus)" >&2; exit 2 ;;
  esac
done

[ "$milvus" = 1 ] && extras="${extras},milvus"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip wheel "setuptools<81"

if [[ "$extras" == *train* ]]; then
  # The CPU wheel of torch: a plain `pip install torch` would pull the multi-GB CUDA build.
  # TORCH_SPEC lets a GPU machine choose another build.
  .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
.venv/bin/python -m pip install -q -e ".[${extras}]"
if [ "$gpu" = 1 ]; then
  # onnxruntime and onnxruntime-gpu install the same module: keep exactly one
  .venv/bin/python -m pip uninstall -q -y onnxruntime
  .venv/bin/python -m pip install -q "${ORT_GPU_SPEC:-onnxruntime-gpu}"
  .venv/bin/python -c "import onnxruntime as o; p = o.get_available_providers(); print('setup.sh: ONNX Runtime providers:', p); \
assert 'CUDAExecutionProvider' in p, 'onnxruntime-gpu has no CUDA provider'"
fi
bash scripts/gen_protos.sh
echo "setup.sh: ready (.venv/bin/spkserve, extras: ${extras})"
