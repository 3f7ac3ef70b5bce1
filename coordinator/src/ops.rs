//! What the client commands do: `kiln submit`, `status [--watch]`, `scale`, `stop`, `logs`,
//! and `kiln local` (a coordinator and N workers on this host).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use kiln_proto::client::{Client, Target};
use kiln_proto::job::JobConfig;
use kiln_proto::rpc;

use crate::agent::status_text;
use crate::machine::Policy;
use crate::service::{self, Config};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error(transparent)]
    Connect(#[from] kiln_proto::client::ConnectError),
    #[error(transparent)]
    Job(#[from] kiln_proto::job::JobError),
    #[error("the coordinator refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Serve(#[from] service::ServeError),
    #[error("{0}")]
    Other(String),
}

fn refused(s: tonic::Status) -> OpsError {
    OpsError::Refused(status_text(&s))
}

/// Reads and checks a job file and resolves its paths against the file's directory (made
/// absolute, since the workers start elsewhere), as the text the workers receive.
pub fn job_text(path: &Path) -> Result<(JobConfig, String), OpsError> {
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .map_err(|e| OpsError::Other(e.to_string()))?
            .join(path)
    };
    let job = JobConfig::load(&abs)?;
    let text = toml::to_string(&job).map_err(|e| OpsError::Other(e.to_string()))?;
    Ok((job, text))
}

pub async fn submit(
    target: &Target,
    job: &Path,
    workers: u32,
    min_workers: u32,
    max_workers: u32,
    queue: bool,
) -> Result<String, OpsError> {
    let (_, text) = job_text(job)?;
    let mut client = target.connect().await?;
    let reply = client
        .submit(rpc::SubmitRequest {
            job_toml: text,
            workers,
            min_workers,
            max_workers,
            queue,
        })
        .await
        .map_err(refused)?;
    Ok(reply.into_inner().job_id)
}

pub async fn scale(target: &Target, job_id: &str, workers: u32) -> Result<String, OpsError> {
    let mut client = target.connect().await?;
    let reply = client
        .scale(rpc::ScaleRequest {
            job_id: job_id.into(),
            workers,
        })
        .await
        .map_err(refused)?;
    Ok(reply.into_inner().message)
}

pub async fn stop(target: &Target, job_id: &str) -> Result<String, OpsError> {
    let mut client = target.connect().await?;
    let reply = client
        .stop(rpc::StopRequest {
            job_id: job_id.into(),
        })
        .await
        .map_err(refused)?;
    Ok(reply.into_inner().message)
}

/// Prints the job's event log; with `follow`, until the job ends.
pub async fn logs(target: &Target, job_id: &str, follow: bool) -> Result<(), OpsError> {
    let mut client = target.connect().await?;
    let mut stream = client
        .logs(rpc::LogsRequest {
            job_id: job_id.into(),
            from_seq: 0,
            follow,
        })
        .await
        .map_err(refused)?
        .into_inner();
    while let Some(entry) = stream.message().await.map_err(refused)? {
        println!("{}", log_line(&entry));
    }
    Ok(())
}

fn log_line(e: &rpc::LogEntry) -> String {
    format!("{} [{}] {}", clock(e.unix_s), e.phase, e.message)
}

