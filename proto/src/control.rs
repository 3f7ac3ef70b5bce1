//! The control plane's messages as Kiln's own types. The generated gRPC types ([`rpc`])
//! stop at the service boundary: what arrives is converted here, and every field checked,
//! before the coordinator or a worker looks at it.
//!
//! [`rpc`]: crate::rpc

use std::net::SocketAddr;

use crate::rpc;
use crate::run::{Phase, Phases, PHASE_NAMES};

/// Largest job file the coordinator accepts.
pub const MAX_JOB_BYTES: usize = 1 << 20;
/// Largest world a job may ask for.
pub const MAX_WORKERS: u32 = 100_000;
/// Longest id, host name or address accepted.
pub const MAX_ID_LEN: usize = 256;
/// Longest error text a worker may report (longer text is cut, not refused).
pub const MAX_ERROR_LEN: usize = 16 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    #[default]
    Idle,
    Running,
    Succeeded,
    Failed,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Running => "running",
            WorkerState::Succeeded => "succeeded",
            WorkerState::Failed => "failed",
        }
    }
}

/// A rank's latest training step, as its heartbeats carry it.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub step: u64,
    pub steps: u64,
    pub loss: f64,
    pub tokens_per_s: f64,
    pub mfu: f64,
    pub step_s: f64,
    /// Of `step_s`, the time this rank computed (neither waiting for data nor for peers).
    pub compute_s: f64,
    /// The latest validation loss and the step it was measured after (0: none yet).
    pub val_loss: f64,
    pub val_step: u64,
    pub grad_norm: f64,
    pub lr: f64,
    /// Seconds per step by phase, in [`Phase::ALL`]'s order.
    pub phases: [f64; Phase::COUNT],
}

/// The phases of [`Progress::phases`], in order: [`Phase::ALL`]'s names.
pub const PHASES: [&str; Phase::COUNT] = PHASE_NAMES;

/// What a worker says of itself in every heartbeat.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct WorkerReport {
    pub state: WorkerState,
    /// Where it will listen for its ring peers when given work (set while not running).
    pub ready_addr: Option<String>,
    /// The job, generation and rank of what it runs or last ran.
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub progress: Option<Progress>,
    pub error: String,
    pub checkpoint_written: u64,
    pub checkpoint_committed: u64,
}

impl WorkerReport {
    /// Whether it runs generation `generation` of `job_id`.
    pub fn runs(&self, job_id: &str, generation: u64) -> bool {
        self.state == WorkerState::Running && self.job_id == job_id && self.generation == generation
    }

    /// Whether it has finished (either way) generation `generation` of `job_id`.
    pub fn finished(&self, job_id: &str, generation: u64) -> Option<WorkerState> {
        (self.job_id == job_id
            && self.generation == generation
            && matches!(self.state, WorkerState::Succeeded | WorkerState::Failed))
        .then_some(self.state)
    }
}

/// One rank's part of a generation of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub job_id: String,
    pub generation: u64,
    pub rank: u32,
    pub world_size: u32,
    /// `(rank, host:port)` of the ranks this one connects to: itself and its neighbours on
    /// every ring of the mesh ([`ring_neighbours`]), in rank order.
    pub peers: Vec<(u32, String)>,
    pub job_toml: String,
    pub resume: String,
    /// The job's run, as its checkpoint directory's claim names it
    /// (`kiln_store::owner`); the same for all its ranks and generations.
    pub run: String,
    /// Snapshots in host memory: where this rank sends them, and where earlier generations
    /// of this rank left theirs (`checkpoint.memory_every`; empty without).
    pub memory_to: Vec<String>,
    pub memory_from: Vec<String>,
}

