//! `kiln prepare` on corpora shaped like the public ones (pyarrow-written Parquet with a
//! text column, gzip and zstd JSONL), read locally and from a real S3 server; bad records
//! named or counted; parts merged, and a run killed half-way and started again, giving the
//! dataset of one uninterrupted run.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_proto::manifest::DatasetManifest;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::{LoaderOptions, TokenDataset, Tokenizer};

fn write_corpus(dir: &Path) -> Vec<String> {
    run_python(
        "text_corpus.py",
        &[path_str(&shakespeare_dir()), path_str(dir)],
    );
    let expected = std::fs::read_to_string(dir.join("expected.json")).unwrap();
    serde_json::from_str(&expected).unwrap()
}

fn manifest(dir: &Path) -> DatasetManifest {
    DatasetManifest::load(dir).unwrap()
}

#[test]
fn parquet_and_compressed_jsonl_are_read_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    let texts = write_corpus(&corpus);
    let out = tmp.path().join("out");
    let glob = format!("{}/web/data/*/*.parquet", corpus.display());
    let stdout = kiln_ok(&[
        "prepare",
        &glob,
        path_str(&corpus.join("jsonl")),
        "-o",
        path_str(&out),
        "--val-fraction",
        "0.05",
        // Every file a unit of its own.
        "--unit-bytes",
        "1",
    ]);
    assert!(stdout.contains("; fingerprint "), "{stdout}");
    let m = manifest(&out);
    let p = m.prepared.clone().unwrap();
    assert_eq!((p.input_files, p.units, p.skipped_documents), (4, 4, 0));
    assert_eq!(
        m.train.documents + m.validation.documents,
        texts.len() as u64
    );

    // Exactly the tokens of every text, in file order; every 20th of each unit held out.
    let tok = Tokenizer::load("gpt2", None).unwrap();
    // The script's files hold paragraphs i, i + 4, ... for i = 2, 3, 0, 1, in that order.
    let p = texts.len();
    let per_file = [(p + 1) / 4, p / 4, p.div_ceil(4), (p + 2) / 4];
    let (mut train, mut validation) = (Vec::new(), Vec::new());
    let mut next = 0;
    for n in per_file {
        for (i, text) in texts[next..next + n].iter().enumerate() {
            let split = if i % 20 == 19 {
                &mut validation
            } else {
                &mut train
            };
            split.extend(tok.encode(text).unwrap());
            split.push(tok.eos_id());
        }
        next += n;
    }
    let ds = TokenDataset::open(path_str(&out)).unwrap();
    ds.verify().unwrap();
    assert_eq!(ds.read_split(SplitName::Train).unwrap(), train);
    assert_eq!(ds.read_split(SplitName::Validation).unwrap(), validation);
}

