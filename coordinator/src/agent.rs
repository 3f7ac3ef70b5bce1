//! The worker agent of `kiln worker`: registers with the coordinator, heartbeats, and runs
//! each assignment as a training process (`kiln train --supervised`) that it watches and,
//! on the coordinator's word, kills at once. The training process keeps running while the
//! coordinator is away; the agent keeps heartbeating until it is back, then registers
//! again under its old id with what it is running.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::client::{source_chain, Client, Target};
use kiln_proto::control::{Assignment, Command, Reply, WorkerReport, WorkerState};
use kiln_proto::rpc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin};
use tokio::sync::Notify;

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub target: Target,
    /// The address other workers reach this host at (its ring listens there).
    pub host: String,
    /// The `kiln` executable that runs training processes.
    pub exe: PathBuf,
    /// Where job files and per-generation logs go.
    pub work_dir: PathBuf,
    /// This agent's GPU among the host's (`LOCAL_RANK` of its training processes).
    pub local_rank: Option<usize>,
    /// A name for messages.
    pub label: String,
    /// CPU threads of each training process (`OMP_NUM_THREADS`), when this host runs
    /// several; `None`: libtorch's default (every core) or the environment's.
    pub threads: Option<usize>,
    /// Host memory this process may hold ranks' snapshots in (`checkpoint.memory_every`),
    /// its own ranks' and its peers'. 0: it keeps none and offers no address for them.
    pub memory_budget_mb: u64,
}

/// The default of `kiln worker --memory-budget-mb`.
pub const DEFAULT_MEMORY_BUDGET_MB: u64 = 4096;

