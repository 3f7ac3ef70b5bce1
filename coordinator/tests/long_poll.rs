//! Held heartbeats (a long poll) over gRPC on loopback: a worker waiting on a held heartbeat
//! is answered when something changes for it, not when the hold runs out. The hold here is a
//! minute, so a wake that did not come would show as the stale `Wait` (after a minute),
//! not as a slow pass.

use std::time::Duration;

use kiln_coordinator::machine::Policy;
use kiln_coordinator::preflight::DataCheck;
use kiln_coordinator::service::{self, Config};
use kiln_proto::client::{Client, Target};
use kiln_proto::rpc;
use rpc::heartbeat_reply::Command;

const TOKEN: &str = "long-poll-token";
const HOLD: Duration = Duration::from_secs(60);

fn job_toml() -> String {
    r#"name = "held"

[model]
preset = "tiny"

[data]
path = "/nonexistent/held/data"

[train]
seq_len = 128
batch_size = 2
micro_batch_size = 1
steps = 1000

[checkpoint]
every = 10

[output]
dir = "/nonexistent/held/out"
"#
    .into()
}

fn idle() -> rpc::WorkerReport {
    rpc::WorkerReport {
        state: rpc::WorkerState::Idle as i32,
        ready_addr: "127.0.0.1:10001".into(),
        ..Default::default()
    }
}

fn running(a: &rpc::Assignment, written: u64) -> rpc::WorkerReport {
    rpc::WorkerReport {
        state: rpc::WorkerState::Running as i32,
        job_id: a.job_id.clone(),
        generation: a.generation,
        rank: a.rank,
        checkpoint_written: written,
        ..Default::default()
    }
}

/// Sends `report` held up to [`HOLD`] in the background.
fn held(
    client: &Client,
    worker: &str,
    report: rpc::WorkerReport,
    commit_told: u64,
) -> tokio::task::JoinHandle<rpc::HeartbeatReply> {
    let mut client = client.clone();
    let request = rpc::HeartbeatRequest {
        worker_id: worker.into(),
        report: Some(report),
        hold_ms: HOLD.as_millis() as u32,
        commit_told,
    };
    tokio::spawn(async move { client.heartbeat(request).await.unwrap().into_inner() })
}

/// A coordinator whose heartbeats are held up to [`HOLD`], its state in `state`.
fn start(rt: &tokio::runtime::Runtime, state: &std::path::Path) -> (service::Running, Target) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        token: TOKEN.into(),
        state_url: state.to_string_lossy().into_owned(),
        policy: Policy {
            heartbeat_timeout_s: 600.0,
            ..Policy::default()
        },
        // Holds last up to the interval.
        heartbeat_interval: HOLD,
        tls: None,
        metrics_listen: None,
        data_check: DataCheck::Skip,
    };
    let running = rt.block_on(service::start(config)).unwrap();
    let target = Target {
        url: format!("http://{}", running.addr),
        token: TOKEN.into(),
        tls_ca: None,
    };
    (running, target)
}

