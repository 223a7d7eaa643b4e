//! Pure parsers for the kernel's text formats (/proc/self/limits, /proc/meminfo, /proc/interrupts,
//! /proc/self/status, cpu lists and masks). They take strings, never touch the file system, and
//! never panic on odd input: an unreadable field is `None` and the caller reports it.

use serde::Serialize;

/// `u64::MAX` stands for "unlimited" in limits (the kernel's RLIM_INFINITY is all ones too).
pub const UNLIMITED: u64 = u64::MAX;

/// A soft and hard resource limit; `UNLIMITED` for "unlimited".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Limit {
    pub soft: u64,
    pub hard: u64,
}

/// The rlimits `tuning` checks, from /proc/self/limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Limits {
    /// RLIMIT_NOFILE ("Max open files"), in descriptors.
    pub nofile: Option<Limit>,
    /// RLIMIT_MEMLOCK ("Max locked memory"), in bytes.
    pub memlock: Option<Limit>,
}

/// Parses /proc/self/limits. Columns are aligned with spaces and the names contain spaces, so
/// a row is found by its name and the two values after it are read.
pub fn parse_limits(text: &str) -> Limits {
    Limits {
        nofile: limit_row(text, "Max open files"),
        memlock: limit_row(text, "Max locked memory"),
    }
}

fn limit_row(text: &str, name: &str) -> Option<Limit> {
    let line = text.lines().find(|l| l.starts_with(name))?;
    let mut values = line[name.len()..].split_whitespace().map(parse_limit_value);
    Some(Limit {
        soft: values.next()??,
        hard: values.next()??,
    })
}

fn parse_limit_value(v: &str) -> Option<u64> {
    if v == "unlimited" {
        Some(UNLIMITED)
    } else {
        v.parse().ok()
    }
}

/// Formats a limit value the way /proc/self/limits does.
pub fn format_limit_value(v: u64) -> String {
    if v == UNLIMITED {
        "unlimited".to_string()
    } else {
        v.to_string()
    }
}

/// The /proc/meminfo fields `tuning` uses, in bytes or pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct MemInfo {
    pub mem_total_bytes: u64,
    pub mem_available_bytes: u64,
    pub hugepages_total: u64,
    pub hugepages_free: u64,
    pub hugepage_bytes: u64,
}

impl MemInfo {
    /// Memory reserved for hugetlbfs, which sockets and the ordinary heap cannot use.
    pub fn hugetlb_reserved_bytes(&self) -> u64 {
        self.hugepages_total.saturating_mul(self.hugepage_bytes)
    }
}

/// Parses /proc/meminfo ("MemTotal:       24683656 kB"; "HugePages_Total:       0").
/// `None` when MemTotal is missing.
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.split(':').next() == Some(name))?;
        let mut parts = line.split(':').nth(1)?.split_whitespace();
        let value: u64 = parts.next()?.parse().ok()?;
        Some(match parts.next() {
            Some("kB") => value.saturating_mul(1024),
            _ => value,
        })
    };
    Some(MemInfo {
        mem_total_bytes: field("MemTotal")?,
        mem_available_bytes: field("MemAvailable").unwrap_or(0),
        hugepages_total: field("HugePages_Total").unwrap_or(0),
        hugepages_free: field("HugePages_Free").unwrap_or(0),
        hugepage_bytes: field("Hugepagesize").unwrap_or(0),
    })
}

/// The /proc/self/status fields `tuning` uses.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ProcStatus {
    /// The effective uid: the second field of the `Uid:` line (real, effective, saved, fs).
    pub euid: Option<u32>,
    /// `Cpus_allowed_list`: the CPUs this process may run on.
    pub cpus_allowed: Option<Vec<usize>>,
}

/// Parses /proc/self/status.
pub fn parse_status(text: &str) -> ProcStatus {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
            .map(str::trim)
    };
    ProcStatus {
        euid: value("Uid")
            .and_then(|v| v.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok()),
        cpus_allowed: value("Cpus_allowed_list").and_then(parse_cpu_list),
    }
}

/// Parses a kernel cpu list ("0-5,12-17", "3", "" for none) into sorted, distinct CPU ids.
/// `None` on malformed input.
pub fn parse_cpu_list(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for item in text
        .trim()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().ok()?, b.parse().ok()?);
                // The kernel caps NR_CPUS at 8192; a larger range is not a cpu list.
                if b < a || b >= CPU_ID_LIMIT {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => {
                let cpu: usize = item.parse().ok()?;
                if cpu >= CPU_ID_LIMIT {
                    return None;
                }
                cpus.push(cpu);
            }
        }
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// The kernel's largest NR_CPUS (x86_64 MAXSMP); bounds the lists and masks we build.
pub const CPU_ID_LIMIT: usize = 8192;

