"""Projects effective training time at scale from a per-GPU failure rate, the checkpoint
interval, the checkpoint pause and the recovery time (failure to first step), as measured by
benches/goodput.py (or given).

Model (each failure costs the recovery R plus, on average, half a checkpoint interval of steps
redone; each checkpoint holds training for its pause p):

    failures per second      lam = gpus * rate_per_gpu_hour / 3600
    effective training time  E   = (1 - p / C) * (1 - lam * (R + C / 2))

and the interval that maximizes it, Young/Daly's C* = sqrt(2 p / lam).

With snapshots in peers' memory every m seconds (each holding training for p_m) besides the
store's checkpoint every C, a failure redoes half a snapshot interval, unless it also took
the peer that held the failed rank's copy (a share q of failures: a rack, a switch, a power
domain), when it redoes half a store interval:

    E = (1 - p / C - p_m / m) * (1 - lam * (R + (1 - q) m / 2 + q C / 2))

    python3 benches/goodput_projection.py [--from runs/goodput/results.json] [--gpus 16384]
        [--recovery-s R] [--pause-s P] [--interval-s C,...]
        [--memory-interval-s m --memory-pause-s p_m] [--peer-loss q,...]

The default failure rate is Llama 3 405B's pre-training: 419 unexpected interruptions in 54
days on 16,384 H100s (Dubey et al., 2024, section 3.3.4), 1.97e-5 per GPU-hour.
"""

import argparse
import json
import math

LLAMA3_RATE = 419 / (16384 * 54 * 24)


def effective(gpus, rate, recovery, pause, interval):
    lam = gpus * rate / 3600
    return max(0.0, (1 - pause / interval) * (1 - lam * (recovery + interval / 2)))


def two_tier(gpus, rate, recovery, pause, interval, m_interval, m_pause, q):
    lam = gpus * rate / 3600
    held = 1 - pause / interval - m_pause / m_interval
    lost = lam * (recovery + (1 - q) * m_interval / 2 + q * interval / 2)
    return max(0.0, held * (1 - lost))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--from", dest="source", help="results of benches/goodput.py (--json)")
    p.add_argument("--gpus", type=int, default=16384)
    p.add_argument("--rate", type=float, default=LLAMA3_RATE,
                   help="failures per GPU-hour (default: Llama 3's)")
    p.add_argument("--recovery-s", type=float, help="failure to first step (default: the "
                   "measured rank-kill p50)")
    p.add_argument("--pause-s", type=float, default=None,
                   help="training held per checkpoint (default: the uninterrupted run's mean, "
                   "else 1 s)")
    p.add_argument("--interval-s", default="60,300,600,1800")
    p.add_argument("--memory-interval-s", type=float,
                   help="seconds between snapshots in peers' memory (a second table)")
    p.add_argument("--memory-pause-s", type=float, default=0.0,
                   help="training held per snapshot")
    p.add_argument("--peer-loss", default="0.05,0.2,1",
                   help="shares of failures that also lose the peer's copy")
    args = p.parse_args()
    recovery, pause = args.recovery_s, args.pause_s
    if args.source:
        runs = json.load(open(args.source))
        if pause is None:
            pause = next((r["checkpoint_pause_s"] for r in runs
                          if r["target"] == "none" and r.get("checkpoint_pause_s") is not None),
                         None)
    if recovery is None and args.source:
        measured = [r["recovery_p50_s"] for r in runs
                    if r["target"] == "rank" and r["recovery_p50_s"] is not None]
        recovery = max(measured) if measured else None
    if recovery is None:
        raise SystemExit("give --recovery-s or --from with a rank-kill run")
    pause = 1.0 if pause is None else pause
    lam = args.gpus * args.rate / 3600
    print(f"{args.gpus} GPUs at {args.rate:.3g} failures per GPU-hour: a failure every "
          f"{1 / lam / 60:.1f} min; recovery {recovery:.1f} s, checkpoint pause {pause:.1f} s")
    print()
    print("| checkpoint interval | R = measured | R x 5 | R x 20 |")
    print("|---|---|---|---|")
    intervals = [float(c) for c in args.interval_s.split(",")]
    # With no pause (saves that hold training for nothing measurable), the shorter the
    # interval the better, down to how long a save takes; no optimum to print.
    best = math.sqrt(2 * pause / lam) if pause > 0 else None
    for c in intervals + ([best] if best else []):
        cells = [f"{100 * effective(args.gpus, args.rate, recovery * k, pause, c):.1f}%"
                 for k in (1, 5, 20)]
        label = f"{c:.0f} s" + (" (Young/Daly optimum)" if c == best else "")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.memory_interval_s:
        m, pm = args.memory_interval_s, args.memory_pause_s
        shares = [float(q) for q in args.peer_loss.split(",")]
        print()
        print(f"With snapshots in peers' memory every {m:g} s (holding training {pm:g} s each), "
              f"R = {recovery:.1f} s:")
        print()
        print("| store interval | " + " | ".join(f"q = {q:g}" for q in shares) + " |")
        print("|---|" + "---|" * len(shares))
        for c in intervals:
            cells = [f"{100 * two_tier(args.gpus, args.rate, recovery, pause, c, m, pm, q):.1f}%"
                     for q in shares]
            print(f"| {c:.0f} s | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
