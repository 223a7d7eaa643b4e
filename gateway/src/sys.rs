//! The only `unsafe` in the product: raw file descriptors for handing a connection to another
//! shard's executor.

use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};

/// Duplicates `socket`'s descriptor into a std stream, so the glommio stream that owns the
/// original can be dropped on this executor while the connection lives on.
pub fn dup_socket(socket: &impl AsRawFd) -> std::io::Result<StdTcpStream> {
    // SAFETY: `dup` on a descriptor we own (borrowed for the call); it returns a new descriptor
    // that nobody else owns, or -1.
    let fd = unsafe { libc::dup(socket.as_raw_fd()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor from `dup` above, owned by nothing else.
    Ok(unsafe { StdTcpStream::from_raw_fd(fd) })
}

/// Adopts a handed-over socket on the current executor.
pub fn adopt_socket(socket: StdTcpStream) -> glommio::net::TcpStream {
    let fd = socket.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up ownership of `fd`; the glommio stream takes it over.
    unsafe { glommio::net::TcpStream::from_raw_fd(fd) }
}

extern "C" {
    /// mimalloc (the global allocator, linked through the `mimalloc` crate): collects the calling
    /// thread's heap; with `force`, purges freed pages back to the OS now.
    fn mi_collect(force: bool);
}

// Keeps the `mimalloc` crate (and so the C library that defines `mi_collect`) linked into every
// binary of this crate, tests included.
use mimalloc as _;

/// Returns the calling thread's freed allocator pages to the OS (`mi_collect(true)`): idle shard
/// threads would otherwise keep the memory of closed connections.
pub fn return_freed_memory() {
    // SAFETY: `mi_collect` takes a plain bool and touches only the calling thread's heap and the
    // allocator's own thread-safe structures.
    unsafe { mi_collect(true) }
}

/// Gives the calling thread SCHED_FIFO at `priority` (1..=99).
pub fn set_realtime_fifo(priority: i32) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param for the call; pid 0 means the calling thread.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Listen backlog per shard listener: the kernel caps it at `net.core.somaxconn` (`tuning check`
/// says when that is the limit). glommio's own `bind` uses 1024.
pub const LISTEN_BACKLOG_CONNECTIONS: i32 = 65_535;

/// Binds a listener with SO_REUSEPORT (one per shard on the same port; the kernel spreads accepts)
/// and SO_REUSEADDR (a restart must not wait for the previous run's connections in TIME-WAIT to
/// expire, which glommio's own `bind` does not allow).
pub fn bind_listener(addr: std::net::SocketAddr) -> std::io::Result<glommio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG_CONNECTIONS)?;
    let fd = socket.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up ownership of a bound, listening TCP socket; the glommio
    // listener takes it over and closes it.
    Ok(unsafe { glommio::net::TcpListener::from_raw_fd(fd) })
}
