//! `tuning apply`: the sysctl.d and limits.d files a target needs, as a diff against the host,
//! and (only when asked) writing them under a root and loading the sysctl file. Values never
//! go below what the host already has, except the socket buffer defaults for large targets;
//! a second run with the same target finds nothing to change.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use crate::check::{
    conntrack_hashsize, tcp_buffer_proposal, HostFacts, Needs, Role, Target, PORT_RANGE_WIDE,
};
use crate::host::Host;
use crate::TuningError;

/// The sysctl file `apply` owns.
pub const SYSCTL_FILE: &str = "/etc/sysctl.d/90-gateway.conf";
/// The pam_limits file `apply` owns.
pub const LIMITS_FILE: &str = "/etc/security/limits.d/90-gateway.conf";
/// The account the limits apply to by default; gateway.service runs as it.
pub const USER_DEFAULT: &str = "gateway";

/// One sysctl key `apply` sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    pub key: &'static str,
    /// The live value, whitespace collapsed; `None` if unreadable.
    pub current: Option<String>,
    pub value: String,
}

/// What `apply` would write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub settings: Vec<Setting>,
    pub sysctl_text: String,
    pub limits_text: String,
    /// The files as they are on disk now (`None`: absent).
    pub sysctl_on_disk: Option<String>,
    pub limits_on_disk: Option<String>,
    /// What a file cannot do: restarts, boot parameters, module options.
    pub notes: Vec<String>,
}

fn parse_conf(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                k.trim().to_string(),
                v.split_whitespace().collect::<Vec<_>>().join(" "),
            )
        })
        .collect()
}

fn join(v: &[u64]) -> String {
    v.iter().map(u64::to_string).collect::<Vec<_>>().join(" ")
}

