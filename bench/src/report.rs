//! The JSON report every scenario writes with `--json FILE`. The schema is fixed and documented
//! in `bench/SCHEMA.md`; `schema_version` changes when a field changes meaning.

use serde::{Deserialize, Serialize};

pub const SCHEMA_VERSION: u32 = 1;

/// One scenario run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub schema_version: u32,
    /// `idle`, `login`, `chat`, `reconnect`.
    pub scenario: String,
    /// `HOST:PORT` and what spoke there.
    pub target: Target,
    /// Every flag that shaped the run, as given (sessions, rate, size, duration, tls, ...).
    pub parameters: serde_json::Map<String, serde_json::Value>,
    pub counts: Counts,
    pub rates: Rates,
    pub latency_us: Latency,
    /// `chat --sm`: from a message's scheduled send time to the server's XEP-0198 ack covering
    /// it; `null` otherwise (and in files written before it existed).
    #[serde(default)]
    pub ack_latency_us: Option<Latency>,
    pub server: Option<ProcessFigures>,
    pub client: ProcessFigures,
    pub machine: Machine,
    /// For `chat --sweep`: one entry per rate tried, in order.
    pub sweep: Vec<SweepStep>,
    /// False when anything was lost, or the scenario's own success test failed.
    pub passed: bool,
    /// Human notes: failure reasons by kind, durability mode reported by the server, etc.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Target {
    pub address: String,
    pub domain: String,
    /// `none`, `starttls` or `direct`.
    pub tls: String,
    /// Free text naming the server under test (e.g. `gateway 2 shards`, `ejabberd 23.01`).
    pub label: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Counts {
    pub established: u64,
    pub failed: u64,
    /// Failures by reason (`connect`, `tls`, `auth`, `bind`, `timeout`, `closed`, ...).
    pub failed_by_reason: std::collections::BTreeMap<String, u64>,
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    /// `chat --sm`: messages the server acknowledged to their senders (XEP-0198 `<a h/>`).
    /// Absent in files written before it existed (read as 0).
    #[serde(default)]
    pub acked: u64,
    /// Login counts, written at this level (`counts.iap_pipelined`, ...).
    #[serde(flatten)]
    pub login: LoginCounts,
}

/// What each worker counts of its logins and the report sums: a worker's result and the
/// report's `counts` both carry them. Each is absent in files written before it existed (read
/// as 0).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct LoginCounts {
    /// `login --sasl2-pipelined`: logins whose `<authenticate/>` carried a XEP-0509 config
    /// version, and refusals for a stale one (each retried once on the same stream).
    #[serde(default)]
    pub iap_pipelined: u64,
    #[serde(default)]
    pub iap_refused: u64,
    /// TLS handshakes of the measured phase that resumed a session with a ticket (`login
    /// --resume`: all of them when the server resumes; a storm without it: those that found one
    /// of the few tickets rustls's cache keeps).
    #[serde(default)]
    pub tls_resumed: u64,
    /// TLS handshakes of the measured phase whose server certificate has an Ed25519 key (the
    /// rest: ECDSA or RSA), so a run says which certificate it measured.
    #[serde(default)]
    pub tls_ed25519: u64,
}

