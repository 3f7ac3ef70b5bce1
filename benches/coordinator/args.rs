//! The bench's command line.

use std::time::Duration;

use crate::Error;

pub struct Args {
    pub workers: Vec<usize>,
    pub connections: usize,
    pub window: Duration,
    pub warmup: Duration,
    pub modes: Vec<String>,
    pub rendezvous_workers: Vec<usize>,
    pub rendezvous_intervals_ms: Vec<u64>,
    pub rounds: usize,
    pub client_threads: usize,
    pub heartbeat: bool,
    pub rendezvous: bool,
    pub lifecycle_workers: Vec<usize>,
    pub lifecycle_poll: Duration,
    /// Long-poll holds to run the lifecycle with (0: polling every `lifecycle_poll`).
    pub lifecycle_holds_ms: Vec<u64>,
    /// How long the workers wait before a bring-up or a recovery starts.
    pub lifecycle_settle: Duration,
    /// Workers per simulated host (one heartbeat call carries a host's workers).
    pub lifecycle_per_host: Vec<usize>,
    pub machine_workers: Vec<usize>,
}

pub fn list<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Vec<T>, Error> {
    value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .map_err(|_| format!("{flag}: cannot read {s:?}").into())
        })
        .collect()
}

pub fn parse_args() -> Result<Args, Error> {
    let mut a = Args {
        workers: vec![1000, 2000, 4000],
        connections: 32,
        window: Duration::from_secs(10),
        warmup: Duration::from_secs(3),
        modes: vec!["idle".into(), "running".into()],
        rendezvous_workers: vec![1000],
        rendezvous_intervals_ms: vec![1000, 200],
        rounds: 3,
        client_threads: 2,
        heartbeat: true,
        rendezvous: true,
        lifecycle_workers: vec![4000, 16_384],
        lifecycle_poll: Duration::from_millis(100),
        lifecycle_holds_ms: vec![1000, 0],
        lifecycle_settle: Duration::from_secs(3),
        lifecycle_per_host: vec![1, 8],
        machine_workers: vec![4000, 16_384, 65_536],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--workers" => a.workers = list(&flag, &value()?)?,
            "--connections" => a.connections = value()?.parse()?,
            "--window" => a.window = Duration::from_secs_f64(value()?.parse()?),
            "--warmup" => a.warmup = Duration::from_secs_f64(value()?.parse()?),
            "--modes" => a.modes = list(&flag, &value()?)?,
            "--rendezvous-workers" => a.rendezvous_workers = list(&flag, &value()?)?,
            "--rendezvous-intervals" => a.rendezvous_intervals_ms = list(&flag, &value()?)?,
            "--rounds" => a.rounds = value()?.parse()?,
            "--client-threads" => a.client_threads = value()?.parse()?,
            "--skip-heartbeat" => a.heartbeat = false,
            "--skip-rendezvous" => a.rendezvous = false,
            "--lifecycle-workers" => a.lifecycle_workers = list(&flag, &value()?)?,
            "--lifecycle-poll-ms" => a.lifecycle_poll = Duration::from_millis(value()?.parse()?),
            "--lifecycle-hold-ms" => a.lifecycle_holds_ms = list(&flag, &value()?)?,
            "--lifecycle-per-host" => a.lifecycle_per_host = list(&flag, &value()?)?,
            "--lifecycle-settle-s" => {
                a.lifecycle_settle = Duration::from_secs_f64(value()?.parse()?)
            }
            "--skip-lifecycle" => {
                a.lifecycle_workers.clear();
                a.machine_workers.clear();
            }
            "--machine-workers" => a.machine_workers = list(&flag, &value()?)?,
            other => return Err(format!("unknown argument {other:?}").into()),
        }
    }
    if a.lifecycle_per_host.contains(&0) {
        return Err("--lifecycle-per-host: a host has at least 1 worker".into());
    }
    if a.connections == 0 || a.rounds == 0 || a.client_threads == 0 {
        return Err("--connections, --rounds and --client-threads must be at least 1".into());
    }
    if let Some(m) = a
        .modes
        .iter()
        .find(|m| !matches!(m.as_str(), "idle" | "running"))
    {
        return Err(format!("--modes: {m:?} is neither idle nor running").into());
    }
    Ok(a)
}
