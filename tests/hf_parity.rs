//! Kiln's Llama against Hugging Face transformers' `LlamaForCausalLM`, both directions:
//! transformers builds and saves a seeded model, Kiln loads it and must produce the same
//! logits and loss; Kiln initializes and exports a model, transformers loads it and must
//! produce the same logits as Kiln.

mod common;

use std::path::Path;

use common::*;
use kiln_worker::config::LlamaConfig;
use kiln_worker::hf::{self, SaveOptions};
use kiln_worker::model::{DecayPolicy, Llama};
use serde_json::json;
use tch::{Device, Kind, Tensor};

fn read_reference(path: &Path) -> (Tensor, Tensor, f64) {
    let tensors = Tensor::read_safetensors(path).expect("reference file reads");
    let get = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .unwrap_or_else(|| panic!("{name} missing from {}", path.display()))
    };
    (
        get("input_ids"),
        get("logits"),
        get("loss").double_value(&[0]),
    )
}

/// max |a - b| / max |b|
fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let diff = (a - b).abs().max().double_value(&[]);
    diff / b.abs().max().double_value(&[])
}

fn kiln_loss(model: &Llama, ids: &Tensor) -> f64 {
    let t = ids.size()[1];
    let loss = model.loss(&ids.narrow(1, 0, t - 1), &ids.narrow(1, 1, t - 1));
    loss.double_value(&[])
}

fn check(name: &str, hf_config: serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let config_path = dir.path().join("config.json");
    std::fs::write(&config_path, hf_config.to_string()).unwrap();

    // transformers -> Kiln
    let hf_dir = dir.path().join("hf");
    run_python(
        "hf_llama.py",
        &["make", path_str(&config_path), path_str(&hf_dir)],
    );
    let model = hf::load(&hf_dir, DecayPolicy::default(), Device::Cpu).unwrap();
    let (ids, logits, loss) = read_reference(&hf_dir.join("reference.safetensors"));
    let ours = tch::no_grad(|| model.forward(&ids));
    let rel = relative_error(&ours, &logits);
    eprintln!("{name}: transformers -> kiln logits relative error {rel:e}");
    assert!(
        rel <= 1e-5,
        "{name}: transformers -> kiln logits relative error {rel:e}"
    );
    let our_loss = tch::no_grad(|| kiln_loss(&model, &ids));
    assert!(
        (our_loss - loss).abs() <= 1e-5,
        "{name}: loss {our_loss} vs transformers {loss}"
    );

    // Kiln -> transformers, from Kiln's own seeded initialization.
    let config = LlamaConfig::from_hf_json(&hf_config).unwrap();
    let model = Llama::new(&config, DecayPolicy::default(), Device::Cpu);
    model.init(11);
    for (i, e) in model.params.entries().iter().enumerate() {
        if e.spec.shape.len() == 1 {
            let gain = Tensor::ones(e.spec.shape.as_slice(), (Kind::Float, Device::Cpu))
                + Tensor::randn(e.spec.shape.as_slice(), (Kind::Float, Device::Cpu)) * 0.1;
            model.params.set(i, &gain);
        }
    }
    let export = dir.path().join("export");
    hf::save(&model, &export, &SaveOptions::default()).unwrap();
    let out = dir.path().join("kiln-export-logits.safetensors");
    run_python(
        "hf_llama.py",
        &["logits", path_str(&export), path_str(&out)],
    );
    let (ids, logits, loss) = read_reference(&out);
    let ours = tch::no_grad(|| model.forward(&ids));
    let rel = relative_error(&ours, &logits);
    eprintln!("{name}: kiln -> transformers logits relative error {rel:e}");
    assert!(
        rel <= 1e-5,
        "{name}: kiln -> transformers logits relative error {rel:e}"
    );
    let our_loss = tch::no_grad(|| kiln_loss(&model, &ids));
    assert!(
        (our_loss - loss).abs() <= 1e-5,
        "{name}: exported loss {our_loss} vs transformers {loss}"
    );
}

fn base() -> serde_json::Value {
    json!({
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
    })
}

#[test]
fn gqa_untied_with_llama3_rope_scaling_and_wide_heads() {
    let mut c = base();
    c["num_key_value_heads"] = json!(2);
    c["head_dim"] = json!(32);
    c["tie_word_embeddings"] = json!(false);
    c["rope_theta"] = json!(500000.0);
    c["rope_scaling"] = json!({
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64
    });
    check("gqa-untied-llama3", c);
}

#[test]
fn mha_tied_default_rope() {
    let mut c = base();
    c["num_key_value_heads"] = json!(4);
    c["tie_word_embeddings"] = json!(true);
    c["rope_theta"] = json!(10000.0);
    check("mha-tied", c);
}

#[test]
fn gqa_eight_heads_to_two_tied_three_layers() {
    let mut c = base();
    c["num_hidden_layers"] = json!(3);
    c["num_attention_heads"] = json!(8);
    c["num_key_value_heads"] = json!(2);
    c["tie_word_embeddings"] = json!(true);
    check("gqa-8-2-tied", c);
}

#[test]
fn sharded_bf16_export_loads_back() {
    let config = LlamaConfig::preset("tiny").unwrap();
    let model = Llama::new(&config, DecayPolicy::default(), Device::Cpu);
    model.init(5);
    let dir = tempfile::tempdir().unwrap();
    let options = SaveOptions {
        kind: Kind::BFloat16,
        max_shard_bytes: 2_000_000,
        eos_id: Some(50256),
    };
    hf::save(&model, dir.path(), &options).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut files: Vec<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap())
        .collect();
    files.sort_unstable();
    files.dedup();
    assert!(files.len() > 1, "{files:?}");
    assert!(!dir.path().join("model.safetensors").exists());
    let back = hf::load(dir.path(), DecayPolicy::default(), Device::Cpu).unwrap();
    // bf16 keeps 8 bits of mantissa: every weight within 2^-8 relative.
    let expected = model
        .params
        .flat
        .to_kind(Kind::BFloat16)
        .to_kind(Kind::Float);
    assert!(back.params.flat.equal(&expected));
}

#[test]
fn unrepresentable_configs_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "hidden_act",
            json!("gelu"),
            "hidden_act: \"gelu\" is not supported",
        ),
        (
            "attention_bias",
            json!(true),
            "attention_bias: true is not supported",
        ),
        (
            "rope_scaling",
            json!({"rope_type": "dynamic", "factor": 2.0}),
            "rope_scaling.rope_type: \"dynamic\" is not supported",
        ),
        (
            "model_type",
            json!("mistral"),
            "model_type: \"mistral\" is not supported",
        ),
    ];
    for (field, value, message) in cases {
        let mut c = base();
        c[field] = value;
        std::fs::write(dir.path().join("config.json"), c.to_string()).unwrap();
        let err = kiln_err(&[
            "sample",
            "--model",
            path_str(dir.path()),
            "--tokenizer",
            "gpt2",
        ]);
        assert!(
            err.contains(&format!("config.json: Hugging Face config: {message}")),
            "{field}: {err}"
        );
    }
}
