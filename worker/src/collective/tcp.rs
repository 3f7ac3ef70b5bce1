//! Collectives over a TCP ring, for CPU training on any machine.
//!
//! Each group of `n` ranks is a ring: every rank holds one connection to the next rank and
//! one from the previous. An all-reduce is a reduce-scatter followed by an all-gather
//! (`2 (n - 1)` steps, each moving `1/n` of the buffer), so every rank sends and receives
//! `2 (n - 1) / n` of the buffer whatever `n` is — the bandwidth-optimal schedule Gloo and
//! NCCL use. Chunks are cut into segments; a sender thread writes segment `j` to the next
//! rank while the calling thread receives and reduces segment `j + 1` from the previous one.
//! Nothing is copied on the way: segments are written straight from the tensor's memory
//! (lent to the sender thread as disjoint `&mut` slices and handed back once written), the
//! all-gather reads straight into it, and the reduce-scatter reads into one reused buffer and
//! reduces in place.
//!
//! Wire format: every message is an 8-byte little-endian header followed by the payload.
//! The header is the payload length, or, with the top bit set, an abort notice carrying the
//! global rank that failed: a rank that loses a peer tells the next rank before giving up,
//! so every rank's error names the rank that died rather than the neighbour that gave up.
//!
//! The rendezvous that forms the rings ([`TcpRing::connect`]) is in `rendezvous`.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::Duration;

use tch::{Device, Tensor};

use super::{chunk_range, host, Collective, CollectiveError, Elem, ReduceOp, Result};

mod rendezvous;

pub use rendezvous::LISTEN_FD_ENV;

const ABORT: u64 = 1 << 63;

/// How long a rank waits for a peer inside a collective: `KILN_COLLECTIVE_TIMEOUT_S`, 600 s
/// by default (the first step of a large model can be slow on some ranks).
pub fn collective_timeout() -> Duration {
    env_secs("KILN_COLLECTIVE_TIMEOUT_S", 600)
}

/// How long the rendezvous waits for every peer to come up: `KILN_RENDEZVOUS_TIMEOUT_S`,
/// 300 s by default.
pub fn rendezvous_timeout() -> Duration {
    env_secs("KILN_RENDEZVOUS_TIMEOUT_S", 300)
}

fn env_secs(name: &str, default: u64) -> Duration {
    let secs = std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(default as f64);
    Duration::from_secs_f64(secs)
}

/// Segment size of the pipeline: `KILN_RING_SEGMENT_KB`, 512 KiB by default.
fn segment_bytes() -> usize {
    std::env::var("KILN_RING_SEGMENT_KB")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|kb| *kb > 0)
        .unwrap_or(512)
        << 10
}

#[derive(Debug)]
struct Links {
    next: TcpStream,
    prev: TcpStream,
}

/// One ring of ranks.
#[derive(Debug)]
pub struct TcpRing {
    rank: usize,
    /// Global ranks of the members, in ring order.
    members: Vec<usize>,
    addrs: Vec<String>,
    /// `None` for a group of one, and after a failure (the ring is then unusable).
    links: Mutex<Option<Links>>,
    timeout: Duration,
    segment: usize,
    /// The receive buffer of the reduce-scatter, kept between operations so that a training
    /// loop's all-reduces do not allocate (and page-fault) a fresh one each time.
    scratch: Mutex<Vec<u8>>,
}

/// One message for the sender thread: segment `id` of the buffer, lent to it until written.
type Lent<'a> = (usize, &'a mut [u8]);

/// The receiving side's handle on the sender thread. Segments of the caller's buffer are
/// lent to it, written to the next rank straight from the tensor's memory in the order
/// given, and handed back once written; the borrow checker guarantees that nobody touches
/// a segment while it is being sent.
struct Outbox<'a> {
    tx: mpsc::Sender<Lent<'a>>,
    returned: mpsc::Receiver<Lent<'a>>,
}

impl<'a> Outbox<'a> {
    fn send(&self, id: usize, seg: &'a mut [u8]) {
        // The sender thread only stops early after a write failed, which the caller learns
        // when it joins the thread.
        let _ = self.tx.send((id, seg));
    }
}

/// The segments of one operation's buffer, each either here or lent to the sender thread.
struct Segments<'a> {
    slots: Vec<Option<&'a mut [u8]>>,
}

