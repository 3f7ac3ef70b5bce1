//! A training process run by a supervisor (the worker agent of `kiln worker`), which
//! speaks to it over its standard streams:
//!
//! - stdout: one JSON object per line: every [`Event`] of this rank, and
//!   [`Event::RankObjectWritten`] (`{"type":"shard_written","step":N}`) when its checkpoint object
//!   of step N is written;
//! - stdin: `commit N` lines (rank 0 may write step N's manifest: phase two of the commit).
//!   End of input means the supervisor is gone: the process aborts at once, so no rank
//!   outlives its agent.

use std::io::{BufRead, Write};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::checkpoint::CommitGate;
use kiln_proto::run::Event;

/// Writes one line to stdout, whole.
pub fn print_line(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{value}");
    let _ = out.flush();
}

pub fn print_event(event: &Event) {
    print_line(&serde_json::to_value(event).unwrap_or_default());
}

/// The commit gate fed by `commit N` lines on stdin.
pub struct StdinGate {
    allowed: Mutex<u64>,
    changed: Condvar,
}

impl StdinGate {
    /// Starts reading stdin.
    pub fn start() -> Arc<Self> {
        let gate = Arc::new(StdinGate {
            allowed: Mutex::new(0),
            changed: Condvar::new(),
        });
        let g = gate.clone();
        std::thread::Builder::new()
            .name("kiln-supervisor".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let Ok(line) = line else { break };
                    if let Some(step) = line
                        .strip_prefix("commit ")
                        .and_then(|n| n.trim().parse::<u64>().ok())
                    {
                        let mut allowed = g.allowed.lock().unwrap_or_else(|p| p.into_inner());
                        *allowed = (*allowed).max(step);
                        g.changed.notify_all();
                    }
                }
                // Its stderr may be gone with it: never panic on writing the farewell.
                let _ = writeln!(
                    std::io::stderr(),
                    "error: the worker agent that started this rank is gone; stopping"
                );
                // Not `exit`: static destructors would run under the training thread's
                // feet. Nothing is lost: only committed checkpoints count.
                std::process::abort();
            })
            .expect("a thread starts");
        gate
    }
}

impl CommitGate for StdinGate {
    fn written(&self, step: u64) {
        print_event(&Event::RankObjectWritten { step });
    }

    fn wait_commit(&self, step: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut allowed = self.allowed.lock().unwrap_or_else(|p| p.into_inner());
        while *allowed < step {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "the coordinator did not commit step {step} within {} s",
                    timeout.as_secs()
                ));
            }
            allowed = self
                .changed
                .wait_timeout(allowed, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }
}
