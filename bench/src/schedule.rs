//! Open-loop arrival schedules: when each send is due, fixed in advance from the rate, so a slow
//! server cannot slow the generator down (no coordinated omission). Latency is measured from the
//! scheduled time, not from when the send actually happened.
//!
//! Times are computed in `f64` seconds from the event index (never accumulated), so there is no
//! drift over long runs: event `i` is due at exactly `i / rate` (to the nanosecond).

use std::time::Duration;

/// A constant-rate schedule: event `i` is due at `start + i / rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub rate_per_second: f64,
    pub count: u64,
}

/// Rates that are not finite or not positive schedule nothing.
fn usable_rate(rate: f64) -> bool {
    rate.is_finite() && rate > 0.0
}

impl Schedule {
    /// Events at `rate_per_second` for `duration`: `floor(rate * seconds)` of them, the first at
    /// offset zero. A rate of zero, a negative rate or a non-finite rate gives no events.
    pub fn new(rate_per_second: f64, duration: Duration) -> Schedule {
        let count = if usable_rate(rate_per_second) {
            let exact = rate_per_second * duration.as_secs_f64();
            // Tiny representational error (0.1 * 30 = 3.0000000000000004, 0.3 * 10 =
            // 2.9999999999999996) must not drop or add an event: snap to the nearest integer
            // when within a relative 1e-9, else floor.
            let nearest = exact.round();
            let n = if (exact - nearest).abs() <= 1e-9 * nearest.max(1.0) {
                nearest
            } else {
                exact.floor()
            };
            if n >= u64::MAX as f64 {
                u64::MAX
            } else {
                n as u64
            }
        } else {
            0
        };
        Schedule {
            rate_per_second,
            count,
        }
    }

    /// Offset of event `i` from the start (`i / rate`). Meaningless for an unusable rate (zero).
    pub fn due(&self, i: u64) -> Duration {
        if !usable_rate(self.rate_per_second) {
            return Duration::ZERO;
        }
        let secs = i as f64 / self.rate_per_second;
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
    }

    /// How many events are due by `elapsed` (so a loop that woke late sends all of them):
    /// `min(count, floor(elapsed * rate) + 1)`, since event 0 is due at zero.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        if self.count == 0 {
            return 0;
        }
        // Largest i with due(i) <= elapsed. Start from the float estimate and correct it against
        // `due` itself, so `due_by(due(i)) > i` always holds exactly.
        let estimate = (elapsed.as_secs_f64() * self.rate_per_second).floor();
        let mut last = if estimate >= (self.count - 1) as f64 {
            self.count - 1
        } else {
            estimate as u64
        };
        while last > 0 && self.due(last) > elapsed {
            last -= 1;
        }
        while last + 1 < self.count && self.due(last + 1) <= elapsed {
            last += 1;
        }
        last + 1
    }

    /// Splits the schedule over `parts` workers: part `k` sends events `i` with `i % parts == k`,
    /// so together they keep the total rate and each keeps the same timeline.
    ///
    /// # Panics
    /// If `parts` is zero or `k >= parts`.
    pub fn part(&self, k: usize, parts: usize) -> PartSchedule {
        assert!(parts > 0, "a schedule splits into at least one part");
        assert!(k < parts, "part {k} out of {parts}");
        PartSchedule {
            whole: *self,
            k,
            parts,
        }
    }
}

/// One worker's share of a schedule (every `parts`-th event from `k`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PartSchedule {
    pub whole: Schedule,
    pub k: usize,
    pub parts: usize,
}

impl PartSchedule {
    /// Global index of this part's `j`-th event (`k + j * parts`).
    pub fn global_index(&self, j: u64) -> u64 {
        self.k as u64 + j * self.parts as u64
    }

    /// Offset of this part's `j`-th event from the start (the global timeline).
    pub fn due(&self, j: u64) -> Duration {
        self.whole.due(self.global_index(j))
    }

    /// How many of this part's events exist in total.
    pub fn count(&self) -> u64 {
        Self::share(self.whole.count, self.k as u64, self.parts as u64)
    }

    /// How many of this part's events are due by `elapsed`.
    pub fn due_by(&self, elapsed: Duration) -> u64 {
        Self::share(self.whole.due_by(elapsed), self.k as u64, self.parts as u64)
    }