/// The threads each of `n` processes on this host should use: an even share of the
/// cores, unless `OMP_NUM_THREADS` already says.
pub fn threads_per_process(n: usize) -> Option<usize> {
    if n <= 1 || std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    Some((cores / n).max(1))
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Connect(#[from] kiln_proto::client::ConnectError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot start the training process {exe}: {source}")]
    Spawn {
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Running {
    assignment: Assignment,
    child: Child,
    stdin: Option<ChildStdin>,
    seen: Arc<std::sync::Mutex<Seen>>,
    commit_sent: u64,
    /// The newest commit step the coordinator told this rank.
    commit_told: u64,
}

/// Where `kiln worker` process `pid` writes its ranks' job files when it is given no
/// `--work-dir`: a folder of its own in the temporary directory, removed when it exits.
pub fn default_work_dir(pid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("kiln-worker-{pid}"))
}

/// The interface to listen on for `host`: loopback for `localhost`, else every interface.
fn bind_host(host: &str) -> &'static str {
    if host == "localhost" {
        "127.0.0.1"
    } else {
        "0.0.0.0"
    }
}

/// Starts keeping snapshots in memory for other workers (within `budget_mb`): the address
/// to offer them, `HOST:PORT`.
async fn serve_memory(host: &str, budget_mb: u64, token: &str) -> Result<String, AgentError> {
    let failed = |e| AgentError::Refused(format!("cannot listen for memory snapshots: {e}"));
    let listener = tokio::net::TcpListener::bind((bind_host(host), 0))
        .await
        .map_err(failed)?;
    let port = listener.local_addr().map_err(failed)?.port();
    let hold = kiln_store::hold::Hold::new(budget_mb << 20);
    tokio::spawn(kiln_store::hold::serve(
        listener,
        Arc::new(std::sync::Mutex::new(hold)),
        token.to_owned(),
    ));
    Ok(format!("{host}:{port}"))
}

/// A free port on this host for the next ring: bound and released, so another process
/// could take it in between; the ring then fails to listen and the generation restarts.
fn free_addr(host: &str) -> String {
    let port = TcpListener::bind((bind_host(host), 0))
        .ok()
        .and_then(|l| l.local_addr().ok())
        .map_or(0, |a| a.port());
    format!("{host}:{port}")
}

mod follow;

use follow::{follow, Seen};

const TAIL_LINES: usize = 20;

/// Runs the agent until it is killed or refused.
pub async fn run(options: AgentOptions) -> Result<(), AgentError> {
    run_host(vec![options]).await
}

/// Runs `n` agents in this process (one per GPU of the host); their heartbeats go to the
/// coordinator together, in one call.
pub async fn run_many(options: AgentOptions, n: usize) -> Result<(), AgentError> {
    if n <= 1 {
        return run(options).await;
    }
    let threads = options.threads.or(threads_per_process(n));
    let agents = (0..n)
        .map(|local| AgentOptions {
            local_rank: Some(local),
            label: format!("{} local {local}", options.label),
            threads,
            ..options.clone()
        })
        .collect();
    run_host(agents).await
}

/// Runs one agent per element of `options` until one is refused or fails to start its
/// training process (all of them stop then: their processes are killed with them).
async fn run_host(options: Vec<AgentOptions>) -> Result<(), AgentError> {
    let Some(first) = options.first() else {
        return Ok(());
    };
    let client = first.target.connect_lazy()?;
    // One store of snapshots for the host's agents: their ranks' and their peers'.
    let memory_addr = if first.memory_budget_mb > 0 {
        serve_memory(&first.host, first.memory_budget_mb, &first.target.token).await?
    } else {
        String::new()
    };
    let wake = Arc::new(Notify::new());
    let mut agents: Vec<Agent> = options
        .into_iter()
        .map(|options| Agent {
            ready_addr: free_addr(&options.host),
            memory_addr: memory_addr.clone(),
            options,
            client: client.clone(),
            id: String::new(),
            interval: Duration::from_millis(1000),
            running: None,
            last: WorkerReport::default(),
            wake: wake.clone(),
            lost_since: None,
            hurry_until: None,
            holds: false,
        })
        .collect();
    for agent in &mut agents {
        agent.register().await?;
    }
    loop {
        // A coordinator that holds heartbeats answers as soon as it has something for one of
        // these workers, so the next call goes out at once; something to report here (a
        // checkpoint written, a process exited) cuts a held one short.
        let hold = if agents.iter().all(|a| a.holds) {
            agents.iter().map(|a| a.interval).min().unwrap_or_default()
        } else {
            Duration::ZERO
        };
        let requests = agents.iter().map(|a| a.request(hold)).collect();
        let call = heartbeat_all(client.clone(), requests);
        let answered = if hold.is_zero() {
            Some(call.await?)
        } else {
            tokio::select! {
                r = call => Some(r?),
                _ = wake.notified() => None,
                _ = any_exited(&mut agents) => None,
            }
        };
        let mut at_once = answered.is_none();
        if let Some(answers) = answered {
            let mut all = true;
            for (agent, answer) in agents.iter_mut().zip(answers) {
                match agent.answered(answer).await? {
                    Some(reply) => agent.act(reply).await?,
                    None => all = false,
                }
            }
            at_once = all && agents.iter().all(|a| a.holds);
        }
        if !at_once {
            let interval = agents
                .iter()
                .map(Agent::next_heartbeat)
                .min()
                .unwrap_or_default();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = wake.notified() => {}
                _ = any_exited(&mut agents) => {}
            }
        }
        for agent in &mut agents {
            agent.reap().await;
        }
    }
}

/// Sends one heartbeat per agent: alone as `Heartbeat` for one agent, together in one
/// `HeartbeatHost` call for several. Each agent's answer, in order.
async fn heartbeat_all(
    mut client: Client,
    requests: Vec<rpc::HeartbeatRequest>,
) -> Result<Vec<Result<rpc::HeartbeatReply, tonic::Status>>, AgentError> {
    let n = requests.len();
    if n == 1 {
        let request = requests.into_iter().next().expect("one request");
        return Ok(vec![client
            .heartbeat(request)
            .await
            .map(|r| r.into_inner())]);
    }
    let request = rpc::HeartbeatHostRequest { workers: requests };
    match client.heartbeat_host(request).await {
        Ok(reply) => {
            let answers = reply.into_inner().workers;
            if answers.len() != n {
                return Err(AgentError::Refused(format!(
                    "bad reply from the coordinator: {} answers to {n} heartbeats",
                    answers.len()
                )));
            }
            Ok(answers
                .into_iter()
                .map(|a| match a.reply {
                    Some(reply) => Ok(reply),
                    None => Err(tonic::Status::new(a.code.into(), a.message)),
                })
                .collect())
        }
        Err(s) => Ok((0..n).map(|_| Err(s.clone())).collect()),
    }
}

/// Resolves when the training process of any of `agents` exits.
async fn any_exited(agents: &mut [Agent]) {
    let waits: Vec<_> = agents
        .iter_mut()
        .map(|a| Box::pin(exited(&mut a.running)))
        .collect();
    if !waits.is_empty() {
        futures::future::select_all(waits).await;
    }
}

