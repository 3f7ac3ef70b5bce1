//! The checkpoint format, as plain data, and the arithmetic on it: which bytes of which
//! stored piece make up a region a rank wants, and which checkpoints retention keeps. No IO.
//!
//! A tensor is stored as *pieces*. A piece is a box of the whole tensor (an offset and a
//! length per dimension: the slice one tensor-parallel rank holds) restricted to a range of
//! its elements in row-major order (the part of the box one data-parallel rank owns). A
//! reader asks for *regions* of the same form, so any layout can be read at any other.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};

/// `format` of every manifest.
pub const FORMAT: &str = "kiln-checkpoint";
/// Bumped whenever a reader of the previous version could misread a new checkpoint.
pub const VERSION: u32 = 1;
/// The manifest's object name inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";

/// Element type of a stored tensor (safetensors' names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Dtype {
    F32,
    F64,
    BF16,
    F16,
    I64,
}

impl Dtype {
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::BF16 | Dtype::F16 => 2,
        }
    }
}

/// A whole tensor of the model or the optimizer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<u64>,
}

/// Part of a tensor: the elements `flat` (row-major, counted within the box) of the box
/// starting at `offsets` with extent `shape`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Region {
    pub tensor: String,
    pub offsets: Vec<u64>,
    pub shape: Vec<u64>,
    pub flat: Range<u64>,
}

impl Region {
    /// The whole box.
    pub fn boxed(tensor: &str, offsets: Vec<u64>, shape: Vec<u64>) -> Self {
        let n = shape.iter().product();
        Region {
            tensor: tensor.to_owned(),
            offsets,
            shape,
            flat: 0..n,
        }
    }

    pub fn numel(&self) -> u64 {
        self.flat.end - self.flat.start
    }

    /// The box as (rows, columns): a 1-D box is one row.
    fn matrix(&self) -> Option<(u64, u64, u64, u64)> {
        match (self.offsets.as_slice(), self.shape.as_slice()) {
            ([c0], [c]) => Some((0, *c0, 1, *c)),
            ([r0, c0], [r, c]) => Some((*r0, *c0, *r, *c)),
            _ => None,
        }
    }
}

/// A stored piece: its region and where its bytes are in its object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    #[serde(flatten)]
    pub region: Region,
    /// Byte range in the object.
    pub bytes: Range<u64>,
    /// CRC-32 (IEEE polynomial, as zlib computes it) of the piece's bytes.
    pub crc32: u32,
}

/// One rank's object and what it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ObjectInfo {
    /// Name within the checkpoint directory.
    pub name: String,
    pub rank: usize,
    /// Size in bytes, checked before any read (a truncated object is caught here).
    pub size: u64,
    pub pieces: Vec<Piece>,
    /// Whatever the rank's own state is (e.g. its random-number state); opaque here.
    #[serde(default)]
    pub rank_state: serde_json::Value,
}

/// The data-parallel x tensor-parallel layout a checkpoint was written at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mesh {
    pub world: usize,
    pub dp: usize,
    pub tp: usize,
    pub zero1: bool,
    /// Fully sharded (absent in checkpoints written before it existed). Any layout loads at
    /// any other: this is what it was written at, for display.
    #[serde(default)]
    pub fsdp: bool,
    /// Hybrid sharding's shard group size; 0 when the run was not hybrid (or predates it).
    #[serde(default)]
    pub shard: usize,
}

/// `manifest.json`: a checkpoint exists exactly when this object does and parses.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointManifest {
    pub format: String,
    pub version: u32,
    pub step: u64,
    pub created_unix_s: u64,
    /// Kiln's version that wrote it.
    pub kiln_version: String,
    pub mesh: Mesh,
    /// The trainer's state (schedule, data cursor, ledger, configuration); opaque here.
    pub train_state: serde_json::Value,
    pub tensors: BTreeMap<String, TensorInfo>,
    pub objects: Vec<ObjectInfo>,
}