impl Assignment {
    /// `--peers` of `kiln train`: `RANK=HOST:PORT` for each rank given.
    pub fn peers_arg(&self) -> String {
        self.peers
            .iter()
            .map(|(r, a)| format!("{r}={a}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The rank a training process's error says is gone, in the forms Kiln's collectives write:
/// `lost rank N (ADDR) during OP: ...` (its connection to rank N broke) or `rank N failed
/// during OP (reported by rank M)` (a ring neighbour passed on that N died).
pub fn gone_rank(error: &str) -> Option<u32> {
    for (before, after) in [("lost rank ", " ("), ("rank ", " failed during ")] {
        let mut rest = error;
        while let Some(i) = rest.find(before) {
            rest = &rest[i + before.len()..];
            let digits = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or("");
            if !digits.is_empty() && rest[digits.len()..].starts_with(after) {
                return digits.parse().ok();
            }
        }
    }
    None
}

/// The ranks whose addresses `rank` needs in a `world`-rank mesh of tensor-parallel size `tp`
/// (tensor-parallel innermost: rank = dp_rank * tp + tp_rank): itself, and the next and
/// previous member of each ring it belongs to (the world, its data-parallel group, its
/// tensor-parallel group, and with hybrid sharding, `shard` > 0 dividing the data-parallel
/// size, its shard group of `shard` neighbouring data-parallel ranks and its replica group
/// across them). At most 11, sorted, whatever the world: the rendezvous connects to each
/// ring's next member and accepts its previous one, and nothing else.
pub fn ring_neighbours(rank: u32, world: u32, tp: u32, shard: u32) -> Vec<u32> {
    let (world, tp) = (world.max(1), tp.clamp(1, world.max(1)));
    let dp = world / tp;
    let (d, t) = (rank / tp, rank % tp);
    let mut out = vec![
        rank,
        (rank + 1) % world,
        (rank + world - 1) % world,
        ((d + 1) % dp) * tp + t,
        ((d + dp - 1) % dp) * tp + t,
        d * tp + (t + 1) % tp,
        d * tp + (t + tp - 1) % tp,
    ];
    if shard > 0 && shard < dp && dp.is_multiple_of(shard) {
        let (group, s) = (d / shard, d % shard);
        let replicas = dp / shard;
        out.extend([
            (group * shard + (s + 1) % shard) * tp + t,
            (group * shard + (s + shard - 1) % shard) * tp + t,
            (((group + 1) % replicas) * shard + s) * tp + t,
            (((group + replicas - 1) % replicas) * shard + s) * tp + t,
        ]);
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// What the coordinator tells a worker in reply to a heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Wait,
    Run(Assignment),
    Abort(String),
}

/// A heartbeat's reply: the command, and phase two of a checkpoint commit for rank 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    pub command: Command,
    pub commit_step: u64,
}

impl Reply {
    /// Whether a worker already told to commit `commit_told` has anything to do on this
    /// reply: a command other than waiting, or a newer step to commit.
    pub fn is_news(&self, commit_told: u64) -> bool {
        self.command != Command::Wait || self.commit_step > commit_told
    }
}

/// A field that failed validation: which, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: &'static str,
    pub message: String,
}

pub fn field_error(field: &'static str, message: impl Into<String>) -> FieldError {
    FieldError {
        field,
        message: message.into(),
    }
}

/// An id-like string: at most [`MAX_ID_LEN`] printable ASCII characters without spaces.
pub fn check_id(field: &'static str, value: &str, required: bool) -> Result<(), FieldError> {
    if value.is_empty() {
        return if required {
            Err(field_error(field, "missing"))
        } else {
            Ok(())
        };
    }
    if value.len() > MAX_ID_LEN {
        return Err(field_error(
            field,
            format!("{} bytes, more than {MAX_ID_LEN}", value.len()),
        ));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(field_error(
            field,
            format!("{value:?} has characters other than printable ASCII"),
        ));
    }
    Ok(())
}

fn finite(field: &'static str, v: f64) -> Result<f64, FieldError> {
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(field_error(
            field,
            format!("{v} is not a finite non-negative number"),
        ))
    }
}

impl TryFrom<rpc::Progress> for Progress {
    type Error = FieldError;

    fn try_from(p: rpc::Progress) -> Result<Self, FieldError> {
        if p.step > p.steps {
            return Err(field_error(
                "progress.step",
                format!("step {} beyond steps {}", p.step, p.steps),
            ));
        }
        Ok(Progress {
            step: p.step,
            steps: p.steps,
            // A diverged loss is reported as it is; the worker fails on it by itself.
            loss: p.loss,
            tokens_per_s: finite("progress.tokens_per_s", p.tokens_per_s)?,
            mfu: finite("progress.mfu", p.mfu)?,
            step_s: finite("progress.step_seconds", p.step_seconds)?,
            compute_s: finite("progress.compute_seconds", p.compute_seconds)?,
            val_loss: p.val_loss,
            val_step: p.val_step,
            grad_norm: p.grad_norm,
            lr: finite("progress.lr", p.lr)?,
            phases: match p.phases {
                None => [0.0; Phase::COUNT],
                Some(ph) => {
                    let given = Phases::from(ph);
                    for phase in Phase::ALL {
                        let v = given.get(phase);
                        if !(v.is_finite() && v >= 0.0) {
                            return Err(field_error(
                                "progress.phases",
                                format!("{}: {v} is not a number of seconds", phase.name()),
                            ));
                        }
                    }
                    given.to_array()
                }
            },
        })
    }
}

impl From<rpc::StepPhases> for Phases {
    fn from(p: rpc::StepPhases) -> Self {
        Phases {
            data_wait: p.data_wait,
            forward: p.forward,
            backward: p.backward,
            collective: p.collective,
            optimizer: p.optimizer,
            checkpoint: p.checkpoint,
        }
    }
}

impl From<Phases> for rpc::StepPhases {
    fn from(p: Phases) -> Self {
        rpc::StepPhases {
            data_wait: p.data_wait,
            forward: p.forward,
            backward: p.backward,
            collective: p.collective,
            optimizer: p.optimizer,
            checkpoint: p.checkpoint,
        }
    }
}

impl From<Progress> for rpc::Progress {
    fn from(p: Progress) -> Self {
        rpc::Progress {
            step: p.step,
            steps: p.steps,
            loss: p.loss,
            tokens_per_s: p.tokens_per_s,
            mfu: p.mfu,
            step_seconds: p.step_s,
            compute_seconds: p.compute_s,
            val_loss: p.val_loss,
            val_step: p.val_step,
            grad_norm: p.grad_norm,
            lr: p.lr,
            phases: Some(Phases::from_array(p.phases).into()),
        }
    }
}

/// [`check_host_port`] of the value of field `field`, the error naming the field.
pub fn check_addr(field: &'static str, addr: &str) -> Result<(), FieldError> {
    check_host_port(addr)
        .map_err(|why| field_error(field, format!("{addr:?} is not HOST:PORT ({why})")))
}

/// Checks that `addr` is an address peers can connect to: `HOST:PORT` with a port in
/// 1..=65535 and a host that is an IPv4 address, a bracketed IPv6 address (`[::1]:7000`) or a
/// DNS name (labels of letters, digits and inner hyphens). Says what is wrong otherwise.
pub fn check_host_port(addr: &str) -> Result<(), String> {
    if let Ok(a) = addr.parse::<SocketAddr>() {
        return if a.port() == 0 {
            Err("port 0 is not a port peers can connect to".into())
        } else if a.ip().is_unspecified() {
            Err(format!("{} is not an address peers can connect to", a.ip()))
        } else {
            Ok(())
        };
    }
    let Some((host, port)) = addr.rsplit_once(':') else {
        return Err("no port".into());
    };
    match port.parse::<u16>() {
        Ok(0) => return Err("port 0 is not a port peers can connect to".into()),
        Ok(_) => {}
        Err(_) => return Err(format!("port {port:?} is not a number in 1..=65535")),
    }
    if host.starts_with('[') || host.contains(':') {
        return Err(format!(
            "host {host:?} is not an IP address (IPv6 goes in brackets)"
        ));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(format!("host {host:?} is not an IP address or a DNS name"));
    }
    if name
        .split('.')
        .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!("host {host:?} is not an IPv4 address"));
    }
    Ok(())
}

