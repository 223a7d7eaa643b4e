//! Reads one host's /proc and /sys under a root directory: "/" for the live host, a fixture
//! directory in tests. Readers only read; the writers live in `apply` and `irq`.

use std::path::{Path, PathBuf};

use crate::parse::{self, Limits, MemInfo, ProcStatus};
use crate::TuningError;

/// A host's /proc and /sys, found under `root`.
#[derive(Debug, Clone)]
pub struct Host {
    root: PathBuf,
}

impl Host {
    /// The host whose files live under `root` (`root/proc/...`, `root/sys/...`).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The live host: root "/".
    pub fn live() -> Self {
        Self::new("/")
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this is the live host (root is "/"), where writes change the running kernel.
    pub fn is_live(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `abs` (an absolute path such as "/proc/meminfo") under the root.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// Reads a text file under the root.
    pub fn read(&self, abs: &str) -> Result<String, TuningError> {
        let path = self.path(abs);
        std::fs::read_to_string(&path).map_err(|source| TuningError::Read { path, source })
    }

    /// Whether a file or directory exists under the root.
    pub fn exists(&self, abs: &str) -> bool {
        self.path(abs).exists()
    }

    /// The /proc/sys file of a sysctl key: "net.core.somaxconn" -> "/proc/sys/net/core/somaxconn".
    pub fn sysctl_path(key: &str) -> String {
        format!("/proc/sys/{}", key.replace('.', "/"))
    }

    /// A sysctl value with its whitespace collapsed to single spaces ("32768 60999").
    pub fn sysctl(&self, key: &str) -> Result<String, TuningError> {
        let text = self.read(&Self::sysctl_path(key))?;
        Ok(text.split_whitespace().collect::<Vec<_>>().join(" "))
    }

    /// A sysctl value as numbers.
    pub fn sysctl_numbers(&self, key: &str) -> Result<Vec<u64>, TuningError> {
        let text = self.sysctl(key)?;
        parse::parse_numbers(&text).ok_or_else(|| TuningError::Parse {
            path: self.path(&Self::sysctl_path(key)),
            what: format!("expected numbers, found {text:?}"),
        })
    }

    /// A single-number sysctl value.
    pub fn sysctl_u64(&self, key: &str) -> Result<u64, TuningError> {
        let numbers = self.sysctl_numbers(key)?;
        match numbers.as_slice() {
            [n] => Ok(*n),
            _ => Err(TuningError::Parse {
                path: self.path(&Self::sysctl_path(key)),
                what: format!("expected one number, found {numbers:?}"),
            }),
        }
    }

    /// This process's rlimits (/proc/self/limits). Under systemd the unit's Limit* settings apply
    /// to the service instead, so a check run from a shell reports the shell's limits.
    pub fn limits(&self) -> Result<Limits, TuningError> {
        Ok(parse::parse_limits(&self.read("/proc/self/limits")?))
    }

    /// /proc/meminfo.
    pub fn meminfo(&self) -> Result<MemInfo, TuningError> {
        let text = self.read("/proc/meminfo")?;
        parse::parse_meminfo(&text).ok_or_else(|| TuningError::Parse {
            path: self.path("/proc/meminfo"),
            what: "no MemTotal line".to_string(),
        })
    }

    /// This process's uid and CPU affinity (/proc/self/status).
    pub fn status(&self) -> Result<ProcStatus, TuningError> {
        Ok(parse::parse_status(&self.read("/proc/self/status")?))
    }

    /// The selected transparent huge page mode ("always", "madvise" or "never").
    pub fn transparent_hugepages(&self) -> Result<String, TuningError> {
        let abs = "/sys/kernel/mm/transparent_hugepage/enabled";
        let text = self.read(abs)?;
        parse::parse_bracketed(&text).ok_or_else(|| TuningError::Parse {
            path: self.path(abs),
            what: format!("no [selected] mode in {:?}", text.trim()),
        })
    }

    /// Whether a kernel module is loaded (/proc/modules); built-in modules are not listed there,
    /// so callers also look for the module's sysctl files.
    pub fn module_loaded(&self, name: &str) -> bool {
        self.read("/proc/modules")
            .map(|t| parse::parse_modules(&t).iter().any(|m| m == name))
            .unwrap_or(false)
    }

    /// The numbered lines of /proc/interrupts.
    pub fn interrupts(&self) -> Result<Vec<parse::IrqLine>, TuningError> {
        Ok(parse::parse_interrupts(&self.read("/proc/interrupts")?))
    }

    /// The CPUs an IRQ may be delivered to (/proc/irq/N/smp_affinity_list).
    pub fn irq_affinity(&self, irq: u32) -> Option<Vec<usize>> {
        let text = self
            .read(&format!("/proc/irq/{irq}/smp_affinity_list"))
            .ok()?;
        parse::parse_cpu_list(&text)
    }

    /// The names of the entries of a directory under the root, sorted; empty if it is missing.
    pub fn list_dir(&self, abs: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.path(abs))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysctl_paths() {
        assert_eq!(
            Host::sysctl_path("net.ipv4.tcp_mem"),
            "/proc/sys/net/ipv4/tcp_mem"
        );
        let h = Host::new("/tmp/x");
        assert_eq!(
            h.path("/proc/meminfo"),
            PathBuf::from("/tmp/x/proc/meminfo")
        );
        assert!(Host::live().is_live());
        assert!(!h.is_live());
    }
}
