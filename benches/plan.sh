#!/usr/bin/env bash
# `kiln plan` against the memory it predicts: peak resident memory of each rank of a
# data-parallel `kiln train` run on the CPU (two processes on loopback), next to the plan's
# per-rank total for the same job, for several layouts. Prints one JSON line per layout and
# a Markdown table for RESULTS.md.
#
#   benches/plan.sh [PRESET=125m] [MICRO=4] [SEQ=256] [STEPS=3] [DP=2]
#
# Layouts: plain, ZeRO-1, ZeRO-1 with recomputation of the MLP half and of whole blocks
# (fp32), fully sharded (resharding after forward or keeping the gathered blocks, and with
# block recomputation), plain in bf16 (CPU
# autocast), tensor parallelism over all DP ranks (without and with block recomputation),
# and the `tiny` preset (which is mostly the runtime). PLAN_FROM=K starts at the K-th layout;
# PLAN_ONLY="name ..." runs only those.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
preset=${1:-125m} micro=${2:-4} seq=${3:-256} steps=${4:-3} dp=${5:-2}
scripts/setup.sh --no-build
kiln=${KILN_BIN:-target/release/kiln}
[[ -x $kiln ]] || cargo build --release --locked -q
data=$(scripts/shakespeare-data.sh "$kiln")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results=$work/results.jsonl
port=$((29500 + RANDOM % 2000))
# name preset sharding recompute precision tp (with tp = DP, the ranks form one tensor-parallel
# group); sharding: none, zero1, fsdp (blocks resharded after forward) or fsdp-kept (gathered
# blocks kept from forward to backward)
layouts=(
  "plain $preset none none fp32 1"
  "zero1 $preset zero1 none fp32 1"
  "zero1-mlp $preset zero1 mlp fp32 1"
  "zero1-block $preset zero1 block fp32 1"
  "fsdp $preset fsdp none fp32 1"
  "fsdp-kept $preset fsdp-kept none fp32 1"
  "fsdp-block $preset fsdp block fp32 1"
  "plain-bf16 $preset none none bf16 1"
  "tp$dp $preset none none fp32 $dp"
  "tp$dp-block $preset none block fp32 $dp"
  "tiny tiny none none fp32 1"
)
for row in "${layouts[@]:${PLAN_FROM:-0}}"; do
  read -r name p sharding ac precision tp <<< "$row"
  if [[ -n ${PLAN_ONLY:-} && " $PLAN_ONLY " != *" $name "* ]]; then continue; fi
  zero1=false fsdp=false reshard=true
  [[ $sharding == zero1 ]] && zero1=true
  [[ $sharding == fsdp* ]] && fsdp=true
  [[ $sharding == fsdp-kept ]] && reshard=false
  job=$work/$name.toml
  cat > "$job" <<EOF
name = "plan-$name"

[model]
preset = "$p"
vocab_size = 50257

[data]
path = "$KILN_ROOT/$data"

[train]
seq_len = $seq
batch_size = $((micro * dp / tp))
micro_batch_size = $micro
steps = $steps
device = "cpu"
precision = "$precision"
threads = 1
log_every = 1
eval_every = 0
activation_checkpointing = "$ac"

[parallel]
zero1 = $zero1
fsdp = $fsdp
reshard_after_forward = $reshard
tp = $tp

[checkpoint]
every = 0

[output]
dir = "$work/out-$name"
EOF
  port=$((port + dp + 1))
  pids=()
  for ((r = 0; r < dp; r++)); do
    MASTER_ADDR=127.0.0.1 MASTER_PORT=$port /usr/bin/time -f '%M' -o "$work/rss-$name-$r" \
      "$kiln" train "$job" --quiet --rank "$r" --world-size "$dp" >&2 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  "$kiln" plan "$job" --device cpu --devices "$dp" --memory 1TiB --json > "$work/plan-$name.json"
  python3 - "$name" "$work" "$dp" <<'PY' | tee -a "$results"
import json, sys
name, work, dp = sys.argv[1], sys.argv[2], int(sys.argv[3])
rss = [int(open(f"{work}/rss-{name}-{r}").read().split()[-1]) / 1024 for r in range(dp)]
plan = json.load(open(f"{work}/plan-{name}.json"))
m = plan["estimate"]["memory"]
mib = lambda b: round(b / 2**20)
print(json.dumps({
    "layout": name, "measured_peak_rss_mib": [round(x) for x in rss],
    "predicted_mib": mib(m["total"]),
    "error": round(mib(m["total"]) / max(rss) - 1, 4),
    "breakdown_mib": {k: mib(v) for k, v in m.items()},
}))
PY
done
python3 - "$results" "$preset" "$micro" "$seq" "$dp" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
preset, micro, seq, dp = sys.argv[2:]
print(f"\n`kiln plan` against peak RSS per rank, {preset} at dp {dp}, micro-batch {micro} x {seq} tokens, CPU:\n")
print("| layout | measured peak RSS per rank | `kiln plan` | error | of which activations (+ working set) |")
print("|---|---|---|---|---|")
for r in rows:
    b = r["breakdown_mib"]
    print(f"| {r['layout']} | {' / '.join(str(x) for x in r['measured_peak_rss_mib'])} MiB | {r['predicted_mib']} MiB | "
          f"{100 * r['error']:+.1f}% | {b['activations']} + {b['backward_working_set']} MiB |")
PY