impl LoginCounts {
    /// Adds a worker's counts to these.
    pub fn add(&mut self, other: &LoginCounts) {
        self.iap_pipelined += other.iap_pipelined;
        self.iap_refused += other.iap_refused;
        self.tls_resumed += other.tls_resumed;
        self.tls_ed25519 += other.tls_ed25519;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Rates {
    /// Sessions established per second of the ramp (idle, login, reconnect).
    pub sessions_per_second: f64,
    /// Messages sent per second, as scheduled and as achieved (chat).
    pub target_msgs_per_second: f64,
    pub sent_msgs_per_second: f64,
    pub delivered_msgs_per_second: f64,
    /// Seconds until 99% and 100% of sessions were (re)established (login, reconnect).
    pub time_to_99pct_seconds: Option<f64>,
    pub time_to_100pct_seconds: Option<f64>,
}

/// Latency percentiles in microseconds (from hdrhistogram).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Latency {
    pub samples: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// RSS and CPU of a process (the server from `--server-pid`, or the client's own processes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ProcessFigures {
    pub pid: Option<u32>,
    pub rss_before_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_after_bytes: u64,
    /// RSS with all sessions established and held, minus before, divided by sessions.
    pub bytes_per_session: Option<f64>,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    /// User CPU seconds from the start until all sessions were established and held (a login
    /// storm's logins without their teardown); `None` for the client and when not held.
    #[serde(default)]
    pub cpu_user_seconds_to_held: Option<f64>,
    /// System CPU seconds from the start until all sessions were held.
    #[serde(default)]
    pub cpu_system_seconds_to_held: Option<f64>,
    /// Kernel TCP memory from /proc/net/sockstat (`mem` pages x page size) while held.
    pub kernel_tcp_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub kernel: String,
    pub hostname: String,
    pub memory_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct SweepStep {
    pub target_msgs_per_second: f64,
    pub delivered_msgs_per_second: f64,
    pub latency_us: Latency,
    pub lost: u64,
    /// p99 stayed under the bound and nothing was lost.
    pub held: bool,
    /// `chat --sm`: ack latency of this step (see `Report::ack_latency_us`).
    #[serde(default)]
    pub ack_latency_us: Option<Latency>,
}

impl Report {
    /// A report for `scenario` against `target` with the given flags: current schema version,
    /// this machine's description (from /proc), zero counts, no sweep, not (yet) passed.
    pub fn new(
        scenario: &str,
        target: Target,
        parameters: serde_json::Map<String, serde_json::Value>,
    ) -> Report {
        Report {
            schema_version: SCHEMA_VERSION,
            scenario: scenario.to_string(),
            target,
            parameters,
            counts: Counts::default(),
            rates: Rates::default(),
            latency_us: Latency::default(),
            ack_latency_us: None,
            server: None,
            client: ProcessFigures::default(),
            machine: crate::procfs::machine(),
            sweep: Vec::new(),
            passed: false,
            notes: Vec::new(),
        }
    }

    /// The name this run goes by in plots and summaries: `target.label`, else
    /// `scenario@address`.
    pub fn label(&self) -> String {
        if self.target.label.trim().is_empty() {
            format!("{}@{}", self.scenario, self.target.address)
        } else {
            self.target.label.clone()
        }
    }

    /// The highest rate held: the delivered rate of the highest-target sweep step with
    /// `held == true`, else (no sweep, or nothing held) the run's delivered rate.
    pub fn max_held_rate(&self) -> f64 {
        self.sweep
            .iter()
            .filter(|s| s.held)
            .max_by(|a, b| {
                a.target_msgs_per_second
                    .total_cmp(&b.target_msgs_per_second)
            })
            .map(|s| s.delivered_msgs_per_second)
            .unwrap_or(self.rates.delivered_msgs_per_second)
    }

    /// The report as pretty-printed JSON (with a final newline).
    pub fn to_json(&self) -> anyhow::Result<String> {
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        Ok(text)
    }

    /// Writes the report as pretty-printed JSON to `path` (replacing it).
    pub fn write_json(&self, path: &std::path::Path) -> anyhow::Result<()> {
        use anyhow::Context as _;
        std::fs::write(path, self.to_json()?)
            .with_context(|| format!("writing report {}", path.display()))
    }

    /// Reads a report written by `write_json`; refuses another schema version.
    pub fn read_json(path: &std::path::Path) -> anyhow::Result<Report> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading report {}", path.display()))?;
        let report: Report = serde_json::from_str(&text)
            .with_context(|| format!("parsing report {}", path.display()))?;
        anyhow::ensure!(
            report.schema_version == SCHEMA_VERSION,
            "report {} has schema version {}, this build reads {}",
            path.display(),
            report.schema_version,
            SCHEMA_VERSION
        );
        Ok(report)
    }

    /// A short human summary, several lines, ending in PASSED or FAILED.
    pub fn summary_text(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let c = &self.counts;
        let r = &self.rates;
        let _ = writeln!(
            out,
            "scenario {} against {} ({}, tls {})",
            self.scenario,
            self.target.address,
            self.label(),
            if self.target.tls.is_empty() {
                "none"
            } else {
                &self.target.tls
            }
        );
        let mut sessions = format!(
            "sessions: {} established, {} failed",
            c.established, c.failed
        );
        if !c.failed_by_reason.is_empty() {
            let reasons: Vec<String> = c
                .failed_by_reason
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect();
            let _ = write!(sessions, " ({})", reasons.join(", "));
        }
        let _ = writeln!(out, "{sessions}");
        if r.sessions_per_second > 0.0 {
            let _ = write!(out, "session rate: {:.1}/s", r.sessions_per_second);
            if let Some(t) = r.time_to_99pct_seconds {
                let _ = write!(out, ", 99% in {t:.2} s");
            }
            if let Some(t) = r.time_to_100pct_seconds {
                let _ = write!(out, ", 100% in {t:.2} s");
            }
            out.push('\n');
        }
        if c.sent > 0 || c.delivered > 0 || r.target_msgs_per_second > 0.0 {
            let _ = writeln!(
                out,
                "messages: {} sent, {} delivered, {} lost, {} duplicated",
                c.sent, c.delivered, c.lost, c.duplicated
            );
            let _ = writeln!(
                out,
                "message rate: target {:.1}/s, sent {:.1}/s, delivered {:.1}/s",
                r.target_msgs_per_second, r.sent_msgs_per_second, r.delivered_msgs_per_second
            );
        }
        let l = &self.latency_us;
        if l.samples > 0 {
            let ms = |us: u64| us as f64 / 1000.0;
            let _ = writeln!(
                out,
                "latency ms ({} samples): p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                l.samples,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.p999),
                ms(l.max)
            );
        }
        if let Some(l) = self.ack_latency_us.as_ref().filter(|l| l.samples > 0) {
            let ms = |us: u64| us as f64 / 1000.0;
            let _ = writeln!(
                out,
                "XEP-0198 ack latency ms ({} samples, {} acked): p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
                l.samples,
                self.counts.acked,
                ms(l.p50),
                ms(l.p90),
                ms(l.p99),
                ms(l.max)
            );
        }
        for step in &self.sweep {
            let _ = writeln!(
                out,
                "  sweep {:.0}/s: delivered {:.1}/s, p99 {:.2} ms, lost {}, {}",
                step.target_msgs_per_second,
                step.delivered_msgs_per_second,
                step.latency_us.p99 as f64 / 1000.0,
                step.lost,
                if step.held { "held" } else { "not held" }
            );
        }
        if !self.sweep.is_empty() {
            let _ = writeln!(out, "max held rate: {:.1}/s", self.max_held_rate());
        }
        let process = |name: &str, p: &ProcessFigures, out: &mut String| {
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            let _ = write!(
                out,
                "{name}: rss {:.1} -> peak {:.1} -> {:.1} MiB, cpu {:.2} s user {:.2} s system",
                mib(p.rss_before_bytes),
                mib(p.rss_peak_bytes),
                mib(p.rss_after_bytes),
                p.cpu_user_seconds,
                p.cpu_system_seconds
            );
            if let (Some(u), Some(s)) = (p.cpu_user_seconds_to_held, p.cpu_system_seconds_to_held) {
                let _ = write!(out, " ({u:.2} s user {s:.2} s system until held)");
            }
            if let Some(b) = p.bytes_per_session {
                let _ = write!(out, ", {b:.0} bytes/session");
            }
            if let Some(k) = p.kernel_tcp_bytes {
                let _ = write!(out, ", kernel tcp {:.1} MiB", mib(k));
            }
            out.push('\n');
        };
        if let Some(server) = &self.server {
            process("server", server, &mut out);
        }
        process("client", &self.client, &mut out);
        for note in &self.notes {
            let _ = writeln!(out, "note: {note}");
        }
        out.push_str(if self.passed { "PASSED" } else { "FAILED" });
        out.push('\n');
        out
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A report with every field filled, for schema and plot tests.
    pub(crate) fn filled(label: &str, shards: u64) -> Report {
        let mut parameters = serde_json::Map::new();
        parameters.insert("sessions".into(), 1000.into());
        parameters.insert("rate".into(), 5000.0.into());
        parameters.insert("shards".into(), shards.into());
        let latency = |p50: u64| Latency {
            samples: 10_000,
            p50,
            p90: p50 * 2,
            p99: p50 * 4,
            p999: p50 * 8,
            max: p50 * 20,
        };
        let mut report = Report::new(
            "chat",
            Target {
                address: "127.0.0.1:5222".into(),
                domain: "localhost".into(),
                tls: "starttls".into(),
                label: label.into(),
            },
            parameters,
        );
        report.counts = Counts {
            established: 1000,
            failed: 2,
            failed_by_reason: [("auth".to_string(), 1), ("timeout".to_string(), 1)]
                .into_iter()
                .collect(),
            sent: 50_000,
            delivered: 49_999,
            lost: 1,
            duplicated: 0,
            acked: 49_990,
            login: LoginCounts::default(),
        };
        report.rates = Rates {
            sessions_per_second: 250.0,
            target_msgs_per_second: 5000.0,
            sent_msgs_per_second: 4999.5,
            delivered_msgs_per_second: 4999.0 * shards as f64,
            time_to_99pct_seconds: Some(3.9),
            time_to_100pct_seconds: Some(4.2),
        };
        report.latency_us = latency(850);
        report.server = Some(ProcessFigures {
            pid: Some(4242),
            rss_before_bytes: 10 << 20,
            rss_peak_bytes: 60 << 20,
            rss_after_bytes: 55 << 20,
            bytes_per_session: Some(47_185.9),
            cpu_user_seconds: 12.5,
            cpu_system_seconds: 4.25,
            cpu_user_seconds_to_held: Some(10.0),
            cpu_system_seconds_to_held: Some(3.5),
            kernel_tcp_bytes: Some(8 << 20),
        });
        report.client = ProcessFigures {
            pid: None,
            rss_before_bytes: 5 << 20,
            rss_peak_bytes: 20 << 20,
            rss_after_bytes: 18 << 20,
            bytes_per_session: None,
            cpu_user_seconds: 3.0,
            cpu_system_seconds: 1.0,
            cpu_user_seconds_to_held: None,
            cpu_system_seconds_to_held: None,
            kernel_tcp_bytes: None,
        };
        report.sweep = [1000.0, 2000.0, 4000.0, 8000.0]
            .iter()
            .enumerate()
            .map(|(i, &rate)| SweepStep {
                target_msgs_per_second: rate * shards as f64,
                delivered_msgs_per_second: rate * shards as f64 * 0.999,
                latency_us: latency(400 * (i as u64 + 1).pow(2)),
                lost: if i == 3 { 12 } else { 0 },
                held: i < 3,
                ack_latency_us: (i == 0).then(|| latency(900)),
            })
            .collect();
        report.passed = false;
        report.notes = vec!["durability: fsync per message".into()];
        report
    }

    #[test]
    fn json_schema_keys_and_round_trip() {
        let report = filled("gateway 2 shards", 2);
        let value = serde_json::to_value(&report).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = vec![
            "schema_version",
            "scenario",
            "target",
            "parameters",
            "counts",
            "rates",
            "latency_us",
            "ack_latency_us",
            "server",
            "client",
            "machine",
            "sweep",
            "passed",
            "notes",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        let mut latency_keys: Vec<&str> = object["latency_us"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        latency_keys.sort_unstable();
        assert_eq!(
            latency_keys,
            ["max", "p50", "p90", "p99", "p999", "samples"]
        );
        assert_eq!(object["schema_version"], SCHEMA_VERSION);

        let text = report.to_json().unwrap();
        let back: Report = serde_json::from_str(&text).unwrap();
        assert_eq!(back, report);

        // A run without a server pid writes `server: null` and reads back the same.
        let mut no_server = report.clone();
        no_server.server = None;
        let value = serde_json::to_value(&no_server).unwrap();
        assert!(value["server"].is_null());
        assert_eq!(serde_json::from_value::<Report>(value).unwrap(), no_server);
    }

    #[test]
    fn schema_md_example_parses() {
        let doc = include_str!("../SCHEMA.md");
        let start = doc.find("```json\n").expect("an example in SCHEMA.md") + 8;
        let end = start + doc[start..].find("```").unwrap();
        let report: Report = serde_json::from_str(&doc[start..end]).unwrap();
        assert_eq!(report.schema_version, SCHEMA_VERSION);
        assert_eq!(report.sweep.len(), 3);
        assert!((report.max_held_rate() - 3996.0).abs() < 1e-9);
    }

    #[test]
    fn files_without_the_ack_fields_still_read() {
        let report = filled("gateway", 1);
        let mut value = serde_json::to_value(&report).unwrap();
        let object = value.as_object_mut().unwrap();
        object.remove("ack_latency_us");
        object["counts"].as_object_mut().unwrap().remove("acked");
        for step in object["sweep"].as_array_mut().unwrap() {
            step.as_object_mut().unwrap().remove("ack_latency_us");
        }
        let back: Report = serde_json::from_value(value).unwrap();
        assert_eq!(back.counts.acked, 0);
        assert!(back.ack_latency_us.is_none());
        assert!(back.sweep.iter().all(|s| s.ack_latency_us.is_none()));
    }

    #[test]
    fn write_and_read_json_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let report = filled("gateway", 1);
        report.write_json(&path).unwrap();
        assert_eq!(Report::read_json(&path).unwrap(), report);
        let mut future = report.clone();
        future.schema_version = SCHEMA_VERSION + 1;
        future.write_json(&path).unwrap();
        assert!(Report::read_json(&path).is_err());
    }

    #[test]
    fn new_fills_machine_and_defaults() {
        let report = Report::new("idle", Target::default(), serde_json::Map::new());
        assert_eq!(report.schema_version, SCHEMA_VERSION);
        assert!(report.machine.cores >= 1);
        assert!(!report.passed);
        assert_eq!(report.label(), "idle@");
    }

    #[test]
    fn max_held_rate_prefers_the_highest_held_step() {
        let mut report = filled("x", 1);
        assert!((report.max_held_rate() - 3996.0).abs() < 1e-9);
        report.sweep.clear();
        assert_eq!(
            report.max_held_rate(),
            report.rates.delivered_msgs_per_second
        );
    }

    #[test]
    fn summary_text_mentions_the_figures() {
        let mut report = filled("gateway 1 shard", 1);
        let text = report.summary_text();
        for needle in [
            "chat",
            "127.0.0.1:5222",
            "1000 established, 2 failed (auth 1, timeout 1)",
            "50000 sent, 49999 delivered, 1 lost, 0 duplicated",
            "p50 0.85 p90 1.70 p99 3.40 p99.9 6.80 max 17.00",
            "47186 bytes/session",
            "FAILED",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        report.passed = true;
        assert!(report.summary_text().ends_with("PASSED\n"));
    }
}
