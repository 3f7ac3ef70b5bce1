//! deploy/slurm/kiln.sbatch run for real on a single-node Slurm started here (munged,
//! slurmctld and slurmd as root, on 127.0.0.1): the coordinator in the batch script and two
//! workers through srun train a job to completion.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use crate::{which, Daemon};

/// A single-node Slurm cluster in a temporary directory: munged with its own key and
/// socket, slurmctld and slurmd on fixed ports of 127.0.0.1. Dropping it cancels its jobs
/// and stops the daemons. Its ports are fixed, so the tests that start one take turns.
pub struct Slurm {
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
    pub fn start(dir: &Path) -> Slurm {
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
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("SLURM_CONF", &self.conf);
        c
    }

    pub fn wait_for(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
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

    pub fn logs(&self) -> String {
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
    pub fn sbatch_wait(&self, args: &[&str], env: &[(&str, String)], timeout: Duration) -> Output {
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
    pub fn cancel_all(&self) {
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
    let work = dir.path().join("work");
    let env = |extra: &[(&'static str, String)]| {
        let mut env = vec![
            ("KILN_BIN", env!("CARGO_BIN_EXE_kiln").to_owned()),
            ("KILN_WORKERS_PER_NODE", "2".to_owned()),
            // A port the coordinator binds and reads back: none is picked here to be taken.
            ("KILN_PORT", "0".to_owned()),
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
    // KILN_PORT=0: the coordinator said which port it got, and that is where all went.
    let listening = batch
        .lines()
        .find_map(coordinator_listening)
        .unwrap_or_else(|| panic!("no 'listening on' line:\n{batch}"));
    let port = listening.rsplit_once(':').unwrap().1;
    assert_ne!(port, "0", "{batch}");
    assert!(
        batch.contains(&format!("at http://127.0.0.1:{port}\n")),
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
