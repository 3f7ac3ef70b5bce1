//! The monitoring files in deploy/ against the metrics Kiln exports (telemetry/src/names.rs):
//! the Grafana dashboard (deploy/grafana/kiln.json) names only those metrics and their labels,
//! and each of its queries returns data when `promtool test rules` runs it over series shaped
//! as the OpenTelemetry Collector and the coordinator serve them; the collector's
//! configuration (deploy/otel-collector.yaml) and the Prometheus one (deploy/prometheus.yml)
//! wire receivers, exporters and scrape targets together; README.md lists every metric.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kiln_telemetry::names::{self, Kind, Metric, Source};
use serde_json::{json, Value};

const DASHBOARD: &str = "deploy/grafana/kiln.json";
const COLLECTOR: &str = "deploy/otel-collector.yaml";
const PROMETHEUS: &str = "deploy/prometheus.yml";

// ------------------------------------------------------------------------------------------
// Reading PromQL: which identifiers are metric names and which are label names.

/// The metric and label names an expression uses.
#[derive(Debug, Default, PartialEq, Eq)]
struct Names {
    metrics: BTreeSet<String>,
    labels: BTreeSet<String>,
}

/// Words of PromQL that stand where a metric name could: aggregations (`sum by (l) (...)`),
/// binary operators and modifiers, and literals.
const KEYWORDS: &str = "sum min max avg group stddev stdvar count count_values bottomk topk \
    quantile limitk limit_ratio by without on ignoring group_left group_right bool and or unless \
    atan2 offset inf nan start end";

/// Keywords whose parenthesized list holds label names.
const GROUPING: &str = "by without on ignoring group_left group_right";

/// Splits a PromQL expression (Grafana variables allowed) into the metric names and label
/// names it uses. Label names are the identifiers inside `{...}` and inside the lists of
/// `by`, `without`, `on`, `ignoring`, `group_left` and `group_right`; a metric name is any
/// other identifier that is not a keyword nor a function being called. Strings, ranges
/// (`[5m]`, `[$__rate_interval]`), numbers and `$variables` are skipped; `__name__="x"`
/// inside braces names metric `x`.
fn promql_names(expr: &str) -> Names {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Names::default();
    let mut i = 0;
    let mut braces = 0usize;
    let mut parens = 0usize;
    // The paren depth at which a grouping keyword's label list opened.
    let mut label_list: Option<usize> = None;
    // The previous token when it was an identifier.
    let mut prev_ident: Option<String> = None;
    // Inside braces: the label name of the matcher being read.
    let mut matcher_label: Option<String> = None;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
            continue;
        }
        let mut ident = None;
        match c {
            '"' | '\'' | '`' => {
                let start = i + 1;
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' && c != '`' {
                        i += 1;
                    }
                    i += 1;
                }
                let value: String = chars[start..i.min(chars.len())].iter().collect();
                if braces > 0 && matcher_label.as_deref() == Some("__name__") {
                    names.metrics.insert(value);
                }
                matcher_label = None;
                i += 1;
            }
            '[' => {
                let mut depth = 0;
                while i < chars.len() {
                    match chars[i] {
                        '[' => depth += 1,
                        ']' => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                    if depth == 0 {
                        break;
                    }
                }
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    while i < chars.len() && chars[i] != '}' {
                        i += 1;
                    }
                    i += 1;
                } else {
                    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                        i += 1;
                    }
                }
            }
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '{' => {
                braces += 1;
                i += 1;
            }
            '}' => {
                braces = braces.saturating_sub(1);
                i += 1;
            }
            '(' => {
                parens += 1;
                if label_list.is_none()
                    && prev_ident
                        .as_deref()
                        .is_some_and(|p| GROUPING.split_whitespace().any(|g| g == p))
                {
                    label_list = Some(parens);
                }
                i += 1;
            }
            ')' => {
                if label_list == Some(parens) {
                    label_list = None;
                }
                parens = parens.saturating_sub(1);
                i += 1;
            }
            c if c.is_ascii_digit()
                || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                // A number or a duration: 0.95, 1e3, 0x1f, 5m.
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
                {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                ident = Some(chars[start..i].iter().collect::<String>());
            }
            _ => i += 1,
        }
        if let Some(word) = &ident {
            if braces > 0 {
                names.labels.insert(word.clone());
                matcher_label = Some(word.clone());
            } else if label_list.is_some() {
                names.labels.insert(word.clone());
            } else {
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let called = chars.get(j) == Some(&'(');
                if !called
                    && !KEYWORDS
                        .split_whitespace()
                        .any(|k| k == word.to_ascii_lowercase())
                {
                    names.metrics.insert(word.clone());
                }
            }
        }
        prev_ident = ident;
    }
    names
}

/// What a Grafana query variable asks Prometheus: the PromQL in it and the label it lists.
/// `label_values(EXPR, LABEL)`, `label_values(LABEL)`, `query_result(EXPR)`; anything else
/// is taken as PromQL.
fn variable_query(query: &str) -> (Option<String>, Option<String>) {
    let query = query.trim();
    let inner = |prefix: &str| {
        query
            .strip_prefix(prefix)
            .and_then(|rest| rest.trim_start().strip_prefix('('))
            .and_then(|rest| rest.trim_end().strip_suffix(')'))
            .map(str::trim)
    };
    if let Some(args) = inner("label_values") {
        // The label is after the last comma outside braces and strings.
        let mut split = None;
        let (mut depth, mut quote) = (0i32, None);
        for (k, c) in args.char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'' | '`') => quote = Some(c),
                (None, '{' | '(' | '[') => depth += 1,
                (None, '}' | ')' | ']') => depth -= 1,
                (None, ',') if depth == 0 => split = Some(k),
                _ => {}
            }
        }
        return match split {
            Some(k) => (
                Some(args[..k].trim().to_string()),
                Some(args[k + 1..].trim().to_string()),
            ),
            None => (None, Some(args.to_string())),
        };
    }
    if let Some(expr) = inner("query_result") {
        return (Some(expr.to_string()), None);
    }
    (Some(query.to_string()), None)
}

