#!/usr/bin/env bash
# The service's tests under the oldest and the newest CPython the project supports (3.10, 3.13),
# each in its own virtual environment with only the serving dependencies (no torch): the test
# models are exported once with the main .venv. Pythons come from pyenv or PATH; a missing one
# is reported and skipped, unless SPKSERVE_REQUIRE_PYTHONS=1 (then it fails).
#   bash scripts/test_pythons.sh [3.10 3.13]
set -euo pipefail
cd "$(dirname "$0")/.."
versions=("${@:-3.10 3.13}")
read -r -a versions <<< "${versions[*]}"
tests=(tests/test_server.py tests/test_security.py tests/test_store.py tests/test_store_faults.py tests/test_batcher.py
       tests/test_audio_config.py tests/test_speech_rules.py tests/test_vad.py tests/test_scoring.py tests/test_fuzz.py
       tests/test_lifecycle.py tests/test_decision_rules.py tests/test_diarize.py tests/test_http_api.py
       tests/test_verify_stream.py tests/test_vad_stream.py tests/test_client.py tests/test_http_live.py)
repo=.cache/test-model-repo
rm -rf "$repo" && mkdir -p "$repo"
.venv/bin/python - "$repo" <<'PY'
import shutil, sys
from pathlib import Path
from tests.conftest import REPOSITORY, export_tiny
repo = Path(sys.argv[1])
shutil.copytree(REPOSITORY / "ge2e", repo / "ge2e")
export_tiny(repo, "tiny-wavlm")
export_tiny(repo, "tiny-nolen", with_lengths=False)
PY
find_python() {
  local v=$1 root
  if command -v pyenv >/dev/null; then
    root=$(pyenv root)
    for d in "$root"/versions/"$v".*; do [ -x "$d/bin/python$v" ] && { echo "$d/bin/python$v"; return; }; done
  fi
  command -v "python$v" || true
}
status=0
for v in "${versions[@]}"; do
  py=$(find_python "$v")
  if [ -z "$py" ]; then
    echo "test_pythons.sh: no CPython $v found (pyenv or PATH)" >&2
    [ "${SPKSERVE_REQUIRE_PYTHONS:-0}" = 1 ] && status=1
    continue
  fi
  venv=".venv-py$v"
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -e . pytest hypothesis requests
  echo "== service tests on $("$venv/bin/python" --version) =="
  # pytest.ini names a torch warning class to ignore; without torch that filter only warns
  SPKSERVE_TEST_MODEL_REPO="$PWD/$repo" "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    -W "ignore::pytest.PytestConfigWarning" "${tests[@]}" || status=1
done
exit $status
