//! Multi-process training on loopback: several `kiln train --rank R --world-size W --peers ...`
//! processes, compared with one process doing the same work. Data parallelism, tensor
//! parallelism, both, and ZeRO-1 must give the loss curve of a single process (fp32, within
//! 1e-5), read exactly the same samples (the ledger), and a rank that dies must take the
//! others down with an error that names it instead of leaving them hanging.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// GPT-2 shards of four plays (one held out for validation), prepared once per test binary.
fn data() -> &'static Path {
    four_plays()
}

/// A job: the tiny model, 12 steps of a global batch of 8 sequences of 64 tokens.
fn job(dir: &Path, name: &str, micro: i64, parallel: &str) -> PathBuf {
    tiny_job(dir, name, micro, parallel, "", 12)
}

#[test]
fn data_parallel_matches_one_process_with_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let base = run(&job(dir.path(), "dp1", 8, ""), 1);
    assert!(
        base.losses[0] > 10.0 && base.losses[11] < base.losses[0] - 1.0,
        "{:?}",
        base.losses
    );
    let accum = run(&job(dir.path(), "dp1-accum", 4, ""), 1);
    accum.assert_matches(&base, 1e-5, "dp=1, 2 x 4 accumulated vs 8");
    let dp2 = run(&job(dir.path(), "dp2", 4, ""), 2);
    assert_eq!(
        (dp2.start["dp"].as_u64(), dp2.start["tp"].as_u64()),
        (Some(2), Some(1))
    );
    dp2.assert_matches(&base, 1e-5, "dp=2 x micro 4 vs dp=1 x 8");
    // Small buckets: several all-reduces in flight during backward.
    let dp2_buckets = run(&job(dir.path(), "dp2-buckets", 2, "bucket_mb = 0.05"), 2);
    dp2_buckets.assert_matches(&base, 1e-5, "dp=2, 2 x 2 accumulated, 50 KiB buckets");
}

#[test]
fn zero1_is_identical_to_plain_data_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let plain = run(&job(dir.path(), "dp2", 4, "bucket_mb = 0.05"), 2);
    let zero = run(
        &job(dir.path(), "zero1", 4, "bucket_mb = 0.05\nzero1 = true"),
        2,
    );
    assert_eq!(zero.start["zero1"], true);
    zero.assert_matches(&plain, 0.0, "ZeRO-1 vs plain dp=2");
}

/// Fully sharded data parallelism gives plain data parallelism's curve within 1e-5 (fp32,
/// 20 steps): at dp = 2 with one micro-batch (its blocks resharded after forward and gathered
/// again for backward, or kept: bitwise the same), with 2 accumulated micro-batches (each reduced
/// on its own), with recomputed blocks (gathered again for backward: bitwise the curve
/// without), at dp = 2 x tp = 2 on four processes, and hybrid: dp = 4 as 2 replicas of
/// shard groups of 2 (the same global batch). It is not bitwise: the gradient norm sums its
/// squares over other chunks (a segment's, not a bucket's), so clipping differs in the last
/// bits.
#[test]
fn fully_sharded_matches_plain_data_parallelism() {
    let dir = tempfile::tempdir().unwrap();
    let job = |name: &str, micro: i64, parallel: &str| {
        tiny_job(dir.path(), name, micro, parallel, "", 20)
    };
    let plain = run(&job("dp2", 4, ""), 2);
    assert_eq!(plain.losses.len(), 20);
    let fsdp = run(&job("fsdp2", 4, "fsdp = true"), 2);
    assert_eq!(fsdp.start["fsdp"], true);
    assert_eq!(plain.start["fsdp"], false);
    fsdp.assert_matches(&plain, 1e-5, "fully sharded vs plain dp=2");
    // Keeping the gathered blocks from forward to backward computes the same numbers.
    let kept = run(
        &job(
            "fsdp2-kept",
            4,
            "fsdp = true\nreshard_after_forward = false",
        ),
        2,
    );
    kept.assert_matches(
        &fsdp,
        0.0,
        "fully sharded, gathered blocks kept vs resharded",
    );
    let accum = run(&job("fsdp2-accum", 2, "fsdp = true"), 2);
    accum.assert_matches(&plain, 1e-5, "fully sharded dp=2, 2 x 2 accumulated");
    let block = run(
        &with_recompute(job("fsdp2-block", 2, "fsdp = true"), "block"),
        2,
    );
    block.assert_matches(&accum, 0.0, "fully sharded, recompute block vs none");
    let mesh = run(&job("fsdp2tp2", 2, "tp = 2\nfsdp = true"), 4);
    mesh.assert_matches(&plain, 1e-5, "fully sharded dp=2 x tp=2 vs plain dp=2");
    let hybrid = run(&job("hsdp2x2", 2, "fsdp = true\nshard = 2"), 4);
    assert_eq!(
        (hybrid.start["dp"].as_u64(), hybrid.start["shard"].as_u64()),
        (Some(4), Some(2))
    );
    hybrid.assert_matches(&plain, 1e-5, "hybrid: 2 replicas x shard 2 vs plain dp=2");
}

