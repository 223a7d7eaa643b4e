//! Reads host and kernel limits and checks them against a target. The host-doctor issue fills
//! this crate; for now it reports the one limit every gateway start depends on.
#![forbid(unsafe_code)]

/// The soft and hard RLIMIT_NOFILE of this process, read from /proc (no unsafe needed).
pub fn open_files_limit() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut nums = line
        .split_whitespace()
        .skip(3)
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    Some((nums.next()?, nums.next()?))
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
