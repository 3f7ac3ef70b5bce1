#!/usr/bin/env bash
# The coordinator under load on 127.0.0.1 (benches/coordinator/main.rs): a coordinator on its own
# 2-thread tokio runtime and thousands of simulated workers on another runtime of the same
# process, over a few shared HTTP/2 connections. Measures heartbeat throughput (back to
# back) and latency (every heartbeat interval, as the agents send them) for each worker
# count, idle and running one job of all of them, then the rendezvous of a job over 1,000
# workers at heartbeat intervals of 1 s and 200 ms. Prints Markdown tables; with
# KILN_BENCH_OUT=PATH the results are also written there as JSON.
#
#   benches/coordinator.sh [--workers 1000,2000,4000] [--connections 32] [--window 10]
#       [--warmup 3] [--modes idle,running] [--rendezvous-workers 1000]
#       [--rendezvous-intervals 1000,200] [--rounds 3] [--client-threads 2]
#       [--skip-heartbeat] [--skip-rendezvous]
#       [--lifecycle-workers 4000,16384] [--lifecycle-hold-ms 1000,0] [--lifecycle-poll-ms 100]
#       [--lifecycle-per-host 1,8] [--lifecycle-settle-s 3] [--machine-workers 4000,16384,65536]
#       [--skip-lifecycle]
#
# The lifecycle part (benches/coordinator/lifecycle.rs) times a job's bring-up, a checkpoint
# commit and the recovery from a failed rank over simulated workers in hosts of
# --lifecycle-per-host (one heartbeat call carries a host's workers).
#
# The peer (benches/coordinator_tcpstore.py): the same number of clients through a barrier on
# torch.distributed's TCPStore, then each reading every client's address (the peer list
# Kiln's assignment carries), ROUNDS rounds as the rendezvous; COORDINATOR_PEER=0 skips it.
#
# Needs no libtorch (the peer needs the repository's torch). Every simulated worker shares
# one of the --connections connections, so Kiln's part opens few sockets; the peer opens one
# per client (about 2 x 1,000), hence the ulimit check.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
if (($(ulimit -n) < 4096)); then
  echo "ulimit -n is $(ulimit -n); raise it to at least 4096" >&2
  exit 1
fi
out=${KILN_BENCH_OUT:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cargo bench --locked -p kiln-coordinator --bench coordinator --no-run -q >&2
start=$SECONDS
load_before=$(cut -d' ' -f1-3 /proc/loadavg)
KILN_BENCH_OUT=$work/kiln.json cargo bench --locked -q -p kiln-coordinator --bench coordinator -- "$@"
if [[ ${COORDINATOR_PEER:-1} != 0 ]]; then
  python3 - "$work/kiln.json" <<'PY' | while read -r n rounds; do
import json, sys
rows = json.load(open(sys.argv[1]))["rendezvous"]
for n in sorted({r["workers"] for r in rows}):
    per = [r for r in rows if r["workers"] == n]
    print(n, len(per) // len({r["heartbeat_interval_ms"] for r in per}))
PY
    echo "[$(date -u +%H:%M:%S)] TCPStore barrier, $n clients, $rounds rounds" >&2
    TORCH_CPP_LOG_LEVEL=ERROR python3 benches/coordinator_tcpstore.py "$n" "$rounds" |
      tee -a "$work/tcpstore.jsonl" >&2
  done
fi
echo "wall time: $((SECONDS - start)) s (build excluded); load average before: $load_before," \
  "after: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores" >&2

python3 - "$work/kiln.json" "$work/tcpstore.jsonl" "$out" <<'PY'
import json, os, statistics, sys
kiln = json.load(open(sys.argv[1]))
peer = [json.loads(l) for l in open(sys.argv[2])] if os.path.exists(sys.argv[2]) else []
kiln["tcpstore"] = peer
if sys.argv[3]:
    with open(sys.argv[3], "w") as f:
        json.dump(kiln, f, indent=2)
if peer:
    print("\nRendezvous against TCPStore (median of the rounds): Kiln from the Submit call until "
          "every worker has its Run assignment (with the peer list), at each heartbeat "
          f"interval; TCPStore ({peer[0]['torch']}) from the start until every client is past "
          "an add/wait barrier, and until every client has read all addresses.\n")
    print("| workers | Kiln, by interval | TCPStore barrier | TCPStore barrier + peer list |")
    print("|---|---|---|---|")
    for p in peer:
        rows = [r for r in kiln["rendezvous"] if r["workers"] == p["workers"]]
        by = {}
        for r in rows:
            by.setdefault(r["heartbeat_interval_ms"], []).append(r["all_run_s"])
        cells = ", ".join(f"{statistics.median(v):.3f} s at {ms} ms" for ms, v in by.items())
        print(f"| {p['workers']} | {cells} | {p['median_barrier_s']:.3f} s | "
              f"{p['median_peer_list_s']:.3f} s |")
PY
