#!/usr/bin/env bash
# Every GPU check of Kiln in one call, for a machine with one NVIDIA GPU, torch 2.11.0 (CUDA
# 13) in its python3, and no Rust: the `kiln` binary and a tokenized dataset come prepared in
# .gpu/ (benches/gpu/prepare.sh builds them on the development machine).
#
# For each preset (default 125m and 1b, bf16 autocast over fp32 master weights, sequence 2048):
#   - Kiln: `kiln train` on the GPU over the Shakespeare shards, a checkpoint saved mid-run;
#     tokens/s and MFU over the steady steps, step-time phases, checkpoint pause and save
#     time, peak GPU memory (nvidia-smi, sampled every 200 ms).
#   - the same shape in plain PyTorch (benches/gpu/peer.py): eager, then torch.compile.
# MFU is taken against the bf16 matmul ceiling measured first in the same call (and the
# datasheet peak, DATASHEET_TFLOPS, default 989 for an H100/H200 SXM's dense bf16).
# Prints one JSON line per measurement and a Markdown table last. The runs work in $WORK
# (default /tmp/kiln-gpu-check: checkpoints and weights of `1b` are about 20 GB); $OUT
# receives two files, the table (gpu-check.md) and the measurements and logs
# (gpu-check.tar.gz), which is what a device call brings back.
#
#   bash benches/gpu/check.sh
#
# Environment: PRESETS ("125m:16:16 1b:8:8", preset:batch:micro), SEQ (2048), STEPS (30),
# COMPILE (1), DEVICE (cuda), DATASHEET_TFLOPS (989), KILN (.gpu/kiln), DATA (.gpu/data),
# OUT (runs/gpu-check), WORK (/tmp/kiln-gpu-check).
# A dry run of the same logic on a CPU-only machine:
#   DEVICE=cpu PRESETS=tiny:2:2 SEQ=64 STEPS=6 COMPILE=0 KILN=target/release/kiln \
#     DATA=runs/shakespeare/data bash benches/gpu/check.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
root=$(pwd)
dest=${OUT:-$root/runs/gpu-check}
OUT=${WORK:-/tmp/kiln-gpu-check}
rm -rf "$OUT"
mkdir -p "$OUT" "$dest"
presets=${PRESETS:-125m:16:16 1b:8:8}
seq_len=${SEQ:-2048} steps=${STEPS:-30} compile=${COMPILE:-1} device=${DEVICE:-cuda}
datasheet=${DATASHEET_TFLOPS:-989}
kiln=${KILN:-.gpu/kiln} data=${DATA:-.gpu/data}
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && py=.venv/bin/python
log() { echo "==> $*" >&2; }

if [ "$device" = cuda ]; then
  torch_lib=$("$py" -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
  nccl_lib=$("$py" -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))' 2>/dev/null || true)
  export LD_LIBRARY_PATH=$torch_lib${nccl_lib:+:$nccl_lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  ldd "$kiln" | grep -E 'torch_cuda|not found' | tee -a "$OUT/gpu.txt"
fi
"$kiln" --version | tee -a "$OUT/gpu.txt"

# The matmul ceiling: the best of square bf16 matmuls, timed with CUDA events.
log "measuring the matmul ceiling"
"$py" - "$device" > "$OUT/ceiling.json" <<'EOF'
import json, sys, torch
dev = sys.argv[1]
best = {}
for n in ([4096, 8192, 16384] if dev == "cuda" else [1024]):
    kind = torch.bfloat16 if dev == "cuda" else torch.float32
    a, b = torch.randn(n, n, dtype=kind, device=dev), torch.randn(n, n, dtype=kind, device=dev)
    a @ b
    times = []
    for _ in range(10 if dev == "cuda" else 3):
        if dev == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); a @ b; e.record(); torch.cuda.synchronize(); times.append(s.elapsed_time(e) / 1e3)
        else:
            import time
            t = time.perf_counter(); a @ b; times.append(time.perf_counter() - t)
    best[n] = 2 * n**3 / min(times) / 1e12
print(json.dumps({"device": dev, "tflops_by_size": best, "ceiling_tflops": float(f"{max(best.values()):.4g}"),
                  "torch": torch.__version__,
                  "name": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}))
EOF
cat "$OUT/ceiling.json"
ceiling=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["ceiling_tflops"])' "$OUT/ceiling.json")

# Peak device memory used while a command runs, from nvidia-smi every 200 ms (MiB; the CUDA
# context included). On a CPU the peak resident memory of the command instead.
measure() {
  local name=$1
  shift
  if [ "$device" = cuda ]; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$name.mem" &
    local sampler=$!
    "$@"
    local rc=$?
    kill "$sampler" 2>/dev/null
    wait "$sampler" 2>/dev/null
    sort -n "$OUT/$name.mem" | tail -1 > "$OUT/$name.peak"
    return $rc
  fi
  /usr/bin/env "$py" -c '
import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024))
sys.exit(rc)' "$OUT/$name.peak" "$@"
}

for spec in $presets; do
  IFS=: read -r preset batch micro <<< "$spec"
  run="$OUT/kiln-$preset"
  rm -rf "$run"
  mkdir -p "$run"
  ck_step=$(( steps * 2 / 3 ))
  cat > "$run/job.toml" <<EOF
name = "gpu-$preset"

[model]
preset = "$preset"
max_seq_len = $seq_len

[data]
path = "$(cd "$data" && pwd)"

[train]
seq_len = $seq_len
batch_size = $batch
micro_batch_size = $micro
steps = $steps
seed = 1234
device = "$device"
precision = "$([ "$device" = cuda ] && echo bf16 || echo fp32)"
log_every = 1
eval_every = 0
peak_tflops = $ceiling