#[test]
fn tensor_parallel_matches_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let base = run(&job(dir.path(), "tp1", 4, ""), 1);
    let tp2 = run(&job(dir.path(), "tp2", 4, "tp = 2"), 2);
    assert_eq!(
        (tp2.start["dp"].as_u64(), tp2.start["tp"].as_u64()),
        (Some(1), Some(2))
    );
    tp2.assert_matches(&base, 1e-5, "tp=2 vs tp=1");
    let mesh = run(&job(dir.path(), "dp2tp2", 2, "tp = 2\nzero1 = true"), 4);
    assert_eq!(
        (mesh.start["dp"].as_u64(), mesh.start["tp"].as_u64()),
        (Some(2), Some(2))
    );
    mesh.assert_matches(&base, 1e-5, "dp=2 x tp=2 (ZeRO-1) vs one process");
    // The gathered weights are the whole model: kiln eval on them gives the final
    // validation loss of the single process.
    let weights = dir.path().join("dp2tp2/model");
    let single = dir.path().join("tp1/model");
    let eval = |m: &Path| -> f64 {
        let out = kiln_ok(&[
            "eval",
            "--model",
            path_str(m),
            "--data",
            path_str(data()),
            "--seq-len",
            "64",
            "--split",
            "validation",
            "--max-sequences",
            "8",
            "--device",
            "cpu",
        ]);
        serde_json::from_str::<serde_json::Value>(out.trim()).unwrap()["loss"]
            .as_f64()
            .unwrap()
    };
    let (gathered, whole) = (eval(&weights), eval(&single));
    assert!((gathered - whole).abs() < 1e-4, "{gathered} vs {whole}");
}

/// [`job`] with `train.activation_checkpointing = ac`.
fn recomputing(dir: &Path, name: &str, micro: i64, parallel: &str, ac: &str) -> PathBuf {
    with_recompute(job(dir, name, micro, parallel), ac)
}

