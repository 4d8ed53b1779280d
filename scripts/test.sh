#!/usr/bin/env bash
# Set up everything the tests need (.venv with the dev extras, generated gRPC code) and run them.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
exec .venv/bin/python -m pytest -q "$@"
