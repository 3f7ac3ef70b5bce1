//! The TCP ring on real loopback sockets: the conformance suite at several world sizes and on
//! the groups of a 2 x 2 mesh, and what the survivors see when a rank disappears.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_worker::collective::tcp::{GroupSpec, TcpRing};
use kiln_worker::collective::{conformance, Collective, ParallelDims, ProcessGroups, ReduceOp};
use tch::{Device, Kind, Tensor};

/// Listening sockets for `n` ranks on loopback, and their addresses. Each rank forms its
/// rings on its socket ([`TcpRing::connect_on`]) instead of binding its address again:
/// releasing a port for the rank to bind would let any other process take it in between.
fn listeners(n: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let peers = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (listeners, peers)
}

fn world(n: usize) -> Vec<TcpRing> {
    let (listeners, peers) = listeners(n);
    let groups = [GroupSpec {
        tag: "world".into(),
        members: (0..n).collect(),
    }];
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, listener)| {
            let peers = peers.clone();
            let groups = groups.clone();
            std::thread::spawn(move || {
                TcpRing::connect_on(listener, r, &peers, &groups, Duration::from_secs(30))
                    .unwrap()
                    .pop()
                    .unwrap()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn run_all(rings: Vec<Arc<dyn Collective>>, seed: u64) {
    let handles: Vec<_> = rings
        .into_iter()
        .map(|c| std::thread::spawn(move || conformance::run(c.as_ref(), Device::Cpu, seed)))
        .collect();
    for h in handles {
        let cases = h.join().unwrap().unwrap();
        assert!(cases > 100, "{cases} cases");
    }
}

#[test]
fn tcp_ring_passes_the_conformance_suite_at_world_sizes_1_to_4() {
    tch::set_num_threads(1);
    for n in 1..=4 {
        let rings = world(n)
            .into_iter()
            .map(|r| Arc::new(r) as Arc<dyn Collective>)
            .collect();
        run_all(rings, 42 + n as u64);
    }
}

#[test]
fn every_group_of_a_2x2_mesh_passes_the_suite() {
    tch::set_num_threads(1);
    let dims = ParallelDims::new(0, 2, 4).unwrap();
    let (listeners, peers) = listeners(4);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, listener)| {
            let peers = peers.clone();
            std::thread::spawn(move || {
                ProcessGroups::tcp_on(listener, r, &peers, dims, Duration::from_secs(30)).unwrap()
            })
        })
        .collect();
    let groups: Vec<ProcessGroups> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for g in &groups {
        assert_eq!((g.dp.size(), g.tp.size(), g.world.size()), (2, 2, 4));
        assert_eq!(g.dims.coords(g.rank), (g.dp_rank(), g.tp_rank()));
    }
    // Tensor-parallel groups then data-parallel groups, each pair of groups concurrently.
    run_all(groups.iter().map(|g| g.tp.clone()).collect(), 7);
    run_all(groups.iter().map(|g| g.dp.clone()).collect(), 8);
    // Groups really are distinct: a tp all-reduce sums ranks {0,1} and {2,3}.
    let handles: Vec<_> = groups
        .into_iter()
        .map(|g| {
            std::thread::spawn(move || {
                let t = Tensor::from_slice(&[g.rank as f32]);
                g.tp.all_reduce(&t, ReduceOp::Sum).unwrap();
                let tp = t.double_value(&[0]);
                let t = Tensor::from_slice(&[g.rank as f32]);
                g.dp.all_reduce(&t, ReduceOp::Sum).unwrap();
                (g.rank, tp, t.double_value(&[0]))
            })
        })
        .collect();
    for h in handles {
        let (rank, tp, dp) = h.join().unwrap();
        let expected_tp = if rank < 2 { 1.0 } else { 5.0 };
        let expected_dp = if rank % 2 == 0 { 2.0 } else { 4.0 };
        assert_eq!((tp, dp), (expected_tp, expected_dp), "rank {rank}");
    }
}

/// What the coordinator gives each rank: the addresses of its ring neighbours only, the others
/// left empty. A 4 x 2 mesh still forms every group, and each all-reduces correctly.
#[test]
fn a_mesh_forms_from_the_neighbours_addresses_alone() {
    tch::set_num_threads(1);
    let (dp, tp) = (4, 2);
    let dims = ParallelDims::new(0, tp, dp * tp).unwrap();
    let (listeners, peers) = listeners(dp * tp);
    let handles: Vec<_> = listeners
        .into_iter()
        .enumerate()
        .map(|(r, listener)| {
            let given = kiln_proto::control::ring_neighbours(r as u32, 8, tp as u32, 0);
            let sparse: Vec<String> = (0..peers.len())
                .map(|q| {
                    if given.contains(&(q as u32)) {
                        peers[q].clone()
                    } else {
                        String::new()
                    }
                })
                .collect();
            assert!(
                sparse.iter().any(String::is_empty),
                "rank {r} knows everyone"
            );
            std::thread::spawn(move || {
                let g = ProcessGroups::tcp_on(listener, r, &sparse, dims, Duration::from_secs(30))
                    .unwrap();
                let sum = |c: &Arc<dyn Collective>| {
                    let t = Tensor::from_slice(&[g.rank as f32]);
                    c.all_reduce(&t, ReduceOp::Sum).unwrap();
                    t.double_value(&[0])
                };
                (g.rank, sum(&g.world), sum(&g.dp), sum(&g.tp))
            })
        })
        .collect();
    for h in handles {
        let (rank, world, dp_sum, tp_sum) = h.join().unwrap();
        let (d, t) = (rank / tp, rank % tp);
        assert_eq!(world, 28.0, "rank {rank}");
        assert_eq!(dp_sum, (0..dp).map(|q| (q * tp + t) as f64).sum::<f64>());
        assert_eq!(tp_sum, (0..tp).map(|q| (d * tp + q) as f64).sum::<f64>());
    }
}

#[test]
fn a_rank_that_disappears_fails_every_other_rank_with_its_name() {
    let mut rings = world(3);
    let dead = rings.remove(1);
    let handles: Vec<_> = rings
        .into_iter()
        .map(|c| {
            std::thread::spawn(move || {
                let t = Tensor::ones([1 << 20], (Kind::Float, Device::Cpu));
                let start = Instant::now();
                let err = c.all_reduce(&t, ReduceOp::Sum).unwrap_err();
                // The group is unusable afterwards, with a clear message.
                let again = c.barrier().unwrap_err().to_string();
                (err, again, start.elapsed())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    drop(dead);
    for h in handles {
        let (err, again, elapsed) = h.join().unwrap();
        assert_eq!(err.peer(), Some(1), "{err}");
        assert!(err.to_string().contains("rank 1"), "{err}");
        assert!(again.contains("already failed"), "{again}");
        assert!(elapsed < Duration::from_secs(60), "{elapsed:?}");
    }
}

#[test]
fn mismatched_shapes_are_reported_not_hung() {
    let rings = world(2);
    let handles: Vec<_> = rings
        .into_iter()
        .enumerate()
        .map(|(r, c)| {
            std::thread::spawn(move || {
                let t = Tensor::ones([10 + r as i64], (Kind::Float, Device::Cpu));
                c.all_reduce(&t, ReduceOp::Sum).unwrap_err().to_string()
            })
        })
        .collect();
    let messages: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(
        messages
            .iter()
            .any(|m| m.contains("disagree on the operation or the tensor shape")),
        "{messages:?}"
    );
}
