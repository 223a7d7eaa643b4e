//! The host check: what a target of N sessions needs from the kernel and the process limits,
//! compared with what the host has. Reading (`HostFacts::read`) is split from judging
//! (`evaluate`) so the status logic runs on constructed inputs in tests. Nothing here changes
//! the host.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::host::Host;
use crate::irq::{self, Nic};
use crate::parse::{format_cpu_list, format_limit_value, human_bytes, Limit, MemInfo, UNLIMITED};
use crate::topology::{self, ShardPin, Topology};

/// Kernel memory per idle TCP session: socket, tcp_sock, file, inode and dentry slabs. Measured
/// at ~4.1 KiB per idle established socket (slabtop before/after opening 100k loopback sockets).
pub const KERNEL_BYTES_PER_SESSION_DEFAULT: u64 = 4_200;

/// Gateway heap per idle direct-TLS session (TLS keys, slab slot with the c2s machine, session
/// state): server RSS growth divided by sessions, measured with `scripts/bench-idle.sh` at 19,000
/// sessions on the 2-CPU dev box (1,200-1,274 B with the io_uring engine and lean TLS 1.3
/// sessions; 2,997 B with `io_engine = "tasks"`), rounded up. Override with
/// `--gateway-bytes-per-session` after measuring your build.
pub const GATEWAY_BYTES_PER_SESSION_DEFAULT: u64 = 1_500;

/// Descriptors beyond one per session: listeners, store files, io_uring rings, eventfds, logs.
pub const FD_HEADROOM: u64 = 4_096;

/// System-wide descriptors beyond the gateway's: sshd, journald, the rest of the box.
pub const SYSTEM_FD_HEADROOM: u64 = 65_536;

/// After a restart or a network blip, 1/64 of all sessions may reconnect within one accept
/// round; the accept and SYN queues and the per-CPU backlog are sized for that burst.
pub const RECONNECT_BURST_DIVISOR: u64 = 64;
/// The kernel's somaxconn default since 5.4; never propose less.
pub const ACCEPT_BACKLOG_MIN: u64 = 4_096;
/// The largest backlog we propose: a deeper queue only delays the timeouts clients see.
pub const ACCEPT_BACKLOG_MAX: u64 = 65_536;
/// The kernel's netdev_max_backlog default.
pub const NETDEV_BACKLOG_MIN: u64 = 1_000;

/// tcp_mem counts pages of socket buffer memory. 4 KiB on x86_64 and on the arm64 distributions
/// we run; tuning reads no page size because that needs sysconf (unsafe libc).
pub const TCP_MEM_PAGE_BYTES: u64 = 4_096;
/// An idle session with one small stanza in flight holds one page (SK_MEM_QUANTUM) of buffer.
pub const TCP_PAGES_PER_SESSION: u64 = 1;

/// From this many sessions on, socket buffer defaults matter: a 128 KiB rmem default lets a
/// burst commit N x 128 KiB before tcp_mem pressure reins it in.
pub const LARGE_TARGET_SESSIONS: u64 = 100_000;
/// The default socket buffer we propose for large targets: 16 KiB holds a typical stanza burst,
/// and autotuning still grows busy sockets up to the maximum.
pub const TCP_BUFFER_DEFAULT_BYTES_MAX: u64 = 16_384;
/// The minimum socket buffer the kernel guarantees under pressure; one page.
pub const TCP_BUFFER_MIN_BYTES_MAX: u64 = 4_096;

/// Session memory may use this share of usable RAM; the rest is page cache, handshakes in
/// flight, the kernel and the store.
pub const MEMORY_BUDGET_PERCENT: u64 = 75;

/// glommio locks memory for its io_uring rings and refuses to start below this (soft
/// RLIMIT_MEMLOCK).
pub const MEMLOCK_FLOOR_BYTES: u64 = 512 * 1024;
/// Enough locked memory for the rings and registered buffers of every executor.
pub const MEMLOCK_WANTED_BYTES: u64 = 8 * 1024 * 1024;

/// The kernel's vm.max_map_count default.
pub const MAP_COUNT_DEFAULT: u64 = 65_530;
/// Upper estimate of heap per memory map when the allocator fragments (mimalloc and glibc both
/// fall back to separate mappings): the gateway heap divided by this is the map count needed.
pub const HEAP_BYTES_PER_MAP: u64 = 64 * 1024;

/// Conntrack entries linger after a close (TIME_WAIT is tracked for 120 s), so reconnect storms
/// need room above one entry per session.
pub const CONNTRACK_HEADROOM_PERCENT: u64 = 25;

