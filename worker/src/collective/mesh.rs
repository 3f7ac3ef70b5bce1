//! The `dp x tp` mesh: which ranks form which groups.
//!
//! Ranks are laid out tensor-parallel innermost (Megatron's order): global rank
//! `r = dp_rank * tp + tp_rank`, so the ranks of one tensor-parallel group are neighbours
//! (on one node, over its fastest links) and data-parallel groups stride across them.
//!
//! With hybrid sharding (`parallel.shard`), each data-parallel group splits further into
//! shard groups of `shard` neighbouring data-parallel ranks (`dp_rank = replica * shard +
//! s`), and replica groups of the ranks at the same place `s` in every shard group.

use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use super::tcp::{GroupSpec, TcpRing};
use super::{Collective, CollectiveError, Result};

/// The shape of the mesh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelDims {
    pub dp: usize,
    pub tp: usize,
    /// Data-parallel ranks per shard group: `dp` unless hybrid sharding splits it.
    pub shard: usize,
}

impl ParallelDims {
    /// Checks `dp * tp == world` (with `dp = 0` meaning "whatever fills the world").
    pub fn new(dp: usize, tp: usize, world: usize) -> Result<Self> {
        let invalid = |m: String| Err(CollectiveError::Invalid(m));
        if tp == 0 || world == 0 {
            return invalid(format!(
                "parallel.tp ({tp}) and the world size ({world}) must be at least 1"
            ));
        }
        if !world.is_multiple_of(tp) {
            return invalid(format!(
                "the world size {world} is not a multiple of parallel.tp = {tp}"
            ));
        }
        let dp = if dp == 0 { world / tp } else { dp };
        if dp * tp != world {
            return invalid(format!(
                "dp ({dp}) x tp ({tp}) = {} but the world has {world} ranks",
                dp * tp
            ));
        }
        Ok(ParallelDims { dp, tp, shard: dp })
    }

    /// These dims with the data-parallel group split into shard groups of `shard` ranks
    /// (0: one group of all of them), which must divide it.
    pub fn with_shard(self, shard: usize) -> Result<Self> {
        let shard = if shard == 0 { self.dp } else { shard };
        if !self.dp.is_multiple_of(shard) {
            return Err(CollectiveError::Invalid(format!(
                "parallel.shard = {shard} does not divide the data-parallel size {} (world {} / tp {})",
                self.dp,
                self.world(),
                self.tp
            )));
        }
        Ok(ParallelDims { shard, ..self })
    }

    /// Whether the data-parallel group is split into several shard groups.
    pub fn hybrid(&self) -> bool {
        self.shard < self.dp
    }

    pub fn world(&self) -> usize {
        self.dp * self.tp
    }

    /// `(dp_rank, tp_rank)` of global rank `rank`.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.tp, rank % self.tp)
    }

    /// The tensor-parallel group of data-parallel rank `dp_rank`.
    pub fn tp_group(&self, dp_rank: usize) -> Vec<usize> {
        (0..self.tp).map(|t| dp_rank * self.tp + t).collect()
    }

    /// The data-parallel group of tensor-parallel rank `tp_rank`.
    pub fn dp_group(&self, tp_rank: usize) -> Vec<usize> {
        (0..self.dp).map(|d| d * self.tp + tp_rank).collect()
    }

    /// The shard group and the replica group of global rank `rank` (hybrid sharding).
    pub fn hybrid_groups(&self, rank: usize) -> (Vec<usize>, Vec<usize>) {
        let (d, t) = self.coords(rank);
        let (replica, s) = (d / self.shard, d % self.shard);
        let shard = (0..self.shard)
            .map(|i| (replica * self.shard + i) * self.tp + t)
            .collect();
        let replicas = (0..self.dp / self.shard)
            .map(|j| (j * self.shard + s) * self.tp + t)
            .collect();
        (shard, replicas)
    }

    /// Every group of the mesh: the world, then each data-parallel and each tensor-parallel
    /// group, then with hybrid sharding each shard group and each replica group.
    pub fn groups(&self) -> Vec<GroupSpec> {
        let mut groups = vec![GroupSpec {
            tag: "world".into(),
            members: (0..self.world()).collect(),
        }];
        for t in 0..self.tp {
            groups.push(GroupSpec {
                tag: format!("dp.{t}"),
                members: self.dp_group(t),
            });
        }
        for d in 0..self.dp {
            groups.push(GroupSpec {
                tag: format!("tp.{d}"),
                members: self.tp_group(d),
            });
        }
        if self.hybrid() {
            let replicas = self.dp / self.shard;
            for t in 0..self.tp {
                for j in 0..replicas {
                    groups.push(GroupSpec {
                        tag: format!("shard.{t}.{j}"),
                        members: self.hybrid_groups(j * self.shard * self.tp + t).0,
                    });
                }
                for i in 0..self.shard {
                    groups.push(GroupSpec {
                        tag: format!("replica.{t}.{i}"),
                        members: self.hybrid_groups(i * self.tp + t).1,
                    });
                }
            }
        }
        groups
    }
}

