use super::*;

const GOOD: &str = r#"
[model]
preset = "tiny"

[data]
path = "data"

[train]
seq_len = 64
batch_size = 8
micro_batch_size = 4
steps = 10

[output]
dir = "out"
"#;

fn parse(text: &str) -> Result<JobConfig, JobError> {
    let job = JobConfig::parse(text, Path::new("job.toml"))?;
    job.validate(Path::new("job.toml"))?;
    Ok(job)
}

#[test]
fn good_file_gets_defaults() {
    let job = parse(GOOD).unwrap();
    assert_eq!(job.accumulation_steps(), 2);
    assert_eq!(job.optimizer, OptimizerSpec::default());
    assert_eq!(job.train.device, "auto");
}

#[test]
fn unknown_key_names_line_and_column() {
    let text = GOOD.replace("steps = 10", "steps = 10\nlearning_rate = 0.1");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("line 13, column 1"), "{err}");
    assert!(err.contains("unknown field `learning_rate`"), "{err}");
}

#[test]
fn wrong_type_names_line_and_column() {
    let text = GOOD.replace("seq_len = 64", "seq_len = \"long\"");
    let err = parse(&text).unwrap_err().to_string();
    assert!(err.contains("line 9, column 11"), "{err}");
    assert!(
        err.contains("invalid type: string \"long\", expected i64"),
        "{err}"
    );
}

#[test]
fn a_peak_must_be_positive() {
    let ok = parse(&GOOD.replace("steps = 10", "steps = 10\npeak_tflops = 989.0")).unwrap();
    assert_eq!(ok.train.peak_tflops, Some(989.0));
    let err = parse(&GOOD.replace("steps = 10", "steps = 10\npeak_tflops = 0.0"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "invalid job file job.toml: train.peak_tflops: must be a positive number of TFLOP/s, got 0"
    );
}

#[test]
fn values_are_checked_against_each_other() {
    let text = GOOD.replace("micro_batch_size = 4", "micro_batch_size = 3");
    let err = parse(&text).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid job file job.toml: train.micro_batch_size: must divide train.batch_size (8), got 3"
    );
    let text = format!("{GOOD}\n[optimizer]\nschedule = \"step\"\n");
    let err = parse(&text).unwrap_err().to_string();
    assert!(
        err.contains("optimizer.schedule: expected cosine, linear or constant"),
        "{err}"
    );
    let text = GOOD.replace(
        "micro_batch_size = 4",
        "micro_batch_size = 4\nactivation_checkpointing = \"layer\"",
    );
    let err = parse(&text).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid job file job.toml: train.activation_checkpointing: expected none, mlp or block, got \"layer\""
    );
    let text = format!("{GOOD}\n[parallel]\nzero1 = true\nfsdp = true\n");
    let err = parse(&text).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid job file job.toml: parallel.fsdp: fsdp shards the optimizer state as zero1 \
         does, and the parameters and gradients too: set one of them, not both"
    );
    let text = format!("{GOOD}\n[parallel]\nshard = 2\n");
    let err = parse(&text).unwrap_err().to_string();
    assert_eq!(
        err,
        "invalid job file job.toml: parallel.shard: shard = 2 groups the fully sharded \
         ranks; it needs fsdp = true"
    );
    assert!(parse(&format!("{GOOD}\n[parallel]\nshard = 2\nfsdp = true\n")).is_ok());
}

#[test]
fn relative_paths_resolve_against_the_job_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("job.toml");
    std::fs::write(&path, GOOD).unwrap();
    let job = JobConfig::load(&path).unwrap();
    assert_eq!(
        job.data.path.as_deref().map(PathBuf::from),
        Some(dir.path().join("data"))
    );
    assert_eq!(job.output.dir, dir.path().join("out"));
}

#[test]
fn snapshots_in_memory_need_store_checkpoints_and_no_fsdp() {
    let ok = parse(&format!(
        "{GOOD}\n[checkpoint]\nevery = 50\nmemory_every = 1\n"
    ))
    .unwrap();
    assert_eq!((ok.checkpoint.every, ok.checkpoint.memory_every), (50, 1));
    let err = |text: String| parse(&text).unwrap_err().to_string();
    assert_eq!(
        err(format!("{GOOD}\n[checkpoint]\nmemory_every = 1\n")),
        "invalid job file job.toml: checkpoint.memory_every: needs checkpoint.every: snapshots \
         in memory are lost with a rank and its peer, and the store's checkpoint is what the \
         job falls back to"
    );
    assert_eq!(
        err(format!(
            "{GOOD}\n[checkpoint]\nevery = 5\nmemory_every = -1\n"
        )),
        "invalid job file job.toml: checkpoint.memory_every: must be 0 (off) or a number of \
         steps, got -1"
    );
    assert_eq!(
        err(format!(
            "{GOOD}\n[parallel]\nfsdp = true\n[checkpoint]\nevery = 5\nmemory_every = 1\n"
        )),
        "invalid job file job.toml: checkpoint.memory_every: is not available with \
         parallel.fsdp yet: use checkpoint.every alone"
    );
}
