//! Statistics primitives, kept by one shard in its own memory: decaying rates over 1 s, 10 s and
//! 100 s (like the seed's per-process queue statistics), latency histograms, and the hysteresis
//! of a threshold alert. No atomics, no I/O: a shard owns these by value and snapshots them on a
//! cold path.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The windows of the decaying rates, in seconds.
pub const RATE_WINDOWS_SECONDS: [f64; 3] = [1.0, 10.0, 100.0];

/// Events per second over the last 1 s, 10 s and 100 s, exponentially weighted (a Unix load
/// average of a counter). Fed the counter's running total at each tick.
#[derive(Debug, Clone, Default)]
pub struct DecayingRates {
    last_total: u64,
    rates: [f64; 3],
}

impl DecayingRates {
    /// Folds in the counter's total after `elapsed` since the previous tick.
    pub fn tick(&mut self, total: u64, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let delta = total.saturating_sub(self.last_total);
        self.last_total = total;
        if seconds <= 0.0 {
            return;
        }
        let now = delta as f64 / seconds;
        for (rate, window) in self.rates.iter_mut().zip(RATE_WINDOWS_SECONDS) {
            let weight = 1.0 - (-seconds / window).exp();
            *rate += weight * (now - *rate);
        }
    }

    /// Per-second rates over 1 s, 10 s and 100 s.
    pub fn per_second(&self) -> [f64; 3] {
        self.rates
    }
}

/// Smallest latency a histogram tells apart, in microseconds.
const LATENCY_MIN_MICROS: u64 = 1;
/// Largest latency a histogram records, in microseconds (larger values are clamped).
const LATENCY_MAX_MICROS: u64 = 60_000_000;
/// Significant figures kept: 2 gives 1% precision in ~20 KiB per histogram.
const LATENCY_SIGNIFICANT_FIGURES: u8 = 2;

/// A latency histogram in microseconds (hdrhistogram), with the sum kept for Prometheus. Records
/// go to a window that `roll` (once per tick) folds into the running total, so a reader gets both
/// the figures since start and those of the last window.
#[derive(Debug, Clone)]
pub struct LatencyHistogram {
    window: hdrhistogram::Histogram<u64>,
    total: hdrhistogram::Histogram<u64>,
    sum_micros: u64,
    window_sum_micros: u64,
    last_window: LatencySnapshot,
}

fn new_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(
        LATENCY_MIN_MICROS,
        LATENCY_MAX_MICROS,
        LATENCY_SIGNIFICANT_FIGURES,
    )
    .expect("static histogram bounds are valid")
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            window: new_histogram(),
            total: new_histogram(),
            sum_micros: 0,
            window_sum_micros: 0,
            last_window: LatencySnapshot::default(),
        }
    }
}

fn figures(h: &hdrhistogram::Histogram<u64>, sum_micros: u64) -> LatencySnapshot {
    if h.is_empty() {
        return LatencySnapshot {
            sum_micros,
            ..LatencySnapshot::default()
        };
    }
    LatencySnapshot {
        count: h.len(),
        sum_micros,
        p50_micros: h.value_at_quantile(0.5),
        p90_micros: h.value_at_quantile(0.9),
        p99_micros: h.value_at_quantile(0.99),
        p999_micros: h.value_at_quantile(0.999),
        max_micros: h.max(),
    }
}

impl LatencyHistogram {
    pub fn record(&mut self, latency: Duration) {
        let micros = (latency.as_micros() as u64).clamp(LATENCY_MIN_MICROS, LATENCY_MAX_MICROS);
        self.window.saturating_record(micros);
        self.sum_micros = self.sum_micros.saturating_add(micros);
        self.window_sum_micros = self.window_sum_micros.saturating_add(micros);
    }

    /// Records the time from `since` to now.
    pub fn record_since(&mut self, since: Instant) {
        self.record(since.elapsed());
    }

    /// Ends the current window: its figures become `last_window`, its counts join the total.
    pub fn roll(&mut self) {
        self.last_window = figures(&self.window, self.window_sum_micros);
        self.window_sum_micros = 0;
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.total.add(&self.window);
        self.window.reset();
    }

    /// Figures since start (the open window included).
    pub fn snapshot(&self) -> LatencySnapshot {
        if self.window.is_empty() {
            return figures(&self.total, self.sum_micros);
        }
        let mut all = self.total.clone();
        let _ = all.add(&self.window);
        figures(&all, self.sum_micros)
    }

    /// Figures of the last closed window (one tick).
    pub fn last_window(&self) -> LatencySnapshot {
        self.last_window
    }
}

/// A histogram's figures at one moment (since the shard started).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    pub count: u64,
    pub sum_micros: u64,
    pub p50_micros: u64,
    pub p90_micros: u64,
    pub p99_micros: u64,
    pub p999_micros: u64,
    pub max_micros: u64,
}

