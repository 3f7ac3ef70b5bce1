//! The deployment files in deploy/: the Kubernetes manifests rendered by kustomize and checked
//! offline against the API schemas of Kubernetes 1.30 (unknown or misspelled fields fail),
//! and the Slurm batch script run for real on a single-node Slurm started here (munged,
//! slurmctld and slurmd as root, on 127.0.0.1), training a 2-worker job to completion.

mod common;
#[path = "deploy/prepare.rs"]
mod prepare;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

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

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
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
fn kustomize(dir: &str) -> String {
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
fn yaml_documents(yaml: &str) -> Vec<Value> {
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

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
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

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The value after `flag` in a container's args.
fn arg_after(args: &[String], flag: &str) -> String {
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
    let port = free_peers(1)[0].clone();
    let log = dir.path().join("coordinator.log");
    let mut coordinator = Daemon::spawn(
        "kiln coordinator",
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["coordinator", "--listen", &port, "--token", "t0ken"])
            .args(["--state", path_str(&dir.path().join("state"))])
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap()),
    );
    let job = root().join("deploy/k8s/submit/job.toml");
    let submit = || {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["submit", path_str(&job), "--workers", "16"])
            .env("KILN_COORDINATOR", format!("http://{port}"))
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

/// A process started here, stopped (SIGTERM, then SIGKILL) by PID when dropped.
struct Daemon {
    name: &'static str,
    child: Option<Child>,
}

impl Daemon {
    fn spawn(name: &'static str, cmd: &mut Command) -> Daemon {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        Daemon {
            name,
            child: Some(child),
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("{} ignored SIGTERM: killing it", self.name);
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A single-node Slurm cluster in a temporary directory: munged with its own key and
/// socket, slurmctld and slurmd on fixed ports of 127.0.0.1. Dropping it cancels its jobs
/// and stops the daemons. Its ports are fixed, so the tests that start one take turns.
struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    // Stopped in this order: slurmd, slurmctld, then munged.
    daemons: Vec<Daemon>,
    // Released after the daemons stopped (fields drop after `Drop::drop`).
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// Held by the running Slurm of this test binary.
static SLURM_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SLURMCTLD_PORT: u16 = 16817;
const SLURMD_PORT: u16 = 16818;

impl Slurm {
    fn start(dir: &Path) -> Slurm {
        // A test that failed while holding it poisons nothing that matters here.
        let turn = SLURM_TURN.lock().unwrap_or_else(|e| e.into_inner());
        for bin in [
            "munged",
            "slurmctld",
            "slurmd",
            "sbatch",
            "scancel",
            "sinfo",
            "squeue",
        ] {
            assert!(
                which(bin).is_some() || Path::new("/usr/sbin").join(bin).is_file(),
                "{bin} is missing: run scripts/test-deps.sh (Debian slurmctld slurmd slurm-client munge)"
            );
        }
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "the Slurm test starts slurmctld, slurmd and munged, which need root (as in CI)"
        );
        for port in [SLURMCTLD_PORT, SLURMD_PORT] {
            assert!(
                std::net::TcpListener::bind(("0.0.0.0", port)).is_ok(),
                "port {port} is taken: is another Slurm (or this test) running?"
            );
        }
        let host = String::from_utf8(Command::new("hostname").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_owned();
        let dir = dir.to_owned();
        for sub in ["state", "spool", "log", "run"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // munged wants every directory above its socket searchable.
        set_mode(&dir, 0o755);

        let key = dir.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
            .unwrap();
        std::fs::write(&key, &bytes).unwrap();
        set_mode(&key, 0o400);
        let socket = dir.join("munge.sock");

        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "\
ClusterName=kilntest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={socket}
CredType=cred/munge
SlurmctldPort={SLURMCTLD_PORT}
SlurmdPort={SLURMD_PORT}
CommunicationParameters=NoInAddrAny
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
PlugStackConfig={d}/plugstack.conf
MailProg=/bin/true
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
",
                socket = socket.display()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("plugstack.conf"), "").unwrap();

        let log = |name: &str| File::create(dir.join("log").join(name)).unwrap();
        let mut slurm = Slurm {
            dir: dir.clone(),
            conf: conf.clone(),
            daemons: Vec::new(),
            _turn: turn,
        };
        let munged = Daemon::spawn(
            "munged",
            Command::new("munged")
                .args(["--foreground", "--force"])
                .arg(format!("--socket={}", socket.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg(format!("--log-file={d}/log/munged.log"))
                .arg(format!("--pid-file={d}/run/munged.pid"))
                .arg(format!("--seed-file={d}/munged.seed"))
                .stdout(log("munged.out"))
                .stderr(log("munged.err")),
        );
        slurm.daemons.insert(0, munged);
        slurm.wait_for("munged's socket", || socket.exists());
        let slurmctld = Daemon::spawn(
            "slurmctld",
            Command::new("slurmctld")
                .args(["-D", "-i", "-f", path_str(&conf)])
                .env("SLURM_CONF", &conf)
                .stdout(log("slurmctld.out"))
                .stderr(log("slurmctld.err")),
        );
        slurm.daemons.insert(0, slurmctld);
        let slurmd = Daemon::spawn(
            "slurmd",
            Command::new("slurmd")
                .args(["-D", "-f", path_str(&conf)])
                .env("SLURM_CONF", &conf)
                .stdout(log("slurmd.out"))
                .stderr(log("slurmd.err")),
        );
        slurm.daemons.insert(0, slurmd);
        slurm.wait_for("the node to be idle", || {
            let out = Command::new("sinfo")
                .args(["-h", "-o", "%t"])
                .env("SLURM_CONF", &conf)
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim() == "idle"
        });
        slurm
    }

    /// A Slurm client command for this cluster.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    fn wait_for(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            let exited: Vec<&str> = self
                .daemons
                .iter_mut()
                .filter_map(|d| (!d.running()).then_some(d.name))
                .collect();
            assert!(exited.is_empty(), "{exited:?} exited:\n{}", self.logs());
            assert!(
                Instant::now() < deadline,
                "waited 60 s for {what}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for entry in std::fs::read_dir(self.dir.join("log")).unwrap().flatten() {
            let content = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let tail: Vec<&str> = content.lines().rev().take(30).collect();
            text += &format!("== {}\n", entry.path().display());
            for l in tail.into_iter().rev() {
                text += l;
                text += "\n";
            }
        }
        text
    }

    /// `sbatch --wait ARGS`: its exit status (the batch job's), and its output.
    fn sbatch_wait(&self, args: &[&str], env: &[(&str, String)], timeout: Duration) -> Output {
        let mut child = self
            .command("sbatch")
            .args(["--wait", "--export=ALL"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("sbatch starts");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                self.cancel_all();
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "the batch job ran over {timeout:?}:\n{}\n{}",
                    String::from_utf8_lossy(&out.stderr),
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        child.wait_with_output().unwrap()
    }

    /// Cancels every job of this cluster and waits (a while) for them to go.
    fn cancel_all(&self) {
        let _ = self
            .command("scancel")
            .args(["--user", "root"])
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let out = self.command("squeue").args(["-h", "-o", "%i"]).output();
            match out {
                Ok(o) if o.status.success() && o.stdout.iter().all(u8::is_ascii_whitespace) => {
                    return
                }
                Err(_) => return,
                _ => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Drop for Slurm {
    fn drop(&mut self) {
        self.cancel_all();
        for d in &mut self.daemons {
            d.stop();
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The command lines of `kiln` processes with an argument that mentions `text`.
fn kiln_processes_with(text: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).into_owned())
        .filter(|c| {
            let mut args = c.split('\0');
            let exe = args.next().unwrap_or_default();
            (exe == "kiln" || exe.ends_with("/kiln")) && args.any(|a| a.contains(text))
        })
        .map(|c| c.replace('\0', " "))
        .collect()
}

/// deploy/slurm/kiln.sbatch on a real (single-node, CPU-only) Slurm: the coordinator in the
/// batch script, two workers through srun, the job followed to completion; then a job the
/// coordinator refuses, which fails the batch job.
#[test]
fn the_slurm_batch_script_trains_a_two_worker_job() {
    let dir = tempfile::tempdir().unwrap();
    let slurm_dir = dir.path().join("slurm");
    let slurm = Slurm::start(&slurm_dir);
    let script = root().join("deploy/slurm/kiln.sbatch");
    let job = tiny_job_with(dir.path(), "slurm-job", 8, 2, "", "every = 6", 12);
    let port = free_peers(1)[0].rsplit_once(':').unwrap().1.to_owned();
    let work = dir.path().join("work");
    let env = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("KILN_BIN", env!("CARGO_BIN_EXE_kiln").to_owned()),
            ("KILN_WORKERS_PER_NODE", "2".to_owned()),
            ("KILN_PORT", port.clone()),
            ("KILN_BIND", "127.0.0.1".to_owned()),
            ("KILN_COORDINATOR_HOST", "127.0.0.1".to_owned()),
            ("KILN_WORKER_HOST", "127.0.0.1".to_owned()),
            (
                "KILN_COORDINATOR_ARGS",
                "--heartbeat-interval-ms 200 --heartbeat-timeout-s 20".to_owned(),
            ),
            ("KILN_WORKER_ARGS", format!("--work-dir {}", work.display())),
            ("KILN_COLLECTIVE_TIMEOUT_S", "120".to_owned()),
            ("KILN_RENDEZVOUS_TIMEOUT_S", "120".to_owned()),
        ];
        env.extend(extra.iter().cloned());
        env
    };
    // CPU-friendly overrides of the script's GPU defaults.
    let run = |name: &str, extra: &[(&'static str, String)]| {
        let out_file = dir.path().join(format!("{name}.out"));
        let started = Instant::now();
        let out = slurm.sbatch_wait(
            &[
                "--gpus-per-node=0",
                "--nodes=1",
                "--job-name",
                name,
                "--output",
                path_str(&out_file),
                path_str(&script),
                path_str(&job),
            ],
            &env(extra),
            Duration::from_secs(600),
        );
        let batch = std::fs::read_to_string(&out_file).unwrap_or_default();
        println!(
            "== sbatch --wait ({:.1} s): {}\n{}\n== {}:\n{batch}",
            started.elapsed().as_secs_f64(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            out_file.display()
        );
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        (out, batch)
    };

    let (out, batch) = run("kiln-ok", &[]);
    assert!(
        out.status.success(),
        "the batch job failed: {}\n{batch}\n{}",
        out.status,
        slurm.logs()
    );
    assert!(
        batch.contains("for 2 workers (1 node(s), 2 worker process(es) each)"),
        "{batch}"
    );
    assert!(batch.contains("[completed] completed 12 steps"), "{batch}");
    assert!(batch.contains(": completed |"), "{batch}");
    assert!(batch.contains("kiln.sbatch: the job completed"), "{batch}");

    let out_dir = output_dir(&job);
    assert!(out_dir.join("model/config.json").is_file());
    assert!(out_dir.join("model/model.safetensors").is_file());
    let trained = Run::read(&out_dir);
    assert_eq!(trained.start["world"], 2, "two workers trained it");
    assert_eq!(trained.losses.len(), 12);
    let metrics = read_metrics(&out_dir.join("metrics.jsonl"));
    let last = metrics.iter().rev().find(|m| m["type"] == "step").unwrap();
    assert_eq!(
        (last["step"].as_i64(), last["steps"].as_i64()),
        (Some(12), Some(12))
    );
    assert!(metrics
        .iter()
        .any(|m| m["type"] == "checkpoint" && m["step"] == 12));
    // The script stopped its workers and the coordinator.
    assert_gone(dir.path());

    // A job the coordinator refuses (3 workers cannot split a batch of 8): the batch job
    // fails, and nothing is left running.
    let (out, batch) = run("kiln-refused", &[("KILN_WORKERS", "3".to_owned())]);
    assert!(!out.status.success(), "{batch}");
    assert!(batch.contains("3 workers cannot run this job"), "{batch}");
    assert!(
        batch.contains("kiln.sbatch: the job did not complete"),
        "{batch}"
    );
    assert_gone(dir.path());
}

/// No kiln process of this test's directory remains (waiting a little for Slurm and the
/// training processes to wind down).
fn assert_gone(dir: &Path) {
    let text = path_str(dir);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = kiln_processes_with(text);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the batch job: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
