//! Sharded checkpoints with real processes: a resumed run continues the loss curve of an
//! uninterrupted one bit for bit, a checkpoint written at one mesh resumes at another, and
//! damaged checkpoints (truncated, flipped byte, no manifest, a rank killed while saving)
//! are refused with a message naming the object while resume falls back to the previous
//! one. On the local file system and on a real S3 server (SeaweedFS, started by
//! scripts/test.sh; its endpoint arrives in KILN_TEST_S3_ENDPOINT).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use object_store::ObjectStoreExt;

/// Runs `job` on `world` ranks with `extra` arguments; returns the run and rank 0's stdout.
fn run_out(job: &Path, world: usize, extra: &[&str]) -> (Run, String) {
    let outputs = wait_all(spawn_ranks_with(job, world, extra, &[]));
    for (r, o) in outputs.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} of {world} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&outputs[0].stdout).into_owned();
    (Run::read(&output_dir(job)), stdout)
}

/// Bitwise: the same f64s, not merely close ones.
fn assert_identical(a: &Run, b: &Run, what: &str) {
    assert_eq!(a.losses, b.losses, "{what}: training losses differ");
    assert_eq!(
        a.val_losses, b.val_losses,
        "{what}: validation losses differ"
    );
    assert_eq!(a.ledger, b.ledger, "{what}: the ledgers differ");
    println!(
        "{what}: {} training and {} validation losses bit-identical, ledgers equal",
        a.losses.len(),
        a.val_losses.len()
    );
}

#[test]
fn resume_continues_the_loss_curve_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    for (name, world, micro, parallel, checkpoint) in [
        ("dp2", 2, 2, "", "every = 6"),
        ("dp2-zero1", 2, 2, "zero1 = true", "every = 6"),
        ("dp2-fsdp", 2, 2, "fsdp = true", "every = 6"),
        ("tp2", 2, 4, "tp = 2", "every = 6\nasync = false"),
    ] {
        let path = tiny_job(dir.path(), name, micro, parallel, checkpoint, 12);
        let (straight, out) = run_out(&path, world, &[]);
        assert!(out.contains("checkpoint step 6 committed"), "{out}");
        assert!(out.contains("checkpoint step 12 committed"), "{out}");
        // The second half again, from the checkpoint after step 6.
        let (resumed, out) = run_out(&path, world, &["--resume", "step-6"]);
        assert!(out.contains("resumed at step 6 from"), "{out}");
        assert!(
            !out.contains("step      6/12"),
            "step 6 was trained again:\n{out}"
        );
        assert_identical(&resumed, &straight, name);
    }
}

#[test]
fn a_checkpoint_resumes_on_other_meshes() {
    let dir = tempfile::tempdir().unwrap();
    // Saved at dp 2 x tp 2 with ZeRO-1 (each rank holds a quarter of the optimizer state).
    let base_job = tiny_job(
        dir.path(),
        "dp2tp2",
        2,
        "tp = 2\nzero1 = true",
        "every = 6",
        12,
    );
    let (base, _) = run_out(&base_job, 4, &[]);
    let step6 = output_dir(&base_job).join("checkpoints/step-6");

    // The last checkpoint, exported to Hugging Face's layout from four ranks' shards, is the
    // model the run wrote (transformers loads both).
    let step12 = output_dir(&base_job).join("checkpoints/step-12");
    let model = output_dir(&base_job).join("model");
    for dtype in ["float32", "bfloat16"] {
        let hf = dir.path().join(format!("hf-{dtype}"));
        let out = kiln_ok(&[
            "export",
            "--checkpoint",
            path_str(&step12),
            "--out",
            path_str(&hf),
            "--dtype",
            dtype,
            "--max-shard-bytes",
            "4000000",
        ]);
        assert!(out.contains("exported"), "{out}");
        assert!(hf.join("model.safetensors.index.json").exists(), "{out}");
        println!("{out}");
        run_python("same_weights.py", &[path_str(&hf), path_str(&model)]);
    }
    resumes_as(
        dir.path(),
        "dp2 x tp2",
        &base,
        &step6,
        &[
            ("dp1tp1", 1, 4, ""),
            ("dp4tp1", 4, 2, ""),
            ("dp1tp2", 2, 4, "tp = 2"),
        ],
    );
}

