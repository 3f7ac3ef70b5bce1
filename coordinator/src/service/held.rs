//! Held heartbeats (a long poll): a call's heartbeats taken in together, held while none of
//! its workers has anything new, and woken with their commands by the change that concerns
//! them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kiln_proto::control::{check_id, Reply};
use kiln_proto::rpc;
use tokio::sync::Notify;
use tonic::Status;

use super::{invalid, refusal, report, Service, Shared};
use crate::machine::{Machine, Woken};

impl Shared {
    /// Answers the held heartbeats of the workers `woken` concerns, with their commands
    /// computed here, under the machine's lock and once what changed is saved. O(held).
    ///
    /// A call holding several workers' heartbeats gets all of their commands from one change
    /// in one hand-over, so that it answers them together.
    pub(super) fn wake(&self, machine: &Machine, woken: &Woken) {
        let mut by_slot: HashMap<*const Slot, (Arc<Slot>, Commands)> = HashMap::new();
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for (worker, slot) in held.iter() {
            if machine.concerns(worker, woken) {
                by_slot
                    .entry(Arc::as_ptr(slot))
                    .or_insert_with(|| (slot.clone(), Vec::new()))
                    .1
                    .push((worker.clone(), machine.command_for(worker)));
            }
        }
        drop(held);
        for (slot, commands) in by_slot.into_values() {
            slot.replies
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(commands);
            slot.notify.notify_one();
        }
    }

    /// The heartbeats of `workers` (one call) are about to be held: the returned guard is
    /// woken by [`Shared::wake`] until it is dropped.
    fn hold(self: &Arc<Self>, workers: Vec<String>) -> Held {
        let slot = Arc::new(Slot::default());
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for worker in &workers {
            held.insert(worker.clone(), slot.clone());
        }
        drop(held);
        Held {
            shared: self.clone(),
            workers,
            slot,
        }
    }
}

/// Commands for workers, by worker id, in the order they were decided.
type Commands = Vec<(String, Reply)>;

/// Where a held call is woken, and the commands its workers are woken with, in order.
#[derive(Default)]
pub(super) struct Slot {
    notify: Notify,
    replies: std::sync::Mutex<Commands>,
}

/// A call's heartbeats being held; unregisters them when dropped (answered, or the call
/// given up).
struct Held {
    shared: Arc<Shared>,
    workers: Vec<String>,
    slot: Arc<Slot>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut held = self.shared.held.lock().unwrap_or_else(|p| p.into_inner());
        for worker in &self.workers {
            // A newer call of the same worker may have taken the slot: leave that one.
            if held.get(worker).is_some_and(|n| Arc::ptr_eq(n, &self.slot)) {
                held.remove(worker);
            }
        }
    }
}

/// The most heartbeats one `HeartbeatHost` call may carry.
pub const MAX_HOST_WORKERS: usize = 256;

impl Service {
    /// Takes in heartbeats together (one pass of the machine, one save) and holds them while
    /// no reply tells its worker anything new: until one does, the shortest `hold_ms` among
    /// them has passed, or the coordinator stops. A malformed heartbeat fails the call; a
    /// refused one (an unknown worker) fails its own answer, which is then given at once.
    pub(super) async fn beats(
        &self,
        requests: Vec<rpc::HeartbeatRequest>,
    ) -> Result<Vec<Result<Reply, Status>>, Status> {
        let mut workers = Vec::with_capacity(requests.len());
        let mut reports = Vec::with_capacity(requests.len());
        let mut told = Vec::with_capacity(requests.len());
        let mut hold_ms = u32::MAX;
        for r in requests {
            check_id("worker_id", &r.worker_id, true).map_err(invalid)?;
            if workers.contains(&r.worker_id) {
                return Err(invalid(format!(
                    "worker_id: {} heartbeats twice in one call",
                    r.worker_id
                )));
            }
            let Some(raw) = r.report else {
                return Err(invalid("report: missing"));
            };
            reports.push(report(Some(raw))?);
            workers.push(r.worker_id);
            told.push(r.commit_told);
            hold_ms = hold_ms.min(r.hold_ms);
        }
        let hold = Duration::from_millis(hold_ms.into()).min(self.shared.max_hold);
        // Registered before the first answers are computed, so that a change right after
        // them is not missed.
        let held = (!hold.is_zero()).then(|| self.shared.hold(workers.clone()));
        let ids = workers.clone();
        let mut replies: Vec<Result<Reply, Status>> = self
            .shared
            .with(move |m, now| {
                ids.iter()
                    .zip(reports)
                    .map(|(id, report)| m.heartbeat(id, report, now).map_err(refusal))
                    .collect()
            })
            .await?;
        if let Some(held) = held {
            self.hold(held, &mut replies, hold, &told).await;
        }
        Ok(replies)
    }

    /// Holds `replies` while none tells its worker anything new (an error is news), until one
    /// is woken with something that does, `hold` has passed, or the coordinator stops.
    async fn hold(
        &self,
        held: Held,
        replies: &mut [Result<Reply, Status>],
        hold: Duration,
        told: &[u64],
    ) {
        let news = |replies: &[Result<Reply, Status>]| {
            replies
                .iter()
                .zip(told)
                .any(|(r, &t)| r.as_ref().map_or(true, |r| r.is_news(t)))
        };
        let deadline = tokio::time::Instant::now() + hold;
        let mut stopping = self.shared.stopping.clone();
        while !news(replies) && !*stopping.borrow_and_update() {
            tokio::select! {
                _ = held.slot.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline) => break,
                _ = stopping.changed() => break,
            }
            let woken =
                std::mem::take(&mut *held.slot.replies.lock().unwrap_or_else(|p| p.into_inner()));
            if woken.is_empty() {
                let guard = self.shared.machine.lock().await;
                for (reply, worker) in replies.iter_mut().zip(&held.workers) {
                    if reply.is_ok() {
                        *reply = Ok(guard.0.command_for(worker));
                    }
                }
                continue;
            }
            for (worker, command) in woken {
                if let Some(i) = held.workers.iter().position(|w| *w == worker) {
                    if replies[i].is_ok() {
                        replies[i] = Ok(command);
                    }
                }
            }
        }
    }
}