/// The series names among `used` that Kiln does not export.
fn unknown_metrics<'a>(used: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let known: HashSet<String> = names::prometheus_series().into_iter().collect();
    used.into_iter()
        .filter(|m| !known.contains(*m))
        .cloned()
        .collect()
}

fn prom_label(attribute: &str) -> String {
    attribute.replace(['.', '-'], "_")
}

/// The resource attributes every training rank's series carries through the collector.
const RANK_RESOURCE: &[&str] = &[
    names::JOB_ID,
    names::RANK,
    names::GENERATION,
    names::HOST,
    names::DEVICE,
    "service.name",
];

/// Every label a query may name: the metrics' attributes, the ranks' resource attributes,
/// `le` of histograms, and Prometheus's `job` and `instance`.
fn known_labels() -> HashSet<String> {
    let mut labels: HashSet<String> = ["le", "job", "instance", "__name__"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for metric in names::METRICS {
        labels.extend(metric.attributes.iter().map(|a| prom_label(a)));
        if metric.source == Source::Rank {
            labels.extend(RANK_RESOURCE.iter().map(|a| prom_label(a)));
        }
    }
    labels
}

/// The labels `metric`'s series carry.
fn labels_of(metric: &Metric) -> HashSet<String> {
    let mut labels: HashSet<String> = metric.attributes.iter().map(|a| prom_label(a)).collect();
    if metric.source == Source::Rank {
        labels.extend(RANK_RESOURCE.iter().map(|a| prom_label(a)));
    }
    labels
}

/// The metric a series name belongs to (histograms' `_bucket`, `_sum`, `_count` included).
fn metric_of(series: &str) -> Option<&'static Metric> {
    names::METRICS.iter().find(|m| {
        let name = m.prometheus_name();
        series == name
            || (m.kind == Kind::Histogram
                && ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| series == format!("{name}{s}")))
    })
}

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

// ------------------------------------------------------------------------------------------
// The dashboard.

fn dashboard() -> Value {
    let path = root().join(DASHBOARD);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not JSON: {e}"))
}

/// A query of the dashboard: where it is and its PromQL (Grafana variables left in).
#[derive(Debug, Clone)]
struct Query {
    place: String,
    expr: String,
    /// For a query variable, the label whose values it lists.
    label: Option<String>,
}