/// Plans the files for `target`; `user` is the account in limits.d.
pub fn plan(host: &Host, target: &Target, user: &str) -> Plan {
    let facts = HostFacts::read(host);
    let needs = Needs::for_target(target);
    let sysctl_on_disk = host.read(SYSCTL_FILE).ok();
    let limits_on_disk = host.read(LIMITS_FILE).ok();
    let in_file: Vec<String> = sysctl_on_disk
        .as_deref()
        .map(parse_conf)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    let mut settings = Vec::new();
    // A key goes in the file when the host falls short, or when the file already sets it (so
    // the second run, after the first was loaded, writes the same file).
    let mut add = |key: &'static str, short: bool, value: String| {
        if short || in_file.iter().any(|k| k == key) {
            settings.push(Setting {
                key,
                current: host.sysctl(key).ok(),
                value,
            });
        }
    };
    for (key, current, needed) in [
        ("fs.nr_open", facts.nr_open, needs.nr_open),
        ("fs.file-max", facts.file_max, needs.file_max),
        ("net.core.somaxconn", facts.somaxconn, needs.accept_backlog),
        (
            "net.ipv4.tcp_max_syn_backlog",
            facts.tcp_max_syn_backlog,
            needs.accept_backlog,
        ),
        (
            "net.core.netdev_max_backlog",
            facts.netdev_max_backlog,
            needs.netdev_backlog,
        ),
        ("vm.max_map_count", facts.max_map_count, needs.max_map_count),
    ] {
        let c = current.unwrap_or(0);
        add(key, c < needed, c.max(needed).to_string());
    }
    if target.role == Role::Bench {
        let (a, b) = facts.ip_local_port_range.unwrap_or((u64::MAX, 0));
        let (wa, wb) = PORT_RANGE_WIDE;
        add(
            "net.ipv4.ip_local_port_range",
            a > wa || b < wb,
            format!("{} {}", a.min(wa), b.max(wb)),
        );
    }
    let tcp_mem = needs.tcp_mem(facts.tcp_mem);
    add(
        "net.ipv4.tcp_mem",
        Some(tcp_mem) != facts.tcp_mem,
        join(&tcp_mem),
    );
    for (key, current) in [
        ("net.ipv4.tcp_rmem", facts.tcp_rmem),
        ("net.ipv4.tcp_wmem", facts.tcp_wmem),
    ] {
        if let Some(cur) = current {
            let proposed = tcp_buffer_proposal(target, cur);
            add(key, proposed != cur, join(&proposed));
        }
    }
    if let Some(disabled) = facts.io_uring_disabled {
        add("kernel.io_uring_disabled", disabled != 0, "0".to_string());
    }
    if let Some(ct) = facts.conntrack {
        let c = ct.max.unwrap_or(0);
        add(
            "net.netfilter.nf_conntrack_max",
            c < needs.conntrack,
            c.max(needs.conntrack).to_string(),
        );
    }

    let header = format!(
        "# Written by `tuning apply --connections {} --role {}`: rerun it rather than editing.\n",
        target.connections, target.role
    );
    let mut sysctl_text = header.clone();
    sysctl_text.push_str(&format!(
        "# Loaded at boot by systemd-sysctl; now with `sysctl -p {SYSCTL_FILE}`.\n"
    ));
    for s in &settings {
        sysctl_text.push_str(&format!("{} = {}\n", s.key, s.value));
    }
    let nofile = needs.nofile;
    let limits_text = format!(
        "{header}# pam_limits applies this at login; gateway.service sets LimitNOFILE= and \
         LimitMEMLOCK= itself.\n# The nofile hard limit must stay <= fs.nr_open or logins \
         fail.\n{user} soft nofile {nofile}\n{user} hard nofile {nofile}\n{user} soft memlock \
         unlimited\n{user} hard memlock unlimited\n"
    );

    let mut notes = vec![format!(
        "limits.d applies at the next login of {user}; the service takes LimitNOFILE={nofile} and \
         LimitMEMLOCK=infinity from gateway.service: systemctl daemon-reload && systemctl \
         restart gateway"
    )];
    if let Some(ehash) = facts.tcp_ehash_entries {
        if ehash < target.connections {
            notes.push(format!(
                "TCP established hash has {ehash} buckets for {} sessions (sized at boot): add \
                 the boot parameter thash_entries={} and reboot",
                target.connections,
                target.connections.max(1).next_power_of_two()
            ));
        }
    }
    if let Some(ct) = facts.conntrack {
        let want = conntrack_hashsize(needs.conntrack);
        if ct.hashsize.unwrap_or(0) < want {
            notes.push(format!(
                "nf_conntrack hash has {} buckets: `echo {want} > \
                 /sys/module/nf_conntrack/parameters/hashsize` now, and `options nf_conntrack \
                 hashsize={want}` in /etc/modprobe.d/gateway.conf for boot",
                ct.hashsize
                    .map_or_else(|| "unknown".to_string(), |h| h.to_string())
            ));
        }
    }
    if facts.transparent_hugepages.as_deref() == Some("never") {
        notes.push(
            "transparent hugepages are off: boot parameter transparent_hugepage=madvise"
                .to_string(),
        );
    }
    Plan {
        settings,
        sysctl_text,
        limits_text,
        sysctl_on_disk,
        limits_on_disk,
        notes,
    }
}

impl Plan {
    /// Whether the files on disk and the live values already match.
    pub fn is_noop(&self) -> bool {
        self.sysctl_on_disk.as_deref() == Some(self.sysctl_text.as_str())
            && self.limits_on_disk.as_deref() == Some(self.limits_text.as_str())
    }

    /// The diff against the current state: each file, then live sysctl values that would move.
    pub fn diff(&self, host: &Host) -> String {
        let mut out = String::new();
        for (abs, old, new) in [
            (SYSCTL_FILE, &self.sysctl_on_disk, &self.sysctl_text),
            (LIMITS_FILE, &self.limits_on_disk, &self.limits_text),
        ] {
            let path = host.path(abs);
            if old.as_deref() == Some(new.as_str()) {
                out.push_str(&format!("{}: up to date\n", path.display()));
                continue;
            }
            out.push_str(&format!(
                "--- {} ({})\n+++ {} (proposed)\n",
                path.display(),
                if old.is_some() { "on disk" } else { "absent" },
                path.display()
            ));
            out.push_str(&line_diff(old.as_deref().unwrap_or(""), new));
        }
        let moves: Vec<&Setting> = self
            .settings
            .iter()
            .filter(|s| s.current.as_deref() != Some(s.value.as_str()))
            .collect();
        if !moves.is_empty() {
            out.push_str("live values after loading:\n");
            for s in moves {
                out.push_str(&format!(
                    "  {}: {} -> {}\n",
                    s.key,
                    s.current.as_deref().unwrap_or("unreadable"),
                    s.value
                ));
            }
        }
        out
    }
}