impl<'a> Segments<'a> {
    /// Cuts `buf` into `pieces` (consecutive, in order, covering a prefix of `buf`).
    fn cut(mut buf: &'a mut [u8], pieces: impl Iterator<Item = Range<usize>>) -> Self {
        let mut slots = Vec::new();
        for piece in pieces {
            let (head, tail) = std::mem::take(&mut buf).split_at_mut(piece.len());
            slots.push(Some(head));
            buf = tail;
        }
        Segments { slots }
    }

    /// Segment `id`, waiting for the sender thread to hand it back if it is lent out.
    fn take(&mut self, id: usize, out: &Outbox<'a>) -> Result<&'a mut [u8]> {
        loop {
            if let Some(seg) = self.slots[id].take() {
                return Ok(seg);
            }
            match out.returned.recv() {
                Ok((i, seg)) => self.slots[i] = Some(seg),
                // The sender thread failed; joining it reports why.
                Err(_) => return Err(CollectiveError::Invalid("the sender stopped".into())),
            }
        }
    }

    fn put(&mut self, id: usize, seg: &'a mut [u8]) {
        self.slots[id] = Some(seg);
    }
}

/// One group to form at the rendezvous.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    /// Names the group on the wire; unique among the groups of one job.
    pub tag: String,
    /// Global ranks, in ring order.
    pub members: Vec<usize>,
}

impl TcpRing {
    /// A group with only this rank: every operation leaves its tensors as they are (an
    /// average of one value is that value).
    pub fn single(global_rank: usize) -> Self {
        TcpRing {
            rank: 0,
            members: vec![global_rank],
            addrs: vec!["local".into()],
            links: Mutex::new(None),
            timeout: collective_timeout(),
            segment: segment_bytes(),
            scratch: Mutex::new(Vec::new()),
        }
    }

    fn next(&self) -> usize {
        (self.rank + 1) % self.members.len()
    }

    fn prev(&self) -> usize {
        (self.rank + self.members.len() - 1) % self.members.len()
    }

    /// Runs `f` on the bytes of `t` (a staging copy when `t` is not a contiguous CPU tensor).
    fn on_host(&self, t: &Tensor, f: impl FnOnce(&mut [u8], Elem) -> Result<()>) -> Result<()> {
        let elem = Elem::of(t.kind())?;
        if self.members.len() == 1 {
            // Nothing to exchange: no staging copy either.
            return Ok(());
        }
        if t.device() == Device::Cpu && t.is_contiguous() {
            return host::with_bytes_mut(t, |b| f(b, elem))?;
        }
        let staged = t.to_device(Device::Cpu).contiguous();
        let staged = if staged.data_ptr() == t.data_ptr() {
            staged.copy()
        } else {
            staged
        };
        host::with_bytes_mut(&staged, |b| f(b, elem))??;
        tch::no_grad(|| t.shallow_clone().copy_(&staged));
        Ok(())
    }

    /// Reduce-scatter and/or all-gather over the chunks of `buf`.
    fn ring(
        &self,
        name: &'static str,
        buf: &mut [u8],
        elem: Elem,
        reduce: Option<ReduceOp>,
        gather: bool,
    ) -> Result<()> {
        let n = self.members.len();
        if n == 1 {
            return Ok(());
        }
        let es = elem.size();
        let numel = buf.len() / es;
        let r = self.rank;
        let seg = self.segment.max(es) / es * es;
        // Segment ids of each chunk; chunk `c` is sent and received as `ids[c % n]`.
        let mut ids = Vec::with_capacity(n);
        let mut pieces = Vec::new();
        for c in 0..n {
            let e = chunk_range(numel, n, c);
            let start = pieces.len();
            pieces.extend(segments(e.start * es..e.end * es, seg));
            ids.push(start..pieces.len());
        }
        let chunk = |c: usize| ids[c % n].clone();
        let mut scratch =
            std::mem::take(&mut *self.scratch.lock().unwrap_or_else(|p| p.into_inner()));
        let result = self.with_links(name, |links, out| {
            let mut segs = Segments::cut(buf, pieces.into_iter());
            if let Some(op) = reduce {
                for id in chunk(r + n - 1) {
                    out.send(id, segs.take(id, out)?);
                }
                for step in 0..n - 1 {
                    for id in chunk(r + 2 * n - 2 - step) {
                        let dst = segs.take(id, out)?;
                        scratch.resize(dst.len(), 0);
                        self.read_frame(&links.prev, &mut scratch[..dst.len()], name)?;
                        elem.reduce(op, dst, &scratch[..dst.len()]);
                        if step < n - 2 {
                            out.send(id, dst);
                        } else {
                            segs.put(id, dst);
                        }
                    }
                }
                if op == ReduceOp::Avg {
                    for id in chunk(r) {
                        let dst = segs.take(id, out)?;
                        elem.scale_avg(dst, n);
                        segs.put(id, dst);
                    }
                }
            }
            if gather {
                for id in chunk(r) {
                    out.send(id, segs.take(id, out)?);
                }
                for step in 0..n - 1 {
                    for id in chunk(r + 2 * n - 1 - step) {
                        let dst = segs.take(id, out)?;
                        self.read_frame(&links.prev, dst, name)?;
                        if step < n - 2 {
                            out.send(id, dst);
                        }
                    }
                }
            }
            Ok(())
        });
        *self.scratch.lock().unwrap_or_else(|p| p.into_inner()) = scratch;
        result
    }

