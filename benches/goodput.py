"""Goodput under failures: a real CPU job through a coordinator and 2 worker processes on this
host, once uninterrupted and once per chaos setting, where a driver SIGKILLs a random
training rank (or the coordinator, restarted at once on the same state and port) every T
seconds. Reports, per run:

- effective training time: the seconds of the steps that count (for each step of the final
  loss curve, its last execution's step time) over the wall time from Submit to completion;
- steps redone: step executions beyond one per step;
- failure to first step: from each kill to the first step completed after it by a resumed
  generation (rank kills) or by the job (coordinator kills), p50 and max;
- whether the final loss curve equals the uninterrupted run's bit for bit.

    python3 benches/goodput.py --kiln target/release/kiln --data runs/shakespeare/data \\
        --out runs/goodput --steps 120 --every 10 --runs rank:60,rank:20,coordinator:20

Prints a JSON line per run and a Markdown table; `--json PATH` keeps them.
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

JOB = """name = "goodput"

[model]
preset = "tiny"
dim = 128
n_layers = 4
n_heads = 4
n_kv_heads = 2
ffn_dim = 384
max_seq_len = 256

[data]
path = "{data}"

[train]
seq_len = 128
batch_size = 16
micro_batch_size = 8
steps = {steps}
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

[checkpoint]
every = {every}
memory_every = {memory_every}

[output]
dir = "{out}"
"""


class Cluster:
    """A coordinator and 2 workers, as separate processes."""

    def __init__(self, kiln, work, heartbeat_timeout, max_restarts):
        self.kiln, self.work = kiln, work
        self.token = "goodput-token"
        self.env = dict(os.environ, KILN_TOKEN=self.token, OMP_NUM_THREADS="1")
        self.heartbeat_timeout, self.max_restarts = heartbeat_timeout, max_restarts
        self.listen = "127.0.0.1:0"
        self.coordinator = None
        self.workers = []
        self.start_coordinator()
        for i in range(2):
            log = open(work / f"worker-{i}.log", "w")
            self.workers.append(subprocess.Popen(
                [kiln, "worker", "--coordinator", self.url, "--host", "127.0.0.1",
                 "--name", f"worker {i}", "--work-dir", str(work / f"work-{i}")],
                env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def start_coordinator(self):
        log_path = self.work / "coordinator.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log = open(log_path, "a")
        self.coordinator = subprocess.Popen(
            [self.kiln, "coordinator", "--listen", self.listen, "--state",
             str(self.work / "state"), "--heartbeat-timeout-s", str(self.heartbeat_timeout),
             "--max-restarts", str(self.max_restarts)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            text = log_path.read_text()[offset:]
            m = re.search(r"listening on (\S+?);", text)
            if m:
                self.listen = m.group(1)
                self.url = f"http://{self.listen}"
                return
            if self.coordinator.poll() is not None:
                sys.exit(f"the coordinator exited:\n{text}")
            time.sleep(0.05)
        sys.exit("the coordinator did not say where it listens")

    def kiln_cmd(self, *args):
        return subprocess.run([self.kiln, *args, "--coordinator", self.url],
                              env=self.env, capture_output=True, text=True)

    def worker_cpu_s(self):
        """CPU seconds of the worker processes and of their training processes, which have
        all exited and been waited for by now (utime, stime, cutime, cstime)."""
        total = 0
        for p in self.workers:
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(f) for f in fields[11:15])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self):
        for p in self.workers + [self.coordinator]:
            p.terminate()
        for p in self.workers + [self.coordinator]:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def ranks_of(job_id):
    """The pids of the job's training processes (their job file is JOB-gG-rR.toml)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"train" in cmd and any(f"{job_id}-g".encode() in a for a in cmd):
            pids.append(int(d.name))
    return pids


class Tail:
    """Follows metrics.jsonl, which rank 0 rewrites at a resume (dropping the steps after the
    checkpoint): every line seen, in the order first seen, redone steps included."""

    def __init__(self, path):
        self.path, self.lines, self.events = path, [], []

    def poll(self):
        try:
            lines = self.path.read_bytes().split(b"\n")[:-1]
        except FileNotFoundError:
            return
        same = 0
        while same < min(len(lines), len(self.lines)) and lines[same] == self.lines[same]:
            same += 1
        for line in lines[same:]:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            self.events.append((time.time(), e.get("type"), e))
        self.lines = lines