impl TryFrom<rpc::WorkerReport> for WorkerReport {
    type Error = FieldError;

    fn try_from(r: rpc::WorkerReport) -> Result<Self, FieldError> {
        let state = match rpc::WorkerState::try_from(r.state) {
            Ok(rpc::WorkerState::Idle) => WorkerState::Idle,
            Ok(rpc::WorkerState::Running) => WorkerState::Running,
            Ok(rpc::WorkerState::Succeeded) => WorkerState::Succeeded,
            Ok(rpc::WorkerState::Failed) => WorkerState::Failed,
            _ => {
                return Err(field_error(
                    "report.state",
                    format!("{} is not a worker state", r.state),
                ))
            }
        };
        check_id("report.job_id", &r.job_id, state == WorkerState::Running)?;
        let ready_addr = if r.ready_addr.is_empty() {
            None
        } else {
            check_id("report.ready_addr", &r.ready_addr, true)?;
            check_addr("report.ready_addr", &r.ready_addr)?;
            Some(r.ready_addr)
        };
        if r.rank >= MAX_WORKERS {
            return Err(field_error(
                "report.rank",
                format!("{} is too large", r.rank),
            ));
        }
        let mut error = r.error;
        if error.len() > MAX_ERROR_LEN {
            let mut cut = MAX_ERROR_LEN;
            while !error.is_char_boundary(cut) {
                cut -= 1;
            }
            error.truncate(cut);
        }
        Ok(WorkerReport {
            state,
            ready_addr,
            job_id: r.job_id,
            generation: r.generation,
            rank: r.rank,
            progress: r.progress.map(Progress::try_from).transpose()?,
            error,
            checkpoint_written: r.checkpoint_written,
            checkpoint_committed: r.checkpoint_committed,
        })
    }
}