    /// How many of the global indices `0..n` are congruent to `k` modulo `parts`.
    fn share(n: u64, k: u64, parts: u64) -> u64 {
        if n <= k {
            0
        } else {
            (n - k).div_ceil(parts)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn counts_are_exact() {
        assert_eq!(Schedule::new(100.0, Duration::from_secs(10)).count, 1000);
        assert_eq!(Schedule::new(1.0, Duration::from_millis(999)).count, 0);
        assert_eq!(Schedule::new(1.0, Duration::from_secs(1)).count, 1);
        assert_eq!(Schedule::new(2.5, Duration::from_secs(3)).count, 7);
        assert_eq!(Schedule::new(0.1, Duration::from_secs(30)).count, 3);
        assert_eq!(Schedule::new(0.3, Duration::from_secs(10)).count, 3);
        assert_eq!(
            Schedule::new(1000.0, Duration::from_millis(1500)).count,
            1500
        );
    }

    #[test]
    fn unusable_rates_schedule_nothing() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let s = Schedule::new(rate, Duration::from_secs(10));
            assert_eq!(s.count, 0, "rate {rate}");
            assert_eq!(s.due_by(Duration::from_secs(100)), 0);
            assert_eq!(s.part(0, 3).count(), 0);
        }
        assert_eq!(Schedule::new(5.0, Duration::ZERO).count, 0);
    }

    #[test]
    fn due_times() {
        let s = Schedule::new(4.0, Duration::from_secs(2));
        assert_eq!(s.due(0), Duration::ZERO);
        assert_eq!(s.due(1), Duration::from_millis(250));
        assert_eq!(s.due(7), Duration::from_millis(1750));
        let s = Schedule::new(3.0, Duration::from_secs(1));
        assert_eq!(s.due(1).as_nanos(), 333_333_333);
    }

    #[test]
    fn due_by_counts_event_zero_at_start() {
        let s = Schedule::new(10.0, Duration::from_secs(1));
        assert_eq!(s.due_by(Duration::ZERO), 1);
        assert_eq!(s.due_by(Duration::from_millis(99)), 1);
        assert_eq!(s.due_by(Duration::from_millis(100)), 2);
        assert_eq!(s.due_by(Duration::from_millis(950)), 10);
        assert_eq!(s.due_by(Duration::from_secs(60)), 10);
    }

    #[test]
    fn due_by_is_consistent_with_due() {
        for rate in [1.0, 3.0, 7.5, 1000.0, 12345.678] {
            let s = Schedule::new(rate, Duration::from_secs(2));
            for i in 0..s.count {
                let t = s.due(i);
                assert!(s.due_by(t) > i, "rate {rate} i {i}");
                if t > Duration::ZERO {
                    assert!(
                        s.due_by(t - Duration::from_nanos(1)) <= i,
                        "rate {rate} i {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn due_by_is_monotonic() {
        let s = Schedule::new(333.3, Duration::from_secs(3));
        let p = s.part(2, 5);
        let mut last = 0;
        let mut last_part = 0;
        for ms in 0..4000 {
            let t = Duration::from_micros(ms * 777);
            let n = s.due_by(t);
            let np = p.due_by(t);
            assert!(n >= last && np >= last_part);
            last = n;
            last_part = np;
        }
        assert_eq!(last, s.count);
        assert_eq!(last_part, p.count());
    }

    #[test]
    fn parts_share_the_events() {
        let s = Schedule::new(10.0, Duration::from_secs(1));
        let counts: Vec<u64> = (0..3).map(|k| s.part(k, 3).count()).collect();
        assert_eq!(counts, vec![4, 3, 3]);
        let p = s.part(1, 3);
        assert_eq!(p.global_index(0), 1);
        assert_eq!(p.global_index(2), 7);
        assert_eq!(p.due(1), Duration::from_millis(400));
        // Globally due by 0.35 s: events 0..=3; part 1 owns index 1 only.
        assert_eq!(p.due_by(Duration::from_millis(350)), 1);
        assert_eq!(p.due_by(Duration::from_millis(400)), 2);
        // More parts than events: the extra parts are empty.
        let s = Schedule::new(2.0, Duration::from_secs(1));
        assert_eq!(s.part(3, 4).count(), 0);
        assert_eq!(s.part(1, 4).count(), 1);
    }

    proptest! {
        #[test]
        fn parts_partition_the_whole(
            rate in 0.0f64..5000.0,
            millis in 0u64..3000,
            parts in 1usize..12,
            probe_ms in 0u64..4000,
        ) {
            let s = Schedule::new(rate, Duration::from_millis(millis));
            let mut seen = vec![false; s.count as usize];
            let mut total = 0;
            let mut total_due = 0;
            let probe = Duration::from_millis(probe_ms);
            for k in 0..parts {
                let p = s.part(k, parts);
                for j in 0..p.count() {
                    let g = p.global_index(j);
                    prop_assert!(g < s.count);
                    prop_assert!(!seen[g as usize], "index {} taken twice", g);
                    seen[g as usize] = true;
                    prop_assert_eq!(p.due(j), s.due(g));
                }
                total += p.count();
                total_due += p.due_by(probe);
            }
            prop_assert!(seen.iter().all(|&x| x));
            prop_assert_eq!(total, s.count);
            prop_assert_eq!(total_due, s.due_by(probe));
        }
    }
}
