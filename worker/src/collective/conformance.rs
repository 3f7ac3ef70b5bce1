//! One conformance suite for every [`Collective`] backend.
//!
//! Every rank builds all ranks' inputs from a shared seed, so it can compute each expected
//! result locally and compare. Values are small integers (also in float tensors), so sums
//! are exact whatever order a backend adds in; averages are compared with a tolerance.

use tch::{Device, Kind, Tensor};

use super::{chunk_range, Collective, CollectiveError, ReduceOp};

/// Runs every case on `c` with tensors on `device`; all ranks of the group must call it with
/// the same `seed`. Returns the number of cases checked, or the first mismatch.
pub fn run(c: &dyn Collective, device: Device, seed: u64) -> Result<usize, String> {
    let mut suite = Suite {
        c,
        device,
        n: c.size(),
        r: c.rank(),
        rng: seed,
        cases: 0,
    };
    let kinds = [
        Kind::Float,
        Kind::Double,
        Kind::BFloat16,
        Kind::Half,
        Kind::Int,
        Kind::Int64,
    ];
    // Element counts: empty, one, fewer than the ranks, not divisible, several segments.
    let sizes = [0i64, 1, 3, 1001, 65_537, 700_001];
    for (i, &kind) in kinds.iter().enumerate() {
        for (j, &numel) in sizes.iter().enumerate() {
            // Keep the big float case and skip big cases of the other kinds: time, not
            // coverage.
            if numel > 100_000 && i > 0 && j == sizes.len() - 1 {
                continue;
            }
            suite.all_reduce(kind, numel)?;
            suite.broadcast(kind, numel)?;
            suite.all_gather(kind, numel)?;
            suite.reduce_scatter(kind, numel)?;
        }
    }
    for numel in [5i64, 1001, 300_007] {
        suite.bucket(numel)?;
    }
    for zero1 in [false, true] {
        suite.deferred(zero1)?;
    }
    suite.non_contiguous()?;
    c.barrier().map_err(|e| e.to_string())?;
    Ok(suite.cases + 1)
}

/// The state of one run: the group, the shared random sequence and the cases checked.
struct Suite<'a> {
    c: &'a dyn Collective,
    device: Device,
    n: usize,
    r: usize,
    rng: u64,
    cases: usize,
}