impl From<&WorkerReport> for rpc::WorkerReport {
    fn from(r: &WorkerReport) -> Self {
        rpc::WorkerReport {
            state: match r.state {
                WorkerState::Idle => rpc::WorkerState::Idle,
                WorkerState::Running => rpc::WorkerState::Running,
                WorkerState::Succeeded => rpc::WorkerState::Succeeded,
                WorkerState::Failed => rpc::WorkerState::Failed,
            } as i32,
            ready_addr: r.ready_addr.clone().unwrap_or_default(),
            job_id: r.job_id.clone(),
            generation: r.generation,
            rank: r.rank,
            progress: r.progress.map(Into::into),
            error: r.error.clone(),
            checkpoint_written: r.checkpoint_written,
            checkpoint_committed: r.checkpoint_committed,
        }
    }
}

impl From<Reply> for rpc::HeartbeatReply {
    fn from(r: Reply) -> Self {
        use rpc::heartbeat_reply::Command as C;
        let command = match r.command {
            Command::Wait => C::Wait(rpc::Wait {}),
            Command::Abort(reason) => C::Abort(rpc::Abort { reason }),
            Command::Run(a) => C::Run(rpc::Assignment {
                job_id: a.job_id,
                generation: a.generation,
                rank: a.rank,
                world_size: a.world_size,
                peer_ranks: a.peers.iter().map(|(r, _)| *r).collect(),
                peers: a.peers.into_iter().map(|(_, addr)| addr).collect(),
                job_toml: a.job_toml,
                resume: a.resume,
                run: a.run,
                memory_to: a.memory_to,
                memory_from: a.memory_from,
            }),
        };
        rpc::HeartbeatReply {
            command: Some(command),
            commit_step: r.commit_step,
            holds: false,
        }
    }
}

impl TryFrom<rpc::HeartbeatReply> for Reply {
    type Error = FieldError;

