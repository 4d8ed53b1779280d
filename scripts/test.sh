#!/usr/bin/env bash
# Set up everything the tests need (.venv with the dev extras, generated gRPC code) and run them.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
bash scripts/install_tools.sh   # buf and promtool for the API and metrics checks (skipped if unavailable)
# TTS voices for the corpus-builder tests: installed when we may (root with apt), else those tests skip
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! command -v flite >/dev/null; then
  bash scripts/install_voices.sh --small || echo "test.sh: could not install TTS voices; corpus tests will skip" >&2
fi
exec .venv/bin/python -m pytest -q "$@"
