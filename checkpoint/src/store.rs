//! Checkpoints in an object store: writing a rank's shard and its confirmation, the commit
//! that makes a checkpoint exist, listing, reading regions at any layout, verification and
//! retention. Blocking API; the async IO runs on a private runtime.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use kiln_store::{self as store, StoreLocation};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};

use crate::layout::{
    parse_step_dir, report_name, runs, safetensors_header, shard_name, step_dir, to_delete, Dtype,
    Manifest, Mesh, ObjectInfo, Piece, Region, Run, TensorInfo, FORMAT, MANIFEST, VERSION,
};
use crate::CheckpointError;

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// Objects above this size are uploaded in parts of this size, several at once.
const PART: usize = 32 << 20;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 4;
/// Reads from a remote store are made in chunks of this size, this many at once.
const READ_CHUNK: usize = 64 << 20;
const READS_IN_FLIGHT: usize = 4;

/// One piece to fetch: its index in its object, the byte span of the object to get, and
/// the copies (region index, run) out of it.
type Fetch = (usize, Range<u64>, Vec<(usize, Run)>);

/// Fills `dst` with bytes `range` (relative to the piece's start) of piece `i`.
pub type Fill<'a> = &'a mut dyn FnMut(usize, Range<u64>, &mut [u8]);

/// How a rank's shard is produced and uploaded.
pub struct ShardWriter<'a> {
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

/// A directory of checkpoints (`step-N/` under one URL).
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    loc: StoreLocation,
    rt: Arc<tokio::runtime::Runtime>,
}

/// What `list` finds in one `step-N/` directory.
#[derive(Debug, Clone)]
pub enum Listed {
    /// A manifest that parses: the checkpoint exists (its objects are not read here).
    Committed(Box<Manifest>),
    /// No manifest (a save in progress, or one that never finished).
    Uncommitted,
    /// A manifest that cannot be used, and why.
    Invalid(String),
}

/// The outcome of checking every byte of a checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    pub objects: usize,
    pub pieces: usize,
    pub bytes: u64,
}

