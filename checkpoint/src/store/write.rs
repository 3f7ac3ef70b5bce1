//! Writing a rank's object: the safetensors object produced part by part from the rank's
//! tensors and uploaded while it is produced, within a host-memory budget, then the rank's
//! confirmation (the object's size and the CRC of every piece).

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use super::{CheckpointStore, Result};
use crate::layout::{
    report_name, safetensors_header, shard_name, Dtype, ObjectInfo, Piece, Region,
};

/// Objects above this size are uploaded in parts of this size, several at once.
const PART: usize = 32 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 4;

/// Fills `dst` with bytes `range` (relative to the piece's start) of piece `i`.
pub type Fill<'a> = &'a mut dyn FnMut(usize, Range<u64>, &mut [u8]);

/// How a rank's object is produced and uploaded.
pub struct RankObjectWriter<'a> {
    /// The pieces, in the order they are laid out after the safetensors header.
    pub pieces: Vec<(Region, Dtype)>,
    /// Fills `dst` with bytes `range` (relative to the piece's start) of piece `i`. Called
    /// in order, each byte once.
    pub fill: Fill<'a>,
    /// Called once every byte has been filled (the uploads may still be running): from
    /// here on the source of the bytes may change.
    pub copied: &'a mut dyn FnMut(),
    /// At most this many bytes held in host memory at once (filled but not yet uploaded);
    /// `None`: the whole shard if it fits in half the memory available now, else that half.
    pub host_budget: Option<u64>,
    /// Part buffers to reuse, and where they go back afterwards (a rank saving every N
    /// steps keeps them, so no save pays for fresh pages).
    pub spare: &'a mut Vec<Vec<u8>>,
    /// Whatever the rank's own state is (e.g. its random-number state).
    pub rank_state: serde_json::Value,
}

/// The bytes of a shard object, produced in order: the safetensors header, then each piece
/// from [`RankObjectWriter::fill`], its CRC computed on the way.
struct ShardBytes<'a> {
    header: Vec<u8>,
    ranges: Vec<Range<u64>>,
    fill: Fill<'a>,
    hashers: Vec<crc32fast::Hasher>,
    next_piece: usize,
}

impl ShardBytes<'_> {
    /// Produces bytes `at..at + len` of the object into `buf`.
    fn produce(&mut self, buf: &mut Vec<u8>, at: u64, len: u64) {
        buf.resize(len as usize, 0);
        let end = at + len;
        let h = self.header.len() as u64;
        if at < h {
            let hi = end.min(h);
            buf[..(hi - at) as usize].copy_from_slice(&self.header[at as usize..hi as usize]);
        }
        while self.next_piece < self.ranges.len() {
            let r = &self.ranges[self.next_piece];
            let (lo, hi) = (r.start.max(at), r.end.min(end));
            if lo < hi {
                let dst = &mut buf[(lo - at) as usize..(hi - at) as usize];
                (self.fill)(self.next_piece, lo - r.start..hi - r.start, dst);
                self.hashers[self.next_piece].update(dst);
            }
            if r.end > end {
                break;
            }
            self.next_piece += 1;
        }
    }
}