async fn register(client: &mut Client) -> String {
    client
        .register(rpc::RegisterRequest {
            host: "127.0.0.1".into(),
            previous_id: String::new(),
            report: Some(idle()),
            kiln_version: "test".into(),
            memory_addr: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .worker_id
}

async fn submit(client: &mut Client, workers: u32) -> String {
    client
        .submit(rpc::SubmitRequest {
            job_toml: job_toml(),
            workers,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id
}

#[test]
fn a_held_heartbeat_is_answered_when_its_worker_has_something_to_do() {
    let state = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (running_coordinator, target) = start(&rt, state.path());
    rt.block_on(async {
        let mut client = target.connect().await.unwrap();
        let worker = register(&mut client).await;

        // Idle, nothing to run: held. A job is submitted: answered with its rank.
        let waiting = held(&client, &worker, idle(), 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "an idle worker's heartbeat is held");
        let job = submit(&mut client, 1).await;
        let reply = waiting.await.unwrap();
        assert!(reply.holds);
        let Some(Command::Run(a)) = reply.command else {
            panic!("expected a Run, got {reply:?}");
        };
        assert_eq!(
            (a.job_id.as_str(), a.generation, a.rank),
            (job.as_str(), 1, 0)
        );

        // Running; it writes step 10: the reply tells it to commit, at once.
        let reply = held(&client, &worker, running(&a, 10), 0).await.unwrap();
        assert_eq!(reply.commit_step, 10);
        // Told already: held again, until the job is stopped, which aborts it.
        let waiting = held(&client, &worker, running(&a, 10), 10);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "nothing new for a worker told to commit"
        );
        client
            .stop(rpc::StopRequest {
                job_id: job.clone(),
            })
            .await
            .unwrap();
        let reply = waiting.await.unwrap();
        match reply.command {
            Some(Command::Abort(a)) => assert!(a.reason.contains("stopped"), "{}", a.reason),
            other => panic!("expected an Abort, got {other:?}"),
        }
    });
    running_coordinator.shutdown();
}

/// The heartbeats of `workers` (reports in the same order) in one `HeartbeatHost` call, held
/// up to [`HOLD`], in the background.
fn host_call(
    client: &Client,
    workers: &[(&str, rpc::WorkerReport)],
) -> tokio::task::JoinHandle<Result<rpc::HeartbeatHostReply, tonic::Status>> {
    let mut client = client.clone();
    let request = rpc::HeartbeatHostRequest {
        workers: workers
            .iter()
            .map(|(id, report)| rpc::HeartbeatRequest {
                worker_id: (*id).into(),
                report: Some(report.clone()),
                hold_ms: HOLD.as_millis() as u32,
                commit_told: 0,
            })
            .collect(),
    };
    tokio::spawn(async move { Ok(client.heartbeat_host(request).await?.into_inner()) })
}

/// One call carries a host's heartbeats: held while none of its workers has anything new,
/// answered for all of them by the decision that concerns them; an unknown worker's answer
/// says so without failing the others'; a malformed call is refused whole.
#[test]
fn one_call_carries_the_heartbeats_of_a_hosts_workers() {
    let state = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (running_coordinator, target) = start(&rt, state.path());
    rt.block_on(async {
        let mut client = target.connect().await.unwrap();
        let (a, b) = (register(&mut client).await, register(&mut client).await);
        let waiting = host_call(&client, &[(&a, idle()), (&b, idle())]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "two idle workers' heartbeats are held"
        );
        let job = submit(&mut client, 2).await;
        let answers = waiting.await.unwrap().unwrap().workers;
        let runs: Vec<rpc::Assignment> = answers
            .iter()
            .map(
                |answer| match answer.reply.as_ref().and_then(|r| r.command.clone()) {
                    Some(Command::Run(run)) => run,
                    other => panic!("expected a Run for each worker, got {other:?}"),
                },
            )
            .collect();
        assert_eq!(runs[0].job_id, job);
        let mut ranks: Vec<u32> = runs.iter().map(|r| r.rank).collect();
        ranks.sort();
        assert_eq!(ranks, [0, 1]);

        // A worker the coordinator does not know: its answer says so, the other's is taken.
        let answers = host_call(&client, &[(&a, running(&runs[0], 0)), ("nobody", idle())])
            .await
            .unwrap()
            .unwrap()
            .workers;
        assert!(answers[0].reply.is_some(), "{answers:?}");
        assert_eq!(answers[1].code, tonic::Code::NotFound as i32);
        assert!(
            answers[1]
                .message
                .contains("unknown worker \"nobody\": register again"),
            "{}",
            answers[1].message
        );

        for (call, expected) in [
            (vec![], "workers: no heartbeat in the call"),
            (
                vec![(a.as_str(), idle()), (a.as_str(), idle())],
                "heartbeats twice in one call",
            ),
        ] {
            let refused = host_call(&client, &call).await.unwrap().unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument);
            assert!(
                refused.message().contains(expected),
                "{}",
                refused.message()
            );
        }
    });
    running_coordinator.shutdown();
}