/// Every PromQL expression of the dashboard: each `expr` anywhere in it (panel targets,
/// panels nested in collapsed rows, annotations), and the query variables' queries.
fn queries(dashboard: &Value) -> Vec<Query> {
    fn walk(value: &Value, place: &str, out: &mut Vec<Query>) {
        match value {
            Value::Object(map) => {
                let here = match map.get("title").and_then(Value::as_str) {
                    Some(title) => format!("{place} > {title:?}"),
                    None => place.to_string(),
                };
                for (key, v) in map {
                    match (key.as_str(), v) {
                        ("expr", Value::String(expr)) => out.push(Query {
                            place: format!(
                                "{here} {}",
                                map.get("refId").and_then(Value::as_str).unwrap_or("")
                            ),
                            expr: expr.clone(),
                            label: None,
                        }),
                        _ => walk(v, &here, out),
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, place, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    for (key, value) in dashboard.as_object().expect("the dashboard is an object") {
        if key != "templating" {
            walk(value, key, &mut out);
        }
    }
    for var in variables(dashboard) {
        if var["type"] != "query" {
            continue;
        }
        let name = var["name"].as_str().unwrap_or("?");
        let query = match &var["query"] {
            Value::String(q) => q.clone(),
            Value::Object(q) => q["query"].as_str().unwrap_or_default().to_string(),
            other => panic!("variable {name}: query {other}"),
        };
        let (expr, label) = variable_query(&query);
        let place = format!("variable ${name}");
        if let Some(expr) = expr {
            out.push(Query { place, expr, label });
        } else if let Some(label) = label {
            out.push(Query {
                place,
                expr: String::new(),
                label: Some(label),
            });
        }
    }
    out
}

fn variables(dashboard: &Value) -> Vec<Value> {
    dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list is an array")
        .clone()
}

/// Every panel, rows' nested ones included.
fn panels(dashboard: &Value) -> Vec<Value> {
    fn walk(list: &Value, out: &mut Vec<Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel.clone());
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
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

// ------------------------------------------------------------------------------------------
// The dashboard's queries run by Prometheus (promtool) over series like the real ones.

fn promtool() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("promtool"))
            .find(|p| p.is_file())
    });
    found
        .or_else(|| Some(PathBuf::from("/usr/bin/promtool")).filter(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("promtool is missing: run scripts/test-deps.sh (Debian package prometheus)")
        })
}

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

/// The PromQL of the panel titled `title` (its only query).
fn panel_expr(board: &Value, title: &str) -> String {
    let panel = panels(board)
        .into_iter()
        .find(|p| p["title"] == title)
        .unwrap_or_else(|| panic!("{DASHBOARD} has no panel {title:?}"));
    panel["targets"][0]["expr"].as_str().unwrap().to_string()
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

// ------------------------------------------------------------------------------------------
// The collector and Prometheus configurations.

/// A YAML file as JSON, read by the repository's Python (PyYAML).
fn yaml(path: &Path) -> Value {
    let out = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
            path_str(path),
        ])
        .output()
        .expect("python starts");
    assert!(
        out.status.success(),
        "{} is not YAML:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The value the collector gives a string: `${env:NAME:-default}` as its default (the
/// collector runs with no variable set), `${env:NAME}` as the variable's absence.
fn resolve_env(value: &str) -> Option<String> {
    let Some(start) = value.find("${env:") else {
        return Some(value.to_string());
    };
    let end = start + value[start..].find('}')?;
    let reference = &value[start + 6..end];
    let (_, default) = reference.split_once(":-")?;
    resolve_env(&format!(
        "{}{default}{}",
        &value[..start],
        &value[end + 1..]
    ))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|v| v.as_str().expect("component ids are strings").to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn port(endpoint: &str) -> &str {
    endpoint.rsplit(':').next().unwrap()
}

#[test]
fn collector_receives_otlp_and_serves_prometheus_with_resource_labels() {
    let path = root().join(COLLECTOR);
    let config = yaml(&path);
    let text = std::fs::read_to_string(&path).unwrap();

    let otlp = &config["receivers"]["otlp"]["protocols"];
    assert_eq!(otlp["grpc"]["endpoint"], "0.0.0.0:4317");
    assert_eq!(otlp["http"]["endpoint"], "0.0.0.0:4318");
    assert!(
        config["processors"].get("batch").is_some(),
        "no batch processor"
    );

    let prometheus = &config["exporters"]["prometheus"];
    assert_eq!(prometheus["endpoint"], "0.0.0.0:8889");
    assert_eq!(
        prometheus["resource_to_telemetry_conversion"]["enabled"], true,
        "resource attributes (kiln.job.id, kiln.rank, host.name, ...) must become labels"
    );
    // The names the dashboard uses have the unit and type suffixes and no namespace.
    assert!(prometheus.get("namespace").is_none());
    assert_ne!(prometheus["add_metric_suffixes"], false);
    assert!(prometheus
        .get("translation_strategy")
        .is_none_or(|s| s == "UnderscoreEscapingWithSuffixes"));

    // Every `${env:...}` has a default, so the collector starts with none set.
    for (i, _) in text.match_indices("${env:") {
        let reference = &text[i..i + text[i..].find('}').unwrap()];
        assert!(
            reference.contains(":-"),
            "{COLLECTOR}: {reference}}} has no default"
        );
    }

    let pipelines = config["service"]["pipelines"]
        .as_object()
        .expect("service.pipelines");
    for (kind, section) in [
        ("receivers", "receivers"),
        ("processors", "processors"),
        ("exporters", "exporters"),
    ] {
        for (pipeline, p) in pipelines {
            for id in strings(&p[kind]) {
                let id = resolve_env(&id).unwrap_or_else(|| panic!("{pipeline}: {id}"));
                assert!(
                    config[section].get(&id).is_some(),
                    "pipeline {pipeline} uses {kind} {id}, which is not defined"
                );
            }
        }
    }
    for id in strings(&config["service"]["extensions"]) {
        assert!(config["extensions"].get(&id).is_some(), "extension {id}");
    }
    let metrics = &config["service"]["pipelines"]["metrics"];
    assert!(strings(&metrics["receivers"]).contains(&"otlp".to_string()));
    assert!(strings(&metrics["processors"]).contains(&"batch".to_string()));
    assert!(strings(&metrics["exporters"]).contains(&"prometheus".to_string()));
    let traces = &config["service"]["pipelines"]["traces"];
    assert!(strings(&traces["receivers"]).contains(&"otlp".to_string()));
    assert!(strings(&traces["processors"]).contains(&"batch".to_string()));
    assert!(!strings(&traces["exporters"]).is_empty());
    // The optional trace backend: an OTLP exporter whose endpoint comes from the environment.
    let backend = &config["exporters"]["otlp/traces"];
    let endpoint = backend["endpoint"].as_str().expect("otlp/traces endpoint");
    assert!(endpoint.contains("${env:TRACES_ENDPOINT"), "{endpoint}");
    assert!(!resolve_env(endpoint).unwrap().is_empty());
}

#[test]
fn prometheus_scrapes_the_collector_and_the_coordinator() {
    let path = root().join(PROMETHEUS);
    let out = Command::new(promtool())
        .args(["check", "config", path_str(&path)])
        .output()
        .expect("promtool starts");
    assert!(
        out.status.success(),
        "promtool check config {PROMETHEUS}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let config = yaml(&path);
    let collector = yaml(&root().join(COLLECTOR));
    let exporter_port = port(
        collector["exporters"]["prometheus"]["endpoint"]
            .as_str()
            .unwrap(),
    );
    let targets: Vec<(String, String)> = config["scrape_configs"]
        .as_array()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            let path = job["metrics_path"]
                .as_str()
                .unwrap_or("/metrics")
                .to_string();
            job["static_configs"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|s| strings(&s["targets"]))
                .map(move |t| (t, path.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    for wanted in [exporter_port, "9464"] {
        assert!(
            targets
                .iter()
                .any(|(t, path)| port(t) == wanted && path == "/metrics"),
            "{PROMETHEUS} scrapes no :{wanted}/metrics: {targets:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// README.md

/// Whether `text` has `word` standing alone: not inside a longer dotted or snake_case name.
fn mentions(text: &str, word: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '_';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let mut after = text[i + word.len()..].chars();
        let next = after.next();
        let next_is_part = match next {
            Some('.') => after.next().is_some_and(part),
            Some(c) => part(c),
            None => false,
        };
        !before.is_some_and(|c| part(c) || c == '.') && !next_is_part
    })
}

#[test]
fn mentions_matches_whole_names() {
    assert!(mentions("| `kiln.train.step` | gauge |", "kiln.train.step"));
    assert!(mentions("ends with kiln.train.step.", "kiln.train.step"));
    assert!(!mentions(
        "`kiln.train.steps` and `kiln.train.step.duration`",
        "kiln.train.step"
    ));
    assert!(!mentions("xkiln.train.step", "kiln.train.step"));
}

#[test]
fn readme_lists_every_metric() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let missing: Vec<&str> = names::METRICS
        .iter()
        .map(|m| m.name)
        .filter(|name| !mentions(&readme, name))
        .collect();
    assert!(
        missing.is_empty(),
        "README.md does not list these metrics (telemetry/src/names.rs METRICS): {missing:?}"
    );
}
