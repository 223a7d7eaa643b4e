//! Reading processes and the machine from /proc: RSS, CPU seconds, kernel TCP memory, CPU model.
//!
//! The parsers are pure functions over the text of a /proc file so they can be tested on fixed
//! samples; the readers around them only open the file.

use crate::report::Machine;

/// Clock ticks per second in /proc/PID/stat times: `USER_HZ`, fixed at 100 by the Linux ABI for
/// everything /proc exports, whatever the kernel's internal `HZ`.
pub const USER_HZ: f64 = 100.0;

/// Page size used for /proc/net/sockstat `mem` (counted in pages). 4096 on x86_64 and on the
/// usual aarch64 kernels; a 16K/64K-page kernel would under-report by that factor.
pub const PAGE_SIZE: u64 = 4096;

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// A process's resident set size in bytes (VmRSS).
pub fn rss_bytes(pid: u32) -> std::io::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_rss(&text).ok_or_else(|| invalid("no VmRSS line in /proc/PID/status"))
}

/// A process's user and system CPU seconds (from /proc/PID/stat).
pub fn cpu_seconds(pid: u32) -> std::io::Result<(f64, f64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu(&text).ok_or_else(|| invalid("unparsable /proc/PID/stat"))
}

/// Kernel TCP buffer memory in bytes (/proc/net/sockstat `TCP: ... mem N`, N pages).
pub fn kernel_tcp_bytes() -> std::io::Result<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat")?;
    parse_sockstat(&text).ok_or_else(|| invalid("no TCP mem in /proc/net/sockstat"))
}

/// CPU model, cores, kernel, hostname, memory. Fields that cannot be read are left empty/zero.
pub fn machine() -> Machine {
    let read = |path: &str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    Machine {
        cpu_model: parse_cpuinfo_model(&read("/proc/cpuinfo")).unwrap_or_default(),
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        kernel: read("/proc/sys/kernel/osrelease"),
        hostname: read("/proc/sys/kernel/hostname"),
        memory_bytes: parse_meminfo_total(&read("/proc/meminfo")).unwrap_or(0),
    }
}

/// The value in kB of a `Name:   N kB` line, in bytes.
fn kb_line(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        let mut words = rest.split_whitespace();
        let n: u64 = words.next()?.parse().ok()?;
        match words.next() {
            Some("kB") | None => Some(n * 1024),
            Some(_) => None,
        }
    })
}

/// VmRSS from /proc/PID/status, in bytes.
pub fn parse_status_rss(text: &str) -> Option<u64> {
    kb_line(text, "VmRSS")
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    kb_line(text, "MemTotal")
}

/// User and system CPU seconds from /proc/PID/stat: fields 14 (utime) and 15 (stime), in
/// `USER_HZ` ticks. The command name (field 2) is in parentheses and may hold spaces or `)`, so
/// the fields are counted from after the last `)`, where field 3 (state) starts.
pub fn parse_stat_cpu(text: &str) -> Option<(f64, f64)> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3, so field N is fields[N - 3].
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime as f64 / USER_HZ, stime as f64 / USER_HZ))
}

/// Kernel TCP memory in bytes from /proc/net/sockstat: the `mem` pages of the `TCP:` line.
pub fn parse_sockstat(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "mem")?;
    let pages: u64 = words.get(at + 1)?.parse().ok()?;
    Some(pages * PAGE_SIZE)
}

/// The first `model name` in /proc/cpuinfo (x86), else the first `Model`/`Hardware`/`cpu model`
/// line (arm and others).
pub fn parse_cpuinfo_model(text: &str) -> Option<String> {
    let value_of = |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key && !v.trim().is_empty()).then(|| v.trim().to_string())
        })
    };
    ["model name", "Model", "Hardware", "cpu model", "cpu"]
        .iter()
        .find_map(|key| value_of(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tgateway\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  123456 kB\nVmRSS:\t    1944 kB\nRssAnon:\t     120 kB\nThreads:\t3\n";

    #[test]
    fn status_rss() {
        assert_eq!(parse_status_rss(STATUS), Some(1944 * 1024));
        assert_eq!(parse_status_rss("Name:\tx\n"), None);
        // Kernel threads have no VmRSS.
        assert_eq!(parse_status_rss("Name:\tkthreadd\nState:\tS\n"), None);
    }

    #[test]
    fn stat_cpu_with_awkward_command_names() {
        let plain = "26633 (cat) R 26628 26628 23437 0 -1 4194304 100 0 0 0 250 75 0 0 20 0 1 0 277190 3133440 396 18446744073709551615";
        assert_eq!(parse_stat_cpu(plain), Some((2.5, 0.75)));
        let awkward = "42 (we ird) (x) S 1 42 42 0 -1 4194560 5 0 0 0 1234 5 0 0 20 0 4 0 100 0 0";
        assert_eq!(parse_stat_cpu(awkward), Some((12.34, 0.05)));
        assert_eq!(parse_stat_cpu("42 (short) S 1 2"), None);
        assert_eq!(parse_stat_cpu("no parens"), None);
    }

    #[test]
    fn sockstat_tcp_mem() {
        let text = "sockets: used 12\nTCP: inuse 1 orphan 0 tw 3 alloc 1 mem 129\nUDP: inuse 0 mem 7\nFRAG: inuse 0 memory 0\n";
        assert_eq!(parse_sockstat(text), Some(129 * 4096));
        assert_eq!(parse_sockstat("UDP: inuse 0 mem 7\n"), None);
    }

    #[test]
    fn cpuinfo_model() {
        let x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n";
        assert_eq!(parse_cpuinfo_model(x86).as_deref(), Some("AMD EPYC 7B13"));
        let arm = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU part\t: 0xd0c\n\nHardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n";
        assert_eq!(
            parse_cpuinfo_model(arm).as_deref(),
            Some("Raspberry Pi 4 Model B Rev 1.4")
        );
        assert_eq!(parse_cpuinfo_model(""), None);
    }

    #[test]
    fn meminfo_total() {
        let text = "MemTotal:       24683656 kB\nMemFree:         1000000 kB\n";
        assert_eq!(parse_meminfo_total(text), Some(24683656 * 1024));
    }

    #[test]
    fn reads_our_own_process_and_machine() {
        let pid = std::process::id();
        let rss = rss_bytes(pid).unwrap();
        assert!(rss > 1024 * 1024, "rss {rss}");
        // Burn a little CPU so the counters are likely non-zero; they must at least parse.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        let (user, system) = cpu_seconds(pid).unwrap();
        assert!(user >= 0.0 && system >= 0.0);
        assert!(kernel_tcp_bytes().is_ok());
        let m = machine();
        assert!(m.cores >= 1);
        assert!(m.memory_bytes > 0);
        assert!(!m.kernel.is_empty());
        assert!(rss_bytes(u32::MAX).is_err());
    }
}
