//! Reading regions of a checkpoint at any layout: which byte spans of which objects hold
//! them, then those spans read straight from a local file, or in chunks (a few at once)
//! from a remote store, each piece read whole checked against its CRC.

use std::ops::Range;

use bytes::Bytes;
use futures::stream::StreamExt;
use object_store::ObjectStoreExt;

use super::{CheckpointStore, Result};
use crate::layout::{runs, step_dir, CheckpointManifest, ObjectInfo, Region, Run};
use crate::CheckpointError;

/// Reads from a remote store are made in chunks of this size, this many at once.
const READ_CHUNK: usize = 64 << 20;
const READS_IN_FLIGHT: usize = 4;

/// One piece to fetch: its index in its object, the byte span of the object to get, and
/// the copies (region index, run) out of it.
type Fetch = (usize, Range<u64>, Vec<(usize, Run)>);

impl CheckpointStore {
    /// Reads `regions` of checkpoint `m`, each into a buffer of its own (row-major over its
    /// flat range). See [`CheckpointStore::read_into`].
    pub fn read(&self, m: &CheckpointManifest, regions: &[Region]) -> Result<Vec<Vec<u8>>> {
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
        m: &CheckpointManifest,
        regions: &[Region],
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        let (mut plan, filled) = self.plan_reads(m, regions)?;
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
            self.read_object(m.step, &m.objects[oi], pieces, dsts)?;
        }
        Ok(())
    }

    /// Per object of `m`, the pieces to fetch for `regions` (each piece's byte span the
    /// union of what the regions need of it); and per region, how many of its bytes the
    /// stored pieces cover.
    fn plan_reads(
        &self,
        m: &CheckpointManifest,
        regions: &[Region],
    ) -> Result<(Vec<Vec<Fetch>>, Vec<u64>)> {
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
        Ok((plan, filled))
    }

    /// `name` of checkpoint `step` is damaged, and why.
    fn damaged(&self, step: u64, name: &str, message: String) -> CheckpointError {
        CheckpointError::Damaged {
            object: self.display(step, name),
            message,
        }
    }

    /// Reads `pieces` of object `o` of checkpoint `step` into `dsts`: from the local file
    /// when the store is a directory, else from the store; a piece read whole through copies
    /// that tile it (always, from a store) is checked against its CRC.
    fn read_object(
        &self,
        step: u64,
        o: &ObjectInfo,
        pieces: &mut [Fetch],
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        if let Some((_, bad, _)) = pieces.iter().find(|(_, s, _)| s.end > o.size) {
            return Err(self.damaged(
                step,
                &o.name,
                format!(
                    "it holds {} bytes; the manifest puts a piece at {bad:?}",
                    o.size
                ),
            ));
        }
        let local = self
            .loc
            .local_dir
            .as_ref()
            .map(|d| d.join(step_dir(step)).join(&o.name));
        let file = match &local {
            Some(path) => Some(std::fs::File::open(path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => self.damaged(step, &o.name, "it is missing".into()),
                _ => self.io(
                    step,
                    &o.name,
                    object_store::Error::Generic {
                        store: "LocalFileSystem",
                        source: Box::new(e),
                    },
                ),
            })?),
            None => None,
        };
        for fetch in pieces.iter_mut() {
            let p = &o.pieces[fetch.0];
            fetch.2.sort_by_key(|(_, r)| r.src);
            let whole = fetch.1 == p.bytes;
            let mut crc = crc32fast::Hasher::new();
            let hash = whole.then_some(&mut crc);
            match &file {
                // Straight into the destinations; the CRC over what was read, in order.
                Some(file) => self.read_local(step, o, file, fetch, hash, dsts)?,
                None => self.read_remote(step, o, fetch, hash, dsts)?,
            }
            // A piece read whole through copies that tile it is checked.
            let copies = &fetch.2;
            let tiles =
                copies.iter().map(|(_, r)| r.len).sum::<u64>() == p.bytes.end - p.bytes.start;
            if whole && (file.is_none() || tiles) {
                let got = crc.finalize();
                if got != p.crc32 {
                    return Err(self.damaged(
                        step,
                        &o.name,
                        format!(
                            "its bytes {:?} ({}) have CRC-32 {got:08x}, the manifest says {:08x}",
                            p.bytes, p.region.tensor, p.crc32
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Reads each copy of `fetch` from the local `file` straight into its destination,
    /// hashing what was read into `crc` when given.
    fn read_local(
        &self,
        step: u64,
        o: &ObjectInfo,
        file: &std::fs::File,
        fetch: &Fetch,
        mut crc: Option<&mut crc32fast::Hasher>,
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        let p = &o.pieces[fetch.0];
        for (ri, run) in fetch.2.iter() {
            let dst = &mut dsts[*ri][run.dst as usize..(run.dst + run.len) as usize];
            read_exact_at(file, dst, p.bytes.start + run.src).map_err(|e| {
                self.damaged(
                    step,
                    &o.name,
                    format!(
                        "a read of {} bytes at {} failed: {e}",
                        run.len,
                        p.bytes.start + run.src
                    ),
                )
            })?;
            if let Some(crc) = crc.as_deref_mut() {
                crc.update(dst);
            }
        }
        Ok(())
    }

    /// Reads the span of `fetch` from the store in chunks (a few at once), hashing them
    /// into `crc` when given, and copies the parts of each chunk the copies need.
    fn read_remote(
        &self,
        step: u64,
        o: &ObjectInfo,
        fetch: &Fetch,
        mut crc: Option<&mut crc32fast::Hasher>,
        dsts: &mut [&mut [u8]],
    ) -> Result<()> {
        let (p, span, copies) = (&o.pieces[fetch.0], &fetch.1, &fetch.2);
        let path = self.path(step, &o.name);
        // Chunks of the span, in order: (object byte range).
        let chunks: Vec<Range<u64>> = (span.start..span.end)
            .step_by(READ_CHUNK)
            .map(|c| c..(c + READ_CHUNK as u64).min(span.end))
            .collect();
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
                        self.damaged(step, &o.name, "it is missing".into())
                    }
                    e => self.io(step, &o.name, e),
                })?;
            if bytes.len() as u64 != chunk.end - chunk.start {
                return Err(self.damaged(
                    step,
                    &o.name,
                    format!(
                        "a read of bytes {chunk:?} returned {} (truncated)",
                        bytes.len()
                    ),
                ));
            }
            if let Some(crc) = crc.as_deref_mut() {
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
        Ok(())
    }
}

/// `pread` until `buf` is full; a short file is an error.
fn read_exact_at(file: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, offset)
}
