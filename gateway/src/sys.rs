//! Operating-system calls outside the io_uring engine: raw file descriptors for handing a
//! connection to another shard's executor (task engine), and the allocator's and kernel's memory
//! controls. The product's other `unsafe` is in `uring.rs` (the ring, its buffer ring and the
//! driver's waker), each block with its SAFETY comment.

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

/// Sends what of `bytes` the socket takes now (`MSG_DONTWAIT`), with `MSG_MORE`: a tail shorter
/// than a segment stays in the socket until the next send without it or the shutdown of the
/// write side, which sends it with the FIN. For a connection's last bytes, right before its
/// shutdown (task engine). Returns the bytes taken (`WouldBlock` when none).
pub fn send_more(socket: &impl AsRawFd, bytes: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `bytes` is valid for reads of its length for the call; the descriptor is borrowed
    // from its owner for the call.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_MORE | libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
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
    /// mimalloc: sets an option (`mi_option_t`, a C enum, numbered as in mimalloc v3's header).
    fn mi_option_set(option: libc::c_int, value: libc::c_long);
    /// mimalloc: hands it `[start, start + size)` to allocate from, as one more arena.
    fn mi_manage_os_memory(
        start: *mut libc::c_void,
        size: usize,
        is_committed: bool,
        is_large: bool,
        is_zero: bool,
        numa_node: libc::c_int,
    ) -> bool;
}

/// `mi_option_allow_thp` in mimalloc v3 (the version `libmimalloc-sys` builds by default).
const MI_OPTION_ALLOW_THP: libc::c_int = 43;

/// What `apply_huge_pages` did, to log at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HugePages {
    /// Transparent huge pages are disabled for the process (`PR_SET_THP_DISABLE`).
    Off,
    /// A `bytes` arena advised `MADV_HUGEPAGE`; `host` is the kernel's THP setting.
    Thp { bytes: usize, host: String },
    /// `pages` reserved 2 MiB pages mapped as an allocator arena.
    Reserved { pages: usize },
    /// The host lacks what the mode needs: small pages, with the reason to warn about.
    Unavailable { reason: String },
}

/// The kernel's transparent huge page setting, e.g. `madvise` (the bracketed word of
/// `/sys/kernel/mm/transparent_hugepage/enabled`), or `None` when the kernel has no THP.
pub fn thp_host_setting() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_owned())
}

/// Free reserved huge pages of the default size (`HugePages_Free` in `/proc/meminfo`).
fn reserved_huge_pages_free() -> usize {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|line| line.strip_prefix("HugePages_Free:"))
                .and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Applies `huge_pages` (`off`, `thp` or `reserved`, validated by the config) to the allocator.
