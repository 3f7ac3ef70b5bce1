//! Ports on loopback for the processes a test starts, chosen so that no other process can
//! take one between its choice and its use.
//!
//! Never "bind port 0, read the port, release it, pass it on": between the release and the
//! child's bind, any process on the machine can take that port. Either the test holds the
//! socket and hands it to the child ([`Peers`]), or the child binds port 0 itself and says
//! which port it got ([`announced`]).

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kiln_worker::collective::tcp::LISTEN_FD_ENV;
use socket2::{Domain, SockRef, Socket, Type};

/// The addresses of the ranks of a multi-process run on loopback, each with its socket
/// already listening in this process; [`Peers::hand_to`] gives rank `r` its socket.
///
/// Why not pick free ports and let the ranks bind them: a port found free (bound to port 0,
/// read, released) can be taken by any other process on the machine before the rank binds
/// it, and the run then fails at the rendezvous. Here each port is held from its choice
/// until the rank listens on it, by the same socket: the rank inherits it across `exec` and
/// adopts it ([`LISTEN_FD_ENV`]) instead of binding its address. Nothing changes for users:
/// without that variable a rank binds its address as always.
pub struct Peers {
    listeners: Vec<TcpListener>,
}

impl Peers {
    /// `n` listening sockets on ports the system picks.
    pub fn bind(n: usize) -> Peers {
        Peers {
            listeners: (0..n)
                .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
                .collect(),
        }
    }

    pub fn addrs(&self) -> Vec<String> {
        self.listeners
            .iter()
            .map(|l| l.local_addr().unwrap().to_string())
            .collect()
    }

    /// The value of `--peers`: every address, in rank order.
    pub fn list(&self) -> String {
        self.addrs().join(",")
    }

    /// Makes the process `cmd` starts inherit rank `r`'s listening socket and adopt it.
    /// The socket must stay open here until the process has started (keep `self` alive
    /// until after `spawn`).
    #[allow(unsafe_code)]
    pub fn hand_to<'c>(&self, r: usize, cmd: &'c mut Command) -> &'c mut Command {
        let fd = self.listeners[r].as_raw_fd();
        cmd.env(LISTEN_FD_ENV, fd.to_string());
        // SAFETY: the closure runs in the child between fork and exec, where `fd` is open (a
        // copy of this process's socket, which outlives the spawn), and makes only `fcntl`
        // calls, which are async-signal-safe. The child alone keeps the socket across exec;
        // this process's descriptor stays close-on-exec for every other child.
        unsafe {
            cmd.pre_exec(move || {
                let fd = BorrowedFd::borrow_raw(fd);
                SockRef::from(&fd).set_cloexec(false)
            })
        }
    }
}

/// An address on loopback that refuses connections for as long as the returned socket
/// lives: bound, never listening, so no other process can listen on it meanwhile.
pub fn refusing_addr() -> (Socket, String) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    let addr = socket
        .local_addr()
        .unwrap()
        .as_socket()
        .unwrap()
        .to_string();
    (socket, addr)
}

/// Waits until a line of the file `log` (where `child` writes its output) gives what `find`
/// extracts from it, such as the address a server bound on port 0 announces; panics with the
/// file's text if `child` exits first or nothing comes within 60 s.
pub fn announced(
    child: &mut Child,
    log: &Path,
    what: &str,
    find: impl Fn(&str) -> Option<String>,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        // Only whole lines: the writer may be in the middle of one.
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        if let Some(found) = whole.lines().find_map(&find) {
            return found;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what}: the process exited ({status}) before saying it:\n{text}");
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not said within 60 s:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The address in `kiln coordinator`'s first line, "kiln coordinator listening on ADDR; ...".
pub fn coordinator_listening(line: &str) -> Option<String> {
    line.strip_prefix("kiln coordinator listening on ")
        .and_then(|rest| rest.split(';').next())
        .map(str::to_owned)
}
