//! Kiln's sharded checkpoint of a preset's training state (fp32 parameters and AdamW's
//! `exp_avg` and `exp_avg_sq`) on the CPU, saved to and loaded from a local directory, exactly
//! as `kiln train` saves it on one rank. Prints one JSON line.
//!
//!   cargo bench --bench checkpoint -- [PRESET] [DIR] [SAVES] [THREADS] [HOST_MB] [OVERLAP_SEQ]
//!
//! SAVES rounds of an asynchronous then a synchronous save, each mode through its own `Saver`
//! (as training makes them, keeping the last checkpoint). For an asynchronous save the
//! blocking pause is the time `save` holds the caller plus the `fence` called right after it
//! (the worst case: the next optimizer update needs the state at once) and the total runs
//! until `wait` returns with the checkpoint committed; a synchronous save's total is the time
//! `save` takes (committed). The page cache's dirty pages are written out (untimed) before each
//! save. The newest synchronous checkpoint is loaded back into the zeroed model and optimizer
//! and checked against the saved sums (skipped when the load would not fit in memory). Each
//! figure is the best of the SAVES saves; every save's time is printed too. DIR is created
//! fresh and deleted at the end. HOST_MB (default 0: Kiln's default, the whole state or half the
//! memory available, whichever is less) is the saver's host
//! budget, the most bytes of a save held in host memory at once. With OVERLAP_SEQ > 0 one
//! forward and backward pass of a 1 x OVERLAP_SEQ batch runs between `save` and `fence`, as
//! the next training step would, and the pause is what training then waits.
//!
//! benches/checkpoint.sh runs it side by side with torch.distributed.checkpoint.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use kiln_checkpoint::{CheckpointStore, Mesh};
use kiln_worker::checkpoint::{self, Saver, SaverOptions};
use kiln_worker::config::LlamaConfig;
use kiln_worker::model::{DecayPolicy, Llama};
use kiln_worker::optim::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

/// Bytes of the files under `path`.
fn du(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => du(&e.path()),
            Ok(_) => e.metadata().map_or(0, |m| m.len()),
            Err(_) => 0,
        })
        .sum()
}

/// Sums of the parameters, `exp_avg` and `exp_avg_sq` (f32 sums: no f64 copy of the state).
fn sums(model: &Llama, optimizer: &AdamW) -> [f64; 3] {
    let sum = |t: &Tensor| t.sum(Kind::Float).double_value(&[]);
    [
        sum(&model.params.flat),
        sum(&optimizer.exp_avg),
        sum(&optimizer.exp_avg_sq),
    ]
}

/// A `kB` field of a `/proc` file, in bytes.
fn proc_kb(file: &str, field: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Starts a new peak of this process's resident memory (`VmHWM`).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The peak resident memory since the last [`reset_peak`], in GB.
fn peak_gb() -> f64 {
    proc_kb("/proc/self/status", "VmHWM:") as f64 / 1e9
}

/// Writes every dirty page of the page cache to disk (untimed, before each save): in training
/// checkpoints are minutes apart and the previous one's writeback has finished by the next.
fn flush() -> Result<()> {
    let status = std::process::Command::new("sync").status()?;
    anyhow::ensure!(status.success(), "sync failed: {status}");
    Ok(())
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn list(v: &[f64]) -> String {
    let items: Vec<String> = v.iter().map(|t| format!("{t:.3}")).collect();
    format!("[{}]", items.join(", "))
}

/// The command line: `[PRESET] [DIR] [SAVES] [THREADS] [HOST_MB] [OVERLAP_SEQ]`.
struct Args {
    preset: String,
    root: PathBuf,
    saves: u64,
    threads: i32,
    host_mb: u64,
    /// With OVERLAP_SEQ > 0, one forward and backward pass of a 1 x OVERLAP_SEQ batch runs
    /// between `save` and `fence`, as the next training step would.
    overlap_seq: i64,
}

impl Args {
    fn parse() -> Result<Args> {
        let args: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a != "--bench")
            .collect();
        let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.to_owned());
        let a = Args {
            preset: arg(0, "125m"),
            root: PathBuf::from(arg(1, "/tmp/kiln-ckpt-bench-kiln")),
            saves: arg(2, "2").parse().context("SAVES is an integer")?,
            threads: arg(3, "2").parse().context("THREADS is an integer")?,
            host_mb: arg(4, "0").parse().context("HOST_MB is an integer")?,
            overlap_seq: arg(5, "0").parse().context("OVERLAP_SEQ is an integer")?,
        };
        anyhow::ensure!(a.saves >= 1, "SAVES must be at least 1");
        Ok(a)
    }

    fn host_budget(&self) -> Option<u64> {
        (self.host_mb > 0).then_some(self.host_mb << 20)
    }
}

