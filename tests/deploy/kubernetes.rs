//! The Kubernetes manifests of deploy/k8s, rendered by kustomize and checked offline against
//! the API schemas of Kubernetes 1.30 (unknown or misspelled fields fail), their references
//! to each other, and the example job of the submit Job accepted by a coordinator.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::{which, Daemon};

const KUBERNETES_VERSION: &str = "1.30.0";

/// The kustomize directories: the base, the submit Job, the tokenizing Job.
const K8S_DIRS: [&str; 3] = ["deploy/k8s", "deploy/k8s/submit", "deploy/k8s/prepare"];

fn kubectl() -> PathBuf {
    let candidates = [
        PathBuf::from("/usr/bin/kubectl"),
        PathBuf::from("/usr/local/bin/kubectl"),
    ];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .or_else(|| which("kubectl"))
        .unwrap_or_else(|| {
            panic!(
                "kubectl is missing: the Kubernetes manifests are rendered with `kubectl kustomize`. \
                 Install it (Debian: `apt-get install -y kubectl` from the Kubernetes apt repository; \
                 or download the static binary from https://dl.k8s.io/release/v1.30.0/bin/linux/amd64/kubectl \
                 into /usr/local/bin)"
            )
        })
}

fn validator() -> PathBuf {
    let p = root().join(".venv/bin/kubernetes-validate");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/setup.sh --no-build (requirements.txt pins kubernetes-validate)",
        p.display()
    );
    p
}

/// `kubectl kustomize DIR`: the manifests as applied.
pub fn kustomize(dir: &str) -> String {
    let out = Command::new(kubectl())
        .args(["kustomize", path_str(&root().join(dir))])
        .output()
        .expect("kubectl starts");
    assert!(
        out.status.success(),
        "kubectl kustomize {dir} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs kubernetes-validate --strict on `input` (a file, or "-" for `stdin`) and returns its
/// exit status and output (printed).
fn run_validator(input: &str, stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new(validator())
        .args(["--strict", "-k", KUBERNETES_VERSION, input])
        .current_dir(root())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubernetes-validate starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.unwrap_or("").as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("kubernetes-validate --strict -k {KUBERNETES_VERSION} {input}:\n{text}");
    (out.status.success(), text)
}

/// Validates and insists that every one of `resources` documents was checked against a
/// schema (a kind without one is only a warning for the validator).
fn assert_valid(input: &str, stdin: Option<&str>, resources: usize) {
    let (ok, text) = run_validator(input, stdin);
    assert!(ok, "kubernetes-validate refused {input}:\n{text}");
    assert!(
        !text.contains("Couldn't find schema") && !text.contains("ERROR"),
        "{input}: {text}"
    );
    assert_eq!(
        text.matches("passed for resource").count(),
        resources,
        "{input}: every resource is validated:\n{text}"
    );
}

/// The documents of a YAML stream, as JSON (through the venv's PyYAML, which
/// kubernetes-validate uses).
pub fn yaml_documents(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python starts");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(yaml.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the YAML does not parse");
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the rendered manifests"))
}

/// A generated object: its name is `name-HASH`.
fn find_generated<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let prefix = format!("{name}-");
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&prefix))
        })
        .unwrap_or_else(|| panic!("no {kind} {name}-HASH in the rendered manifests"))
}

pub fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value after `flag` in a container's args.
pub fn arg_after(args: &[String], flag: &str) -> String {
    let i = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} missing from {args:?}"));
    args[i + 1].clone()
}

