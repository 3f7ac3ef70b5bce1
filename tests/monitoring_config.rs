//! The OpenTelemetry Collector's configuration (deploy/otel-collector.yaml) and Prometheus's
//! (deploy/prometheus.yml): receivers, processors and exporters wired into pipelines, resource
//! attributes kept as labels, and scrape targets for the collector and the coordinator.

mod common;
#[path = "common/promql.rs"]
mod promql;

use std::path::Path;
use std::process::Command;

use common::*;
use promql::promtool;
use serde_json::Value;

const COLLECTOR: &str = "deploy/otel-collector.yaml";
const PROMETHEUS: &str = "deploy/prometheus.yml";

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
