//! The Grafana dashboard (deploy/grafana/kiln.json) against the metrics Kiln exports
//! (telemetry/src/names.rs): its queries name only those metrics and their labels, and it is
//! laid out with the variables and rows it is used through. The PromQL reader these checks
//! rely on (tests/common/promql.rs) is tested here too. Its queries are run by Prometheus in
//! tests/dashboard_queries.rs.

mod common;
#[path = "common/grafana.rs"]
mod grafana;
#[path = "common/promql.rs"]
mod promql;

use std::collections::{BTreeSet, HashSet};

use grafana::*;
use kiln_telemetry::names::{self, Metric, Source};
use promql::*;
use serde_json::{json, Value};

#[test]
fn promql_names_tells_metrics_from_labels() {
    let names = |e: &str| {
        let n = promql_names(e);
        let v = |s: BTreeSet<String>| s.into_iter().collect::<Vec<_>>();
        (v(n.metrics), v(n.labels))
    };
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        names(r#"max by (kiln_job_id) (kiln_job_step{kiln_job_id=~"$job"})"#),
        (s(&["kiln_job_step"]), s(&["kiln_job_id"]))
    );
    assert_eq!(
        names(
            r#"sum by (kiln_job_id, kiln_phase) (rate(kiln_train_phase_duration_seconds_total{kiln_job_id=~"$job"}[$__rate_interval]))
               / on (kiln_job_id) group_left sum by (kiln_job_id) (rate(kiln_train_steps_total[1m]))"#
        ),
        (
            s(&[
                "kiln_train_phase_duration_seconds_total",
                "kiln_train_steps_total"
            ]),
            s(&["kiln_job_id", "kiln_phase"])
        )
    );
    assert_eq!(
        names("histogram_quantile(0.95, sum(rate(kiln_checkpoint_save_duration_seconds_bucket[1h])) by (le, kiln_rank))"),
        (
            s(&["kiln_checkpoint_save_duration_seconds_bucket"]),
            s(&["kiln_rank", "le"])
        )
    );
    // Strings may hold braces, commas and identifiers; keywords and numbers are not metrics.
    assert_eq!(
        names(
            r#"kiln_job_step{kiln_phase!="a}b, kiln_x", host_name=~'c\'d'} offset 5m > bool 0.5e3"#
        ),
        (s(&["kiln_job_step"]), s(&["host_name", "kiln_phase"]))
    );
    assert_eq!(
        names("a_total * on(kiln_job_id) group_left(kiln_phase) B unless ignoring(x) up"),
        (
            s(&["B", "a_total", "up"]),
            s(&["kiln_job_id", "kiln_phase", "x"])
        )
    );
    assert_eq!(
        names(r#"count({__name__="kiln_job_workers", kiln_job_id="j"}) without (instance)"#),
        (
            s(&["kiln_job_workers"]),
            s(&["__name__", "instance", "kiln_job_id"])
        )
    );
    // The check rejects what Kiln does not export: a misspelling, an OTel (dotted) name, a
    // metric of something else.
    for (expr, bad) in [
        (
            "max(kiln_job_throughput_per_secnd)",
            "kiln_job_throughput_per_secnd",
        ),
        ("kiln_job_throughput", "kiln_job_throughput"),
        ("kiln.job.throughput", "kiln"),
        ("rate(kiln_train_steps[5m])", "kiln_train_steps"),
        ("sum(up) by (kiln_job_id)", "up"),
    ] {
        let unknown = unknown_metrics(&promql_names(expr).metrics);
        assert!(unknown.contains(&bad.to_string()), "{expr}: {unknown:?}");
    }
    let used = promql_names("max by (kiln_job_id) (kiln_job_throughput_per_second)").metrics;
    assert!(unknown_metrics(&used).is_empty());

    assert_eq!(
        variable_query("label_values(kiln_job_step, kiln_job_id)"),
        (Some("kiln_job_step".into()), Some("kiln_job_id".into()))
    );
    assert_eq!(
        variable_query(r#"label_values(kiln_train_step{kiln_job_id=~"$job", a="x,y"}, kiln_rank)"#),
        (
            Some(r#"kiln_train_step{kiln_job_id=~"$job", a="x,y"}"#.into()),
            Some("kiln_rank".into())
        )
    );
    assert_eq!(
        variable_query("label_values(kiln_job_id)"),
        (None, Some("kiln_job_id".into()))
    );
    assert_eq!(
        variable_query("query_result(max by (kiln_job_id) (kiln_job_step))"),
        (Some("max by (kiln_job_id) (kiln_job_step)".into()), None)
    );
}

#[test]
fn queries_walks_nested_rows_annotations_and_variables() {
    let board = json!({
        "annotations": {"list": [{"expr": "kiln_job_generation"}]},
        "panels": [
            {"type": "row", "title": "R", "collapsed": true, "panels": [
                {"title": "P", "targets": [{"refId": "A", "expr": "kiln_job_step"}]}
            ]},
            {"title": "Q", "targets": [{"refId": "B", "expr": "kiln_job_loss"}]}
        ],
        "templating": {"list": [
            {"type": "query", "name": "job", "query": {"query": "label_values(kiln_job_step, kiln_job_id)"}},
            {"type": "query", "name": "old", "query": "label_values(kiln_job_workers, kiln_job_id)"},
            {"type": "datasource", "name": "ds", "query": "prometheus"}
        ]}
    });
    let mut got: Vec<(String, Option<String>)> = queries(&board)
        .into_iter()
        .map(|q| (q.expr, q.label))
        .collect();
    let want = [
        ("kiln_job_generation", None),
        ("kiln_job_step", None),
        ("kiln_job_loss", None),
        ("kiln_job_step", Some("kiln_job_id")),
        ("kiln_job_workers", Some("kiln_job_id")),
    ];
    let mut want: Vec<(String, Option<String>)> = want
        .iter()
        .map(|(e, l)| (e.to_string(), l.map(str::to_string)))
        .collect();
    got.sort();
    want.sort();
    assert_eq!(got, want);
    assert_eq!(panels(&board).len(), 3);
}

#[test]
fn dashboard_queries_name_only_kiln_metrics_and_their_labels() {
    let board = dashboard();
    assert!(
        board["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{DASHBOARD} has no title"
    );
    assert!(board["panels"].is_array(), "{DASHBOARD} has no panels");
    assert!(
        board["templating"]["list"].is_array(),
        "{DASHBOARD} has no templating"
    );
    assert!(board["schemaVersion"].as_u64().is_some_and(|v| v >= 36));

    let queries = queries(&board);
    assert!(queries.len() >= 20, "only {} queries", queries.len());
    let known_labels = known_labels();
    let mut used = BTreeSet::new();
    let mut problems = Vec::new();
    for query in &queries {
        let names = promql_names(&query.expr);
        if names.metrics.is_empty() && !query.expr.is_empty() {
            problems.push(format!("{}: no metric in {:?}", query.place, query.expr));
        }
        for bad in unknown_metrics(&names.metrics) {
            problems.push(format!(
                "{}: {bad:?} is not a metric Kiln exports (telemetry/src/names.rs prometheus_series()) in {:?}",
                query.place, query.expr
            ));
        }
        for label in names.labels.iter().chain(&query.label) {
            if !known_labels.contains(label) {
                problems.push(format!(
                    "{}: label {label:?} is on none of Kiln's series, in {:?}",
                    query.place, query.expr
                ));
            }
        }
        // A variable's label is on the series its query selects.
        if let Some(label) = &query.label {
            for metric in names.metrics.iter().filter_map(|m| metric_of(m)) {
                if !labels_of(metric).contains(label) {
                    problems.push(format!(
                        "{}: {} has no label {label:?}",
                        query.place,
                        metric.prometheus_name()
                    ));
                }
            }
        }
        used.extend(names.metrics);
    }
    assert!(problems.is_empty(), "{DASHBOARD}:\n{}", problems.join("\n"));

    // The main metrics are on it.
    let shown = |metric: &Metric| used.iter().any(|u| metric_of(u) == Some(metric));
    let main = [
        names::JOB_THROUGHPUT,
        names::TRAIN_THROUGHPUT,
        names::JOB_MFU,
        names::JOB_LOSS,
        names::JOB_VALIDATION_LOSS,
        names::TRAIN_PHASE_DURATION,
        names::TRAIN_STEPS,
        names::JOB_PHASE_DURATION,
        names::JOB_WORKERS,
        names::JOB_STRAGGLERS,
        names::JOB_RECOVERIES,
        names::JOB_GENERATION,
        names::CHECKPOINT_SAVE_DURATION,
        names::CHECKPOINT_PAUSE_DURATION,
        names::JOB_CHECKPOINT_STEP,
        names::COORDINATOR_WORKERS,
    ];
    let missing: Vec<&str> = main.iter().filter(|m| !shown(m)).map(|m| m.name).collect();
    assert!(missing.is_empty(), "{DASHBOARD} does not show {missing:?}");
    assert!(
        used.contains(&format!(
            "{}_bucket",
            names::CHECKPOINT_SAVE_DURATION.prometheus_name()
        )),
        "the save duration's quantiles come from its _bucket series"
    );
}

#[test]
fn dashboard_is_laid_out_with_variables_and_rows() {
    let board = dashboard();
    let vars = variables(&board);
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{DASHBOARD} has no ${name} variable"))
            .clone()
    };
    let ds = var("datasource");
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
    let job = var("job");
    assert_eq!(job["type"], "query");
    let job_query = match &job["query"] {
        Value::Object(q) => q["query"].clone(),
        q => q.clone(),
    };
    assert_eq!(job_query, "label_values(kiln_job_step, kiln_job_id)");

    let all = panels(&board);
    let mut ids = HashSet::new();
    let rows: Vec<&str> = all
        .iter()
        .filter(|p| p["type"] == "row")
        .map(|p| p["title"].as_str().unwrap_or_default())
        .collect();
    for row in [
        "Throughput",
        "Loss",
        "Step time breakdown",
        "Worker health",
        "Checkpoints",
    ] {
        assert!(rows.contains(&row), "no row {row:?} in {rows:?}");
    }
    for panel in &all {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        let id = panel["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "panel id {id} twice");
        let pos = &panel["gridPos"];
        let (x, w) = (pos["x"].as_u64().unwrap(), pos["w"].as_u64().unwrap());
        assert!(
            x + w <= 24 && pos["h"].as_u64().unwrap() > 0,
            "{title}: gridPos {pos}"
        );
        if panel["type"] == "row" {
            continue;
        }
        // Panels and their targets query the chosen Prometheus data source.
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title} has no query");
        for target in targets {
            assert!(
                target.get("datasource").is_none()
                    || target["datasource"]["uid"] == "${datasource}",
                "{title}: {target}"
            );
            let expr = target["expr"].as_str().unwrap_or_default();
            // Queries of a job's or its ranks' metrics follow the $job selection.
            if promql_names(expr)
                .metrics
                .iter()
                .filter_map(|m| metric_of(m))
                .any(|m| m.source != Source::Coordinator)
            {
                assert!(expr.contains(r#"kiln_job_id=~"$job""#), "{title}: {expr}");
            }
        }
    }
}
