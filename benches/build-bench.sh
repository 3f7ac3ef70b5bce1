#!/usr/bin/env bash
# Builds the cargo bench target NAME and prints its executable's path: the release profile,
# or with BENCH_PROFILE=dev an unoptimized build that reuses the test build's dependencies.
#
#   bench=$(benches/build-bench.sh NAME)
set -euo pipefail
name=${1:?usage: build-bench.sh NAME}
if [ "${BENCH_PROFILE:-release}" = dev ]; then
  build=(cargo build --locked --bench "$name")
else
  build=(cargo bench --locked --bench "$name" --no-run)
fi
"${build[@]}" -q >&2
"${build[@]}" --message-format=json -q 2>/dev/null |
  python3 -c 'import sys, json
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == name:
        print(m["executable"])' "$name"
