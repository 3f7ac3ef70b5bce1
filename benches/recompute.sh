#!/usr/bin/env bash
# Activation checkpointing: peak resident memory and step time of one `kiln train` process
# with `train.activation_checkpointing` = none, mlp and block, on the same job. Prints one
# JSON line per mode and a Markdown table for RESULTS.md.
#
#   benches/recompute.sh [PRESET=125m] [MICRO=8] [SEQ=512] [STEPS=3] [THREADS=2]
#
# The data is the Shakespeare plays (GPT-2 tokens, runs/shakespeare/data, prepared when
# missing); steps after the first are timed (the `step_s` of the metrics log).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../scripts/env.sh"
cd "$KILN_ROOT"
preset=${1:-125m} micro=${2:-8} seq=${3:-512} steps=${4:-3} threads=${5:-2}
scripts/setup.sh --no-build
kiln=${KILN_BIN:-target/release/kiln}
[[ -x $kiln ]] || cargo build --release --locked -q
data=$(scripts/shakespeare-data.sh "$kiln")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
results=$work/results.jsonl
for mode in none mlp block; do
  job=$work/$mode.toml
  cat > "$job" <<EOF
name = "recompute-$mode"

[model]
preset = "$preset"
vocab_size = 50257

[data]
path = "$KILN_ROOT/$data"

[train]
seq_len = $seq
batch_size = $micro
steps = $steps
device = "cpu"
precision = "fp32"
threads = $threads
log_every = 1
eval_every = 0
activation_checkpointing = "$mode"

[checkpoint]
every = 0

[output]
dir = "$work/out-$mode"
EOF
  /usr/bin/time -f '%M' -o "$work/rss-$mode" "$kiln" train "$job" --quiet >&2
  python3 - "$mode" "$work/out-$mode/metrics.jsonl" "$work/rss-$mode" "$preset" "$micro" "$seq" <<'PY' | tee -a "$results"
import json, statistics, sys
mode, log, rss, preset, micro, seq = sys.argv[1:]
events = [json.loads(l) for l in open(log)]
start = next(e for e in events if e["type"] == "start")
steps = [e for e in events if e["type"] == "step"]
times = [e["step_s"] for e in steps[1:]] or [steps[-1]["step_s"]]
print(json.dumps({
    "mode": mode, "reported": start.get("activation_checkpointing"),
    "preset": preset, "micro_batch": int(micro), "seq_len": int(seq),
    "peak_rss_mib": int(open(rss).read().split()[-1]) // 1024,
    "step_s": statistics.median(times), "losses": [e["loss"] for e in steps],
}))
PY
done
python3 - "$results" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = rows[0]
print("\n| mode (reported) | peak RSS | vs none | step | vs none | losses equal to none |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['mode']} ({r['reported']}) | {r['peak_rss_mib']} MiB | {r['peak_rss_mib'] - base['peak_rss_mib']:+d} MiB | "
          f"{r['step_s']:.2f} s | {r['step_s'] / base['step_s']:.2f}x | {r['losses'] == base['losses']} |")
PY
