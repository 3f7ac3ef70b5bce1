use super::*;

const T: &str = "secret";

#[test]
fn a_worker_keeps_the_newest_snapshots_within_its_budget() {
    let mut hold = Hold::new(1000);
    for step in 1..=5 {
        hold.put("run", 0, step, serde_json::json!(step), vec![0; 100])
            .unwrap();
    }
    let steps: Vec<u64> = hold.list("run", 0).iter().map(|h| h.step).collect();
    assert_eq!(steps, [3, 4, 5], "the {KEEP} newest of a rank");
    // The two dropped ones' buffers are kept for the next snapshots, and counted.
    assert_eq!(hold.bytes(), 500);
    let spare = hold.buffer(100);
    assert!(spare.is_empty() && spare.capacity() >= 100);
    assert_eq!(hold.bytes(), 400);
    hold.put("run", 0, 6, serde_json::json!(6), spare_filled(spare))
        .unwrap();
    assert_eq!(hold.bytes(), 500, "steps 4 to 6, and step 3's buffer spare");
    // Another rank's snapshots push the oldest out once the budget is reached.
    for step in 1..=3 {
        hold.put("run", 1, step, serde_json::json!(null), vec![0; 300])
            .unwrap();
    }
    assert!(hold.bytes() <= 1000);
    assert_eq!(hold.list("run", 1).len(), 3, "the newest arrivals stay");
    assert!(hold.list("run", 0).len() < 3);
    let why = hold
        .put("run", 2, 1, serde_json::json!(null), vec![0; 2000])
        .unwrap_err();
    assert!(
        why.contains("does not fit this worker's memory budget"),
        "{why}"
    );
}

#[test]
fn snapshots_travel_over_tcp() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let hold = Arc::new(Mutex::new(Hold::new(1 << 20)));
    rt.spawn(serve(listener, hold.clone(), "secret".into()));
    let data: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    // Sent in parts, kept and read back whole.
    let (head, tail) = data.split_at(100);
    let meta = serde_json::json!({"world": 4});
    // Without the token, nothing is kept or told.
    let why = put(&addr, "guess", "job a", 3, 12, meta.clone(), &[head, tail]).unwrap_err();
    assert!(
        why.ends_with("wrong token: this worker keeps snapshots for its coordinator's jobs alone"),
        "{why}"
    );
    assert!(list(&addr, "", "job a", 3).is_err());
    put(&addr, T, "job a", 3, 12, meta, &[head, tail]).unwrap();
    let held = list(&addr, T, "job a", 3).unwrap();
    assert_eq!(
        held,
        [Held {
            step: 12,
            len: 4096,
            meta: serde_json::json!({"world": 4})
        }]
    );
    assert_eq!(get(&addr, T, "job a", 3, 12).unwrap(), data);
    assert!(list(&addr, T, "job b", 3).unwrap().is_empty());
    let why = get(&addr, T, "job a", 3, 11).unwrap_err();
    assert_eq!(
        why,
        format!("{addr}: no snapshot of step 11 for rank 3 of job a")
    );
    let why = put(
        &addr,
        T,
        "job a",
        3,
        13,
        serde_json::json!(null),
        &[&vec![0; 2 << 20]],
    )
    .unwrap_err();
    assert!(why.contains("memory budget of 1.0 MiB"), "{why}");
    drop(rt);
    // Nobody listening: the address is named.
    let why = list(&addr, T, "job a", 3).unwrap_err();
    assert!(why.starts_with(&addr), "{why}");
}

fn spare_filled(mut b: Vec<u8>) -> Vec<u8> {
    b.resize(100, 1);
    b
}
