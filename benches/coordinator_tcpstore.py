"""The peer of benches/coordinator/main.rs's rendezvous: a barrier of N clients on PyTorch's
TCPStore (the store under torch.distributed's env:// and c10d elastic rendezvous), in one
process on 127.0.0.1, one thread per client, each its own connection (libuv server).

Each client, once all are connected and a start event fires: sets its address under
`addr/RANK`, `add`s one to `arrived` (the one that brings it to N sets `go`), waits for `go`
(the barrier), then reads every client's address with one `multi_get` (the peer list, as
Kiln's `Run` assignment carries it). Reported: the time from the start event until every
client is past the barrier, and until every client has the peer list; median of ROUNDS
rounds, each on a fresh store. Prints one JSON line.

    python benches/coordinator_tcpstore.py [N=1000] [ROUNDS=3]

Unlike Kiln's coordinator there is no heartbeat interval: TCPStore pushes to waiters, so
this is the cost of the fan-in and fan-out alone, with no job validation, no state written
and no assignments decided.
"""

import json
import statistics
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist


def one_round(n):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=120))
    port = server.port
    connected = threading.Barrier(n + 1)
    start = threading.Event()
    passed = [0.0] * n
    peers = [0.0] * n
    errors = []

    def client(rank):
        try:
            store = dist.TCPStore("127.0.0.1", port, is_master=False,
                                  timeout=timedelta(seconds=120))
            keys = [f"addr/{r}" for r in range(n)]
            connected.wait()
            start.wait()
            store.set(f"addr/{rank}", f"127.0.0.1:{10000 + rank}")
            if store.add("arrived", 1) == n:
                store.set("go", "1")
            store.wait(["go"])
            passed[rank] = time.perf_counter()
            got = store.multi_get(keys)
            peers[rank] = time.perf_counter()
            if len(got) != n:
                errors.append(f"rank {rank}: {len(got)} addresses")
            # Keep the connection until every client is done, as Kiln's workers keep theirs.
            connected.wait()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"rank {rank}: {e}")
            connected.abort()

    threads = [threading.Thread(target=client, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    connected.wait()
    t0 = time.perf_counter()
    start.set()
    try:
        connected.wait()
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"TCPStore barrier failed: {errors[:3]}")
    del server
    return max(passed) - t0, max(peers) - t0


def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    barrier, peers = [], []
    for _ in range(rounds):
        b, p = one_round(n)
        barrier.append(b)
        peers.append(p)
        time.sleep(0.5)
    print(json.dumps({
        "system": "tcpstore",
        "torch": torch.__version__,
        "workers": n,
        "rounds": rounds,
        "barrier_s": barrier,
        "peer_list_s": peers,
        "median_barrier_s": statistics.median(barrier),
        "median_peer_list_s": statistics.median(peers),
    }))


if __name__ == "__main__":
    main()