/// Every name a pod template refers to (ConfigMaps, Secrets, claims) exists among `docs`,
/// and every `$(VAR)` in its args is defined for the container.
fn check_references(docs: &[Value], workload: &Value) {
    let what = format!("{} {}", workload["kind"], workload["metadata"]["name"]);
    let spec = &workload["spec"]["template"]["spec"];
    let exists = |kind: &str, name: &str| {
        assert!(
            docs.iter()
                .any(|d| d["kind"] == kind && d["metadata"]["name"] == name),
            "{what} refers to {kind} {name}, which the manifests do not define"
        );
    };
    for v in spec["volumes"].as_array().into_iter().flatten() {
        if let Some(n) = v["configMap"]["name"].as_str() {
            exists("ConfigMap", n);
        }
        if let Some(n) = v["secret"]["secretName"].as_str() {
            exists("Secret", n);
        }
        if let Some(n) = v["persistentVolumeClaim"]["claimName"].as_str() {
            exists("PersistentVolumeClaim", n);
        }
    }
    for c in spec["containers"].as_array().unwrap() {
        let mut defined: Vec<String> = Vec::new();
        for from in c["envFrom"].as_array().into_iter().flatten() {
            let (kind, name) = if let Some(n) = from["configMapRef"]["name"].as_str() {
                ("ConfigMap", n)
            } else {
                ("Secret", from["secretRef"]["name"].as_str().unwrap())
            };
            exists(kind, name);
            let source = find(docs, kind, name);
            defined.extend(
                source["data"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, _)| k.clone()),
            );
        }
        for e in c["env"].as_array().into_iter().flatten() {
            let key = &e["valueFrom"]["secretKeyRef"];
            if let Some(n) = key["name"].as_str() {
                exists("Secret", n);
                let data = &find(docs, "Secret", n)["data"];
                assert!(
                    data.get(key["key"].as_str().unwrap()).is_some(),
                    "{what}: Secret {n} has no key {}",
                    key["key"]
                );
            }
            defined.push(e["name"].as_str().unwrap().to_owned());
        }
        for a in strings(&c["args"]) {
            let mut rest = a.as_str();
            while let Some(start) = rest.find("$(") {
                let end = rest[start..].find(')').unwrap() + start;
                let var = &rest[start + 2..end];
                assert!(
                    defined.iter().any(|d| d == var),
                    "{what}: $({var}) in its args is not among its variables {defined:?}"
                );
                rest = &rest[end..];
            }
        }
    }
}