/// `HH:MM:SS` (UTC) of a unix time.
fn clock(unix_s: f64) -> String {
    let s = unix_s as u64 % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

pub async fn status_once(target: &Target, job_id: &str) -> Result<rpc::StatusReply, OpsError> {
    let mut client = target.connect().await?;
    let reply = client
        .status(rpc::StatusRequest {
            job_id: job_id.into(),
        })
        .await
        .map_err(refused)?;
    Ok(reply.into_inner())
}

/// One line of a job's status.
pub fn job_line(j: &rpc::JobStatus) -> String {
    let mut line = format!(
        "{}: {} | generation {} | workers {} of {} (tp {}) | checkpoint step {}",
        j.job_id, j.phase, j.generation, j.world, j.desired_workers, j.tp, j.committed_step
    );
    if let Some(p) = &j.progress {
        line.push_str(&format!(
            " | step {}/{} loss {:.4} {:.0} tok/s MFU {:.1}%",
            p.step,
            p.steps,
            p.loss,
            p.tokens_per_s,
            100.0 * p.mfu
        ));
        if p.val_step > 0 {
            line.push_str(&format!(
                " | validation loss {:.4} at step {}",
                p.val_loss, p.val_step
            ));
        }
        if p.step_seconds > 0.0 {
            line.push_str(&format!("\n  {}", breakdown(p)));
        }
    }
    if j.restarts > 0 {
        line.push_str(&format!(" | {} restarts", j.restarts));
    }
    if !j.stragglers.is_empty() {
        line.push_str(&format!(" | stragglers: ranks {:?}", j.stragglers));
    }
    if !j.message.is_empty() {
        line.push_str(&format!("\n  {}", j.message));
    }
    line
}

/// The step time and where it went, with the gradient norm and learning rate:
/// `520 ms/step: data 1% | forward 30% | ... | grad norm 0.91 | lr 3.0e-3`.
pub fn breakdown(p: &rpc::Progress) -> String {
    let mut line = format!("{:.0} ms/step:", p.step_seconds * 1e3);
    if let Some(ph) = &p.phases {
        let parts = [
            ("data", ph.data_wait),
            ("forward", ph.forward),
            ("backward", ph.backward),
            ("collective", ph.collective),
            ("optimizer", ph.optimizer),
            ("checkpoint", ph.checkpoint),
        ];
        let shares: Vec<String> = parts
            .iter()
            .map(|(name, s)| format!("{name} {:.0}%", 100.0 * s / p.step_seconds.max(1e-9)))
            .collect();
        line.push(' ');
        line.push_str(&shares.join(" "));
    }
    line.push_str(&format!(
        " | grad norm {:.3} | lr {:.2e}",
        p.grad_norm, p.lr
    ));
    line
}

pub async fn status(target: &Target, job_id: &str) -> Result<(), OpsError> {
    let s = status_once(target, job_id).await?;
    if s.jobs.is_empty() {
        println!("no jobs");
    }
    for j in &s.jobs {
        println!("{}", job_line(j));
    }
    if job_id.is_empty() {
        println!("{} workers", s.workers.len());
        for w in &s.workers {
            println!(
                "  {} on {}: {}{} (heard from {:.1} s ago)",
                w.worker_id,
                w.host,
                w.state,
                if w.job_id.is_empty() {
                    String::new()
                } else {
                    format!(" {} rank {}", w.job_id, w.rank)
                },
                w.last_seen_s
            );
        }
    }
    Ok(())
}

/// Follows a job with a progress bar (step, loss, tokens/s, MFU, workers, last checkpoint)
/// and its event log above it, until it ends. Returns its final status.
pub async fn watch(target: &Target, job_id: &str) -> Result<rpc::JobStatus, OpsError> {
    let mut client = target.connect_lazy()?;
    let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} steps {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut next_seq = 0u64;
    let mut unreachable = false;
    let mut last_print = std::time::Instant::now();
    let mut last_step = 0;
    loop {
        let status = client
            .status(rpc::StatusRequest {
                job_id: job_id.into(),
            })
            .await;
        let job = match status {
            Ok(s) => {
                if unreachable {
                    bar.println("the coordinator is back");
                    unreachable = false;
                }
                s.into_inner().jobs.into_iter().next()
            }
            Err(s) if s.code() == tonic::Code::NotFound => return Err(refused(s)),
            Err(s) => {
                if !unreachable {
                    bar.println(format!(
                        "cannot reach the coordinator: {}; retrying",
                        status_text(&s)
                    ));
                    unreachable = true;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Ok(stream) = client
            .logs(rpc::LogsRequest {
                job_id: job_id.into(),
                from_seq: next_seq,
                follow: false,
            })
            .await
        {
            let mut stream = stream.into_inner();
            while let Ok(Some(e)) = stream.message().await {
                next_seq = e.seq + 1;
                let line = log_line(&e);
                if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
            }
        }
        let Some(job) = job else {
            return Err(OpsError::Other(format!("no job {job_id}")));
        };
        bar.set_length(job.steps);
        if let Some(p) = &job.progress {
            let val = if p.val_step > 0 {
                format!(" | val {:.4}", p.val_loss)
            } else {
                String::new()
            };
            let mut health = String::new();
            if job.restarts > 0 {
                health.push_str(&format!(" | {} recoveries", job.restarts));
            }
            if !job.stragglers.is_empty() {
                health.push_str(&format!(" | stragglers: ranks {:?}", job.stragglers));
            }
            let message = format!(
                "loss {:.4}{val} | {:.0} tok/s | MFU {:.1}% | {} workers (tp {}) | checkpoint {} | {}{health}\n  {}",
                p.loss,
                p.tokens_per_s,
                100.0 * p.mfu,
                job.world,
                job.tp,
                job.committed_step,
                job.phase,
                breakdown(p)
            );
            bar.set_position(p.step);
            // Without a terminal, a progress line every 10 s instead of the bar.
            if bar.is_hidden()
                && p.step != last_step
                && (last_print.elapsed() >= Duration::from_secs(10) || p.step == p.steps)
            {
                println!("step {}/{} | {message}", p.step, p.steps);
                last_print = std::time::Instant::now();
                last_step = p.step;
            }
            bar.set_message(message);
        } else {
            bar.set_message(job.phase.clone());
        }
        if matches!(job.phase.as_str(), "completed" | "failed" | "stopped") {
            bar.finish_and_clear();
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `kiln local`: a coordinator on loopback and `workers` worker processes on this host,
/// running one job to its end.
pub struct Local {
    pub job: PathBuf,
    pub workers: u32,
    pub exe: PathBuf,
    /// Where the coordinator keeps its state (default: `output.dir/coordinator`).
    pub state_url: Option<String>,
    pub heartbeat_timeout: Duration,
    /// Serve the coordinator's Prometheus metrics here.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

pub async fn local(options: Local) -> Result<rpc::JobStatus, OpsError> {
    let (job, text) = job_text(&options.job)?;
    let state_url = options.state_url.clone().unwrap_or_else(|| {
        job.output
            .dir
            .join("coordinator")
            .to_string_lossy()
            .into_owned()
    });
    let token = random_token();
    let running = service::start(Config {
        listen: "127.0.0.1:0".parse().expect("an address"),
        token: token.clone(),
        state_url,
        policy: Policy {
            heartbeat_timeout_s: options.heartbeat_timeout.as_secs_f64(),
            ..Policy::default()
        },
        heartbeat_interval: Duration::from_millis(500),
        tls: None,
        metrics_listen: options.metrics_listen,
        data_check: crate::preflight::DataCheck::Read,
    })
    .await?;
    let url = format!("http://{}", running.addr);
    if let Some(at) = running.metrics_addr {
        eprintln!("metrics on http://{at}/metrics");
    }
    eprintln!(
        "coordinator on {url}; starting {} workers for {}",
        options.workers, job.name
    );
    let mut children = Vec::new();
    // Like torchrun: several training processes on one host share its cores.
    let threads = crate::agent::threads_per_process(options.workers as usize);
    for i in 0..options.workers {
        let mut cmd = tokio::process::Command::new(&options.exe);
        if let Some(t) = threads {
            cmd.env("OMP_NUM_THREADS", t.to_string());
        }
        let child = cmd
            .args(["worker", "--coordinator", &url, "--host", "127.0.0.1"])
            .args(["--name", &format!("worker {i}"), "--exit-with-stdin"])
            .env("KILN_TOKEN", &token)
            // Held open until the job ends: if this process dies, its workers see their
            // stdin close and stop too.
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| OpsError::Other(format!("cannot start a worker: {e}")))?;
        children.push(child);
    }
    let target = Target {
        url: url.clone(),
        token,
        tls_ca: None,
    };
    let run = async {
        let mut client: Client = target.connect().await?;
        let id = client
            .submit(rpc::SubmitRequest {
                job_toml: text,
                workers: options.workers,
                min_workers: 1,
                max_workers: 0,
                queue: false,
            })
            .await
            .map_err(refused)?
            .into_inner()
            .job_id;
        eprintln!("submitted {id}");
        tokio::select! {
            outcome = watch(&target, &id) => outcome,
            _ = tokio::signal::ctrl_c() => Err(OpsError::Other(format!(
                "interrupted; the workers are stopped, and {id} continues from its newest checkpoint when run again"
            ))),
        }
    };
    // However it ends (a refused job included), the workers are stopped as below.
    let outcome = run.await;
    // Closing a worker's stdin stops it (`--exit-with-stdin`): it removes its temporary
    // folder and exits. One that has not within 10 s is killed, and its folder removed here.
    let pids: Vec<Option<u32>> = children.iter().map(|c| c.id()).collect();
    for c in &mut children {
        drop(c.stdin.take());
    }
    for (c, pid) in children.iter_mut().zip(pids) {
        if tokio::time::timeout(Duration::from_secs(10), c.wait())
            .await
            .is_err()
        {
            let _ = c.kill().await;
        }
        if let Some(pid) = pid {
            let _ = std::fs::remove_dir_all(crate::agent::default_work_dir(pid));
        }
    }
    running.shutdown();
    outcome
}

/// 32 random hex characters from the OS.
pub fn random_token() -> String {
    let mut bytes = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut bytes);
    }
    if bytes == [0u8; 16] {
        // No /dev/urandom: the clock and the process id, which is enough on loopback.
        let t = service::now().to_bits() ^ u64::from(std::process::id());
        bytes[..8].copy_from_slice(&t.to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakdown_shows_each_phase_as_a_share_of_the_step() {
        let p = rpc::Progress {
            step_seconds: 0.5,
            grad_norm: 0.912,
            lr: 0.003,
            phases: Some(rpc::StepPhases {
                data_wait: 0.005,
                forward: 0.15,
                backward: 0.275,
                collective: 0.02,
                optimizer: 0.05,
                checkpoint: 0.0,
            }),
            ..Default::default()
        };
        assert_eq!(
            breakdown(&p),
            "500 ms/step: data 1% forward 30% backward 55% collective 4% optimizer 10% checkpoint 0% | grad norm 0.912 | lr 3.00e-3"
        );
    }
}
