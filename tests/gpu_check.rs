//! `benches/gpu/check.sh`, the GPU benchmark, run through its CPU dry run (the same steps on
//! the `tiny` preset): the job it writes trains, its parser reads Kiln's metrics log and the
//! PyTorch peer's line, and the table and the archive a GPU run brings back are produced.
//! No timing is asserted.

mod common;

use common::*;

#[test]
fn the_gpu_check_runs_end_to_end_on_the_cpu() {
    let (work, dest) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let out = std::process::Command::new("bash")
        .arg(root().join("benches/gpu/check.sh"))
        .envs([
            ("DEVICE", "cpu"),
            ("PRESETS", "tiny:2:2"),
            ("SEQ", "64"),
            ("STEPS", "6"),
            ("COMPILE", "0"),
            ("KILN", env!("CARGO_BIN_EXE_kiln")),
        ])
        .env("DATA", four_plays())
        .env("WORK", work.path())
        .env("OUT", dest.path())
        .output()
        .expect("bash starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "check.sh failed:\n{stdout}\n{stderr}");

    let kiln: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.path().join("kiln-tiny.json")).unwrap())
            .unwrap();
    assert_eq!(kiln["preset"], "tiny");
    assert!(kiln["tokens_per_s"].as_f64().unwrap() > 0.0, "{kiln}");
    // A checkpoint two thirds of the way (step 4) and at the end.
    assert_eq!(
        kiln["checkpoint_pause_s"].as_array().unwrap().len(),
        2,
        "{kiln}"
    );
    assert!(kiln["peak_memory_mib"].as_i64().unwrap() > 0, "{kiln}");

    let table = std::fs::read_to_string(dest.path().join("gpu-check.md")).unwrap();
    for row in [
        "| tiny | kiln | 2 x 64 |",
        "| tiny | pytorch-eager | 2 x 64 |",
    ] {
        assert!(table.contains(row), "no {row:?} in:\n{table}");
    }
    let archive = dest.path().join("gpu-check.tar.gz");
    let list = std::process::Command::new("tar")
        .arg("tzf")
        .arg(&archive)
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for name in [
        "ceiling.json",
        "kiln-tiny.json",
        "torch-eager-tiny.json",
        "kiln-tiny/log.txt",
    ] {
        assert!(
            list.contains(name),
            "{name} missing from the archive:\n{list}"
        );
    }
    // Only the table and the archive come back.
    assert_eq!(std::fs::read_dir(dest.path()).unwrap().count(), 2);
}