/// Resolves when the training process exits; never when none runs.
async fn exited(running: &mut Option<Running>) {
    match running.as_mut() {
        Some(r) => {
            let _ = r.child.wait().await;
        }
        None => std::future::pending::<()>().await,
    }
}

struct Agent {
    options: AgentOptions,
    client: Client,
    id: String,
    interval: Duration,
    running: Option<Running>,
    /// What the agent reports when nothing runs: how the last assignment ended.
    last: WorkerReport,
    ready_addr: String,
    /// Where this process keeps snapshots (empty: it keeps none).
    memory_addr: String,
    wake: Arc<Notify>,
    lost_since: Option<tokio::time::Instant>,
    /// Until when to heartbeat at [`Agent::quick`] intervals: a rank here just ended, and
    /// the coordinator's next decision (a new generation) is awaited. Only with a
    /// coordinator that does not hold heartbeats.
    hurry_until: Option<tokio::time::Instant>,
    /// The coordinator holds heartbeats (as its last reply said).
    holds: bool,
}

/// How long after its rank ends a worker heartbeats quickly.
const HURRY: Duration = Duration::from_secs(3);

impl Agent {
    /// A tenth of the interval (at least 50 ms): how often to ask while a decision of the
    /// coordinator is awaited.
    fn quick(&self) -> Duration {
        (self.interval / 10).max(Duration::from_millis(50))
    }

    /// When to heartbeat next. Sooner than the interval while this worker waits for the
    /// coordinator: rank 0 holding a checkpoint that may be ready to commit (the coordinator
    /// tells it in a heartbeat reply; the other ranks report theirs at once), or a worker
    /// whose rank just ended, for the next generation's assignment. The coordinator cannot
    /// call a worker, so this is what bounds the commit and the re-forming of a job by about
    /// a tenth of the interval instead of a whole one.
    fn next_heartbeat(&self) -> Duration {
        let commit_pending = self.running.as_ref().is_some_and(|r| {
            let seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
            r.assignment.rank == 0 && seen.written > seen.committed
        });
        let hurrying = self.running.is_none()
            && self
                .hurry_until
                .is_some_and(|t| tokio::time::Instant::now() < t);
        if commit_pending || hurrying {
            self.quick()
        } else {
            self.interval
        }
    }

    fn hurry(&mut self) {
        self.hurry_until = Some(tokio::time::Instant::now() + HURRY);
    }

    fn report(&self) -> WorkerReport {
        match &self.running {
            Some(r) => {
                let seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
                WorkerReport {
                    state: WorkerState::Running,
                    ready_addr: None,
                    job_id: r.assignment.job_id.clone(),
                    generation: r.assignment.generation,
                    rank: r.assignment.rank,
                    progress: seen.progress,
                    error: String::new(),
                    checkpoint_written: seen.written,
                    checkpoint_committed: seen.committed,
                }
            }
            None => WorkerReport {
                ready_addr: Some(self.ready_addr.clone()),
                ..self.last.clone()
            },
        }
    }