/// The preset's model and its AdamW, with non-zero state as after some training.
fn training_state(config: &LlamaConfig) -> (Llama, AdamW) {
    let model = Llama::new(config, DecayPolicy::default(), Device::Cpu);
    model.init(0);
    let mut optimizer = AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        &model.params,
    );
    tch::no_grad(|| {
        optimizer.exp_avg.copy_(&model.params.flat);
        optimizer.exp_avg_sq.copy_(&model.params.flat);
        let _ = optimizer.exp_avg_sq.abs_();
    });
    optimizer.step = 1;
    (model, optimizer)
}

/// The times (seconds), memory peaks (GB) and sizes (bytes) of the save rounds.
#[derive(Default)]
struct Rounds {
    held: Vec<f64>,
    fence: Vec<f64>,
    blocking: Vec<f64>,
    total: Vec<f64>,
    upload: Vec<f64>,
    sync_total: Vec<f64>,
    compute: Vec<f64>,
    async_peak: f64,
    sync_peak: f64,
    saved_bytes: u64,
    async_disk: u64,
    sync_disk: u64,
}

/// The saves, alternating an asynchronous and a synchronous one, each mode through its own
/// saver and directory. Each checkpoint is deleted (untimed) before its saver makes the
/// next, so that retention finds nothing to delete and the disk holds at most three.
/// Returns the rounds and the synchronous saves' store, which holds the newest checkpoint.
fn save_rounds(
    args: &Args,
    config: &LlamaConfig,
    model: &Llama,
    optimizer: &AdamW,
) -> Result<(Rounds, CheckpointStore)> {
    let mesh = Mesh {
        world: 1,
        dp: 1,
        tp: 1,
        zero1: false,
        fsdp: false,
        shard: 0,
    };
    let train_state = |step: u64| serde_json::json!({ "step": step, "bench": "checkpoint" });
    let open = |name: &str| -> Result<CheckpointStore> {
        let dir = args.root.join(name);
        std::fs::create_dir_all(&dir)?;
        let url = dir.to_str().context("a UTF-8 path")?.to_owned();
        Ok(CheckpointStore::open(&url)?)
    };
    let async_store = open("async")?;
    let store = open("sync")?;
    let options = |asynchronous| SaverOptions {
        rank: 0,
        mesh,
        dp_rank: 0,
        tp_rank: 0,
        asynchronous,
        keep_last: 1,
        keep_every: 0,
    };
    let mut asaver =
        Saver::new(async_store.clone(), options(true)).with_host_budget(args.host_budget());
    let mut saver = Saver::new(store.clone(), options(false)).with_host_budget(args.host_budget());
    let mut r = Rounds::default();
    for step in 1..=args.saves {
        flush()?;
        reset_peak();
        let start = Instant::now();
        let (previous, h) = asaver.save(step, model, optimizer, train_state(step))?;
        anyhow::ensure!(previous.is_none(), "a save was still in flight");
        if args.overlap_seq > 0 {
            let t = Instant::now();
            let tokens = Tensor::randint(
                config.vocab_size,
                [1, args.overlap_seq],
                (Kind::Int64, Device::Cpu),
            );
            let tape = model.forward_tape(&tokens, &tokens, 1.0)?;
            model.backward(tape, true, &mut |_| {})?;
            r.compute.push(t.elapsed().as_secs_f64());
        }
        let f = asaver.fence();
        let b = h + f;
        let saved = asaver.wait()?.context("an asynchronous save in flight")?;
        r.total.push(start.elapsed().as_secs_f64());
        r.async_peak = r.async_peak.max(peak_gb());
        anyhow::ensure!(
            saved.deleted.is_empty(),
            "retention deleted {:?}",
            saved.deleted
        );
        r.held.push(h);
        r.fence.push(f);
        r.blocking.push(b);
        r.upload.push(saved.upload_s);
        r.saved_bytes = saved.bytes;
        r.async_disk = du(&args.root.join("async").join(format!("step-{step}")));
        async_store.delete(step)?;

        if step > 1 {
            store.delete(step - 1)?;
        }
        flush()?;
        reset_peak();
        let start = Instant::now();
        let (saved, _) = saver.save(step, model, optimizer, train_state(step))?;
        r.sync_total.push(start.elapsed().as_secs_f64());
        r.sync_peak = r.sync_peak.max(peak_gb());
        let saved = saved.context("a synchronous save returns what it saved")?;
        anyhow::ensure!(saved.committed.is_some(), "rank 0 commits");
        anyhow::ensure!(
            saved.deleted.is_empty(),
            "retention deleted {:?}",
            saved.deleted
        );
        r.sync_disk = du(&args.root.join("sync").join(format!("step-{step}")));
    }
    drop((asaver, saver, async_store));
    Ok((r, store))
}