    /// Runs `body` with the links and an [`Outbox`] whose sender thread writes what it is
    /// given to the next rank, in order. Turns any failure into an error that names the rank
    /// that failed, tells the next rank about it, and leaves the group unusable.
    fn with_links<'a>(
        &self,
        name: &'static str,
        body: impl FnOnce(&Links, &Outbox<'a>) -> Result<()>,
    ) -> Result<()> {
        let mut guard = self.links.lock().unwrap_or_else(|p| p.into_inner());
        let Some(links) = guard.as_ref() else {
            return Err(CollectiveError::Invalid(format!(
                "{name}: this process group already failed; the job must restart"
            )));
        };
        let next = self.next();
        // Which side failed first (1: receiving, 2: sending): when a rank dies, its
        // neighbours' other links fail soon after, and the first failure names the culprit.
        let first = AtomicU8::new(0);
        let result = std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<Lent<'a>>();
            let (back, returned) = mpsc::channel::<Lent<'a>>();
            let outbox = Outbox { tx, returned };
            let (out, prev, first) = (&links.next, &links.prev, &first);
            let sender = scope.spawn(move || -> io::Result<()> {
                let mut out = out;
                for (id, seg) in rx {
                    let header = (seg.len() as u64).to_le_bytes();
                    if let Err(e) = out.write_all(&header).and_then(|_| out.write_all(seg)) {
                        let _ = first.compare_exchange(0, 2, Ordering::SeqCst, Ordering::SeqCst);
                        // Wake the receiving side, which may be waiting on a rank that is
                        // itself waiting on us.
                        let _ = prev.shutdown(Shutdown::Read);
                        return Err(e);
                    }
                    // The receiving side may have finished and stopped listening.
                    let _ = back.send((id, seg));
                }
                Ok(())
            });
            let received = body(links, &outbox);
            if received.is_err() {
                let _ = first.compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst);
            }
            drop(outbox);
            let sent = sender
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("the sender thread panicked")));
            match (sent, received) {
                (Err(e), Err(r)) if first.load(Ordering::SeqCst) != 2 => {
                    let _ = e;
                    Err(r)
                }
                (Err(e), _) => Err(self.send_error(&links.next, name, &e)),
                (Ok(()), r) => r,
            }
        });
        if let Err(e) = &result {
            if let Some(dead) = e.peer() {
                let dead_global = match e {
                    CollectiveError::Aborted { dead, .. } => *dead,
                    _ => self.members[dead.min(self.members.len() - 1)],
                };
                // Tell both neighbours (the previous one on the connection it sends on, which
                // it reads only when sending to us fails).
                for (peer, mut link) in [(next, &links.next), (self.prev(), &links.prev)] {
                    if self.members[peer] != dead_global {
                        let _ = link.set_write_timeout(Some(Duration::from_secs(2)));
                        let _ = link.write_all(&(ABORT | dead_global as u64).to_le_bytes());
                    }
                }
            }
            if let Some(links) = guard.take() {
                let _ = links.next.shutdown(Shutdown::Both);
                let _ = links.prev.shutdown(Shutdown::Both);
            }
            return Err(self.globalize(e.clone()));
        }
        result
    }

    /// Errors carry group-local ranks until here; users see global ranks.
    fn globalize(&self, e: CollectiveError) -> CollectiveError {
        match e {
            CollectiveError::PeerLost {
                peer,
                addr,
                op,
                what,
            } => CollectiveError::PeerLost {
                peer: self.members[peer],
                addr,
                op,
                what,
            },
            CollectiveError::Timeout {
                peer,
                addr,
                op,
                secs,
            } => CollectiveError::Timeout {
                peer: self.members[peer],
                addr,
                op,
                secs,
            },
            other => other,
        }
    }

    /// Sending to the next rank failed: if it said why before it went (an abort notice on
    /// the same connection), blame the rank it named.
    fn send_error(&self, mut next: &TcpStream, op: &'static str, e: &io::Error) -> CollectiveError {
        let mut notice = [0u8; 8];
        let _ = next.set_read_timeout(Some(Duration::from_millis(500)));
        if next.read_exact(&mut notice).is_ok() {
            let header = u64::from_le_bytes(notice);
            if header & ABORT != 0 {
                return CollectiveError::Aborted {
                    dead: (header & !ABORT) as usize,
                    reporter: self.members[self.next()],
                    op,
                };
            }
        }
        self.io_error(self.next(), op, e)
    }

    fn io_error(&self, peer: usize, op: &'static str, e: &io::Error) -> CollectiveError {
        let addr = self.addrs[peer].clone();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CollectiveError::Timeout {
                peer,
                addr,
                op,
                secs: self.timeout.as_secs(),
            },
            io::ErrorKind::UnexpectedEof => CollectiveError::PeerLost {
                peer,
                addr,
                op,
                what: "it closed the connection (did the process exit?)".into(),
            },
            _ => CollectiveError::PeerLost {
                peer,
                addr,
                op,
                what: e.to_string(),
            },
        }
    }

    /// Reads the next message from the previous rank into `dst`, which it must fill exactly.
    fn read_frame(&self, mut prev: &TcpStream, dst: &mut [u8], op: &'static str) -> Result<()> {
        let len = dst.len();
        let from = self.prev();
        let mut header = [0u8; 8];
        prev.read_exact(&mut header)
            .map_err(|e| self.io_error(from, op, &e))?;
        let header = u64::from_le_bytes(header);
        if header & ABORT != 0 {
            return Err(CollectiveError::Aborted {
                dead: (header & !ABORT) as usize,
                reporter: self.members[from],
                op,
            });
        }
        if header as usize != len {
            return Err(CollectiveError::Invalid(format!(
                "{op}: rank {} sent {header} bytes where this rank expected {len}: the ranks disagree on the operation or the tensor shape",
                self.members[from]
            )));
        }
        prev.read_exact(dst)
            .map_err(|e| self.io_error(from, op, &e))
    }
}

