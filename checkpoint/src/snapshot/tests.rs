use super::*;

fn header(step: u64, data: &[u8]) -> SnapshotHeader {
    SnapshotHeader {
        format: FORMAT.into(),
        version: VERSION,
        rank: 1,
        step,
        mesh: Mesh {
            world: 2,
            dp: 2,
            tp: 1,
            zero1: false,
            fsdp: false,
            shard: 0,
        },
        train_state: serde_json::json!({ "steps": step }),
        tensors: vec![SnapshotTensor {
            name: "params".into(),
            numel: data.len() as u64 / 4,
        }],
        crc32: crc32fast::hash(data),
    }
}

#[test]
fn a_snapshot_reads_back_and_damage_is_named() {
    let data: Vec<u8> = (0..64u8).collect();
    let bytes = [encode_header(header(7, &data), &data), data.clone()].concat();
    let (h, d) = decode(&bytes).unwrap();
    assert_eq!((h.step, d), (7, &data[..]));
    let mut flipped = bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    assert!(decode(&flipped).unwrap_err().starts_with("CRC-32 "));
    let cut = &bytes[..bytes.len() - 4];
    assert_eq!(
        decode(cut).unwrap_err(),
        "60 bytes of tensors, the header lists 64"
    );
    assert!(decode(&bytes[..5]).unwrap_err().contains("too short"));
}
