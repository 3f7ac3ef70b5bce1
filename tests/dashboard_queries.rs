//! The Grafana dashboard's queries run by Prometheus (`promtool test rules`) over series
//! shaped as the OpenTelemetry Collector and the coordinator serve them: each returns data,
//! and the step breakdown and the throughput return their exact values.

mod common;
#[path = "common/grafana.rs"]
mod grafana;
#[path = "common/promql.rs"]
mod promql;

use std::process::Command;

use grafana::*;
use kiln_telemetry::names::{self, Kind, Source};
use promql::promtool;
use serde_json::{json, Value};

/// The expression as Prometheus gets it from Grafana: `$__rate_interval` as 1m, `$__range`
/// as 10m, `$job` as the synthetic series' job, `$rank` as its ranks, any other variable as
/// All (`.*`).
fn concrete(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "1m")
        .replace("${__rate_interval}", "1m")
        .replace("$__interval", "1m")
        .replace("$__range", "10m");
    let chars: Vec<char> = expr.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '$' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        i += 1;
        let braced = chars.get(i) == Some(&'{');
        let start = i + usize::from(braced);
        let mut end = start;
        while end < chars.len() && (chars[end].is_ascii_alphanumeric() || chars[end] == '_') {
            end += 1;
        }
        let name: String = chars[start..end].iter().collect();
        i = end;
        if braced {
            // `${name}` or `${name:format}`.
            while i < chars.len() && chars[i] != '}' {
                i += 1;
            }
            i += 1;
        }
        out.push_str(match name.as_str() {
            "job" => JOB,
            "rank" => "0|1",
            _ => ".*",
        });
    }
    out
}

const JOB: &str = "llama-7b";
const SAMPLES: usize = 80; // 20 minutes at 15 s

fn selector(name: &str, labels: &[(String, String)]) -> String {
    let labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    format!("{name}{{{}}}", labels.join(", "))
}

fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Series for every metric as Prometheus holds them after scraping the collector (ranks 0 and
/// 1 of one job, resource attributes as labels) and the coordinator (both on its own endpoint
/// and through the collector, so the job's series arrive twice). Counters grow at fixed
/// rates: every rank does 1 step/s and spends (phase index + 1) x (rank + 1) / 4 s/s in each
/// phase, so the mean over ranks is 3 (phase index + 1) / 8 s per step.
fn input_series() -> Vec<Value> {
    let mut out = Vec::new();
    let mut push = |series: String, values: String| {
        out.push(json!({"series": series, "values": values}));
    };
    for metric in names::METRICS {
        let name = metric.prometheus_name();
        // The label sets the metric's series come with.
        let mut sets: Vec<(Vec<(String, String)>, f64)> = Vec::new();
        match metric.source {
            Source::Rank => {
                for rank in 0..2 {
                    let r = rank.to_string();
                    let base = owned(&[
                        ("kiln_job_id", JOB),
                        ("kiln_rank", &r),
                        ("kiln_generation", "2"),
                        ("host_name", &format!("node-{rank}")),
                        ("kiln_device", &format!("cuda:{rank}")),
                        ("service_name", "kiln-train"),
                        ("job", "kiln-train"),
                        ("instance", "otel-collector:8889"),
                    ]);
                    if metric.attributes.contains(&names::PHASE) {
                        for (k, phase) in names::PHASES.iter().enumerate() {
                            let mut labels = base.clone();
                            labels.push(("kiln_phase".into(), phase.to_string()));
                            sets.push((labels, (k as f64 + 1.0) * (rank as f64 + 1.0) / 4.0));
                        }
                    } else {
                        sets.push((base, 1.0));
                    }
                }
            }
            Source::Job | Source::Coordinator => {
                let ways = [
                    owned(&[
                        ("job", "kiln-coordinator"),
                        ("instance", "kiln-coordinator:9464"),
                    ]),
                    owned(&[
                        ("job", "kiln-coordinator"),
                        ("instance", "otel-collector:8889"),
                        ("service_name", "kiln-coordinator"),
                        ("host_name", "coordinator-0"),
                    ]),
                ];
                for way in ways {
                    let mut base = way.clone();
                    if metric.attributes.contains(&names::JOB_ID) {
                        base.push(("kiln_job_id".into(), JOB.into()));
                    }
                    if metric.attributes.contains(&names::PHASE) {
                        for phase in names::PHASES {
                            let mut labels = base.clone();
                            labels.push(("kiln_phase".into(), phase.to_string()));
                            sets.push((labels, 0.1));
                        }
                    } else if metric.attributes.contains(&names::STATE) {
                        for state in ["idle", "busy"] {
                            let mut labels = base.clone();
                            labels.push(("kiln_state".into(), state.to_string()));
                            sets.push((labels, 1.0));
                        }
                    } else {
                        sets.push((base, 1.0));
                    }
                }
            }
        }
        for (labels, rate) in sets {
            match metric.kind {
                Kind::Gauge => {
                    let values = if *metric == names::JOB_GENERATION {
                        // A recovery at 9m30s: generation 1, then 2.
                        format!("1x37 2x{}", SAMPLES - 38)
                    } else if *metric == names::JOB_THROUGHPUT {
                        format!("1000x{SAMPLES}")
                    } else {
                        format!("{rate}x{SAMPLES}")
                    };
                    push(selector(&name, &labels), values);
                }
                Kind::Counter => {
                    // Steps: 1/s; phases: `rate` seconds per second.
                    let per_second = if *metric == names::TRAIN_STEPS {
                        1.0
                    } else {
                        rate
                    };
                    push(
                        selector(&name, &labels),
                        format!("0+{}x{SAMPLES}", per_second * 15.0),
                    );
                }
                Kind::Histogram => {
                    // Two observations per scrape interval: one of 0.8 s, one of 3 s.
                    for (le, per_scrape) in [("0.5", 0), ("1", 1), ("5", 2), ("+Inf", 2)] {
                        let mut with_le = labels.clone();
                        with_le.push(("le".into(), le.into()));
                        push(
                            selector(&format!("{name}_bucket"), &with_le),
                            format!("0+{per_scrape}x{SAMPLES}"),
                        );
                    }
                    push(
                        selector(&format!("{name}_sum"), &labels),
                        format!("0+3.8x{SAMPLES}"),
                    );
                    push(
                        selector(&format!("{name}_count"), &labels),
                        format!("0+2x{SAMPLES}"),
                    );
                }
            }
        }
    }
    out
}

#[test]
fn dashboard_queries_return_data_from_kiln_series() {
    let promtool = promtool();
    let board = dashboard();
    let queries: Vec<Query> = queries(&board)
        .into_iter()
        .filter(|q| !q.expr.is_empty())
        .collect();
    let dir = tempfile::tempdir().unwrap();

    // Each query as an alert that fires when the query returns nothing.
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| {
            json!({
                "alert": format!("Query{i}"),
                "expr": format!("absent({})", concrete(&q.expr)),
            })
        })
        .collect();
    let rules = json!({"groups": [{"name": "dashboard", "interval": "15s", "rules": rules}]});
    std::fs::write(dir.path().join("rules.yml"), rules.to_string()).unwrap();

    let alert_tests: Vec<Value> = (0..queries.len())
        .map(|i| json!({"eval_time": "10m", "alertname": format!("Query{i}"), "exp_alerts": []}))
        .collect();
    // Exact answers: the phases' mean seconds per step, and one throughput series per job
    // although the coordinator's series arrive twice.
    let breakdown: Vec<Value> = names::PHASES
        .iter()
        .enumerate()
        .map(|(k, phase)| {
            json!({
                "labels": format!("{{kiln_job_id=\"{JOB}\", kiln_phase=\"{phase}\"}}"),
                "value": 3.0 * (k as f64 + 1.0) / 8.0,
            })
        })
        .collect();
    let expr_tests = json!([
        {
            "expr": concrete(&panel_expr(&board, "Seconds per step by phase (mean over ranks)")),
            "eval_time": "10m",
            "exp_samples": breakdown,
        },
        {
            "expr": concrete(&panel_expr(&board, "Job throughput (tokens/s)")),
            "eval_time": "10m",
            "exp_samples": [{"labels": format!("{{kiln_job_id=\"{JOB}\"}}"), "value": 1000}],
        },
    ]);
    let tests = json!({
        "rule_files": ["rules.yml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": "15s",
            "input_series": input_series(),
            "alert_rule_test": alert_tests,
            "promql_expr_test": expr_tests,
        }],
    });
    std::fs::write(dir.path().join("tests.yml"), tests.to_string()).unwrap();

    let out = Command::new(&promtool)
        .args(["test", "rules", "tests.yml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool starts");
    let listing: Vec<String> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| format!("Query{i}: {}: {}", q.place, concrete(&q.expr)))
        .collect();
    assert!(
        out.status.success(),
        "promtool test rules failed (alert QueryN fires when query N returns no data; the \
         expression tests check the step breakdown's and the throughput's values):\n{}{}\n\
         queries:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        listing.join("\n")
    );
}