/// A contiguous copy: `len` bytes from `src` (within a piece) to `dst` (within a region's
/// buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// The copies that move the elements `piece` and `want` share from the piece's bytes into
/// `want`'s buffer (both row-major over their flat range), in bytes of `elem` each, with
/// contiguous copies merged. `None` when the tensor has more than two dimensions.
pub fn runs(piece: &Region, want: &Region, elem: u64) -> Option<Vec<Run>> {
    let (pr0, pc0, pr, pc) = piece.matrix()?;
    let (tr0, tc0, tr, tc) = want.matrix()?;
    let mut out: Vec<Run> = Vec::new();
    if pc == 0 || tc == 0 || piece.flat.is_empty() || want.flat.is_empty() {
        return Some(out);
    }
    // Rows of the piece that hold any of its flat range.
    let p_rows = pr0 + piece.flat.start / pc..pr0 + piece.flat.end.div_ceil(pc).min(pr);
    let t_rows = tr0 + want.flat.start / tc..tr0 + want.flat.end.div_ceil(tc).min(tr);
    for g in p_rows.start.max(t_rows.start)..p_rows.end.min(t_rows.end) {
        let (pi, ti) = (g - pr0, g - tr0);
        let cols = |flat: &Range<u64>, i: u64, width: u64, c0: u64| {
            let a = flat.start.saturating_sub(i * width).min(width);
            let b = flat.end.saturating_sub(i * width).min(width);
            c0 + a..c0 + b
        };
        let have = cols(&piece.flat, pi, pc, pc0);
        let need = cols(&want.flat, ti, tc, tc0);
        let (x, y) = (have.start.max(need.start), have.end.min(need.end));
        if x >= y {
            continue;
        }
        let run = Run {
            src: (pi * pc + (x - pc0) - piece.flat.start) * elem,
            dst: (ti * tc + (x - tc0) - want.flat.start) * elem,
            len: (y - x) * elem,
        };
        match out.last_mut() {
            Some(last) if last.src + last.len == run.src && last.dst + last.len == run.dst => {
                last.len += run.len;
            }
            _ => out.push(run),
        }
    }
    Some(out)
}

/// Which of the committed `steps` retention deletes: it keeps the newest `keep_last` (at
/// least one) and every step that is a multiple of `keep_every` (0: none).
pub fn to_delete(steps: &[u64], keep_last: usize, keep_every: u64) -> Vec<u64> {
    let mut sorted = steps.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let newest = sorted.len().saturating_sub(keep_last.max(1));
    sorted[..newest]
        .iter()
        .copied()
        .filter(|s| keep_every == 0 || s % keep_every != 0)
        .collect()
}

/// The directory name of step `step`'s checkpoint.
pub fn step_dir(step: u64) -> String {
    format!("step-{step}")
}