/// This rank's groups.
#[derive(Debug, Clone)]
pub struct ProcessGroups {
    pub dims: ParallelDims,
    /// Global rank.
    pub rank: usize,
    pub world: Arc<dyn Collective>,
    pub dp: Arc<dyn Collective>,
    pub tp: Arc<dyn Collective>,
    /// The group fully sharded parameters are gathered and reduce-scattered over: `dp`
    /// itself, or with hybrid sharding this rank's shard group.
    pub shard: Arc<dyn Collective>,
    /// The ranks holding the same shard: with hybrid sharding this rank's replica group,
    /// over which its gradient chunk is averaged; a group of one otherwise.
    pub replica: Arc<dyn Collective>,
}

impl ProcessGroups {
    /// One process alone.
    pub fn single() -> Self {
        ProcessGroups {
            dims: ParallelDims {
                dp: 1,
                tp: 1,
                shard: 1,
            },
            rank: 0,
            world: Arc::new(TcpRing::single(0)),
            dp: Arc::new(TcpRing::single(0)),
            tp: Arc::new(TcpRing::single(0)),
            shard: Arc::new(TcpRing::single(0)),
            replica: Arc::new(TcpRing::single(0)),
        }
    }

    /// Forms every group of `dims` over TCP among `peers` (one `host:port` per global rank).
    pub fn tcp(
        rank: usize,
        peers: &[String],
        dims: ParallelDims,
        timeout: Duration,
    ) -> Result<Self> {
        check_peers(peers, dims)?;
        let rings = TcpRing::connect(rank, peers, &dims.groups(), timeout)?;
        Self::from_rings(rank, dims, rings)
    }

    /// [`ProcessGroups::tcp`] with `listener`, already listening on `peers[rank]` (see
    /// [`TcpRing::connect_on`]).
    pub fn tcp_on(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        dims: ParallelDims,
        timeout: Duration,
    ) -> Result<Self> {
        check_peers(peers, dims)?;
        let rings = TcpRing::connect_on(listener, rank, peers, &dims.groups(), timeout)?;
        Self::from_rings(rank, dims, rings)
    }

    /// This rank's groups from its rings, in the order of [`ParallelDims::groups`].
    fn from_rings(rank: usize, dims: ParallelDims, rings: Vec<TcpRing>) -> Result<Self> {
        // Three groups include this rank (five with hybrid sharding), in the order of
        // `groups()`.
        let mut rings = rings
            .into_iter()
            .map(|r| Arc::new(r) as Arc<dyn Collective>);
        let mut next = || {
            rings
                .next()
                .ok_or_else(|| CollectiveError::Rendezvous("a group is missing".into()))
        };
        let (world, dp, tp) = (next()?, next()?, next()?);
        let (shard, replica) = if dims.hybrid() {
            (next()?, next()?)
        } else {
            (
                dp.clone(),
                Arc::new(TcpRing::single(0)) as Arc<dyn Collective>,
            )
        };
        Ok(ProcessGroups {
            dims,
            rank,
            world,
            dp,
            tp,
            shard,
            replica,
        })
    }

    /// The same groups with NCCL communicators for the data- and tensor-parallel groups on
    /// CUDA device `ordinal`, bootstrapped over the TCP groups (which keep serving the world
    /// group). Groups of one stay as they are.
    pub fn with_nccl(mut self, ordinal: usize) -> Result<Self> {
        use super::nccl::NcclComm;
        let mut groups = vec![&mut self.dp, &mut self.tp];
        if self.dims.hybrid() {
            groups.extend([&mut self.shard, &mut self.replica]);
        }
        for group in groups {
            if group.size() > 1 {
                *group = Arc::new(NcclComm::from_tcp(group.as_ref(), ordinal)?);
            }
        }
        if !self.dims.hybrid() {
            self.shard = self.dp.clone();
        }
        Ok(self)
    }

