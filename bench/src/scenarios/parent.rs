//! The parent's side: start the workers, sample the server at the barriers, merge, report.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::chat::{merge_steps, MergedStep, DRAIN, DRAIN_MORE};
use super::{check_open_files, driver_config, refuse_login_only_flags, worker_main, Kind, Opts};
use crate::latency::Recorder;
use crate::report::{Counts, ProcessFigures, Report, SweepStep, Target};
use crate::workers::{unix_ms, Sampler, WorkerResult, Workers};

/// The server's figures as the parent samples them.
struct ServerWatch {
    pid: u32,
    rss_before: u64,
    cpu_before: (f64, f64),
    rss_hold: Option<u64>,
    /// (user, system) CPU seconds read when the sessions were held.
    cpu_hold: Option<(f64, f64)>,
    sampler: Sampler,
}

impl ServerWatch {
    fn start(pid: u32) -> Result<ServerWatch> {
        let rss_before = crate::procfs::rss_bytes(pid)
            .with_context(|| format!("reading RSS of --server-pid {pid}"))?;
        let cpu_before = crate::procfs::cpu_seconds(pid).unwrap_or((0.0, 0.0));
        Ok(ServerWatch {
            pid,
            rss_before,
            cpu_before,
            rss_hold: None,
            cpu_hold: None,
            sampler: Sampler::start(pid),
        })
    }

    fn hold(&mut self) {
        self.rss_hold = crate::procfs::rss_bytes(self.pid).ok();
        self.cpu_hold = crate::procfs::cpu_seconds(self.pid).ok();
    }

    fn finish(self, established: u64, kernel_tcp: Option<u64>) -> ProcessFigures {
        let peak = self.sampler.stop();
        let after = crate::procfs::rss_bytes(self.pid).unwrap_or(0);
        let cpu = crate::procfs::cpu_seconds(self.pid).unwrap_or(self.cpu_before);
        ProcessFigures {
            pid: Some(self.pid),
            rss_before_bytes: self.rss_before,
            rss_peak_bytes: peak.max(self.rss_hold.unwrap_or(0)),
            rss_after_bytes: after,
            bytes_per_session: self
                .rss_hold
                .filter(|_| established > 0)
                .map(|h| (h as f64 - self.rss_before as f64) / established as f64),
            cpu_user_seconds: cpu.0 - self.cpu_before.0,
            cpu_system_seconds: cpu.1 - self.cpu_before.1,
            cpu_user_seconds_to_held: self.cpu_hold.map(|c| c.0 - self.cpu_before.0),
            cpu_system_seconds_to_held: self.cpu_hold.map(|c| c.1 - self.cpu_before.1),
            kernel_tcp_bytes: kernel_tcp,
        }
    }
}

