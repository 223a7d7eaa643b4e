//! Latency recording in microseconds with hdrhistogram, and merging across threads and worker
//! processes (workers send their histograms to the parent serialised with the V2 format, base64).
//!
//! Values are kept at 3 significant digits: below 2048 µs every value is exact; above, a value
//! is reported as the highest value equivalent to it at that precision (at most 0.1% high).

use crate::report::Latency;
use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;

/// 1 µs to 60 s at 3 significant digits.
pub const LATENCY_US_MAX: u64 = 60_000_000;

const SIGNIFICANT_DIGITS: u8 = 3;

pub struct Recorder {
    hist: Histogram<u64>,
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder {
            hist: Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGNIFICANT_DIGITS)
                .expect("valid histogram bounds"),
        }
    }

    /// Records one latency; values past the max are clamped (and still counted), and zero is
    /// counted as 1 µs.
    pub fn record_us(&mut self, us: u64) {
        self.hist.saturating_record(us.clamp(1, LATENCY_US_MAX));
    }

    /// Records a `Duration` as microseconds (rounded down, clamped like `record_us`).
    pub fn record(&mut self, latency: std::time::Duration) {
        self.record_us(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    /// Number of latencies recorded.
    pub fn samples(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// Forgets every recorded value (for per-step histograms in a sweep).
    pub fn clear(&mut self) {
        self.hist.reset();
    }

    /// Adds every value recorded in `other` to this one.
    pub fn merge(&mut self, other: &Recorder) {
        if self.hist.add(&other.hist).is_err() {
            // Only possible for a histogram deserialised with other bounds: re-record each
            // bucket, clamped into ours.
            for v in other.hist.iter_recorded() {
                let value = v.value_iterated_to().clamp(1, LATENCY_US_MAX);
                self.hist.saturating_record_n(value, v.count_at_value());
            }
        }
    }

    /// Sample count, p50/p90/p99/p99.9 and max; all zero when nothing was recorded.
    pub fn summary(&self) -> Latency {
        if self.hist.is_empty() {
            return Latency::default();
        }
        Latency {
            samples: self.hist.len(),
            p50: self.hist.value_at_quantile(0.5),
            p90: self.hist.value_at_quantile(0.9),
            p99: self.hist.value_at_quantile(0.99),
            p999: self.hist.value_at_quantile(0.999),
            max: self.hist.max(),
        }
    }

    /// Base64 of the V2-serialised histogram, for sending to the parent process.
    pub fn to_base64(&self) -> String {
        let mut bytes = Vec::new();
        V2Serializer::new()
            .serialize(&self.hist, &mut bytes)
            .expect("serialising a histogram into memory cannot fail");
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    pub fn from_base64(text: &str) -> anyhow::Result<Recorder> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|e| anyhow::anyhow!("latency histogram: bad base64: {e}"))?;
        let hist: Histogram<u64> = Deserializer::new()
            .deserialize(&mut bytes.as_slice())
            .map_err(|e| anyhow::anyhow!("latency histogram: bad V2 data: {e:?}"))?;
        let mut recorder = Recorder::new();
        recorder.merge(&Recorder { hist });
        Ok(recorder)
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("summary", &self.summary())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_summary_is_zero() {
        let r = Recorder::new();
        assert_eq!(r.summary(), Latency::default());
        assert!(r.is_empty());
    }

    #[test]
    fn summary_of_known_values() {
        let mut r = Recorder::new();
        for v in 1..=1000 {
            r.record_us(v);
        }
        let s = r.summary();
        assert_eq!(s.samples, 1000);
        assert_eq!(s.p50, 500);
        assert_eq!(s.p90, 900);
        assert_eq!(s.p99, 990);
        assert_eq!(s.p999, 999);
        assert_eq!(s.max, 1000);
    }

    #[test]
    fn clamps_and_counts_out_of_range_values() {
        let mut r = Recorder::new();
        r.record_us(0);
        r.record_us(u64::MAX);
        r.record(std::time::Duration::from_secs(3600));
        let s = r.summary();
        assert_eq!(s.samples, 3);
        assert!(s.max >= LATENCY_US_MAX && s.max <= LATENCY_US_MAX + LATENCY_US_MAX / 1000);
        let mut only_zero = Recorder::new();
        only_zero.record_us(0);
        assert_eq!(only_zero.summary().max, 1);
        r.clear();
        assert!(r.is_empty());
    }

    #[test]
    fn merge_equals_recording_everything_in_one() {
        let mut a = Recorder::new();
        let mut b = Recorder::new();
        let mut all = Recorder::new();
        for v in 0..5000u64 {
            let x = (v * 7919) % 250_000 + 1;
            if v % 3 == 0 {
                a.record_us(x);
            } else {
                b.record_us(x);
            }
            all.record_us(x);
        }
        a.merge(&b);
        assert_eq!(a.summary(), all.summary());
        assert_eq!(a.samples(), 5000);
    }

    #[test]
    fn base64_round_trip_keeps_counts_and_quantiles() {
        let mut r = Recorder::new();
        for v in 0..10_000u64 {
            r.record_us(v * v % 3_000_000 + 1);
        }
        r.record_us(LATENCY_US_MAX * 2);
        let text = r.to_base64();
        let back = Recorder::from_base64(&text).unwrap();
        assert_eq!(back.summary(), r.summary());
        assert_eq!(back.samples(), 10_001);
        let empty = Recorder::from_base64(&Recorder::new().to_base64()).unwrap();
        assert_eq!(empty.summary(), Latency::default());
        assert!(Recorder::from_base64("not base64!").is_err());
        assert!(Recorder::from_base64("AAAA").is_err());
    }
}
