//! One conformance suite, run against every store backend available here: the local
//! directory, the in-process memory store, a real S3 server (SeaweedFS, started by
//! scripts/test.sh; its endpoint arrives in KILN_TEST_S3_ENDPOINT) and Azure's emulator
//! (Azurite, started by scripts/test.sh with a container `kiln-test`; KILN_TEST_AZURITE). Every backend must give
//! the same shards, the same manifest and the same samples, and read errors must name
//! what failed.

mod common;

use std::sync::Once;

use common::*;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::order::sample_hash;
use kiln_shard_loader::prepare::{prepare, PrepareOptions};
use kiln_shard_loader::{LoaderOptions, TokenDataset};

const PLAYS: [&str; 3] = ["hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt"];

fn s3_endpoint() -> String {
    std::env::var("KILN_TEST_S3_ENDPOINT").unwrap_or_else(|_| {
        panic!(
            "KILN_TEST_S3_ENDPOINT is unset: run scripts/test.sh, which starts SeaweedFS, or \
             `eval \"$(scripts/seaweedfs.sh /tmp/weed.pid)\"` first"
        )
    })
}

/// The stores' settings, set once for this test process before any test touches a store:
/// every test calls this first, so no thread reads the environment while it changes.
fn store_env() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut vars = vec![("AZURE_STORAGE_USE_EMULATOR".to_owned(), "true".to_owned())];
        if let Ok(endpoint) = std::env::var("KILN_TEST_S3_ENDPOINT") {
            for (k, v) in [
                ("AWS_ENDPOINT", endpoint.as_str()),
                ("AWS_ALLOW_HTTP", "true"),
                ("AWS_ACCESS_KEY_ID", "AK"),
                ("AWS_SECRET_ACCESS_KEY", "SK"),
                ("AWS_REGION", "us-east-1"),
            ] {
                vars.push((k.to_owned(), v.to_owned()));
            }
        }
        for (k, v) in vars {
            std::env::set_var(k, v);
        }
    });
}

/// The plays cut into scenes-sized documents (paragraph groups) as JSONL, so shards hold
/// many documents and several row groups.
fn corpus() -> std::path::PathBuf {
    static DONE: Once = Once::new();
    let path = std::env::temp_dir().join(format!("kiln-object-store-{}.jsonl", std::process::id()));
    DONE.call_once(|| {
        let mut out = String::new();
        for play in PLAYS {
            let text = std::fs::read_to_string(shakespeare_dir().join(play)).unwrap();
            let paragraphs: Vec<&str> = text.split("\n\n").collect();
            for chunk in paragraphs.chunks(40) {
                let doc = serde_json::json!({ "text": chunk.join("\n\n") });
                out.push_str(&doc.to_string());
                out.push('\n');
            }
        }
        std::fs::write(&path, out).unwrap();
    });
    path
}

fn prepare_to(url: &str) {
    let options = PrepareOptions {
        inputs: vec![path_str(&corpus()).to_owned()],
        output: url.to_owned(),
        val_fraction: 0.1,
        shard_tokens: 40_000,
        row_group_tokens: 8_192,
        force: true,
        progress: false,
        ..Default::default()
    };
    prepare(&options).unwrap();
}

/// Everything a backend must do, checked against the same dataset on the local disk.
fn conformance(url: &str, reference: &str) {
    prepare_to(url);
    let ds = TokenDataset::open(url).unwrap();
    let reference = TokenDataset::open(reference).unwrap();
    assert_eq!(ds.manifest(), reference.manifest(), "{url}: same manifest");
    assert!(ds.manifest().train.shards.len() > 1, "several shards");
    assert!(
        ds.manifest().train.shards[0].row_groups > 1,
        "several row groups"
    );
    let stats = ds.stats();
    for split in &stats.splits {
        for s in &split.shard_checks {
            assert_eq!(s.status, "ok", "{url}: {}", s.path);
        }
    }
    ds.verify().unwrap();

    // The same samples in the same order, and one epoch covers every sequence once.
    let options = LoaderOptions {
        seq_len: 64,
        seed: 5,
        shuffle_window: 100,
        memory_cap_bytes: 1 << 20, // a few blocks: forces eviction and refetching
        prefetch_samples: 32,
        ..LoaderOptions::default()
    };
    let mut ours = ds.loader(SplitName::Train, options.clone()).unwrap();
    let mut theirs = reference.loader(SplitName::Train, options).unwrap();
    let n = ours.len() as u64;
    assert_eq!(n, theirs.len() as u64);
    let mut first = 0u64;
    let mut hash = 0u64;
    let mut sizes = [7usize, 16, 1, 33].iter().cycle();
    while first < n {
        let count = (*sizes.next().unwrap() as u64).min(n - first) as usize;
        let a = ours.batch(first, count).unwrap();
        let b = theirs.batch(first, count).unwrap();
        assert_eq!(a, b, "{url}: samples {first}..");
        hash = hash.wrapping_add(a.hash);
        first += count as u64;
    }
    let expected = (0..n)
        .map(|j| sample_hash(0, j))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(
        hash, expected,
        "{url}: one epoch = every sequence exactly once"
    );
}

