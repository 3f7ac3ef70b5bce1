//! The gRPC service: checks each call (token, then every field), feeds it to the
//! [`Machine`], persists what changed before answering, and converts the answer back.
//! Generated types go no further than this file.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_proto::client::{same_token, AUTHORIZATION, MAX_MESSAGE_BYTES};
use kiln_proto::control::{check_addr, check_id, WorkerReport, MAX_JOB_BYTES, MAX_WORKERS};
use kiln_proto::job::JobConfig;
use kiln_proto::rpc::{self, coordinator_server::CoordinatorServer};
use tokio::sync::{watch, Mutex};
use tokio_stream::Stream;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

mod held;

use held::Slot;
pub use held::MAX_HOST_WORKERS;

use crate::lease::{Lease, LeaseError, LeaseTimes};
use crate::machine::{JobSpec, Machine, Policy, Refusal};
use crate::observe::{self, Observer};
use crate::preflight::{self, DataCheck};
use crate::state::{StateError, StateStore};
use kiln_store::owner::OwnerTimes;

/// How the coordinator runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// Every call must carry `authorization: Bearer TOKEN`.
    pub token: String,
    /// Where job state is kept (a directory or store URL).
    pub state_url: String,
    pub policy: Policy,
    pub heartbeat_interval: Duration,
    /// PEM certificate and key: serve TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Serve job-level metrics in the Prometheus text format at `/metrics` here.
    pub metrics_listen: Option<SocketAddr>,
    /// Whether a submitted job's datasets are read at submit (see [`preflight::check`]).
    pub data_check: DataCheck,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Store(#[from] kiln_store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Tls {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    TlsConfig(String),
    #[error("the coordinator stopped: {0}")]
    Transport(String),
}

pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

struct Shared {
    machine: Arc<Mutex<(Machine, StateStore)>>,
    observer: std::sync::Mutex<Observer>,
    interval_ms: u32,
    /// Set when the state can no longer be written: the coordinator must stop.
    fatal: watch::Sender<Option<String>>,
    data_check: DataCheck,
    /// Heartbeats held until something changes for their worker (a long poll), by worker;
    /// the workers of one `HeartbeatHost` call share their slot.
    held: std::sync::Mutex<HashMap<String, Arc<Slot>>>,
    /// The longest a heartbeat is held: the interval, and well inside the timeout.
    max_hold: Duration,
    stopping: watch::Receiver<bool>,
}

impl Shared {
    /// Runs `f` on the machine and persists what it changed before returning its result.
    ///
    /// The save runs as a task of its own, holding the machine until it is done: a call
    /// given up by its client (a held heartbeat cut short, a timeout) drops this future, and
    /// must not cut a save short between writing a version and noting that it did.
    async fn with<T>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Machine, f64) -> T,
    ) -> Result<T, Status> {
        let mut guard = self.machine.clone().lock_owned().await;
        let machine = &mut guard.0;
        let out = f(machine, now());
        let woken = machine.woken();
        let changes = machine.take_changes();
        if changes.is_empty() {
            return Ok(out);
        }
        let shared = self.clone();
        let saved = tokio::spawn(async move {
            let (machine, store) = &mut *guard;
            let saved = store.save(machine, &changes).await;
            // Saved: the held heartbeats it concerns are answered.
            if saved.is_ok() && !woken.is_empty() {
                shared.wake(machine, &woken);
            }
            saved.map_err(|e| {
                let message = e.to_string();
                tracing::error!("{message}");
                shared.fatal.send_replace(Some(message.clone()));
                message
            })
        });
        match saved.await {
            Ok(Ok(())) => Ok(out),
            Ok(Err(message)) => Err(Status::unavailable(format!(
                "the coordinator cannot save its state: {message}"
            ))),
            Err(e) => Err(Status::internal(format!("saving the state failed: {e}"))),
        }
    }
}