impl Suite<'_> {
    /// The next seed of the sequence every rank draws in the same order (SplitMix64).
    fn next(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// [`check`], its failure prefixed with this rank's place in the group.
    fn check(&self, got: &Tensor, expected: &Tensor, kind: Kind, what: &str) -> Result<(), String> {
        check(got, expected, kind, what)
            .map_err(|what| format!("rank {} of {}: {what}", self.r, self.n))
    }

    /// Every reduction of a whole tensor, against the reduction of every rank's input.
    fn all_reduce(&mut self, kind: Kind, numel: i64) -> Result<(), String> {
        let (n, r) = (self.n, self.r);
        let shape = [numel];
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max] {
            let s = self.next();
            let inputs: Vec<Tensor> = (0..n).map(|q| input(s, q, &shape, kind)).collect();
            let stacked = Tensor::stack(&inputs, 0).to_kind(Kind::Double);
            let expected = match op {
                ReduceOp::Sum => stacked.sum_dim_intlist(0, false, Kind::Double),
                ReduceOp::Avg if is_int(kind) => stacked
                    .sum_dim_intlist(0, false, Kind::Double)
                    .divide_scalar_mode(n as f64, "trunc"),
                ReduceOp::Avg => stacked.sum_dim_intlist(0, false, Kind::Double) / n as f64,
                ReduceOp::Max => stacked.amax(0, false),
            };
            let t = inputs[r].to_device(self.device);
            self.c.all_reduce(&t, op).map_err(|e| e.to_string())?;
            self.check(
                &t,
                &expected,
                kind,
                &format!("all_reduce {op:?} {kind:?} x{numel}"),
            )?;
            self.cases += 1;
        }
        Ok(())
    }

    /// A broadcast from a root drawn from the sequence.
    fn broadcast(&mut self, kind: Kind, numel: i64) -> Result<(), String> {
        let shape = [numel];
        let s = self.next();
        let root = (s % self.n as u64) as usize;
        let t = input(s, self.r, &shape, kind).to_device(self.device);
        self.c.broadcast(&t, root).map_err(|e| e.to_string())?;
        let expected = input(s, root, &shape, kind).to_kind(Kind::Double);
        self.check(&t, &expected, kind, &format!("broadcast {kind:?} x{numel}"))?;
        self.cases += 1;
        Ok(())
    }

    /// An all-gather of every rank's tensor into one of `n` times its size.
    fn all_gather(&mut self, kind: Kind, numel: i64) -> Result<(), String> {
        let (n, device) = (self.n, self.device);
        let shape = [numel];
        let s = self.next();
        let mine = input(s, self.r, &shape, kind).to_device(device);
        let out = Tensor::zeros([n as i64 * numel], (kind, device));
        self.c.all_gather(&mine, &out).map_err(|e| e.to_string())?;
        let all: Vec<Tensor> = (0..n).map(|q| input(s, q, &shape, kind)).collect();
        let expected = Tensor::cat(&all, 0).to_kind(Kind::Double);
        self.check(
            &out,
            &expected,
            kind,
            &format!("all_gather {kind:?} x{numel}"),
        )?;
        self.cases += 1;
        Ok(())
    }

    /// A reduce-scatter into a separate output, which leaves its input alone.
    fn reduce_scatter(&mut self, kind: Kind, numel: i64) -> Result<(), String> {
        let (n, r, device) = (self.n, self.r, self.device);
        let s = self.next();
        let all: Vec<Tensor> = (0..n)
            .map(|q| input(s, q, &[n as i64 * numel], kind))
            .collect();
        let out = Tensor::zeros([numel], (kind, device));
        let before = all[r].to_device(device);
        self.c
            .reduce_scatter(&before, &out, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        let expected = Tensor::stack(&all, 0)
            .to_kind(Kind::Double)
            .sum_dim_intlist(0, false, Kind::Double)
            .narrow(0, r as i64 * numel, numel);
        self.check(
            &out,
            &expected,
            kind,
            &format!("reduce_scatter {kind:?} x{numel}"),
        )?;
        self.check(
            &before,
            &all[r].to_kind(Kind::Double),
            kind,
            "reduce_scatter input unchanged",
        )?;
        self.cases += 1;
        Ok(())
    }

    /// A bucket: uneven chunks of a range inside a larger flat buffer, reduce-scattered and
    /// gathered in place, leaving the rest of the buffer alone.
    fn bucket(&mut self, numel: i64) -> Result<(), String> {
        let (n, r, c) = (self.n, self.r, self.c);
        let s = self.next();
        let all: Vec<Tensor> = (0..n)
            .map(|q| input(s, q, &[numel + 20], Kind::Float))
            .collect();
        let buf = all[r].to_device(self.device).copy();
        let bucket = buf.narrow(0, 10, numel);
        c.reduce_scatter_flat(&bucket, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        let sum = Tensor::stack(&all, 0)
            .to_kind(Kind::Double)
            .sum_dim_intlist(0, false, Kind::Double);
        let own = chunk_range(numel as usize, n, r);
        let (o, l) = (own.start as i64, own.len() as i64);
        self.check(
            &bucket.narrow(0, o, l),
            &sum.narrow(0, 10 + o, l),
            Kind::Float,
            &format!("reduce_scatter_flat x{numel}"),
        )?;
        c.all_gather_flat(&bucket).map_err(|e| e.to_string())?;
        self.check(
            &bucket,
            &sum.narrow(0, 10, numel),
            Kind::Float,
            &format!("all_gather_flat x{numel}"),
        )?;
        let outside = Tensor::cat(&[buf.narrow(0, 0, 10), buf.narrow(0, 10 + numel, 10)], 0);
        let before = all[r].to_kind(Kind::Double);
        let before = Tensor::cat(
            &[before.narrow(0, 0, 10), before.narrow(0, 10 + numel, 10)],
            0,
        );
        self.check(&outside, &before, Kind::Float, "outside the bucket")?;
        self.cases += 2;
        Ok(())
    }

    /// Deferred collectives, as data parallelism uses them: buckets of one flat buffer marked
    /// ready on this thread, reduced from another (all-reduced, or reduce-scattered for
    /// `zero1`), awaited once.
    fn deferred(&mut self, zero1: bool) -> Result<(), String> {
        let (n, r, c) = (self.n, self.r, self.c);
        let s = self.next();
        let numel = 30_011i64;
        let all: Vec<Tensor> = (0..n).map(|q| input(s, q, &[numel], Kind::Float)).collect();
        let buf = all[r].to_device(self.device).copy();
        let cuts = [0i64, 7, 1000, numel];
        let mut jobs = Vec::new();
        for w in cuts.windows(2).rev() {
            let ready = c.ready_marker().map_err(|e| e.to_string())?;
            jobs.push((buf.narrow(0, w[0], w[1] - w[0]), ready));
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    for (bucket, ready) in jobs {
                        if zero1 {
                            c.reduce_scatter_flat_after(&bucket, ReduceOp::Sum, ready)?;
                        } else {
                            c.all_reduce_after(&bucket, ReduceOp::Sum, ready)?;
                        }
                    }
                    Ok::<(), CollectiveError>(())
                })
                .join()
                .unwrap_or_else(|_| Err(CollectiveError::Invalid("panicked".into())))
        })
        .map_err(|e| e.to_string())?;
        c.wait_pending().map_err(|e| e.to_string())?;
        let sum = Tensor::stack(&all, 0)
            .to_kind(Kind::Double)
            .sum_dim_intlist(0, false, Kind::Double);
        for w in cuts.windows(2) {
            let (lo, len) = (w[0], w[1] - w[0]);
            let (o, l) = if zero1 {
                let own = chunk_range(len as usize, n, r);
                (lo + own.start as i64, own.len() as i64)
            } else {
                (lo, len)
            };
            self.check(
                &buf.narrow(0, o, l),
                &sum.narrow(0, o, l),
                Kind::Float,
                &format!("deferred bucket {lo}..{} (zero1: {zero1})", w[1]),
            )?;
        }
        self.cases += 1;
        Ok(())
    }

    /// An all-reduce of a non-contiguous tensor.
    fn non_contiguous(&mut self) -> Result<(), String> {
        let (n, r) = (self.n, self.r);
        let s = self.next();
        let all: Vec<Tensor> = (0..n).map(|q| input(s, q, &[7, 5], Kind::Float)).collect();
        let t = all[r].to_device(self.device).copy().transpose(0, 1);
        self.c
            .all_reduce(&t, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        let expected = Tensor::stack(&all, 0)
            .to_kind(Kind::Double)
            .sum_dim_intlist(0, false, Kind::Double)
            .transpose(0, 1);
        self.check(&t, &expected, Kind::Float, "all_reduce transposed")?;
        self.cases += 1;
        Ok(())
    }
}