    async fn register(&mut self) -> Result<(), AgentError> {
        let mut warned = false;
        loop {
            let request = rpc::RegisterRequest {
                host: self.options.host.clone(),
                previous_id: self.id.clone(),
                report: Some((&self.report()).into()),
                kiln_version: env!("CARGO_PKG_VERSION").into(),
                memory_addr: self.memory_addr.clone(),
            };
            match self.client.register(request).await {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    if reply.worker_id != self.id {
                        eprintln!(
                            "{}: registered with the coordinator at {} as {}",
                            self.options.label, self.options.target.url, reply.worker_id
                        );
                    } else {
                        eprintln!(
                            "{}: registered again as {}",
                            self.options.label, reply.worker_id
                        );
                    }
                    self.id = reply.worker_id;
                    self.interval =
                        Duration::from_millis(u64::from(reply.heartbeat_interval_ms.max(50)));
                    self.lost_since = None;
                    return Ok(());
                }
                Err(s) if s.code() == tonic::Code::Unauthenticated => {
                    return Err(AgentError::Refused(format!(
                        "the coordinator refused this worker: {}",
                        s.message()
                    )))
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(AgentError::Refused(format!(
                        "the coordinator refused to register this worker: {}",
                        s.message()
                    )))
                }
                Err(s) => {
                    if !warned {
                        eprintln!(
                            "{}: waiting for the coordinator at {}: {}",
                            self.options.label,
                            self.options.target.url,
                            status_text(&s)
                        );
                        warned = true;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// A heartbeat saying what this worker does, held by the coordinator up to `hold`.
    fn request(&self, hold: Duration) -> rpc::HeartbeatRequest {
        rpc::HeartbeatRequest {
            worker_id: self.id.clone(),
            report: Some((&self.report()).into()),
            hold_ms: hold.as_millis().min(u32::MAX as u128) as u32,
            commit_told: self.running.as_ref().map_or(0, |r| r.commit_told),
        }
    }

    /// What a heartbeat got back; `None` when the coordinator cannot be reached (training
    /// goes on).
    async fn answered(
        &mut self,
        answer: Result<rpc::HeartbeatReply, tonic::Status>,
    ) -> Result<Option<Reply>, AgentError> {
        match answer {
            Ok(reply) => {
                if self.lost_since.take().is_some() {
                    eprintln!("{}: the coordinator is back", self.options.label);
                }
                self.holds = reply.holds;
                Reply::try_from(reply).map(Some).map_err(|e| {
                    AgentError::Refused(format!("bad reply from the coordinator: {e}"))
                })
            }
            Err(s) if s.code() == tonic::Code::NotFound => {
                // The coordinator restarted or forgot this worker: register again, saying
                // what runs here.
                self.register().await?;
                Ok(None)
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => Err(AgentError::Refused(
                format!("the coordinator refused this worker: {}", s.message()),
            )),
            Err(s) => {
                if self.lost_since.is_none() {
                    eprintln!(
                        "{}: cannot reach the coordinator ({}); training continues, retrying",
                        self.options.label,
                        status_text(&s)
                    );
                    self.lost_since = Some(tokio::time::Instant::now());
                }
                self.holds = false;
                Ok(None)
            }
        }
    }

    /// Does what the reply says.
    async fn act(&mut self, reply: Reply) -> Result<(), AgentError> {
        match reply.command {
            Command::Wait => {}
            Command::Abort(reason) => {
                if let Some(mut r) = self.running.take() {
                    eprintln!(
                        "{}: aborting rank {} of {} generation {}: {reason}",
                        self.options.label,
                        r.assignment.rank,
                        r.assignment.job_id,
                        r.assignment.generation
                    );
                    let _ = r.child.kill().await;
                    self.last = WorkerReport {
                        state: WorkerState::Idle,
                        job_id: r.assignment.job_id.clone(),
                        generation: r.assignment.generation,
                        rank: r.assignment.rank,
                        ..WorkerReport::default()
                    };
                    self.ready_addr = free_addr(&self.options.host);
                    self.hurry();
                    self.wake.notify_one();
                }
            }
            Command::Run(a) => {
                if self.running.is_none() {
                    self.start(a).await?;
                    self.wake.notify_one();
                }
            }
        }
        if let Some(r) = self.running.as_mut() {
            // Told once: a held heartbeat is not answered again for the same step, even if
            // the process could not be given it.
            r.commit_told = r.commit_told.max(reply.commit_step);
            if reply.commit_step > r.commit_sent {
                if let Some(stdin) = r.stdin.as_mut() {
                    let line = format!("commit {}\n", reply.commit_step);
                    if stdin.write_all(line.as_bytes()).await.is_ok() {
                        let _ = stdin.flush().await;
                        r.commit_sent = reply.commit_step;
                    }
                }
            }
        }
        Ok(())
    }

    async fn start(&mut self, a: Assignment) -> Result<(), AgentError> {
        let dir = &self.options.work_dir;
        std::fs::create_dir_all(dir).map_err(|source| AgentError::Write {
            path: dir.clone(),
            source,
        })?;
        let job_path = dir.join(format!("{}-g{}-r{}.toml", a.job_id, a.generation, a.rank));
        std::fs::write(&job_path, &a.job_toml).map_err(|source| AgentError::Write {
            path: job_path.clone(),
            source,
        })?;
        eprintln!(
            "{}: starting rank {} of {} for {} generation {}",
            self.options.label, a.rank, a.world_size, a.job_id, a.generation
        );
        let mut cmd = tokio::process::Command::new(&self.options.exe);
        cmd.arg("train")
            .arg(&job_path)
            .args(["--supervised", "--rank", &a.rank.to_string()])
            .args(["--world-size", &a.world_size.to_string()])
            .args(["--peers", &a.peers_arg()])
            // The rank's telemetry resource names its job and generation.
            .env("KILN_JOB_ID", &a.job_id)
            .env("KILN_GENERATION", a.generation.to_string())
            // Its claim on the checkpoint directory names the job's run.
            .env("KILN_RUN", &a.run)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if !a.resume.is_empty() {
            cmd.args(["--resume", &a.resume]);
        }
        // Where its snapshots in memory go, and where earlier generations left them.
        if !a.memory_to.is_empty() {
            cmd.env("KILN_MEMORY_TO", a.memory_to.join(","));
        }
        if !a.memory_from.is_empty() {
            cmd.env("KILN_MEMORY_FROM", a.memory_from.join(","));
        }
        if !a.memory_to.is_empty() || !a.memory_from.is_empty() {
            // The workers keep snapshots for holders of the coordinator's token alone.
            cmd.env("KILN_MEMORY_TOKEN", &self.options.target.token);
        }
        if let Some(local) = self.options.local_rank {
            cmd.env("LOCAL_RANK", local.to_string());
        }
        if let Some(threads) = self.options.threads {
            cmd.env("OMP_NUM_THREADS", threads.to_string());
        }
        let mut child = cmd.spawn().map_err(|source| AgentError::Spawn {
            exe: self.options.exe.clone(),
            source,
        })?;
        let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
        if let Some(out) = child.stdout.take() {
            let (seen, wake) = (seen.clone(), self.wake.clone());
            tokio::spawn(async move {
                let mut lines = BufReader::new(out).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if follow(&line, &seen) {
                        wake.notify_one();
                    }
                }
            });
        }
        if let Some(err) = child.stderr.take() {
            let seen = seen.clone();
            let label = format!(
                "{} [{} g{} r{}]",
                self.options.label, a.job_id, a.generation, a.rank
            );
            tokio::spawn(async move {
                let mut lines = BufReader::new(err).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    eprintln!("{label} {line}");
                    let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                    s.tail.push(line);
                    if s.tail.len() > TAIL_LINES {
                        s.tail.remove(0);
                    }
                }
            });
        }
        let stdin = child.stdin.take();
        self.running = Some(Running {
            assignment: a,
            child,
            stdin,
            seen,
            commit_sent: 0,
            commit_told: 0,
        });
        Ok(())
    }

    /// Notes a training process that has exited.
    async fn reap(&mut self) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let Ok(Some(status)) = r.child.try_wait() else {
            return;
        };
        let r = self.running.take().expect("checked above");
        // Let the output readers drain what is left.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let seen = r.seen.lock().unwrap_or_else(|p| p.into_inner());
        let ok = status.success();
        let error = if ok {
            String::new()
        } else {
            let errors: Vec<&String> = seen
                .tail
                .iter()
                .filter(|l| l.starts_with("error"))
                .collect();
            let text = if errors.is_empty() {
                seen.tail.join("\n")
            } else {
                errors
                    .iter()
                    .map(|l| l.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            format!("training process {status}: {text}")
        };
        eprintln!(
            "{}: rank {} of {} generation {} {}",
            self.options.label,
            r.assignment.rank,
            r.assignment.job_id,
            r.assignment.generation,
            if ok {
                "finished".to_string()
            } else {
                format!("failed: {error}")
            }
        );
        self.last = WorkerReport {
            state: if ok {
                WorkerState::Succeeded
            } else {
                WorkerState::Failed
            },
            ready_addr: None,
            job_id: r.assignment.job_id.clone(),
            generation: r.assignment.generation,
            rank: r.assignment.rank,
            progress: seen.progress,
            error,
            checkpoint_written: seen.written,
            checkpoint_committed: seen.committed,
        };
        drop(seen);
        self.ready_addr = free_addr(&self.options.host);
        self.hurry();
        self.wake.notify_one();
    }
}

/// A status's message, or its code when it has none.
pub fn status_text(s: &tonic::Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        let m = s.message().to_string();
        match std::error::Error::source(s) {
            Some(src) => format!("{m}: {}", source_chain(src)),
            None => m,
        }
    }
}