/// The widest usable ephemeral port range: below 1024 are privileged ports.
pub const PORT_RANGE_WIDE: (u64, u64) = (1_024, 65_535);

/// Which side of the load test this box is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The gateway: accepts N sessions.
    #[default]
    Server,
    /// The load generator against a gateway on this box's loopback: both ends of every session
    /// live here (two sockets, two descriptors), and clients need source ports.
    Bench,
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "server" => Ok(Role::Server),
            "bench" => Ok(Role::Bench),
            other => Err(format!("unknown role {other:?} (server or bench)")),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Bench => "bench",
        })
    }
}

/// What the host must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Target {
    /// Concurrent sessions (TCP connections to the gateway).
    pub connections: u64,
    /// Shards; `None`: one per CPU of the affinity mask, like the gateway.
    pub shards: Option<usize>,
    pub role: Role,
    /// Default `KERNEL_BYTES_PER_SESSION_DEFAULT`.
    pub kernel_bytes_per_session: u64,
    /// Default `GATEWAY_BYTES_PER_SESSION_DEFAULT`.
    pub gateway_bytes_per_session: u64,
}

impl Target {
    /// A server target of `connections` sessions with the measured per-session defaults.
    pub fn new(connections: u64) -> Self {
        Self {
            connections,
            shards: None,
            role: Role::Server,
            kernel_bytes_per_session: KERNEL_BYTES_PER_SESSION_DEFAULT,
            gateway_bytes_per_session: GATEWAY_BYTES_PER_SESSION_DEFAULT,
        }
    }

    /// The same target with a shard count.
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// Sockets on this box per session: two when both ends are here (bench on loopback).
    fn sockets_per_session(&self) -> u64 {
        match self.role {
            Role::Server => 1,
            Role::Bench => 2,
        }
    }
}

/// The values a target needs, shared by `check` and `apply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Needs {
    /// RLIMIT_NOFILE, soft and hard, of the process holding the sessions.
    pub nofile: u64,
    /// fs.nr_open caps RLIMIT_NOFILE's hard limit.
    pub nr_open: u64,
    pub file_max: u64,
    /// net.core.somaxconn and net.ipv4.tcp_max_syn_backlog.
    pub accept_backlog: u64,
    pub netdev_backlog: u64,
    /// Socket buffer pages (tcp_mem units) with one page per socket in flight.
    pub tcp_mem_pages: u64,
    /// Session memory: N x (sockets x kernel bytes + gateway bytes).
    pub memory_bytes: u64,
    pub max_map_count: u64,
    /// nf_conntrack_max when conntrack is loaded.
    pub conntrack: u64,
}

impl Needs {
    /// What `target` needs.
    pub fn for_target(target: &Target) -> Self {
        let n = target.connections;
        let sockets = n.saturating_mul(target.sockets_per_session());
        let nofile = n.saturating_add(FD_HEADROOM);
        let burst = (n / RECONNECT_BURST_DIVISOR).max(1).next_power_of_two();
        let gateway_heap = n.saturating_mul(target.gateway_bytes_per_session);
        Self {
            nofile,
            nr_open: nofile,
            file_max: sockets
                .saturating_add(FD_HEADROOM)
                .saturating_add(SYSTEM_FD_HEADROOM),
            accept_backlog: burst.clamp(ACCEPT_BACKLOG_MIN, ACCEPT_BACKLOG_MAX),
            netdev_backlog: burst.clamp(NETDEV_BACKLOG_MIN, ACCEPT_BACKLOG_MAX),
            tcp_mem_pages: sockets.saturating_mul(TCP_PAGES_PER_SESSION),
            memory_bytes: sockets
                .saturating_mul(target.kernel_bytes_per_session)
                .saturating_add(gateway_heap),
            max_map_count: (gateway_heap / HEAP_BYTES_PER_MAP).max(MAP_COUNT_DEFAULT),
            conntrack: n.saturating_add(n / 100 * CONNTRACK_HEADROOM_PERCENT),
        }
    }

    /// The tcp_mem triple (low, pressure, high) we propose: never below the current values, and
    /// pressure above what N sockets with one page in flight hold.
    pub fn tcp_mem(&self, current: Option<[u64; 3]>) -> [u64; 3] {
        let c = current.unwrap_or([0; 3]);
        let p = self.tcp_mem_pages;
        [
            c[0].max(p),
            c[1].max(p.saturating_add(p / 2)),
            c[2].max(p.saturating_mul(2)),
        ]
    }