/// A prefix no other test run uses: the name of the test's temporary directory.
fn unique_prefix(dir: &std::path::Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn local_reference(dir: &std::path::Path) -> String {
    let url = path_str(&dir.join("reference")).to_owned();
    prepare_to(&url);
    url
}

#[test]
fn local_directory_and_file_url() {
    store_env();
    let dir = tempfile::tempdir().unwrap();
    let reference = local_reference(dir.path());
    let url = format!("file://{}", dir.path().join("via-url").display());
    conformance(&url, &reference);
}

#[test]
fn in_memory_store() {
    store_env();
    let dir = tempfile::tempdir().unwrap();
    let reference = local_reference(dir.path());
    conformance("memory://conformance/data", &reference);
}

#[test]
fn s3_server() {
    store_env();
    s3_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let reference = local_reference(dir.path());
    let prefix = unique_prefix(dir.path());
    conformance(&format!("s3://kiln-test/{prefix}/data"), &reference);
}

#[test]
fn azure_emulator() {
    store_env();
    assert!(
        std::env::var_os("KILN_TEST_AZURITE").is_some(),
        "KILN_TEST_AZURITE is unset: run scripts/test.sh, which starts Azurite, or \
         `eval \"$(scripts/azurite.sh /tmp/azurite.pid)\"` first"
    );
    let dir = tempfile::tempdir().unwrap();
    let reference = local_reference(dir.path());
    let prefix = unique_prefix(dir.path());
    conformance(&format!("az://kiln-test/{prefix}/data"), &reference);
}

#[test]
fn s3_wrong_credentials_and_unreachable_store_are_named() {
    store_env();
    let endpoint = s3_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let prefix = unique_prefix(dir.path());
    let url = format!("s3://kiln-test/{prefix}/creds");
    let run = |secret: &str, endpoint: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("AWS_ENDPOINT", endpoint)
            .env("AWS_ALLOW_HTTP", "true")
            .env("AWS_ACCESS_KEY_ID", "AK")
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("KILN_STORE_RETRIES", "1")
            .env("KILN_STORE_RETRY_TIMEOUT_S", "2")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let play = shakespeare_dir().join(PLAYS[0]);
    let args = [
        "prepare",
        path_str(&play),
        "-o",
        &url,
        "--val-fraction",
        "0",
    ];
    let (ok, err) = run("SK", &endpoint, &args);
    assert!(ok, "{err}");

    let (ok, err) = run("not-the-key", &endpoint, &["data", "stats", &url]);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot read {url}/manifest.json"))
            && err.contains("lacked the necessary privileges"),
        "{err}"
    );
    let (ok, err) = run("not-the-key", &endpoint, &args);
    assert!(!ok);
    assert!(err.contains("lacked the necessary privileges"), "{err}");

    let (ok, err) = run("SK", "http://127.0.0.1:9", &["data", "stats", &url]);
    assert!(!ok);
    assert!(
        err.contains(&format!("cannot read {url}/manifest.json"))
            && err.contains("after 1 retries"),
        "{err}"
    );
    // The dataset is untouched by the failed writes.
    let (ok, err) = run("SK", &endpoint, &["data", "verify", &url]);
    assert!(ok, "{err}");
}

#[test]
fn truncated_shard_and_wrong_column_type_are_named() {
    store_env();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = path_str(&data).to_owned();
    prepare_to(&url);
    let m = TokenDataset::open(&url).unwrap().manifest().clone();
    let shard = data.join(&m.train.shards[1].path);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 100]).unwrap();
    let err = TokenDataset::open(&url)
        .unwrap()
        .loader(SplitName::Train, LoaderOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        err,
        format!(
            "shard {} is {} bytes but the manifest records {}; it was truncated or replaced",
            shard.display(),
            bytes.len() - 100,
            bytes.len()
        )
    );
    std::fs::write(&shard, &bytes).unwrap();

    // A manifest naming a column that is not a token list.
    let manifest = data.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace(
            "\"token_column\": \"tokens\"",
            "\"token_column\": \"doc_id\"",
        ),
    )
    .unwrap();
    let ds = TokenDataset::open(&url).unwrap();
    let options = LoaderOptions {
        seq_len: 16,
        ..LoaderOptions::default()
    };
    let err = ds
        .loader(SplitName::Train, options)
        .unwrap()
        .batch(0, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(
            "column \"doc_id\" has type Int64, expected a list of int32, int64, uint16 or uint32"
        ),
        "{err}"
    );
}

#[test]
fn a_shard_lost_mid_run_names_the_shard_and_byte_range() {
    store_env();
    let url = "memory://lost/data";
    prepare_to(url);
    let ds = TokenDataset::open(url).unwrap();
    let options = LoaderOptions {
        seq_len: 64,
        shuffle: false,
        prefetch_samples: 0,
        ..LoaderOptions::default()
    };
    let mut loader = ds.loader(SplitName::Train, options).unwrap();
    // The shard was there when the loader opened; it is gone when its bytes are needed.
    let location = kiln_store::open(url).unwrap();
    let shard = &ds.manifest().train.shards[0].path;
    use object_store::ObjectStoreExt;
    block_on(location.store.delete(&location.child(shard))).unwrap();
    let err = loader.batch(0, 1).unwrap_err().to_string();
    assert!(err.starts_with("cannot read bytes "), "{err}");
    assert!(err.contains(&format!("of shard {url}/{shard}: ")), "{err}");
}

/// Runs one future to completion on a throwaway runtime.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}