    fn try_from(r: rpc::HeartbeatReply) -> Result<Self, FieldError> {
        use rpc::heartbeat_reply::Command as C;
        let command = match r.command {
            None | Some(C::Wait(_)) => Command::Wait,
            Some(C::Abort(a)) => Command::Abort(a.reason),
            Some(C::Run(a)) => {
                // Without `peer_ranks` (an older coordinator): every rank, in order.
                let (world_size, peers): (u32, Vec<(u32, String)>) = if a.peer_ranks.is_empty() {
                    let n = a.peers.len() as u32;
                    (n, (0..n).zip(a.peers).collect())
                } else {
                    if a.peer_ranks.len() != a.peers.len() {
                        return Err(field_error(
                            "run.peer_ranks",
                            format!(
                                "{} ranks for {} addresses",
                                a.peer_ranks.len(),
                                a.peers.len()
                            ),
                        ));
                    }
                    (
                        a.world_size,
                        a.peer_ranks.into_iter().zip(a.peers).collect(),
                    )
                };
                if a.rank >= world_size {
                    return Err(field_error(
                        "run.rank",
                        format!("rank {} of a world of {world_size}", a.rank),
                    ));
                }
                if let Some((r, _)) = peers.iter().find(|(r, _)| *r >= world_size) {
                    return Err(field_error(
                        "run.peer_ranks",
                        format!("rank {r} of a world of {world_size}"),
                    ));
                }
                if !peers.iter().any(|(r, _)| *r == a.rank) {
                    return Err(field_error(
                        "run.peers",
                        format!("no address for the rank itself ({})", a.rank),
                    ));
                }
                let run = if a.run.is_empty() {
                    format!("job {}", a.job_id)
                } else {
                    a.run
                };
                for (key, addrs) in [
                    ("run.memory_to", &a.memory_to),
                    ("run.memory_from", &a.memory_from),
                ] {
                    addrs.iter().try_for_each(|addr| check_addr(key, addr))?;
                }
                Command::Run(Assignment {
                    job_id: a.job_id,
                    generation: a.generation,
                    rank: a.rank,
                    world_size,
                    peers,
                    job_toml: a.job_toml,
                    resume: a.resume,
                    run,
                    memory_to: a.memory_to,
                    memory_from: a.memory_from,
                })
            }
        };
        Ok(Reply {
            command,
            commit_step: r.commit_step,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rank_an_error_says_is_gone() {
        assert_eq!(
            gone_rank("error: step 7: lost rank 12 (10.0.0.3:7000) during all_reduce: it closed the connection"),
            Some(12)
        );
        assert_eq!(
            gone_rank("error: rank 3 failed during broadcast (reported by rank 2)"),
            Some(3)
        );
        assert_eq!(
            gone_rank("error: waited 600 s for rank 4 (h:1) during all_reduce"),
            None
        );
        assert_eq!(gone_rank("error: out of memory on rank 2"), None);
        assert_eq!(gone_rank(""), None);
    }

    #[test]
    fn ring_neighbours_are_the_next_and_previous_member_of_each_ring() {
        // dp 4 x tp 2: rank 3 is dp rank 1, tp rank 1.
        assert_eq!(ring_neighbours(3, 8, 2, 0), vec![1, 2, 3, 4, 5]);
        assert_eq!(ring_neighbours(0, 8, 2, 0), vec![0, 1, 2, 6, 7]);
        assert_eq!(ring_neighbours(0, 1, 1, 0), vec![0]);
        assert_eq!(ring_neighbours(1, 2, 1, 0), vec![0, 1]);
        // At most 7, whatever the world (the tensor-parallel ring's neighbours mostly are the
        // world ring's).
        assert_eq!(
            ring_neighbours(8191, 16_384, 8, 0),
            vec![8183, 8184, 8190, 8191, 8192, 8199]
        );
        for rank in 0..64 {
            assert!(ring_neighbours(rank, 64, 4, 0).len() <= 7);
        }
        assert_eq!(ring_neighbours(5000, 16_384, 1, 0), vec![4999, 5000, 5001]);
        // Hybrid sharding, dp 8 = 2 replicas x shard 4: rank 5 is in shard group 4..8 and
        // replica group {1, 5}.
        assert_eq!(ring_neighbours(5, 8, 1, 4), vec![1, 4, 5, 6]);
        // dp 8 x tp 2, shard 2: rank 6 is dp 3, tp 0: shard group dp {2, 3}, replicas dp
        // {1, 3, 5, 7}.
        assert_eq!(ring_neighbours(6, 16, 2, 2), vec![2, 4, 5, 6, 7, 8, 10]);
        // A shard of the whole data-parallel group, or one that does not divide it, adds
        // nothing.
        assert_eq!(ring_neighbours(5, 8, 1, 8), ring_neighbours(5, 8, 1, 0));
        assert_eq!(ring_neighbours(5, 8, 1, 3), ring_neighbours(5, 8, 1, 0));
        for rank in 0..64 {
            assert!(ring_neighbours(rank, 64, 4, 2).len() <= 11);
        }
    }

    #[test]
    fn an_assignment_crosses_the_wire_with_only_its_neighbours_addresses() {
        let a = Assignment {
            job_id: "j-1".into(),
            generation: 2,
            rank: 1,
            world_size: 1000,
            peers: vec![(0, "h0:1".into()), (1, "h1:1".into()), (2, "h2:1".into())],
            job_toml: "name = \"j\"".into(),
            resume: "latest".into(),
            run: "job j-1 of coordinator e".into(),
            memory_to: vec!["h1:9".into(), "h2:9".into()],
            memory_from: vec!["h1:9".into()],
        };
        assert_eq!(a.peers_arg(), "0=h0:1,1=h1:1,2=h2:1");
        let wire = rpc::HeartbeatReply::from(Reply {
            command: Command::Run(a.clone()),
            commit_step: 0,
        });
        let back = Reply::try_from(wire.clone()).unwrap();
        assert_eq!(back.command, Command::Run(a));
        // An older coordinator's full list still reads.
        let mut old = wire.clone();
        if let Some(rpc::heartbeat_reply::Command::Run(r)) = &mut old.command {
            r.world_size = 0;
            r.peer_ranks.clear();
        }
        match Reply::try_from(old).unwrap().command {
            Command::Run(a) => {
                assert_eq!(a.world_size, 3);
                assert_eq!(a.peers[2], (2, "h2:1".to_string()));
            }
            other => panic!("{other:?}"),
        }
        // A rank outside the world, or an assignment without the rank's own address, is
        // refused with the field that is wrong.
        let mut bad = wire.clone();
        if let Some(rpc::heartbeat_reply::Command::Run(r)) = &mut bad.command {
            r.peer_ranks = vec![0, 2, 3];
        }
        let e = Reply::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("no address for the rank itself (1)"), "{e}");
        let mut bad = wire.clone();
        if let Some(rpc::heartbeat_reply::Command::Run(r)) = &mut bad.command {
            r.peer_ranks = vec![0, 1, 1000];
        }
        let e = Reply::try_from(bad).unwrap_err().to_string();
        assert!(e.contains("rank 1000 of a world of 1000"), "{e}");
        let mut bad = wire;
        if let Some(rpc::heartbeat_reply::Command::Run(r)) = &mut bad.command {
            r.peer_ranks = vec![0, 1, 2];
            r.memory_from = vec!["h1:0".into()];
        }
        let e = Reply::try_from(bad).unwrap_err().to_string();
        assert!(
            e.contains("run.memory_from") && e.contains("\"h1:0\" is not HOST:PORT"),
            "{e}"
        );
    }

    #[test]
    fn worker_addresses_must_be_host_port_peers_can_reach() {
        for good in [
            "127.0.0.1:7000",
            "10.0.0.2:1",
            "[::1]:65535",
            "[fe80::1]:7000",
            "node-17.cluster.local:7000",
            "localhost:7000",
            "gpu3:29500",
        ] {
            assert_eq!(check_host_port(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            (
                "x:notaport",
                "port \"notaport\" is not a number in 1..=65535",
            ),
            (
                "127.0.0.1:99999",
                "port \"99999\" is not a number in 1..=65535",
            ),
            (":::", "port \"\" is not a number in 1..=65535"),
            ("nowhere", "no port"),
            (":7000", "host \"\" is not an IP address or a DNS name"),
            ("127.0.0.1:0", "port 0 is not a port peers can connect to"),
            (
                "0.0.0.0:7000",
                "0.0.0.0 is not an address peers can connect to",
            ),
            ("[::]:7000", ":: is not an address peers can connect to"),
            (
                "::1:7000",
                "host \"::1\" is not an IP address (IPv6 goes in brackets)",
            ),
            (
                "300.1.2.3:7000",
                "host \"300.1.2.3\" is not an IPv4 address",
            ),
            (
                "a_b:7000",
                "host \"a_b\" is not an IP address or a DNS name",
            ),
            (
                "-x.org:7000",
                "host \"-x.org\" is not an IP address or a DNS name",
            ),
            (
                "a..b:7000",
                "host \"a..b\" is not an IP address or a DNS name",
            ),
        ] {
            assert_eq!(check_host_port(bad), Err(why.to_owned()), "{bad}");
        }
    }
}
