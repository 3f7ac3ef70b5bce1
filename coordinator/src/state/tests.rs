use std::path::Path as FsPath;

use super::*;
use crate::machine::{JobSpec, Policy};

fn spec(n: usize, toml_bytes: usize) -> JobSpec {
    JobSpec {
        name: "job".into(),
        toml: format!("# {}\n[train]\nsteps = 10\n", "x".repeat(toml_bytes)),
        tp: 1,
        shard: 0,
        batch_size: 1,
        micro_batch_size: 1,
        steps: 10,
        checkpoint_every: 5,
        memory_every: 0,
        min_workers: 1,
        max_workers: 0,
        outputs: vec![format!("/runs/{n}")],
        queue: false,
    }
}

/// Applies what changed in `m` to `store`.
async fn save(m: &mut Machine, store: &mut StateStore) {
    let changes = m.take_changes();
    store.save(m, &changes).await.unwrap();
}

/// Every file under `dir` and its size.
fn files(dir: &FsPath) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(name, e.metadata().unwrap().len());
            }
        }
    }
    out
}

/// A new state in a temporary folder, with one job submitted and saved.
async fn one_job() -> (tempfile::TempDir, StateStore, Machine, String) {
    let dir = tempfile::tempdir().unwrap();
    let (mut s, nothing) = StateStore::open(dir.path().to_str().unwrap())
        .await
        .unwrap();
    assert!(nothing.is_none());
    let mut m = Machine::new(Policy::default(), "e".into());
    let a = m.submit(spec(0, 10), 1, 0.0).unwrap();
    save(&mut m, &mut s).await;
    (dir, s, m, a)
}

#[tokio::test]
async fn jobs_are_read_back_and_a_second_writer_is_fenced() {
    let (dir, mut first, mut m, a) = one_job().await;
    let url = dir.path().to_str().unwrap();
    for n in 1..=4 {
        m.scale(&a, 1, n as f64).unwrap();
        save(&mut m, &mut first).await;
    }
    // A restarted coordinator reads the job as it was last written.
    let (mut second, read) = StateStore::open(url).await.unwrap();
    let read = read.unwrap();
    assert_eq!(read.next_job, 1);
    assert_eq!(read.jobs, vec![m.jobs[&a].clone()]);
    // Two versions of its record are kept, its spec once.
    let names: Vec<String> = files(&dir.path().join("state/jobs").join(&a))
        .into_keys()
        .collect();
    assert_eq!(
        names,
        vec![
            "spec.json".to_owned(),
            format!("v{:020}.json", 4),
            format!("v{:020}.json", 5)
        ]
    );
    // Two coordinators on one state: whoever writes a version second is refused, and the
    // first one's version stands.
    let mut r = Machine::restore(Policy::default(), "e2".into(), read, 10.0);
    r.stop(&a, 10.0).unwrap();
    save(&mut r, &mut second).await;
    m.scale(&a, 1, 11.0).unwrap();
    let changes = m.take_changes();
    let err = first.save(&m, &changes).await.unwrap_err().to_string();
    assert!(
        err.contains("v00000000000000000006.json was written by another coordinator"),
        "{err}"
    );
    let (_, read) = StateStore::open(url).await.unwrap();
    assert_eq!(read.unwrap().jobs[0].phase, crate::machine::Phase::Stopped);
}

#[tokio::test]
async fn a_torn_newest_record_falls_back_to_the_one_before() {
    let (dir, mut s, mut m, a) = one_job().await;
    let url = dir.path().to_str().unwrap();
    let before = m.jobs[&a].clone();
    m.stop(&a, 1.0).unwrap();
    save(&mut m, &mut s).await;
    let newest = dir.path().join(format!("state/jobs/{a}/v{:020}.json", 2));
    std::fs::write(&newest, b"{\"id\": \"jo").unwrap();
    let (s, read) = StateStore::open(url).await.unwrap();
    assert_eq!(read.unwrap().jobs, vec![before]);
    // The next write does not reuse the damaged version's name.
    assert_eq!(s.jobs[&a], 2);
}

