//! `kiln report`: the page of a real run's metrics log, checked as HTML and rendered by
//! headless Chromium (`chromium-headless-shell`, installed by scripts/test-deps.sh). The
//! page and its screenshot stay in `target/kiln-report/` for a reader to open.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `target/kiln-report/`, beside the target directory's `tmp/`.
fn keep_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target directory")
        .join("kiln-report");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// How many vertices the polylines of `series` hold, over all their segments.
fn points(html: &str, series: &str) -> usize {
    html.split(&format!("<polyline data-series=\"{series}\" points=\""))
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap().split_whitespace().count())
        .sum()
}

/// Renders `html` at 1280 pixels wide into `png` with headless Chromium.
fn screenshot(html: &Path, png: &Path) {
    let _ = std::fs::remove_file(png);
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new("chromium-headless-shell")
        .args([
            "--no-sandbox",
            "--headless",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            "--window-size=1280,2200",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--screenshot={}", png.display()))
        .arg(format!("file://{}", html.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("chromium-headless-shell does not start ({e}): run scripts/test-deps.sh")
        });
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium-headless-shell did not finish the screenshot in 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap_or_default();
    assert!(
        status.success(),
        "chromium-headless-shell failed:\n{stderr}"
    );
}

/// The width and height in a PNG's IHDR chunk, which must come first.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.len() > 24, "{} bytes is no PNG", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "no PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "the first chunk is not IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&bytes[16..20]), be(&bytes[20..24]))
}

#[test]
fn report_of_a_real_run_renders_in_chromium() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job_with(dir.path(), "report-run", 8, 8, "", "every = 4", 12);
    kiln_ok(&["train", path_str(&job), "--quiet"]);
    let out = output_dir(&job);
    let metrics = read_metrics(&out.join("metrics.jsonl"));
    let steps: BTreeSet<i64> = metrics
        .iter()
        .filter(|m| m["type"] == "step")
        .map(|m| m["step"].as_i64().unwrap())
        .collect();
    let evals = metrics.iter().filter(|m| m["type"] == "eval").count();
    let checkpoints = metrics.iter().filter(|m| m["type"] == "checkpoint").count();
    assert_eq!(steps.len(), 12);
    assert!(evals > 0 && checkpoints > 0, "{metrics:?}");

    let keep = keep_dir();
    let html_path = keep.join("report.html");
    let printed = kiln_ok(&["report", path_str(&out), "-o", path_str(&html_path)]);
    assert_eq!(printed.trim(), format!("wrote {}", html_path.display()));
    let html = std::fs::read_to_string(&html_path).unwrap();
    assert_eq!(
        html.matches("<svg").count(),
        3,
        "one plot each for loss, throughput, step time"
    );
    assert_eq!(
        points(&html, "loss"),
        steps.len(),
        "a point per logged step"
    );
    assert_eq!(points(&html, "tokens_per_s"), steps.len());
    assert_eq!(points(&html, "val_loss"), evals);
    for external in ["http://", "https://"] {
        assert!(!html.contains(external), "the page refers to {external}");
    }
    for phase in [
        "data_wait",
        "forward",
        "backward",
        "optimizer",
        "checkpoint",
    ] {
        assert!(
            html.contains(&format!("<polygon data-series=\"{phase}\"")),
            "no {phase} area"
        );
    }
    assert!(html.contains("12 / 12") && html.contains("finished, model saved"));
    assert_eq!(html.matches("<tr><td>").count(), checkpoints);

    // From the job file: the same log, found in output.dir, and the job's name.
    let from_job = keep.join("report-job.html");
    kiln_ok(&["report", path_str(&job), "-o", path_str(&from_job)]);
    let html = std::fs::read_to_string(&from_job).unwrap();
    assert!(html.contains("<h1>report-run</h1>"));
    assert_eq!(points(&html, "loss"), steps.len());

    let png = keep.join("report.png");
    screenshot(&html_path, &png);
    let bytes = std::fs::read(&png).unwrap();
    let (width, height) = png_size(&bytes);
    assert_eq!(width, 1280);
    assert!(height > 0);
    println!("report: {}", html_path.display());
    println!("screenshot: {}", png.display());
}

#[test]
fn report_without_a_log_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let run = path_str(dir.path());
    let page = dir.path().join("page/report.html");
    let page = path_str(&page);
    let err = kiln_err(&["report", run, "-o", page]);
    assert!(
        err.contains(&format!("no metrics log at {run}: expected metrics.jsonl")),
        "{err}"
    );
    let log = dir.path().join("metrics.jsonl");
    std::fs::write(&log, "").unwrap();
    let err = kiln_err(&["report", run, "-o", page]);
    assert!(err.contains("is empty"), "{err}");
    std::fs::write(
        &log,
        "{\"type\":\"start\",\"world\":1}\n{\"type\":\"step\",\"step\":1,\"loss\":9.0}\n{\"type\":\"step\",\"loss\":}\n{\"type\":\"step\",\"step\":3,\"loss\":8.0}\n",
    )
    .unwrap();
    let err = kiln_err(&["report", path_str(&log), "-o", page]);
    assert!(
        err.contains(&format!(
            "malformed metrics log {}, line 3: not JSON",
            log.display()
        )),
        "{err}"
    );
    assert!(!Path::new(page).exists());
}
