//! The rendezvous that forms [`TcpRing`]s: every rank listens on its address, connects to
//! the next member of each of its groups and greets it, and accepts the connection of the
//! previous member.
//!
//! The greeting is 24 bytes: `KILN`, the wire version, the world size and the sender's global
//! rank (each a little-endian `u32`), and the FNV-1a hash of the group's tag (`u64`). A
//! connection that does not greet as a member of this job fails the rendezvous, with whom it
//! came from.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{collective_timeout, segment_bytes, GroupSpec, Links, TcpRing};
use crate::collective::{CollectiveError, Result};

const MAGIC: &[u8; 4] = b"KILN";
const WIRE_VERSION: u32 = 1;

impl TcpRing {
    /// Forms `groups` (each including `rank` or not) among the processes listening on
    /// `peers` (`peers[r]` is rank `r`'s `host:port`): listens on `peers[rank]`, connects to
    /// the next member of each group and accepts one connection from the previous one.
    /// Returns one ring per group that includes `rank`, in the order of `groups`.
    ///
    /// A launcher may instead hand this process its listening socket, already bound to
    /// `peers[rank]` (see [`LISTEN_FD_ENV`]): then that socket is used.
    pub fn connect(
        rank: usize,
        peers: &[String],
        groups: &[GroupSpec],
        timeout: Duration,
    ) -> Result<Vec<TcpRing>> {
        check_rank(rank, peers.len())?;
        let listener = match inherited_listener(rank, &peers[rank])? {
            Some(listener) => listener,
            None => TcpListener::bind(peers[rank].as_str()).map_err(|e| {
                CollectiveError::Rendezvous(format!(
                    "rank {rank} cannot listen on {}: {e}",
                    peers[rank]
                ))
            })?,
        };
        Self::connect_on(listener, rank, peers, groups, timeout)
    }

    /// [`TcpRing::connect`] with `listener`, already listening on `peers[rank]`, in place of
    /// binding that address: whoever chose the address holds the port from then on, so no
    /// other process can take it before the rendezvous.
    pub fn connect_on(
        listener: TcpListener,
        rank: usize,
        peers: &[String],
        groups: &[GroupSpec],
        timeout: Duration,
    ) -> Result<Vec<TcpRing>> {
        let world = peers.len();
        check_rank(rank, world)?;
        let deadline = Instant::now() + timeout;
        let mine = memberships(rank, world, groups)?;
        // Connect to every next member first: the peers' kernels accept into their backlog
        // before they call accept, so nobody waits on anybody here.
        let nexts = greet_nexts(rank, peers, &mine, deadline, timeout)?;
        let prevs = accept_prevs(&listener, peers, &mine, deadline, timeout)?;
        let mut rings = Vec::new();
        for ((m, next), prev) in mine.iter().zip(nexts).zip(prevs) {
            let links = match (next, prev) {
                (Some(next), Some(prev)) => {
                    for s in [&next, &prev] {
                        s.set_nodelay(true)
                            .and_then(|_| s.set_read_timeout(Some(collective_timeout())))
                            .and_then(|_| s.set_write_timeout(Some(collective_timeout())))
                            .map_err(|e| CollectiveError::Rendezvous(e.to_string()))?;
                    }
                    Some(Links { next, prev })
                }
                _ => None,
            };
            rings.push(TcpRing {
                rank: m.index,
                members: m.spec.members.clone(),
                addrs: m.spec.members.iter().map(|&r| peers[r].clone()).collect(),
                links: Mutex::new(links),
                timeout: collective_timeout(),
                segment: segment_bytes(),
                scratch: Mutex::new(Vec::new()),
            });
        }
        Ok(rings)
    }
}

/// The environment variable through which a launcher hands a rank its listening socket,
/// already bound to the rank's address in `--peers`: the number of a file descriptor the
/// process inherited. Kiln's multi-process tests use it, binding every rank's socket before
/// starting the ranks, so that no other process can take a port between its choice and the
/// rendezvous. Unset (the normal case), each rank binds its own address.
pub const LISTEN_FD_ENV: &str = "KILN_LISTEN_FD";

