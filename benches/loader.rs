//! Loader throughput: one epoch of a dataset's train split through `StreamingLoader`, as
//! training reads it (shuffled blocks, packed sequences). Prints one JSON line.
//!
//!   cargo bench --bench loader -- URL [SEQ_LEN=2048] [BATCH=64]
//!
//! benches/loader.sh runs it side by side with pyarrow decoding the same files.

use std::time::Instant;

use kiln_shard_loader::dataset::SplitName;
use kiln_shard_loader::{LoaderOptions, TokenDataset};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let url = args.first().expect("usage: loader URL [SEQ_LEN] [BATCH]");
    let seq_len: u64 = args.get(1).map_or(2048, |s| s.parse().expect("SEQ_LEN"));
    let batch: usize = args.get(2).map_or(64, |s| s.parse().expect("BATCH"));
    let dataset = TokenDataset::open(url).expect("dataset opens");
    let options = LoaderOptions {
        seq_len,
        seed: 1,
        prefetch_samples: 2 * batch as u64,
        ..LoaderOptions::default()
    };
    let start = Instant::now();
    let mut loader = dataset
        .loader(SplitName::Train, options)
        .expect("loader opens");
    let n = loader.len() as u64;
    let mut first = 0;
    while first < n {
        let count = batch.min((n - first) as usize);
        let b = loader.batch(first, count).expect("batch reads");
        assert_eq!(b.inputs.len(), count * seq_len as usize);
        first += count as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = dataset.manifest().train.tokens;
    println!(
        "{{\"system\": \"kiln\", \"url\": \"{url}\", \"tokens\": {tokens}, \"seconds\": {secs:.3}, \"tokens_per_s\": {:.0}}}",
        tokens as f64 / secs
    );
}