/// Call once at start, before the shards allocate. Never fails: a host without what the mode
/// needs gets `HugePages::Unavailable` and keeps small pages.
pub fn apply_huge_pages(mode: &str) -> HugePages {
    match mode {
        "thp" => match thp_host_setting() {
            Some(host) if host != "never" => {
                let bytes = shared::limits::HUGE_PAGES_THP_ARENA_BYTES;
                match map_arena(bytes, 0, libc::MADV_HUGEPAGE) {
                    Ok(()) => HugePages::Thp { bytes, host },
                    Err(e) => HugePages::Unavailable {
                        reason: format!("mapping a {bytes}-byte arena for THP failed: {e}"),
                    },
                }
            }
            host => HugePages::Unavailable {
                reason: format!(
                    "transparent huge pages are {} on this host \
                     (/sys/kernel/mm/transparent_hugepage/enabled)",
                    host.unwrap_or_else(|| "absent".into())
                ),
            },
        },
        "reserved" => {
            let free = reserved_huge_pages_free();
            let pages = free.min(shared::limits::HUGE_PAGES_RESERVED_PAGES_MAX);
            if pages == 0 {
                return HugePages::Unavailable {
                    reason: "the host has no free reserved huge pages (HugePages_Free in \
                             /proc/meminfo; reserve some with `sysctl vm.nr_hugepages=N`)"
                        .into(),
                };
            }
            match map_arena(
                pages * shared::limits::HUGE_PAGE_BYTES,
                libc::MAP_HUGETLB,
                0,
            ) {
                Ok(()) => HugePages::Reserved { pages },
                Err(e) => HugePages::Unavailable {
                    reason: format!("mapping {pages} reserved huge pages failed: {e}"),
                },
            }
        }
        _ => {
            // SAFETY: both calls take plain integers (the prctl's as the unsigned longs the
            // kernel reads); mimalloc's options are atomics, the prctl sets a flag of this process.
            let rc = unsafe {
                mi_option_set(MI_OPTION_ALLOW_THP, 0);
                let (on, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
                libc::prctl(libc::PR_SET_THP_DISABLE, on, zero, zero, zero)
            };
            if rc != 0 {
                return HugePages::Unavailable {
                    reason: format!(
                        "disabling transparent huge pages (PR_SET_THP_DISABLE) failed: {}",
                        std::io::Error::last_os_error()
                    ),
                };
            }
            HugePages::Off
        }
    }
}

/// Maps `bytes` of anonymous memory (with `extra_flags`, e.g. `MAP_HUGETLB`), advises it with
/// `advice` (0: none) and hands it to mimalloc as an arena it keeps for the life of the process.
fn map_arena(bytes: usize, extra_flags: libc::c_int, advice: libc::c_int) -> std::io::Result<()> {
    let large = extra_flags & libc::MAP_HUGETLB != 0;
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | extra_flags
        | if large { 0 } else { libc::MAP_NORESERVE };
    // SAFETY: an anonymous private mapping at an address of the kernel's choosing; nothing else
    // refers to it until mimalloc is given it below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `p..p + bytes` is the mapping made above.
    if advice != 0 && unsafe { libc::madvise(p, bytes, advice) } != 0 {
        let e = std::io::Error::last_os_error();
        // SAFETY: unmapping the mapping made above, not yet given to anyone.
        unsafe { libc::munmap(p, bytes) };
        return Err(e);
    }
    // SAFETY: the mapping is committed on demand (zeroed by the kernel), owned by nobody else,
    // and never unmapped: mimalloc owns it from here on. NUMA node -1: any.
    if !unsafe { mi_manage_os_memory(p, bytes, true, large, true, -1) } {
        // SAFETY: mimalloc refused it, so it is still ours to unmap.
        unsafe { libc::munmap(p, bytes) };
        return Err(std::io::Error::other("mimalloc refused the arena"));
    }
    Ok(())
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

/// Hands a bound std listener to glommio (the task engine's accept loop).
pub fn glommio_listener(listener: std::net::TcpListener) -> glommio::net::TcpListener {
    let fd = listener.into_raw_fd();
    // SAFETY: `into_raw_fd` gave up ownership of a bound, listening TCP socket; the glommio
    // listener takes it over and closes it.
    unsafe { glommio::net::TcpListener::from_raw_fd(fd) }
}

/// Binds a listener with SO_REUSEPORT (one per shard on the same port; the kernel spreads accepts)
/// and SO_REUSEADDR (a restart must not wait for the previous run's connections in TIME-WAIT to
/// expire, which glommio's own `bind` does not allow). TCP_NODELAY is set on it: accepted sockets
/// inherit it on Linux, so no per-connection call is needed. Not set, measured (README, "Segments
/// and syscalls per login"): TCP_QUICKACK = 0 (accepted sockets do not inherit it, and the
/// ClientHello it would keep from a pure ACK is usually in before the accept completes) and
/// TCP_DEFER_ACCEPT (no change in system CPU per login).
pub fn bind_listener_std(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG_CONNECTIONS)?;
    Ok(socket.into())
}

/// Wraps a socket descriptor this shard owns as a std stream (a handoff carries it).
pub fn socket_from_fd(fd: std::os::fd::RawFd) -> StdTcpStream {
    // SAFETY: the caller owns `fd`, an open connected TCP socket, and gives it up here.
    unsafe { StdTcpStream::from_raw_fd(fd) }
}

/// The IP address of the peer of connected socket `fd`, or `None` (`getpeername` failed: the
/// peer is gone). The descriptor stays its owner's.
pub fn peer_ip(fd: std::os::fd::RawFd) -> Option<std::net::IpAddr> {
    // SAFETY: `fd` is an open socket its owner keeps open for this call; `ManuallyDrop` keeps the
    // temporary stream from closing it.
    let stream = std::mem::ManuallyDrop::new(unsafe { StdTcpStream::from_raw_fd(fd) });
    stream.peer_addr().ok().map(|a| a.ip())
}