/// The listening socket this process inherited (see [`LISTEN_FD_ENV`]), if it has one that
/// it has not used yet, checked to be listening on `addr`'s port.
fn inherited_listener(rank: usize, addr: &str) -> Result<Option<TcpListener>> {
    static TAKEN: AtomicBool = AtomicBool::new(false);
    let Ok(value) = std::env::var(LISTEN_FD_ENV) else {
        return Ok(None);
    };
    // A second rendezvous in the same process binds its address: the socket is closed by then.
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    let bad = |what: String| {
        CollectiveError::Rendezvous(format!("rank {rank}: {LISTEN_FD_ENV}={value}: {what}"))
    };
    let fd = value
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|fd| *fd > 2)
        .ok_or_else(|| bad("not the number of an inherited file descriptor".into()))?;
    let listener = adopt_listener(fd).map_err(|e| bad(e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| bad(e.to_string()))?
        .port();
    if addr
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse::<u16>().ok())
        != Some(port)
    {
        return Err(bad(format!(
            "the socket listens on port {port}, but this rank's address is {addr}"
        )));
    }
    Ok(Some(listener))
}

/// Takes over inherited descriptor `fd`, which must be a listening socket: a close-on-exec
/// duplicate of it (so that processes this one starts do not inherit it), the original
/// closed.
#[allow(unsafe_code)]
fn adopt_listener(fd: i32) -> io::Result<TcpListener> {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `getsockopt` only writes `len` bytes to the valid out pointers; a descriptor
    // that is not open or not a socket makes it fail (EBADF, ENOTSOCK) without effect.
    let status = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if status != 0 {
        return Err(io::Error::last_os_error());
    }
    if listening == 0 {
        return Err(io::Error::other("the socket is not listening"));
    }
    // SAFETY: `fd` is an open socket (checked above), borrowed only for the duplication.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }.try_clone_to_owned()?;
    // SAFETY: the launcher handed this descriptor to the rendezvous alone, and `TAKEN` lets
    // it be taken once: closing it here cannot close anything another part of Kiln uses.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
    Ok(TcpListener::from(owned))
}

fn check_rank(rank: usize, world: usize) -> Result<()> {
    if rank >= world {
        return Err(CollectiveError::Rendezvous(format!(
            "rank {rank} is outside a world of {world} peers"
        )));
    }
    Ok(())
}

/// One group this rank belongs to.
struct Membership<'a> {
    spec: &'a GroupSpec,
    /// This rank's place in the group's ring.
    index: usize,
}

impl Membership<'_> {
    fn ring(&self) -> bool {
        self.spec.members.len() > 1
    }

    /// The global rank before this one in the ring.
    fn prev(&self) -> usize {
        let n = self.spec.members.len();
        self.spec.members[(self.index + n - 1) % n]
    }
}

/// The groups that include `rank`, in the order of `groups`, each checked to name only ranks
/// of the world.
fn memberships(rank: usize, world: usize, groups: &[GroupSpec]) -> Result<Vec<Membership<'_>>> {
    let mine: Vec<Membership<'_>> = groups
        .iter()
        .filter_map(|spec| {
            let index = spec.members.iter().position(|&m| m == rank)?;
            Some(Membership { spec, index })
        })
        .collect();
    for m in &mine {
        if let Some(&bad) = m.spec.members.iter().find(|&&r| r >= world) {
            return Err(CollectiveError::Rendezvous(format!(
                "group {} names rank {bad} in a world of {world}",
                m.spec.tag
            )));
        }
    }
    Ok(mine)
}