/// What a threshold check asks its caller to do (log, typically).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertEvent {
    /// Nothing to say.
    Quiet,
    /// The value crossed the threshold just now.
    Raised,
    /// Still past the threshold, and the repeat interval has passed since the last log.
    StillRaised,
    /// Back under the threshold.
    Cleared,
}

/// The state of one threshold alert: raised while `value >= threshold` (a threshold of 0 turns
/// the alert off). Repeats are rate-limited to one per `repeat` so a stuck queue does not flood
/// the log.
#[derive(Debug, Clone, Default)]
pub struct Alert {
    raised_at: Option<Instant>,
    last_logged: Option<Instant>,
}

impl Alert {
    pub fn check(
        &mut self,
        value: u64,
        threshold: u64,
        now: Instant,
        repeat: Duration,
    ) -> AlertEvent {
        let past = threshold > 0 && value >= threshold;
        match (past, self.raised_at) {
            (true, None) => {
                self.raised_at = Some(now);
                self.last_logged = Some(now);
                AlertEvent::Raised
            }
            (true, Some(_)) => match self.last_logged {
                Some(at) if now.saturating_duration_since(at) < repeat => AlertEvent::Quiet,
                _ => {
                    self.last_logged = Some(now);
                    AlertEvent::StillRaised
                }
            },
            (false, Some(_)) => {
                self.raised_at = None;
                self.last_logged = None;
                AlertEvent::Cleared
            }
            (false, None) => AlertEvent::Quiet,
        }
    }

    pub fn is_raised(&self) -> bool {
        self.raised_at.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_converges_in_every_window() {
        let mut r = DecayingRates::default();
        let mut total = 0;
        for _ in 0..1000 {
            total += 50;
            r.tick(total, Duration::from_secs(1));
        }
        for rate in r.per_second() {
            assert!((rate - 50.0).abs() < 0.01, "{rate}");
        }
    }

    #[test]
    fn short_window_reacts_first() {
        let mut r = DecayingRates::default();
        r.tick(100, Duration::from_secs(1));
        let [one, ten, hundred] = r.per_second();
        // After one second at 100/s: 1 - e^-1, 1 - e^-0.1, 1 - e^-0.01 of the way there.
        assert!((one - 63.2).abs() < 0.1, "{one}");
        assert!((ten - 9.5).abs() < 0.1, "{ten}");
        assert!((hundred - 0.995).abs() < 0.01, "{hundred}");
        r.tick(100, Duration::from_secs(1));
        let [one_after, ten_after, _] = r.per_second();
        assert!(one_after < one && ten_after < ten);
    }

    #[test]
    fn histogram_quantiles_and_sum() {
        let mut h = LatencyHistogram::default();
        assert_eq!(h.snapshot(), LatencySnapshot::default());
        for ms in 1..=100 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 100);
        assert_eq!(s.sum_micros, 5050 * 1000);
        assert!((49_000..=51_000).contains(&s.p50_micros), "{s:?}");
        assert!((98_000..=100_000).contains(&s.p99_micros), "{s:?}");
        assert!(s.max_micros >= 99_000);
        assert_eq!(h.last_window().count, 0, "no window closed yet");
        h.roll();
        assert_eq!(h.last_window(), s, "the first window holds everything");
        assert_eq!(h.snapshot(), s, "rolling loses nothing");
        h.record(Duration::from_millis(500));
        h.roll();
        let w = h.last_window();
        assert_eq!((w.count, w.sum_micros), (1, 500_000));
        assert!(
            (495_000..=505_000).contains(&w.p99_micros),
            "1% precision: {w:?}"
        );
        assert_eq!(h.snapshot().count, 101);
        h.roll();
        assert_eq!(h.last_window().count, 0, "an idle window is empty");
    }

    #[test]
    fn alert_raises_repeats_rate_limited_and_clears_once() {
        let mut a = Alert::default();
        let t0 = Instant::now();
        let repeat = Duration::from_secs(10);
        assert_eq!(a.check(5, 10, t0, repeat), AlertEvent::Quiet);
        assert_eq!(a.check(10, 10, t0, repeat), AlertEvent::Raised);
        assert!(a.is_raised());
        assert_eq!(
            a.check(20, 10, t0 + Duration::from_secs(1), repeat),
            AlertEvent::Quiet
        );
        assert_eq!(
            a.check(20, 10, t0 + Duration::from_secs(11), repeat),
            AlertEvent::StillRaised
        );
        assert_eq!(
            a.check(0, 10, t0 + Duration::from_secs(12), repeat),
            AlertEvent::Cleared
        );
        assert_eq!(
            a.check(0, 10, t0 + Duration::from_secs(13), repeat),
            AlertEvent::Quiet
        );
        assert!(!a.is_raised());
    }

    #[test]
    fn zero_threshold_is_off() {
        let mut a = Alert::default();
        assert_eq!(
            a.check(u64::MAX, 0, Instant::now(), Duration::ZERO),
            AlertEvent::Quiet
        );
    }
}