/// Resumes `step6` (a checkpoint of `base` after step 6) as each of `layouts` and checks the
/// rest of the curve (within 1e-5) and the ledger (identical).
fn resumes_as(
    dir: &Path,
    from: &str,
    base: &Run,
    step6: &Path,
    layouts: &[(&str, usize, i64, &str)],
) {
    let base_ledger: Vec<&str> = base.ledger.lines().collect();
    for &(name, world, micro, parallel) in layouts {
        let path = tiny_job(dir, name, micro, parallel, "", 12);
        let (resumed, out) = run_out(&path, world, &["--resume", path_str(step6)]);
        assert!(out.contains("resumed at step 6 from"), "{name}: {out}");
        let diff = max_diff(&resumed.losses, &base.losses[6..]);
        let val_diff = max_diff(&resumed.val_losses, &base.val_losses[1..]);
        println!(
            "{from} -> {name}: max |loss difference| {diff:.3e} over steps 7..12, validation {val_diff:.3e}"
        );
        assert!(
            diff <= 1e-5,
            "{name}: {:?} vs {:?}",
            resumed.losses,
            &base.losses[6..]
        );
        assert!(val_diff <= 1e-5, "{name}: validation");
        // The same samples, in the same steps: none repeated, none skipped.
        let ledger: Vec<&str> = resumed.ledger.lines().collect();
        assert_eq!(ledger, base_ledger[6..], "{name}: the ledgers differ");
    }
}

/// The `manifest.json` of the checkpoint directory `step`.
fn manifest_of(step: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(step.join("manifest.json")).unwrap()).unwrap()
}

/// A fully sharded checkpoint (each rank wrote its chunk of every segment) resumes plain on
/// one process, on ZeRO-1 at dp 4 and fully sharded at dp 2 x tp 2; a ZeRO-1 checkpoint
/// resumes fully sharded and hybrid (2 replicas x shard 2); a hybrid one resumes plain.
#[test]
fn fully_sharded_checkpoints_resume_at_any_layout() {
    let dir = tempfile::tempdir().unwrap();
    let fsdp_job = tiny_job(dir.path(), "fsdp2", 2, "fsdp = true", "every = 6", 12);
    let (fsdp, _) = run_out(&fsdp_job, 2, &[]);
    let step6 = output_dir(&fsdp_job).join("checkpoints/step-6");
    let manifest = manifest_of(&step6);
    assert_eq!(manifest["mesh"]["fsdp"], true, "{manifest}");
    resumes_as(
        dir.path(),
        "fully sharded dp2",
        &fsdp,
        &step6,
        &[
            ("plain-dp1", 1, 4, ""),
            ("zero1-dp4", 4, 2, "zero1 = true"),
            ("fsdp-dp2tp2", 4, 2, "tp = 2\nfsdp = true"),
        ],
    );
    let zero1_job = tiny_job(dir.path(), "zero1-dp2", 2, "zero1 = true", "every = 6", 12);
    let (zero1, _) = run_out(&zero1_job, 2, &[]);
    let step6 = output_dir(&zero1_job).join("checkpoints/step-6");
    resumes_as(
        dir.path(),
        "ZeRO-1 dp2",
        &zero1,
        &step6,
        &[
            ("fsdp-dp2", 2, 2, "fsdp = true"),
            ("hsdp-2x2", 4, 2, "fsdp = true\nshard = 2"),
        ],
    );
    // Hybrid: the two replicas of each shard split its writing between them.
    let hsdp_job = tiny_job(
        dir.path(),
        "hsdp-2x2-run",
        2,
        "fsdp = true\nshard = 2",
        "every = 6",
        12,
    );
    let (hsdp, _) = run_out(&hsdp_job, 4, &[]);
    let step6 = output_dir(&hsdp_job).join("checkpoints/step-6");
    let manifest = manifest_of(&step6);
    assert_eq!(
        (&manifest["mesh"]["dp"], &manifest["mesh"]["shard"]),
        (&4.into(), &2.into()),
        "{manifest}"
    );
    resumes_as(
        dir.path(),
        "hybrid 2 x 2",
        &hsdp,
        &step6,
        &[("plain-dp2", 2, 4, "")],
    );
}

