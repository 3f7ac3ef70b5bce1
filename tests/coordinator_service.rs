//! The coordinator's service against clients that misbehave, on loopback: wrong or missing
//! tokens, malformed and oversized messages, unknown ids and bad fields are refused with a
//! clear status and lose nothing; with certificates it serves TLS only.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::path::Path;
use std::process::Command;

use cluster::{twin, Cluster};
use common::*;
use kiln_proto::client::{Client, Target};
use kiln_proto::rpc;

/// Wrong or missing tokens, malformed and oversized messages, unknown ids and bad fields
/// are refused with a clear status, and the coordinator keeps its jobs.
#[test]
fn bad_requests_are_refused_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path(), "10");
    let job_path = twin(dir.path(), "kept", 8, 2, "", 12);
    let job = cluster.submit(&job_path, 2);

    refuses_wrong_and_missing_tokens(&cluster);
    refuses_unknown_ids_and_bad_fields(&cluster, &job);
    refuses_a_malformed_job_file_before_sending(&cluster, dir.path());
    // Raw messages the CLI would never send.
    let target = cluster.target();
    cluster.rt.block_on(async {
        let mut client = target.connect().await.unwrap();
        refuses_bad_worker_reports(&mut client).await;
        refuses_bad_ready_addresses(&mut client).await;
        refuses_bad_and_huge_job_files(&mut client).await;
        refuses_undecodable_and_oversized_messages(&target).await;
    });
    still_serves_the_kept_job(&cluster, &job);
}

/// Tokens: through the CLI and the agent.
fn refuses_wrong_and_missing_tokens(cluster: &Cluster) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "status",
            "--coordinator",
            &cluster.url(),
            "--token",
            "wrong",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("the coordinator refused: wrong token"),
        "{err}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["status", "--coordinator", &cluster.url()])
        .env_remove("KILN_TOKEN")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no token: pass --token or set KILN_TOKEN"),
        "{err}"
    );
    // A worker, and a host's workers together, are refused; a host of more workers than one
    // heartbeat call carries is refused before it starts.
    for (nproc, expected) in [
        ("1", "the coordinator refused this worker: wrong token"),
        ("2", "the coordinator refused this worker: wrong token"),
        ("257", "--nproc-per-node must be between 1 and 256, not 257"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args([
                "worker",
                "--coordinator",
                &cluster.url(),
                "--token",
                "wrong",
            ])
            .args(["--nproc-per-node", nproc])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--nproc-per-node {nproc}");
        assert!(err.contains(expected), "{err}");
    }
}