def run(args, label, target, interval):
    work = args.out / label
    subprocess.run(["rm", "-rf", str(work)], check=True)
    work.mkdir(parents=True)
    job = work / "job.toml"
    job.write_text(JOB.format(data=args.data, steps=args.steps, every=args.every,
                              memory_every=args.memory_every, out=work / "out"))
    tail = Tail(work / "out" / "metrics.jsonl")
    cluster = Cluster(args.kiln, work, args.heartbeat_timeout, args.max_restarts)
    t0 = time.time()
    sub = cluster.kiln_cmd("submit", str(job), "--workers", "2")
    if sub.returncode != 0:
        cluster.stop()
        sys.exit(f"submit failed: {sub.stderr}")
    job_id = sub.stdout.split()[0]
    kills = []
    rng = random.Random(args.seed)
    first_step = None
    next_kill = None
    phase, last_status = "", 0.0
    while True:
        time.sleep(0.1)
        tail.poll()
        now = time.time()
        if first_step is None and any(k == "step" for _, k, _ in tail.events):
            first_step = now
            next_kill = now + interval
        if target != "none" and next_kill is not None and now >= next_kill:
            next_kill = now + interval
            index = len(tail.events)
            if target == "rank":
                pids = ranks_of(job_id)
                if pids:
                    victim = rng.choice(pids)
                    try:
                        os.kill(victim, signal.SIGKILL)
                        kills.append({"t": now, "index": index, "what": f"pid {victim}"})
                    except ProcessLookupError:
                        pass
            else:
                cluster.coordinator.kill()
                cluster.coordinator.wait()
                kills.append({"t": time.time(), "index": index, "what": "coordinator"})
                cluster.start_coordinator()
        if now - last_status >= 1.0:
            last_status = now
            st = cluster.kiln_cmd("status", job_id)
            m = re.search(rf"{re.escape(job_id)}: (\w+)", st.stdout)
            if m:
                phase = m.group(1)
            if phase in ("completed", "failed", "stopped"):
                break
        if now - t0 > args.timeout:
            phase = "timed out"
            break
    wall = time.time() - t0
    tail.poll()
    logs = cluster.kiln_cmd("logs", job_id).stdout
    cpu = cluster.worker_cpu_s()
    cluster.stop()
    (work / "job.log").write_text(logs)

    events = [(k, e) for _, k, e in tail.events]
    steps = [e for k, e in events if k == "step"]
    last = {}
    for e in steps:
        last[e["step"]] = e
    counted = sum(e["step_s"] for e in last.values())
    recoveries = []
    for kill in kills:
        after = events[kill["index"]:]
        if target == "rank":
            # The first step of the generation that resumed after the kill.
            resumed = next((i for i, (k, _) in enumerate(after) if k == "resumed"), None)
            first = None if resumed is None else next(
                (e for k, e in after[resumed:] if k == "step"), None)
        else:
            first = next((e for k, e in after if k == "step" and e["time"] > kill["t"]), None)
        if first is not None:
            recoveries.append(first["time"] - kill["t"])
    losses = [last[s]["loss"] for s in sorted(last)]
    pauses = [e.get("pause_s", 0.0) for k, e in events if k == "checkpoint"]
    resumes = [e.get("from", "") for k, e in events if k == "resumed"]
    # Per step, the seconds training was held by checkpoints and snapshots (copies to host
    # memory; uploads and sends go on in the background).
    held = [e.get("phases", {}).get("checkpoint", 0.0) for e in last.values()]
    return {
        "run": label, "target": target, "interval_s": interval, "phase": phase,
        "wall_s": round(wall, 1), "steps": len(last), "executions": len(steps),
        "steps_redone": len(steps) - len(last), "kills": len(kills),
        "counted_s": round(counted, 1), "effective": round(counted / wall, 4),
        "recovery_s": [round(r, 2) for r in recoveries],
        "recovery_p50_s": round(statistics.median(recoveries), 2) if recoveries else None,
        "recovery_max_s": round(max(recoveries), 2) if recoveries else None,
        "checkpoint_pause_s": round(statistics.mean(pauses), 6) if pauses else None,
        "worker_cpu_s": round(cpu, 1),
        "held_per_step_ms": round(1000 * statistics.mean(held), 3) if held else None,
        "resumed_from_memory": sum("in workers' memory" in f for f in resumes),
        "resumed_from_store": sum("step-" in f for f in resumes),
        "losses": losses,
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--kiln", required=True)
    p.add_argument("--data", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--memory-every", type=int, default=0,
                   help="checkpoint.memory_every: snapshots in the workers' memory")
    p.add_argument("--runs", default="rank:60,rank:20,coordinator:20",
                   help="TARGET:T,... (TARGET rank or coordinator); an uninterrupted run "
                        "comes first")
    p.add_argument("--heartbeat-timeout", type=float, default=10)
    p.add_argument("--max-restarts", type=int, default=1000,
                   help="failures in a row before the job gives up (the coordinator's "
                        "default, 5, ends a run whose kills come faster than checkpoints)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--json")
    args = p.parse_args()
    args.data = args.data.resolve()
    args.out = args.out.resolve()
    args.kiln = str(Path(args.kiln).resolve())
    results = [run(args, "uninterrupted", "none", 0)]
    print(json.dumps({k: v for k, v in results[0].items() if k != "losses"}), flush=True)
    for spec in args.runs.split(","):
        target, interval = spec.split(":")
        r = run(args, f"{target}-{interval}s", target, float(interval))
        r["curve_matches"] = r["losses"] == results[0]["losses"]
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print()
    print("| run | kills | wall | steps (redone) | effective training time | failure to first "
          "step p50 / max | loss curve |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rec = ("" if r["recovery_p50_s"] is None
               else f"{r['recovery_p50_s']:.1f} / {r['recovery_max_s']:.1f} s")
        curve = "reference" if r["target"] == "none" else (
            "bit-identical" if r.get("curve_matches") else "DIFFERS")
        print(f"| {r['run']} ({r['phase']}) | {r['kills']} | {r['wall_s']:.0f} s | "
              f"{r['steps']} ({r['steps_redone']}) | {100 * r['effective']:.1f}% | {rec} | "
              f"{curve} |")


if __name__ == "__main__":
    main()