[optimizer]
lr = 3e-4
warmup_steps = 5

[checkpoint]
every = $ck_step
keep_last = 1

[output]
dir = "$run/out"
EOF
  log "kiln train: $preset, batch $batch x $seq_len (micro $micro), $steps steps"
  measure "kiln-$preset" timeout 300 "$kiln" train "$run/job.toml" > "$run/log.txt" 2>&1
  echo "kiln $preset exit $?" >&2
  tail -3 "$run/log.txt" >&2
  # The steady steps: after the first third (warm-up, autotuning) and not the checkpoint's.
  "$py" - "$run/out/metrics.jsonl" "$preset" "$batch" "$micro" "$seq_len" "$ceiling" "$datasheet" \
    "$(cat "$OUT/kiln-$preset.peak" 2>/dev/null || echo 0)" > "$OUT/kiln-$preset.json" <<'EOF'
import json, statistics, sys
path, preset, batch, micro, seq, ceiling, datasheet, peak = sys.argv[1:]
events = [json.loads(l) for l in open(path)]
start = next(e for e in events if e["type"] == "start")
steps = [e for e in events if e["type"] == "step"]
cks = [e for e in events if e["type"] == "checkpoint"]
ck_steps = {c["step"] for c in cks} | {c["step"] + 1 for c in cks}
skip = len(steps) // 3
steady = [s for s in steps[skip:] if s["step"] not in ck_steps]
step_s = statistics.median(s["step_s"] for s in steady)
tps = int(batch) * int(seq) / step_s
flops = tps * start["flops_per_token"] / 1e12
phases = {k: round(statistics.median(s["phases"][k] for s in steady), 4) for k in steady[0]["phases"]}
print(json.dumps({
    "system": "kiln", "preset": preset, "params": start["params"], "batch": int(batch), "micro": int(micro),
    "seq": int(seq), "device": start["device"], "bf16": start["bf16"], "median_step_s": round(step_s, 4),
    "tokens_per_s": round(tps, 1), "tflops": float(f"{flops:.4g}"), "mfu": round(flops / float(ceiling), 4),
    "mfu_datasheet": round(flops / float(datasheet), 4), "phases_s": phases,
    "checkpoint_pause_s": [round(c["pause_s"], 3) for c in cks], "checkpoint_save_s": [round(c["save_s"], 2) for c in cks],
    "checkpoint_bytes": [c["bytes"] for c in cks], "peak_memory_mib": int(peak), "final_loss": round(steps[-1]["loss"], 4),
}))
EOF
  cat "$OUT/kiln-$preset.json"
  cp "$run/out/metrics.jsonl" "$OUT/kiln-$preset.metrics.jsonl" 2>/dev/null
  rm -rf "$run/out/checkpoints" "$run/out/model"
  for mode in eager compile; do
    [ "$mode" = compile ] && [ "$compile" != 1 ] && continue
    log "plain PyTorch ($mode): $preset"
    measure "torch-$mode-$preset" timeout 420 "$py" benches/gpu/peer.py --preset "$preset" --batch "$batch" \
      --micro "$micro" --seq "$seq_len" --steps "$(( steps - steps / 3 ))" --warmup "$(( steps / 3 ))" \
      --device "$device" --peak-tflops "$ceiling" $([ "$mode" = compile ] && echo --compile) \
      > "$OUT/torch-$mode-$preset.out" 2> "$OUT/torch-$mode-$preset.err"
    echo "torch $mode $preset exit $?" >&2
    tail -1 "$OUT/torch-$mode-$preset.out" > "$OUT/torch-$mode-$preset.json"
    cat "$OUT/torch-$mode-$preset.json"
    tail -2 "$OUT/torch-$mode-$preset.err" >&2
  done
done

"$py" - "$OUT" "$ceiling" "$datasheet" <<'EOF' | tee "$OUT/gpu-check.md"
import glob, json, os, sys
out, ceiling, datasheet = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def load(p):
    try:
        return json.loads(open(p).read().strip() or "null")
    except (OSError, ValueError):
        return None
print(f"matmul ceiling {ceiling} TFLOP/s (measured), datasheet {datasheet} TFLOP/s")
print()
print("| preset | system | batch x seq | tokens/s | TFLOP/s | MFU (measured ceiling) | MFU (datasheet) | peak memory | checkpoint pause | Kiln / this |")
print("|---|---|---|---|---|---|---|---|---|---|")
for k in sorted(glob.glob(os.path.join(out, "kiln-*.json"))):
    kiln = load(k)
    if not kiln:
        continue
    p = kiln["preset"]
    rows = [kiln] + [load(os.path.join(out, f"torch-{m}-{p}.json")) for m in ("eager", "compile")]
    for r in rows:
        if not r:
            continue
        peak = load(os.path.join(out, f"{'kiln' if r['system'] == 'kiln' else 'torch-' + r['system'].split('-')[1]}-{p}.peak"))
        mfu = r["tflops"] / ceiling
        pause = ", ".join(f"{x:.2f} s" for x in r.get("checkpoint_pause_s", [])) or "-"
        ratio = kiln["tokens_per_s"] / r["tokens_per_s"]
        print(f"| {p} | {r['system']} | {r['batch']} x {r['seq']} | {r['tokens_per_s']:.0f} | {r['tflops']:.4g} | "
              f"{mfu:.1%} | {r['tflops'] / datasheet:.1%} | {peak if peak is not None else '?'} MiB | {pause} | {ratio:.2f}x |")
EOF
cp "$OUT/gpu-check.md" "$dest/"
tar -czf "$dest/gpu-check.tar.gz" -C "$OUT" --exclude='*/out' .
ls -la "$dest" >&2
