#!/usr/bin/env bash
# Install the recorded TTS voices the corpus builder (training/corpus.py) uses, from Debian's
# archive: flite, festival with its voices, espeak-ng, sox, and MBROLA with its voices
# (contrib/non-free: reached through an apt source list of our own, /etc is not edited).
#   bash scripts/install_voices.sh           # every MBROLA voice (~600 MB)
#   bash scripts/install_voices.sh --small   # three MBROLA voices, for CI
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install_voices.sh: needs root (apt-get)" >&2; exit 2; }
small=0; [ "${1:-}" = "--small" ] && small=1
tmp=$(mktemp -d)
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
suite=$(awk '/^Suites:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
echo "deb ${uri:-http://deb.debian.org/debian} ${suite:-bookworm} main contrib non-free" > "$tmp/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=/dev/null")
export DEBIAN_FRONTEND=noninteractive
apt-get -qq "${apt_opts[@]}" update
if [ "$small" = 1 ]; then
  voices="mbrola-us1 mbrola-us2 mbrola-en1 mbrola-fr1"
else
  voices=$(apt-cache "${apt_opts[@]}" search '^mbrola-' | awk '{print $1}' | grep '^mbrola-' | tr '\n' ' ')
fi
apt-get install -y -qq "${apt_opts[@]}" flite espeak-ng sox festival festvox-kallpc16k festvox-kdlpc16k \
  festvox-us-slt-hts mbrola $voices >/dev/null
echo "install_voices.sh: installed flite, festival voices, espeak-ng, sox, mbrola and $(echo $voices | wc -w) MBROLA voices"