    /// The ephemeral source addresses a bench needs with `ports` ports per address.
    pub fn source_addresses(connections: u64, ports: u64) -> u64 {
        connections.div_ceil(ports.max(1)).max(1)
    }
}

/// A sysctl buffer triple (tcp_rmem, tcp_wmem) proposed for `target`: small minimum and default
/// for large targets, the maximum kept.
pub fn tcp_buffer_proposal(target: &Target, current: [u64; 3]) -> [u64; 3] {
    if target.connections < LARGE_TARGET_SESSIONS {
        return current;
    }
    [
        current[0].min(TCP_BUFFER_MIN_BYTES_MAX),
        current[1].min(TCP_BUFFER_DEFAULT_BYTES_MAX),
        current[2],
    ]
}

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, but worse than it could (slower reconnects, more memory, cross-node traffic).
    Warn,
    /// The target cannot be reached (or the process cannot start) until this is fixed.
    Blocks,
}

impl Status {
    /// The word printed in the table and the JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Blocks => "blocks",
        }
    }
}

/// One row: what, current value, value needed, status, and the command or line that fixes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: String,
    pub current: String,
    pub needed: String,
    pub status: Status,
    pub fix: String,
}

/// Everything `evaluate` judges, read from one host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostFacts {
    pub nofile: Option<Limit>,
    pub memlock: Option<Limit>,
    pub nr_open: Option<u64>,
    pub file_max: Option<u64>,
    pub somaxconn: Option<u64>,
    pub tcp_max_syn_backlog: Option<u64>,
    pub netdev_max_backlog: Option<u64>,
    pub ip_local_port_range: Option<(u64, u64)>,
    pub tcp_mem: Option<[u64; 3]>,
    pub tcp_rmem: Option<[u64; 3]>,
    pub tcp_wmem: Option<[u64; 3]>,
    /// net.ipv4.tcp_ehash_entries (kernel 6.1+; read-only, sized at boot).
    pub tcp_ehash_entries: Option<u64>,
    pub meminfo: Option<MemInfo>,
    pub transparent_hugepages: Option<String>,
    /// `None`: the file is absent (kernel before 6.6), io_uring is allowed.
    pub io_uring_disabled: Option<u64>,
    pub max_map_count: Option<u64>,
    /// `None`: nf_conntrack is not loaded.
    pub conntrack: Option<Conntrack>,
    pub topology: Topology,
    pub nics: Vec<Nic>,
}

/// nf_conntrack's table limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Conntrack {
    pub max: Option<u64>,
    /// /sys/module/nf_conntrack/parameters/hashsize: buckets of the table.
    pub hashsize: Option<u64>,
}

fn triple(v: Vec<u64>) -> Option<[u64; 3]> {
    v.try_into().ok()
}

impl HostFacts {
    /// Reads every fact from `host`; an unreadable one stays `None` and its check warns.
    pub fn read(host: &Host) -> Self {
        let limits = host.limits().unwrap_or_default();
        let num = |key: &str| host.sysctl_u64(key).ok();
        let nums = |key: &str| host.sysctl_numbers(key).ok();
        let conntrack_loaded = host.module_loaded("nf_conntrack")
            || host.exists(&Host::sysctl_path("net.netfilter.nf_conntrack_max"));
        Self {
            nofile: limits.nofile,
            memlock: limits.memlock,
            nr_open: num("fs.nr_open"),
            file_max: num("fs.file-max"),
            somaxconn: num("net.core.somaxconn"),
            tcp_max_syn_backlog: num("net.ipv4.tcp_max_syn_backlog"),
            netdev_max_backlog: num("net.core.netdev_max_backlog"),
            ip_local_port_range: nums("net.ipv4.ip_local_port_range").and_then(|v| match v[..] {
                [a, b] => Some((a, b)),
                _ => None,
            }),
            tcp_mem: nums("net.ipv4.tcp_mem").and_then(triple),
            tcp_rmem: nums("net.ipv4.tcp_rmem").and_then(triple),
            tcp_wmem: nums("net.ipv4.tcp_wmem").and_then(triple),
            tcp_ehash_entries: num("net.ipv4.tcp_ehash_entries"),
            meminfo: host.meminfo().ok(),
            transparent_hugepages: host.transparent_hugepages().ok(),
            io_uring_disabled: num("kernel.io_uring_disabled"),
            max_map_count: num("vm.max_map_count"),
            conntrack: conntrack_loaded.then(|| Conntrack {
                max: num("net.netfilter.nf_conntrack_max"),
                hashsize: host
                    .read("/sys/module/nf_conntrack/parameters/hashsize")
                    .ok()
                    .and_then(|t| t.trim().parse().ok()),
            }),
            topology: Topology::read(host),
            nics: irq::read_nics(host),
        }
    }
}

