#!/usr/bin/env bash
# Set up everything the tests need (.venv with the dev extras, generated gRPC code) and run them.
#   bash scripts/test.sh [pytest args...]   (no args: also the service tests on Python 3.10 and 3.13,
#                                            and the store contract against a local Milvus server)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/install_tools.sh   # buf and promtool for the API and metrics checks (skipped if unavailable)
# TTS voices for the corpus-builder tests: installed when we may (root with apt), else those tests skip
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v flite >/dev/null; then
  bash scripts/install_voices.sh --small || echo "test.sh: could not install TTS voices; corpus tests will skip" >&2
fi
# a headless browser for the web console's test (Debian's chromium), when we may install it
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v chromium >/dev/null; then
  lock=(-o DPkg::Lock::Timeout=600)  # wait for another apt or dpkg run rather than fail on its lock
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${lock[@]}" --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get -qq "${lock[@]}" update >/dev/null 2>&1 \
         && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${lock[@]}" --no-install-recommends chromium \
              >/dev/null 2>&1; }; } \
    || echo "test.sh: could not install chromium; the console's browser test will skip" >&2
fi
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  # the service's tests again under the oldest and newest supported CPython (no torch there)
  bash scripts/test_pythons.sh
  # the speaker-store contract and two replicas against a real Milvus server (PyPI's `milvus`,
  # started here on 127.0.0.1 and stopped by its PID); skipped when it cannot start
  if uri=$(bash scripts/milvus_server.sh start); then
    trap 'bash scripts/milvus_server.sh stop' EXIT
    echo "== speaker store on the Milvus server at $uri =="
    SPKSERVE_TEST_MILVUS_URI="$uri" .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_store_contract.py \
      -k "milvus or replicas"
  else
    echo "test.sh: no Milvus server could be started; its integration tests were skipped" >&2
  fi
fi
