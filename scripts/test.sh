#!/usr/bin/env bash
# Set up everything the tests need (.venv with the dev extras, generated gRPC code) and run them.
#   bash scripts/test.sh [pytest args...]   (no args: also the service tests on Python 3.10 and 3.13)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/install_tools.sh   # buf and promtool for the API and metrics checks (skipped if unavailable)
# TTS voices for the corpus-builder tests: installed when we may (root with apt), else those tests skip
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v flite >/dev/null; then
  bash scripts/install_voices.sh --small || echo "test.sh: could not install TTS voices; corpus tests will skip" >&2
fi
.venv/bin/python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  # the service's tests again under the oldest and newest supported CPython (no torch there)
  bash scripts/test_pythons.sh
fi