const UNREADABLE: &str = "unreadable";

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| UNREADABLE.to_string(), |v| v.to_string())
}

fn show3(v: Option<[u64; 3]>) -> String {
    v.map_or_else(
        || UNREADABLE.to_string(),
        |[a, b, c]| format!("{a} {b} {c}"),
    )
}

/// `sysctl -w key=value`, quoting values with spaces.
pub fn sysctl_fix(key: &str, value: &str) -> String {
    if value.contains(' ') {
        format!("sysctl -w {key}=\"{value}\"")
    } else {
        format!("sysctl -w {key}={value}")
    }
}

/// Ok when `current >= needed`, else `below`; unreadable warns.
fn at_least(current: Option<u64>, needed: u64, below: Status) -> Status {
    match current {
        None => Status::Warn,
        Some(c) if c >= needed => Status::Ok,
        Some(_) => below,
    }
}

fn row(name: &str, current: String, needed: String, status: Status, fix: String) -> Check {
    Check {
        name: name.to_string(),
        current,
        needed,
        status,
        fix: if status == Status::Ok {
            "-".to_string()
        } else {
            fix
        },
    }
}

fn sysctl_row(key: &str, current: Option<u64>, needed: u64, below: Status) -> Check {
    row(
        key,
        show(current),
        format!(">= {needed}"),
        at_least(current, needed, below),
        format!(
            "{} (persist: tuning apply)",
            sysctl_fix(key, &needed.to_string())
        ),
    )
}