/// The job file at `path` with `train.activation_checkpointing = ac`.
fn with_recompute(path: PathBuf, ac: &str) -> PathBuf {
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace(
        "[train]\n",
        &format!("[train]\nactivation_checkpointing = \"{ac}\"\n"),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Activation checkpointing changes what is kept, not what is computed: dropping MLP halves
/// or whole blocks and recomputing them in the backward pass gives the same curve, bit for
/// bit, on one process with 2 accumulated micro-batches and on tp = 2 (whose recomputed
/// pieces all-reduce again), and the run says which it did.
#[test]
fn activation_checkpointing_gives_the_same_curve_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let base = run(&job(dir.path(), "ac-none", 4, ""), 1);
    assert_eq!(base.start["activation_checkpointing"], "none");
    for ac in ["mlp", "block"] {
        let r = run(&recomputing(dir.path(), &format!("ac-{ac}"), 4, "", ac), 1);
        assert_eq!(r.start["activation_checkpointing"], ac);
        r.assert_matches(
            &base,
            0.0,
            &format!("recompute {ac} vs none, 2 x 4 accumulated"),
        );
    }
    let tp2 = run(&job(dir.path(), "ac-tp2-none", 4, "tp = 2"), 2);
    let tp2_block = run(
        &recomputing(dir.path(), "ac-tp2-block", 4, "tp = 2", "block"),
        2,
    );
    tp2_block.assert_matches(&tp2, 0.0, "tp=2: recompute block vs none");
}

#[test]
fn a_killed_rank_fails_the_others_with_its_name() {
    killed_rank_is_named("kill", "");
    // Fully sharded: the gathers and reduce-scatters on the communication thread fail, and
    // the training thread reports it the same way.
    killed_rank_is_named("kill-fsdp", "fsdp = true");
}

/// Kills rank 1 of 3 data-parallel ranks (`parallel` settings) mid-run: ranks 0 and 2 exit
/// with an error naming it.
fn killed_rank_is_named(name: &str, parallel: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = job(dir.path(), name, 2, parallel);
    // Three data-parallel ranks, long enough to be mid-run when the kill comes.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("steps = 12", "steps = 100000")
        .replace("batch_size = 8", "batch_size = 6")
        .replace("eval_every = 6", "eval_every = 0");
    std::fs::write(&path, text).unwrap();
    let mut children = spawn_ranks(&path, 3);
    // Wait until training runs: rank 0 has logged a step.
    let metrics = dir.path().join(name).join("metrics.jsonl");
    let started = Instant::now();
    while !std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .contains("\"type\":\"step\"")
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no step logged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let victim = children.remove(1);
    let killed_at = Instant::now();
    let mut victim = victim;
    victim.kill().unwrap();
    victim.wait().unwrap();
    for (r, out) in [0, 2].iter().zip(wait_all(children)) {
        let waited = killed_at.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{name}: rank {r} after {waited:?}: {}", stderr.trim());
        assert!(!out.status.success());
        assert!(
            stderr.contains(&format!("error: rank {r} of 3")),
            "{stderr}"
        );
        assert!(
            stderr.contains("lost rank 1") || stderr.contains("rank 1 failed"),
            "rank {r} does not name rank 1: {stderr}"
        );
        assert!(
            waited < Duration::from_secs(100),
            "rank {r} took {waited:?}"
        );
    }
}

#[test]
fn launch_mistakes_are_refused_before_waiting_for_anyone() {
    let dir = tempfile::tempdir().unwrap();
    // `kiln train JOB --rank R --world-size W --peers` with `peers` fresh addresses.
    let train_err = |job: &Path, rank: usize, world: usize, peers: usize| {
        // Held until the run is refused: nobody else can listen on them meanwhile.
        let held = Peers::bind(peers);
        let peers = held.list();
        let (rank, world) = (rank.to_string(), world.to_string());
        kiln_err(&[
            "train",
            path_str(job),
            "--rank",
            &rank,
            "--world-size",
            &world,
            "--peers",
            &peers,
        ])
    };
    // The tiny preset has 4 heads and 2 key/value heads.
    let tp4 = job(dir.path(), "tp4", 8, "tp = 4");
    let err = train_err(&tp4, 0, 4, 4);
    assert!(
        err.contains("parallel.tp = 4 must divide n_heads (4), n_kv_heads (2) and ffn_dim (192)"),
        "{err}"
    );
    let dp3 = job(dir.path(), "dp3", 4, "");
    let err = train_err(&dp3, 1, 3, 3);
    assert!(
        err.contains("train.batch_size 8 is not a multiple of 3 data-parallel ranks x train.micro_batch_size 4"),
        "{err}"
    );
    let tp2 = job(dir.path(), "tp2", 8, "tp = 2");
    let err = train_err(&tp2, 0, 3, 3);
    assert!(
        err.contains("the world size 3 is not a multiple of parallel.tp = 2"),
        "{err}"
    );
    let err = train_err(&tp2, 0, 2, 1);
    assert!(
        err.contains("--peers names 1 addresses but --world-size is 2"),
        "{err}"
    );
    let err = train_err(&tp2, 2, 2, 2);
    assert!(err.contains("--rank 2 is outside --world-size 2"), "{err}");
    // The sparse form `kiln worker` passes (this rank and its ring neighbours only).
    let sparse_err = |rank: &str, peers: &str| {
        kiln_err(&[
            "train",
            path_str(&tp2),
            "--rank",
            rank,
            "--world-size",
            "2",
            "--peers",
            peers,
        ])
    };
    let err = sparse_err("0", "1=127.0.0.1:9");
    assert!(
        err.contains("--peers gives no address for this rank (0)"),
        "{err}"
    );
    let err = sparse_err("0", "0=127.0.0.1:9,5=127.0.0.1:10");
    assert!(err.contains("rank 5 is outside --world-size 2"), "{err}");
    let err = sparse_err("0", "0=127.0.0.1:9,127.0.0.1:10");
    assert!(
        err.contains("--peers mixes `host:port` and `rank=host:port` entries"),
        "{err}"
    );
    // A peer that never comes: the rendezvous gives up and says whom it waited for.
    // Rank 0 gets its listening socket; rank 1's port is held but refuses connections.
    let first = Peers::bind(1);
    let (_held, refusing) = refusing_addr();
    let lonely = format!("{},{refusing}", first.list());
    let out = first
        .hand_to(
            0,
            Command::new(env!("CARGO_BIN_EXE_kiln"))
                .args([
                    "train",
                    path_str(&tp2),
                    "--rank",
                    "0",
                    "--world-size",
                    "2",
                    "--peers",
                    &lonely,
                ])
                .env("KILN_RENDEZVOUS_TIMEOUT_S", "3"),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let second = lonely.split(',').nth(1).unwrap();
    assert!(!out.status.success());
    assert!(
        err.contains(&format!("cannot reach rank 1 at {second} within 3 s")),
        "{err}"
    );
}

#[test]
fn a_hung_rank_times_out_with_its_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = job(dir.path(), "hang", 4, "");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("steps = 12", "steps = 100000")
        .replace("eval_every = 6", "eval_every = 0");
    std::fs::write(&path, text).unwrap();
    let peers = Peers::bind(2);
    let list = peers.list();
    let mut children: Vec<Child> = (0..2)
        .map(|r| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
            cmd.args(["train", path_str(&path), "--rank", &r.to_string()])
                .args(["--world-size", "2", "--peers", &list])
                .env("KILN_COLLECTIVE_TIMEOUT_S", "10")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            peers.hand_to(r, &mut cmd).spawn().unwrap()
        })
        .collect();
    let metrics = dir.path().join("hang/metrics.jsonl");
    let started = Instant::now();
    while !std::fs::read_to_string(&metrics)
        .unwrap_or_default()
        .contains("\"type\":\"step\"")
    {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no step logged"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut hung = children.remove(1);
    let stop = Command::new("kill")
        .args(["-STOP", &hung.id().to_string()])
        .status()
        .unwrap();
    assert!(stop.success());
    let stopped_at = Instant::now();
    let out = children.remove(0).wait_with_output().unwrap();
    let waited = stopped_at.elapsed();
    hung.kill().unwrap();
    hung.wait().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("rank 0 after {waited:?}: {}", stderr.trim());
    assert!(!out.status.success());
    assert!(stderr.contains("waited 10 s for rank 1"), "{stderr}");
    assert!(waited < Duration::from_secs(60), "{waited:?}");
}