/// Damages objects the way a failing disk or an interrupted copy would.
struct Damage {
    store: kiln_store::StoreLocation,
    rt: tokio::runtime::Runtime,
}

impl Damage {
    fn new(url: &str) -> Self {
        Damage {
            store: kiln_store::open(url).unwrap(),
            rt: tokio::runtime::Runtime::new().unwrap(),
        }
    }

    fn get(&self, name: &str) -> Vec<u8> {
        let path = self.store.child(name);
        self.rt
            .block_on(async { self.store.store.get(&path).await?.bytes().await })
            .unwrap()
            .to_vec()
    }

    fn put(&self, name: &str, bytes: Vec<u8>) {
        let path = self.store.child(name);
        self.rt
            .block_on(self.store.store.put(&path, bytes.into()))
            .unwrap();
    }

    fn delete(&self, name: &str) {
        let path = self.store.child(name);
        self.rt.block_on(self.store.store.delete(&path)).unwrap();
    }
}

/// Every fault against the checkpoint directory `url`.
fn faults(url: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    // A small host buffer: the 40 MB shard goes up in 32 MiB parts, one at a time.
    let checkpoint = format!("every = 4\ndir = \"{url}\"\nhost_buffer_mb = 1");
    let path = tiny_job(dir.path(), "faults", 4, "", &checkpoint, 12);
    let (straight, _) = run_out(&path, 1, &[]);
    let damage = Damage::new(url);
    let shard = "step-12/rank-00000.safetensors";
    let good = damage.get(shard);

    // Truncated: caught by the size in the manifest, before anything is read.
    damage.put(shard, good[..good.len() / 2].to_vec());
    let err = kiln_err(&["checkpoint", "verify", &format!("{url}/step-12")]);
    assert!(err.contains("rank-00000.safetensors is damaged"), "{err}");
    assert!(err.contains("truncated"), "{err}");
    println!("{what}, truncated shard, verify: {err}");
    let (resumed, out) = run_out(&path, 1, &["--resume", "latest"]);
    assert!(out.contains("skipped checkpoint"), "{out}");
    assert!(out.contains("rank-00000.safetensors is damaged"), "{out}");
    assert!(out.contains("resumed at step 8"), "{out}");
    println!(
        "{what}, truncated shard, resume: {}",
        out.lines().find(|l| l.contains("skipped")).unwrap()
    );
    assert_identical(
        &resumed,
        &straight,
        &format!("{what}: after a truncated shard"),
    );

    // One flipped byte in the middle of the data: caught by the piece's CRC.
    let mut flipped = damage.get(shard);
    let at = flipped.len() * 3 / 4;
    flipped[at] ^= 0x40;
    damage.put(shard, flipped);
    let err = kiln_err(&["checkpoint", "verify", &format!("{url}/step-12")]);
    assert!(err.contains("rank-00000.safetensors is damaged"), "{err}");
    assert!(err.contains("CRC-32"), "{err}");
    let explicit = kiln_err(&["train", path_str(&path), "--resume", "step-12"]);
    assert!(explicit.contains("CRC-32"), "{explicit}");
    println!("{what}, flipped byte, --resume step-12: {explicit}");
    let (resumed, out) = run_out(&path, 1, &["--resume", "latest"]);
    assert!(
        out.contains("CRC-32") && out.contains("resumed at step 8"),
        "{out}"
    );
    assert_identical(
        &resumed,
        &straight,
        &format!("{what}: after a flipped byte"),
    );

    // No manifest: the checkpoint does not exist.
    damage.delete("step-12/manifest.json");
    let list = kiln_ok(&["checkpoint", "list", url]);
    assert!(list.contains("step-12: not committed"), "{list}");
    assert!(list.contains("step-8: committed"), "{list}");
    let (resumed, out) = run_out(&path, 1, &["--resume", "latest"]);
    assert!(out.contains("resumed at step 8"), "{out}");
    assert_identical(&resumed, &straight, &format!("{what}: without a manifest"));

    // Nothing committed was lost on the way.
    for step in [4, 8, 12] {
        let ok = kiln_ok(&["checkpoint", "verify", &format!("{url}/step-{step}")]);
        assert!(ok.contains("every checksum matches"), "{ok}");
    }
}

