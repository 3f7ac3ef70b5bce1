#!/usr/bin/env bash
# Checkpoint save and load of one preset's training state (fp32 parameters + AdamW state),
# Kiln's sharded checkpoint (benches/checkpoint.rs) against torch.distributed.checkpoint
# (benches/checkpoint_dcp.py), to a fresh local directory under DIR, alternating ROUNDS
# times in one run. Each run makes SAVES saves per mode and reports the best. Prints each
# measurement as a JSON line and a Markdown table row of the best of the rounds.
#
#   benches/checkpoint.sh [PRESET=125m] [ROUNDS=2] [SAVES=2] [THREADS=2] [DIR=/tmp/kiln-ckpt-bench] [HOST_MB=0] [OVERLAP_SEQ=0]
#
# HOST_MB is Kiln's host budget for a save (0: Kiln's default). With OVERLAP_SEQ > 0 Kiln's
# asynchronous pause is measured with one forward and backward pass of 1 x OVERLAP_SEQ tokens
# between the save and the optimizer's fence, as in training.
#
# Both sides write the page cache's dirty pages out (`sync`, untimed) before each save and
# load, so that no save pays for an earlier one's writeback. Kiln's writes are not fsynced;
# DCP's writer fsyncs each file (its default), and one DCP save without fsync is printed for
# comparison. The files of a save stay in the page cache, so the loads read from memory where
# it holds them.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
preset=${1:-125m} rounds=${2:-2} saves=${3:-2} threads=${4:-2} dir=${5:-/tmp/kiln-ckpt-bench}
host_mb=${6:-0} overlap=${7:-0}
bench=$(benches/build-bench.sh checkpoint)
work=$(mktemp -d)
results=$work/results.jsonl
cleanup() { rm -rf "$work" "$dir"; }
trap cleanup EXIT

status() {
  echo "[$(date -u +%H:%M:%S)] $1: load $(cut -d' ' -f1-3 /proc/loadavg)," \
    "$(awk '/MemAvailable/ {printf "%.1f", $2 / 1048576}' /proc/meminfo) GiB available," \
    "$(df -BG --output=avail "$(dirname "$dir")" | tail -1 | tr -d ' ') free" >&2
}

start=$SECONDS
for ((round = 1; round <= rounds; round++)); do
  sync
  status "round $round, kiln"
  "$bench" "$preset" "$dir/kiln" "$saves" "$threads" "$host_mb" "$overlap" | tee -a "$results"
  sync
  status "round $round, dcp"
  python3 benches/checkpoint_dcp.py "$preset" "$dir/dcp" "$saves" "$threads" | tee -a "$results"
  rm -rf "$dir"
done
status "done in $((SECONDS - start)) s"

python3 - "$results" "$rounds" "$saves" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rounds, saves = int(sys.argv[2]), int(sys.argv[3])
kiln = [r for r in rows if r["system"] == "kiln"]
dcp = [r for r in rows if r["system"] == "dcp"]
assert len(kiln) == rounds and len(dcp) == rounds, "missing results"
assert kiln[0]["params"] == dcp[0]["params"], (kiln[0]["params"], dcp[0]["params"])

def best(rs, key):
    vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
    return min(vals) if vals else None

def s(v):
    return "n/a" if v is None else f"{v:.2f} s"

state = kiln[0]["state_bytes"]
k_async_block, k_async = best(kiln, "async_blocking_s"), best(kiln, "async_total_s")
k_sync, k_load = best(kiln, "sync_total_s"), best(kiln, "load_s")
d_save, d_load = best(dcp, "save_s"), best(dcp, "load_s")
d_async_block, d_async = best(dcp, "async_blocking_s"), best(dcp, "async_total_s")
d_nosync = best(dcp, "save_nosync_s")
k_gbps, d_gbps = state / k_sync / 1e9, state / d_save / 1e9
print(f"\nBest of {rounds} rounds x {saves} saves per mode; {kiln[0]['params']:,} parameters, "
      f"state {state / 1e9:.2f} GB; on disk: Kiln {kiln[0]['disk_bytes'] / 1e9:.2f} GB, "
      f"DCP {dcp[0]['disk_bytes'] / 1e9:.2f} GB; {dcp[0]['torch']}.")
hb = kiln[0]['host_mb']
print(f"Kiln host budget {f'{hb} MB' if hb else 'the whole state'}; "
      f"Kiln async save {state / k_async / 1e9:.2f} GB/s to commit; DCP save without fsync "
      f"{s(d_nosync)}; DCP async total {s(d_async)}; DCP async: {dcp[0].get('async', 'ran')}.")
def peak(rs, key):
    vals = [r[key] for r in rs if isinstance(r.get(key), (int, float))]
    return f"{max(vals):.1f}" if vals else "n/a"

print(f"Peak resident memory, GB (before the saves: Kiln {kiln[0]['rss_before_gb']:.1f}, DCP "
      f"{dcp[0]['rss_before_gb']:.1f}): Kiln async {peak(kiln, 'peak_rss_async_gb')}, sync "
      f"{peak(kiln, 'peak_rss_sync_gb')}, load {peak(kiln, 'peak_rss_load_gb')}; DCP save "
      f"{peak(dcp, 'peak_rss_save_gb')}, async {peak(dcp, 'peak_rss_async_gb')}, load "
      f"{peak(dcp, 'peak_rss_load_gb')}.")
for r in kiln:
    if r.get("load"):
        print(f"Kiln load: {r['load']}")
print()
print("| preset | state GB | Kiln async blocking pause | Kiln async total | Kiln sync total | "
      "DCP save | DCP async blocking | Kiln save GB/s | DCP save GB/s | Kiln / DCP | "
      "Kiln load | DCP load |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
print(f"| {kiln[0]['preset']} | {state / 1e9:.2f} | {s(k_async_block)} | {s(k_async)} | "
      f"{s(k_sync)} | {s(d_save)} | {s(d_async_block)} | {k_gbps:.2f} | {d_gbps:.2f} | "
      f"{k_gbps / d_gbps:.2f}x | {s(k_load)} | {s(d_load)} |")
PY
