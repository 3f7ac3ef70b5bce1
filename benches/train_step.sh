#!/usr/bin/env bash
# One training step, Kiln against plain PyTorch, same shapes, batch and threads, alternating
# ROUNDS times in one run. Prints each measurement and a Markdown row for RESULTS.md.
#
#   benches/train_step.sh [PRESET=125m] [BATCH=4] [SEQ=256] [STEPS=5] [THREADS=2] [ROUNDS=2] [PRECISION=fp32]
#
# PRESET may be `demo` (the shape of jobs/shakespeare-demo.toml); PRECISION is fp32 or bf16
# (CPU autocast for both systems).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
preset=${1:-125m} batch=${2:-4} seq=${3:-256} steps=${4:-5} threads=${5:-2} rounds=${6:-2} precision=${7:-fp32}
scripts/setup.sh --no-build
bench=$(benches/build-bench.sh train_step)
results=$(mktemp)
for r in $(seq "$rounds"); do
  "$bench" "$preset" "$batch" "$seq" "$steps" "$threads" "$precision" | tee -a "$results"
  python3 benches/train_step_torch.py "$preset" "$batch" "$seq" "$steps" "$threads" "$precision" | tee -a "$results"
done
python3 - "$results" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {s: min(r["median_step_s"] for r in rows if r["system"] == s) for s in ("kiln", "pytorch")}
mem = {s: max(r.get("peak_rss_mib", 0) for r in rows if r["system"] == s) for s in ("kiln", "pytorch")}
r = rows[0]
print(f"| {r['preset']} | {r.get('precision', 'fp32')} | {r['batch']}x{r['seq']} | {r['threads']} | "
      f"{best['kiln']:.3f} s | {best['pytorch']:.3f} s | {best['pytorch'] / best['kiln']:.2f}x | "
      f"{mem['kiln']} / {mem['pytorch']} MiB |")
PY