/// Runs scenario `kind`: `args` are the command line after the program name (handed to workers).
/// Returns the exit code (0 passed, 1 failed).
pub fn run(kind: Kind, opts: Opts, args: Vec<String>) -> Result<i32> {
    // Validate everything here, once, before starting anything.
    if kind != Kind::Login {
        refuse_login_only_flags(&opts)?;
    }
    driver_config(&opts, 0, opts.procs.max(1) as u64)?;
    check_open_files(&opts)?;
    let n = opts.procs.max(1);
    if kind == Kind::Chat && opts.local_sessions(n as u64 - 1, n as u64) < 2 {
        anyhow::bail!("chat needs at least 2 users per worker process (--users >= 2 x --procs)");
    }
    let ramp = opts.ramp_for(kind);
    let mut budget = opts.phase_budget(ramp) + Duration::from_secs(30);
    match kind {
        Kind::Idle => budget += Duration::from_secs_f64(opts.hold.max(0.0)),
        Kind::Reconnect => {
            budget += opts.phase_budget(opts.reconnect_ramp) + Duration::from_secs(5)
        }
        Kind::Chat => {
            let steps = if opts.sweep {
                opts.sweep_steps_max.max(1)
            } else {
                1
            } as u32;
            budget += (Duration::from_secs_f64(opts.duration.max(0.0))
                + DRAIN
                + DRAIN_MORE
                + Duration::from_secs(10))
                * steps
        }
        Kind::Login => {
            if opts.resume {
                budget += opts.phase_budget(ramp) + Duration::from_secs(5);
            }
        }
    }
    let deadline = Instant::now() + budget;
    let mut server = opts.server_pid.map(ServerWatch::start).transpose()?;
    let start_at = unix_ms() + if n > 1 { 500 } else { 20 };
    let mut workers = if n == 1 {
        let mut o = opts.clone();
        o.worker_index = Some(0);
        o.worker_count = Some(1);
        o.start_at_unix_ms = Some(start_at);
        Workers::in_process(move |link| worker_main(kind, o, link), deadline)
    } else {
        Workers::spawn(n, &args, start_at, deadline)?
    };
    let kernel_tcp;
    let mut sweep = Vec::new();
    let mut merged_steps: Vec<MergedStep> = Vec::new();
    match kind {
        Kind::Idle => {
            workers.barrier("ramped")?;
            workers.reply("go")?;
            std::thread::sleep(Duration::from_secs_f64(opts.hold.max(0.0) / 2.0));
            if let Some(s) = server.as_mut() {
                s.hold();
            }
            kernel_tcp = crate::procfs::kernel_tcp_bytes().ok();
            workers.barrier("held")?;
            workers.reply("go")?;
        }
        Kind::Login => {
            if opts.resume {
                // The server's figures cover the measured (resumed) phase only.
                workers.barrier("warmed")?;
                if let Some(s) = server.take() {
                    let pid = s.pid;
                    s.sampler.stop();
                    server = Some(ServerWatch::start(pid)?);
                }
                workers.reply("go")?;
            }
            workers.barrier("ramped")?;
            if let Some(s) = server.as_mut() {
                s.hold();
            }
            kernel_tcp = crate::procfs::kernel_tcp_bytes().ok();
            workers.reply("go")?;
        }
        Kind::Reconnect => {
            workers.barrier("ramped")?;
            workers.reply("go")?;
            workers.barrier("reconnected")?;
            if let Some(s) = server.as_mut() {
                s.hold();
            }
            kernel_tcp = crate::procfs::kernel_tcp_bytes().ok();
            workers.reply("go")?;
        }
        Kind::Chat => {
            workers.barrier("ramped")?;
            if let Some(s) = server.as_mut() {
                s.hold();
            }
            kernel_tcp = crate::procfs::kernel_tcp_bytes().ok();
            workers.reply("go")?;
            let steps = if opts.sweep {
                opts.sweep_steps_max.max(1)
            } else {
                1
            };
            for j in 0..steps {
                let data = workers.barrier("step")?;
                let parts: Vec<crate::workers::StepResult> = data
                    .into_iter()
                    .map(serde_json::from_value)
                    .collect::<Result<_, _>>()?;
                let m = merge_steps(&parts)?;
                let l = m.latency.summary();
                let held =
                    m.lost == 0 && m.sent > 0 && (l.p99 as f64) <= opts.p99_bound_ms * 1000.0;
                sweep.push(SweepStep {
                    target_msgs_per_second: m.rate,
                    delivered_msgs_per_second: m.delivered as f64 / m.seconds.max(1e-9),
                    latency_us: l,
                    lost: m.lost,
                    held,
                    ack_latency_us: opts.sm.then(|| m.ack_latency.summary()),
                });
                merged_steps.push(m);
                let more = opts.sweep && held && j + 1 < steps;
                workers.reply(if more { "go" } else { "stop" })?;
                if !more {
                    break;
                }
            }
        }
    }
    let results = workers.results()?;
    let report = build_report(
        kind,
        &opts,
        &results,
        server,
        kernel_tcp,
        sweep,
        merged_steps,
    )?;
    print!("{}", report.summary_text());
    if let Some(path) = &opts.json {
        report.write_json(path)?;
    }
    Ok(if report.passed { 0 } else { 1 })
}

