#!/usr/bin/env bash
# Tokenizer throughput: Kiln's GPT-2 tokenizer (benches/tokenize.rs) against OpenAI's
# tiktoken and Hugging Face tokenizers through their Python bindings
# (benches/tokenize_peers.py), on the same documents in one run, each on 1 core and on all
# cores. All three use the vocabulary Kiln embeds: the bench writes its ranks out, tiktoken
# takes them with the r50k pattern, and a byte-level BPE tokenizer.json is built from them.
# Every peer's ids are checked against Kiln's, document by document.
#
# The text is the Shakespeare plays cut into documents of 40 paragraphs (as benches/loader.sh
# cuts them; about 1,000 documents of 5 kB), cycled until SIZE_MB megabytes.
#
# ROUNDS rounds, each one run of every tool on 1 core and on all cores, alternating, each
# run a fresh process timing one pass over the documents (its ids are checked in the first
# round). Prints every run as a JSON line, a table of the median tokens/s and MB/s, the
# ratios per core, a summary JSON line and a Markdown row for RESULTS.md. Fails when Kiln's
# ids on all cores differ from its ids on one.
#
#   benches/tokenize.sh [SIZE_MB=50] [ROUNDS=3]
#
# Environment: TOKENIZE_DIR (default: a temporary directory, removed at the end; the corpus,
# ranks, tokenizer.json, Kiln's ids and the results), TOKENIZE_BENCH (Kiln's side: an
# executable of benches/tokenize.rs, by default built here), BENCH_PROFILE (release; dev
# builds the bench unoptimized, as the test does).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
size=${1:-50} rounds=${2:-3}
scripts/setup.sh --no-build
py=.venv/bin/python
if [ -n "${TOKENIZE_DIR:-}" ]; then
  work=$TOKENIZE_DIR
  mkdir -p "$work"
else
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
fi
texts=$(scripts/fetch-shakespeare.sh)
"$py" - "$texts" "$size" "$work/corpus.jsonl" <<'PY'
import glob, json, sys
texts, size, out = sys.argv[1], float(sys.argv[2]) * 1e6, sys.argv[3]
docs = []
for play in sorted(glob.glob(f"{texts}/*_gut.txt")):
    paras = open(play, encoding="utf-8", errors="replace").read().split("\n\n")
    docs += ["\n\n".join(paras[i:i + 40]) for i in range(0, len(paras), 40)]
written = 0
with open(out, "w") as f:
    while written < size:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
            written += len(doc.encode("utf-8"))
            if written >= size:
                break
PY
bench=${TOKENIZE_BENCH:-$(benches/build-bench.sh tokenize)}
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
"$py" -c 'import json, sys; json.dump(dict(date=sys.argv[2], machine=sys.argv[3]), open(sys.argv[1], "w"))' \
  "$work/meta.json" "$(date -u +%F)" "$(nproc)-core $cpu, $mem"

"$bench" --write-ranks "$work/r50k_base.tiktoken"
"$py" benches/tokenize_peers.py build "$work/r50k_base.tiktoken" "$work" >&2
results=$work/results.jsonl
: > "$results"
for round in $(seq "$rounds"); do
  for threads in $(printf '%s\n' 1 "$(nproc)" | sort -nu); do
    if [ "$round" = 1 ]; then
      "$bench" "$work/corpus.jsonl" "$threads" 1 "$work/kiln-$threads.ids" | tee -a "$results"
      if ! cmp -s "$work/kiln-1.ids" "$work/kiln-$threads.ids"; then
        echo "error: Kiln's ids on $threads threads differ from its ids on one" >&2
        exit 1
      fi
      ids=$work/kiln-1.ids
    else
      "$bench" "$work/corpus.jsonl" "$threads" 1 | tee -a "$results"
      ids=-
    fi
    for tool in tiktoken hf; do
      "$py" benches/tokenize_peers.py measure "$tool" "$threads" "$work/corpus.jsonl" \
        "$work/r50k_base.tiktoken" "$work/tokenizer.json" "$ids" | tee -a "$results"
    done
  done
done
"$py" benches/tokenize_peers.py summarize "$results" "benches/tokenize.sh${*:+ $*}"
