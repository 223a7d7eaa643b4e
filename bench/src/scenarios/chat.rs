//! `chat`: users online, then messages at a fixed total rate on an open-loop schedule (or a
//! sweep of rising rates), each from sender `j % U_local` to its partner in the same worker, so
//! one process sees both the send and the receipt. Latency is receipt time minus SCHEDULED send
//! time (so a late generator counts against the server, never hides it). Note: the driver sleeps
//! in epoll with millisecond resolution, so latency includes up to ~1 ms of timer slack.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::worker::Worker;
use crate::driver::{ChatStep, DriverConfig};
use crate::latency::Recorder;
use crate::schedule::Schedule;
use crate::workers::StepResult;

/// Extra time after the schedule for messages in flight, then at most this much more while
/// some are still missing.
pub const DRAIN: Duration = Duration::from_secs(2);
pub const DRAIN_MORE: Duration = Duration::from_secs(5);

/// The rate of sweep step `j` (or the fixed rate).
pub fn step_rate(opts: &super::Opts, j: usize) -> f64 {
    if opts.sweep {
        opts.sweep_start * opts.sweep_factor.powi(j as i32)
    } else {
        opts.rate
    }
}

/// The partner (local index) of each of this worker's `u` users. With the server's shard count,
/// partners live on a different home shard where possible; otherwise halfway round.
pub fn partners(config: &DriverConfig, u: u64, shards: Option<usize>) -> Vec<u32> {
    let halfway = |l: u64| ((l + u / 2) % u.max(1)) as u32;
    let Some(s) = shards.filter(|s| *s > 1) else {
        return (0..u).map(halfway).collect();
    };
    let homes: Vec<usize> = (0..u)
        .map(|l| shared::shard::home_shard(&config.bare_jid(l), s))
        .collect();
    let mut groups: Vec<Vec<u32>> = vec![Vec::new(); s];
    let mut rank = vec![0usize; u as usize];
    for (l, &h) in homes.iter().enumerate() {
        rank[l] = groups[h].len();
        groups[h].push(l as u32);
    }
    (0..u)
        .map(|l| {
            let h = homes[l as usize];
            (1..s)
                .map(|d| (h + d) % s)
                .find(|g| !groups[*g].is_empty())
                .map(|g| groups[g][rank[l as usize] % groups[g].len()])
                .unwrap_or_else(|| halfway(l))
        })
        .collect()
}

pub(super) fn run_worker(w: &mut Worker, start: Instant, ramp: Option<f64>) -> Result<()> {
    let phase = w.connect_phase(start, ramp, "users online")?;
    w.record_phase(&phase);
    w.result.rss_hold_bytes = w.own_rss();
    let u = w.local();
    let partners = Arc::new(partners(&w.driver.config, u, w.opts.server_shards));
    if w.link.barrier("ramped", serde_json::Value::Null)? != "go" {
        return Ok(());
    }
    let steps = if w.opts.sweep {
        w.opts.sweep_steps_max.max(1)
    } else {
        1
    };
    for j in 0..steps {
        let rate = step_rate(&w.opts, j);
        let step = run_step(w, rate, partners.clone())?;
        w.result.steps.push(step.clone());
        if w.link.barrier("step", serde_json::to_value(&step)?)? != "go" {
            break;
        }
    }
    Ok(())
}

