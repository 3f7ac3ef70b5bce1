//! Snapshots of one rank's state for workers' host memory (`checkpoint.memory_every`): the
//! rank's tensors as it holds them and the training state, in one buffer. A snapshot is only
//! ever read back at the mesh that wrote it (its rank's tensors as they were), so it holds no
//! layout: [`SnapshotHeader`] names the tensors and their lengths. Where snapshots are kept,
//! and how they travel, is [`kiln_store::hold`].

use serde::{Deserialize, Serialize};

use crate::layout::Mesh;

pub const FORMAT: &str = "kiln-memory-snapshot";
pub const VERSION: u32 = 1;

/// What a snapshot is of: read back only where every field but the step and the state
/// matches the reader's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotHeader {
    pub format: String,
    pub version: u32,
    pub rank: usize,
    pub step: u64,
    pub mesh: Mesh,
    /// The trainer's state after `step` steps, as a checkpoint manifest's `train_state`.
    pub train_state: serde_json::Value,
    /// The tensors, in order, as little-endian f32 after the header.
    pub tensors: Vec<SnapshotTensor>,
    /// CRC-32 of the tensors' bytes.
    pub crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotTensor {
    pub name: String,
    pub numel: u64,
}

impl SnapshotHeader {
    pub fn data_len(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel * 4).sum()
    }
}

/// What goes before `data` in a snapshot's bytes: an 8-byte little-endian header length and
/// the header as JSON (its `crc32` set here, from `data`). The data follows as it is, so that
/// it is never copied to make the snapshot.
pub fn encode_header(mut header: SnapshotHeader, data: &[u8]) -> Vec<u8> {
    header.crc32 = crc32fast::hash(data);
    let json = serde_json::to_vec(&header).expect("a snapshot header serializes");
    let mut out = Vec::with_capacity(8 + json.len());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

/// The header and the data of `bytes`, checked whole (lengths and CRC).
pub fn decode(bytes: &[u8]) -> Result<(SnapshotHeader, &[u8]), String> {
    let len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(|| format!("{} bytes: too short for a snapshot", bytes.len()))?;
    let end = usize::try_from(len)
        .ok()
        .and_then(|l| l.checked_add(8))
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| format!("header of {len} bytes runs past the {} bytes", bytes.len()))?;
    let header: SnapshotHeader = serde_json::from_slice(&bytes[8..end])
        .map_err(|e| format!("the header is not a snapshot header: {e}"))?;
    if header.format != FORMAT || header.version != VERSION {
        return Err(format!(
            "format {} version {}; this Kiln reads {FORMAT} version {VERSION}",
            header.format, header.version
        ));
    }
    let data = &bytes[end..];
    if data.len() as u64 != header.data_len() {
        return Err(format!(
            "{} bytes of tensors, the header lists {}",
            data.len(),
            header.data_len()
        ));
    }
    let crc = crc32fast::hash(data);
    if crc != header.crc32 {
        return Err(format!(
            "CRC-32 {crc:08x} of the tensors, the header says {:08x}",
            header.crc32
        ));
    }
    Ok((header, data))
}

#[cfg(test)]
mod tests;
