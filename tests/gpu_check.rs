//! `benches/gpu/check.sh`, the GPU benchmark, run through its CPU dry run (the same stages on
//! the `tiny` preset): the jobs it writes train, its parsers read Kiln's metrics log and the
//! PyTorch peer's line, and what a GPU call brings back (the table, one JSON line per stage,
//! the logs) is in `$OUT`. A second run under a deadline too short for the training stages
//! marks them skipped and still writes the table. No timing is asserted.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Runs check.sh on the CPU for the `tiny` preset with `env` added; returns the table and the
/// stages' JSON lines, in order, after checking that the script succeeded.
fn check(out: &Path, env: &[(&str, &std::ffi::OsStr)]) -> (String, Vec<Value>) {
    let work = tempfile::tempdir().unwrap();
    let run = std::process::Command::new("bash")
        .arg(root().join("benches/gpu/check.sh"))
        .envs([
            ("DEVICE", "cpu"),
            ("PRESETS", "tiny:2:2"),
            ("SEQ", "64"),
            ("STEPS", "6"),
            ("KILN", env!("CARGO_BIN_EXE_kiln")),
        ])
        .env("WORK", work.path())
        .env("OUT", out)
        .envs(env.iter().copied())
        .output()
        .expect("bash starts");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "check.sh failed:\n{stdout}\n{stderr}");
    let table = std::fs::read_to_string(out.join("gpu-check.md")).unwrap();
    let results: Vec<Value> = std::fs::read_to_string(out.join("results.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let stages: Vec<&str> = results
        .iter()
        .map(|r| r["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        [
            "doctor",
            "ceiling",
            "parity",
            "kiln-tiny",
            "torch-eager-tiny",
            "torch-compile-tiny"
        ],
        "{table}"
    );
    // Every stage ended one way or another, in the table as in the JSON lines.
    for r in &results {
        let status = r["status"].as_str().unwrap();
        assert!(
            status == "passed" || status.starts_with("failed: ") || status.starts_with("skipped ("),
            "{r}"
        );
        let row = format!("| {} | {status} |", r["stage"].as_str().unwrap());
        assert!(table.contains(&row), "no {row:?} in:\n{table}");
    }
    assert!(
        !table.contains("not reached") && !table.contains("running"),
        "{table}"
    );
    // What comes back stays within a device call's limits (8 files).
    let files = std::fs::read_dir(out).unwrap().count();
    assert!(files <= 8, "{files} files in $OUT");
    (table, results)
}

fn stage<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results.iter().find(|r| r["stage"] == name).unwrap()
}

#[test]
fn the_gpu_check_runs_end_to_end_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let (table, results) = check(
        out.path(),
        &[
            ("COMPILE", "0".as_ref()),
            ("DATA", four_plays().as_os_str()),
        ],
    );

    // `kiln doctor` passes on this machine.
    let doctor = stage(&results, "doctor");
    assert_eq!(doctor["status"], "passed", "{doctor}");
    assert!(out.path().join("doctor.txt").is_file());

    assert_eq!(stage(&results, "ceiling")["status"], "passed");
    assert!(
        stage(&results, "ceiling")["result"]["ceiling_tflops"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    // Parity: CPU bf16 against CPU fp32, the precision read back from libtorch.
    let parity = stage(&results, "parity");
    assert_eq!(parity["status"], "passed", "{parity}");
    let r = &parity["result"];
    assert!(
        r["max_abs_diff"].as_f64().unwrap() <= r["tolerance_abs"].as_f64().unwrap(),
        "{r}"
    );
    assert_eq!(
        r["loss_fp32_cpu_vs_bf16"].as_array().unwrap().len(),
        5,
        "{r}"
    );
    assert_eq!(
        (&r["run"]["bf16"], &r["run"]["precision"]),
        (&serde_json::json!(true), &serde_json::json!("bf16")),
        "{r}"
    );

    let kiln = stage(&results, "kiln-tiny");
    assert_eq!(kiln["status"], "passed", "{kiln}");
    let kiln = &kiln["result"];
    assert_eq!(kiln["preset"], "tiny");
    assert!(kiln["tokens_per_s"].as_f64().unwrap() > 0.0, "{kiln}");
    // A checkpoint two thirds of the way (step 4) and at the end.
    assert_eq!(
        kiln["checkpoint_pause_s"].as_array().unwrap().len(),
        2,
        "{kiln}"
    );
    assert!(kiln["peak_memory_mib"].as_i64().unwrap() > 0, "{kiln}");

    let eager = stage(&results, "torch-eager-tiny");
    assert_eq!(eager["status"], "passed", "{eager}");
    assert_eq!(eager["result"]["system"], "pytorch-eager", "{eager}");
    assert_eq!(
        stage(&results, "torch-compile-tiny")["status"],
        "skipped (COMPILE=0)"
    );

    for row in [
        "| tiny | kiln | 2 x 64 |",
        "| tiny | pytorch-eager | 2 x 64 |",
    ] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }
    // The Kiln run's metrics log, tagged with its stage, and each stage's log tail.
    let metrics = std::fs::read_to_string(out.path().join("metrics.jsonl")).unwrap();
    let steps = metrics
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["stage"] == "kiln-tiny" && e["type"] == "step")
        .count();
    assert_eq!(steps, 6);
    let log = std::fs::read_to_string(out.path().join("log.txt")).unwrap();
    for header in [
        "==== setup ====",
        "==== kiln-tiny: passed",
        "==== torch-eager-tiny: passed",
    ] {
        assert!(log.contains(header), "no {header:?} in:\n{log}");
    }
}

#[test]
fn a_short_deadline_skips_the_remaining_stages_and_still_writes_the_table() {
    // 12 s less the 5 s kept for the table: fewer than parity's 10 s minimum are left from
    // the start, so parity and everything after it are skipped whatever this machine's speed.
    let out = tempfile::tempdir().unwrap();
    let (table, results) = check(
        out.path(),
        &[
            ("DEADLINE_S", "12".as_ref()),
            ("COMPILE", "1".as_ref()),
            ("DATA", "/nonexistent".as_ref()),
        ],
    );
    for name in ["parity", "kiln-tiny", "torch-eager-tiny"] {
        assert_eq!(
            stage(&results, name)["status"],
            "skipped (deadline)",
            "{table}"
        );
        let row = format!("| {name} | skipped (deadline) |");
        assert!(table.contains(&row), "no {row:?} in:\n{table}");
    }
    // The compiled peer: skipped for the deadline, or for want of a C compiler here.
    let compiled = stage(&results, "torch-compile-tiny")["status"]
        .as_str()
        .unwrap();
    assert!(
        compiled == "skipped (deadline)" || compiled == "skipped (no C compiler)",
        "{table}"
    );
    // No throughput table without a finished run.
    assert!(!table.contains("| preset | system |"), "{table}");
}
