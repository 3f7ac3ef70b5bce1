//! `benches/tokenize.sh`, the tokenizer benchmark against tiktoken and Hugging Face
//! `tokenizers`, on 300 kB of the plays: the three must give Kiln's ids for every document,
//! on one core and on all, or the benchmark compares different work. No timing is asserted;
//! the measured numbers are in `benches/RESULTS.md`.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn the_tokenize_benchmark_gives_kilns_ids_in_every_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, lines) = run_bench(
        "tokenize.sh",
        &["0.3", "1"],
        &[
            ("BENCH_PROFILE", "dev".as_ref()),
            ("TOKENIZE_DIR", dir.path().as_os_str()),
        ],
    );
    let runs: Vec<&Value> = lines.iter().filter(|l| l.get("system").is_some()).collect();
    let kiln = runs
        .iter()
        .find(|r| r["system"] == "kiln")
        .unwrap_or_else(|| panic!("no Kiln run in:\n{stdout}"));
    assert!(kiln["bytes"].as_u64().unwrap() >= 300_000, "{kiln}");
    for system in ["tiktoken", "hf"] {
        let peer: Vec<&&Value> = runs.iter().filter(|r| r["system"] == system).collect();
        assert!(!peer.is_empty(), "no {system} run in:\n{stdout}");
        for r in peer {
            // One round: every run is checked.
            assert_eq!(r["same_ids_as_kiln"], true, "{r}");
            assert_eq!(r["tokens"], kiln["tokens"], "{r}");
        }
    }
    let summary = lines
        .iter()
        .find_map(|l| l.get("summary"))
        .expect("a summary line");
    assert_eq!(summary["same_ids"], true, "{summary}");
    assert!(
        stdout.contains("| `benches/tokenize.sh 0.3 1` |"),
        "{stdout}"
    );
}