#[test]
fn damaged_checkpoints_are_refused_on_the_local_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().join("checkpoints");
    faults(path_str(&url), "local");
}

#[test]
fn damaged_checkpoints_are_refused_on_s3() {
    s3_env();
    let url = format!("s3://kiln-test/checkpoint-faults-{}", std::process::id());
    faults(&url, "S3");
}

#[test]
fn a_rank_killed_while_saving_leaves_no_checkpoint_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_job(dir.path(), "kill", 2, "", "every = 1", 100_000);
    let ckpts = output_dir(&path).join("checkpoints");
    let mut children = spawn_ranks_with(&path, 2, &[], &[]);
    // Kill rank 1 as soon as a save has started (a step directory exists) and before rank
    // 1 has confirmed its object, once steps 1 and 2 had their chance to commit.
    let start = Instant::now();
    let killed_at = loop {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no save started"
        );
        let found = std::fs::read_dir(&ckpts).ok().and_then(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                .find(|s: &u64| {
                    *s >= 3 && !ckpts.join(format!("step-{s}/rank-00001.json")).exists()
                })
        });
        if let Some(step) = found {
            children[1].kill().unwrap();
            break step;
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let outputs = wait_all(children);
    let err = String::from_utf8_lossy(&outputs[0].stderr);
    assert!(!outputs[0].status.success());
    assert!(err.contains("rank 1"), "rank 0 should name rank 1:\n{err}");
    let step_dir = ckpts.join(format!("step-{killed_at}"));
    let confirmed = step_dir.join("rank-00001.json").exists();
    let committed = step_dir.join("manifest.json").exists();
    println!(
        "rank 1 killed during the save of step {killed_at}: its confirmation {}, manifest {}",
        if confirmed { "written" } else { "missing" },
        if committed { "written" } else { "missing" }
    );
    // The invariant: no manifest without every rank's confirmation.
    assert!(
        confirmed || !committed,
        "step {killed_at} was committed without rank 1"
    );
    let list = kiln_ok(&["checkpoint", "list", path_str(&ckpts)]);
    println!("{list}");
    let newest = kiln_ok(&["checkpoint", "verify", path_str(&ckpts)]);
    assert!(newest.contains("every checksum matches"), "{newest}");
    // The run resumes from the newest committed checkpoint.
    let resume_job = tiny_job(
        dir.path(),
        "kill",
        2,
        "",
        "every = 0",
        (killed_at + 2) as i64,
    );
    let outputs = wait_all(spawn_ranks_with(
        &resume_job,
        2,
        &["--resume", "latest"],
        &[],
    ));
    let out = String::from_utf8_lossy(&outputs[0].stdout);
    assert!(outputs.iter().all(|o| o.status.success()), "{out}");
    assert!(out.contains("resumed at step"), "{out}");
}

#[test]
fn retention_keeps_the_newest_and_every_mth() {
    let dir = tempfile::tempdir().unwrap();
    let path = tiny_job(
        dir.path(),
        "retention",
        8,
        "",
        "every = 2\nkeep_last = 2\nkeep_every = 4\nfsync = true",
        12,
    );
    let (_, out) = run_out(&path, 1, &[]);
    assert!(out.contains("removed steps [2]"), "{out}");
    let ckpts = output_dir(&path).join("checkpoints");
    let list = kiln_ok(&["checkpoint", "list", path_str(&ckpts)]);
    let steps: Vec<&str> = list.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(steps, ["step-4", "step-8", "step-10", "step-12"], "{list}");
    assert!(list.lines().all(|l| l.contains(": committed")), "{list}");
}
