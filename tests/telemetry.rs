//! Telemetry from real runs: `kiln local` (a coordinator and two worker processes, each
//! running a training rank) exports OTLP metrics and traces to a receiver in this test, and a
//! real Prometheus scrapes the coordinator's `/metrics` endpoint.

mod common;
#[path = "common/otlp.rs"]
mod otlp;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_telemetry::names::{self, Source};

fn kiln_local(job: &Path, env: &[(String, String)], extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["local", path_str(job), "--workers", "2"])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kiln starts")
}

fn finished(child: Child) -> Output {
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kiln local failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Waits until `ready` holds for what the receiver has, or fails after 20 s.
fn wait_for(receiver: &otlp::Receiver, what: &str, ready: impl Fn(&otlp::Receiver) -> bool) {
    let start = Instant::now();
    while !ready(receiver) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the receiver never got {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last value of each (metric, attributes) series of one resource.
fn last_values(
    points: &[otlp::Point],
    resource: impl Fn(&HashMap<String, String>) -> bool,
) -> BTreeMap<(String, String), f64> {
    let mut out = BTreeMap::new();
    for p in points.iter().filter(|p| resource(&p.resource)) {
        let mut attrs: Vec<_> = p
            .attributes
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        attrs.sort();
        out.insert((p.name.clone(), attrs.join(",")), p.value);
    }
    out
}

#[test]
fn otlp_metrics_and_spans_from_a_real_job() {
    let dir = tempfile::tempdir().unwrap();
    // 8 steps of 8 sequences, checkpoints at 4 and 8, an evaluation at 6 and 8.
    let job = tiny_job_with(dir.path(), "otel", 8, 4, "", "every = 4", 8);
    let receiver = otlp::Receiver::start();
    let mut env = receiver.env();
    env.push((
        "OTEL_RESOURCE_ATTRIBUTES".into(),
        "deployment.environment=test,service.namespace=kiln-tests".into(),
    ));
    let out = finished(kiln_local(&job, &env, &[]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("completed"), "{stdout}");
    check_stored_metrics_log(&job);

    // Both ranks and the coordinator flush at exit.
    let steps_of = |rec: &otlp::Receiver, rank: &str| {
        last_values(&rec.points(), |r| is_rank(r, rank))
            .get(&(names::TRAIN_STEPS.name.to_string(), String::new()))
            .copied()
    };
    wait_for(&receiver, "both ranks' final step count", |rec| {
        steps_of(rec, "0") == Some(8.0) && steps_of(rec, "1") == Some(8.0)
    });
    let points = receiver.points();
    let job_id = check_resource_attributes(&points);
    for rank in ["0", "1"] {
        check_rank_metrics(&points, rank);
    }
    check_job_metrics(&points, &job_id);
    check_spans(&receiver);
}

/// Whether a resource is training rank `rank`.
fn is_rank(r: &HashMap<String, String>, rank: &str) -> bool {
    r.get("service.name").map(String::as_str) == Some("kiln-train")
        && r.get(names::RANK).map(String::as_str) == Some(rank)
}

/// The metrics log is also in the store, beside the checkpoints, whole.
fn check_stored_metrics_log(job: &Path) {
    let local_log = std::fs::read_to_string(output_dir(job).join("metrics.jsonl")).unwrap();
    let stored_log =
        std::fs::read_to_string(output_dir(job).join("checkpoints/metrics.jsonl")).unwrap();
    assert_eq!(stored_log, local_log);
    assert!(local_log.contains("\"type\":\"saved\""));
}

/// Resource attributes: job, rank, generation, node, device, and the user's own. Returns
/// the job's id.
fn check_resource_attributes(points: &[otlp::Point]) -> String {
    let rank0 = points
        .iter()
        .find(|p| is_rank(&p.resource, "0"))
        .unwrap()
        .resource
        .clone();
    let job_id = rank0[names::JOB_ID].clone();
    assert!(job_id.starts_with("otel-"), "{rank0:?}");
    assert_eq!(rank0[names::GENERATION], "1");
    assert_eq!(rank0[names::DEVICE], "cpu");
    assert!(!rank0[names::HOST].is_empty());
    assert_eq!(rank0["deployment.environment"], "test");
    assert_eq!(rank0["service.namespace"], "kiln-tests");
    job_id
}

/// Every rank metric, from rank `rank`, with plausible values.
fn check_rank_metrics(points: &[otlp::Point], rank: &str) {
    let v = last_values(points, |r| is_rank(r, rank));
    let get = |m: &names::Metric| {
        *v.get(&(m.name.to_string(), String::new()))
            .unwrap_or_else(|| panic!("rank {rank} sent no {}; got {v:?}", m.name))
    };
    for m in names::METRICS.iter().filter(|m| m.source == Source::Rank) {
        assert!(
            v.keys().any(|(name, _)| name == m.name),
            "rank {rank} sent no {}",
            m.name
        );
    }
    let loss = get(&names::TRAIN_LOSS);
    assert!(loss > 3.0 && loss < 12.0, "loss {loss}");
    let val = get(&names::TRAIN_VALIDATION_LOSS);
    assert!(val > 3.0 && val < 12.0, "validation loss {val}");
    assert!(get(&names::TRAIN_THROUGHPUT) > 0.0);
    let unit = points
        .iter()
        .find(|p| p.name == names::TRAIN_THROUGHPUT.name)
        .map(|p| p.unit.as_str());
    assert_eq!(unit, Some("{token}/s"));
    let mfu = get(&names::TRAIN_MFU);
    assert!(mfu > 0.0 && mfu <= 1.0, "mfu {mfu}");
    assert!(get(&names::TRAIN_GRAD_NORM) > 0.0);
    assert!(get(&names::TRAIN_LEARNING_RATE) > 0.0);
    assert_eq!(get(&names::TRAIN_STEP), 8.0);
    // 8 steps x 8 sequences x 64 tokens, half on each data-parallel rank.
    assert_eq!(get(&names::TRAIN_TOKENS), (8 * 8 * 64 / 2) as f64);
    assert!(get(&names::TRAIN_STEP_DURATION) > 0.0);
    assert_eq!(get(&names::CHECKPOINT_SAVES), 2.0);
    assert!(get(&names::CHECKPOINT_SIZE) > 100_000.0);
    // The step time by phase: all six, forward and backward took time.
    let phases: BTreeMap<String, f64> = v
        .iter()
        .filter(|((name, _), _)| name == names::TRAIN_PHASE_DURATION.name)
        .map(|((_, attrs), value)| (attrs.clone(), *value))
        .collect();
    assert_eq!(phases.len(), 6, "{phases:?}");
    for phase in names::PHASES {
        let s = phases[&format!("{}={phase}", names::PHASE)];
        assert!(s >= 0.0, "{phase}: {s}");
    }
    assert!(phases[&format!("{}=forward", names::PHASE)] > 0.0);
    assert!(phases[&format!("{}=backward", names::PHASE)] > 0.0);
    // Two saves: a histogram with two samples.
    let save = points
        .iter()
        .rev()
        .find(|p| is_rank(&p.resource, rank) && p.name == names::CHECKPOINT_SAVE_DURATION.name)
        .unwrap();
    assert_eq!(save.count, Some(2));
    assert!(save.value > 0.0);
}

/// The coordinator's job-level metrics name the job.
fn check_job_metrics(points: &[otlp::Point], job_id: &str) {
    let coordinator = last_values(points, |r| {
        r.get("service.name").map(String::as_str) == Some("kiln-coordinator")
    });
    let job_attr = format!("{}={job_id}", names::JOB_ID);
    let job_value = |m: &names::Metric| {
        *coordinator
            .get(&(m.name.to_string(), job_attr.clone()))
            .unwrap_or_else(|| panic!("no {} for {job_id}: {coordinator:?}", m.name))
    };
    assert_eq!(job_value(&names::JOB_CHECKPOINT_STEP), 8.0);
    assert_eq!(job_value(&names::JOB_GENERATION), 1.0);
    assert_eq!(job_value(&names::JOB_RECOVERIES), 0.0);
    let seen_workers = points
        .iter()
        .filter(|p| p.name == names::JOB_WORKERS.name)
        .map(|p| p.value)
        .fold(0.0, f64::max);
    assert_eq!(seen_workers, 2.0, "kiln.job.workers never showed 2 workers");
    assert!(points
        .iter()
        .any(|p| p.name == names::JOB_THROUGHPUT.name && p.value > 0.0));
}

/// Traces: a span per step on each rank, with a child per phase; nothing from the libraries
/// underneath.
fn check_spans(receiver: &otlp::Receiver) {
    wait_for(receiver, "the spans of 8 steps on both ranks", |rec| {
        let spans = rec.spans();
        ["0", "1"].iter().all(|rank| {
            spans
                .iter()
                .filter(|s| s.name == "step" && is_rank(&s.resource, rank))
                .count()
                == 8
        })
    });
    let spans = receiver.spans();
    for rank in ["0", "1"] {
        check_rank_spans(&spans, rank);
    }
    // Nothing from the libraries underneath (h2, tonic, hyper, tower).
    assert!(
        spans
            .iter()
            .all(|s| !s.name.contains("h2") && !s.name.starts_with("Connection")),
        "{:?}",
        spans.iter().map(|s| &s.name).collect::<BTreeSet<_>>()
    );
}

/// Rank `rank`'s spans: steps 1 to 8, each with its phases as children; one span per
/// checkpoint save, under the snapshot of the step that started it; two evaluations.
fn check_rank_spans(spans: &[otlp::Span], rank: &str) {
    let mine: Vec<_> = spans
        .iter()
        .filter(|s| is_rank(&s.resource, rank))
        .collect();
    let steps: BTreeMap<String, &otlp::Span> = mine
        .iter()
        .filter(|s| s.name == "step")
        .map(|s| (s.attributes["kiln.step"].clone(), *s))
        .collect();
    assert_eq!(
        steps.keys().cloned().collect::<BTreeSet<_>>(),
        (1..=8).map(|s| s.to_string()).collect::<BTreeSet<_>>()
    );
    for step in steps.values() {
        let children: BTreeSet<&str> = mine
            .iter()
            .filter(|s| s.parent_span_id == step.span_id && s.trace_id == step.trace_id)
            .map(|s| s.name.as_str())
            .collect();
        for phase in ["data", "forward", "backward", "collective", "optimizer"] {
            assert!(
                children.contains(phase),
                "step {:?}: {children:?}",
                step.attributes
            );
        }
        assert!(step.end_ns > step.start_ns);
    }
    // One span per checkpoint save, under the snapshot of the step that started it,
    // with its size.
    let saves: Vec<_> = mine
        .iter()
        .filter(|s| s.name == "checkpoint.save")
        .collect();
    assert_eq!(saves.len(), 2, "rank {rank}");
    for save in saves {
        let step = &steps[&save.attributes["kiln.step"]];
        let snapshot = mine
            .iter()
            .find(|s| s.span_id == save.parent_span_id)
            .expect("the save's parent span");
        assert_eq!(snapshot.name, "checkpoint.snapshot");
        assert_eq!(snapshot.parent_span_id, step.span_id);
        assert!(save.attributes["kiln.bytes"].parse::<u64>().unwrap() > 100_000);
    }
    assert_eq!(mine.iter().filter(|s| s.name == "evaluate").count(), 2);
}

fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.").then(|| body.to_string())
}

/// Prometheus, stopped when dropped.
struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn query(prometheus: &str, promql: &str) -> serde_json::Value {
    let encoded: String = promql
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let body = http_get(prometheus, &format!("/api/v1/query?query={encoded}"))
        .unwrap_or_else(|| panic!("Prometheus at {prometheus} did not answer"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn values(answer: &serde_json::Value) -> Vec<(serde_json::Value, f64)> {
    answer["data"]["result"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|s| {
                    let v = s["value"][1]
                        .as_str()
                        .unwrap_or("nan")
                        .parse()
                        .unwrap_or(f64::NAN);
                    (s["metric"].clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn prometheus_scrapes_the_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job_with(dir.path(), "scraped", 8, 4, "", "every = 20", 60);
    // Every server here binds port 0 and says which port it got.
    let local_log = dir.path().join("kiln-local.log");
    let mut run = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["local", path_str(&job), "--workers", "2"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&local_log).unwrap())
        .spawn()
        .expect("kiln starts");
    let metrics = announced(&mut run, &local_log, "the metrics address", |line| {
        line.strip_prefix("metrics on http://")
            .and_then(|rest| rest.strip_suffix("/metrics"))
            .map(str::to_owned)
    });
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: kiln-coordinator\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let prometheus_log = dir.path().join("prometheus.log");
    let mut prometheus = Prometheus(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("tsdb").display()
            ))
            .arg("--web.listen-address=127.0.0.1:0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&prometheus_log).unwrap())
            .spawn()
            .expect("prometheus is installed (scripts/test-deps.sh)"),
    );
    // Its log line `msg="Listening on" address=127.0.0.1:PORT` has the bound port.
    let web = announced(
        &mut prometheus.0,
        &prometheus_log,
        "Prometheus's address",
        |line| {
            line.contains("msg=\"Listening on\"")
                .then(|| line.split("address=").nth(1))
                .flatten()
                .map(|a| a.split_whitespace().next().unwrap_or(a).to_owned())
        },
    );

    // The endpoint itself, while the job runs.
    let start = Instant::now();
    let page = loop {
        if let Some(page) = http_get(&metrics, "/metrics").filter(|p| p.contains("kiln_job_step{"))
        {
            break page;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no job on /metrics"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        page.contains("# TYPE kiln_job_throughput_per_second gauge"),
        "{page}"
    );
    assert!(
        page.contains("# TYPE kiln_job_recoveries_total counter"),
        "{page}"
    );

    // Prometheus has scraped tokens/s of the running job.
    let start = Instant::now();
    let (labels, tokens_per_s) = loop {
        let answer = query(&web, "kiln_job_throughput_per_second");
        if let Some(found) = values(&answer).into_iter().find(|(_, v)| *v > 0.0) {
            break found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "Prometheus never had kiln_job_throughput_per_second: {answer}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        labels["kiln_job_id"]
            .as_str()
            .unwrap()
            .starts_with("scraped-"),
        "{labels}"
    );
    assert_eq!(labels["job"], "kiln-coordinator");
    println!("Prometheus: kiln_job_throughput_per_second{labels} = {tokens_per_s:.0}");
    let out = run.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("completed"),
        "kiln local failed:\n{stdout}\n{}",
        std::fs::read_to_string(&local_log).unwrap_or_default()
    );
    // What Prometheus stored agrees with the run: 2 workers, steps up to 60 at most.
    let workers = values(&query(&web, "max_over_time(kiln_job_workers[10m])"));
    assert_eq!(workers.first().map(|w| w.1), Some(2.0), "{workers:?}");
    let step = values(&query(&web, "max_over_time(kiln_job_step[10m])"));
    let step = step.first().map_or(0.0, |s| s.1);
    assert!(step > 0.0 && step <= 60.0, "{step}");
    // The throughput Prometheus saw is one the job logged (rank 0 reports it each step).
    let logged: Vec<f64> = read_metrics(&output_dir(&job).join("metrics.jsonl"))
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| e["tokens_per_s"].as_f64().unwrap())
        .collect();
    assert!(
        logged
            .iter()
            .any(|t| (t - tokens_per_s).abs() < 1e-6 * t.max(1.0)),
        "{tokens_per_s} is not among the logged {logged:?}"
    );
}

/// The metrics log reaches the store beside the checkpoints (here a real S3 server), and
/// `kiln report` draws the run from there once the machine's own copy is gone.
#[test]
fn the_metrics_log_is_kept_in_s3_and_reported_from_there() {
    s3_env();
    let dir = tempfile::tempdir().unwrap();
    let url = format!("s3://kiln-test/metrics-log-{}", std::process::id());
    let job = tiny_job_with(
        dir.path(),
        "s3log",
        8,
        4,
        "",
        &format!("every = 4\ndir = \"{url}\""),
        8,
    );
    kiln_ok(&["train", path_str(&job), "--quiet"]);
    let local = output_dir(&job).join("metrics.jsonl");
    let logged = read_metrics(&local);
    assert_eq!(logged.last().unwrap()["type"], "saved");
    std::fs::remove_file(&local).unwrap();
    let page = dir.path().join("s3.html");
    let out = kiln_ok(&["report", &url, "-o", path_str(&page)]);
    assert!(out.contains("wrote"), "{out}");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains("s3log"), "the page does not name the job");
    // One point of the loss curve per logged step.
    let steps = logged.iter().filter(|e| e["type"] == "step").count();
    assert_eq!(steps, 8);
    let points = html
        .split("data-series=\"loss\" points=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("a loss curve");
    assert_eq!(points.split_whitespace().count(), steps, "{points}");
}

/// A collector that is down costs nothing but one message per signal: training runs to its
/// end, the metrics log is whole, and the exporter's failure is not repeated every export.
#[test]
fn a_collector_that_is_down_is_reported_once_and_training_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let job = tiny_job_with(dir.path(), "nocollector", 8, 8, "", "", 6);
    // MFU against a peak named in the job file.
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(
        &job,
        text.replace("[train]\n", "[train]\npeak_tflops = 0.5\n"),
    )
    .unwrap();
    // A port nothing listens on for as long as `_held` lives.
    let (_held, closed) = refusing_addr();
    let closed = format!("http://{closed}");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", path_str(&job)])
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &closed)
        .env("OTEL_METRIC_EXPORT_INTERVAL", "200")
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let failures: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("ExportError"))
        .collect();
    assert!(
        !failures.is_empty() && failures.len() <= 2,
        "expected one failure per signal: {stderr}"
    );
    assert!(failures[0].contains("Connection refused"), "{stderr}");
    let logged = read_metrics(&output_dir(&job).join("metrics.jsonl"));
    let steps: Vec<_> = logged.iter().filter(|e| e["type"] == "step").collect();
    assert_eq!(steps.len(), 6, "{logged:?}");
    let start = &logged[0];
    assert_eq!(start["peak_flops"], 0.5e12);
    let flops_per_token = start["flops_per_token"].as_f64().unwrap();
    for s in steps {
        let expected = s["tokens_per_s"].as_f64().unwrap() * flops_per_token / 0.5e12;
        let mfu = s["mfu"].as_f64().unwrap();
        assert!(
            (mfu - expected).abs() <= 1e-9 * expected,
            "{mfu} vs {expected}"
        );
    }
}
