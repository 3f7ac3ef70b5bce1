//! Tokenizer throughput: Kiln's GPT-2 tokenizer (`Tokenizer::load("gpt2")`, then `encode`
//! per document) over a corpus of JSON lines `{"text": ...}`, on a rayon pool of THREADS
//! threads, documents in parallel as `kiln prepare` encodes them. Prints one JSON line with
//! the median of ROUNDS rounds.
//!
//!   cargo bench --bench tokenize -- CORPUS [THREADS=1] [ROUNDS=3] [IDS_OUT]
//!   cargo bench --bench tokenize -- --write-ranks FILE
//!
//! IDS_OUT receives every id as a little-endian u32, each document followed by 0xFFFFFFFF,
//! for the peers' check. `--write-ranks` writes the vocabulary's mergeable ranks in
//! tiktoken's format (`base64(token) rank` per line), from which the peers build theirs.
//! benches/tokenize.sh runs it side by side with tiktoken and Hugging Face `tokenizers`.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::time::Instant;

use kiln_shard_loader::Tokenizer;
use rayon::prelude::*;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let tokenizer = Tokenizer::load("gpt2", None).expect("the built-in gpt2 vocabulary loads");
    if args.first().map(String::as_str) == Some("--write-ranks") {
        let path = args.get(1).expect("usage: tokenize --write-ranks FILE");
        write_ranks(&tokenizer, path);
        return;
    }
    let corpus = args
        .first()
        .expect("usage: tokenize CORPUS [THREADS] [ROUNDS] [IDS_OUT]");
    let threads: usize = args.get(1).map_or(1, |s| s.parse().expect("THREADS"));
    let rounds: usize = args.get(2).map_or(3, |s| s.parse().expect("ROUNDS"));
    let docs = read_corpus(corpus);
    let bytes: usize = docs.iter().map(String::len).sum();

    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool");
    let mut seconds = Vec::with_capacity(rounds);
    let mut ids: Vec<Vec<u32>> = Vec::new();
    for _ in 0..rounds.max(1) {
        drop(std::mem::take(&mut ids));
        let start = Instant::now();
        ids = pool.install(|| {
            docs.par_iter()
                .map(|d| tokenizer.encode(d).expect("GPT-2 encodes any text"))
                .collect()
        });
        seconds.push(start.elapsed().as_secs_f64());
    }
    let tokens: usize = ids.iter().map(Vec::len).sum();
    if let Some(path) = args.get(3) {
        write_ids(&ids, path);
    }
    let rounds_s: Vec<String> = seconds.iter().map(|s| format!("{s:.4}")).collect();
    seconds.sort_by(f64::total_cmp);
    let secs = seconds[seconds.len() / 2];
    println!(
        "{{\"system\": \"kiln\", \"threads\": {threads}, \"docs\": {}, \"bytes\": {bytes}, \"tokens\": {tokens}, \"seconds\": {secs:.4}, \"rounds_s\": [{}], \"tokens_per_s\": {:.0}, \"mb_per_s\": {:.3}}}",
        docs.len(),
        rounds_s.join(", "),
        tokens as f64 / secs,
        bytes as f64 / secs / 1e6,
    );
}

fn read_corpus(path: &str) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
    BufReader::new(file)
        .lines()
        .map(|line| {
            let line = line.expect("the corpus reads");
            let value: serde_json::Value = serde_json::from_str(&line).expect("JSON lines");
            value["text"]
                .as_str()
                .expect("a \"text\" string")
                .to_owned()
        })
        .collect()
}

fn write_ids(ids: &[Vec<u32>], path: &str) {
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot create {path}: {e}"));
    let mut out = BufWriter::new(file);
    for doc in ids {
        for id in doc.iter().chain([&u32::MAX]) {
            out.write_all(&id.to_le_bytes()).expect("ids write");
        }
    }
    out.flush().expect("ids write");
}

fn write_ranks(tokenizer: &Tokenizer, path: &str) {
    let file = std::fs::File::create(path).unwrap_or_else(|e| panic!("cannot create {path}: {e}"));
    let mut out = BufWriter::new(file);
    for id in (0..tokenizer.vocab_size()).filter(|&id| id != tokenizer.eos_id()) {
        let bytes = tokenizer
            .token_bytes(id)
            .unwrap_or_else(|| panic!("gpt2 has no token {id}"));
        writeln!(out, "{} {id}", base64(&bytes)).expect("ranks write");
    }
    out.flush().expect("ranks write");
}

/// Standard base64 with padding, as tiktoken's rank files spell tokens.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | ((b as u32) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                s.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}
