//! Unit tests of the checkpoint store, on an in-memory store.

use std::ops::Range;

use super::*;
use crate::layout::{Dtype, Region};

/// A rank's object holding a `N x 4` f32 matrix `m` (`m[r][c] = r * 4 + c`): rows `mine`,
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
        .write_rank_object(
            step,
            rank,
            RankObjectWriter {
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
    fsdp: false,
    shard: 0,
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
            Strays::Keep,
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
            Strays::Keep,
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
            Strays::Keep,
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

/// A step saved again after a rank died mid-save (and with fewer ranks): the new commit
/// holds its own objects only, not the old rank's object, confirmation or cut-short upload.
#[test]
fn a_commit_removes_what_an_earlier_attempt_left_in_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::open(dir.path().to_str().unwrap()).unwrap();
    // The earlier attempt: 3 ranks; rank 2 confirmed, rank 1 was killed mid-upload.
    write(&store, 7, 2, 6..10, None);
    let folder = dir.path().join("step-7");
    let staged = folder.join("rank-00001.bin#1");
    std::fs::write(&staged, b"half an upload").unwrap();
    let before: BTreeSet<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(before.len(), 3, "{before:?}");
    // The next generation, 2 ranks, saves step 7 again and commits it.
    let a = write(&store, 7, 0, 0..4, None);
    let b = write(&store, 7, 1, 4..10, None);
    let m = store
        .commit(
            7,
            MESH,
            infos(10),
            serde_json::Value::Null,
            Duration::from_secs(5),
            Strays::Remove,
        )
        .unwrap();
    let after: BTreeSet<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let expected: BTreeSet<String> = [
        a.name,
        b.name,
        report_name(0),
        report_name(1),
        MANIFEST.to_owned(),
    ]
    .into();
    assert_eq!(after, expected);
    assert_eq!(store.verify(7).unwrap().objects, 2);
    assert_eq!(m.objects.len(), 2);
}
