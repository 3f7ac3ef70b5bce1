use std::io::Write;
use std::path::Path;

use super::input::{format_of, Compression, Format};
use super::*;
use crate::TokenDataset;

/// `n` JSONL documents per file in `files` files; document text repeats every `period`
/// documents (so identical documents exist across files when `period` is small).
fn corpus(dir: &Path, files: usize, n: usize, period: usize) -> Vec<String> {
    std::fs::create_dir_all(dir).unwrap();
    let mut paths = Vec::new();
    for f in 0..files {
        let path = dir.join(format!("part-{f:02}.jsonl"));
        let mut out = std::fs::File::create(&path).unwrap();
        for d in 0..n {
            let k = (f * n + d) % period;
            let text = format!(
                "Document {k}: the quick brown fox {} jumps.",
                "ab ".repeat(k % 7)
            );
            writeln!(out, "{}", serde_json::json!({ "text": text, "id": k })).unwrap();
        }
        paths.push(path.display().to_string());
    }
    paths
}

fn options(inputs: Vec<String>, output: &Path) -> PrepareOptions {
    PrepareOptions {
        inputs,
        output: output.display().to_string(),
        val_fraction: 0.1,
        shard_tokens: 2_000,
        row_group_tokens: 500,
        unit_bytes: 4_000,
        progress: false,
        threads: Some(2),
        ..Default::default()
    }
}

fn prepare_parts(base: &PrepareOptions, parts: u32) -> DatasetManifest {
    let mut manifest = None;
    for part in 0..parts {
        let s = prepare(&PrepareOptions {
            part,
            parts,
            ..base.clone()
        })
        .unwrap();
        assert_eq!(
            s.manifest.is_some(),
            part == parts - 1,
            "only the last part merges"
        );
        manifest = s.manifest;
    }
    manifest.unwrap()
}

#[test]
fn formats_go_by_extension() {
    assert_eq!(format_of("a/b.parquet"), Some(Format::Parquet));
    assert_eq!(format_of("x.jsonl"), Some(Format::Jsonl(Compression::None)));
    assert_eq!(
        format_of("x.JSONL.GZ"),
        Some(Format::Jsonl(Compression::Gzip))
    );
    assert_eq!(
        format_of("x.json.gz"),
        Some(Format::Jsonl(Compression::Gzip))
    );
    assert_eq!(
        format_of("x.jsonl.zst"),
        Some(Format::Jsonl(Compression::Zstd))
    );
    assert_eq!(format_of("x.txt"), Some(Format::Text));
    assert_eq!(format_of("x.md"), Some(Format::Text));
    assert_eq!(format_of("x.csv"), None);
}

#[test]
fn parts_give_the_dataset_of_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = corpus(&tmp.path().join("in"), 6, 40, 1000);
    let one = prepare_parts(&options(inputs.clone(), &tmp.path().join("one")), 1);
    let prepared = one.prepared.clone().unwrap();
    assert!(prepared.units >= 3, "several units: {prepared:?}");
    assert_eq!(prepared.input_files, 6);
    assert_eq!(one.train.documents + one.validation.documents, 240);
    for parts in [2, 3] {
        let out = tmp.path().join(format!("parts-{parts}"));
        let m = prepare_parts(&options(inputs.clone(), &out), parts);
        assert_eq!(m, one, "{parts} parts");
        assert_eq!(fingerprint(&m), fingerprint(&one));
        TokenDataset::open(&out.display().to_string())
            .unwrap()
            .verify()
            .unwrap();
    }
}

#[test]
fn a_finished_part_is_skipped_and_merge_names_what_is_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = corpus(&tmp.path().join("in"), 4, 40, 1000);
    let out = tmp.path().join("out");
    let base = options(inputs, &out);
    let part0 = PrepareOptions {
        part: 0,
        parts: 2,
        ..base.clone()
    };
    let s = prepare(&part0).unwrap();
    assert!(s.units_done > 0 && s.manifest.is_none());
    let note = s.merge_note.unwrap();
    assert!(note.contains("units are not finished yet"), "{note}");
    let err = merge(&out.display().to_string(), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("units are not finished yet (unit 1: ") && err.contains("part-0"),
        "{err}"
    );
    // Started again, part 0 finds its units done.
    let again = prepare(&part0).unwrap();
    assert_eq!((again.units_done, again.units_resumed), (0, s.units_done));
    // Other arguments are refused rather than mixed in.
    let err = prepare(&PrepareOptions {
        val_fraction: 0.2,
        ..part0.clone()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("started with other inputs or options (val_fraction was 0.1, now 0.2)"),
        "{err}"
    );
    let s = prepare(&PrepareOptions {
        part: 1,
        merge: false,
        ..part0
    })
    .unwrap();
    assert!(s.manifest.is_none());
    let m = merge(&out.display().to_string(), false).unwrap();
    assert_eq!(
        m,
        prepare_parts(&options(base.inputs.clone(), &tmp.path().join("one")), 1)
    );
    let err = merge(&out.display().to_string(), false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds a dataset"), "{err}");
}

#[test]
fn exact_dedup_keeps_the_first_copy_across_units_and_parts() {
    let tmp = tempfile::tempdir().unwrap();
    // 6 files x 40 documents with 100 distinct texts: 140 repeats, within and across units.
    let inputs = corpus(&tmp.path().join("in"), 6, 40, 100);
    let base = PrepareOptions {
        dedup: Dedup::Exact,
        ..options(inputs, &tmp.path().join("one"))
    };
    let one = prepare_parts(&base, 1);
    let p = one.prepared.clone().unwrap();
    assert_eq!(p.dedup.as_deref(), Some("exact"));
    assert_eq!(p.duplicates_removed, 140);
    assert_eq!(one.train.documents + one.validation.documents, 100);
    let out = tmp.path().join("two");
    let two = prepare_parts(
        &PrepareOptions {
            output: out.display().to_string(),
            ..base.clone()
        },
        2,
    );
    assert_eq!(two, one);
    let ds = TokenDataset::open(&out.display().to_string()).unwrap();
    ds.verify().unwrap();
    // No shard the manifest does not name is left behind.
    let named: std::collections::HashSet<String> = two
        .train
        .shards
        .iter()
        .chain(&two.validation.shards)
        .map(|s| s.path.clone())
        .collect();
    for entry in std::fs::read_dir(&out).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        if name.ends_with(".parquet") {
            assert!(named.contains(&name), "{name} left behind");
        }
    }
}

