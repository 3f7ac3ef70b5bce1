//! The `dp x tp` mesh: which ranks form which groups.
//!
//! Ranks are laid out tensor-parallel innermost (Megatron's order): global rank
//! `r = dp_rank * tp + tp_rank`, so the ranks of one tensor-parallel group are neighbours
//! (on one node, over its fastest links) and data-parallel groups stride across them.

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
        Ok(ParallelDims { dp, tp })
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

    /// Every group of the mesh: the world, then each data-parallel and each tensor-parallel
    /// group.
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
}

impl ProcessGroups {
    /// One process alone.
    pub fn single() -> Self {
        ProcessGroups {
            dims: ParallelDims { dp: 1, tp: 1 },
            rank: 0,
            world: Arc::new(TcpRing::single(0)),
            dp: Arc::new(TcpRing::single(0)),
            tp: Arc::new(TcpRing::single(0)),
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
        // Exactly three groups include this rank, in the order of `groups()`.
        let mut rings = rings
            .into_iter()
            .map(|r| Arc::new(r) as Arc<dyn Collective>);
        let mut next = || {
            rings
                .next()
                .ok_or_else(|| CollectiveError::Rendezvous("a group is missing".into()))
        };
        Ok(ProcessGroups {
            dims,
            rank,
            world: next()?,
            dp: next()?,
            tp: next()?,
        })
    }

    /// The same groups with NCCL communicators for the data- and tensor-parallel groups on
    /// CUDA device `ordinal`, bootstrapped over the TCP groups (which keep serving the world
    /// group). Groups of one stay as they are.
    pub fn with_nccl(mut self, ordinal: usize) -> Result<Self> {
        use super::nccl::NcclComm;
        for group in [&mut self.dp, &mut self.tp] {
            if group.size() > 1 {
                *group = Arc::new(NcclComm::from_tcp(group.as_ref(), ordinal)?);
            }
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
            ParallelDims { dp: 2, tp: 2 }
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

    /// The coordinator gives each rank only the addresses `ring_neighbours` names: they must
    /// be every rank it connects to or accepts from on every ring of its mesh.
    #[test]
    fn the_coordinators_neighbours_cover_every_ring() {
        for (world, tp) in [
            (1, 1),
            (2, 1),
            (2, 2),
            (4, 2),
            (6, 2),
            (8, 4),
            (12, 3),
            (5, 5),
        ] {
            let d = ParallelDims::new(0, tp, world).unwrap();
            for r in 0..world {
                let given = kiln_proto::control::ring_neighbours(r as u32, world as u32, tp as u32);
                for g in d.groups().iter().filter(|g| g.members.contains(&r)) {
                    let n = g.members.len();
                    let i = g.members.iter().position(|&m| m == r).unwrap();
                    for other in [g.members[(i + 1) % n], g.members[(i + n - 1) % n]] {
                        assert!(
                            given.contains(&(other as u32)),
                            "world {world} tp {tp}: rank {r} needs rank {other} ({}), given {given:?}",
                            g.tag
                        );
                    }
                }
            }
        }
    }
}