/// How the load back went: its seconds and peak resident memory (GB), NaN when skipped,
/// and why it was skipped (empty when it ran).
struct Loaded {
    load: f64,
    peak: f64,
    skipped: String,
}

/// Loads the newest checkpoint of `store` back into the zeroed state and checks it against
/// the sums `before` the saves, unless the load would not fit in memory.
fn load_back(
    store: &CheckpointStore,
    saves: u64,
    model: &Llama,
    optimizer: &mut AdamW,
    state_bytes: u64,
    before: [f64; 3],
) -> Result<Loaded> {
    tch::no_grad(|| {
        let _ = model.params.flat.shallow_clone().zero_();
        let _ = optimizer.exp_avg.zero_();
        let _ = optimizer.exp_avg_sq.zero_();
    });
    // `checkpoint::load` reads a local checkpoint straight into the tensors.
    let available = proc_kb("/proc/meminfo", "MemAvailable:");
    let need = 1 << 30;
    let force = std::env::var("KILN_CKPT_BENCH_LOAD").is_ok_and(|v| v == "1");
    if need > available && !force {
        let skipped = format!(
            "skipped: the load holds about {:.1} GB beside the state, {:.1} GB available (KILN_CKPT_BENCH_LOAD=1 forces it)",
            2.0 * state_bytes as f64 / 1e9,
            available as f64 / 1e9
        );
        return Ok(Loaded {
            load: f64::NAN,
            peak: f64::NAN,
            skipped,
        });
    }
    reset_peak();
    let (load, peak) = load_newest(store, saves, model, optimizer)?;
    let after = sums(model, optimizer);
    anyhow::ensure!(
        before == after,
        "the loaded state differs: sums {after:?}, saved {before:?}"
    );
    Ok(Loaded {
        load,
        peak,
        skipped: String::new(),
    })
}

