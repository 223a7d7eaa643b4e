//! The worker's side of every scenario: ramp, barriers, hold, chat steps, close.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{chat, driver_config, Kind, Opts};
use crate::client::TlsMode;
use crate::driver::{offsets_histogram, probe_config_version, Driver};
use crate::latency::Recorder;
use crate::workers::{unix_ms, Link, Sampler, WorkerResult};

/// How long the XEP-0509 config version probe may wait for each read or write.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The outcome of one connect phase of this worker.
pub(super) struct Phase {
    pub established: u64,
    pub failed: u64,
    pub login: Recorder,
    pub reasons: BTreeMap<String, u64>,
    pub hints: Vec<String>,
    pub t99: Option<f64>,
    pub t100: Option<f64>,
    pub last_seconds: f64,
    /// TLS handshakes that resumed a session.
    pub resumed: u64,
    /// TLS handshakes whose server certificate has an Ed25519 key.
    pub ed25519: u64,
}

pub(super) struct Worker {
    pub opts: Opts,
    pub kind: Kind,
    pub k: u64,
    pub n: u64,
    pub driver: Driver,
    pub link: Link,
    pub epoch: Instant,
    pub progress: bool,
    pub sampler: Sampler,
    pub result: WorkerResult,
}

impl Worker {
    pub fn local(&self) -> u64 {
        self.driver.config.local_sessions
    }

    /// Prints one progress line (only worker 0 speaks; the others' share is alike).
    pub fn say(&self, line: &str, last: bool) {
        if self.k != 0 {
            return;
        }
        let share = if self.n > 1 {
            format!(" [worker 0 of {}]", self.n)
        } else {
            String::new()
        };
        if self.progress {
            eprint!(
                "\r\x1b[2K{}: {line}{share}{}",
                self.kind.name(),
                if last { "\n" } else { "" }
            );
        } else if last {
            eprintln!("{}: {line}{share}", self.kind.name());
        }
    }