impl CheckpointStore {
    /// Opens the checkpoint directory at `url` (any store URL Kiln reads datasets from).
    pub fn open(url: &str) -> Result<Self> {
        let loc = store::open(url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kiln-ckpt")
            .enable_all()
            .build()
            .map_err(|e| CheckpointError::Io {
                object: url.to_owned(),
                message: format!("cannot start the IO runtime: {e}"),
            })?;
        Ok(CheckpointStore {
            loc,
            rt: Arc::new(rt),
        })
    }

    /// On the local file system, flush every object written (and its directory) to disk
    /// before it counts as written, so that a committed checkpoint survives a machine crash
    /// and not only a process crash. Other stores acknowledge writes once durable anyway.
    pub fn with_fsync(mut self, fsync: bool) -> Self {
        if self.loc.local_dir.is_some() {
            self.loc.store =
                Arc::new(object_store::local::LocalFileSystem::new().with_fsync(fsync));
        }
        self
    }

    pub fn url(&self) -> &str {
        &self.loc.url
    }

    fn path(&self, step: u64, name: &str) -> Path {
        self.loc.child(&format!("{}/{name}", step_dir(step)))
    }

    /// The object's URL, for messages.
    pub fn display(&self, step: u64, name: &str) -> String {
        self.loc.display(&format!("{}/{name}", step_dir(step)))
    }

    fn io(&self, step: u64, name: &str, e: object_store::Error) -> CheckpointError {
        CheckpointError::Io {
            object: self.display(step, name),
            message: e.to_string(),
        }
    }

    /// Writes a rank's shard, then its confirmation (the object's size and the CRC of
    /// every piece). The object is produced part by part from `w.fill` and uploaded while
    /// it is produced (several parts at once), with at most `w.host_budget` bytes in memory.
    pub fn write_shard(&self, step: u64, rank: usize, w: ShardWriter<'_>) -> Result<ObjectInfo> {
        let name = shard_name(rank);
        let path = self.path(step, &name);
        let (header, ranges) = safetensors_header(&w.pieces);
        let total = ranges.last().map_or(header.len() as u64, |r| r.end);
        let mut hashers = vec![crc32fast::Hasher::new(); w.pieces.len()];
        let mut next_piece = 0usize;
        // Produces bytes `at..at + len` of the object into `buf`.
        let mut produce = |buf: &mut Vec<u8>, at: u64, len: u64| {
            buf.resize(len as usize, 0);
            let end = at + len;
            let h = header.len() as u64;
            if at < h {
                let hi = end.min(h);
                buf[..(hi - at) as usize].copy_from_slice(&header[at as usize..hi as usize]);
            }
            while next_piece < ranges.len() {
                let r = &ranges[next_piece];
                let (lo, hi) = (r.start.max(at), r.end.min(end));
                if lo < hi {
                    let dst = &mut buf[(lo - at) as usize..(hi - at) as usize];
                    (w.fill)(next_piece, lo - r.start..hi - r.start, dst);
                    hashers[next_piece].update(dst);
                }
                if r.end > end {
                    break;
                }
                next_piece += 1;
            }
        };
        let store = self.loc.store.clone();
        let spare = w.spare;
        let uploaded = if total <= PART as u64 {
            let mut buf = spare.pop().unwrap_or_default();
            produce(&mut buf, 0, total);
            (w.copied)();
            let bytes = Bytes::from(buf);
            let put = self
                .rt
                .block_on(store.put(&path, PutPayload::from(bytes.clone())))
                .map(|_| ());
            if let Ok(b) = bytes.try_into_mut() {
                spare.push(b.into());
            }
            put
        } else {
            let budget = w
                .host_budget
                .unwrap_or_else(|| total.min(available_memory().map_or(total, |m| m / 2)))
                .max(PART as u64);
            let held_max = budget.div_ceil(PART as u64) as usize;
            self.rt.block_on(async {
                let mut upload = store.put_multipart(&path).await?;
                let gate = Arc::new(tokio::sync::Semaphore::new(PARTS_IN_FLIGHT));
                let mut held: std::collections::VecDeque<(
                    tokio::task::JoinHandle<Result<(), object_store::Error>>,
                    Bytes,
                )> = Default::default();
                let mut failed = None;
                let mut at = 0u64;
                while at < total && failed.is_none() {
                    if held.len() >= held_max {
                        let (task, bytes) = held.pop_front().unwrap_or_else(|| unreachable!());
                        match task.await {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => failed = Some(e),
                            Err(e) => failed = Some(object_store::Error::JoinError { source: e }),
                        }
                        if let Ok(b) = bytes.try_into_mut() {
                            spare.push(b.into());
                        }
                        continue;
                    }
                    let len = (PART as u64).min(total - at);
                    let mut buf = spare.pop().unwrap_or_default();
                    produce(&mut buf, at, len);
                    at += len;
                    let bytes = Bytes::from(buf);
                    let part = upload.put_part(PutPayload::from(bytes.clone()));
                    let gate = gate.clone();
                    let task = tokio::spawn(async move {
                        let _permit = gate.acquire_owned().await;
                        part.await
                    });
                    held.push_back((task, bytes));
                }
                (w.copied)();
                for (task, bytes) in held {
                    match task.await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failed = failed.or(Some(e)),
                        Err(e) => {
                            failed = failed.or(Some(object_store::Error::JoinError { source: e }))
                        }
                    }
                    if let Ok(b) = bytes.try_into_mut() {
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
        };
        uploaded.map_err(|e| self.io(step, &name, e))?;
        let pieces: Vec<Piece> = w
            .pieces
            .into_iter()
            .zip(ranges)
            .zip(hashers)
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

    /// Commits step `step`: waits (up to `timeout`) until all `mesh.world` ranks have
    /// confirmed their shards, then writes the manifest. Until the manifest is written the
    /// checkpoint does not exist.
    pub fn commit(
        &self,
        step: u64,
        mesh: Mesh,
        tensors: BTreeMap<String, TensorInfo>,
        train_state: serde_json::Value,
        timeout: Duration,
    ) -> Result<Manifest> {
        let deadline = Instant::now() + timeout;
        let mut objects: Vec<Option<ObjectInfo>> = vec![None; mesh.world];
        loop {
            for (rank, slot) in objects.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let name = report_name(rank);
                match self.rt.block_on(async {
                    self.loc
                        .store
                        .get(&self.path(step, &name))
                        .await?
                        .bytes()
                        .await
                }) {
                    Ok(bytes) => {
                        let info: ObjectInfo = serde_json::from_slice(&bytes).map_err(|e| {
                            CheckpointError::Invalid {
                                object: self.display(step, &name),
                                message: e.to_string(),
                            }
                        })?;
                        *slot = Some(info);
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.io(step, &name, e)),
                }
            }
            let missing: Vec<usize> = (0..mesh.world).filter(|r| objects[*r].is_none()).collect();
            if missing.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(CheckpointError::Unconfirmed {
                    checkpoint: self.display(step, ""),
                    ranks: missing,
                    secs: timeout.as_secs(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let manifest = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            step,
            created_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            mesh,
            train_state,
            tensors,
            objects: objects.into_iter().flatten().collect(),
        };
        let text = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        self.rt
            .block_on(
                self.loc
                    .store
                    .put(&self.path(step, MANIFEST), PutPayload::from(text)),
            )
            .map_err(|e| self.io(step, MANIFEST, e))?;
        Ok(manifest)
    }

    /// Every `step-N/` directory, oldest first, with what it holds.
    pub fn list(&self) -> Result<Vec<(u64, Listed)>> {
        let listing = self
            .rt
            .block_on(self.loc.store.list_with_delimiter(Some(&self.loc.prefix)))
            .map_err(|e| CheckpointError::Io {
                object: self.loc.url.clone(),
                message: e.to_string(),
            })?;
        let mut steps: Vec<u64> = listing
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(parse_step_dir))
            .collect();
        steps.sort_unstable();
        let mut out = Vec::new();
        for step in steps {
            if let Some(l) = self.listed(step)? {
                out.push((step, l));
            }
        }
        Ok(out)
    }

    fn listed(&self, step: u64) -> Result<Option<Listed>> {
        let listed = match self.manifest(step) {
            Ok(m) => Listed::Committed(Box::new(m)),
            Err(CheckpointError::NoManifest { .. }) => {
                // An empty directory (a file system's leftover) holds nothing at all.
                let prefix = self.loc.child(&step_dir(step));
                let any = self
                    .rt
                    .block_on(self.loc.store.list(Some(&prefix)).try_next())
                    .map_err(|e| self.io(step, "", e))?;
                if any.is_none() {
                    return Ok(None);
                }
                Listed::Uncommitted
            }
            Err(CheckpointError::Invalid { message, .. }) => Listed::Invalid(message),
            Err(e) => return Err(e),
        };
        Ok(Some(listed))
    }

    /// The committed checkpoints, newest first.
    pub fn committed(&self) -> Result<Vec<Manifest>> {
        let mut out: Vec<Manifest> = self
            .list()?
            .into_iter()
            .filter_map(|(_, l)| match l {
                Listed::Committed(m) => Some(*m),
                _ => None,
            })
            .collect();
        out.reverse();
        Ok(out)
    }

    /// Step `step`'s manifest, checked for format and version.
    pub fn manifest(&self, step: u64) -> Result<Manifest> {
        let got = self.rt.block_on(async {
            self.loc
                .store
                .get(&self.path(step, MANIFEST))
                .await?
                .bytes()
                .await
        });
        let bytes = match got {
            Ok(b) => b,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(CheckpointError::NoManifest {
                    checkpoint: self.display(step, ""),
                })
            }
            Err(e) => return Err(self.io(step, MANIFEST, e)),
        };
        let invalid = |message: String| CheckpointError::Invalid {
            object: self.display(step, MANIFEST),
            message,
        };
        let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
        if m.format != FORMAT {
            return Err(invalid(format!("format {:?}, not {FORMAT:?}", m.format)));
        }
        if m.version != VERSION {
            return Err(invalid(format!(
                "format version {}; this Kiln reads version {VERSION}",
                m.version
            )));
        }
        if m.step != step {
            return Err(invalid(format!(
                "says step {} in {}",
                m.step,
                step_dir(step)
            )));
        }
        Ok(m)
    }

    /// Checks that every object of `m` is there at its recorded size (a truncated or
    /// missing shard is caught before anything is read).
    pub fn check_sizes(&self, m: &Manifest) -> Result<()> {
        for o in &m.objects {
            let meta = self
                .rt
                .block_on(self.loc.store.head(&self.path(m.step, &o.name)))
                .map_err(|e| match e {
                    object_store::Error::NotFound { .. } => CheckpointError::Damaged {
                        object: self.display(m.step, &o.name),
                        message: "it is missing".into(),
                    },
                    e => self.io(m.step, &o.name, e),
                })?;
            if meta.size != o.size {
                return Err(CheckpointError::Damaged {
                    object: self.display(m.step, &o.name),
                    message: format!(
                        "it is {} bytes, the manifest says {} (truncated or overwritten)",
                        meta.size, o.size
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reads `regions` of checkpoint `m`, each into a buffer of its own (row-major over its
    /// flat range). See [`CheckpointStore::read_into`].
    pub fn read(&self, m: &Manifest, regions: &[Region]) -> Result<Vec<Vec<u8>>> {
        let mut out: Vec<Vec<u8>> = regions
            .iter()
            .map(|r| {
                let es = m.tensors.get(&r.tensor).map_or(0, |t| t.dtype.size());
                vec![0u8; (r.numel() * es) as usize]
            })
            .collect();
        let mut dsts: Vec<&mut [u8]> = out.iter_mut().map(Vec::as_mut_slice).collect();
        self.read_into(m, regions, &mut dsts)?;
        Ok(out)
    }

    /// Reads `regions` of checkpoint `m` into `dsts` (one per region, its bytes row-major
    /// over its flat range). Only the byte ranges that hold the regions are read, straight
    /// into `dsts` from a local file, in chunks of at most 64 MiB (a few at once) from a
    /// remote store; a piece read whole is checked against its CRC.
    pub fn read_into(
        &self,
        m: &Manifest,
        regions: &[Region],
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        let mut filled = vec![0u64; regions.len()];
        // Per object: (piece, fetched byte span within the object, region copies).
        let mut plan: Vec<Vec<Fetch>> = vec![Vec::new(); m.objects.len()];
        for (ri, region) in regions.iter().enumerate() {
            let info = m
                .tensors
                .get(&region.tensor)
                .ok_or_else(|| CheckpointError::Uncovered {
                    checkpoint: self.display(m.step, ""),
                    tensor: region.tensor.clone(),
                    message: "the checkpoint has no such tensor".into(),
                })?;
            let es = info.dtype.size();
            for (oi, o) in m.objects.iter().enumerate() {
                for (pi, p) in o.pieces.iter().enumerate() {
                    if p.region.tensor != region.tensor {
                        continue;
                    }
                    let rs =
                        runs(&p.region, region, es).ok_or_else(|| CheckpointError::Uncovered {
                            checkpoint: self.display(m.step, ""),
                            tensor: region.tensor.clone(),
                            message: "tensors of more than two dimensions cannot be resharded"
                                .into(),
                        })?;
                    if rs.is_empty() {
                        continue;
                    }
                    filled[ri] += rs.iter().map(|r| r.len).sum::<u64>();
                    let lo = rs.iter().map(|r| r.src).min().unwrap_or(0);
                    let hi = rs.iter().map(|r| r.src + r.len).max().unwrap_or(0);
                    let span = p.bytes.start + lo..p.bytes.start + hi;
                    let copies = rs.into_iter().map(|r| (ri, r));
                    match plan[oi].iter_mut().find(|(q, _, _)| *q == pi) {
                        Some((_, s, c)) => {
                            *s = s.start.min(span.start)..s.end.max(span.end);
                            c.extend(copies);
                        }
                        None => plan[oi].push((pi, span, copies.collect())),
                    }
                }
            }
        }
        for (ri, region) in regions.iter().enumerate() {
            let es = m.tensors[&region.tensor].dtype.size();
            let want = region.numel() * es;
            if filled[ri] != want || dsts[ri].len() as u64 != want {
                return Err(CheckpointError::Uncovered {
                    checkpoint: self.display(m.step, ""),
                    tensor: region.tensor.clone(),
                    message: format!(
                        "the stored pieces cover {} of the {want} bytes of {:?} at {:?} (elements {:?})",
                        filled[ri], region.shape, region.offsets, region.flat
                    ),
                });
            }
        }
        for (oi, pieces) in plan.iter_mut().enumerate() {
            let o = &m.objects[oi];
            let damaged = |message: String| CheckpointError::Damaged {
                object: self.display(m.step, &o.name),
                message,
            };
            if let Some((_, bad, _)) = pieces.iter().find(|(_, s, _)| s.end > o.size) {
                return Err(damaged(format!(
                    "it holds {} bytes; the manifest puts a piece at {bad:?}",
                    o.size
                )));
            }
            let local = self
                .loc
                .local_dir
                .as_ref()
                .map(|d| d.join(step_dir(m.step)).join(&o.name));
            let file = match &local {
                Some(path) => Some(std::fs::File::open(path).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => damaged("it is missing".into()),
                    _ => self.io(
                        m.step,
                        &o.name,
                        object_store::Error::Generic {
                            store: "LocalFileSystem",
                            source: Box::new(e),
                        },
                    ),
                })?),
                None => None,
            };
            let path = self.path(m.step, &o.name);
            for (pi, span, copies) in pieces.iter_mut() {
                let p = &o.pieces[*pi];
                copies.sort_by_key(|(_, r)| r.src);
                let whole = *span == p.bytes;
                let mut crc = crc32fast::Hasher::new();
                // Chunks of the span, in order: (object byte range).
                let chunks: Vec<Range<u64>> = (span.start..span.end)
                    .step_by(READ_CHUNK)
                    .map(|c| c..(c + READ_CHUNK as u64).min(span.end))
                    .collect();
                if let Some(file) = &file {
                    // Straight into the destinations; the CRC over what was read, in order.
                    for (ri, run) in copies.iter() {
                        let dst = &mut dsts[*ri][run.dst as usize..(run.dst + run.len) as usize];
                        read_exact_at(file, dst, p.bytes.start + run.src).map_err(|e| {
                            damaged(format!(
                                "a read of {} bytes at {} failed: {e}",
                                run.len,
                                p.bytes.start + run.src
                            ))
                        })?;
                        if whole {
                            crc.update(dst);
                        }
                    }
                } else {
                    let store = self.loc.store.clone();
                    let fetches = futures::stream::iter(chunks.clone().into_iter().map(|c| {
                        let (store, path) = (store.clone(), path.clone());
                        async move { store.get_range(&path, c).await }
                    }))
                    .buffered(READS_IN_FLIGHT);
                    let mut fetches = Box::pin(fetches);
                    for chunk in &chunks {
                        let bytes = self
                            .rt
                            .block_on(fetches.next())
                            .unwrap_or_else(|| Ok(Bytes::new()))
                            .map_err(|e| match e {
                                object_store::Error::NotFound { .. } => {
                                    damaged("it is missing".into())
                                }
                                e => self.io(m.step, &o.name, e),
                            })?;
                        if bytes.len() as u64 != chunk.end - chunk.start {
                            return Err(damaged(format!(
                                "a read of bytes {chunk:?} returned {} (truncated)",
                                bytes.len()
                            )));
                        }
                        if whole {
                            crc.update(&bytes);
                        }
                        // The parts of the copies that fall in this chunk.
                        for (ri, run) in copies.iter() {
                            let src = p.bytes.start + run.src..p.bytes.start + run.src + run.len;
                            let (lo, hi) = (src.start.max(chunk.start), src.end.min(chunk.end));
                            if lo >= hi {
                                continue;
                            }
                            let d0 = (run.dst + (lo - src.start)) as usize;
                            dsts[*ri][d0..d0 + (hi - lo) as usize].copy_from_slice(
                                &bytes[(lo - chunk.start) as usize..(hi - chunk.start) as usize],
                            );
                        }
                    }
                }
                // A piece read whole through copies that tile it is checked.
                let tiles =
                    copies.iter().map(|(_, r)| r.len).sum::<u64>() == p.bytes.end - p.bytes.start;
                if whole && (file.is_none() || tiles) {
                    let got = crc.finalize();
                    if got != p.crc32 {
                        return Err(damaged(format!(
                            "its bytes {:?} ({}) have CRC-32 {got:08x}, the manifest says {:08x}",
                            p.bytes, p.region.tensor, p.crc32
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Reads every piece of checkpoint `step` whole and checks its CRC.
    pub fn verify(&self, step: u64) -> Result<Verified> {
        let m = self.manifest(step)?;
        self.check_sizes(&m)?;
        let mut v = Verified::default();
        for o in &m.objects {
            let path = self.path(step, &o.name);
            for p in &o.pieces {
                let bytes = self
                    .rt
                    .block_on(self.loc.store.get_range(&path, p.bytes.clone()))
                    .map_err(|e| self.io(step, &o.name, e))?;
                let crc = crc32fast::hash(&bytes);
                if crc != p.crc32 {
                    return Err(CheckpointError::Damaged {
                        object: self.display(step, &o.name),
                        message: format!(
                            "its bytes {:?} ({}) have CRC-32 {crc:08x}, the manifest says {:08x}",
                            p.bytes, p.region.tensor, p.crc32
                        ),
                    });
                }
                v.pieces += 1;
                v.bytes += bytes.len() as u64;
            }
            v.objects += 1;
        }
        Ok(v)
    }

    /// Deletes checkpoint `step`: the manifest first, so that a deletion cut short leaves
    /// an uncommitted directory, never a damaged checkpoint.
    pub fn delete(&self, step: u64) -> Result<()> {
        let prefix = self.loc.child(&step_dir(step));
        let manifest = self.path(step, MANIFEST);
        let store = self.loc.store.clone();
        self.rt
            .block_on(async {
                match store.delete(&manifest).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(e),
                }
                let objects: Vec<Path> = store
                    .list(Some(&prefix))
                    .map_ok(|o| o.location)
                    .try_collect()
                    .await?;
                for o in objects {
                    match store.delete(&o).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(())
            })
            .map_err(|e| self.io(step, "", e))?;
        // A file system keeps the emptied directory; a store has nothing left to remove.
        if let Some(dir) = &self.loc.local_dir {
            let _ = std::fs::remove_dir(dir.join(step_dir(step)));
        }
        Ok(())
    }

    /// Writes (replaces) the object `name` at the top of the checkpoint directory, beside the
    /// `step-N/` directories: the run's metrics log, for one.
    pub fn put_file(&self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let path = self.loc.child(name);
        let store = self.loc.store.clone();
        self.rt
            .block_on(store.put(&path, bytes.into()))
            .map(|_| ())
            .map_err(|e| CheckpointError::Io {
                object: self.loc.display(name),
                message: e.to_string(),
            })
    }

    /// After committing `newest`: deletes the committed checkpoints retention does not keep
    /// and the uncommitted directories older than `newest` (saves that never finished).
    /// Returns the steps deleted.
    pub fn retain(&self, newest: u64, keep_last: usize, keep_every: u64) -> Result<Vec<u64>> {
        let listed = self.list()?;
        let committed: Vec<u64> = listed
            .iter()
            .filter(|(_, l)| matches!(l, Listed::Committed(_)))
            .map(|(s, _)| *s)
            .collect();
        let mut gone = to_delete(&committed, keep_last, keep_every);
        gone.extend(
            listed
                .iter()
                .filter(|(s, l)| *s < newest && !matches!(l, Listed::Committed(_)))
                .map(|(s, _)| *s),
        );
        gone.sort_unstable();
        for step in &gone {
            self.delete(*step)?;
        }
        Ok(gone)
    }
}

/// `MemAvailable` of `/proc/meminfo`, in bytes, where there is one.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// `pread` until `buf` is full; a short file is an error.
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rank's shard of a `N x 4` f32 matrix `m` (`m[r][c] = r * 4 + c`): rows `mine`,
    /// written by `rank`, with a host budget.
    fn write(
        store: &CheckpointStore,
        step: u64,
        rank: usize,
        mine: Range<u64>,
        budget: Option<u64>,
    ) -> ObjectInfo {
        let region = Region::boxed("m", vec![mine.start, 0], vec![mine.end - mine.start, 4]);
        let first = mine.start * 4;
        let mut copied = 0;
        let info = store
            .write_shard(
                step,
                rank,
                ShardWriter {
                    pieces: vec![(region, Dtype::F32)],
                    fill: &mut |_, range, dst| {
                        for (k, out) in dst.chunks_exact_mut(4).enumerate() {
                            let v = (first + range.start / 4 + k as u64) as f32;
                            out.copy_from_slice(&v.to_le_bytes());
                        }
                    },
                    copied: &mut || copied += 1,
                    host_budget: budget,
                    spare: &mut Vec::new(),
                    rank_state: serde_json::Value::Null,
                },
            )
            .unwrap();
        assert_eq!(copied, 1);
        info
    }

    fn infos(rows: u64) -> BTreeMap<String, TensorInfo> {
        [(
            "m".to_owned(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: vec![rows, 4],
            },
        )]
        .into_iter()
        .collect()
    }

    const MESH: Mesh = Mesh {
        world: 2,
        dp: 2,
        tp: 1,
        zero1: false,
    };

    #[test]
    fn a_checkpoint_exists_once_every_rank_has_confirmed() {
        let store = CheckpointStore::open("memory://checkpoint-tests/commit").unwrap();
        write(&store, 5, 0, 0..4, None);
        let err = store
            .commit(
                5,
                MESH,
                infos(10),
                serde_json::Value::Null,
                Duration::from_millis(100),
            )
            .unwrap_err();
        assert!(
            err.to_string().contains("ranks [1] did not confirm"),
            "{err}"
        );
        assert!(matches!(
            store.list().unwrap()[..],
            [(5, Listed::Uncommitted)]
        ));
        assert!(store.committed().unwrap().is_empty());

        write(&store, 5, 1, 4..10, None);
        let m = store
            .commit(
                5,
                MESH,
                infos(10),
                serde_json::Value::Null,
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(store.committed().unwrap(), vec![m.clone()]);
        let v = store.verify(5).unwrap();
        assert_eq!((v.objects, v.pieces, v.bytes), (2, 2, 160));
        // Rows 3..6 span both ranks' objects.
        let got = store
            .read(&m, &[Region::boxed("m", vec![3, 0], vec![3, 4])])
            .unwrap();
        let values: Vec<f32> = got[0]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(values, (12..24).map(|v| v as f32).collect::<Vec<_>>());

        store.delete(5).unwrap();
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn large_shards_go_up_in_parts_within_the_host_budget() {
        let store = CheckpointStore::open("memory://checkpoint-tests/parts").unwrap();
        // 5M rows x 4 f32 = 80 MB: three parts, one at a time.
        let rows = 5_000_000;
        let info = write(&store, 1, 0, 0..rows, Some(1));
        let single = Mesh { world: 1, ..MESH };
        let m = store
            .commit(
                1,
                single,
                infos(rows),
                serde_json::Value::Null,
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(m.objects[0].size, info.size);
        store.verify(1).unwrap();
        let got = store
            .read(&m, &[Region::boxed("m", vec![rows - 1, 0], vec![1, 4])])
            .unwrap();
        let last = f32::from_le_bytes(got[0][12..16].try_into().unwrap());
        assert_eq!(last, (rows * 4 - 1) as f32);
    }
}