/// Formats CPU ids as a kernel cpu list, collapsing runs: [0,1,2,5] -> "0-2,5".
pub fn format_cpu_list(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// Formats CPU ids as a kernel cpumask ("rps_cpus", "xps_cpus"): hex, 32-bit words separated by
/// commas, most significant first, as bitmap_print_to_pagebuf prints them. Empty set: "0".
pub fn format_cpu_mask(cpus: &[usize]) -> String {
    let Some(&max) = cpus.iter().filter(|&&c| c < CPU_ID_LIMIT).max() else {
        return "0".to_string();
    };
    let mut words = vec![0u32; max / 32 + 1];
    for &c in cpus.iter().filter(|&&c| c < CPU_ID_LIMIT) {
        words[c / 32] |= 1 << (c % 32);
    }
    let mut parts: Vec<String> = Vec::with_capacity(words.len());
    for (i, w) in words.iter().rev().enumerate() {
        // The first (most significant) word is printed without leading zeros, the others in full.
        parts.push(if i == 0 {
            format!("{w:x}")
        } else {
            format!("{w:08x}")
        });
    }
    parts.join(",")
}

/// Parses a kernel cpumask ("00ff", "ffffffff,00000001") into CPU ids. `None` on malformed input.
pub fn parse_cpu_mask(text: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    let words: Vec<&str> = text.trim().split(',').collect();
    for (i, word) in words.iter().rev().enumerate() {
        let bits = u32::from_str_radix(word, 16).ok()?;
        for bit in 0..32 {
            if bits & (1 << bit) != 0 {
                cpus.push(i * 32 + bit);
            }
        }
    }
    Some(cpus)
}

/// One numbered line of /proc/interrupts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IrqLine {
    pub irq: u32,
    /// The action name(s): "eth0-TxRx-0", "virtio2-input.0"; several are joined by ", ".
    pub name: String,
    /// Interrupts served, summed over CPUs.
    pub count: u64,
}

/// Parses /proc/interrupts. The header names the CPU columns; each numbered line is
/// `IRQ: count per CPU, chip, hwirq-type, then two spaces and the action names` (kernel
/// show_interrupts). Architecture lines (NMI, LOC, ...) are skipped.
pub fn parse_interrupts(text: &str) -> Vec<IrqLine> {
    let mut lines = text.lines();
    let cpus = lines
        .next()
        .map(|h| {
            h.split_whitespace()
                .filter(|t| t.starts_with("CPU"))
                .count()
        })
        .unwrap_or(0);
    let mut out = Vec::new();
    for line in lines {
        let Some((head, rest)) = line.split_once(':') else {
            continue;
        };
        let Ok(irq) = head.trim().parse::<u32>() else {
            continue;
        };
        let count = rest
            .split_whitespace()
            .take(cpus)
            .filter_map(|t| t.parse::<u64>().ok())
            .sum();
        // The action names follow the last run of two spaces; a line without an action ends
        // in the handler type, which no NIC name matches.
        let name = rest
            .trim_end()
            .rsplit_once("  ")
            .map(|(_, n)| n.trim().to_string())
            .unwrap_or_default();
        out.push(IrqLine { irq, name, count });
    }
    out
}

/// The selected mode of a /sys/kernel/mm/transparent_hugepage/* file: "always [madvise] never"
/// -> "madvise".
pub fn parse_bracketed(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let end = text[start..].find(']')? + start;
    Some(text[start + 1..end].to_string())
}

/// Module names from /proc/modules (the first word of each line).
pub fn parse_modules(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Splits a sysctl value into numbers ("4096\t131072\t6291456" -> [4096, 131072, 6291456]).
pub fn parse_numbers(text: &str) -> Option<Vec<u64>> {
    text.split_whitespace().map(|t| t.parse().ok()).collect()
}

/// Bytes for people: 1536 -> "1.5 KiB", 25275809792 -> "23.5 GiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_round_trip() {
        assert_eq!(
            parse_cpu_list("0-5,12-17").unwrap(),
            vec![0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16, 17]
        );
        assert_eq!(parse_cpu_list("3\n").unwrap(), vec![3]);
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_list("5-3"), None);
        assert_eq!(parse_cpu_list("x"), None);
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn cpu_masks_match_kernel_format() {
        assert_eq!(format_cpu_mask(&[]), "0");
        assert_eq!(format_cpu_mask(&[0, 1]), "3");
        assert_eq!(format_cpu_mask(&[6, 18]), "40040");
        assert_eq!(format_cpu_mask(&[0, 32]), "1,00000001");
        assert_eq!(parse_cpu_mask("1,00000001").unwrap(), vec![0, 32]);
        assert_eq!(parse_cpu_mask("000000").unwrap(), Vec::<usize>::new());
        assert_eq!(parse_cpu_mask("zz"), None);
    }

    #[test]
    fn limits_and_status() {
        let text = "Limit                     Soft Limit           Hard Limit           Units     \n\
                    Max open files            1024                 524288               files     \n\
                    Max locked memory         unlimited            unlimited            bytes     \n";
        let l = parse_limits(text);
        assert_eq!(
            l.nofile,
            Some(Limit {
                soft: 1024,
                hard: 524288
            })
        );
        assert_eq!(l.memlock.unwrap().soft, UNLIMITED);
        let s = parse_status("Name:\tx\nUid:\t1000\t0\t0\t0\nCpus_allowed_list:\t0-3\n");
        assert_eq!(s.euid, Some(0));
        assert_eq!(s.cpus_allowed, Some(vec![0, 1, 2, 3]));
    }

    #[test]
    fn bracketed_and_human() {
        assert_eq!(
            parse_bracketed("always [madvise] never\n").as_deref(),
            Some("madvise")
        );
        assert_eq!(parse_bracketed("never"), None);
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
    }
}