/// The files a kustomization lists under `resources`.
fn resource_files(dir: &str) -> Vec<String> {
    let docs = yaml_documents(
        &std::fs::read_to_string(root().join(dir).join("kustomization.yaml")).unwrap(),
    );
    strings(&docs[0]["resources"])
        .into_iter()
        .map(|f| format!("{dir}/{f}"))
        .collect()
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let base = kustomize("deploy/k8s");
    let submit = kustomize("deploy/k8s/submit");
    let prepare = kustomize("deploy/k8s/prepare");
    let docs = yaml_documents(&base);
    let submit_docs = yaml_documents(&submit);
    let prepare_docs = yaml_documents(&prepare);
    assert_valid("-", Some(&base), docs.len());
    assert_valid("-", Some(&submit), submit_docs.len());
    assert_valid("-", Some(&prepare), prepare_docs.len());
    // The resource files one by one (kustomization.yaml itself is kustomize's, not an API
    // object, so it is left out).
    for dir in K8S_DIRS {
        for file in resource_files(dir) {
            let n = yaml_documents(&std::fs::read_to_string(root().join(&file)).unwrap()).len();
            assert_valid(&file, None, n);
        }
    }

    // Everything lands in the namespace kiln; the names the pods use exist (the submit and
    // prepare Jobs use those of the base).
    for d in docs.iter().chain(&submit_docs).chain(&prepare_docs) {
        if d["kind"] != "Namespace" {
            assert_eq!(d["metadata"]["namespace"], "kiln", "{}", d["metadata"]);
        }
        assert_eq!(d["metadata"]["labels"]["app.kubernetes.io/part-of"], "kiln");
    }
    let mut all = docs.clone();
    all.extend(submit_docs.iter().cloned());
    all.extend(prepare_docs.iter().cloned());
    let coordinator = find(&docs, "Deployment", "kiln-coordinator");
    let workers = find(&docs, "StatefulSet", "kiln-worker");
    let job = find(&submit_docs, "Job", "kiln-submit");
    let prepare_job = find(&prepare_docs, "Job", "kiln-prepare");
    for w in [coordinator, workers, job, prepare_job] {
        check_references(&all, w);
    }

    // The coordinator: one replica, its gRPC port behind the Service workers use, metrics for
    // Prometheus on the Service's `metrics` port, a TCP readiness check.
    assert_eq!(coordinator["spec"]["replicas"], 1);
    let c = &coordinator["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&c["args"]);
    assert_eq!(args[0], "coordinator");
    assert_eq!(arg_after(&args, "--listen"), "0.0.0.0:7070");
    assert_eq!(arg_after(&args, "--metrics-listen"), "0.0.0.0:9464");
    assert_eq!(c["readinessProbe"]["tcpSocket"]["port"], "grpc");
    let service = find(&docs, "Service", "kiln-coordinator");
    let port = |name: &str| {
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("the coordinator's Service has no port {name}"))
            .clone()
    };
    assert_eq!(port("grpc")["port"], 7070);
    assert_eq!(port("metrics")["port"], 9464);
    assert_eq!(
        service["metadata"]["annotations"]["prometheus.io/path"],
        "/metrics"
    );

    // Workers: one process per GPU of the pod, reaching the coordinator's Service.
    let w = &workers["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&w["args"]);
    assert_eq!(args[0], "worker");
    assert_eq!(
        arg_after(&args, "--coordinator"),
        "http://kiln-coordinator:7070"
    );
    let gpus = &w["resources"]["limits"]["nvidia.com/gpu"];
    assert_eq!(
        arg_after(&args, "--nproc-per-node"),
        gpus.to_string(),
        "--nproc-per-node is the pod's GPU count"
    );
    assert_eq!(w["resources"]["requests"]["nvidia.com/gpu"], *gpus);
    let names: Vec<&str> = w["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    for var in [
        "KILN_TOKEN",
        "OTEL_SERVICE_NAME",
        "OTEL_RESOURCE_ATTRIBUTES",
    ] {
        assert!(names.contains(&var), "the workers lack {var}: {names:?}");
    }
    let config = &find_generated(&docs, "ConfigMap", "kiln-config")["data"];
    assert!(config["KILN_STATE"].as_str().unwrap().contains("://"));
    assert!(config.get("OTEL_EXPORTER_OTLP_ENDPOINT").is_some());

    // The submit Job asks for every GPU of the StatefulSet.
    let s = &job["spec"]["template"]["spec"]["containers"][0];
    let args = strings(&s["args"]);
    assert_eq!(&args[..2], ["submit", "/jobs/job.toml"]);
    let replicas = workers["spec"]["replicas"].as_u64().unwrap();
    assert_eq!(
        arg_after(&args, "--workers"),
        (replicas * gpus.as_u64().unwrap()).to_string()
    );
}

/// The check above can fail: a misspelled field is refused, naming it.
#[test]
fn a_misspelled_field_fails_validation() {
    let base = kustomize("deploy/k8s");
    let prepare = kustomize("deploy/k8s/prepare");
    for (manifests, right, wrong) in [
        (&base, "readinessProbe:", "readinesProbe:"),
        (&base, "podManagementPolicy:", "podManagmentPolicy:"),
        (
            &base,
            "terminationGracePeriodSeconds:",
            "terminationGracePeriodSecond:",
        ),
        (&prepare, "completionMode:", "completionMod:"),
        (&prepare, "backoffLimitPerIndex:", "backoffLimitPerIdx:"),
    ] {
        assert!(manifests.contains(right), "{right}");
        let (ok, text) = run_validator("-", Some(&manifests.replacen(right, wrong, 1)));
        assert!(!ok, "{wrong} was accepted:\n{text}");
        let field = wrong.trim_end_matches(':');
        assert!(
            text.contains(&format!("'{field}' was unexpected")),
            "{text}"
        );
    }
}

/// The example job file of the submit Job parses, validates and fits the 16 workers it is
/// submitted for: a coordinator accepts it.
#[test]
fn the_example_kubernetes_job_is_accepted_by_a_coordinator() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("coordinator.log");
    let out = File::create(&log).unwrap();
    let mut coordinator = Daemon::spawn(
        "kiln coordinator",
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--token", "t0ken"])
            // The example's data (s3://kiln/data/corpus) is not here: its file alone is checked.
            .arg("--no-data-check")
            .args(["--state", path_str(&dir.path().join("state"))])
            .stdout(out.try_clone().unwrap())
            .stderr(out),
    );
    let addr = coordinator.announced(&log, "the coordinator's address", coordinator_listening);
    let job = root().join("deploy/k8s/submit/job.toml");
    let submit = || {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["submit", path_str(&job), "--workers", "16"])
            .env("KILN_COORDINATOR", format!("http://{addr}"))
            .env("KILN_TOKEN", "t0ken")
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let out = loop {
        let out = submit();
        let err = String::from_utf8_lossy(&out.stderr);
        if out.status.success() || !(err.contains("connect") || err.contains("transport")) {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the coordinator did not answer: {err}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        out.status.success(),
        "deploy/k8s/submit/job.toml was refused:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("submitted {}", String::from_utf8_lossy(&out.stdout).trim());
    coordinator.stop();
}