fn build_report(
    kind: Kind,
    opts: &Opts,
    results: &[WorkerResult],
    server: Option<ServerWatch>,
    kernel_tcp: Option<u64>,
    sweep: Vec<SweepStep>,
    steps: Vec<MergedStep>,
) -> Result<Report> {
    let parameters = match serde_json::to_value(opts)? {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    let target = Target {
        address: opts.target.clone(),
        domain: opts.domain.clone(),
        tls: opts.tls.to_ascii_lowercase(),
        label: opts.label.clone(),
    };
    let mut report = Report::new(kind.name(), target, parameters);
    let mut counts = Counts::default();
    let mut login = Recorder::new();
    let mut hints = std::collections::BTreeSet::new();
    let (mut initial_established, mut initial_failed, mut dropped) = (0, 0, 0);
    let mut client = ProcessFigures {
        pid: (opts.procs <= 1).then(std::process::id),
        ..Default::default()
    };
    let mut client_growth = 0f64;
    let mut ramp_seconds = 0f64;
    for r in results {
        counts.established += r.established;
        counts.failed += r.failed;
        counts.login.add(&r.login_counts);
        for (k, v) in &r.failed_by_reason {
            *counts.failed_by_reason.entry(k.clone()).or_insert(0) += v;
        }
        hints.extend(r.hints.iter().cloned());
        login.merge(&Recorder::from_base64(&r.login_b64)?);
        initial_established += r.initial_established;
        initial_failed += r.initial_failed;
        dropped += r.dropped;
        client.rss_before_bytes += r.rss_before_bytes;
        client.rss_peak_bytes += r.rss_peak_bytes;
        client.rss_after_bytes += r.rss_after_bytes;
        client.cpu_user_seconds += r.cpu_user_seconds;
        client.cpu_system_seconds += r.cpu_system_seconds;
        client_growth += r.rss_hold_bytes as f64 - r.rss_before_bytes as f64;
        ramp_seconds = ramp_seconds.max(r.ramp_seconds);
    }
    let max_opt = |f: fn(&WorkerResult) -> Option<f64>| -> Option<f64> {
        results
            .iter()
            .map(f)
            .try_fold(0f64, |acc, v| v.map(|v| acc.max(v)))
    };
    report.rates.time_to_99pct_seconds = max_opt(|r| r.time_to_99pct_seconds);
    report.rates.time_to_100pct_seconds = max_opt(|r| r.time_to_100pct_seconds);
    if ramp_seconds > 0.0 {
        report.rates.sessions_per_second = counts.established as f64 / ramp_seconds;
    }
    if counts.established > 0 {
        client.bytes_per_session = Some(client_growth / counts.established as f64);
    }
    client.kernel_tcp_bytes = kernel_tcp;
    report.latency_us = login.summary();
    let sessions_ok = counts.established == opts.sessions && counts.failed == 0;
    report.passed = sessions_ok && dropped == 0;
    if dropped > 0 {
        report.notes.push(format!(
            "{dropped} established sessions were dropped while held"
        ));
    }
    if kind == Kind::Reconnect {
        report.notes.push(format!(
            "before the drop: {initial_established} established, {initial_failed} failed; counts are for the reconnect"
        ));
    }
    if kind == Kind::Chat {
        report.notes.push(format!(
            "users online: {} established, {} failed; latency is message latency from the scheduled send time",
            counts.established, counts.failed
        ));
        for m in &steps {
            counts.sent += m.sent;
            counts.delivered += m.delivered;
            counts.lost += m.lost;
            counts.duplicated += m.duplicated;
            counts.acked += m.acked;
            if m.unsendable > 0 {
                report.notes.push(format!(
                    "{:.0}/s: {} scheduled sends skipped (sender not online)",
                    m.rate, m.unsendable
                ));
            }
            if m.sent < m.scheduled {
                report.notes.push(format!(
                    "{:.0}/s: only {} of {} scheduled messages sent",
                    m.rate, m.sent, m.scheduled
                ));
            }
        }
        // The figures of the step that counts: the only one, or the highest that held.
        let pick = if opts.sweep {
            let held = sweep.iter().rposition(|s| s.held);
            if held.is_none() {
                report.notes.push("sweep: no rate held".into());
            }
            held.unwrap_or(0)
        } else {
            0
        };
        if let Some(m) = steps.get(pick) {
            report.rates.target_msgs_per_second = m.rate;
            report.rates.sent_msgs_per_second = m.sent as f64 / m.seconds.max(1e-9);
            report.rates.delivered_msgs_per_second = m.delivered as f64 / m.seconds.max(1e-9);
            report.latency_us = m.latency.summary();
            if opts.sm {
                report.ack_latency_us = Some(m.ack_latency.summary());
                report.notes.push(format!(
                    "XEP-0198 on (--sm): {} of {} messages acked to their senders",
                    m.acked, m.sent
                ));
            }
        }
        if opts.sweep {
            report.notes.push(format!(
                "sweep: highest rate held {:.0}/s (p99 <= {} ms, nothing lost)",
                sweep
                    .iter()
                    .filter(|s| s.held)
                    .map(|s| s.target_msgs_per_second)
                    .fold(0.0, f64::max),
                opts.p99_bound_ms
            ));
            report.passed = sessions_ok && sweep.iter().any(|s| s.held);
        } else {
            report.passed = sessions_ok
                && counts.lost == 0
                && counts.sent > 0
                && counts.duplicated == 0
                && (!opts.sm || counts.acked == counts.sent);
        }
        if opts.sweep {
            report.sweep = sweep;
        }
    }
    report.notes.extend(hints);
    report.counts = counts;
    report.server = server.map(|s| s.finish(report.counts.established, kernel_tcp));
    report.client = client;
    Ok(report)
}