fn refusal(r: Refusal) -> Status {
    match r {
        Refusal::UnknownJob(_) | Refusal::UnknownWorker(_) => Status::not_found(r.to_string()),
        Refusal::Invalid(_) => Status::invalid_argument(r.to_string()),
        Refusal::Finished(_) | Refusal::OutputInUse(_) => {
            Status::failed_precondition(r.to_string())
        }
    }
}

fn invalid(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(e.to_string())
}

struct Service {
    shared: Arc<Shared>,
}

type LogStream = Pin<Box<dyn Stream<Item = Result<rpc::LogEntry, Status>> + Send>>;

/// The job a submission describes, checked on its own (its datasets are checked by
/// [`preflight::check`]).
pub fn job_spec(req: &rpc::SubmitRequest) -> Result<(JobSpec, u32, JobConfig), Status> {
    if req.job_toml.len() > MAX_JOB_BYTES {
        return Err(invalid(format!(
            "job_toml: {} bytes, more than {MAX_JOB_BYTES}",
            req.job_toml.len()
        )));
    }
    let path = Path::new("submitted job");
    let job = JobConfig::parse(&req.job_toml, path).map_err(invalid)?;
    job.validate(path).map_err(invalid)?;
    for (field, n) in [
        ("workers", req.workers),
        ("min_workers", req.min_workers),
        ("max_workers", req.max_workers),
    ] {
        if n > MAX_WORKERS {
            return Err(invalid(format!("{field}: {n} is more than {MAX_WORKERS}")));
        }
    }
    let tp = job.parallel.tp as u32;
    let workers = if req.workers == 0 { tp } else { req.workers };
    Ok((
        JobSpec {
            name: job.name.clone(),
            toml: req.job_toml.clone(),
            tp,
            shard: job.parallel.shard as u32,
            batch_size: job.train.batch_size as u64,
            micro_batch_size: job.micro_batch_size() as u64,
            steps: job.train.steps as u64,
            checkpoint_every: job.checkpoint.every as u64,
            memory_every: job.checkpoint.memory_every as u64,
            min_workers: req.min_workers.max(1),
            max_workers: req.max_workers,
            outputs: vec![
                location_key(&job.output.dir.to_string_lossy()),
                location_key(&job.checkpoint_dir()),
            ],
            queue: req.queue,
        },
        workers,
        job,
    ))
}

/// A place a job writes to, as the one-writer check compares places: a local path (given
/// as a path or a `file://` URL) or a store URL, its path lexically normalized.
fn location_key(location: &str) -> String {
    let normalized = |p: &str| {
        kiln_proto::path::normalize(Path::new(p))
            .to_string_lossy()
            .into_owned()
    };
    match location.split_once("://") {
        None => normalized(location),
        Some(("file", path)) => normalized(path),
        Some((scheme, rest)) => {
            let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
            let path = normalized(&format!("/{path}"));
            format!("{scheme}://{bucket}{}", path.trim_end_matches('/'))
        }
    }
}

fn job_id(field: &'static str, id: &str) -> Result<(), Status> {
    check_id(field, id, true).map_err(invalid)
}

fn report(r: Option<rpc::WorkerReport>) -> Result<WorkerReport, Status> {
    match r {
        None => Ok(WorkerReport::default()),
        Some(r) => WorkerReport::try_from(r).map_err(invalid),
    }
}

#[tonic::async_trait]
impl rpc::coordinator_server::Coordinator for Service {
    async fn submit(
        &self,
        request: Request<rpc::SubmitRequest>,
    ) -> Result<Response<rpc::SubmitReply>, Status> {
        let (spec, workers, job) = job_spec(request.get_ref())?;
        // What `kiln train` would refuse is refused here, before any worker starts.
        preflight::check(&job, self.shared.data_check)
            .await
            .map_err(invalid)?;
        // Another run writing into its checkpoint directory (another coordinator's job, or a
        // `kiln train` started by hand); this coordinator's own jobs are the machine's to
        // refuse or queue.
        let claim = match self.shared.data_check {
            DataCheck::Read => preflight::live_claim(&job, OwnerTimes::from_env())
                .await
                .map_err(invalid)?,
            DataCheck::Skip => None,
        };
        let id = self
            .shared
            .with(|m, now| match &claim {
                Some(o) if !m.jobs.values().any(|j| j.run() == o.run) => {
                    Err(Refusal::OutputInUse(preflight::claimed(&job, o)))
                }
                _ => m.submit(spec, workers, now),
            })
            .await?
            .map_err(refusal)?;
        Ok(Response::new(rpc::SubmitReply { job_id: id }))
    }