/// Judges `facts` against `target`: one row per check, in a fixed order.
pub fn evaluate(facts: &HostFacts, target: &Target) -> Vec<Check> {
    let needs = Needs::for_target(target);
    let n = target.connections;
    let mut rows = Vec::new();

    // Descriptors: one per session; the hard limit caps what the process may raise itself to,
    // and fs.nr_open caps the hard limit.
    let nofile_fix = format!(
        "LimitNOFILE={} in gateway.service; shells: `ulimit -n {}` or tuning apply \
         (limits.d)",
        needs.nofile, needs.nofile
    );
    let (soft, hard) = (facts.nofile.map(|l| l.soft), facts.nofile.map(|l| l.hard));
    let soft_status = match (soft, hard) {
        (Some(s), _) if s >= needs.nofile => Status::Ok,
        (Some(_), Some(h)) if h >= needs.nofile => Status::Warn,
        (Some(_), _) => Status::Blocks,
        (None, _) => Status::Warn,
    };
    rows.push(row(
        "RLIMIT_NOFILE soft",
        soft.map_or_else(|| UNREADABLE.to_string(), format_limit_value),
        format!(">= {}", needs.nofile),
        soft_status,
        nofile_fix.clone(),
    ));
    rows.push(row(
        "RLIMIT_NOFILE hard",
        hard.map_or_else(|| UNREADABLE.to_string(), format_limit_value),
        format!(">= {}", needs.nofile),
        at_least(hard, needs.nofile, Status::Blocks),
        nofile_fix,
    ));
    rows.push(sysctl_row(
        "fs.nr_open",
        facts.nr_open,
        needs.nr_open,
        Status::Blocks,
    ));
    rows.push(sysctl_row(
        "fs.file-max",
        facts.file_max,
        needs.file_max,
        Status::Blocks,
    ));

    // Queues: short ones only slow reconnect storms down (SYN retries after 1 s, 3 s, ...).
    rows.push(sysctl_row(
        "net.core.somaxconn",
        facts.somaxconn,
        needs.accept_backlog,
        Status::Warn,
    ));
    rows.push(sysctl_row(
        "net.ipv4.tcp_max_syn_backlog",
        facts.tcp_max_syn_backlog,
        needs.accept_backlog,
        Status::Warn,
    ));
    rows.push(sysctl_row(
        "net.core.netdev_max_backlog",
        facts.netdev_max_backlog,
        needs.netdev_backlog,
        Status::Warn,
    ));

    // Ports: only connecting clients use ephemeral ports; each (source address, port) pair
    // carries one session to the gateway's one address and port.
    let range = facts.ip_local_port_range;
    let ports = range.map(|(a, b)| (b + 1).saturating_sub(a));
    let wide = format!("{} {}", PORT_RANGE_WIDE.0, PORT_RANGE_WIDE.1);
    let range_text = range.map_or_else(
        || UNREADABLE.to_string(),
        |(a, b)| format!("{a} {b} ({} ports)", (b + 1).saturating_sub(a)),
    );
    match target.role {
        Role::Server => rows.push(row(
            "net.ipv4.ip_local_port_range",
            range_text,
            "any (the server only accepts)".to_string(),
            Status::Ok,
            String::new(),
        )),
        Role::Bench => {
            let wide_ports = PORT_RANGE_WIDE.1 + 1 - PORT_RANGE_WIDE.0;
            let status = match ports {
                None => Status::Warn,
                Some(p) if p >= n || p >= wide_ports => Status::Ok,
                Some(_) => Status::Warn,
            };
            rows.push(row(
                "net.ipv4.ip_local_port_range",
                range_text,
                if n <= ports.unwrap_or(0) {
                    format!(">= {n} ports")
                } else {
                    wide.clone()
                },
                status,
                format!(
                    "{} (fewer source addresses needed)",
                    sysctl_fix("net.ipv4.ip_local_port_range", &wide)
                ),
            ));
            let per_address = ports.unwrap_or(1);
            let addresses = Needs::source_addresses(n, per_address);
            let last = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(127, 0, 0, 0))
                    .saturating_add(addresses.min(1 << 24) as u32),
            );
            rows.push(Check {
                name: "loopback source addresses".to_string(),
                current: format!("{per_address} ports per address"),
                needed: format!("{addresses} address(es)"),
                // All of 127.0.0.0/8 answers on `lo` already; the bench only has to use them.
                status: Status::Ok,
                fix: format!("bench --source-ips 127.0.0.1-{last}"),
            });
        }
    }

    // Socket buffer memory.
    let proposed_mem = needs.tcp_mem(facts.tcp_mem);
    let tcp_mem_status = match facts.tcp_mem {
        None => Status::Warn,
        Some([_, pressure, _]) if pressure >= needs.tcp_mem_pages => Status::Ok,
        Some(_) => Status::Warn,
    };
    rows.push(row(
        "net.ipv4.tcp_mem",
        show3(facts.tcp_mem),
        format!(
            "pressure >= {} pages ({} x {} page)",
            needs.tcp_mem_pages,
            n.saturating_mul(target.sockets_per_session()),
            human_bytes(TCP_PAGES_PER_SESSION * TCP_MEM_PAGE_BYTES)
        ),
        tcp_mem_status,
        format!(
            "{} (persist: tuning apply)",
            sysctl_fix("net.ipv4.tcp_mem", &show3(Some(proposed_mem)))
        ),
    ));
    for (key, current) in [
        ("net.ipv4.tcp_rmem", facts.tcp_rmem),
        ("net.ipv4.tcp_wmem", facts.tcp_wmem),
    ] {
        let Some(cur) = current else {
            rows.push(row(
                key,
                UNREADABLE.to_string(),
                "readable".to_string(),
                Status::Warn,
                format!("check /proc/sys/{}", key.replace('.', "/")),
            ));
            continue;
        };
        let proposed = tcp_buffer_proposal(target, cur);
        let burst = n.saturating_mul(cur[1]);
        rows.push(row(
            key,
            format!(
                "{} (N x default = {})",
                show3(Some(cur)),
                human_bytes(burst)
            ),
            if proposed == cur {
                format!("{} (kept)", show3(Some(cur)))
            } else {
                format!(
                    "min <= {TCP_BUFFER_MIN_BYTES_MAX}, default <= {TCP_BUFFER_DEFAULT_BYTES_MAX}"
                )
            },
            if proposed == cur {
                Status::Ok
            } else {
                Status::Warn
            },
            format!(
                "{} (persist: tuning apply)",
                sysctl_fix(key, &show3(Some(proposed)))
            ),
        ));
    }
    if let Some(ehash) = facts.tcp_ehash_entries {
        let want = n.max(1).next_power_of_two();
        rows.push(row(
            "net.ipv4.tcp_ehash_entries",
            ehash.to_string(),
            format!(">= {n} (one bucket per session)"),
            if ehash >= n { Status::Ok } else { Status::Warn },
            format!("boot parameter thash_entries={want} (sized at boot; reboot)"),
        ));
    }

    // Session memory against RAM.
    match facts.meminfo {
        None => rows.push(row(
            "memory",
            UNREADABLE.to_string(),
            human_bytes(needs.memory_bytes),
            Status::Warn,
            "check /proc/meminfo".to_string(),
        )),
        Some(mem) => {
            let usable = mem
                .mem_total_bytes
                .saturating_sub(mem.hugetlb_reserved_bytes());
            let budget = usable / 100 * MEMORY_BUDGET_PERCENT;
            let per_session = target
                .kernel_bytes_per_session
                .saturating_mul(target.sockets_per_session())
                .saturating_add(target.gateway_bytes_per_session);
            let status = if needs.memory_bytes > usable {
                Status::Blocks
            } else if needs.memory_bytes > budget {
                Status::Warn
            } else {
                Status::Ok
            };
            rows.push(row(
                "memory",
                format!(
                    "{} usable ({} hugetlb reserved)",
                    human_bytes(usable),
                    human_bytes(mem.hugetlb_reserved_bytes())
                ),
                format!(
                    "{} = {n} x {per_session} B (<= {MEMORY_BUDGET_PERCENT}%)",
                    human_bytes(needs.memory_bytes)
                ),
                status,
                format!(
                    "this box fits ~{} sessions at {MEMORY_BUDGET_PERCENT}%: add RAM, lower \
                     --connections, or measure --gateway-bytes-per-session \
                     (scripts/measure_sessions.py)",
                    budget / per_session.max(1)
                ),
            ));
        }
    }
    let thp = facts.transparent_hugepages.as_deref();
    rows.push(row(
        "transparent hugepages",
        thp.unwrap_or(UNREADABLE).to_string(),
        "madvise or always".to_string(),
        match thp {
            Some("madvise") | Some("always") => Status::Ok,
            _ => Status::Warn,
        },
        "echo madvise > /sys/kernel/mm/transparent_hugepage/enabled; boot parameter \
         transparent_hugepage=madvise"
            .to_string(),
    ));
    if let Some(mem) = facts.meminfo {
        rows.push(row(
            "hugepages",
            format!(
                "total {}, free {} ({} each)",
                mem.hugepages_total,
                mem.hugepages_free,
                human_bytes(mem.hugepage_bytes)
            ),
            "none required (reserved ones are taken from the memory row)".to_string(),
            Status::Ok,
            String::new(),
        ));
    }

    // What stops glommio from starting at all.
    let memlock = facts.memlock.map(|l| l.soft);
    rows.push(row(
        "RLIMIT_MEMLOCK",
        memlock.map_or_else(|| UNREADABLE.to_string(), format_limit_value),
        format!(
            ">= {} (glommio refuses below {})",
            human_bytes(MEMLOCK_WANTED_BYTES),
            human_bytes(MEMLOCK_FLOOR_BYTES)
        ),
        match memlock {
            None => Status::Warn,
            Some(m) if m == UNLIMITED || m >= MEMLOCK_WANTED_BYTES => Status::Ok,
            Some(m) if m >= MEMLOCK_FLOOR_BYTES => Status::Warn,
            Some(_) => Status::Blocks,
        },
        "LimitMEMLOCK=infinity in gateway.service; shells: `ulimit -l unlimited` or tuning \
         apply (limits.d)"
            .to_string(),
    ));
    rows.push(row(
        "kernel.io_uring_disabled",
        facts.io_uring_disabled.map_or_else(
            || "absent (io_uring allowed)".to_string(),
            |v| v.to_string(),
        ),
        "0".to_string(),
        match facts.io_uring_disabled {
            None | Some(0) => Status::Ok,
            Some(_) => Status::Blocks,
        },
        format!(
            "{} (persist: tuning apply)",
            sysctl_fix("kernel.io_uring_disabled", "0")
        ),
    ));
    rows.push(sysctl_row(
        "vm.max_map_count",
        facts.max_map_count,
        needs.max_map_count,
        Status::Warn,
    ));
    match facts.conntrack {
        None => rows.push(row(
            "net.netfilter.nf_conntrack_max",
            "nf_conntrack not loaded".to_string(),
            "-".to_string(),
            Status::Ok,
            String::new(),
        )),
        Some(ct) => {
            let status = match ct.max {
                None => Status::Warn,
                Some(m) if m >= needs.conntrack => Status::Ok,
                Some(m) if m >= n => Status::Warn,
                Some(_) => Status::Blocks,
            };
            rows.push(row(
                "net.netfilter.nf_conntrack_max",
                show(ct.max),
                format!(">= {} (N + {CONNTRACK_HEADROOM_PERCENT}%)", needs.conntrack),
                status,
                format!(
                    "{} and hashsize {} (tuning apply), or skip tracking: `tcp dport 5222 \
                     notrack` in an nft chain at hook prerouting priority raw",
                    sysctl_fix(
                        "net.netfilter.nf_conntrack_max",
                        &needs.conntrack.to_string()
                    ),
                    conntrack_hashsize(needs.conntrack)
                ),
            ));
        }
    }

    // Where the shards run.
    let topo = &facts.topology;
    let plan = topology::shard_plan(topo, target.shards);
    let allowed = topo.allowed.len().max(1);
    rows.push(row(
        "cpu topology",
        topo.describe(),
        format!("{} shard(s), one CPU each", plan.len()),
        if plan.len() > allowed {
            Status::Warn
        } else {
            Status::Ok
        },
        format!("--shards {allowed} or widen the affinity (CPUAffinity= in the unit)"),
    ));
    rows.push(shard_row(topo, &plan));

    // NIC queues and their IRQs.
    let shard_cpus: Vec<usize> = plan.iter().map(|p| p.cpu).collect();
    let plans = irq::plan(topo, &facts.nics, &shard_cpus);
    for (nic, p) in facts.nics.iter().zip(&plans) {
        let mut current_cpus: Vec<usize> = nic
            .irqs
            .iter()
            .flat_map(|q| q.affinity.clone().unwrap_or_default())
            .collect();
        current_cpus.sort_unstable();
        current_cpus.dedup();
        let mut planned: Vec<usize> = p.irqs.iter().map(|m| m.cpu).collect();
        planned.sort_unstable();
        planned.dedup();
        let node = nic
            .numa_node
            .map_or_else(|| "-".to_string(), |n| n.to_string());
        let in_place = p.in_place(nic) && !nic.irqs.is_empty();
        rows.push(row(
            &format!("nic {}", nic.name),
            format!(
                "{} rx/{} tx queues, node {node}, {} queue irqs on cpus {}",
                nic.rx_queues,
                nic.tx_queues,
                nic.irqs.len(),
                format_cpu_list(&current_cpus)
            ),
            format!("irqs on shard cpus {}", format_cpu_list(&planned)),
            if in_place { Status::Ok } else { Status::Warn },
            format!(
                "tuning irq --shards {} --write; systemctl disable --now irqbalance",
                plan.len()
            ),
        ));
    }
    rows
}