/// Unknown ids and bad fields, through the CLI.
fn refuses_unknown_ids_and_bad_fields(cluster: &Cluster, job: &str) {
    for (args, expected) in [
        (vec!["status", "nope-9"], "no job \"nope-9\""),
        (vec!["scale", "nope-9", "--workers", "2"], "no job \"nope-9\""),
        (vec!["stop", "nope-9"], "no job \"nope-9\""),
        (vec!["logs", "nope-9"], "no job \"nope-9\""),
        (
            vec!["scale", job, "--workers", "3"],
            "3 workers cannot run this job: it needs a multiple of parallel.tp = 1 whose data-parallel size divides train.batch_size = 8",
        ),
        (vec!["scale", job, "--workers", "0"], "the worker count must be at least 1"),
        (vec!["status", "has space"], "job_id: \"has space\" has characters other than printable ASCII"),
    ] {
        let out = cluster.kiln(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(err.contains(expected), "{args:?}: {err}");
        println!("kiln {}: {}", args.join(" "), err.trim());
    }
}

/// A malformed job file is refused before anything is sent.
fn refuses_a_malformed_job_file_before_sending(cluster: &Cluster, dir: &Path) {
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[train]\nsteps = \"many\"\n").unwrap();
    let out = cluster.kiln(&["submit", path_str(&bad)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.toml"), "{err}");
}

/// A heartbeat with a state that is none, and one from a worker that never registered.
async fn refuses_bad_worker_reports(client: &mut Client) {
    let bad_state = client
        .heartbeat(rpc::HeartbeatRequest {
            worker_id: "w-1".into(),
            report: Some(rpc::WorkerReport {
                state: 42,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_state.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        bad_state.message(),
        "report.state: 42 is not a worker state"
    );
    let unknown = client
        .heartbeat(rpc::HeartbeatRequest {
            worker_id: "w-unknown".into(),
            report: Some(rpc::WorkerReport {
                state: rpc::WorkerState::Idle as i32,
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    assert!(unknown.message().contains("unknown worker"), "{unknown:?}");
}

/// Registrations offering a ring address peers could not connect to.
async fn refuses_bad_ready_addresses(client: &mut Client) {
    for (ready_addr, why) in [
        ("nowhere", "no port"),
        (
            "x:notaport",
            "port \"notaport\" is not a number in 1..=65535",
        ),
        (
            "127.0.0.1:99999",
            "port \"99999\" is not a number in 1..=65535",
        ),
        (":::", "port \"\" is not a number in 1..=65535"),
    ] {
        let addr = client
            .register(rpc::RegisterRequest {
                host: "127.0.0.1".into(),
                report: Some(rpc::WorkerReport {
                    state: rpc::WorkerState::Idle as i32,
                    ready_addr: ready_addr.into(),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(addr.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            addr.message(),
            format!("report.ready_addr: {ready_addr:?} is not HOST:PORT ({why})")
        );
    }
    // The address a worker keeps snapshots at, likewise.
    let memory = client
        .register(rpc::RegisterRequest {
            host: "127.0.0.1".into(),
            memory_addr: "0.0.0.0:7000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(memory.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        memory.message(),
        "memory_addr: \"0.0.0.0:7000\" is not HOST:PORT (0.0.0.0 is not an address peers can connect to)"
    );
}

/// A submitted job file that is not TOML, and one over the size limit.
async fn refuses_bad_and_huge_job_files(client: &mut Client) {
    let toml = client
        .submit(rpc::SubmitRequest {
            job_toml: "[train\n".into(),
            workers: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(toml.code(), tonic::Code::InvalidArgument);
    assert!(toml.message().contains("submitted job"), "{toml:?}");
    let huge = client
        .submit(rpc::SubmitRequest {
            job_toml: "#".repeat(1 << 20) + "\n",
            workers: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    println!("oversized job: {huge:?}");
    assert!(huge.message().contains("more than 1048576"), "{huge:?}");
}

/// Bytes that are not the message the method takes, and a message beyond the size limit,
/// sent around the typed client.
async fn refuses_undecodable_and_oversized_messages(target: &Target) {
    let channel = tonic::transport::Endpoint::from_shared(target.endpoint_url().unwrap())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    let path = "/kiln.v1.Coordinator/Submit".parse().unwrap();
    let mut request = tonic::Request::new(Garbage {
        job_toml: 7,
        filler: Vec::new(),
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer test-token-1234".parse().unwrap());
    grpc.ready().await.unwrap();
    let malformed = grpc
        .unary::<_, rpc::SubmitReply, _>(request, path, tonic_prost::ProstCodec::default())
        .await
        .unwrap_err();
    println!("malformed: {malformed:?}");
    assert_eq!(
        malformed.code(),
        tonic::Code::InvalidArgument,
        "{malformed:?}"
    );
    assert!(
        malformed
            .message()
            .contains("malformed message: failed to decode Protobuf message")
            && malformed.message().contains("it is not a SubmitRequest"),
        "{malformed:?}"
    );
    let mut request = tonic::Request::new(Garbage {
        job_toml: 7,
        filler: vec![0; 8 << 20],
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer test-token-1234".parse().unwrap());
    grpc.ready().await.unwrap();
    let path = "/kiln.v1.Coordinator/Submit".parse().unwrap();
    let oversized = grpc
        .unary::<_, rpc::SubmitReply, _>(request, path, tonic_prost::ProstCodec::default())
        .await
        .unwrap_err();
    println!("oversized: {oversized:?}");
    assert_eq!(oversized.code(), tonic::Code::OutOfRange, "{oversized:?}");
}

/// Still serving, and the job kept: pending, then stopped once.
fn still_serves_the_kept_job(cluster: &Cluster, job: &str) {
    let s = cluster.status(job);
    assert_eq!(s.phase, "pending");
    assert!(s.message.contains("0 free, at least 2 needed"), "{s:?}");
    let stopped = cluster.kiln_ok(&["stop", job]);
    assert_eq!(stopped.trim(), format!("job {job} stopped"));
    assert_eq!(cluster.status(job).phase, "stopped");
    let again = cluster.kiln(&["stop", job]);
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains(&format!("job {job} is already stopped")),
        "{err}"
    );
}

/// A message whose field 1 is a number where `SubmitRequest` has text.
#[derive(Clone, PartialEq, prost::Message)]
struct Garbage {
    #[prost(uint64, tag = "1")]
    job_toml: u64,
    #[prost(bytes = "vec", tag = "9")]
    filler: Vec<u8>,
}

/// With a certificate, the coordinator serves TLS: clients that trust its CA connect,
/// plain-text clients do not.
#[test]
fn tls_when_certificates_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.cert.pem()).unwrap();
    let cluster = Cluster::with_args(
        dir.path(),
        "10",
        &[
            "--tls-cert",
            path_str(&cert_path),
            "--tls-key",
            path_str(&key_path),
        ],
    );
    let status = cluster.kiln_ok(&["status"]);
    assert!(status.contains("no jobs"), "{status}");
    let plain = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args([
            "status",
            "--coordinator",
            &format!("http://localhost:{}", cluster.port),
        ])
        .env("KILN_TOKEN", &cluster.token)
        .env_remove("KILN_TLS_CA")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&plain.stderr);
    println!("plain text against TLS: {err}");
    assert!(!plain.status.success(), "{err}");
}

/// Each job `kiln train` refuses before its first step is refused by `kiln submit` with the
/// same message, and no worker is needed to find out: the coordinator runs the trainer's
/// checks (`kiln_proto::preflight`) and reads the datasets' manifests itself.
#[test]
fn jobs_kiln_train_refuses_are_refused_at_submit_with_its_message() {
    let dir = tempfile::tempdir().unwrap();
    // A store nothing answers at, for the coordinator and for `kiln train` alike.
    let (_held, refusing) = refusing_addr();
    let store_env: Vec<(String, String)> = [
        ("AWS_ENDPOINT", format!("http://{refusing}")),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "AK".into()),
        ("AWS_SECRET_ACCESS_KEY", "SK".into()),
        ("KILN_STORE_RETRIES", "1".into()),
        ("KILN_STORE_RETRY_TIMEOUT_S", "2".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let cluster = Cluster::with_env(dir.path(), "10", &[], store_env.clone());
    let data = four_plays().display().to_string();
    let no_data = dir.path().join("no-data").display().to_string();
    let cases: [(&str, &str, String); 6] = [
        (
            "seq-too-long",
            "max_seq_len",
            "preset = \"tiny\"\nmax_seq_len = 32".into(),
        ),
        ("no-data", "no dataset", no_data),
        (
            "small-vocab",
            "vocab_size",
            "preset = \"tiny\"\nvocab_size = 1000".into(),
        ),
        (
            "no-heads",
            "n_heads",
            "preset = \"tiny\"\nn_heads = 0".into(),
        ),
        (
            "kv-heads",
            "n_kv_heads",
            "preset = \"tiny\"\nn_kv_heads = 3".into(),
        ),
        ("unreachable", "s3://", "s3://kiln-test/unreachable".into()),
    ];
    for (name, about, change) in cases {
        let job = twin(dir.path(), name, 8, 2, "", 4);
        let text = std::fs::read_to_string(&job).unwrap();
        let text = if change.starts_with("preset") {
            text.replace("preset = \"tiny\"", &change)
        } else {
            text.replace(
                &format!("path = \"{data}\""),
                &format!("path = \"{change}\""),
            )
        };
        std::fs::write(&job, text).unwrap();

        let train = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["train", path_str(&job)])
            .envs(store_env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        let train_err = String::from_utf8_lossy(&train.stderr);
        assert!(!train.status.success(), "{name}: kiln train ran");
        let message = train_err
            .lines()
            .rev()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or_else(|| panic!("{name}: no error line from kiln train:\n{train_err}"));
        assert!(message.contains(about), "{name}: {message}");

        let submit = cluster.kiln(&["submit", path_str(&job), "--workers", "1"]);
        let submit_err = String::from_utf8_lossy(&submit.stderr);
        assert!(!submit.status.success(), "{name}: the job was accepted");
        assert!(
            without_elapsed(&submit_err).contains(&without_elapsed(message)),
            "{name}: kiln train said\n  {message}\nkiln submit said\n  {submit_err}"
        );
        println!("{name}: kiln submit: {}", submit_err.trim());
    }
    // Nothing was registered.
    let status = cluster.kiln_ok(&["status"]);
    assert!(!status.contains("no-heads"), "{status}");

    // `kiln local` is refused the same way, and stops its workers: none leaves its
    // temporary folder behind.
    let job = twin(dir.path(), "local-refused", 8, 2, "", 4);
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(
        &job,
        text.replace("preset = \"tiny\"", "preset = \"tiny\"\nmax_seq_len = 32"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["local", path_str(&job), "--workers", "2"])
        .env("TMPDIR", tmp.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "kiln local ran:\n{err}");
    assert!(err.contains("exceeds the model's max_seq_len 32"), "{err}");
    let left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "kiln local left {left:?} in its TMPDIR");
}

/// The same job file submitted twice: the second is refused, naming the first, as long as
/// the first is unfinished; with `--queue` it waits for the first to end; once both are
/// stopped the place is free again.
#[test]
fn the_same_job_twice_is_refused_while_the_first_runs() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path(), "10");
    let job = twin(dir.path(), "twice", 8, 2, "", 4);
    // No workers: the first stays pending, which holds its output as much as running does.
    let first = cluster.submit(&job, 1);
    let out = cluster.kiln(&["submit", path_str(&job), "--workers", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second submit was accepted");
    assert!(
        err.contains(&format!("where job {first} writes (pending)"))
            && err.contains(&format!("kiln stop {first}")),
        "{err}"
    );
    println!("second submit: {}", err.trim());
    assert!(err.contains("--queue"), "{err}");
    let out = cluster.kiln(&["submit", path_str(&job), "--workers", "1", "--queue"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let queued = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let s = cluster.wait(&queued, "queued", |s| s.message.contains("queued"));
    assert_eq!(s.phase, "pending");
    assert!(
        s.message.contains(&format!(
            "queued: job {first} (pending) writes where this job writes"
        )),
        "{s:?}"
    );
    println!("queued: {}", s.message);
    cluster.kiln_ok(&["stop", &first]);
    // The queued job now waits for workers only.
    let s = cluster.wait(&queued, "no longer queued", |s| {
        s.message.contains("waiting for workers")
    });
    assert!(!s.message.contains("queued:"), "{s:?}");
    cluster.kiln_ok(&["stop", &queued]);
    let again = cluster.submit(&job, 1);
    assert_ne!(again, first);
}

/// A run started by hand holds its checkpoint directory (`owner.json`): a second
/// `kiln train` of the same job file is refused at its start, and so is a `kiln submit` of
/// it, each naming the holder; the holder's logs keep every step once. Once the holder is
/// killed, its claim is free at once (an exited process of this host).
#[test]
fn a_run_started_by_hand_holds_its_checkpoint_directory() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path(), "10");
    // Long enough to outlast the checks below; killed after them.
    let job = twin(dir.path(), "byhand", 8, 2, "", 100_000);
    let out = dir.path().join("byhand");
    let claim = out.join("checkpoints/owner.json");
    let mut first = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", path_str(&job), "--quiet"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let holder = format!("kiln train, pid {} on ", first.id());
    let t0 = std::time::Instant::now();
    while !claim.exists() {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "no claim written"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let second = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", path_str(&job), "--quiet"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second run started:\n{err}");
    assert!(
        err.contains(&format!("is being written by another run, {holder}"))
            && err.contains("which renewed its claim within"),
        "{err}"
    );
    println!("second kiln train: {}", err.trim());

    let refused = cluster.kiln(&["submit", path_str(&job), "--workers", "1"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "the submit was accepted");
    assert!(
        err.contains(&format!("is being written by another run, {holder}")),
        "{err}"
    );
    println!("kiln submit: {}", err.trim());

    first.kill().unwrap();
    first.wait().unwrap();
    // Every step the holder logged, once: nobody else wrote there.
    let log = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["type"] == "step")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert!(!steps.is_empty(), "{log}");
    assert!(
        steps.windows(2).all(|w| w[1] == w[0] + 1),
        "steps not logged once each, in order: {steps:?}"
    );
    // The holder is gone: its claim no longer stands in the way.
    let job_id = cluster.submit(&job, 1);
    cluster.kiln_ok(&["stop", &job_id]);
}

/// A second coordinator started on the state a running one holds exits at start with a
/// message naming the holder; the first keeps its jobs and keeps serving.
#[test]
fn a_second_coordinator_on_a_held_state_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::new(dir.path(), "10");
    let job = cluster.submit(&twin(dir.path(), "held", 8, 2, "", 4), 1);
    let holder = cluster.coordinator.as_ref().unwrap().id();
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["coordinator", "--listen", "127.0.0.1:0", "--token", "x"])
        .args(["--state", path_str(&dir.path().join("state"))])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the second coordinator started:\n{err}"
    );
    assert!(
        err.contains("is held by a running coordinator")
            && err.contains(&format!("pid {holder} on ")),
        "{err}"
    );
    println!("second coordinator: {}", err.trim());
    assert_eq!(cluster.status(&job).job_id, job);
}

/// `text` without the time a store request took (" in 101.19ms,"), which differs from one
/// attempt to the next.
fn without_elapsed(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(" in ") {
        out.push_str(&rest[..at]);
        let after = &rest[at + 4..];
        let number = after
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(after.len());
        let unit = ["ms,", "µs,", "ns,", "s,"]
            .iter()
            .find(|u| number > 0 && after[number..].starts_with(**u));
        match unit {
            Some(u) => {
                out.push_str(" in _,");
                rest = &after[number + u.len()..];
            }
            None => {
                out.push_str(" in ");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}