impl Collective for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.members.len()
    }

    fn all_reduce(&self, t: &Tensor, op: ReduceOp) -> Result<()> {
        self.on_host(t, |buf, elem| {
            self.ring("all_reduce", buf, elem, Some(op), true)
        })
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<()> {
        let n = self.members.len();
        if root >= n {
            return Err(CollectiveError::Invalid(format!(
                "broadcast from rank {root} in a group of {n}"
            )));
        }
        if n == 1 {
            return Ok(());
        }
        let seg = self.segment;
        self.on_host(t, |buf, elem| {
            let seg = seg.max(elem.size()) / elem.size() * elem.size();
            let forward = self.next() != root;
            self.with_links("broadcast", |links, out| {
                let mut segs = Segments::cut(buf, segments(0..buf.len(), seg));
                for id in 0..segs.slots.len() {
                    let dst = segs.take(id, out)?;
                    if self.rank != root {
                        self.read_frame(&links.prev, dst, "broadcast")?;
                    }
                    if self.rank == root || forward {
                        out.send(id, dst);
                    }
                }
                Ok(())
            })
        })
    }

    fn reduce_scatter_flat(&self, buf: &Tensor, op: ReduceOp) -> Result<()> {
        self.on_host(buf, |b, elem| {
            self.ring("reduce_scatter", b, elem, Some(op), false)
        })
    }

    fn all_gather_flat(&self, buf: &Tensor) -> Result<()> {
        self.on_host(buf, |b, elem| self.ring("all_gather", b, elem, None, true))
    }

    fn barrier(&self) -> Result<()> {
        let mut token = [0u8; 4];
        self.ring("barrier", &mut token, Elem::I32, Some(ReduceOp::Sum), true)
    }
}

/// `range` cut into pieces of at most `seg` bytes.
fn segments(range: Range<usize>, seg: usize) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    (range.start..end)
        .step_by(seg.max(1))
        .map(move |s| s..(s + seg).min(end))
}
