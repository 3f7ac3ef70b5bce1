//! Mixtures: two datasets with weights 3:1 read as one stream. Each row comes from the
//! source the schedule names, in that source's own order, and a job file with
//! `[[data.sources]]` trains on the mixture.

mod common;

use common::*;
use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::mixture::{MixtureLoader, MixtureSchedule};
use kiln_shard_loader::{LoaderOptions, TokenDataset};

#[test]
fn mixture_rows_follow_the_schedule_and_each_source_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    prepare_plays(&["hamlet_gut.txt", "macbeth_gut.txt"], &a, 0.5);
    prepare_plays(&["othello_gut.txt", "lear_gut.txt"], &b, 0.5);
    let options = LoaderOptions {
        seq_len: 32,
        seed: 4,
        ..LoaderOptions::default()
    };
    let open = |p: &std::path::Path| {
        TokenDataset::open(path_str(p))
            .unwrap()
            .loader(SplitName::Train, options.clone())
            .unwrap()
    };
    let mut mixture = MixtureLoader::new(vec![open(&a), open(&b)], &[3.0, 1.0], 11);
    let mut alone = [open(&a), open(&b)];
    let mut schedule = MixtureSchedule::new(&[3.0, 1.0], 11);
    // Batches straddling a schedule chunk boundary (1024).
    for (first, count) in [(0u64, 100usize), (1000, 50), (5000, 7)] {
        let batch = mixture.batch(first, count).unwrap();
        assert_eq!(batch.inputs.len(), count * 32);
        for (row, i) in (first..first + count as u64).enumerate() {
            let (d, k) = schedule.source_of(i);
            let own = alone[d].batch(k, 1).unwrap();
            assert_eq!(
                &batch.inputs[row * 32..(row + 1) * 32],
                &own.inputs[..],
                "sample {i}"
            );
        }
    }
    assert_eq!(
        schedule.local_count(1, 4096),
        1024,
        "a quarter from the second source"
    );

    // A job file with two sources trains.
    let job = dir.path().join("mix.toml");
    std::fs::write(
        &job,
        format!(
            "[model]\npreset = \"tiny\"\n\n[[data.sources]]\npath = \"{}\"\nweight = 3.0\n\n[[data.sources]]\npath = \"{}\"\nweight = 1.0\n\n[train]\nseq_len = 32\nbatch_size = 8\nsteps = 3\ndevice = \"cpu\"\neval_every = 3\neval_batches = 1\n\n[output]\ndir = \"{}\"\n",
            a.display(),
            b.display(),
            dir.path().join("out").display()
        ),
    )
    .unwrap();
    kiln_ok(&["train", path_str(&job), "--quiet"]);
    let metrics = read_metrics(&dir.path().join("out/metrics.jsonl"));
    assert!(metrics.iter().any(|m| m["type"] == "eval"));
}
