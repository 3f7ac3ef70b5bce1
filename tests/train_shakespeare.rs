//! Single-process pre-training on real text: the tiny model on GPT-2 shards of the
//! Shakespeare plays, run through the `kiln` binary as a user would.

mod common;

use std::path::Path;

use common::*;

fn job(data: &Path, out: &Path) -> String {
    format!(
        r#"
name = "shakespeare-test"

[model]
preset = "tiny"

[data]
path = "{}"

[train]
seq_len = 64
batch_size = 16
micro_batch_size = 8
steps = 80
seed = 7
device = "cpu"
threads = 2
log_every = 1
eval_every = 40
eval_batches = 8

[optimizer]
lr = 3e-3
warmup_steps = 10

[output]
dir = "{}"
"#,
        data.display(),
        out.display()
    )
}

fn step_losses(metrics: &[serde_json::Value]) -> Vec<f64> {
    metrics
        .iter()
        .filter(|m| m["type"] == "step")
        .map(|m| m["loss"].as_f64().unwrap())
        .collect()
}

#[test]
fn tiny_model_learns_shakespeare_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let texts = shakespeare_dir();
    let pattern = format!("{}/*_gut.txt", texts.display());
    kiln_ok(&["prepare", &pattern, "-o", path_str(&data)]);

    let mut runs = Vec::new();
    for name in ["a", "b"] {
        let out = dir.path().join(name);
        let job_path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&job_path, job(&data, &out)).unwrap();
        kiln_ok(&["train", path_str(&job_path), "--quiet"]);
        runs.push((out.clone(), read_metrics(&out.join("metrics.jsonl"))));
    }
    let (out, metrics) = &runs[0];
    let losses = step_losses(metrics);
    assert_eq!(losses.len(), 80);
    let ln_vocab = (50257f64).ln();
    assert!(
        (losses[0] - ln_vocab).abs() < 0.3,
        "first loss {} should be near ln(vocab) = {ln_vocab}",
        losses[0]
    );
    let val: Vec<f64> = metrics
        .iter()
        .filter(|m| m["type"] == "eval")
        .map(|m| m["val_loss"].as_f64().unwrap())
        .collect();
    assert_eq!(val.len(), 2, "evaluations at steps 40 and 80");
    assert!(
        val[1] < 0.7 * ln_vocab && val[1] < val[0],
        "validation loss {val:?} should fall well below ln(vocab) = {ln_vocab}"
    );

    // Same seed, same job: bit-identical losses.
    assert_eq!(losses, step_losses(&runs[1].1));

    // The weights carry where the data stream continues: 80 steps of 16 samples.
    let model = out.join("model");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("kiln.json")).unwrap()).unwrap();
    let cursor = &meta["data_cursor"];
    assert_eq!(cursor["next_sample"], 80 * 16);
    assert_eq!(
        (cursor["seed"].as_u64(), cursor["seq_len"].as_u64()),
        (Some(7), Some(64))
    );
    assert_eq!(cursor["dataset"].as_str().map(str::len), Some(64));
    // One ledger entry per step, each over that step's 16 samples.
    let ledger = read_metrics(&out.join("ledger.jsonl"));
    assert_eq!(ledger.len(), 80);
    assert_eq!(
        (&ledger[79]["first_sample"], &ledger[79]["samples"]),
        (&(79 * 16).into(), &16.into())
    );
    assert_eq!(ledger, read_metrics(&runs[1].0.join("ledger.jsonl")));

    // The saved weights give the same validation loss through `kiln eval`.
    let eval = kiln_ok(&[
        "eval",
        "--model",
        path_str(&model),
        "--data",
        path_str(&data),
        "--seq-len",
        "64",
        "--batch-size",
        "8",
        "--max-sequences",
        "64",
        "--device",
        "cpu",
    ]);
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(eval["tokens"], 64 * 64);
    let diff = (eval["loss"].as_f64().unwrap() - val[1]).abs();
    assert!(
        diff < 1e-6,
        "kiln eval {eval} vs final validation loss {}",
        val[1]
    );

    // Sampling continues the prompt, reproducibly for a seed.
    let args = [
        "sample",
        "--model",
        path_str(&model),
        "--prompt",
        "KING HENRY:",
        "--tokens",
        "20",
        "--seed",
        "3",
        "--device",
        "cpu",
    ];
    let text = kiln_ok(&args);
    assert!(
        text.starts_with("KING HENRY:") && text.len() > "KING HENRY:".len() + 20,
        "{text}"
    );
    assert_eq!(text, kiln_ok(&args));
}

#[test]
fn gradient_accumulation_matches_one_large_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    prepare_plays(&["hamlet_gut.txt", "macbeth_gut.txt"], &data, 0.5);
    let mut curves = Vec::new();
    for micro in [16, 8, 4] {
        let out = dir.path().join(format!("micro-{micro}"));
        let text = job(&data, &out)
            .replace(
                "micro_batch_size = 8",
                &format!("micro_batch_size = {micro}"),
            )
            .replace("steps = 80", "steps = 8")
            .replace("eval_every = 40", "eval_every = 0");
        let path = dir.path().join(format!("micro-{micro}.toml"));
        std::fs::write(&path, text).unwrap();
        kiln_ok(&["train", path_str(&path), "--quiet"]);
        curves.push(step_losses(&read_metrics(&out.join("metrics.jsonl"))));
    }
    for curve in &curves[1..] {
        assert_eq!(curve.len(), 8);
        for (step, (a, b)) in curves[0].iter().zip(curve).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5,
                "step {step}: {a} (one batch) vs {b} (accumulated)"
            );
        }
    }
}