/// nf_conntrack hash buckets we propose: a quarter of the table, as the kernel's own default
/// ratio (nf_conntrack_max = 4 x hashsize on 64-bit).
pub fn conntrack_hashsize(conntrack_max: u64) -> u64 {
    (conntrack_max / 4).max(1).next_power_of_two()
}

fn shard_row(topo: &Topology, plan: &[ShardPin]) -> Check {
    let cpus: Vec<usize> = plan.iter().map(|p| p.cpu).collect();
    let mut distinct = cpus.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let shared_cpu = distinct.len() < cpus.len();
    // Two shards on SMT siblings of one core while another core sits idle halve each other.
    let cores_used: Vec<(u32, u32)> = {
        let mut c: Vec<(u32, u32)> = distinct
            .iter()
            .filter_map(|&cpu| topo.cpu(cpu).map(|c| (c.package, c.core)))
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let allowed_cores = {
        let mut c: Vec<(u32, u32)> = topo
            .allowed
            .iter()
            .filter_map(|&cpu| topo.cpu(cpu).map(|c| (c.package, c.core)))
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    let siblings_doubled = cores_used.len() < distinct.len()
        && cores_used.len() < allowed_cores.len()
        && topo.cpu(distinct[0]).is_some();
    let mut per_node: Vec<String> = Vec::new();
    for node in &topo.nodes {
        let count = plan.iter().filter(|p| p.node == Some(node.id)).count();
        if count > 0 {
            per_node.push(format!("node {}: {count}", node.id));
        }
    }
    let physical_first: Vec<usize> = {
        let mut cpus = topo.allowed.clone();
        cpus.sort_by_key(|&c| (topo.sibling_rank(c), c));
        cpus.truncate(plan.len());
        cpus
    };
    row(
        "shard pinning",
        format!(
            "{} shard(s) on cpus {}{}",
            plan.len(),
            format_cpu_list(&cpus),
            if per_node.is_empty() {
                String::new()
            } else {
                format!(" ({})", per_node.join(", "))
            }
        ),
        "one shard per physical core first".to_string(),
        if shared_cpu || siblings_doubled {
            Status::Warn
        } else {
            Status::Ok
        },
        format!(
            "gateway.toml: cpus = [{}]",
            physical_first
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// How many checks ended in each status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Summary {
    pub ok: usize,
    pub warn: usize,
    pub blocks: usize,
}

/// The target as reported, with the session memory it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TargetReport {
    #[serde(flatten)]
    pub target: Target,
    pub shards_planned: usize,
    pub memory_bytes_needed: u64,
}

/// The topology as reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TopologyReport {
    pub sockets: usize,
    pub numa_nodes: usize,
    pub cpus: usize,
    pub physical_cores: usize,
    pub smt: bool,
    pub allowed: String,
    pub nodes: Vec<crate::topology::Node>,
    pub shards: Vec<ShardPin>,
    pub nics: Vec<Nic>,
}

/// The whole check: serializes to the `--json` shape
/// `{"target", "checks": [{"name","current","needed","status","fix"}], "topology", "summary"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub target: TargetReport,
    pub checks: Vec<Check>,
    pub topology: TopologyReport,
    pub summary: Summary,
}

impl Report {
    /// Judges `facts` against `target`.
    pub fn new(facts: &HostFacts, target: &Target) -> Self {
        let checks = evaluate(facts, target);
        let mut summary = Summary::default();
        for c in &checks {
            match c.status {
                Status::Ok => summary.ok += 1,
                Status::Warn => summary.warn += 1,
                Status::Blocks => summary.blocks += 1,
            }
        }
        let topo = &facts.topology;
        let shards = topology::shard_plan(topo, target.shards);
        Self {
            target: TargetReport {
                target: *target,
                shards_planned: shards.len(),
                memory_bytes_needed: Needs::for_target(target).memory_bytes,
            },
            checks,
            topology: TopologyReport {
                sockets: topo.sockets(),
                numa_nodes: topo.numa_nodes(),
                cpus: topo.cpus.len(),
                physical_cores: topo.physical_cores().len(),
                smt: topo.smt(),
                allowed: format_cpu_list(&topo.allowed),
                nodes: topo.nodes.clone(),
                shards,
                nics: facts.nics.clone(),
            },
            summary,
        }
    }

    /// The worst status.
    pub fn status(&self) -> Status {
        self.checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Status::Ok)
    }

    /// The process exit status: 0 ready, 1 warnings only, 2 something blocks the target.
    pub fn exit_code(&self) -> i32 {
        match self.status() {
            Status::Ok => 0,
            Status::Warn => 1,
            Status::Blocks => 2,
        }
    }

    /// The rows that are not ok, as (name, current, needed, fix), for the gateway to log at
    /// startup. Never fatal by itself: see `refuses_to_start` for the ones that are.
    pub fn warnings(&self) -> Vec<(&str, &str, &str, &str)> {
        self.checks
            .iter()
            .filter(|c| c.status != Status::Ok)
            .map(|c| {
                (
                    c.name.as_str(),
                    c.current.as_str(),
                    c.needed.as_str(),
                    c.fix.as_str(),
                )
            })
            .collect()
    }

    /// The blocking rows that stop glommio from starting at all (locked-memory floor, io_uring
    /// disabled), as opposed to ones that only cap the session count. The gateway may fail fast
    /// on these with the row's fix; everything else it should only warn about.
    pub fn refuses_to_start(&self) -> Vec<&Check> {
        self.checks
            .iter()
            .filter(|c| {
                c.status == Status::Blocks
                    && matches!(
                        c.name.as_str(),
                        "RLIMIT_MEMLOCK" | "kernel.io_uring_disabled"
                    )
            })
            .collect()
    }

    /// The aligned table for people.
    pub fn table(&self) -> String {
        let headers = ["CHECK", "CURRENT", "NEEDED", "STATUS", "FIX"];
        let cells: Vec<[&str; 5]> = self
            .checks
            .iter()
            .map(|c| {
                [
                    c.name.as_str(),
                    c.current.as_str(),
                    c.needed.as_str(),
                    c.status.as_str(),
                    c.fix.as_str(),
                ]
            })
            .collect();
        let mut widths = headers.map(str::len);
        for row in &cells {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&headers).chain(&cells) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 == row.len() {
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    let pad = widths[i] - cell.chars().count() + 2;
                    line.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out.push_str(&format!(
            "\n{} ok, {} warn, {} blocks: {}\n",
            self.summary.ok,
            self.summary.warn,
            self.summary.blocks,
            match self.status() {
                Status::Ok => "ready",
                Status::Warn => "works, with warnings",
                Status::Blocks => "the target is blocked",
            }
        ));
        out
    }
}

/// Checks `host` against `target`.
pub fn check(host: &Host, target: &Target) -> Report {
    Report::new(&HostFacts::read(host), target)
}
