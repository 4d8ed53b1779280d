#!/usr/bin/env bash
# Command-line tools the API and metrics checks use, installed into .tools/ (no root needed):
#   buf      (npm @bufbuild/buf)          lint and breaking-change check of protos/
#   promtool (Debian's prometheus package) lint of the /metrics exposition
#   kubectl  (Debian's kubernetes-client, when none is installed) kustomize build of deploy/k8s
# Idempotent; a tool that cannot be fetched is reported and its checks skip.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p .tools
if [ ! -x .tools/node_modules/.bin/buf ]; then
  if command -v npm >/dev/null; then
    (cd .tools && npm install --silent --no-audit --no-fund --prefix . @bufbuild/buf@1 >/dev/null 2>&1) \
      || echo "install_tools.sh: could not install buf from npm; API checks will skip" >&2
  else
    echo "install_tools.sh: npm not found; API checks will skip" >&2
  fi
fi
if [ ! -x .tools/bin/promtool ]; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x" && mkdir -p .tools/bin && cp "$tmp/x/usr/bin/promtool" .tools/bin/
  else
    echo "install_tools.sh: could not download Debian's prometheus package; the promtool check will skip" >&2
  fi
  rm -rf "$tmp"
fi
if ! command -v kubectl >/dev/null && [ ! -x .tools/bin/kubectl ]; then
  tmp=$(mktemp -d)
  if (cd "$tmp" && apt-get download kubernetes-client >/dev/null 2>&1); then
    dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$tmp/x" && mkdir -p .tools/bin && cp "$tmp/x/usr/bin/kubectl" .tools/bin/
  else
    echo "install_tools.sh: could not download Debian's kubernetes-client; the manifest checks will skip" >&2
  fi
  rm -rf "$tmp"
fi
for tool in .tools/node_modules/.bin/buf .tools/bin/promtool .tools/bin/kubectl; do
  [ -x "$tool" ] && echo "install_tools.sh: have $tool"
done
exit 0  # a missing tool only makes its checks skip