fn run_step(w: &mut Worker, rate: f64, partners: Arc<Vec<u32>>) -> Result<StepResult> {
    let duration = Duration::from_secs_f64(w.opts.duration.max(0.0));
    let part = Schedule::new(rate, duration).part(w.k as usize, w.n as usize);
    let start = Instant::now() + Duration::from_millis(20);
    let step = Arc::new(ChatStep::new(part, start, w.epoch, w.opts.size, partners));
    w.driver.chat(&step);
    let end = start + duration;
    let mut last_print = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(
            Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())),
        );
        if last_print.elapsed() >= Duration::from_millis(500) {
            last_print = Instant::now();
            w.say(
                &format!(
                    "{rate:.0}/s: {} sent, {} delivered",
                    step.sent.load(Ordering::Relaxed),
                    step.delivered.load(Ordering::Relaxed)
                ),
                false,
            );
        }
    }
    std::thread::sleep(DRAIN);
    let more = Instant::now() + DRAIN_MORE;
    while step.delivered.load(Ordering::Relaxed) < step.sent.load(Ordering::Relaxed)
        && Instant::now() < more
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    w.driver.end_chat();
    let mut rec = Recorder::new();
    let mut ack = Recorder::new();
    for r in w.driver.collect(Duration::from_secs(10))? {
        rec.merge(&r.chat);
        ack.merge(&r.ack);
    }
    let sent = step.sent.load(Ordering::Relaxed);
    let delivered = step.delivered.load(Ordering::Relaxed);
    let result = StepResult {
        rate,
        scheduled: part.count(),
        sent,
        delivered,
        duplicated: step.duplicated.load(Ordering::Relaxed),
        lost: sent.saturating_sub(delivered),
        unsendable: step.unsendable.load(Ordering::Relaxed),
        latency_b64: rec.to_base64(),
        seconds: duration.as_secs_f64(),
        acked: step.acked.load(Ordering::Relaxed),
        ack_latency_b64: ack.to_base64(),
    };
    let l = rec.summary();
    w.say(
        &format!(
            "{rate:.0}/s: {sent} sent, {delivered} delivered, {} lost, p99 {:.2} ms",
            result.lost,
            l.p99 as f64 / 1000.0
        ),
        true,
    );
    Ok(result)
}

/// Several workers' views of one step, merged.
pub struct MergedStep {
    pub rate: f64,
    pub scheduled: u64,
    pub sent: u64,
    pub delivered: u64,
    pub duplicated: u64,
    pub lost: u64,
    pub unsendable: u64,
    pub seconds: f64,
    pub latency: Recorder,
    pub acked: u64,
    pub ack_latency: Recorder,
}

pub fn merge_steps(steps: &[StepResult]) -> Result<MergedStep> {
    let mut m = MergedStep {
        rate: steps.first().map(|s| s.rate).unwrap_or(0.0),
        scheduled: 0,
        sent: 0,
        delivered: 0,
        duplicated: 0,
        lost: 0,
        unsendable: 0,
        seconds: steps.iter().map(|s| s.seconds).fold(0.0, f64::max),
        latency: Recorder::new(),
        acked: 0,
        ack_latency: Recorder::new(),
    };
    for s in steps {
        m.scheduled += s.scheduled;
        m.sent += s.sent;
        m.delivered += s.delivered;
        m.duplicated += s.duplicated;
        m.lost += s.lost;
        m.unsendable += s.unsendable;
        m.latency.merge(&Recorder::from_base64(&s.latency_b64)?);
        m.acked += s.acked;
        if !s.ack_latency_b64.is_empty() {
            m.ack_latency
                .merge(&Recorder::from_base64(&s.ack_latency_b64)?);
        }
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{ClientConfig, Mechanism, TlsMode};

    fn config(n: u64) -> DriverConfig {
        DriverConfig {
            client: Arc::new(ClientConfig {
                domain: "localhost".into(),
                tls: TlsMode::None,
                mechanism: Mechanism::Plain,
                password: "pw".into(),
                resource: None,
                send_presence: true,
                sm: false,
                sasl2: false,
                sasl2_pipelined: false,
                iap: Arc::default(),
            }),
            tls: None,
            server_name: rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            target: "127.0.0.1:5222".parse().unwrap(),
            sources: Vec::new(),
            user_prefix: "user".into(),
            first: 1,
            worker_index: 0,
            worker_count: 1,
            local_sessions: n,
            threads: 2,
            pin: false,
            login_timeout: Duration::from_secs(30),
            handshake_only: false,
            tickets: None,
        }
    }

    #[test]
    fn partners_cross_shards_when_told() {
        let c = config(50);
        let p = partners(&c, 50, Some(2));
        let home = |l: u32| shared::shard::home_shard(&c.bare_jid(l as u64), 2);
        for (l, &q) in p.iter().enumerate() {
            assert_ne!(
                home(l as u32),
                home(q),
                "user {l} and partner {q} share a shard"
            );
        }
        let halfway = partners(&c, 50, None);
        assert_eq!(halfway[0], 25);
        assert_eq!(halfway[30], 5);
    }
}
