//! The `kiln-control` binary: it links no libtorch (read from the dynamic loader with `ldd`),
//! and runs a real coordinator that its own client commands reach.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_kiln-control");

/// The shared libraries the dynamic loader resolves for the binary.
fn linked_libraries() -> String {
    let out = Command::new("ldd")
        .arg(BIN)
        .output()
        .expect("ldd runs (it comes with glibc)");
    assert!(out.status.success(), "ldd {BIN} failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_control_binary_links_no_libtorch_and_no_python() {
    let libs = linked_libraries();
    // It is a dynamically linked executable that ldd could read...
    assert!(libs.contains("libc.so"), "{libs}");
    // ...and none of libtorch's libraries (nor Python's, nor CUDA's) is among its needs.
    for lib in [
        "libtorch",
        "libc10",
        "libpython",
        "libcuda",
        "libnccl",
        "libgomp",
    ] {
        assert!(
            !libs.contains(lib),
            "kiln-control needs {lib}; the control plane must not link libtorch:\n{libs}"
        );
    }
}

#[test]
fn the_control_binary_runs_a_coordinator_its_clients_reach() {
    let state = tempfile::tempdir().unwrap();
    // No LD_LIBRARY_PATH and no Python on PATH: nothing of torch can be found at run time.
    let mut coordinator = Command::new(BIN)
        .args([
            "coordinator",
            "--listen",
            "127.0.0.1:0",
            "--token",
            "t0k",
            "--state",
        ])
        .arg(state.path())
        .env_remove("LD_LIBRARY_PATH")
        .env("PATH", "/usr/bin:/bin")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(coordinator.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .strip_prefix("kiln coordinator listening on ")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    let status = Command::new(BIN)
        .args([
            "status",
            "--coordinator",
            &format!("http://{addr}"),
            "--token",
            "t0k",
        ])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    let stop = Command::new(BIN)
        .args([
            "stop",
            "nosuchjob",
            "--coordinator",
            &format!("http://{addr}"),
        ])
        .args(["--token", "t0k"])
        .output()
        .unwrap();
    coordinator.kill().unwrap();
    coordinator.wait().unwrap();
    assert!(status.status.success(), "{status:?}");
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("no jobs"), "{stdout}");
    assert!(!stop.status.success());
    let stderr = String::from_utf8_lossy(&stop.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("nosuchjob"), "{stderr}");
}

#[test]
fn the_control_binary_offers_the_control_commands_only() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for command in [
        "coordinator",
        "submit",
        "status",
        "scale",
        "stop",
        "logs",
        "report",
    ] {
        assert!(help.contains(&format!("  {command} ")), "{help}");
    }
    for command in ["train", "prepare", "worker", "sample"] {
        assert!(!help.contains(&format!("  {command} ")), "{help}");
    }
}
