//! Token files written by other tools: pyarrow writes `list`/`large_list` columns of several
//! integer types with several compressions and row groups; `kiln data index` writes a
//! manifest for them, and Kiln reads exactly the tokens pyarrow wrote. Wrong types and
//! out-of-range ids are refused by name.

mod common;

use common::*;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::{LoaderOptions, TokenDataset};

fn index_args<'a>(dir: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "data",
        "index",
        dir,
        "--column",
        "input_ids",
        "--vocab-size",
        "1000",
        "--eos-id",
        "0",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn pyarrow_files_are_indexed_and_read_exactly() {
    let dir = tempfile::tempdir().unwrap();
    run_python("foreign_parquet.py", &[path_str(dir.path())]);
    let good = dir.path().join("good");
    let out = kiln_ok(&index_args(path_str(&good), &["--validation-files", "1"]));
    assert!(out.contains("2 train files"), "{out}");

    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let expected: Vec<u32> = expected["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let ds = TokenDataset::open(path_str(&good)).unwrap();
    let m = ds.manifest();
    assert_eq!(
        m.train.shards[0].row_groups, 3,
        "gzip file with 3 row groups"
    );
    let mut tokens = ds.read_split(SplitName::Train).unwrap();
    tokens.extend(ds.read_split(SplitName::Validation).unwrap());
    assert_eq!(tokens, expected);
    ds.verify().unwrap();

    // The streaming loader reads them too, every sequence once per epoch.
    let options = LoaderOptions {
        seq_len: 32,
        ..LoaderOptions::default()
    };
    let mut loader = ds.loader(SplitName::Train, options).unwrap();
    let n = loader.len();
    let batch = loader.batch(0, n).unwrap();
    let mut starts: Vec<&[i64]> = batch.inputs.chunks(32).collect();
    starts.sort_unstable();
    starts.dedup();
    assert_eq!(starts.len(), n);

    // A second index refuses to replace the manifest without --force.
    let err = kiln_err(&index_args(path_str(&good), &[]));
    assert!(
        err.contains("already holds a dataset; pass --force"),
        "{err}"
    );
}

#[test]
fn wrong_types_and_ids_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    run_python("foreign_parquet.py", &[path_str(dir.path())]);
    let bad = dir.path().join("bad-type");
    let err = kiln_err(&index_args(path_str(&bad), &[]));
    assert!(
        err.contains(&format!(
            "shard {}/x.parquet: column \"input_ids\" has type List(Float32, field: 'element')",
            bad.display()
        )),
        "{err}"
    );
    assert!(
        err.contains("expected a list of int32, int64, uint16 or uint32"),
        "{err}"
    );
    let bad = dir.path().join("bad-range");
    let err = kiln_err(&index_args(path_str(&bad), &[]));
    assert!(
        err.contains("x.parquet holds token 1000 (document 0) but the tokenizer has 1000 ids"),
        "{err}"
    );
    assert!(!bad.join("manifest.json").exists());
    let err = kiln_err(&index_args(
        path_str(dir.path().join("nothing").as_path()),
        &[],
    ));
    assert!(err.contains("no .parquet files under"), "{err}");
}