/// A submission cut short after its spec was written and before its record and the head:
/// the job is not read back, and its number is not handed out again.
#[tokio::test]
async fn a_job_written_in_part_is_skipped_and_its_number_not_reused() {
    let (dir, _, _, a) = one_job().await;
    let url = dir.path().to_str().unwrap();
    let cut = dir.path().join("state/jobs/job-2");
    std::fs::create_dir_all(&cut).unwrap();
    std::fs::write(cut.join("spec.json"), b"{}").unwrap();
    let (mut s, read) = StateStore::open(url).await.unwrap();
    let read = read.unwrap();
    assert_eq!(read.jobs.len(), 1);
    assert_eq!(read.next_job, 2);
    let mut r = Machine::restore(Policy::default(), "e2".into(), read, 1.0);
    let b = r.submit(spec(1, 10), 1, 1.0).unwrap();
    assert_ne!(b, "job-2");
    assert_ne!(b, a);
    save(&mut r, &mut s).await;
}

#[tokio::test]
async fn a_state_of_the_older_layout_is_read_and_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let mut m = Machine::new(Policy::default(), "e".into());
    let a = m.submit(spec(0, 10), 1, 0.0).unwrap();
    let b = m.submit(spec(1, 10), 1, 0.0).unwrap();
    m.stop(&b, 1.0).unwrap();
    let old = m.persisted();
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    for v in [6, 7] {
        std::fs::write(
            dir.path().join(format!("state/v{v:020}.json")),
            serde_json::to_vec(&old).unwrap(),
        )
        .unwrap();
    }
    let (_, read) = StateStore::open(url).await.unwrap();
    assert_eq!(read.as_ref(), Some(&old));
    let names: Vec<String> = files(dir.path()).into_keys().collect();
    assert!(names.iter().all(|n| !n.starts_with("state/v")), "{names:?}");
    // And read back from the new layout.
    let (_, again) = StateStore::open(url).await.unwrap();
    let again = again.unwrap();
    assert_eq!(again.next_job, 2);
    let ids: Vec<&str> = again.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(ids, vec![a.as_str(), b.as_str()]);
    assert_eq!(again.jobs, old.jobs);
}

/// 1,000 jobs with 100 KiB job files, each submitted and finished: the state holds the
/// retained 100 and nothing of the others, and a change to one job writes that job alone.
#[tokio::test]
async fn the_state_of_a_thousand_finished_jobs_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let url = dir.path().to_str().unwrap();
    let (mut s, _) = StateStore::open(url).await.unwrap();
    let mut m = Machine::new(Policy::default(), "e".into());
    let mut open = spec(99_999, 100 << 10);
    open.min_workers = 1;
    let running = m.submit(open, 1, 0.0).unwrap();
    save(&mut m, &mut s).await;
    for n in 0..1000 {
        let now = n as f64;
        let id = m.submit(spec(n, 100 << 10), 1, now).unwrap();
        m.stop(&id, now).unwrap();
        m.tick(now);
        save(&mut m, &mut s).await;
    }
    assert_eq!(m.jobs.len(), 1 + DEFAULT_KEPT);
    let all = files(dir.path());
    let bytes: u64 = all.values().sum();
    let jobs = std::fs::read_dir(dir.path().join("state/jobs"))
        .unwrap()
        .count();
    assert_eq!(
        jobs,
        1 + DEFAULT_KEPT,
        "a folder per kept job, none left behind"
    );
    // Per kept job: its spec (the job file and a few fields) and two small records.
    eprintln!("{} job folders, {bytes} bytes in {} files", jobs, all.len());
    let per_job = (100 << 10) + 4096;
    assert!(
        bytes < ((1 + DEFAULT_KEPT) * per_job) as u64,
        "{bytes} bytes in {} files",
        all.len()
    );
    // A change to one job writes one new record of that job, of a few hundred bytes.
    m.scale(&running, 1, 2000.0).unwrap();
    let changes = m.take_changes();
    s.save(&m, &changes).await.unwrap();
    let after = files(dir.path());
    let new: Vec<(&String, &u64)> = after
        .iter()
        .filter(|(k, _)| !all.contains_key(*k))
        .collect();
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].0.starts_with(&format!("state/jobs/{running}/v")));
    assert!(*new[0].1 < 4096, "{new:?}");
    // And it reads back as it is.
    let (_, read) = StateStore::open(url).await.unwrap();
    assert_eq!(read.unwrap().jobs.len(), 1 + DEFAULT_KEPT);
}

const DEFAULT_KEPT: usize = crate::machine::DEFAULT_RETAIN_FINISHED_JOBS;
