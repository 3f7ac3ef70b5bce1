"""The peer of benches/allreduce.rs: the same all-reduce (sum) of CPU f32 tensors through
torch.distributed's gloo backend, measured the same way. One process is one rank; rank 0
prints one JSON line per size.

  allreduce_gloo.py RANK WORLD MASTER_HOST:PORT [SIZES_MIB=1,4,16,64,256] [ITERS=auto]

Per size: one warm-up all-reduce, then ITERS timed ones; by default as many as fill
ALLREDUCE_TARGET_S (1.5 s) at the warm-up's pace, at least 3. Every rank fills its tensor
with rank + 1 before each all-reduce and the ranks pass a barrier before the clock starts;
the result (n (n + 1) / 2 everywhere, exact) is checked after the warm-up and after the last
timed all-reduce. The time of an iteration is the slowest rank's; the reported time is the
median over iterations.
"""
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

USAGE = "usage: allreduce_gloo.py RANK WORLD MASTER_HOST:PORT [SIZES_MIB] [ITERS]"
if len(sys.argv) < 4:
    sys.exit(USAGE)
rank, world, master = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
sizes = [float(s) for s in (sys.argv[4] if len(sys.argv) > 4 else "1,4,16,64,256").split(",")]
fixed_iters = int(sys.argv[5]) if len(sys.argv) > 5 else 0
target_s = float(os.environ.get("ALLREDUCE_TARGET_S", "1.5"))
torch.set_num_threads(1)

dist.init_process_group("gloo", init_method=f"tcp://{master}", rank=rank, world_size=world,
                        timeout=datetime.timedelta(seconds=120))


def slowest(times):
    """Every rank's times reduced to the element-wise maximum over ranks."""
    t = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


fill = float(rank + 1)
expected = float(world * (world + 1) // 2)
for mib in sizes:
    numel = max(int(mib * (1 << 20)) // 4, 1)
    nbytes = numel * 4
    t = torch.empty(numel, dtype=torch.float32)

    def timed():
        t.fill_(fill)
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return time.perf_counter() - start

    def check(when):
        wrong = int((t != expected).sum())
        assert wrong == 0, (f"rank {rank}: {wrong} of {numel} elements differ from {expected} "
                            f"after the {when} all-reduce of {nbytes} bytes")

    warm = slowest([timed()])[0]
    check("warm-up")
    iters = fixed_iters if fixed_iters > 0 else min(max(math.ceil(target_s / warm), 3), 100_000)
    times = [timed() for _ in range(iters)]
    check("last timed")
    times = sorted(slowest(times))
    elapsed = times[len(times) // 2]
    if rank == 0:
        n = world
        algbw = nbytes / elapsed / 1e9
        print(json.dumps({"impl": "gloo", "world": world, "bytes": nbytes, "iters": iters,
                          "time_s": round(elapsed, 6), "algbw_gbps": round(algbw, 4),
                          "busbw_gbps": round(2 * (n - 1) / n * algbw, 4),
                          "torch": torch.__version__}), flush=True)

dist.destroy_process_group()