/// A line diff: unchanged lines with "  ", removed with "- ", added with "+ ". Longest common
/// subsequence; the files are a few dozen lines.
pub fn line_diff(old: &str, new: &str) -> String {
    let a: Vec<&str> = old.lines().collect();
    let b: Vec<&str> = new.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let mut out = String::new();
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

/// What `write` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Applied {
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
    /// Whether `sysctl -p` loaded the file (live host only).
    pub loaded: bool,
}

/// Fails with `NotRoot` when `host` is the live host and this process is not root.
pub fn require_root(host: &Host, action: &'static str) -> Result<(), TuningError> {
    if !host.is_live() {
        return Ok(());
    }
    let status = host.status()?;
    root_allowed(true, status.euid, action).map_err(|e| match e {
        RootCheck::NotRoot(err) => err,
        RootCheck::NoUid => TuningError::Parse {
            path: host.path("/proc/self/status"),
            what: "no Uid line".to_string(),
        },
    })
}

/// Why `root_allowed` refused.
#[derive(Debug)]
pub enum RootCheck {
    NotRoot(TuningError),
    NoUid,
}

/// The rule behind `require_root`: writing under "/" takes effective uid 0; any other root is
/// a plain directory.
pub fn root_allowed(live: bool, euid: Option<u32>, action: &'static str) -> Result<(), RootCheck> {
    match (live, euid) {
        (false, _) | (true, Some(0)) => Ok(()),
        (true, Some(euid)) => Err(RootCheck::NotRoot(TuningError::NotRoot { action, euid })),
        (true, None) => Err(RootCheck::NoUid),
    }
}

/// Writes the plan's files under the host's root (skipping unchanged ones), then on the live
/// host loads the sysctl file with `sysctl -p`.
pub fn write(host: &Host, plan: &Plan) -> Result<Applied, TuningError> {
    require_root(host, "tuning apply --write")?;
    let mut applied = Applied::default();
    // sysctl first: the limits file's nofile must not exceed fs.nr_open.
    for (abs, old, new) in [
        (SYSCTL_FILE, &plan.sysctl_on_disk, &plan.sysctl_text),
        (LIMITS_FILE, &plan.limits_on_disk, &plan.limits_text),
    ] {
        let path = host.path(abs);
        if old.as_deref() == Some(new.as_str()) {
            applied.unchanged.push(path);
            continue;
        }
        write_atomic(&path, new)?;
        applied.written.push(path);
    }
    if host.is_live() {
        let path = host.path(SYSCTL_FILE);
        let output = Command::new("sysctl")
            .arg("-p")
            .arg(&path)
            .output()
            .map_err(|e| TuningError::Sysctl {
                path: path.clone(),
                detail: e.to_string(),
            })?;
        if !output.status.success() {
            return Err(TuningError::Sysctl {
                path,
                detail: String::from_utf8_lossy(&output.stderr).trim().to_string(),
            });
        }
        applied.loaded = true;
    }
    Ok(applied)
}

/// Writes through a temporary file and a rename, so a crash never leaves half a file that
/// systemd-sysctl would load at boot.
fn write_atomic(path: &std::path::Path, text: &str) -> Result<(), TuningError> {
    let err = |source| TuningError::Write {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let tmp = path.with_extension("conf.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_marks_changes() {
        assert_eq!(line_diff("a\nb\n", "a\nc\n"), "  a\n- b\n+ c\n");
        assert_eq!(line_diff("", "x\n"), "+ x\n");
        assert_eq!(line_diff("x\n", "x\n"), "  x\n");
    }

    #[test]
    fn conf_parsing() {
        let kv = parse_conf("# c\nfs.nr_open = 5\nnet.ipv4.tcp_mem =  1\t2 3\n");
        assert_eq!(kv[0], ("fs.nr_open".to_string(), "5".to_string()));
        assert_eq!(kv[1].1, "1 2 3");
    }
}