    async fn status(
        &self,
        request: Request<rpc::StatusRequest>,
    ) -> Result<Response<rpc::StatusReply>, Status> {
        let want = request.into_inner().job_id;
        check_id("job_id", &want, false).map_err(invalid)?;
        let guard = self.shared.machine.lock().await;
        let m = &guard.0;
        if !want.is_empty() && !m.jobs.contains_key(&want) {
            return Err(refusal(Refusal::UnknownJob(want)));
        }
        let t = now();
        let jobs = m
            .jobs
            .values()
            .filter(|j| want.is_empty() || j.id == want)
            .map(|j| {
                let rank0 = j.ranks.first().and_then(|id| m.workers.get(id));
                let progress = rank0
                    .filter(|w| w.report.job_id == j.id)
                    .and_then(|w| w.report.progress);
                let stragglers = m.stragglers_of(&j.id);
                rpc::JobStatus {
                    job_id: j.id.clone(),
                    name: j.spec.name.clone(),
                    phase: j.phase.name().into(),
                    generation: j.generation,
                    world: j.ranks.len() as u32,
                    desired_workers: j.desired,
                    min_workers: j.spec.min_workers,
                    max_workers: j.spec.max_workers,
                    tp: j.spec.tp,
                    committed_step: j.committed_step,
                    steps: j.spec.steps,
                    progress: progress.map(Into::into),
                    restarts: j.restarts,
                    message: j.message.clone(),
                    stragglers,
                }
            })
            .collect();
        let workers = m
            .workers
            .values()
            .filter(|w| !w.placeholder)
            .map(|w| rpc::WorkerInfo {
                worker_id: w.id.clone(),
                host: w.host.clone(),
                state: w.report.state.name().into(),
                job_id: w.report.job_id.clone(),
                rank: w.report.rank,
                last_seen_s: (t - w.last_seen).max(0.0),
                progress: w.report.progress.map(Into::into),
            })
            .collect();
        Ok(Response::new(rpc::StatusReply { jobs, workers }))
    }

    async fn scale(
        &self,
        request: Request<rpc::ScaleRequest>,
    ) -> Result<Response<rpc::ScaleReply>, Status> {
        let r = request.into_inner();
        job_id("job_id", &r.job_id)?;
        if r.workers > MAX_WORKERS {
            return Err(invalid(format!(
                "workers: {} is more than {MAX_WORKERS}",
                r.workers
            )));
        }
        let message = self
            .shared
            .with(|m, now| m.scale(&r.job_id, r.workers, now))
            .await?
            .map_err(refusal)?;
        Ok(Response::new(rpc::ScaleReply { message }))
    }

    async fn stop(
        &self,
        request: Request<rpc::StopRequest>,
    ) -> Result<Response<rpc::StopReply>, Status> {
        let r = request.into_inner();
        job_id("job_id", &r.job_id)?;
        let message = self
            .shared
            .with(|m, now| m.stop(&r.job_id, now))
            .await?
            .map_err(refusal)?;
        Ok(Response::new(rpc::StopReply { message }))
    }

    type LogsStream = LogStream;

