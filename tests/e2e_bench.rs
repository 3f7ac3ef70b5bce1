//! `benches/e2e.sh`, the end-to-end benchmark against PyTorch DDP, run for a few steps: both
//! systems must train the same job (the same samples at every step, checked by the
//! script against Kiln's ledger) to the same loss, or the benchmark's comparison means
//! nothing. No timing is asserted; the measured numbers are in `benches/RESULTS.md`.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn the_e2e_benchmark_trains_the_same_samples_to_the_same_loss_in_both_systems() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, lines) = run_bench(
        "e2e.sh",
        &["demo", "4", "1"],
        &[
            ("KILN_BIN", env!("CARGO_BIN_EXE_kiln").as_ref()),
            ("E2E_DATA", four_plays().as_os_str()),
            ("E2E_DIR", dir.path().as_os_str()),
            ("SKIP", "1".as_ref()),
        ],
    );
    let run = |system: &str| -> &Value {
        lines
            .iter()
            .find(|l| l["system"] == system)
            .unwrap_or_else(|| panic!("no {system} run in:\n{stdout}"))
    };
    let (kiln, ddp) = (run("kiln"), run("ddp"));
    for r in [kiln, ddp] {
        assert_eq!(r["steps"], 4, "{r}");
        assert_eq!(r["same_samples_as_other_runs"], true, "{r}");
        assert_eq!(r["train_processes"], 2, "{r}");
        assert_eq!(r["train_peak_rss_mib"].as_array().unwrap().len(), 2, "{r}");
        assert!(r["tokens_per_s"].as_f64().unwrap() > 0.0, "{r}");
    }
    let loss = |r: &Value| r["loss_final"].as_f64().unwrap();
    assert!(
        (loss(kiln) - loss(ddp)).abs() < 1e-3 * loss(ddp),
        "Kiln's loss {} vs DDP's {}",
        loss(kiln),
        loss(ddp)
    );
    // Both trained: a fresh model starts at about ln(50257) = 10.82.
    assert!(loss(kiln) < 10.8, "loss {}", loss(kiln));
    let summary = lines
        .iter()
        .find_map(|l| l.get("summary"))
        .expect("a summary line");
    assert_eq!(summary["same_samples"], true);
    assert!(stdout.contains("| `benches/e2e.sh demo 4 1` |"), "{stdout}");
}
