#!/usr/bin/env bash
# Starts Azurite (Azure's blob storage emulator, from the npm registry, installed into
# .cache/azurite on first use) on 127.0.0.1:10000 with a container `kiln-test`, and prints
# `export` lines for the tests' environment. Its PID goes to $1 (stop it with kill).
#
#   eval "$(scripts/azurite.sh /tmp/azurite.pid)"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
pidfile=${1:?usage: azurite.sh PIDFILE}
bin="$KILN_ROOT/.cache/azurite/node_modules/.bin/azurite-blob"
if [ ! -x "$bin" ]; then
  command -v npm >/dev/null || { echo "error: npm not found; Azurite needs Node.js 20" >&2; exit 1; }
  npm install --silent --no-audit --no-fund --prefix "$KILN_ROOT/.cache/azurite" azurite@3.35.0 >&2
fi
dir=$(mktemp -d)
setsid "$bin" --blobHost 127.0.0.1 --blobPort 10000 --location "$dir" --silent \
  --skipApiVersionCheck >"$dir/azurite.log" 2>&1 &
echo $! >"$pidfile"
for _ in $(seq 60); do
  if python3 "$KILN_ROOT/scripts/azurite_container.py" http://127.0.0.1:10000 kiln-test 2>/dev/null; then
    echo "export KILN_TEST_AZURITE=1"
    exit 0
  fi
  sleep 0.5
done
echo "error: Azurite did not come up; its log:" >&2
cat "$dir/azurite.log" >&2
exit 1
