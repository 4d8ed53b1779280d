#!/usr/bin/env bash
# Install the recorded TTS voices the corpus builder (training/data/corpus.py) uses, from Debian's
# archive: flite, festival with its voices in every language Debian packages (English, Catalan,
# Czech, Finnish, Italian, Russian, Hindi, Marathi, Telugu), espeak-ng, sox, and MBROLA with its
# voices (contrib/non-free: reached through an apt source list of our own, /etc is not edited).
#   bash scripts/install_voices.sh           # every festival and MBROLA voice (~750 MB)
#   bash scripts/install_voices.sh --small   # a few voices of each kind, for CI
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "install_voices.sh: needs root (apt-get)" >&2; exit 2; }
small=0; [ "${1:-}" = "--small" ] && small=1
tmp=$(mktemp -d)
uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
suite=$(awk '/^Suites:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
echo "deb ${uri:-http://deb.debian.org/debian} ${suite:-bookworm} main contrib non-free" > "$tmp/sources.list"
# wait up to 10 minutes for another apt or dpkg run to finish instead of failing on its lock
apt_opts=(-o "Dir::Etc::SourceList=$tmp/sources.list" -o "Dir::Etc::SourceParts=/dev/null" -o "DPkg::Lock::Timeout=600")
export DEBIAN_FRONTEND=noninteractive
# apt-get update does not wait for the lists lock (the Timeout above covers dpkg's lock only): retry while another
# apt run holds it
for try in $(seq 1 40); do
  err=$(apt-get -qq "${apt_opts[@]}" update 2>&1) && break
  if [ "$try" = 40 ] || ! grep -q "Could not get lock" <<< "$err"; then echo "$err" >&2; exit 1; fi
  sleep 15
done
festvox="festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts"
if [ "$small" = 1 ]; then  # sw2 is a reserved voice; italp16k reads Latin-1 text
  voices="mbrola-us1 mbrola-us2 mbrola-en1 mbrola-fr1 mbrola-sw2"
  festvox="$festvox festvox-italp16k"
else  # the festival voices training/data/corpus.py knows (FESTIVAL_VOICES)
  voices=$(apt-cache "${apt_opts[@]}" search '^mbrola-' | awk '{print $1}' | grep '^mbrola-' | tr '\n' ' ')
  festvox="$festvox festvox-ca-ona-hts festvox-czech-dita festvox-czech-krb festvox-czech-machac festvox-czech-ph
    festvox-suopuhe-lj festvox-suopuhe-mv festvox-italp16k festvox-itapc16k festvox-ru festvox-hi-nsk festvox-mr-nsk
    festvox-te-nsk"
fi
apt-get install -y -qq "${apt_opts[@]}" flite espeak-ng sox festival $festvox mbrola $voices >/dev/null
echo "install_voices.sh: installed flite, espeak-ng, sox, $(echo $festvox | wc -w) festival voices and $(echo $voices | wc -w) MBROLA voices"
