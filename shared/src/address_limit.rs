//! Failed logins per client address: after `max` failures within `window`, an address's
//! logins are refused (`temporary-auth-failure`) before any password is checked, until its
//! window ends. It bounds password guessing, and the key stretching (PBKDF2) a wrong or unknown
//! PLAIN password costs the shard. Each shard keeps its own table (shared nothing): a client
//! spread over S shards gets up to S times `max`. IPv6 addresses count by their /64 prefix,
//! which one host usually holds whole; IPv4-mapped IPv6 addresses count as the IPv4 address.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::limits::AUTH_FAILURE_ADDRESSES_MAX;

/// One shard's table of failures by client address.
#[derive(Debug)]
pub struct AddressLimit {
    /// Failures allowed per window; `0`: no limit (nothing is tracked).
    max: u32,
    window: Duration,
    /// Failures counted and when the address's window began.
    failures: HashMap<IpAddr, (u32, Instant)>,
    /// New addresses not tracked because the table was full of live windows.
    pub untracked: u64,
    /// A full table frees no entry before this (the earliest end of a window it holds, as of
    /// its last sweep): new addresses go untracked without a sweep until then, so a flood of
    /// new addresses costs one O(table) sweep per window, not one per failure.
    sweep_not_before: Option<Instant>,
}

/// The key an address counts under: itself, its IPv4 form, or its IPv6 /64.
fn key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
    }
}

impl AddressLimit {
    pub fn new(max: u32, window: Duration) -> AddressLimit {
        AddressLimit {
            max,
            window,
            failures: HashMap::new(),
            untracked: 0,
            sweep_not_before: None,
        }
    }

    /// Whether the limit is on (else nothing is counted).
    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Whether the limit is on and anything is tracked (else no address can be refused, and a
    /// caller need not look its client's address up).
    pub fn tracking(&self) -> bool {
        self.max > 0 && !self.failures.is_empty()
    }

    /// Whether `addr` has used up its failures for the current window.
    pub fn refused(&self, addr: IpAddr, now: Instant) -> bool {
        if self.max == 0 {
            return false;
        }
        self.failures
            .get(&key(addr))
            .is_some_and(|&(count, since)| count >= self.max && now < since + self.window)
    }

    /// Counts a failed login from `addr`.
    pub fn failed(&mut self, addr: IpAddr, now: Instant) {
        if self.max == 0 {
            return;
        }
        let k = key(addr);
        if !self.failures.contains_key(&k) && self.failures.len() >= AUTH_FAILURE_ADDRESSES_MAX {
            if self.sweep_not_before.is_none_or(|at| now >= at) {
                let window = self.window;
                self.failures
                    .retain(|_, &mut (_, since)| now < since + window);
                crate::table::ShrinkIfSparse::shrink_if_sparse(&mut self.failures);
                self.sweep_not_before = self
                    .failures
                    .values()
                    .map(|&(_, since)| since + window)
                    .min();
            }
            if self.failures.len() >= AUTH_FAILURE_ADDRESSES_MAX {
                self.untracked += 1;
                return;
            }
        }
        let entry = self.failures.entry(k).or_insert((0, now));
        if now >= entry.1 + self.window {
            *entry = (0, now);
        }
        entry.0 = entry.0.saturating_add(1);
    }

    /// Addresses tracked now.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn v4(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn an_address_is_refused_after_max_failures_until_its_window_ends() {
        let mut l = AddressLimit::new(3, WINDOW);
        let t = Instant::now();
        assert!(!l.tracking());
        for _ in 0..2 {
            l.failed(v4(1), t);
            assert!(!l.refused(v4(1), t));
        }
        l.failed(v4(1), t);
        assert!(l.refused(v4(1), t));
        assert!(l.refused(v4(1), t + WINDOW - Duration::from_millis(1)));
        assert!(!l.refused(v4(2), t), "other addresses are not affected");
        assert!(!l.refused(v4(1), t + WINDOW), "the window ended");
        // A failure after the window starts a new count.
        l.failed(v4(1), t + WINDOW);
        assert!(!l.refused(v4(1), t + WINDOW));
    }

    #[test]
    fn ipv6_counts_by_its_64_prefix_and_mapped_ipv4_as_ipv4() {
        let mut l = AddressLimit::new(2, WINDOW);
        let t = Instant::now();
        l.failed("2001:db8:1:2::1".parse().unwrap(), t);
        l.failed("2001:db8:1:2:ffff::9".parse().unwrap(), t);
        assert!(l.refused("2001:db8:1:2::77".parse().unwrap(), t));
        assert!(!l.refused("2001:db8:1:3::1".parse().unwrap(), t));
        l.failed("::ffff:192.0.2.7".parse().unwrap(), t);
        l.failed(v4(7), t);
        assert!(l.refused(v4(7), t));
    }

    #[test]
    fn zero_turns_it_off_and_the_table_stays_bounded() {
        let mut off = AddressLimit::new(0, WINDOW);
        let t = Instant::now();
        for _ in 0..10 {
            off.failed(v4(1), t);
        }
        assert!(!off.refused(v4(1), t));
        assert!(off.is_empty());

        let mut l = AddressLimit::new(1, WINDOW);
        for i in 0..AUTH_FAILURE_ADDRESSES_MAX as u32 + 10 {
            l.failed(IpAddr::from(i.to_be_bytes()), t);
        }
        assert_eq!(l.len(), AUTH_FAILURE_ADDRESSES_MAX);
        assert_eq!(
            l.untracked, 10,
            "new addresses fail open when all windows are live"
        );
        assert_eq!(
            l.sweep_not_before,
            Some(t + WINDOW),
            "no sweep again before a window can end"
        );
        // Once windows end, new addresses are tracked again.
        l.failed(v4(200), t + WINDOW);
        assert!(l.refused(v4(200), t + WINDOW));
        assert_eq!(l.len(), 1);
    }
}
