//! Snapshots of this rank's whole state in workers' host memory (`checkpoint.memory_every`,
//! under a coordinator): after every so many steps the parameters and the optimizer's
//! moments, as this rank holds them, and the training state are copied into one buffer and
//! sent, in the background, to the workers the coordinator named (`KILN_MEMORY_TO`: this
//! host's and a peer's). A restarted rank asks the workers that held its snapshots
//! (`KILN_MEMORY_FROM`), and the ranks agree on the newest step every one of them finds
//! ([`crate::train`]'s resume). The snapshot's format is [`kiln_checkpoint::snapshot`],
//! the workers' side and the wire [`kiln_store::hold`].

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Instant;

use kiln_checkpoint::snapshot::{self, SnapshotHeader, SnapshotTensor};
use kiln_checkpoint::Mesh;
use kiln_store::hold;
use tch::{Kind, Tensor};

use crate::model::Llama;
use crate::optim::AdamW;

/// This rank's snapshots: where they go, where earlier ones are.
pub struct MemoryTier {
    every: i64,
    run: String,
    rank: usize,
    mesh: Mesh,
    to: Vec<String>,
    from: Vec<String>,
    /// What the workers ask of those who call them (`KILN_MEMORY_TOKEN`).
    token: String,
    /// The send under way: it gives back its buffer (kept for the next snapshot, so that its
    /// memory is not faulted in again every step) and its failures.
    in_flight: Option<JoinHandle<(Vec<u8>, Vec<String>)>>,
    buffer: Vec<u8>,
    /// Closed or signalled once the snapshot under way has copied the state.
    copied: Option<mpsc::Receiver<()>>,
}

fn addrs(var: &str) -> Vec<String> {
    std::env::var(var)
        .unwrap_or_default()
        .split(',')
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The tensors a snapshot holds, in order.
fn tensors<'a>(model: &'a Llama, optimizer: &'a AdamW) -> [(&'static str, &'a Tensor); 3] {
    [
        ("params", &model.params.flat),
        ("exp_avg", &optimizer.exp_avg),
        ("exp_avg_sq", &optimizer.exp_avg_sq),
    ]
}

impl MemoryTier {
    /// For a job with `checkpoint.memory_every`: every rank has one (so that all take part in
    /// agreeing on a step), with the addresses its environment gives, possibly none.
    pub fn new(every: i64, run: String, rank: usize, mesh: Mesh) -> Option<Self> {
        (every > 0).then(|| MemoryTier {
            every,
            run,
            rank,
            mesh,
            to: addrs("KILN_MEMORY_TO"),
            from: addrs("KILN_MEMORY_FROM"),
            token: std::env::var("KILN_MEMORY_TOKEN").unwrap_or_default(),
            in_flight: None,
            buffer: Vec::new(),
            copied: None,
        })
    }

    /// Whether any worker takes this rank's snapshots.
    pub fn kept(&self) -> bool {
        !self.to.is_empty()
    }

    /// Whether a snapshot is due after `steps` steps.
    pub fn due(&self, steps: i64) -> bool {
        steps % self.every == 0 && !self.to.is_empty()
    }

    /// Starts a snapshot of the state after `steps` steps: a thread copies the tensors into
    /// one host buffer while the next step's forward and backward passes run (call
    /// [`MemoryTier::fence`] before the state changes), then sends it. Waits for the previous
    /// send first; a send that failed is reported as a warning (the store's checkpoints still
    /// stand). Returns the seconds training was held.
    pub fn snapshot(
        &mut self,
        steps: i64,
        model: &Llama,
        optimizer: &AdamW,
        train_state: serde_json::Value,
    ) -> Result<f64, String> {
        let start = Instant::now();
        self.wait();
        let mut sources = Vec::with_capacity(3);
        let mut list = Vec::with_capacity(3);
        for (name, t) in tensors(model, optimizer) {
            if t.kind() != Kind::Float {
                return Err(format!("{name} is {:?}, snapshots hold f32", t.kind()));
            }
            sources.push(t.detach());
            list.push(SnapshotTensor {
                name: name.into(),
                numel: t.numel() as u64,
            });
        }
        let header = SnapshotHeader {
            format: snapshot::FORMAT.into(),
            version: snapshot::VERSION,
            rank: self.rank,
            step: steps as u64,
            mesh: self.mesh,
            train_state,
            tensors: list,
            crc32: 0,
        };
        let (to, run, rank) = (self.to.clone(), self.run.clone(), self.rank as u32);
        let token = self.token.clone();
        let meta = serde_json::json!({ "mesh": self.mesh });
        let (copied_tx, copied) = mpsc::channel();
        let mut data = std::mem::take(&mut self.buffer);
        let send = move || -> (Vec<u8>, Vec<String>) {
            let total: usize = sources.iter().map(|t| t.numel() * 4).sum();
            data.clear();
            data.resize(total, 0);
            let mut at = 0;
            for t in &sources {
                let n = t.numel();
                let host = t.to_device(tch::Device::Cpu).contiguous();
                host.copy_data_u8(&mut data[at..at + n * 4], n);
                at += n * 4;
            }
            drop(sources);
            // From here on training may change the state.
            let _ = copied_tx.send(());
            let head = snapshot::encode_header(header, &data);
            // To both workers at once.
            let parts: [&[u8]; 2] = [&head, &data];
            let failed = std::thread::scope(|s| {
                let sends: Vec<_> = to
                    .iter()
                    .map(|addr| {
                        let (run, token, meta) = (&run, &token, meta.clone());
                        s.spawn(move || {
                            hold::put(addr, token, run, rank, steps as u64, meta, &parts)
                        })
                    })
                    .collect();
                sends
                    .into_iter()
                    .filter_map(|h| h.join().unwrap_or_else(|_| Err("panicked".into())).err())
                    .collect()
            });
            (data, failed)
        };
        let thread = std::thread::Builder::new()
            .name("kiln-snapshot".into())
            .spawn(send)
            .map_err(|e| format!("cannot start the snapshot thread: {e}"))?;
        self.in_flight = Some(thread);
        self.copied = Some(copied);
        Ok(start.elapsed().as_secs_f64())
    }

