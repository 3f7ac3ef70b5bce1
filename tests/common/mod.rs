//! Shared by Kiln's integration tests: the real `kiln` binary, the repository's Python (with
//! torch and transformers, installed by scripts/setup.sh) and the Shakespeare corpus (fetched
//! by scripts/fetch-shakespeare.sh).
#![allow(dead_code)]

pub mod ports;
pub mod ranks;

#[allow(unused_imports)]
pub use ports::*;
#[allow(unused_imports)]
pub use ranks::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh --no-build first",
        p.display()
    );
    p
}

/// Runs a script under tests/python and panics with its output if it fails.
pub fn run_python(script: &str, args: &[&str]) {
    let out = Command::new(python())
        .arg(root().join("tests/python").join(script))
        .args(args)
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The directory of Project Gutenberg plays.
pub fn shakespeare_dir() -> PathBuf {
    let dir = std::env::var_os("KILN_SHAKESPEARE")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/shakespeare/shksprdata/texts"));
    assert!(
        dir.join("hamlet_gut.txt").is_file(),
        "the Shakespeare corpus is missing at {}: run scripts/fetch-shakespeare.sh",
        dir.display()
    );
    dir
}

/// Runs `kiln ARGS` and returns its output, whatever the exit status.
pub fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("kiln starts")
}

/// Runs `kiln ARGS`, panicking with its stderr unless it succeeds; returns stdout.
pub fn kiln_ok(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(
        out.status.success(),
        "kiln {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `kiln ARGS`, expecting failure; returns stderr.
pub fn kiln_err(args: &[&str]) -> String {
    let out = kiln(args);
    assert!(
        !out.status.success(),
        "kiln {args:?} should have failed but printed:\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Prepares GPT-2 shards from the given plays (file names under the corpus) into `out`.
pub fn prepare_plays(plays: &[&str], out: &Path, val_fraction: f64) {
    let dir = shakespeare_dir();
    let mut args: Vec<String> = vec!["prepare".into()];
    args.extend(plays.iter().map(|p| path_str(&dir.join(p)).to_owned()));
    args.extend([
        "-o".into(),
        path_str(out).to_owned(),
        "--val-fraction".into(),
        val_fraction.to_string(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    kiln_ok(&args);
}

/// Runs a benchmark script (`bash benches/NAME ARGS` with `env`), panicking with its output
/// unless it succeeds; returns its stdout and the JSON objects it printed one a line.
pub fn run_bench(
    script: &str,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
) -> (String, Vec<serde_json::Value>) {
    let out = Command::new("bash")
        .arg(root().join("benches").join(script))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("bash starts");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "benches/{script} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("JSON lines"))
        .collect();
    (stdout, lines)
}

/// One JSON object per line of a metrics log.
pub fn read_metrics(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .lines()
        .map(|l| serde_json::from_str(l).expect("metrics lines are JSON"))
        .collect()
}

/// GPT-2 shards of four plays (one held out for validation), prepared once per test binary.
pub fn four_plays() -> &'static Path {
    static DATA: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DATA.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let data = dir.join("data");
        prepare_plays(
            &[
                "hamlet_gut.txt",
                "macbeth_gut.txt",
                "othello_gut.txt",
                "lear_gut.txt",
            ],
            &data,
            0.25,
        );
        data
    })
}

/// Points the object-store client at the S3 server `scripts/test.sh` starts (SeaweedFS).
pub fn s3_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let endpoint = std::env::var("KILN_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
            panic!(
                "KILN_TEST_S3_ENDPOINT is unset: run scripts/test.sh, which starts SeaweedFS, or \
                 `eval \"$(scripts/seaweedfs.sh /tmp/weed.pid)\"` first"
            )
        });
        for (k, v) in [
            ("AWS_ENDPOINT", endpoint.as_str()),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", "AK"),
            ("AWS_SECRET_ACCESS_KEY", "SK"),
            ("AWS_REGION", "us-east-1"),
        ] {
            std::env::set_var(k, v);
        }
    });
}