/// Connects to the next member of each group of more than one rank and greets it: who this
/// is, in which world, for which group. `None` for groups of one.
fn greet_nexts(
    rank: usize,
    peers: &[String],
    mine: &[Membership<'_>],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>> {
    let world = peers.len();
    let mut nexts = Vec::new();
    for m in mine {
        let n = m.spec.members.len();
        if n == 1 {
            nexts.push(None);
            continue;
        }
        let next = m.spec.members[(m.index + 1) % n];
        if peers[next].is_empty() {
            return Err(CollectiveError::Rendezvous(format!(
                "rank {rank} was given no address for rank {next}, the next member of group {}",
                m.spec.tag
            )));
        }
        let mut stream = connect_retry(next, &peers[next], deadline, timeout)?;
        let mut hello = Vec::with_capacity(24);
        hello.extend_from_slice(MAGIC);
        hello.extend_from_slice(&WIRE_VERSION.to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&tag_hash(&m.spec.tag).to_le_bytes());
        stream
            .write_all(&hello)
            .map_err(|e| lost(next, &peers[next], "rendezvous", &e))?;
        nexts.push(Some(stream));
    }
    Ok(nexts)
}

/// Accepts the connection of the previous member of each group of more than one rank, until
/// every one has come or `deadline` passes. `None` for groups of one.
fn accept_prevs(
    listener: &TcpListener,
    peers: &[String],
    mine: &[Membership<'_>],
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<Option<TcpStream>>> {
    let mut prevs: Vec<Option<TcpStream>> = mine.iter().map(|_| None).collect();
    let mut expected = mine.iter().filter(|m| m.ring()).count();
    listener
        .set_nonblocking(true)
        .map_err(|e| CollectiveError::Rendezvous(e.to_string()))?;
    while expected > 0 {
        let (mut stream, from_addr) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    let missing: Vec<String> = mine
                        .iter()
                        .zip(&prevs)
                        .filter(|(m, p)| m.ring() && p.is_none())
                        .map(|(m, _)| {
                            let prev = m.prev();
                            format!("rank {prev} ({}) for group {}", peers[prev], m.spec.tag)
                        })
                        .collect();
                    return Err(CollectiveError::Rendezvous(format!(
                        "no connection within {} s from {}",
                        timeout.as_secs(),
                        missing.join(", ")
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(CollectiveError::Rendezvous(e.to_string())),
        };
        let bad = |what: String| CollectiveError::Rendezvous(format!("{from_addr}: {what}"));
        let (from, tag) = read_greeting(&mut stream, peers.len()).map_err(bad)?;
        let slot = mine
            .iter()
            .position(|m| m.ring() && m.prev() == from && tag_hash(&m.spec.tag) == tag);
        match slot {
            Some(k) if prevs[k].is_none() => {
                prevs[k] = Some(stream);
                expected -= 1;
            }
            _ => {
                return Err(bad(format!(
                    "unexpected connection from rank {from}: is another job using these ports?"
                )))
            }
        }
    }
    Ok(prevs)
}

/// Reads and checks the greeting on an accepted connection: the sender's global rank and
/// the hash of its group's tag.
fn read_greeting(
    stream: &mut TcpStream,
    world: usize,
) -> std::result::Result<(usize, u64), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut hello = [0u8; 24];
    stream
        .read_exact(&mut hello)
        .map_err(|e| format!("no greeting: {e}"))?;
    if &hello[..4] != MAGIC {
        return Err("a connection that is not a Kiln peer reached the rendezvous port".into());
    }
    let version = u32::from_le_bytes(hello[4..8].try_into().unwrap_or_default());
    let their_world = u32::from_le_bytes(hello[8..12].try_into().unwrap_or_default());
    let from = u32::from_le_bytes(hello[12..16].try_into().unwrap_or_default()) as usize;
    let tag = u64::from_le_bytes(hello[16..24].try_into().unwrap_or_default());
    if version != WIRE_VERSION {
        return Err(format!(
            "rank {from} speaks wire version {version}, this rank {WIRE_VERSION}: mixed Kiln versions"
        ));
    }
    if their_world as usize != world {
        return Err(format!(
            "rank {from} was started with world size {their_world}, this rank with {world}"
        ));
    }
    Ok((from, tag))
}

fn connect_retry(
    peer: usize,
    addr: &str,
    deadline: Instant,
    timeout: Duration,
) -> Result<TcpStream> {
    let fail = |what: String| CollectiveError::Connect {
        peer,
        addr: addr.to_owned(),
        secs: timeout.as_secs(),
        what,
    };
    loop {
        let resolved = addr
            .to_socket_addrs()
            .map_err(|e| fail(format!("cannot resolve the address: {e}")))?
            .next()
            .ok_or_else(|| fail("the address resolves to nothing".into()))?;
        match TcpStream::connect_timeout(&resolved, Duration::from_secs(5)) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(fail(e.to_string())),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn lost(peer: usize, addr: &str, op: &'static str, e: &io::Error) -> CollectiveError {
    CollectiveError::PeerLost {
        peer,
        addr: addr.to_owned(),
        op,
        what: e.to_string(),
    }
}

/// FNV-1a: a stable 64-bit name for a group tag.
fn tag_hash(tag: &str) -> u64 {
    tag.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsRawFd, IntoRawFd};

    use super::*;

    #[test]
    fn an_inherited_listening_socket_is_adopted() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let adopted = adopt_listener(listener.into_raw_fd()).unwrap();
        assert_eq!(adopted.local_addr().unwrap(), addr);
        let client = TcpStream::connect(addr).unwrap();
        let (_, from) = adopted.accept().unwrap();
        assert_eq!(from, client.local_addr().unwrap());
    }

    #[test]
    fn a_descriptor_that_is_not_a_listening_socket_is_refused() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let err = adopt_listener(stream.as_raw_fd()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        // Refused without closing it.
        stream.set_nodelay(true).unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        assert!(adopt_listener(file.as_raw_fd()).is_err());
        assert!(adopt_listener(1 << 20).is_err());
    }
}
