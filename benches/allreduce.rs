//! All-reduce (sum) of CPU f32 tensors over Kiln's TCP ring. One process is one rank; rank 0
//! prints one JSON line per size.
//!
//!   cargo bench --bench allreduce -- RANK WORLD PEERS [SIZES_MIB=1,4,16,64,256] [ITERS=auto]
//!
//! `PEERS` is every rank's `host:port`, comma-separated, in rank order (each rank listens on
//! its own). Per size: one warm-up all-reduce, then `ITERS` timed ones; by default as many as
//! fill `ALLREDUCE_TARGET_S` (1.5 s) at the warm-up's pace, at least 3. Every rank fills its
//! tensor with `rank + 1` before each all-reduce and the ranks pass a barrier before the
//! clock starts; the result (`n (n + 1) / 2` everywhere, exact) is checked after the warm-up
//! and after the last timed all-reduce. The time of an iteration is the slowest rank's; the
//! reported time is the median over iterations.
//!
//! benches/allreduce.sh runs it side by side with torch.distributed's gloo backend
//! (benches/allreduce_gloo.py, same measurement).

use std::time::{Duration, Instant};

use kiln_worker::collective::tcp::{GroupSpec, TcpRing};
use kiln_worker::collective::{Collective, ReduceOp};
use tch::{Device, Kind, Tensor};

const DEFAULT_SIZES_MIB: &str = "1,4,16,64,256";

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let usage = "usage: allreduce RANK WORLD PEERS [SIZES_MIB=1,4,16,64,256] [ITERS=auto]";
    let rank: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("RANK: {usage}"));
    let world: usize = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("WORLD: {usage}"));
    let peers: Vec<String> = args
        .get(2)
        .unwrap_or_else(|| panic!("PEERS: {usage}"))
        .split(',')
        .map(|p| p.trim().to_owned())
        .collect();
    assert_eq!(
        peers.len(),
        world,
        "PEERS names {} ranks, WORLD is {world}",
        peers.len()
    );
    let sizes: Vec<f64> = args
        .get(3)
        .map(String::as_str)
        .unwrap_or(DEFAULT_SIZES_MIB)
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("SIZES_MIB is a comma-separated list of numbers")
        })
        .collect();
    let fixed_iters: usize = args
        .get(4)
        .map(|a| a.parse().expect("ITERS is an integer"))
        .unwrap_or(0);
    let target_s: f64 = std::env::var("ALLREDUCE_TARGET_S")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.5);
    tch::set_num_threads(1);

    let groups = [GroupSpec {
        tag: "world".into(),
        members: (0..world).collect(),
    }];
    let ring = TcpRing::connect(rank, &peers, &groups, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("rank {rank}: {e}"))
        .pop()
        .expect("one ring for the world group");
    let segment_kb: usize = std::env::var("KILN_RING_SEGMENT_KB")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|kb| *kb > 0)
        .unwrap_or(512);

    let fill = (rank + 1) as f64;
    let expected = (world * (world + 1) / 2) as f64;
    for mib in sizes {
        let numel = ((mib * (1u64 << 20) as f64) as i64 / 4).max(1);
        let bytes = numel * 4;
        let t = Tensor::empty([numel], (Kind::Float, Device::Cpu));
        let timed = |t: &Tensor| -> f64 {
            let _ = t.shallow_clone().fill_(fill);
            ring.barrier().expect("barrier");
            let start = Instant::now();
            ring.all_reduce(t, ReduceOp::Sum).expect("all_reduce");
            start.elapsed().as_secs_f64()
        };
        let check = |t: &Tensor, when: &str| {
            let wrong = t.ne(expected).sum(Kind::Int64).int64_value(&[]);
            assert!(
                wrong == 0,
                "rank {rank}: {wrong} of {numel} elements differ from {expected} after the {when} all-reduce of {bytes} bytes"
            );
        };

        let warm = slowest(&ring, &[timed(&t)])[0];
        check(&t, "warm-up");
        let iters = if fixed_iters > 0 {
            fixed_iters
        } else {
            ((target_s / warm).ceil() as usize).clamp(3, 100_000)
        };
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            times.push(timed(&t));
        }
        check(&t, "last timed");
        let mut times = slowest(&ring, &times);
        times.sort_by(f64::total_cmp);
        let time = times[times.len() / 2];
        if rank == 0 {
            let n = world as f64;
            let algbw = bytes as f64 / time / 1e9;
            println!(
                "{{\"impl\": \"kiln\", \"world\": {world}, \"bytes\": {bytes}, \"iters\": {iters}, \"time_s\": {time:.6}, \"algbw_gbps\": {algbw:.4}, \"busbw_gbps\": {:.4}, \"segment_kb\": {segment_kb}}}",
                2.0 * (n - 1.0) / n * algbw
            );
        }
    }
}

/// Every rank's `times` reduced to the element-wise maximum over ranks.
fn slowest(ring: &TcpRing, times: &[f64]) -> Vec<f64> {
    let t = Tensor::from_slice(times);
    ring.all_reduce(&t, ReduceOp::Max)
        .expect("all_reduce of the times");
    Vec::<f64>::try_from(&t).expect("f64 times")
}