    async fn logs(
        &self,
        request: Request<rpc::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let r = request.into_inner();
        job_id("job_id", &r.job_id)?;
        if !self
            .shared
            .machine
            .lock()
            .await
            .0
            .jobs
            .contains_key(&r.job_id)
        {
            return Err(refusal(Refusal::UnknownJob(r.job_id)));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let mut next = r.from_seq;
            loop {
                let (entries, finished) = {
                    let guard = shared.machine.lock().await;
                    match guard.0.jobs.get(&r.job_id) {
                        Some(j) => (
                            j.log
                                .iter()
                                .filter(|e| e.seq >= next)
                                .cloned()
                                .collect::<Vec<_>>(),
                            j.phase.finished(),
                        ),
                        None => (Vec::new(), true),
                    }
                };
                for e in entries {
                    next = e.seq + 1;
                    let entry = rpc::LogEntry {
                        seq: e.seq,
                        unix_s: e.unix_s,
                        message: e.message,
                        phase: e.phase.name().into(),
                    };
                    if tx.send(Ok(entry)).await.is_err() {
                        return;
                    }
                }
                if !r.follow || finished {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn register(
        &self,
        request: Request<rpc::RegisterRequest>,
    ) -> Result<Response<rpc::RegisterReply>, Status> {
        let r = request.into_inner();
        check_id("host", &r.host, true).map_err(invalid)?;
        check_id("previous_id", &r.previous_id, false).map_err(invalid)?;
        let report = report(r.report)?;
        if !r.memory_addr.is_empty() {
            check_addr("memory_addr", &r.memory_addr).map_err(invalid)?;
        }
        let memory_addr = r.memory_addr;
        let worker_id = self
            .shared
            .with(|m, now| {
                let id = m.register(r.host, &r.previous_id, report, now);
                m.set_memory_addr(&id, memory_addr);
                id
            })
            .await?;
        Ok(Response::new(rpc::RegisterReply {
            worker_id,
            heartbeat_interval_ms: self.shared.interval_ms,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<rpc::HeartbeatRequest>,
    ) -> Result<Response<rpc::HeartbeatReply>, Status> {
        let mut answers = self.beats(vec![request.into_inner()]).await?;
        let reply = answers.pop().expect("one answer per heartbeat")?;
        let mut wire = rpc::HeartbeatReply::from(reply);
        wire.holds = true;
        Ok(Response::new(wire))
    }

    async fn heartbeat_host(
        &self,
        request: Request<rpc::HeartbeatHostRequest>,
    ) -> Result<Response<rpc::HeartbeatHostReply>, Status> {
        let r = request.into_inner();
        if r.workers.is_empty() {
            return Err(invalid("workers: no heartbeat in the call"));
        }
        if r.workers.len() > MAX_HOST_WORKERS {
            return Err(invalid(format!(
                "workers: {} heartbeats in one call, at most {MAX_HOST_WORKERS}",
                r.workers.len()
            )));
        }
        let workers = self
            .beats(r.workers)
            .await?
            .into_iter()
            .map(|answer| match answer {
                Ok(reply) => {
                    let mut wire = rpc::HeartbeatReply::from(reply);
                    wire.holds = true;
                    rpc::HeartbeatAnswer {
                        reply: Some(wire),
                        ..Default::default()
                    }
                }
                Err(s) => rpc::HeartbeatAnswer {
                    reply: None,
                    code: s.code() as i32,
                    message: s.message().to_owned(),
                },
            })
            .collect();
        Ok(Response::new(rpc::HeartbeatHostReply { workers }))
    }
}

/// Refuses calls without the token. The comparison takes the same time wherever the
/// tokens differ.
fn auth(token: Arc<String>) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |request: Request<()>| {
        let Some(value) = request.metadata().get(AUTHORIZATION) else {
            return Err(Status::unauthenticated(
                "no token: pass --token or set KILN_TOKEN",
            ));
        };
        if !same_token(value.as_bytes(), format!("Bearer {token}").as_bytes()) {
            return Err(Status::unauthenticated("wrong token"));
        }
        Ok(request)
    }
}

/// A running coordinator's address, and how to stop it.
pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when it is.
    pub metrics_addr: Option<SocketAddr>,
    pub state_url: String,
    /// Resolves when the server stops (its error, if any).
    pub done: tokio::task::JoinHandle<Result<(), ServeError>>,
    shutdown: watch::Sender<bool>,
}

impl Running {
    pub fn shutdown(&self) {
        self.shutdown.send_replace(true);
    }
}

/// Opens the state, binds `config.listen` and serves until [`Running::shutdown`] or a
/// fatal state error.
pub async fn start(config: Config) -> Result<Running, ServeError> {
    // One coordinator per state: a second one is refused here, before it reads anything.
    let lease = Lease::acquire(kiln_store::open(&config.state_url)?, LeaseTimes::default()).await?;
    let (store, state) = StateStore::open(&config.state_url).await?;
    let epoch = format!("{:x}", (now() * 1000.0) as u64 % 0xff_ffff);
    let machine = match state {
        Some(state) => {
            tracing::info!("picked up {} jobs from {}", state.jobs.len(), store.url());
            Machine::restore(config.policy.clone(), epoch, state, now())
        }
        None => Machine::new(config.policy.clone(), epoch),
    };
    let (fatal, mut fatal_rx) = watch::channel(None);
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let timeout = Duration::from_secs_f64(config.policy.heartbeat_timeout_s.max(0.0));
    let shared = Arc::new(Shared {
        machine: Arc::new(Mutex::new((machine, store))),
        observer: std::sync::Mutex::new(Observer::new()),
        interval_ms: config.heartbeat_interval.as_millis().min(u32::MAX as u128) as u32,
        fatal,
        data_check: config.data_check,
        held: std::sync::Mutex::new(HashMap::new()),
        max_hold: config.heartbeat_interval.min(timeout / 4),
        stopping: shutdown_rx.clone(),
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Listen {
        addr: config.listen,
        source,
    })?;
    let mut builder = Server::builder();
    if let Some((cert, key)) = &config.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| ServeError::Tls {
                path: path.clone(),
                source,
            })
        };
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(identity))
            .map_err(|e| ServeError::TlsConfig(e.to_string()))?;
    }
    let svc = tonic::service::interceptor::InterceptedService::new(
        CoordinatorServer::new(Service {
            shared: shared.clone(),
        })
        .max_decoding_message_size(MAX_MESSAGE_BYTES),
        auth(Arc::new(config.token.clone())),
    );
    // Heartbeat timeouts are checked a few times a second.
    let ticker = shared.clone();
    let mut tick_stop = shutdown_rx.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = every.tick() => {
                    let _ = ticker
                        .with(|m, now| {
                            m.tick(now);
                            ticker
                                .observer
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .update(m, now);
                        })
                        .await;
                }
                _ = tick_stop.changed() => return,
            }
        }
    });
    let metrics_addr = match config.metrics_listen {
        Some(at) => {
            let listener = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| ServeError::Listen { addr: at, source })?;
            let addr = listener
                .local_addr()
                .map_err(|source| ServeError::Listen { addr: at, source })?;
            let shared = shared.clone();
            let render = move || {
                let shared = shared.clone();
                async move {
                    let guard = shared.machine.lock().await;
                    observe::prometheus_text(&observe::snapshot(&guard.0, now()))
                }
            };
            let mut stop = shutdown_rx.clone();
            tokio::spawn(observe::serve_metrics(listener, render, async move {
                let _ = stop.changed().await;
            }));
            Some(addr)
        }
        None => None,
    };
    let state_url = config.state_url.clone();
    let keeper = shared.clone();
    tokio::spawn(lease.keep(
        move |message| {
            keeper.fatal.send_replace(Some(message));
        },
        shutdown_rx.clone(),
    ));
    let done = tokio::spawn(async move {
        // `Server::tcp_nodelay` does not reach sockets from a given listener: without
        // this, small replies wait for delayed ACKs (about 40 ms each).
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        let stop = async move {
            tokio::select! {
                _ = shutdown_rx.changed() => {}
                _ = fatal_rx.changed() => {}
            }
        };
        builder
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, stop)
            .await
            .map_err(|e| ServeError::Transport(kiln_proto::client::source_chain(&e)))?;
        if let Some(message) = shared.fatal.borrow().clone() {
            return Err(ServeError::Transport(message));
        }
        Ok(())
    });
    Ok(Running {
        addr,
        metrics_addr,
        state_url,
        done,
        shutdown,
    })
}
