#!/usr/bin/env bash
# Loader throughput, Kiln's streaming loader against pyarrow decoding the same shards, from
# the local disk and from SeaweedFS (S3) started here, in one run. The dataset is the
# Shakespeare plays cut into paragraph-group documents and repeated REPEAT times.
#
#   benches/loader.sh [REPEAT=20] [SEQ_LEN=2048]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
repeat=${1:-20} seq=${2:-2048}
scripts/setup.sh
kiln=target/release/kiln
work=$(mktemp -d)
texts=$(scripts/fetch-shakespeare.sh)
python3 - "$texts" "$repeat" "$work/corpus.jsonl" <<'PY'
import glob, json, sys
texts, repeat, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(out, "w") as f:
    for r in range(repeat):
        for play in sorted(glob.glob(f"{texts}/*_gut.txt")):
            paras = open(play, encoding="utf-8", errors="replace").read().split("\n\n")
            for i in range(0, len(paras), 40):
                f.write(json.dumps({"text": "\n\n".join(paras[i:i + 40])}) + "\n")
PY
"$kiln" prepare "$work/corpus.jsonl" -o "$work/data" --val-fraction 0.01 --shard-tokens 8000000 >&2
bench=$(benches/build-bench.sh loader)
pidfile=$(mktemp)
trap 'kill -- -$(cat "$pidfile") 2>/dev/null || true' EXIT
eval "$(KILN_BIN=$kiln scripts/seaweedfs.sh "$pidfile")"
export AWS_ENDPOINT=$KILN_TEST_S3_ENDPOINT AWS_ALLOW_HTTP=true AWS_ACCESS_KEY_ID=AK AWS_SECRET_ACCESS_KEY=SK
"$kiln" prepare "$work/corpus.jsonl" -o s3://kiln-test/bench --val-fraction 0.01 --shard-tokens 8000000 --force >&2
for source in "$work/data" s3://kiln-test/bench; do
  "$bench" "$source" "$seq" 64
  python3 benches/loader_pyarrow.py "$source" 1
  python3 benches/loader_pyarrow.py "$source" 2
done
rm -rf "$work"