    pub fn dp_rank(&self) -> usize {
        self.dims.coords(self.rank).0
    }

    pub fn tp_rank(&self) -> usize {
        self.dims.coords(self.rank).1
    }
}

fn check_peers(peers: &[String], dims: ParallelDims) -> Result<()> {
    if peers.len() != dims.world() {
        return Err(CollectiveError::Invalid(format!(
            "{} peer addresses for a world of {} ranks",
            peers.len(),
            dims.world()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dims_must_fill_the_world() {
        assert_eq!(
            ParallelDims::new(0, 2, 4).unwrap(),
            ParallelDims {
                dp: 2,
                tp: 2,
                shard: 2
            }
        );
        assert!(ParallelDims::new(0, 3, 4)
            .unwrap_err()
            .to_string()
            .contains("not a multiple of parallel.tp = 3"));
        assert!(ParallelDims::new(3, 2, 4)
            .unwrap_err()
            .to_string()
            .contains("dp (3) x tp (2) = 6"));
    }

    #[test]
    fn groups_partition_the_mesh() {
        let d = ParallelDims::new(0, 2, 6).unwrap();
        assert_eq!(d.coords(5), (2, 1));
        assert_eq!(d.tp_group(1), vec![2, 3]);
        assert_eq!(d.dp_group(1), vec![1, 3, 5]);
        let groups = d.groups();
        assert_eq!(groups.len(), 1 + 2 + 3);
        for r in 0..6 {
            let containing = groups.iter().filter(|g| g.members.contains(&r)).count();
            assert_eq!(containing, 3);
        }
    }

    #[test]
    fn hybrid_sharding_splits_each_data_parallel_group() {
        // dp 4 x tp 2 = 8 ranks, shard groups of 2: rank 5 is dp 2, tp 1.
        let d = ParallelDims::new(0, 2, 8)
            .and_then(|d| d.with_shard(2))
            .unwrap();
        assert!(d.hybrid());
        assert_eq!(d.hybrid_groups(5), (vec![5, 7], vec![1, 5]));
        assert_eq!(d.hybrid_groups(0), (vec![0, 2], vec![0, 4]));
        // Every rank is in exactly one shard group and one replica group of its tp rank.
        let groups = d.groups();
        for r in 0..8 {
            for kind in ["shard.", "replica."] {
                let n = groups
                    .iter()
                    .filter(|g| g.tag.starts_with(kind) && g.members.contains(&r))
                    .count();
                assert_eq!(n, 1, "rank {r}: {kind}");
            }
        }
        assert!(!ParallelDims::new(0, 1, 4)
            .unwrap()
            .with_shard(4)
            .unwrap()
            .hybrid());
        let e = ParallelDims::new(0, 2, 8)
            .unwrap()
            .with_shard(3)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("parallel.shard = 3 does not divide the data-parallel size 4"),
            "{e}"
        );
    }

    /// The coordinator gives each rank only the addresses `ring_neighbours` names: they must
    /// be every rank it connects to or accepts from on every ring of its mesh.
    #[test]
    fn the_coordinators_neighbours_cover_every_ring() {
        for (world, tp, shard) in [
            (1, 1, 0),
            (2, 1, 0),
            (2, 2, 0),
            (4, 2, 0),
            (6, 2, 0),
            (8, 4, 0),
            (12, 3, 0),
            (5, 5, 0),
            (4, 1, 2),
            (8, 2, 2),
            (12, 1, 3),
            (12, 2, 2),
            (16, 2, 4),
        ] {
            let d = ParallelDims::new(0, tp, world)
                .and_then(|d| d.with_shard(shard))
                .unwrap();
            for r in 0..world {
                let given = kiln_proto::control::ring_neighbours(
                    r as u32,
                    world as u32,
                    tp as u32,
                    shard as u32,
                );
                let mine: Vec<_> = d
                    .groups()
                    .into_iter()
                    .filter(|g| g.members.contains(&r))
                    .collect();
                assert_eq!(mine.len(), if d.hybrid() { 5 } else { 3 });
                for g in mine {
                    let n = g.members.len();
                    let i = g.members.iter().position(|&m| m == r).unwrap();
                    for other in [g.members[(i + 1) % n], g.members[(i + n - 1) % n]] {
                        assert!(
                            given.contains(&(other as u32)),
                            "world {world} tp {tp} shard {shard}: rank {r} needs rank {other} ({}), given {given:?}",
                            g.tag
                        );
                    }
                }
            }
        }
    }
}
