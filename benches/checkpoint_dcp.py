"""The peer of benches/checkpoint.rs: the same training state (a Llama of the preset's
shapes in fp32 and torch.optim.AdamW's state) saved and loaded with
torch.distributed.checkpoint (DCP) in one process on the CPU, to a fresh local directory.
Prints one JSON line.

  checkpoint_dcp.py PRESET DIR [SAVES] [THREADS]

SAVES rounds of a `dcp.async_save` then a `dcp.save`, each to a new directory under DIR
(deleted, untimed, once measured), after the page cache's dirty pages are written out
(untimed); `dcp.load` reads the last synchronous save back into the (zeroed) model and
optimizer, and the parameters' and state's sums are checked against those saved. Each
figure is the best of the SAVES saves.
The model is `transformers.LlamaForCausalLM` with the preset's shapes; the tied output
matrix is dropped from the state dict (it is the embedding), so both systems save the
same tensors. DCP's writer runs with its defaults (one file per rank, `sync_files=True`:
it fsyncs every file it writes); `sync_files=False` is measured once more for comparison.
`dcp.async_save` stages a full copy of the state in host memory: it is skipped when that
copy would not fit in the memory available.
"""
import json
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

# vocab, dim, layers, heads, kv_heads, ffn, tied (worker/src/config.rs)
PRESETS = {
    "tiny": (50257, 64, 2, 4, 2, 192, True),
    "125m": (50257, 768, 12, 12, 12, 2048, True),
    "1b": (128256, 2048, 16, 32, 8, 8192, True),
}


def build(preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, dim, layers, heads, kv_heads, ffn, tied = PRESETS[preset]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tied,
        torch_dtype=torch.float32,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    # The state one step creates (its step count, `exp_avg` and `exp_avg_sq`), filled with
    # non-zero values as the Kiln side does. Made directly rather than by a step on zero
    # gradients: at 1b the gradients and foreach AdamW's temporaries would not fit beside it.
    with torch.no_grad():
        for p in params:
            opt.state[p] = {
                "step": torch.tensor(1.0),
                "exp_avg": p.detach().clone(),
                "exp_avg_sq": p.detach().abs(),
            }
    return model, opt


def state_of(model, opt):
    seen, msd = set(), {}
    for k, v in model.state_dict().items():
        if v.data_ptr() in seen:  # the tied output matrix
            continue
        seen.add(v.data_ptr())
        msd[k] = v
    return {"model": msd, "optim": opt.state_dict()}


def sums(model, opt):
    with torch.no_grad():
        ps = list(model.parameters())
        return [
            sum(p.double().sum().item() for p in ps),
            sum(opt.state[p]["exp_avg"].double().sum().item() for p in ps),
            sum(opt.state[p]["exp_avg_sq"].double().sum().item() for p in ps),
        ]


def du(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total


def proc_kb(path, field):
    with open(path) as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def mem_available():
    return proc_kb("/proc/meminfo", "MemAvailable:")


def reset_peak():
    """Starts a new peak of this process's resident memory (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_gb():
    return round(proc_kb("/proc/self/status", "VmHWM:") / 1e9, 2)


def main():
    args = sys.argv[1:]
    preset = args[0] if len(args) > 0 else "125m"
    root = args[1] if len(args) > 1 else "/tmp/kiln-ckpt-bench-dcp"
    saves = int(args[2]) if len(args) > 2 else 2
    threads = int(args[3]) if len(args) > 3 else 2
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # "no process group: saving on one rank"
    os.makedirs(root, exist_ok=True)

    model, opt = build(preset)
    params = sum(p.numel() for p in model.parameters())
    state_bytes = 3 * 4 * params  # params + exp_avg + exp_avg_sq, fp32
    state = state_of(model, opt)
    before = sums(model, opt)
    out = {
        "system": "dcp", "preset": preset, "params": params, "state_bytes": state_bytes,
        "saves": saves, "threads": threads, "torch": torch.__version__,
    }
    out["rss_before_gb"] = round(proc_kb("/proc/self/status", "VmRSS:") / 1e9, 2)
    n = 0

    def fresh():
        nonlocal n
        n += 1
        d = os.path.join(root, f"dcp-{n}")
        shutil.rmtree(d, ignore_errors=True)
        return d

    # SAVES rounds of an asynchronous save (when its staging copy fits; thread executor,
    # synchronous staging into a host copy) then a synchronous one (DCP's defaults:
    # checkpoint_id gives a FileSystemWriter, fsync on). Before each, the page cache's dirty
    # pages are written out (untimed), as on the Kiln side.
    avail = mem_available()
    run_async = state_bytes * 1.15 < avail
    if not run_async:
        out["async"] = (
            f"skipped: the staging copy needs {state_bytes / 1e9:.1f} GB, "
            f"{avail / 1e9:.1f} GB available"
        )
    times, blocking, total, last = [], [], [], None
    peak_save = peak_async = 0.0
    for _ in range(saves):
        if run_async:
            d = fresh()
            os.sync()
            reset_peak()
            t0 = time.perf_counter()
            f = dcp.async_save(state, checkpoint_id=d)
            staged = getattr(f, "staging_completion", None)
            if staged is not None:  # AsyncSaveResponse: staging may continue after the call
                staged.result()
                f = f.upload_completion
            blocking.append(time.perf_counter() - t0)
            f.result()
            total.append(time.perf_counter() - t0)
            peak_async = max(peak_async, peak_gb())
            out["async_disk_bytes"] = du(d)
            shutil.rmtree(d)

        d = fresh()
        if last:
            shutil.rmtree(last)
        os.sync()
        reset_peak()
        t0 = time.perf_counter()
        dcp.save(state, checkpoint_id=d)
        times.append(time.perf_counter() - t0)
        peak_save = max(peak_save, peak_gb())
        out["disk_bytes"] = du(d)
        last = d
    out["peak_rss_save_gb"] = peak_save
    out["save_s"] = min(times)
    out["save_s_all"] = [round(t, 3) for t in times]
    if run_async:
        out["peak_rss_async_gb"] = peak_async
        out["async_blocking_s"] = min(blocking)
        out["async_total_s"] = min(total)
        out["async_blocking_s_all"] = [round(t, 3) for t in blocking]
        out["async_total_s_all"] = [round(t, 3) for t in total]

    # One save without fsync, for comparison with writers that do not sync.
    d = fresh()
    os.sync()
    t0 = time.perf_counter()
    dcp.save(state, storage_writer=FileSystemWriter(d, sync_files=False))
    out["save_nosync_s"] = time.perf_counter() - t0
    shutil.rmtree(d)

    # Load the last synchronous save back into the zeroed state.
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
            opt.state[p]["exp_avg"].zero_()
            opt.state[p]["exp_avg_sq"].zero_()
    os.sync()
    reset_peak()
    t0 = time.perf_counter()
    dcp.load(state, checkpoint_id=last)
    out["load_s"] = time.perf_counter() - t0
    out["peak_rss_load_gb"] = peak_gb()
    after = sums(model, opt)
    assert all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for a, b in zip(after, before)), (
        f"loaded state differs: {after} != {before}"
    )
    shutil.rmtree(last)

    for k in ("save_s", "load_s", "save_nosync_s", "async_blocking_s", "async_total_s"):
        if k in out:
            out[k] = round(out[k], 4)
    out["save_gbps"] = round(state_bytes / out["save_s"] / 1e9, 3)
    out["load_gbps"] = round(state_bytes / out["load_s"] / 1e9, 3)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
