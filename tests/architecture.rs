//! ARCHITECTURE.md's crate invariants, checked on the dependency graph Cargo resolves
//! (`cargo metadata`): which crates may reach libtorch, Parquet or the tokenizers, and which
//! may not reach each other.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Every workspace crate's name, mapped to the names of every crate it reaches through
/// normal (not dev or build) dependencies.
fn reaches() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        // The host's dependencies only: those are the ones a build here downloaded.
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", env!("KILN_HOST_TARGET")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).unwrap();
    let name_of: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let mut direct: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|k| k["kind"].is_null())
            })
            .map(|d| d["pkg"].as_str().unwrap())
            .collect();
        direct.insert(node["id"].as_str().unwrap(), deps);
    }
    let mut out = BTreeMap::new();
    for member in meta["workspace_members"].as_array().unwrap() {
        let member = member.as_str().unwrap();
        let mut seen = BTreeSet::new();
        let mut todo = vec![member];
        while let Some(id) = todo.pop() {
            for &dep in &direct[id] {
                if seen.insert(dep) {
                    todo.push(dep);
                }
            }
        }
        out.insert(
            name_of[member].to_owned(),
            seen.iter().map(|id| name_of[id].to_owned()).collect(),
        );
    }
    out
}

fn assert_never_reaches(graph: &BTreeMap<String, BTreeSet<String>>, from: &str, to: &[&str]) {
    let reached = graph
        .get(from)
        .unwrap_or_else(|| panic!("{from} is not a workspace crate"));
    for t in to {
        assert!(
            !reached.contains(*t),
            "{from} depends (directly or not) on {t}, which ARCHITECTURE.md rules out"
        );
    }
}

#[test]
fn only_the_trainer_and_the_kiln_binary_reach_libtorch() {
    let graph = reaches();
    let with_torch: BTreeSet<&str> = graph
        .iter()
        .filter(|(_, deps)| deps.contains("tch") || deps.contains("torch-sys"))
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        with_torch,
        BTreeSet::from(["kiln", "kiln-worker"]),
        "crates that link libtorch"
    );
}

#[test]
fn the_control_plane_reaches_neither_the_data_path_nor_the_trainer() {
    let graph = reaches();
    let data_path = [
        "parquet",
        "arrow-array",
        "tokenizers",
        "tiktoken-rs",
        "kiln-shard-loader",
        "kiln-worker",
        "kiln-checkpoint",
    ];
    for crate_name in [
        "kiln-control",
        "kiln-coordinator",
        "kiln-report",
        "kiln-store",
        "kiln-proto",
        "kiln-telemetry",
    ] {
        assert_never_reaches(&graph, crate_name, &data_path);
    }
    // Checkpoints are read and written through the store alone.
    assert_never_reaches(
        &graph,
        "kiln-checkpoint",
        &["parquet", "tokenizers", "kiln-shard-loader", "kiln-worker"],
    );
}

#[test]
fn the_contract_is_at_the_bottom() {
    let graph = reaches();
    let kiln: Vec<&String> = graph["kiln-proto"]
        .iter()
        .filter(|d| d.starts_with("kiln"))
        .collect();
    assert!(kiln.is_empty(), "kiln-proto depends on {kiln:?}");
    assert_never_reaches(&graph, "kiln-worker", &["kiln-coordinator", "kiln-control"]);
    assert_never_reaches(
        &graph,
        "kiln-store",
        &["kiln-shard-loader", "kiln-checkpoint"],
    );
}