    /// Connects every closed session at `rate` (for the whole run) and waits until each is
    /// established or failed.
    pub fn connect_phase(
        &mut self,
        phase_start: Instant,
        rate: Option<f64>,
        what: &str,
    ) -> Result<Phase> {
        let local_rate = rate.map(|r| r / self.n as f64);
        self.driver.connect(phase_start, local_rate);
        let deadline = phase_start + self.opts.phase_budget(rate);
        let total = self.local();
        let shared = self.driver.shared.clone();
        let mut last_print = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let e = shared.phase_established.load(Ordering::Relaxed);
            let f = shared.phase_failed.load(Ordering::Relaxed);
            if e + f >= total || Instant::now() >= deadline {
                break;
            }
            if last_print.elapsed() >= Duration::from_millis(500) {
                last_print = Instant::now();
                let secs = phase_start.elapsed().as_secs_f64().max(1e-3);
                self.say(
                    &format!(
                        "{what}: {e}/{total} established, {f} failed, {:.0}/s",
                        e as f64 / secs
                    ),
                    false,
                );
            }
        }
        let reports = self.driver.collect(Duration::from_secs(10))?;
        let mut login = Recorder::new();
        let mut offsets = offsets_histogram();
        let mut reasons = BTreeMap::new();
        let mut hints = std::collections::BTreeSet::new();
        for r in reports {
            login.merge(&r.login);
            let _ = offsets.add(&r.established_at_ms);
            for (k, v) in r.failed_by_reason {
                *reasons.entry(k).or_insert(0) += v;
            }
            hints.extend(r.hints);
        }
        let established = shared.phase_established.load(Ordering::Relaxed);
        let resumed = shared.phase_resumed.load(Ordering::Relaxed);
        let ed25519 = shared.phase_ed25519.load(Ordering::Relaxed);
        let mut failed = shared.phase_failed.load(Ordering::Relaxed);
        if established + failed < total {
            let missing = total - established - failed;
            *reasons.entry("unfinished".into()).or_insert(0) += missing;
            failed += missing;
        }
        let need = ((total as f64) * 0.99).ceil() as u64;
        let t99 = (established >= need && established > 0).then(|| {
            offsets.value_at_quantile((need as f64 / established as f64).min(1.0)) as f64 / 1000.0
        });
        let t100 = (established == total && total > 0).then(|| offsets.max() as f64 / 1000.0);
        let last_seconds = if established > 0 {
            offsets.max() as f64 / 1000.0
        } else {
            0.0
        };
        self.say(
            &format!(
                "{what}: {established}/{total} established, {failed} failed in {:.2} s{}",
                phase_start.elapsed().as_secs_f64(),
                if reasons.is_empty() {
                    String::new()
                } else {
                    format!(" {reasons:?}")
                }
            ),
            true,
        );
        Ok(Phase {
            established,
            failed,
            login,
            reasons,
            hints: hints.into_iter().collect(),
            t99,
            t100,
            last_seconds,
            resumed,
            ed25519,
        })
    }

    pub fn record_phase(&mut self, phase: &Phase) {
        let r = &mut self.result;
        r.established = phase.established;
        r.failed = phase.failed;
        r.failed_by_reason = phase.reasons.clone();
        r.hints = phase.hints.clone();
        r.login_b64 = phase.login.to_base64();
        r.time_to_99pct_seconds = phase.t99;
        r.time_to_100pct_seconds = phase.t100;
        r.ramp_seconds = phase.last_seconds;
        r.login_counts.tls_resumed = phase.resumed;
        r.login_counts.tls_ed25519 = phase.ed25519;
    }

    /// Sleeps, serving nothing (the driver threads do the work), bounded.
    pub fn sleep(&self, d: Duration) {
        std::thread::sleep(d);
    }

    pub fn own_rss(&self) -> u64 {
        crate::procfs::rss_bytes(std::process::id()).unwrap_or(0)
    }

    /// Closes every session (`</stream:stream>`) and waits a little for the server's close.
    pub fn close(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        self.driver.close_all(deadline);
        while self.driver.shared.open.load(Ordering::Relaxed) > 0
            && Instant::now() < deadline + Duration::from_millis(500)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        self.result.dropped = self.driver.shared.dropped.load(Ordering::Relaxed);
    }
}

/// Runs scenario `kind` as worker `opts.worker_index` of `opts.worker_count`.
pub fn worker_main(kind: Kind, opts: Opts, link: Link) -> Result<()> {
    let k = opts.worker_index.unwrap_or(0);
    let n = opts.worker_count.unwrap_or(1).max(1);
    let _ = crate::driver::sys::raise_nofile();
    let config = driver_config(&opts, k, n)?;
    let pipelining = config.client.sasl2_pipelined && config.client.tls != TlsMode::StartTls;
    if let (true, Some(version)) = (pipelining, &opts.iap_config_version) {
        config.client.iap.set(version);
    } else if pipelining {
        // XEP-0509: learn the config version as a client's earlier connection would have.
        match probe_config_version(&config, PROBE_TIMEOUT) {
            Ok(Some(version)) => config.client.iap.set(&version),
            Ok(None) if k == 0 => eprintln!(
                "the server advertises no XEP-0509 config version: --sasl2-pipelined logs in \
                 as --sasl2 does"
            ),
            Ok(None) => {}
            Err(e) if k == 0 => eprintln!(
                "XEP-0509 probe failed ({e:#}): sessions learn the config version from their \
                 features"
            ),
            Err(_) => {}
        }
    }
    let iap = config.client.iap.clone();
    let sessions = config.local_sessions;
    let driver = Driver::start(config)?;
    // Let the threads allocate their buffers before the baseline.
    std::thread::sleep(Duration::from_millis(50));
    let sampler = Sampler::start(std::process::id());
    let mut w = Worker {
        kind,
        k,
        n,
        driver,
        link,
        epoch: Instant::now(),
        progress: std::io::stderr().is_terminal(),
        sampler,
        result: WorkerResult {
            worker_index: k,
            sessions,
            ..Default::default()
        },
        opts,
    };
    w.result.rss_before_bytes = w.own_rss();
    // Start together with the other workers.
    if let Some(at) = w.opts.start_at_unix_ms {
        let now = unix_ms();
        if at > now {
            std::thread::sleep(Duration::from_millis((at - now).min(10_000)));
        }
    }
    let start = Instant::now();
    let outcome = run_phases(&mut w, start);
    if pipelining {
        w.result.login_counts.iap_pipelined = iap.pipelined.load(Ordering::Relaxed);
        w.result.login_counts.iap_refused = iap.mismatches.load(Ordering::Relaxed);
        w.say(
            &format!(
                "XEP-0509: {} logins pipelined, {} refused for a stale config version",
                w.result.login_counts.iap_pipelined, w.result.login_counts.iap_refused
            ),
            true,
        );
    }
    w.close();
    w.result.rss_after_bytes = w.own_rss();
    let Worker {
        driver,
        sampler,
        mut result,
        mut link,
        ..
    } = w;
    driver.stop();
    result.rss_peak_bytes = sampler.stop().max(result.rss_hold_bytes);
    if let Ok((user, sys)) = crate::procfs::cpu_seconds(std::process::id()) {
        result.cpu_user_seconds = user;
        result.cpu_system_seconds = sys;
    }
    outcome?;
    link.result(result)
}