    /// Call before the parameters or the optimizer state change: blocks until the snapshot
    /// under way has copied them. Returns the seconds it waited.
    pub fn fence(&mut self) -> f64 {
        let start = Instant::now();
        if let Some(copied) = self.copied.take() {
            // An error in the copy closes the channel; the send reports it.
            let _ = copied.recv();
        }
        start.elapsed().as_secs_f64()
    }

    /// Waits for the send in flight; its failures become warnings.
    pub fn wait(&mut self) {
        self.copied = None;
        if let Some(f) = self.in_flight.take() {
            let (buffer, failed) = f
                .join()
                .unwrap_or_else(|_| (Vec::new(), vec!["the send thread panicked".into()]));
            self.buffer = buffer;
            for e in failed {
                tracing::warn!("snapshot in memory not kept: {e}");
                eprintln!("warning: a snapshot in memory was not kept: {e}");
            }
        }
    }

    /// The steps of this rank's snapshots the workers of `KILN_MEMORY_FROM` hold at this
    /// mesh, each with the workers that hold it. A worker that does not answer is skipped.
    pub fn held(&self) -> BTreeMap<u64, Vec<String>> {
        let mut held: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        let meta = serde_json::json!({ "mesh": self.mesh });
        for addr in &self.from {
            match hold::list(addr, &self.token, &self.run, self.rank as u32) {
                Ok(list) => {
                    for h in list.into_iter().filter(|h| h.meta == meta) {
                        held.entry(h.step).or_default().push(addr.clone());
                    }
                }
                Err(e) => tracing::info!("no snapshots from {e}"),
            }
        }
        held
    }

    /// Reads snapshot `step` from the first of `holders` that has it whole, loads its tensors
    /// into `model` and `optimizer`, and returns its training state and where it came from.
    pub fn load(
        &self,
        step: u64,
        holders: &[String],
        model: &Llama,
        optimizer: &AdamW,
    ) -> Result<(serde_json::Value, String), String> {
        let mut why = Vec::new();
        for addr in holders {
            let read =
                hold::get(addr, &self.token, &self.run, self.rank as u32, step).and_then(|bytes| {
                    let (header, data) =
                        snapshot::decode(&bytes).map_err(|e| format!("{addr}: {e}"))?;
                    self.restore(&header, data, model, optimizer)
                        .map_err(|e| format!("{addr}: {e}"))?;
                    Ok(header.train_state)
                });
            match read {
                Ok(state) => return Ok((state, addr.clone())),
                Err(e) => why.push(e),
            }
        }
        Err(format!(
            "snapshot of step {step} for rank {}: {}",
            self.rank,
            why.join("; ")
        ))
    }

    fn restore(
        &self,
        header: &SnapshotHeader,
        data: &[u8],
        model: &Llama,
        optimizer: &AdamW,
    ) -> Result<(), String> {
        if header.rank != self.rank || header.mesh != self.mesh {
            return Err(format!(
                "written by rank {} at {:?}; this is rank {} at {:?}",
                header.rank, header.mesh, self.rank, self.mesh
            ));
        }
        let parts = tensors(model, optimizer);
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        if names != parts.map(|(n, _)| n) {
            return Err(format!("holds {names:?}"));
        }
        let mut at = 0;
        for ((name, dst), t) in parts.into_iter().zip(&header.tensors) {
            let n = t.numel as usize;
            if n != dst.numel() {
                return Err(format!(
                    "{name} has {n} elements, this rank's has {}",
                    dst.numel()
                ));
            }
            let src = Tensor::from_data_size(&data[at..at + n * 4], &[n as i64], Kind::Float);
            tch::no_grad(|| {
                let mut dst = dst.shallow_clone();
                dst.copy_(&src.to_device(dst.device()).view_as(&dst));
            });
            at += n * 4;
        }
        Ok(())
    }
}

impl Drop for MemoryTier {
    fn drop(&mut self) {
        self.wait();
    }
}
