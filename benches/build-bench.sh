#!/usr/bin/env bash
# Builds the cargo bench target NAME (release profile) and prints its executable's path.
#
#   bench=$(benches/build-bench.sh NAME)
set -euo pipefail
name=${1:?usage: build-bench.sh NAME}
cargo bench --locked --bench "$name" --no-run -q >&2
cargo bench --locked --bench "$name" --no-run --message-format=json -q 2>/dev/null |
  python3 -c 'import sys, json
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == name:
        print(m["executable"])' "$name"
