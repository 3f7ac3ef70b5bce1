//! Bad input gets a clear error, and nothing already written is lost.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const PLAYS: [&str; 3] = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt"];

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    data: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let data = root.join("data");
    prepare_plays(&PLAYS, &data, 0.34);
    Fixture {
        _dir: dir,
        root,
        data,
    }
}

fn job_text(data: &Path, out: &Path, model_extra: &str, train_extra: &str) -> String {
    format!(
        "[model]\npreset = \"tiny\"\n{model_extra}\n[data]\npath = \"{}\"\n\n[train]\nseq_len = 32\nbatch_size = 4\nsteps = 2\ndevice = \"cpu\"\n{train_extra}\n[output]\ndir = \"{}\"\n",
        data.display(),
        out.display()
    )
}

/// Runs `kiln train` on a job, expects failure, checks nothing was written, returns stderr.
fn train_fails(f: &Fixture, job: &str) -> String {
    let path = f.root.join("job.toml");
    std::fs::write(&path, job).unwrap();
    let err = kiln_err(&["train", path_str(&path)]);
    assert!(
        !f.root.join("out/model").exists(),
        "a failed run must not write weights"
    );
    err
}

fn copy_dataset(f: &Fixture, name: &str) -> PathBuf {
    let to = f.root.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for entry in std::fs::read_dir(&f.data).unwrap() {
        let p = entry.unwrap().path();
        // The shards and the manifest; not `parts/`, what `kiln prepare` kept of its work.
        if p.is_file() {
            std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
        }
    }
    to
}

#[test]
fn job_file_errors_name_line_and_column() {
    let f = fixture();
    let out = f.root.join("out");
    let job = job_text(&f.data, &out, "", "learning_rate = 0.1\n");
    let err = train_fails(&f, &job);
    assert!(
        err.contains("line 12, column 1: unknown field `learning_rate`"),
        "{err}"
    );
    let job = job_text(&f.data, &out, "", "").replace("steps = 2", "steps = \"two\"");
    let err = train_fails(&f, &job);
    assert!(
        err.contains("line 10, column 9: invalid type: string \"two\", expected i64"),
        "{err}"
    );
    let job = job_text(&f.data, &out, "", "").replace("preset = \"tiny\"", "preset = \"tiny-ish\"");
    let err = train_fails(&f, &job);
    assert!(err.contains("unknown model preset \"tiny-ish\""), "{err}");
}

#[test]
fn dataset_vocab_larger_than_the_model_is_refused() {
    let f = fixture();
    let job = job_text(&f.data, &f.root.join("out"), "vocab_size = 1000", "");
    let err = train_fails(&f, &job);
    assert!(
        err.contains("uses token ids up to 50257 (gpt2) but the model's vocab_size is 1000; set model.vocab_size to at least 50257"),
        "{err}"
    );
}

#[test]
fn missing_corrupt_and_out_of_range_shards_are_named() {
    let f = fixture();
    let out = f.root.join("out");

    let missing = copy_dataset(&f, "missing");
    std::fs::remove_file(missing.join("train-00000-00000.parquet")).unwrap();
    let err = train_fails(&f, &job_text(&missing, &out, "", ""));
    assert!(
        err.contains(&format!(
            "shard {} is missing",
            missing.join("train-00000-00000.parquet").display()
        )),
        "{err}"
    );

    let corrupt = copy_dataset(&f, "corrupt");
    let shard = corrupt.join("train-00000-00000.parquet");
    let mut bytes = std::fs::read(&shard).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&shard, &bytes).unwrap();
    let err = train_fails(&f, &job_text(&corrupt, &out, "", ""));
    // The loader reads row group by row group and checks each against the manifest.
    assert!(
        err.contains(&format!(
            "shard {} (row group 0, bytes 4..",
            shard.display()
        )),
        "{err}"
    );
    assert!(err.contains(") is corrupt: its SHA-256 is"), "{err}");
    // `kiln data verify` checks whole files.
    let err = kiln_err(&["data", "verify", path_str(&corrupt)]);
    assert!(
        err.contains(&format!(
            "shard {} is corrupt: its SHA-256 is",
            shard.display()
        )),
        "{err}"
    );

    // A manifest that claims a smaller vocabulary than the tokens use.
    let small = copy_dataset(&f, "small-vocab");
    let manifest = small.join("manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .unwrap()
        .replace("\"vocab_size\": 50257", "\"vocab_size\": 100")
        .replace("\"eos_id\": 50256", "\"eos_id\": 99");
    std::fs::write(&manifest, text).unwrap();
    let err = train_fails(&f, &job_text(&small, &out, "", ""));
    assert!(err.contains("but the tokenizer has 100 ids"), "{err}");
    assert!(
        err.contains("train-00000-00000.parquet holds token"),
        "{err}"
    );

    let err = train_fails(&f, &job_text(&f.root.join("nowhere"), &out, "", ""));
    assert!(
        err.contains("manifest.json is missing; run `kiln prepare` to create one"),
        "{err}"
    );

    // The source dataset is untouched by all of the above and still trains.
    let job = f.root.join("good.toml");
    std::fs::write(&job, job_text(&f.data, &out, "", "")).unwrap();
    kiln_ok(&["train", path_str(&job), "--quiet"]);
    assert!(out.join("model/model.safetensors").is_file());
}

#[test]
fn prepare_refuses_to_overwrite_a_dataset_and_rejects_bad_input() {
    let f = fixture();
    let manifest = std::fs::read(f.data.join("manifest.json")).unwrap();
    let texts = shakespeare_dir();
    let play = texts.join(PLAYS[0]);
    let err = kiln_err(&["prepare", path_str(&play), "-o", path_str(&f.data)]);
    assert!(
        err.contains("already holds a dataset; pass --force to replace it"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(f.data.join("manifest.json")).unwrap(),
        manifest
    );

    let err = kiln_err(&[
        "prepare",
        "/nonexistent/*.txt",
        "-o",
        path_str(&f.root.join("x")),
    ]);
    assert!(
        err.contains(
            "/nonexistent/*.txt: no such file, directory or object, and nothing matches it"
        ),
        "{err}"
    );

    // One mistyped path among good ones is an error, not a smaller dataset.
    let typo = texts.join("hamlet_gutt.txt");
    let err = kiln_err(&[
        "prepare",
        path_str(&play),
        path_str(&typo),
        "-o",
        path_str(&f.root.join("typo")),
    ]);
    assert!(err.contains("hamlet_gutt.txt: no such file"), "{err}");
    assert!(!f.root.join("typo/manifest.json").exists());

    let jsonl = f.root.join("docs.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"fine\"}\n{\"body\": \"no text field\"}\n",
    )
    .unwrap();
    let err = kiln_err(&[
        "prepare",
        path_str(&jsonl),
        "-o",
        path_str(&f.root.join("j")),
    ]);
    assert!(
        err.contains("docs.jsonl: line 2: no field \"text\"; pass --skip-bad-documents"),
        "{err}"
    );

    let err = kiln_err(&[
        "prepare",
        path_str(&play),
        "-o",
        path_str(&f.root.join("one")),
    ]);
    assert!(
        err.contains("the validation split would be empty: 1 documents"),
        "{err}"
    );
    assert!(!f.root.join("one/manifest.json").exists());
}