/// The step a directory name `step-N` stands for.
pub fn parse_step_dir(name: &str) -> Option<u64> {
    let n = name.strip_prefix("step-")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Rank `rank`'s shard object.
pub fn shard_name(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// Rank `rank`'s confirmation, written after its object is complete.
pub fn report_name(rank: usize) -> String {
    format!("rank-{rank:05}.json")
}

/// The safetensors header for `pieces` (each stored flat, as a 1-D tensor named
/// `{tensor}#{index}`), and the byte range of each piece in the object.
pub fn safetensors_header(pieces: &[(Region, Dtype)]) -> (Vec<u8>, Vec<Range<u64>>) {
    let mut entries = serde_json::Map::new();
    let mut at = 0u64;
    let mut ranges = Vec::with_capacity(pieces.len());
    for (i, (region, dtype)) in pieces.iter().enumerate() {
        let len = region.numel() * dtype.size();
        entries.insert(
            format!("{}#{i}", region.tensor),
            serde_json::json!({
                "dtype": dtype,
                "shape": [region.numel()],
                "data_offsets": [at, at + len],
            }),
        );
        ranges.push(at..at + len);
        at += len;
    }
    entries.insert(
        "__metadata__".into(),
        serde_json::json!({ "format": FORMAT }),
    );
    let mut json = serde_json::to_vec(&entries).unwrap_or_default();
    // Data starts 8-byte aligned, as safetensors recommends.
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut header = (json.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    let base = header.len() as u64;
    let ranges = ranges
        .into_iter()
        .map(|r| r.start + base..r.end + base)
        .collect();
    (header, ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(offsets: &[u64], shape: &[u64], flat: Range<u64>) -> Region {
        Region {
            tensor: "w".into(),
            offsets: offsets.to_vec(),
            shape: shape.to_vec(),
            flat,
        }
    }

    /// Element values of a 6 x 8 matrix: `row * 100 + col`.
    fn value(r: u64, c: u64) -> u64 {
        r * 100 + c
    }

    /// Fills `want` from `pieces` through `runs`, element by element, and checks every
    /// element against the whole matrix.
    fn check(pieces: &[Region], want: &Region) {
        let stored: Vec<Vec<u64>> = pieces
            .iter()
            .map(|p| {
                (p.flat.clone())
                    .map(|f| {
                        let (r, c) = (f / p.shape[1], f % p.shape[1]);
                        value(p.offsets[0] + r, p.offsets[1] + c)
                    })
                    .collect()
            })
            .collect();
        let mut out = vec![u64::MAX; want.numel() as usize];
        let mut filled = 0;
        for (p, data) in pieces.iter().zip(&stored) {
            for run in runs(p, want, 1).unwrap() {
                for k in 0..run.len {
                    let d = (run.dst + k) as usize;
                    assert_eq!(out[d], u64::MAX, "element {d} written twice");
                    out[d] = data[(run.src + k) as usize];
                    filled += 1;
                }
            }
        }
        assert_eq!(filled, want.numel(), "{want:?} not covered");
        for (i, v) in out.iter().enumerate() {
            let f = want.flat.start + i as u64;
            let (r, c) = (f / want.shape[1], f % want.shape[1]);
            assert_eq!(
                *v,
                value(want.offsets[0] + r, want.offsets[1] + c),
                "{want:?} [{i}]"
            );
        }
    }

    #[test]
    fn any_layout_reads_back_at_any_other() {
        // A 6 x 8 matrix stored as row slices (tp 2 on dim 0), column slices (tp 2 on dim 1),
        // and row slices whose elements are split over 3 owners (ZeRO-like flat ranges).
        let rows = [
            region(&[0, 0], &[3, 8], 0..24),
            region(&[3, 0], &[3, 8], 0..24),
        ];
        let cols = [
            region(&[0, 0], &[6, 4], 0..24),
            region(&[0, 4], &[6, 4], 0..24),
        ];
        let flat: Vec<Region> = [0..5, 5..17, 17..24]
            .into_iter()
            .flat_map(|f| {
                [
                    region(&[0, 0], &[3, 8], f.clone()),
                    region(&[3, 0], &[3, 8], f),
                ]
            })
            .collect();
        let wants = [
            region(&[0, 0], &[6, 8], 0..48),
            region(&[0, 0], &[6, 8], 7..45),
            region(&[2, 0], &[2, 8], 0..16),
            region(&[0, 2], &[6, 2], 0..12),
            region(&[0, 4], &[6, 4], 3..21),
            region(&[1, 3], &[4, 5], 0..20),
        ];
        for want in &wants {
            check(&rows, want);
            check(&cols, want);
            check(&flat, want);
        }
    }

    #[test]
    fn contiguous_copies_merge() {
        let whole = region(&[0, 0], &[6, 8], 0..48);
        let half = region(&[3, 0], &[3, 8], 0..24);
        assert_eq!(
            runs(&whole, &half, 4).unwrap(),
            vec![Run {
                src: 24 * 4,
                dst: 0,
                len: 24 * 4
            }]
        );
        let vector = Region::boxed("v", vec![4], vec![4]);
        let stored = Region::boxed("v", vec![0], vec![8]);
        assert_eq!(
            runs(&stored, &vector, 4).unwrap(),
            vec![Run {
                src: 16,
                dst: 0,
                len: 16
            }]
        );
        assert!(runs(&Region::boxed("t", vec![0; 3], vec![2; 3]), &whole, 4).is_none());
    }

    #[test]
    fn retention_keeps_the_newest_and_every_mth() {
        let steps = [10, 20, 30, 40, 50, 60];
        assert_eq!(to_delete(&steps, 2, 0), vec![10, 20, 30, 40]);
        assert_eq!(to_delete(&steps, 2, 20), vec![10, 30]);
        assert_eq!(to_delete(&steps, 0, 0), vec![10, 20, 30, 40, 50]);
        assert!(to_delete(&steps, 10, 0).is_empty());
    }

    #[test]
    fn step_directories_round_trip() {
        assert_eq!(parse_step_dir(&step_dir(1200)), Some(1200));
        for bad in ["step-", "step-1a", "stepx-1", "step--1"] {
            assert_eq!(parse_step_dir(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_header_is_valid_safetensors() {
        let pieces = [
            (Region::boxed("a", vec![0, 0], vec![2, 3]), Dtype::F32),
            (region(&[0, 0], &[4, 4], 3..9), Dtype::F32),
        ];
        let (header, ranges) = safetensors_header(&pieces);
        assert_eq!(header.len() % 8, 0);
        assert_eq!(ranges[0].end - ranges[0].start, 24);
        assert_eq!(ranges[1].start, ranges[0].end);
        let n = u64::from_le_bytes(header[..8].try_into().unwrap()) as usize;
        let json: serde_json::Value = serde_json::from_slice(&header[8..8 + n]).unwrap();
        assert_eq!(json["w#1"]["data_offsets"], serde_json::json!([24, 48]));
    }
}
