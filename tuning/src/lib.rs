//! Reads host and kernel limits and checks them against a target number of sessions; plans and
//! (only when asked) applies sysctl, limits and IRQ affinity fixes.
//!
//! Every reader takes a root directory (`Host::new(root)`), "/" on a live host and a fixture
//! directory in tests. This crate uses no other crate of the workspace and no `unsafe`: rlimits
//! come from /proc/self/limits, the uid from /proc/self/status. Realtime scheduling is the
//! gateway's business.
//!
//! The gateway calls `check_host` at startup and logs `Report::warnings`; it may fail fast only
//! on `Report::refuses_to_start` (glommio's locked-memory floor, io_uring disabled).
#![forbid(unsafe_code)]

pub mod apply;
pub mod check;
pub mod host;
pub mod irq;
pub mod parse;
pub mod topology;

use std::path::PathBuf;

pub use check::{Check, HostFacts, Needs, Report, Role, Status, Summary, Target};
pub use host::Host;
pub use topology::{Cpu, Node, Topology};

/// Everything that can go wrong while reading or writing host files.
#[derive(Debug, thiserror::Error)]
pub enum TuningError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {what}")]
    Parse { path: PathBuf, what: String },
    #[error(
        "{action} needs root (effective uid {euid}): rerun with sudo, or pass --root DIR to \
         write under another directory"
    )]
    NotRoot { action: &'static str, euid: u32 },
    #[error("`sysctl -p {path}` failed: {detail}")]
    Sysctl { path: PathBuf, detail: String },
}

impl TuningError {
    /// A static label for metrics and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            TuningError::Read { .. } => "read",
            TuningError::Write { .. } => "write",
            TuningError::Parse { .. } => "parse",
            TuningError::NotRoot { .. } => "not_root",
            TuningError::Sysctl { .. } => "sysctl",
        }
    }
}

/// Checks the live host (and this process's own limits) against `target`. Never fails: an
/// unreadable value becomes a `warn` row.
pub fn check_host(target: &Target) -> Report {
    check::check(&Host::live(), target)
}

/// The live host's CPU topology; `Topology::numa_node_of(cpu)` gives a CPU's node.
pub fn cpu_topology() -> Topology {
    Topology::read(&Host::live())
}

/// The soft and hard RLIMIT_NOFILE of this process, read from /proc (no unsafe needed).
/// `u64::MAX` stands for "unlimited".
pub fn open_files_limit() -> Option<(u64, u64)> {
    let limits = Host::live().limits().ok()?.nofile?;
    Some((limits.soft, limits.hard))
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_limits() {
        let (soft, hard) = super::open_files_limit().expect("linux /proc/self/limits");
        assert!(soft <= hard);
        assert!(soft > 0);
    }
}