#[test]
fn bad_records_are_named_or_counted_and_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus);
    let bad = corpus.join("bad");
    let out = tmp.path().join("out");
    let prepare = |input: &Path, extra: &[&str]| {
        let mut args = vec!["prepare", path_str(input), "-o", path_str(&out)];
        args.extend(extra);
        args.extend(["--val-fraction", "0"]);
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let err = kiln_err(&as_strs(&prepare(&bad.join("null.parquet"), &[])));
    assert!(
        err.contains(&format!(
            "{}: row 5: the \"text\" value is null; pass --skip-bad-documents",
            bad.join("null.parquet").display()
        )),
        "{err}"
    );
    let err = kiln_err(&as_strs(&prepare(&bad.join("int.parquet"), &[])));
    assert!(
        err.contains(&format!(
            "cannot read {}: column \"text\" has type Int64, expected a string",
            bad.join("int.parquet").display()
        )),
        "{err}"
    );
    let web = corpus.join("web/data/CC-1/000.parquet");
    let err = kiln_err(&as_strs(&prepare(&web, &["--text-column", "body"])));
    assert!(
        err.contains("no column \"body\" (columns: id, text, url, score); name the text column with --text-column"),
        "{err}"
    );
    assert!(!out.join("manifest.json").exists());

    let stdout = kiln_ok(&as_strs(&prepare(&bad, &["--skip-bad-documents"])));
    assert!(
        stdout.contains("1 unreadable documents and 1 unreadable files skipped"),
        "{stdout}"
    );
    let m = manifest(&out);
    let p = m.prepared.unwrap();
    assert_eq!((p.skipped_documents, p.skipped_files), (1, 1));
    assert_eq!(m.train.documents, 9);
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn inputs_and_output_in_s3_give_the_local_dataset() {
    s3_env();
    let tmp = tempfile::tempdir().unwrap();
    let corpus = tmp.path().join("corpus");
    write_corpus(&corpus);
    let prefix = format!("s3://kiln-test/corpus-{}", std::process::id());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = kiln_store::open(&prefix).unwrap();
    for name in [
        "web/data/CC-1/000.parquet",
        "web/data/CC-2/001.parquet",
        "jsonl/a.jsonl.gz",
        "jsonl/b.jsonl.zst",
    ] {
        let body = std::fs::read(corpus.join(name)).unwrap();
        use object_store::ObjectStoreExt;
        rt.block_on(store.store.put(&store.child(name), body.into()))
            .unwrap();
    }
    let local = tmp.path().join("local");
    let remote = format!("{prefix}/out");
    for (inputs, out) in [
        (
            [
                format!("{}/web/data/*/*.parquet", corpus.display()),
                format!("{}/jsonl", corpus.display()),
            ],
            path_str(&local).to_owned(),
        ),
        (
            [
                format!("{prefix}/web/data/*/*.parquet"),
                format!("{prefix}/jsonl"),
            ],
            remote.clone(),
        ),
    ] {
        kiln_ok(&[
            "prepare",
            &inputs[0],
            &inputs[1],
            "-o",
            &out,
            "--unit-bytes",
            "1",
            "--shard-tokens",
            "20000",
        ]);
    }
    let local = TokenDataset::open(path_str(&local)).unwrap();
    let remote = TokenDataset::open(&remote).unwrap();
    assert_eq!(remote.manifest(), local.manifest());
    remote.verify().unwrap();
}

/// The first `n` training samples of a dataset, in training order.
fn samples(dir: &Path, n: usize) -> Vec<i64> {
    let ds = TokenDataset::open(path_str(dir)).unwrap();
    let options = LoaderOptions {
        seq_len: 64,
        ..LoaderOptions::default()
    };
    let mut loader = ds.loader(SplitName::Train, options).unwrap();
    assert!(loader.len() >= n, "{} samples", loader.len());
    loader.batch(0, n).unwrap().inputs
}

#[test]
fn parts_and_a_killed_run_give_the_dataset_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let plays = format!("{}/*_gut.txt", shakespeare_dir().display());
    let args = |out: &Path, extra: &[&str]| {
        let mut a: Vec<String> = ["prepare", &plays, "-o", path_str(out)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // About 20 units of two plays each (too few documents a unit to hold any out).
        a.extend(
            [
                "--unit-bytes",
                "200000",
                "--threads",
                "1",
                "--val-fraction",
                "0",
            ]
            .map(String::from),
        );
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let one = tmp.path().join("one");
    let mut held_out = args(&tmp.path().join("held-out"), &[]);
    held_out.truncate(held_out.len() - 2);
    let err = kiln_err(&as_strs(&held_out));
    assert!(
        err.contains("the validation split would be empty: 42 documents in 20 units with --val-fraction 0.05"),
        "{err}"
    );
    let printed = kiln_ok(&as_strs(&args(&one, &[])));
    let reference = manifest(&one);
    assert!(reference.prepared.as_ref().unwrap().units >= 10);

    // Two parts, the second merging when it finds both finished.
    let two = tmp.path().join("two");
    let out = kiln(&as_strs(&args(&two, &["--part", "0", "--parts", "2"])));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("manifest not written:") && err.contains("units are not finished yet"),
        "{err}"
    );
    assert!(!two.join("manifest.json").exists());
    let merged = kiln_ok(&as_strs(&args(&two, &["--part", "1", "--parts", "2"])));
    assert_eq!(manifest(&two), reference);
    let fingerprint = |s: &str| s.rsplit("fingerprint ").next().unwrap().trim().to_owned();
    assert_eq!(fingerprint(&merged), fingerprint(&printed));
    let stats = kiln_ok(&["data", "stats", path_str(&two)]);
    assert!(
        stats.contains(&format!("\"fingerprint\": \"{}\"", fingerprint(&printed))),
        "{stats}"
    );
    assert_eq!(samples(&two, 1000), samples(&one, 1000));

    // Killed once a unit is finished, then started again with the same arguments.
    let killed = tmp.path().join("killed");
    let mut child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args(&killed, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !killed.join("parts/unit-00001.json").exists() {
        assert!(Instant::now() < deadline, "no unit finished in 120 s");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !killed.join("manifest.json").exists(),
        "the run finished before it was killed"
    );
    let err = kiln_err(&["data", "merge", path_str(&killed)]);
    assert!(err.contains("units are not finished yet (unit "), "{err}");
    let out = kiln(&as_strs(&args(&killed, &[])));
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let before: usize = err
        .split(" finished before")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(before >= 2, "{err}");
    assert_eq!(manifest(&killed), reference);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(fingerprint(&stdout), fingerprint(&printed));
}