/// The input of rank `q` for a case: integers in [-8, 8) hashed from the case's seed, the
/// rank and the position (libtorch's generator is global: threads would race on it).
fn input(case_seed: u64, q: usize, shape: &[i64], kind: Kind) -> Tensor {
    let numel: i64 = shape.iter().product();
    let salt = ((case_seed % 1_000_003) as i64) * 7919 + q as i64 * 104_729;
    (Tensor::arange(numel, (Kind::Int64, Device::Cpu)) * 2_654_435_761i64 + salt)
        .remainder(65_521)
        .remainder(16)
        .g_sub_scalar(8)
        .view(shape)
        .to_kind(kind)
}

fn is_int(kind: Kind) -> bool {
    matches!(kind, Kind::Int | Kind::Int64)
}

fn check(got: &Tensor, expected: &Tensor, kind: Kind, what: &str) -> Result<(), String> {
    let got = got.to_device(Device::Cpu).to_kind(Kind::Double);
    if got.size() != expected.size() {
        return Err(format!(
            "{what}: shape {:?}, expected {:?}",
            got.size(),
            expected.size()
        ));
    }
    if got.numel() == 0 {
        return Ok(());
    }
    // Averages of small integers in bf16/f16 round to the type's precision.
    let tol = match kind {
        Kind::BFloat16 => 1e-2,
        Kind::Half => 1e-3,
        Kind::Float => 1e-6,
        _ => 1e-12,
    };
    let diff = (&got - expected).abs().max().double_value(&[]);
    let scale = expected.abs().max().double_value(&[]).max(1.0);
    if diff > tol * scale {
        return Err(format!("{what}: max difference {diff}"));
    }
    Ok(())
}