impl CheckpointStore {
    /// Writes a rank's object, then its confirmation (the object's size and the CRC of
    /// every piece). The object is produced part by part from `w.fill` and uploaded while
    /// it is produced (several parts at once), with at most `w.host_budget` bytes in memory.
    pub fn write_rank_object(
        &self,
        step: u64,
        rank: usize,
        w: RankObjectWriter<'_>,
    ) -> Result<ObjectInfo> {
        let name = shard_name(rank);
        let path = self.path(step, &name);
        let (header, ranges) = safetensors_header(&w.pieces);
        let total = ranges.last().map_or(header.len() as u64, |r| r.end);
        let mut bytes = ShardBytes {
            header,
            ranges,
            fill: w.fill,
            hashers: vec![crc32fast::Hasher::new(); w.pieces.len()],
            next_piece: 0,
        };
        let uploaded = if total <= PART as u64 {
            self.upload_whole(&path, total, &mut bytes, w.copied, w.spare)
        } else {
            let budget = w
                .host_budget
                .unwrap_or_else(|| total.min(available_memory().map_or(total, |m| m / 2)))
                .max(PART as u64);
            self.upload_in_parts(&path, total, budget, &mut bytes, w.copied, w.spare)
        };
        uploaded.map_err(|e| self.io(step, &name, e))?;
        let pieces: Vec<Piece> = w
            .pieces
            .into_iter()
            .zip(bytes.ranges)
            .zip(bytes.hashers)
            .map(|(((region, _), bytes), h)| Piece {
                crc32: h.finalize(),
                region,
                bytes,
            })
            .collect();
        let info = ObjectInfo {
            name,
            rank,
            size: total,
            pieces,
            rank_state: w.rank_state,
        };
        let report = serde_json::to_vec(&info).unwrap_or_default();
        let rname = report_name(rank);
        self.rt
            .block_on(
                self.loc
                    .store
                    .put(&self.path(step, &rname), PutPayload::from(report)),
            )
            .map_err(|e| self.io(step, &rname, e))?;
        Ok(info)
    }

    /// Uploads an object of at most one part with one put.
    fn upload_whole(
        &self,
        path: &Path,
        total: u64,
        bytes: &mut ShardBytes<'_>,
        copied: &mut dyn FnMut(),
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<(), object_store::Error> {
        let store = self.loc.store.clone();
        let mut buf = spare.pop().unwrap_or_default();
        bytes.produce(&mut buf, 0, total);
        copied();
        let buf = Bytes::from(buf);
        let put = self
            .rt
            .block_on(store.put(path, PutPayload::from(buf.clone())))
            .map(|_| ());
        if let Ok(b) = buf.try_into_mut() {
            spare.push(b.into());
        }
        put
    }

    /// Uploads a multipart object, producing each part as an earlier one's upload frees its
    /// buffer: at most `budget` bytes held, [`PARTS_IN_FLIGHT`] parts uploading at once.
    fn upload_in_parts(
        &self,
        path: &Path,
        total: u64,
        budget: u64,
        bytes: &mut ShardBytes<'_>,
        copied: &mut dyn FnMut(),
        spare: &mut Vec<Vec<u8>>,
    ) -> Result<(), object_store::Error> {
        let store = self.loc.store.clone();
        let held_max = budget.div_ceil(PART as u64) as usize;
        self.rt.block_on(async {
            let mut upload = store.put_multipart(path).await?;
            let gate = Arc::new(tokio::sync::Semaphore::new(PARTS_IN_FLIGHT));
            let mut held: std::collections::VecDeque<(
                tokio::task::JoinHandle<Result<(), object_store::Error>>,
                Bytes,
            )> = Default::default();
            let mut failed = None;
            let mut at = 0u64;
            while at < total && failed.is_none() {
                if held.len() >= held_max {
                    let (task, buf) = held.pop_front().unwrap_or_else(|| unreachable!());
                    match task.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failed = Some(e),
                        Err(e) => failed = Some(object_store::Error::JoinError { source: e }),
                    }
                    if let Ok(b) = buf.try_into_mut() {
                        spare.push(b.into());
                    }
                    continue;
                }
                let len = (PART as u64).min(total - at);
                let mut buf = spare.pop().unwrap_or_default();
                bytes.produce(&mut buf, at, len);
                at += len;
                let buf = Bytes::from(buf);
                let part = upload.put_part(PutPayload::from(buf.clone()));
                let gate = gate.clone();
                let task = tokio::spawn(async move {
                    let _permit = gate.acquire_owned().await;
                    part.await
                });
                held.push_back((task, buf));
            }
            copied();
            for (task, buf) in held {
                match task.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => failed = failed.or(Some(e)),
                    Err(e) => {
                        failed = failed.or(Some(object_store::Error::JoinError { source: e }))
                    }
                }
                if let Ok(b) = buf.try_into_mut() {
                    spare.push(b.into());
                }
            }
            match failed {
                None => upload.complete().await.map(|_| ()),
                Some(e) => {
                    let _ = upload.abort().await;
                    Err(e)
                }
            }
        })
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes, where there is one.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}
