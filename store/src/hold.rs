//! Bytes kept in one process's memory for other processes: the snapshots of training ranks'
//! state (`checkpoint.memory_every`) that a `kiln worker` keeps for its own ranks and its
//! peers'. `Hold` keeps the newest [`KEEP`] of each rank of each run within a byte budget,
//! [`serve`] answers over TCP, and [`put`], [`list`] and [`get`] are the blocking client.
//! What the bytes are is the caller's (`kiln_checkpoint::snapshot`).
//!
//! Wire protocol (one request per TCP connection): a 4-byte big-endian length and a JSON
//! [`Envelope`] (the [`Request`] and the token), then for `put` the snapshot's bytes; the
//! answer is a length and a JSON [`Answer`], then for `get` the snapshot's bytes. A server
//! given a token answers only requests that carry it.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln_proto::client::same_token;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Snapshots a worker keeps per rank of a run: a rank can be one snapshot ahead of another
/// whose send was cut, and that one's previous must still be there.
pub const KEEP: usize = 3;
/// The longest request header accepted (a header is a few hundred bytes).
const MAX_HEADER: u32 = 1 << 20;
/// How long a connection may make no progress before the call fails.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// Keep this snapshot (`len` bytes follow); `meta` is returned by `list`.
    Put {
        run: String,
        rank: u32,
        step: u64,
        meta: serde_json::Value,
        len: u64,
    },
    /// The snapshots held for a rank of a run.
    List { run: String, rank: u32 },
    /// One snapshot's bytes.
    Get { run: String, rank: u32, step: u64 },
}

/// A request as it travels, with the token the server checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    #[serde(default)]
    pub token: String,
    pub request: Request,
}

/// A snapshot a worker holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub step: u64,
    pub len: u64,
    pub meta: serde_json::Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub held: Vec<Held>,
    /// For `get`: the bytes that follow.
    #[serde(default)]
    pub len: u64,
}

struct Entry {
    bytes: Arc<Vec<u8>>,
    meta: serde_json::Value,
    /// Arrival order: the oldest goes first when the budget is reached.
    seq: u64,
}

/// The snapshots one worker process keeps, within a byte budget.
pub struct Hold {
    budget: u64,
    held: u64,
    seq: u64,
    runs: BTreeMap<(String, u32), BTreeMap<u64, Entry>>,
    /// Buffers of dropped snapshots, kept for the next ones (counted in `held`; the first to
    /// go when the budget is reached): a snapshot a step makes the next one's memory warm.
    spare: Vec<Vec<u8>>,
}

/// At most this many spare buffers.
const SPARE: usize = 2;

impl Hold {
    pub fn new(budget: u64) -> Self {
        Hold {
            budget,
            held: 0,
            seq: 0,
            runs: BTreeMap::new(),
            spare: Vec::new(),
        }
    }

