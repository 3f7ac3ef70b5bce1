#!/usr/bin/env bash
# Goodput under failures on this host (benches/goodput.py): the demo model's shape trained by
# a coordinator and 2 worker processes, uninterrupted, then with a random training rank
# SIGKILLed every T seconds, then with the coordinator SIGKILLed (and restarted) every T
# seconds; effective training time, steps redone, failure to first step and whether the loss
# curve is the uninterrupted one. Then the projection at 16,384 GPUs
# (benches/goodput_projection.py) from the measured recovery.
#
#   benches/goodput.sh [RUNS=rank:60,rank:20,coordinator:20] [STEPS=120] [EVERY=10] [MEMORY_EVERY=0]
#
# EVERY is checkpoint.every (the store); MEMORY_EVERY is checkpoint.memory_every (snapshots in
# the workers' memory, 0: none).
#
# Environment: KILN_BIN (target/release/kiln, built when missing), GOODPUT_DIR
# (runs/goodput), GOODPUT_DATA (runs/shakespeare/data, prepared from the plays when missing).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
runs=${1:-rank:60,rank:20,coordinator:20} steps=${2:-120} every=${3:-10} memory_every=${4:-0}
dir=${GOODPUT_DIR:-runs/goodput}
kiln=${KILN_BIN:-target/release/kiln}
if [ ! -x "$kiln" ]; then scripts/setup.sh; fi
data=$(scripts/shakespeare-data.sh "$kiln" "${GOODPUT_DATA:-runs/shakespeare/data}")
mkdir -p "$dir"
echo "$(date -u +%F) $(nproc)-core $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'): benches/goodput.sh $runs $steps $every $memory_every"
python3 benches/goodput.py --kiln "$kiln" --data "$data" --out "$dir" --steps "$steps" \
  --every "$every" --memory-every "$memory_every" --runs "$runs" --json "$dir/results.json"
echo
python3 benches/goodput_projection.py --from "$dir/results.json"
