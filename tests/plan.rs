//! `kiln plan`: what a user sees for a job that fits, one that does not (and the change that
//! would make it fit), one that fits nowhere, and bad arguments.

mod common;

use std::path::PathBuf;

use common::kiln;
use serde_json::Value;

fn job(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
    let path = dir.path().join(format!("{name}.toml"));
    let text =
        format!("name = \"{name}\"\n{body}\n[data]\npath = \"data\"\n[output]\ndir = \"out\"\n");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> (bool, String, String) {
    let out = kiln(args);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kiln plan PATH --gpus GPUS`, which must fail; its stderr.
fn refused(path: &std::path::Path, gpus: &str) -> String {
    let (ok, _, err) = run(&["plan", path.to_str().unwrap(), "--gpus", gpus]);
    assert!(!ok, "kiln plan {} --gpus {gpus} succeeded", path.display());
    err
}

const EIGHT_B: &str = "[model]\npreset = \"8b\"\n[train]\nseq_len = 8192\nbatch_size = 64\n\
                       micro_batch_size = 1\nsteps = 1";

#[test]
fn a_job_that_fits_gets_its_breakdown_and_the_meshes() {
    let dir = tempfile::tempdir().unwrap();
    let path = job(
        &dir,
        "fits",
        &format!("{EIGHT_B}\n[parallel]\ntp = 4\nzero1 = true"),
    );
    let p = path.to_str().unwrap();
    let (ok, out, err) = run(&["plan", p, "--gpus", "8", "--gpu-memory", "80GiB"]);
    assert!(ok, "{err}");
    for line in [
        "per rank at dp 2 x tp 4, ZeRO-1, micro-batch 1:",
        "optimizer state (AdamW)",
        "activations, one micro-batch",
        "meshes of 8 devices:",
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    let (ok, out, err) = run(&["plan", p, "--gpus", "8", "--json"]);
    assert!(ok, "{err}");
    let plan: Value = serde_json::from_str(&out).unwrap();
    let m = &plan["estimate"]["memory"];
    let parts: f64 = [
        "parameters",
        "gradients",
        "optimizer_state",
        "optimizer_scratch",
        "low_precision_weights",
        "activations",
        "backward_working_set",
        "loss",
        "runtime",
    ]
    .iter()
    .map(|k| m[k].as_f64().unwrap())
    .sum();
    assert_eq!(parts, m["total"].as_f64().unwrap());
    // fp32 parameters of a quarter of the model (the norms whole on every rank).
    let params = plan["params"].as_f64().unwrap();
    let per_rank = m["parameters"].as_f64().unwrap() / 4.0;
    assert!(
        (per_rank / (params / 4.0) - 1.0).abs() < 0.01,
        "{per_rank} vs {params}"
    );
    assert_eq!(plan["estimate"]["fits"], true);
    // On the CPU, writing the final weights after training is the peak when it adds more.
    let (ok, out, err) = run(&["plan", p, "--devices", "8", "--device", "cpu", "--json"]);
    assert!(ok || err.contains("does not fit"), "{err}");
    let cpu: Value = serde_json::from_str(&out).unwrap();
    let m = &cpu["estimate"]["memory"];
    let f = |k: &str| m[k].as_f64().unwrap();
    let state = f("parameters")
        + f("gradients")
        + f("optimizer_state")
        + f("optimizer_scratch")
        + f("runtime");
    let training =
        f("low_precision_weights") + f("activations") + f("backward_working_set") + f("loss");
    assert_eq!(f("total"), state + training.max(f("final_weights")));
    assert!(plan["meshes"].as_array().unwrap().len() > 6);
}

#[test]
fn a_job_that_does_not_fit_is_refused_with_the_change_that_would() {
    let dir = tempfile::tempdir().unwrap();
    // Data parallelism alone: 20 bytes a parameter of 8B does not fit on 80 GB.
    let path = job(&dir, "big", EIGHT_B);
    let (ok, out, err) = run(&["plan", path.to_str().unwrap(), "--gpus", "8"]);
    assert!(!ok);
    assert!(out.contains("DOES NOT FIT"), "{out}");
    assert!(
        err.contains("does not fit: it needs") && err.contains("per rank at dp 8 x tp 1"),
        "{err}"
    );
    assert!(
        err.contains("the smallest change that fits: the mesh dp 2 x tp 4"),
        "{err}"
    );

    // Where one change to the job's own layout is enough, that change is named: the 1B
    // preset at a long sequence fits once its blocks are recomputed.
    let path = job(
        &dir,
        "long",
        "[model]\npreset = \"1b\"\n[train]\nseq_len = 32768\nbatch_size = 8\nsteps = 1\n\
         micro_batch_size = 1\n[parallel]\nzero1 = true",
    );
    let err = refused(&path, "8");
    assert!(
        err.contains("the smallest change that fits: train.activation_checkpointing = \"mlp\""),
        "{err}"
    );

    // Already recomputing and sharding AdamW: a smaller micro-batch.
    let path = job(
        &dir,
        "micro",
        "[model]\npreset = \"1b\"\n[train]\nseq_len = 8192\nbatch_size = 256\nsteps = 1\n\
         micro_batch_size = 32\nactivation_checkpointing = \"block\"\n[parallel]\nzero1 = true",
    );
    let err = refused(&path, "8");
    assert!(
        err.contains("the smallest change that fits: train.micro_batch_size = 16"),
        "{err}"
    );

    // Recomputing every block and ZeRO-1 on 8 GPUs still holds a whole fp32 copy of 8B and
    // its gradients on each: full sharding.
    let path = job(
        &dir,
        "shard",
        &format!("{EIGHT_B}\nactivation_checkpointing = \"block\"\n[parallel]\nzero1 = true"),
    );
    let err = refused(&path, "8");
    assert!(
        err.contains("the smallest change that fits: parallel.fsdp = true"),
        "{err}"
    );

    // No mesh of 2 GPUs holds 8B: more devices.
    let path = job(
        &dir,
        "few",
        &format!("{EIGHT_B}\n[parallel]\ntp = 2\nzero1 = true"),
    );
    let err = refused(&path, "2");
    assert!(
        err.contains("the smallest change that fits: 4 devices with dp 2 x tp 2"),
        "{err}"
    );

    // 405B fits on no mesh Kiln forms today, however many devices.
    let path = job(
        &dir,
        "huge",
        "[model]\npreset = \"405b\"\n[train]\nseq_len = 8192\nbatch_size = 512\nsteps = 1\n\
         micro_batch_size = 1\n[parallel]\ntp = 8\nzero1 = true",
    );
    let err = refused(&path, "64");
    assert!(err.contains("nothing Kiln runs today"), "{err}");
    // What is left, fully sharded and recomputing: the block inputs at 8192 tokens.
    assert!(err.contains("the most of it activations"), "{err}");
}

#[test]
fn bad_arguments_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let path = job(&dir, "tp", &format!("{EIGHT_B}\n[parallel]\ntp = 4"));
    let p = path.to_str().unwrap();
    let (ok, _, err) = run(&["plan", p, "--gpus", "6"]);
    assert!(!ok);
    assert!(
        err.contains("--devices 6: the job's tensor-parallel size 4 must divide it"),
        "{err}"
    );
    // 64 sequences do not split over 3 data-parallel ranks: refused as `kiln train` would.
    let (ok, _, err) = run(&["plan", p, "--gpus", "12"]);
    assert!(!ok);
    assert!(
        err.contains(
            "--devices 12: train.batch_size 64 is not a multiple of 3 data-parallel ranks x \
             train.micro_batch_size 1"
        ),
        "{err}"
    );
    let (ok, _, err) = run(&["plan", p, "--gpu-memory", "lots"]);
    assert!(!ok);
    assert!(err.contains("expected a size such as 80GiB"), "{err}");
    let (ok, _, err) = run(&["plan", p, "--device", "tpu"]);
    assert!(!ok);
    assert!(err.contains("expected cpu or cuda"), "{err}");
}

/// A hybrid-sharded job is planned as written, and a device count its shard groups do not
/// divide is refused with the message `kiln train` gives.
#[test]
fn a_hybrid_sharded_job_is_planned_in_its_groups() {
    let dir = tempfile::tempdir().unwrap();
    let path = job(
        &dir,
        "hybrid",
        &format!(
            "{EIGHT_B}\nactivation_checkpointing = \"block\"\n[parallel]\nfsdp = true\nshard = 8"
        ),
    );
    let p = path.to_str().unwrap();
    let (ok, out, err) = run(&["plan", p, "--gpus", "16"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("per rank at dp 16 x tp 1, fully sharded in groups of 8, recompute block"),
        "{out}"
    );
    let err = refused(&path, "12");
    assert!(
        err.contains("--devices 12: parallel.shard = 8 does not divide the data-parallel size 12"),
        "{err}"
    );
}
