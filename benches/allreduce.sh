#!/usr/bin/env bash
# All-reduce bandwidth, Kiln's TCP ring against torch.distributed's gloo backend, on
# 127.0.0.1 in one run: for each world size, ROUNDS rounds alternating Kiln and gloo, each
# run WORLD processes (one per rank) on fresh ports. Prints every measurement as a JSON line
# and a Markdown table of the best bus bandwidth of the rounds per size.
#
#   benches/allreduce.sh [ROUNDS=3] [SIZES_MIB=1,4,16,64,256] [WORLDS="2 4"]
#
# ALLREDUCE_TARGET_S (default 1.5) is the time each size aims to take per run, and
# KILN_RING_SEGMENT_KB is passed through to Kiln. Any rank that fails stops the script.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
rounds=${1:-3} sizes=${2:-1,4,16,64,256} worlds=${3:-2 4}
bench=$(benches/build-bench.sh allreduce)
export GLOO_SOCKET_IFNAME=lo
work=$(mktemp -d)
results=$work/results.jsonl
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# run IMPL WORLD: one run of WORLD ranks; rank 0's JSON lines go to the results.
run() {
  local impl=$1 world=$2 ports peers r
  read -r -a ports <<<"$(free_ports "$world")"
  peers=$(printf '127.0.0.1:%s,' "${ports[@]}")
  peers=${peers%,}
  pids=()
  for ((r = 0; r < world; r++)); do
    if [[ $impl == kiln ]]; then
      timeout 600 "$bench" "$r" "$world" "$peers" "$sizes" >"$work/out.$r" 2>"$work/err.$r" &
    else
      timeout 600 python3 benches/allreduce_gloo.py "$r" "$world" "127.0.0.1:${ports[0]}" "$sizes" \
        >"$work/out.$r" 2>"$work/err.$r" &
    fi
    pids+=($!)
  done
  local codes=() failed=0 rc
  for ((r = 0; r < world; r++)); do
    rc=0
    wait "${pids[$r]}" || rc=$?
    codes+=("rank $r: exit $rc")
    if ((rc != 0 && !failed)); then
      failed=1
      # The others may wait on the failed rank; stop them.
      for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    fi
  done
  if ((failed)); then
    echo "FAILED: $impl, world $world (${codes[*]}; 124 = timed out, 137 = killed)" >&2
    for ((r = 0; r < world; r++)); do
      if [[ -s $work/err.$r ]]; then
        echo "--- rank $r stderr:" >&2
        tail -n 20 "$work/err.$r" >&2
      fi
    done
    exit 1
  fi
  pids=()
  if [[ ! -s $work/out.0 ]]; then
    echo "FAILED: $impl, world $world: rank 0 printed nothing" >&2
    exit 1
  fi
  tee -a "$results" <"$work/out.0"
}

start=$SECONDS
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
for world in $worlds; do
  for ((round = 1; round <= rounds; round++)); do
    run kiln "$world"
    run gloo "$world"
  done
done
echo "wall time: $((SECONDS - start)) s for the runs (build excluded); load average" \
  "before: $load_before, after: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores" >&2

python3 - "$results" "$rounds" "$sizes" "$(nproc)" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds, sizes, cores = int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
best = {}
for r in rows:
    key = (r["impl"], r["world"], r["bytes"])
    best[key] = max(best.get(key, 0.0), r["busbw_gbps"])
for impl in ("kiln", "gloo"):
    runs = {}
    for r in rows:
        if r["impl"] == impl:
            runs[(r["world"], r["bytes"])] = runs.get((r["world"], r["bytes"]), 0) + 1
    assert runs and all(c == rounds for c in runs.values()), f"missing {impl} results: {runs}"
seg = next((r["segment_kb"] for r in rows if r["impl"] == "kiln"), None)
print(f"\nBus bandwidth, best of {rounds} rounds per row (sizes {sizes} MiB of f32, "
      f"Kiln segment {seg} KiB, {rows[-1].get('torch', '')} gloo):\n")
print("| world | size MiB | Kiln busbw GB/s | gloo busbw GB/s | Kiln / gloo |")
print("|---|---|---|---|---|")
for world, nbytes in sorted({(w, b) for (_, w, b) in best}):
    k, g = best[("kiln", world, nbytes)], best[("gloo", world, nbytes)]
    mib = nbytes / (1 << 20)
    print(f"| {world} | {mib:g} | {k:.3f} | {g:.3f} | {k / g:.2f}x |")
over = sorted({w for (_, w, _) in best if w > cores})
if over:
    print(f"\nWorld size {', '.join(map(str, over))} runs more ranks than the {cores} cores: "
          "the processes are oversubscribed.")
PY
