//! bf16 autocast on the CPU, through `kiln train`, `kiln eval` and `kiln sample`: a run asked
//! for bf16 reports the dtype libtorch computed in, tracks the fp32 loss curve, and keeps the
//! equivalences of the parallel layouts (data and tensor parallel against one process, all
//! in bf16).

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// `job` with `precision = "bf16"` added to its `[train]` section.
fn in_bf16(job: &Path) -> PathBuf {
    let text = std::fs::read_to_string(job).unwrap();
    let text = text.replacen("[train]\n", "[train]\nprecision = \"bf16\"\n", 1);
    assert!(text.contains("precision = \"bf16\""));
    std::fs::write(job, text).unwrap();
    job.to_path_buf()
}

/// The demo job's shape (jobs/shakespeare-demo.toml: 7.2M parameters, 50,257-token vocabulary,
/// 16 x 128 tokens a step) for 30 steps, in `precision`.
fn demo_job(dir: &Path, precision: &str) -> PathBuf {
    let demo = std::fs::read_to_string(root().join("jobs/shakespeare-demo.toml")).unwrap();
    let out = dir.join(precision);
    let mut text = String::new();
    for line in demo.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let line = match key {
            "path" => format!("path = \"{}\"", four_plays().display()),
            "dir" => format!("dir = \"{}\"", out.display()),
            "steps" => "steps = 30".into(),
            "log_every" => "log_every = 1".into(),
            "eval_every" => "eval_every = 30".into(),
            "eval_batches" => "eval_batches = 4".into(),
            "device" => format!("device = \"cpu\"\nprecision = \"{precision}\""),
            _ => line.to_owned(),
        };
        text.push_str(&line);
        text.push('\n');
    }
    let path = dir.join(format!("{precision}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// 30 steps of the demo shape in bf16 follow the fp32 curve: measured, the per-step losses
/// differ by at most 4.7e-4 (relative 7e-5; the loss falls from 10.82 to 6.35), the
/// validation loss by 4.9e-4. The bound, 2e-2, leaves room for bf16's rounding differences
/// to compound over 30 updates at lr 3e-3 while staying far below what a wrong model or
/// wrong data changes (the loss moves by more than 0.1 a step early on). The start events
/// must report the dtype libtorch computed in: a run in fp16 or in fp32 labelled bf16 fails.
#[test]
fn bf16_tracks_fp32_on_the_demo_shape_and_eval_and_sample_run_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let fp32 = run(&demo_job(dir.path(), "fp32"), 1);
    let bf16 = run(&demo_job(dir.path(), "bf16"), 1);
    assert_eq!(
        (&fp32.start["precision"], &fp32.start["bf16"]),
        (&serde_json::json!("fp32"), &serde_json::json!(false))
    );
    assert_eq!(
        (&bf16.start["precision"], &bf16.start["bf16"]),
        (&serde_json::json!("bf16"), &serde_json::json!(true))
    );
    assert_eq!(bf16.losses.len(), 30);
    let diff = max_diff(&bf16.losses, &fp32.losses);
    let val = max_diff(&bf16.val_losses, &fp32.val_losses);
    println!(
        "bf16 vs fp32 over 30 steps: max |loss difference| {diff:.3e}, validation {val:.3e}; \
         first {:.4}, last {:.4} (fp32 {:.4})",
        bf16.losses[0], bf16.losses[29], fp32.losses[29]
    );
    assert!(
        diff < 2e-2 && val < 2e-2,
        "{:?}\n{:?}",
        bf16.losses,
        fp32.losses
    );
    assert!(bf16.losses[29] < bf16.losses[0] - 2.0, "{:?}", bf16.losses);
    // The same samples, whatever the precision.
    assert_eq!(bf16.ledger, fp32.ledger);

    // Eval of the bf16-trained weights in bf16 and in fp32: close, not identical.
    let model = dir.path().join("bf16/model");
    let eval = |precision: &str| -> f64 {
        let out = kiln_ok(&[
            "eval",
            "--model",
            path_str(&model),
            "--data",
            path_str(four_plays()),
            "--seq-len",
            "128",
            "--max-sequences",
            "8",
            "--device",
            "cpu",
            "--precision",
            precision,
        ]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let (e16, e32) = (eval("bf16"), eval("fp32"));
    println!("eval in bf16 {e16:.5}, in fp32 {e32:.5}");
    assert!((e16 - e32).abs() < 2e-2 && e16 != e32, "{e16} vs {e32}");

    // Greedy sampling under bf16 autocast.
    let sample = kiln_ok(&[
        "sample",
        "--model",
        path_str(&model),
        "--prompt",
        "To be",
        "--tokens",
        "12",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--precision",
        "bf16",
    ]);
    println!("bf16 sample: {sample:?}");
    assert!(sample.starts_with("To be") && sample.trim().len() > "To be".len());
}

/// Data and tensor parallelism keep their equivalence with one process in bf16: dp = 2 and
/// tp = 2 against dp = 1 (2 micro-batches of 4), each in bf16, 12 steps of the tiny model,
/// reading the same samples. The first step starts from the same weights, so its loss
/// agrees to 1e-5. After it, dp = 2 differs from dp = 1 in fp32 only by the order the
/// gradients are summed in (about 1e-7), but each step's bf16 copy of the weights rounds some
/// of those differences to a whole bf16 step (2^-8 relative), so the curves separate to
/// about 1e-4 (measured 1.6e-4 over 12 steps): bound 1e-3. tp = 2 also rounds each rank's
/// partial matmuls to bf16 before the sum over ranks, so even its first step differs (by
/// 6e-5); measured 1.3e-4 over 12 steps, same bound.
#[test]
fn bf16_data_and_tensor_parallel_match_one_process_in_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let job = |name: &str, micro: i64, parallel: &str| {
        in_bf16(&tiny_job(dir.path(), name, micro, parallel, "", 12))
    };
    let base = run(&job("dp1", 4, ""), 1);
    assert_eq!(base.start["precision"], "bf16");
    let dp2 = run(&job("dp2", 4, ""), 2);
    assert!((dp2.losses[0] - base.losses[0]).abs() < 1e-5);
    dp2.assert_matches(&base, 1e-3, "bf16: dp=2 x micro 4 vs dp=1 x 2 x 4");
    let tp2 = run(&job("tp2", 4, "tp = 2"), 2);
    assert_eq!(
        (tp2.start["tp"].as_u64(), tp2.start["precision"].as_str()),
        (Some(2), Some("bf16"))
    );
    tp2.assert_matches(&base, 1e-3, "bf16: tp=2 vs tp=1");
}

/// `kiln doctor` on this (CPU) machine: every check passes or is skipped, the versions are
/// read from the loaded libraries, and bf16 autocast and a bf16 training step are checked.
#[test]
fn doctor_reads_versions_and_checks_bf16() {
    let table = kiln_ok(&["doctor"]);
    println!("{table}");
    for row in [
        "libtorch           ok      2.11.0",
        "bf16 autocast cpu  ok      a linear layer of fp32 weights computes in BFloat16",
        "bf16 training cpu  ok      tiny model, 5 steps",
    ] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }
    let json: serde_json::Value = serde_json::from_str(kiln_ok(&["doctor", "--json"]).trim())
        .expect("kiln doctor --json prints one JSON object");
    let checks = json["checks"].as_array().unwrap();
    let nccl = checks.iter().find(|c| c["name"] == "nccl").unwrap();
    // The torch wheel's NCCL, found without any link made by hand.
    assert_eq!(nccl["status"], "ok", "{nccl}");
    assert!(
        nccl["value"].as_str().unwrap().starts_with("2.28."),
        "{nccl}"
    );
    assert!(checks.iter().all(|c| c["status"] != "fail"), "{json}");
}
