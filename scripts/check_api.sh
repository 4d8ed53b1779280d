#!/usr/bin/env bash
# API checks: `buf lint` (STANDARD rules, documented exceptions) and `buf breaking` of protos/
# against api-baseline/ (the API as last released). Needs buf (scripts/install_tools.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
buf=.tools/node_modules/.bin/buf
[ -x "$buf" ] || buf=$(command -v buf) || { echo "check_api.sh: buf not found (bash scripts/install_tools.sh)" >&2; exit 2; }
"$buf" lint
"$buf" breaking protos --against api-baseline
echo "check_api.sh: buf lint and buf breaking passed"