#[test]
fn bad_documents_stop_the_run_or_are_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("in");
    std::fs::create_dir_all(&dir).unwrap();
    let good: String = (0..30)
        .map(|i| format!("{}\n", serde_json::json!({ "text": format!("doc {i}") })))
        .collect();
    std::fs::write(dir.join("a.jsonl"), &good).unwrap();
    std::fs::write(
        dir.join("b.jsonl"),
        format!("{good}{{\"text\": 7}}\n{{\"body\": \"x\"}}\nnot json\n{good}"),
    )
    .unwrap();
    let base = options(vec![dir.display().to_string()], &tmp.path().join("out"));
    let err = prepare(&base).unwrap_err().to_string();
    assert!(
        err.contains("b.jsonl: line 31: field \"text\" is a number, expected a string; pass --skip-bad-documents"),
        "{err}"
    );
    assert!(!tmp.path().join("out/manifest.json").exists());
    let s = prepare(&PrepareOptions {
        skip_bad: true,
        ..base
    })
    .unwrap();
    let m = s.manifest.unwrap();
    assert_eq!(m.prepared.unwrap().skipped_documents, 3);
    assert_eq!(m.train.documents + m.validation.documents, 90);
}

#[test]
fn inputs_in_a_store_by_prefix_and_glob() {
    let rt = runtime().unwrap();
    let loc = kiln_store::open("memory://prep-inputs").unwrap();
    let put = |name: &str, body: String| {
        use object_store::ObjectStoreExt;
        rt.block_on(loc.store.put(&loc.child(name), body.into_bytes().into()))
            .unwrap();
    };
    let doc = |i: usize| {
        format!(
            "{}\n",
            serde_json::json!({ "text": format!("text number {i}") })
        )
    };
    put("data/a/1.jsonl", (0..20).map(doc).collect());
    put("data/b/2.jsonl", (20..40).map(doc).collect());
    put("data/b/deep/3.jsonl", (40..60).map(doc).collect());
    put("data/notes.csv", "x".into());
    let tmp = tempfile::tempdir().unwrap();
    let run = |input: &str, out: &str| {
        let s = prepare(&options(vec![input.into()], &tmp.path().join(out))).unwrap();
        let m = s.manifest.unwrap();
        m.train.documents + m.validation.documents
    };
    assert_eq!(run("memory://prep-inputs/data/*/*.jsonl", "glob"), 40);
    assert_eq!(run("memory://prep-inputs/data", "prefix"), 60);
    assert_eq!(run("memory://prep-inputs/data/b/2.jsonl", "one"), 20);
    let err = prepare(&options(
        vec!["memory://prep-inputs/nothing/*.jsonl".into()],
        &tmp.path().join("none"),
    ))
    .unwrap_err()
    .to_string();
    assert!(err.contains("nothing matches it"), "{err}");
}

#[test]
fn parts_and_dedup_into_a_store_give_the_local_dataset() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = corpus(&tmp.path().join("in"), 6, 40, 100);
    let base = PrepareOptions {
        dedup: Dedup::Exact,
        ..options(inputs, &tmp.path().join("one"))
    };
    let local = prepare_parts(&base, 1);
    let url = "memory://prep-out/data";
    let remote = prepare_parts(
        &PrepareOptions {
            output: url.into(),
            ..base
        },
        2,
    );
    assert_eq!(remote, local);
    TokenDataset::open(url).unwrap().verify().unwrap();
    // The merge lock (a conditional put here) is released, the hashes are gone.
    let rt = runtime().unwrap();
    let loc = kiln_store::open(url).unwrap();
    let io = merge::Io::new(&loc, rt.handle());
    assert!(!io.exists(merge::LOCK).unwrap());
    assert!(!io.exists(&merge::hashes_name(0)).unwrap());
    assert!(io.exists(merge::PLAN).unwrap());
}