    /// An empty buffer for a snapshot of `len` bytes: a spare one when one is that large.
    pub fn buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spare.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.spare.swap_remove(i);
                self.held -= b.capacity() as u64;
                b.clear();
                b
            }
            None => Vec::with_capacity(len),
        }
    }

    /// Lets go of a snapshot; its buffer is kept as a spare unless a reader still has it.
    fn retire(&mut self, e: Entry) {
        self.held -= e.bytes.len() as u64;
        if let Ok(b) = Arc::try_unwrap(e.bytes) {
            if self.spare.len() < SPARE {
                self.held += b.capacity() as u64;
                self.spare.push(b);
            }
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.held
    }

    /// Keeps a snapshot: the [`KEEP`] newest of its rank, and within the budget, dropping the
    /// oldest snapshots of any run first.
    pub fn put(
        &mut self,
        run: &str,
        rank: u32,
        step: u64,
        meta: serde_json::Value,
        bytes: Vec<u8>,
    ) -> Result<(), String> {
        let len = bytes.len() as u64;
        if let Some(why) = over_budget(len, self.budget) {
            return Err(why);
        }
        self.seq += 1;
        let steps = self.runs.entry((run.to_owned(), rank)).or_default();
        let entry = Entry {
            bytes: Arc::new(bytes),
            meta,
            seq: self.seq,
        };
        let mut dropped = Vec::new();
        dropped.extend(steps.insert(step, entry));
        while steps.len() > KEEP {
            dropped.push(steps.pop_first().expect("non-empty").1);
        }
        self.held += len;
        for e in dropped {
            self.retire(e);
        }
        while self.held > self.budget {
            if let Some(b) = self.spare.pop() {
                self.held -= b.capacity() as u64;
                continue;
            }
            let oldest = self
                .runs
                .iter()
                .flat_map(|(key, steps)| steps.iter().map(move |(s, e)| (e.seq, key.clone(), *s)))
                .filter(|(seq, _, _)| *seq != self.seq)
                .min();
            let Some((_, key, s)) = oldest else { break };
            let steps = self.runs.get_mut(&key).expect("listed");
            let old = steps.remove(&s).expect("listed");
            if steps.is_empty() {
                self.runs.remove(&key);
            }
            self.held -= old.bytes.len() as u64;
        }
        Ok(())
    }

    pub fn list(&self, run: &str, rank: u32) -> Vec<Held> {
        self.runs
            .get(&(run.to_owned(), rank))
            .map(|steps| {
                steps
                    .iter()
                    .map(|(step, e)| Held {
                        step: *step,
                        len: e.bytes.len() as u64,
                        meta: e.meta.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn get(&self, run: &str, rank: u32, step: u64) -> Option<Arc<Vec<u8>>> {
        self.runs
            .get(&(run.to_owned(), rank))
            .and_then(|steps| steps.get(&step))
            .map(|e| e.bytes.clone())
    }
}

/// Serves `hold` on `listener` until the task is dropped; with a `token`, only to requests
/// that carry it.
pub async fn serve(listener: tokio::net::TcpListener, hold: Arc<Mutex<Hold>>, token: String) {
    let token = Arc::new(token);
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let (hold, token) = (hold.clone(), token.clone());
        tokio::spawn(async move {
            // A connection that breaks is the caller's to report.
            let _ = answer(conn, &hold, &token).await;
        });
    }
}

async fn answer(
    mut conn: tokio::net::TcpStream,
    hold: &Mutex<Hold>,
    token: &str,
) -> std::io::Result<()> {
    let len = conn.read_u32().await?;
    if len > MAX_HEADER {
        return reply(&mut conn, &fail(format!("a request of {len} bytes")), &[]).await;
    }
    let mut buf = vec![0; len as usize];
    conn.read_exact(&mut buf).await?;
    let envelope: Envelope = match serde_json::from_slice(&buf) {
        Ok(r) => r,
        Err(e) => return reply(&mut conn, &fail(format!("not a request: {e}")), &[]).await,
    };
    let request = envelope.request;
    let lock = || hold.lock().unwrap_or_else(|p| p.into_inner());
    let refused = if !token.is_empty() && !same_token(envelope.token.as_bytes(), token.as_bytes()) {
        Some("wrong token: this worker keeps snapshots for its coordinator's jobs alone".into())
    } else if let Request::Put { len, .. } = request {
        over_budget(len, lock().budget)
    } else {
        None
    };
    if let Some(why) = refused {
        // Whatever a refused `put` sends is read past and dropped, so that the sender gets
        // the answer rather than a reset connection.
        if let Request::Put { len, .. } = request {
            tokio::io::copy(&mut (&mut conn).take(len), &mut tokio::io::sink()).await?;
        }
        return reply(&mut conn, &fail(why), &[]).await;
    }
    match request {
        Request::Put {
            run,
            rank,
            step,
            meta,
            len,
        } => {
            let mut bytes = lock().buffer(len as usize);
            (&mut conn).take(len).read_to_end(&mut bytes).await?;
            if bytes.len() as u64 != len {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let answer = match lock().put(&run, rank, step, meta, bytes) {
                Ok(()) => Answer::default(),
                Err(e) => fail(e),
            };
            reply(&mut conn, &answer, &[]).await
        }
        Request::List { run, rank } => {
            let held = lock().list(&run, rank);
            reply(
                &mut conn,
                &Answer {
                    held,
                    ..Answer::default()
                },
                &[],
            )
            .await
        }
        Request::Get { run, rank, step } => {
            let got = lock().get(&run, rank, step);
            match got {
                Some(bytes) => {
                    let answer = Answer {
                        len: bytes.len() as u64,
                        ..Answer::default()
                    };
                    reply(&mut conn, &answer, &bytes).await
                }
                None => {
                    let why = format!("no snapshot of step {step} for rank {rank} of {run}");
                    reply(&mut conn, &fail(why), &[]).await
                }
            }
        }
    }
}

fn over_budget(len: u64, budget: u64) -> Option<String> {
    (len > budget).then(|| {
        format!(
            "a snapshot of {:.1} MiB does not fit this worker's memory budget of {:.1} MiB \
             (kiln worker --memory-budget-mb)",
            len as f64 / (1 << 20) as f64,
            budget as f64 / (1 << 20) as f64
        )
    })
}

fn fail(error: String) -> Answer {
    Answer {
        error: Some(error),
        ..Answer::default()
    }
}

async fn reply(
    conn: &mut tokio::net::TcpStream,
    answer: &Answer,
    bytes: &[u8],
) -> std::io::Result<()> {
    let json = serde_json::to_vec(answer).expect("an answer serializes");
    conn.write_u32(json.len() as u32).await?;
    conn.write_all(&json).await?;
    conn.write_all(bytes).await?;
    conn.flush().await
}

/// One call to the worker at `addr` (`body`: the parts of a `put`'s bytes, in order): the
/// answer, and for `get` its bytes.
fn call(
    addr: &str,
    token: &str,
    request: Request,
    body: &[&[u8]],
) -> Result<(Answer, Vec<u8>), String> {
    let io = |e: std::io::Error| format!("{addr}: {e}");
    let target = addr
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut conn = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(io)?;
    conn.set_read_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(IO_TIMEOUT)).map_err(io)?;
    let _ = conn.set_nodelay(true);
    let envelope = Envelope {
        token: token.to_owned(),
        request,
    };
    let json = serde_json::to_vec(&envelope).expect("a request serializes");
    conn.write_all(&(json.len() as u32).to_be_bytes())
        .and_then(|()| conn.write_all(&json))
        .and_then(|()| body.iter().try_for_each(|part| conn.write_all(part)))
        .and_then(|()| conn.flush())
        .map_err(io)?;
    let mut len = [0; 4];
    conn.read_exact(&mut len).map_err(io)?;
    let len = u32::from_be_bytes(len);
    if len > MAX_HEADER {
        return Err(format!("{addr}: an answer of {len} bytes"));
    }
    let mut buf = vec![0; len as usize];
    conn.read_exact(&mut buf).map_err(io)?;
    let answer: Answer =
        serde_json::from_slice(&buf).map_err(|e| format!("{addr}: not an answer: {e}"))?;
    if let Some(e) = &answer.error {
        return Err(format!("{addr}: {e}"));
    }
    let mut bytes = vec![0; answer.len as usize];
    conn.read_exact(&mut bytes).map_err(io)?;
    Ok((answer, bytes))
}

/// Sends a snapshot, the concatenation of `parts`, to the worker at `addr`; returns once it
/// holds it.
pub fn put(
    addr: &str,
    token: &str,
    run: &str,
    rank: u32,
    step: u64,
    meta: serde_json::Value,
    parts: &[&[u8]],
) -> Result<(), String> {
    let request = Request::Put {
        run: run.to_owned(),
        rank,
        step,
        meta,
        len: parts.iter().map(|p| p.len() as u64).sum(),
    };
    call(addr, token, request, parts).map(|_| ())
}

/// The snapshots the worker at `addr` holds for `rank` of `run`, oldest first.
pub fn list(addr: &str, token: &str, run: &str, rank: u32) -> Result<Vec<Held>, String> {
    let request = Request::List {
        run: run.to_owned(),
        rank,
    };
    call(addr, token, request, &[]).map(|(a, _)| a.held)
}

/// One snapshot's bytes from the worker at `addr`.
pub fn get(addr: &str, token: &str, run: &str, rank: u32, step: u64) -> Result<Vec<u8>, String> {
    let request = Request::Get {
        run: run.to_owned(),
        rank,
        step,
    };
    call(addr, token, request, &[]).map(|(_, bytes)| bytes)
}

#[cfg(test)]
mod tests;