fn run_phases(w: &mut Worker, start: Instant) -> Result<()> {
    let ramp = w.opts.ramp_for(w.kind);
    match w.kind {
        Kind::Idle => {
            let phase = w.connect_phase(start, ramp, "ramp")?;
            w.record_phase(&phase);
            w.link.barrier("ramped", serde_json::Value::Null)?;
            let hold = Duration::from_secs_f64(w.opts.hold.max(0.0));
            w.sleep(hold / 2);
            w.result.rss_hold_bytes = w.own_rss();
            w.say(
                &format!(
                    "holding {} sessions for {:.1} s",
                    phase.established,
                    hold.as_secs_f64()
                ),
                true,
            );
            w.sleep(hold - hold / 2);
            w.link.barrier("held", serde_json::Value::Null)?;
        }
        Kind::Login => {
            let mut start = start;
            if w.opts.resume {
                // Full handshakes; each session keeps its ticket, then closes.
                let warm = w.connect_phase(start, ramp, "warm-up")?;
                w.result.initial_established = warm.established;
                w.result.initial_failed = warm.failed;
                w.close();
                if let Some(pool) = &w.driver.config.tickets {
                    pool.start_lending();
                }
                // The XEP-0509 counts are the measured phase's.
                let iap = &w.driver.config.client.iap;
                iap.pipelined.store(0, Ordering::Relaxed);
                iap.mismatches.store(0, Ordering::Relaxed);
                w.link.barrier("warmed", serde_json::Value::Null)?;
                start = Instant::now();
            }
            let phase = w.connect_phase(start, ramp, "login")?;
            w.record_phase(&phase);
            w.result.rss_hold_bytes = w.own_rss();
            w.link.barrier("ramped", serde_json::Value::Null)?;
        }
        Kind::Reconnect => {
            let first = w.connect_phase(start, ramp, "connect")?;
            w.result.initial_established = first.established;
            w.result.initial_failed = first.failed;
            w.result.rss_hold_bytes = w.own_rss();
            w.link.barrier("ramped", serde_json::Value::Null)?;
            w.driver.drop_all();
            let t = Instant::now() + Duration::from_secs(5);
            while w.driver.shared.open.load(Ordering::Relaxed) > 0 && Instant::now() < t {
                std::thread::sleep(Duration::from_millis(5));
            }
            let again = w.connect_phase(Instant::now(), w.opts.reconnect_ramp, "reconnect")?;
            w.record_phase(&again);
            w.link.barrier("reconnected", serde_json::Value::Null)?;
        }
        Kind::Chat => chat::run_worker(w, start, ramp)?,
    }
    Ok(())
}
