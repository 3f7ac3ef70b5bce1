//! The deployment files in deploy/: the Kubernetes manifests rendered by kustomize and checked
//! offline against the API schemas of Kubernetes 1.30 (unknown or misspelled fields fail),
//! and the Slurm batch script run for real on a single-node Slurm started here (munged,
//! slurmctld and slurmd as root, on 127.0.0.1), training a 2-worker job to completion.
//! Each in a module of its own under tests/deploy/, with tokenizing across machines on both.

mod common;
#[path = "deploy/kubernetes.rs"]
mod kubernetes;
#[path = "deploy/prepare.rs"]
mod prepare;
#[path = "deploy/slurm.rs"]
mod slurm;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use common::*;
use kubernetes::*;
use serde_json::Value;
use slurm::*;

pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A process started here, stopped (SIGTERM, then SIGKILL) by PID when dropped.
pub struct Daemon {
    name: &'static str,
    child: Option<Child>,
}

impl Daemon {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Daemon {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        Daemon {
            name,
            child: Some(child),
        }
    }

    /// What the daemon says in the file `log` its output goes to (see [`announced`]).
    pub fn announced(
        &mut self,
        log: &Path,
        what: &str,
        find: impl Fn(&str) -> Option<String>,
    ) -> String {
        announced(self.child.as_mut().expect("running"), log, what, find)
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} ignored SIGTERM: killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}
