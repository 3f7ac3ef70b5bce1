#!/usr/bin/env bash
# End to end on this host: the same Llama pre-training job run by `kiln local JOB --workers 2`
# (a coordinator and 2 workers, data-parallel over Kiln's TCP ring) and by plain PyTorch DDP
# with gloo under `torchrun --nproc-per-node 2` (benches/e2e_ddp.py), alternating ROUNDS
# times. Both start from the same seeded transformers LlamaForCausalLM, read the same samples
# of the Shakespeare shards in the same order (checked step by step against Kiln's ledger),
# and use AdamW with the same schedule, decay groups and clipping, in fp32 on the CPU, with
# the same threads per process. No evaluation, no checkpoints.
#
# Prints each run as a JSON line (steady-state tokens/s after the first SKIP steps, the mean
# step-time phases, peak resident memory of every process, the final loss and the mean of
# the last 10) and a Markdown row for RESULTS.md.
#
#   benches/e2e.sh [SIZE=demo] [STEPS=60] [ROUNDS=2]
#
# SYSTEMS (default "kiln ddp") picks what runs each round, in order: kiln (plain data
# parallelism), kiln-fsdp (the same job with `parallel.fsdp = true`), ddp, and fsdp2
# (PyTorch's `fully_shard` on every decoder layer and the root, gloo). With anything but
# "kiln ddp" the summary is one row per system against the first.
#
# SIZE: demo (jobs/shakespeare-demo.toml's shape: width 128, 4 layers, 7.2M parameters),
# wide (width 256, 8 layers, 8/4 heads, FFN 768: 19.2M) or 125m (the preset, 123.6M; slow on
# few cores). Environment: SKIP (default 10), BATCH (16), MICRO (8 per rank), SEQ (128),
# E2E_DIR (runs/e2e-SIZE: the runs' outputs and logs), E2E_DATA (runs/shakespeare/data,
# prepared from the plays when missing), KILN_BIN (target/release/kiln, built when missing).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
size=${1:-demo} steps=${2:-60} rounds=${3:-2}
skip=${SKIP:-10} batch=${BATCH:-16} micro=${MICRO:-8} seq=${SEQ:-128}
dir=${E2E_DIR:-runs/e2e-$size}
kiln=${KILN_BIN:-target/release/kiln}
workers=2
systems=${SYSTEMS:-kiln ddp}

if [ -x "$kiln" ]; then scripts/setup.sh --no-build; else scripts/setup.sh; fi
py=.venv/bin/python
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GLOO_SOCKET_IFNAME=lo

data=$(scripts/shakespeare-data.sh "$kiln" "${E2E_DATA:-runs/shakespeare/data}")

data=$(cd "$data" && pwd)
rm -rf "$dir"
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
"$py" benches/e2e_ddp.py init --size "$size" --out "$dir/init" >&2

# Kiln gives each of its training processes an even share of the cores; DDP gets the same.
threads=$(( $(nproc) / workers )); [ "$threads" -ge 1 ] || threads=1
cat > "$dir/job.toml" <<EOF
name = "e2e-$size"

[model]
init_from = "$dir/init"

[data]
path = "$data"

[train]
seq_len = $seq
batch_size = $batch
micro_batch_size = $micro
steps = $steps
seed = 1234
device = "cpu"
log_every = 1
eval_every = 0

[optimizer]
lr = 3e-3
warmup_steps = 20
schedule = "cosine"
min_lr_ratio = 0.1
weight_decay = 0.1
grad_clip = 1.0

[output]
dir = "KILN_OUT"
EOF

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
command="benches/e2e.sh $size $steps $rounds"
[[ $systems == "kiln ddp" ]] || command="SYSTEMS='$systems' $command"
[[ $batch == 16 && $micro == 8 ]] || command="BATCH=$batch MICRO=$micro $command"
"$py" - "$dir/meta.json" <<EOF
import json, sys
json.dump({"date": "$(date -u +%F)", "machine": "$(nproc)-core $cpu, $mem", "command": "$command",
           "size": "$size", "steps": $steps, "batch": $batch, "micro": $micro, "seq_len": $seq,
           "threads_per_process": $threads}, open(sys.argv[1], "w"))
EOF

for r in $(seq "$rounds"); do
  for system in $systems; do
    case $system in
      kiln | kiln-fsdp)
        sed "s|KILN_OUT|$dir/$system-r$r|" "$dir/job.toml" > "$dir/$system-r$r.toml"
        [[ $system == kiln-fsdp ]] && printf '\n[parallel]\nfsdp = true\n' >> "$dir/$system-r$r.toml"
        echo "==> round $r: $system: kiln local --workers $workers" >&2
        env -u OMP_NUM_THREADS "$py" benches/e2e_ddp.py measure --label "$system" \
          --out "$dir/$system-r$r.measure.json" --log "$dir/$system-r$r.log" -- \
          "$kiln" local "$dir/$system-r$r.toml" --workers "$workers"
        ;;
      ddp | fsdp2)
        flag=(); [[ $system == fsdp2 ]] && flag=(--fsdp)
        echo "==> round $r: $system: torchrun --nproc-per-node $workers (gloo)" >&2
        OMP_NUM_THREADS=$threads "$py" benches/e2e_ddp.py measure --label "$system" \
          --out "$dir/$system-r$r.measure.json" --log "$dir/$system-r$r.log" -- \
          .venv/bin/torchrun --standalone --nproc-per-node "$workers" \
          benches/e2e_ddp.py train --model "$dir/init" --data "$data" --out "$dir/$system-r$r.json" \
          --steps "$steps" --batch "$batch" --micro "$micro" --seq-len "$seq" "${flag[@]}"
        ;;
      *) echo "error: unknown system $system (kiln, kiln-fsdp, ddp, fsdp2)" >&2; exit 2 ;;
    esac
  done
done
"$py" benches/e2e_ddp.py summarize --dir "$dir" --skip "$skip" | tee "$dir/summary.txt"