/// Prints the results as one JSON line.
fn print_json(
    args: &Args,
    params: u64,
    state_bytes: u64,
    base_gb: f64,
    r: &Rounds,
    loaded: &Loaded,
) {
    let json_s = |v: f64| {
        if v.is_finite() {
            format!("{v:.4}")
        } else {
            "null".into()
        }
    };
    let gbps = |s: f64| state_bytes as f64 / s / 1e9;
    let skipped = if loaded.skipped.is_empty() {
        "null".to_owned()
    } else {
        format!("\"{}\"", loaded.skipped)
    };
    let Args {
        preset,
        saves,
        threads,
        host_mb,
        overlap_seq,
        ..
    } = args;
    let (saved_bytes, sync_disk, async_disk) = (r.saved_bytes, r.sync_disk, r.async_disk);
    let (async_peak, sync_peak) = (r.async_peak, r.sync_peak);
    println!(
        "{{\"system\": \"kiln\", \"preset\": \"{preset}\", \"params\": {params}, \"state_bytes\": {state_bytes}, \"saved_bytes\": {saved_bytes}, \"disk_bytes\": {sync_disk}, \"async_disk_bytes\": {async_disk}, \"saves\": {saves}, \"threads\": {threads}, \"host_mb\": {host_mb}, \"async_blocking_s\": {:.4}, \"async_total_s\": {:.4}, \"sync_total_s\": {:.4}, \"load_s\": {}, \"load\": {skipped}, \"async_gbps\": {:.3}, \"sync_gbps\": {:.3}, \"load_gbps\": {}, \"rss_before_gb\": {base_gb:.2}, \"peak_rss_async_gb\": {async_peak:.2}, \"peak_rss_sync_gb\": {sync_peak:.2}, \"peak_rss_load_gb\": {}, \"async_held_s_all\": {}, \"async_fence_s_all\": {}, \"async_blocking_s_all\": {}, \"async_upload_s_all\": {}, \"async_total_s_all\": {}, \"sync_total_s_all\": {}, \"overlap_seq\": {overlap_seq}, \"compute_s_all\": {}}}",
        min(&r.blocking),
        min(&r.total),
        min(&r.sync_total),
        json_s(loaded.load),
        gbps(min(&r.total)),
        gbps(min(&r.sync_total)),
        json_s(gbps(loaded.load)),
        json_s(loaded.peak),
        list(&r.held),
        list(&r.fence),
        list(&r.blocking),
        list(&r.upload),
        list(&r.total),
        list(&r.sync_total),
        list(&r.compute),
    );
}

fn main() -> Result<()> {
    let args = Args::parse()?;
    tch::set_num_threads(args.threads);
    let root = &args.root;
    if root.exists() {
        std::fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    std::fs::create_dir_all(root)?;

    let config = LlamaConfig::preset(&args.preset)?;
    let (model, mut optimizer) = training_state(&config);
    let params = model.params.numel() as u64;
    let state_bytes = 3 * 4 * params;
    let before = sums(&model, &optimizer);

    // The saves hold up to the host budget in host memory (without one, the whole state
    // or half the memory available, whichever is less).
    let resident = proc_kb("/proc/self/status", "VmRSS:");
    let base_gb = resident as f64 / 1e9;

    let (rounds, store) = save_rounds(&args, &config, &model, &optimizer)?;
    let loaded = load_back(
        &store,
        args.saves,
        &model,
        &mut optimizer,
        state_bytes,
        before,
    )?;
    drop(store);
    std::fs::remove_dir_all(root)?;
    print_json(&args, params, state_bytes, base_gb, &rounds, &loaded);
    Ok(())
}

/// Loads the newest committed checkpoint (step `step`) of `store` into the model and the
/// optimizer, as a resumed run does. Returns the seconds it took and the peak resident
/// memory meanwhile, in GB.
fn load_newest(
    store: &CheckpointStore,
    step: u64,
    model: &Llama,
    optimizer: &mut AdamW,
) -> Result<(f64, f64)> {
    flush()?;
    let start = Instant::now();
    let manifests = store.committed()?;
    let newest = manifests.first().context("a committed checkpoint")?;
    anyhow::ensure!(newest.step == step, "newest is step {}", newest.step);
    checkpoint::load(store, newest, model, optimizer)?;
    Ok((start.elapsed().as_secs_f64(), peak_gb()))
}
