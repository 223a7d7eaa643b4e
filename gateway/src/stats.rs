//! Per-shard statistics: plain counters and gauges in the shard's own memory (behind the shard's
//! `RefCell`, touched only by its thread), decaying rates and alerts folded in once per tick, and
//! the snapshot the admin port collects over the mesh. Nothing here is shared between threads.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use shared::limits::ALERT_REPEAT_LOG_SECONDS;
use shared::stanza::Kind;
use shared::stats::{Alert, AlertEvent, DecayingRates, LatencyHistogram, LatencySnapshot};

use crate::knobs::Knobs;

/// Where a connection stands, for the connection gauges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Phase {
    /// Not counted (closed, or handed to another shard).
    #[default]
    Gone,
    TlsHandshake,
    /// Connected, not yet a bound session (stream negotiation, SASL, bind).
    Auth,
    Session,
}

/// What a connection last reported, so a report only costs a comparison when nothing changed.
#[derive(Debug, Default)]
pub struct ConnReport {
    phase: Phase,
    auth_failures: u32,
}

impl ConnReport {
    /// A connection starting on this shard, with the SASL failures its machine already counted
    /// (on the shard it was handed from).
    pub fn starting(auth_failures: u32) -> ConnReport {
        ConnReport {
            phase: Phase::Gone,
            auth_failures,
        }
    }
}

/// A connection's phase from its driver's state.
#[inline]
pub fn phase_of(bound: bool, tls_handshaking: bool) -> Phase {
    match (bound, tls_handshaking) {
        (true, _) => Phase::Session,
        (false, true) => Phase::TlsHandshake,
        (false, false) => Phase::Auth,
    }
}

/// Counts per stanza kind: message, presence, iq, other.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KindCounts {
    pub message: u64,
    pub presence: u64,
    pub iq: u64,
    pub other: u64,
}

impl KindCounts {
    fn add(&mut self, kind: Kind) {
        match kind {
            Kind::Message => self.message += 1,
            Kind::Presence => self.presence += 1,
            Kind::Iq => self.iq += 1,
            Kind::Other => self.other += 1,
        }
    }
    pub fn total(&self) -> u64 {
        self.message + self.presence + self.iq + self.other
    }
}

/// Decaying rates of the main counters.
#[derive(Debug, Default)]
struct Rates {
    stanzas_in: DecayingRates,
    stanzas_out: DecayingRates,
    bytes_in: DecayingRates,
    bytes_out: DecayingRates,
    accepted: DecayingRates,
    offline_stored: DecayingRates,
    offline_drained: DecayingRates,
}

/// One shard's statistics.
#[derive(Debug)]
pub struct ShardStats {
    shard: usize,
    /// Hot-path counting (stanzas, bytes, routing latency) on or off (`stats_enabled`).
    enabled: bool,
    pub accepted: u64,
    pub handoffs_out: u64,
    pub handoffs_in: u64,
    pub delivered: u64,
    pub undeliverable: u64,
    pub mesh_frames_out: u64,
    pub mesh_frames_in: u64,
    /// Times the channel to each peer was found full.
    pub mesh_full: Vec<u64>,
    stanzas_in: KindCounts,
    stanzas_out: KindCounts,
    bytes_in: u64,
    bytes_out: u64,
    tls_handshakes: u64,
    auth_successes: u64,
    auth_failures: u64,
    /// Logins refused before any password check: their client address had too many failures.
    pub auth_refused_address: u64,
    /// Connections closed because their peer took none of their pending bytes for
    /// `send_timeout_seconds`.
    pub send_timeouts: u64,
    /// Times connection reads were paused because too much waited for the store's commit in
    /// flight (actions held behind roster changes, or offline writes).
    pub commit_pauses: u64,
    /// Times one connection's reads were paused until the store's commit was done: many
    /// actions for it waited behind a roster change not yet committed
    /// (`ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`), or its stanzas added many offline writes
    /// behind the commit in flight (`STORE_PENDING_WRITES_PER_CONNECTION_PAUSE`).
    pub connection_pauses: u64,
    /// Reads of the `uring` engine that found the shard's receive buffers all in use (the
    /// connection waited for one).
    pub recv_buffer_shortages: u64,
    connections_tls_handshake: u64,
    connections_auth: u64,
    connections_session: u64,
    offline_messages: u64,
    offline_bytes: u64,
    offline_stored: u64,
    offline_drained: u64,
    routing_latency: LatencyHistogram,
    /// Shared with the shard's storage adapter, which times each write.
    pub storage_latency: Rc<RefCell<LatencyHistogram>>,
    rates: Rates,
    last_tick: Instant,
    mesh_alerts: Vec<Alert>,
    send_queue_alert: Alert,
    offline_alert: Alert,
    /// Latest figures of the tick (cold-path scans), for snapshots.
    queues: QueueFigures,
}

/// Queue depths a shard measures on its cold path.
#[derive(Debug, Clone, Default)]
pub struct QueueFigures {
    /// Batches waiting on the channel to each peer (0 for the shard itself).
    pub mesh_depth_batches: Vec<u64>,
    pub send_queue_stanzas_max: u64,
    pub send_queue_stanzas_total: u64,
}

impl ShardStats {
    pub fn new(shard: usize, shards: usize, enabled: bool) -> ShardStats {
        ShardStats {
            shard,
            enabled,
            accepted: 0,
            handoffs_out: 0,
            handoffs_in: 0,
            delivered: 0,
            undeliverable: 0,
            mesh_frames_out: 0,
            mesh_frames_in: 0,
            mesh_full: vec![0; shards],
            stanzas_in: KindCounts::default(),
            stanzas_out: KindCounts::default(),
            bytes_in: 0,
            bytes_out: 0,
            tls_handshakes: 0,
            auth_successes: 0,
            auth_failures: 0,
            auth_refused_address: 0,
            send_timeouts: 0,
            commit_pauses: 0,
            connection_pauses: 0,
            recv_buffer_shortages: 0,
            connections_tls_handshake: 0,
            connections_auth: 0,
            connections_session: 0,
            offline_messages: 0,
            offline_bytes: 0,
            offline_stored: 0,
            offline_drained: 0,
            routing_latency: LatencyHistogram::default(),
            storage_latency: Rc::new(RefCell::new(LatencyHistogram::default())),
            rates: Rates::default(),
            last_tick: Instant::now(),
            mesh_alerts: vec![Alert::default(); shards],
            send_queue_alert: Alert::default(),
            offline_alert: Alert::default(),
            queues: QueueFigures {
                mesh_depth_batches: vec![0; shards],
                ..QueueFigures::default()
            },
        }
    }

    /// A stanza from a session was routed; `arrived` is when its bytes were read. The latency
    /// recorded runs from there to the stanza sitting in the recipient's send queue (local) or
    /// in the mesh batch to the recipient's shard.
    #[inline]
    pub fn stanza_routed(&mut self, kind: Kind, arrived: Instant) {
        if self.enabled {
            self.stanzas_in.add(kind);
            self.routing_latency.record_since(arrived);
        }
    }

    /// A stanza was queued to a session.
    #[inline]
    pub fn stanza_out(&mut self, kind: Kind) {
        if self.enabled {
            self.stanzas_out.add(kind);
        }
    }

    #[inline]
    pub fn bytes_in(&mut self, n: usize) {
        if self.enabled {
            self.bytes_in += n as u64;
        }
    }

    #[inline]
    pub fn bytes_out(&mut self, n: usize) {
        if self.enabled {
            self.bytes_out += n as u64;
        }
    }

    pub fn auth_succeeded(&mut self) {
        self.auth_successes += 1;
    }

    /// Takes the offline-queue figures the router keeps (it counts them at each commit):
    /// messages and bytes held now, and messages stored and drained (delivered and acknowledged,
    /// or purged for age) since start.
    pub fn set_offline(&mut self, held_messages: u64, held_bytes: u64, stored: u64, drained: u64) {
        self.offline_messages = held_messages;
        self.offline_bytes = held_bytes;
        self.offline_stored = stored;
        self.offline_drained = drained;
    }

    /// Updates the connection gauges from a connection's state. Borrows the stats only when
    /// something changed, so calling it after every event of a connection is cheap.
    pub fn report_conn(
        cell: &RefCell<ShardStats>,
        last: &mut ConnReport,
        phase: Phase,
        failures: u32,
    ) {
        if last.phase == phase && last.auth_failures == failures {
            return;
        }
        let mut s = cell.borrow_mut();
        s.auth_failures += u64::from(failures.saturating_sub(last.auth_failures));
        last.auth_failures = failures;
        if last.phase != phase {
            if last.phase == Phase::TlsHandshake && phase != Phase::Gone {
                s.tls_handshakes += 1;
            }
            if let Some(g) = s.gauge(last.phase) {
                *g = g.saturating_sub(1);
            }
            if let Some(g) = s.gauge(phase) {
                *g += 1;
            }
            last.phase = phase;
        }
    }

    fn gauge(&mut self, phase: Phase) -> Option<&mut u64> {
        match phase {
            Phase::Gone => None,
            Phase::TlsHandshake => Some(&mut self.connections_tls_handshake),
            Phase::Auth => Some(&mut self.connections_auth),
            Phase::Session => Some(&mut self.connections_session),
        }
    }

    /// Once per tick: folds counters into the rates and checks the alerts against the queue
    /// depths measured by the caller. Logs alerts raised, repeated (rate-limited) and cleared.
    pub fn tick(&mut self, now: Instant, queues: QueueFigures, knobs: &Knobs) {
        let elapsed = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        let r = &mut self.rates;
        r.stanzas_in.tick(self.stanzas_in.total(), elapsed);
        r.stanzas_out.tick(self.stanzas_out.total(), elapsed);
        r.bytes_in.tick(self.bytes_in, elapsed);
        r.bytes_out.tick(self.bytes_out, elapsed);
        r.accepted.tick(self.accepted, elapsed);
        r.offline_stored.tick(self.offline_stored, elapsed);
        r.offline_drained.tick(self.offline_drained, elapsed);
        self.routing_latency.roll();
        self.storage_latency.borrow_mut().roll();

        let repeat = Duration::from_secs(ALERT_REPEAT_LOG_SECONDS);
        let shard = self.shard;
        let check = |alert: &mut Alert, name: &str, peer, value, threshold| {
            let event = alert.check(value, threshold, now, repeat);
            log_alert(event, name, shard, peer, value, threshold);
        };
        for (peer, (alert, &depth)) in self
            .mesh_alerts
            .iter_mut()
            .zip(&queues.mesh_depth_batches)
            .enumerate()
        {
            check(
                alert,
                "mesh_queue",
                Some(peer),
                depth,
                knobs.alert_mesh_queue_batches,
            );
        }
        check(
            &mut self.send_queue_alert,
            "send_queue",
            None,
            queues.send_queue_stanzas_max,
            knobs.alert_send_queue_stanzas,
        );
        check(
            &mut self.offline_alert,
            "offline_queue",
            None,
            self.offline_messages,
            knobs.alert_offline_messages,
        );
        self.queues = queues;
    }

    /// The shard's figures now. `sessions` and `connections` come from the router and the
    /// connection table.
    pub fn snapshot(&self, sessions: u64, connections: u64, knobs: &Knobs) -> ShardSnapshot {
        let mut alerts = Vec::new();
        let mut raised = |alert: &Alert, name: &str, peer: Option<usize>, value, threshold| {
            if alert.is_raised() {
                alerts.push(AlertSnapshot {
                    shard: self.shard,
                    name: name.to_owned(),
                    peer,
                    value,
                    threshold,
                });
            }
        };
        let q = &self.queues;
        for (peer, alert) in self.mesh_alerts.iter().enumerate() {
            let depth = q.mesh_depth_batches.get(peer).copied().unwrap_or(0);
            raised(
                alert,
                "mesh_queue",
                Some(peer),
                depth,
                knobs.alert_mesh_queue_batches,
            );
        }
        raised(
            &self.send_queue_alert,
            "send_queue",
            None,
            q.send_queue_stanzas_max,
            knobs.alert_send_queue_stanzas,
        );
        raised(
            &self.offline_alert,
            "offline_queue",
            None,
            self.offline_messages,
            knobs.alert_offline_messages,
        );
        ShardSnapshot {
            shard: self.shard,
            connections,
            connections_tls_handshake: self.connections_tls_handshake,
            connections_auth: self.connections_auth,
            connections_session: self.connections_session,
            sessions,
            accepted: self.accepted,
            handoffs_in: self.handoffs_in,
            handoffs_out: self.handoffs_out,
            stanzas_in: self.stanzas_in,
            stanzas_out: self.stanzas_out,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            tls_handshakes: self.tls_handshakes,
            auth_successes: self.auth_successes,
            auth_failures: self.auth_failures,
            auth_refused_address: self.auth_refused_address,
            // Filled in by the shard, which owns the limit.
            auth_limit_untracked: 0,
            send_timeouts: self.send_timeouts,
            commit_pauses: self.commit_pauses,
            connection_pauses: self.connection_pauses,
            recv_buffer_shortages: self.recv_buffer_shortages,
            delivered: self.delivered,
            undeliverable: self.undeliverable,
            mesh_frames_in: self.mesh_frames_in,
            mesh_frames_out: self.mesh_frames_out,
            mesh: (0..self.mesh_full.len())
                .filter(|&p| p != self.shard)
                .map(|peer| MeshPeer {
                    peer,
                    depth_batches: self
                        .queues
                        .mesh_depth_batches
                        .get(peer)
                        .copied()
                        .unwrap_or(0),
                    full_events: self.mesh_full[peer],
                })
                .collect(),
            send_queue_stanzas_max: self.queues.send_queue_stanzas_max,
            send_queue_stanzas_total: self.queues.send_queue_stanzas_total,
            offline: OfflineSnapshot {
                messages: self.offline_messages,
                bytes: self.offline_bytes,
                stored: self.offline_stored,
                drained: self.offline_drained,
                stored_per_second: self.rates.offline_stored.per_second(),
                drained_per_second: self.rates.offline_drained.per_second(),
            },
            stanzas_in_per_second: self.rates.stanzas_in.per_second(),
            stanzas_out_per_second: self.rates.stanzas_out.per_second(),
            bytes_in_per_second: self.rates.bytes_in.per_second(),
            bytes_out_per_second: self.rates.bytes_out.per_second(),
            accepted_per_second: self.rates.accepted.per_second(),
            routing_latency: self.routing_latency.snapshot(),
            routing_latency_last_tick: self.routing_latency.last_window(),
            storage_latency: self.storage_latency.borrow().snapshot(),
            alerts,
            thread: None,
        }
    }
}

fn log_alert(
    event: AlertEvent,
    name: &str,
    shard: usize,
    peer: Option<usize>,
    value: u64,
    threshold: u64,
) {
    match event {
        AlertEvent::Quiet => {}
        AlertEvent::Raised => {
            tracing::warn!(
                alert = name,
                shard,
                peer,
                value,
                threshold,
                "alert raised: queue past its threshold"
            )
        }
        AlertEvent::StillRaised => {
            tracing::warn!(
                alert = name,
                shard,
                peer,
                value,
                threshold,
                "alert still raised"
            )
        }
        AlertEvent::Cleared => {
            tracing::info!(alert = name, shard, peer, value, threshold, "alert cleared")
        }
    }
}

/// One shard's figures, as served in `/stats` (and read back by `gateway top` and `sar`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardSnapshot {
    pub shard: usize,
    pub connections: u64,
    pub connections_tls_handshake: u64,
    pub connections_auth: u64,
    pub connections_session: u64,
    pub sessions: u64,
    pub accepted: u64,
    pub handoffs_in: u64,
    pub handoffs_out: u64,
    pub stanzas_in: KindCounts,
    pub stanzas_out: KindCounts,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub tls_handshakes: u64,
    pub auth_successes: u64,
    pub auth_failures: u64,
    /// Logins refused for their client address's failures (`auth_failures_per_address_max`).
    #[serde(default)]
    pub auth_refused_address: u64,
    /// Failed logins from new addresses the per-address limit did not track: its table was
    /// full of live windows (it fails open for them).
    #[serde(default)]
    pub auth_limit_untracked: u64,
    /// Connections closed for taking none of their pending bytes for `send_timeout_seconds`.
    #[serde(default)]
    pub send_timeouts: u64,
    /// Times reads were paused because too much waited for the store's commit in flight.
    #[serde(default)]
    pub commit_pauses: u64,
    /// Times one connection's reads were paused until the store's commit was done.
    #[serde(default)]
    pub connection_pauses: u64,
    /// Reads that found the receive buffers all in use (`uring` engine).
    #[serde(default)]
    pub recv_buffer_shortages: u64,
    pub delivered: u64,
    pub undeliverable: u64,
    pub mesh_frames_in: u64,
    pub mesh_frames_out: u64,
    pub mesh: Vec<MeshPeer>,
    pub send_queue_stanzas_max: u64,
    pub send_queue_stanzas_total: u64,
    pub offline: OfflineSnapshot,
    pub stanzas_in_per_second: [f64; 3],
    pub stanzas_out_per_second: [f64; 3],
    pub bytes_in_per_second: [f64; 3],
    pub bytes_out_per_second: [f64; 3],
    pub accepted_per_second: [f64; 3],
    /// Since the shard started.
    pub routing_latency: LatencySnapshot,
    /// Over the last tick (one second): what `top` and `sar` show.
    #[serde(default)]
    pub routing_latency_last_tick: LatencySnapshot,
    pub storage_latency: LatencySnapshot,
    pub alerts: Vec<AlertSnapshot>,
    /// The shard thread's CPU and context switches, where the kernel gives them.
    pub thread: Option<ThreadFigures>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MeshPeer {
    pub peer: usize,
    pub depth_batches: u64,
    pub full_events: u64,
}

/// Offline-queue figures of one shard.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OfflineSnapshot {
    pub messages: u64,
    pub bytes: u64,
    pub stored: u64,
    pub drained: u64,
    pub stored_per_second: [f64; 3],
    pub drained_per_second: [f64; 3],
}

/// One raised alert.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AlertSnapshot {
    pub shard: usize,
    pub name: String,
    pub peer: Option<usize>,
    pub value: u64,
    pub threshold: u64,
}

/// CPU time and context switches of one thread (or of the process).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ThreadFigures {
    pub tid: i32,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub voluntary_context_switches: u64,
    pub involuntary_context_switches: u64,
}

/// Whole-process figures from `/proc/self`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessFigures {
    pub pid: u32,
    pub rss_bytes: u64,
    pub threads: u64,
    pub cpu_user_seconds: f64,
    pub cpu_system_seconds: f64,
    pub voluntary_context_switches: u64,
    pub involuntary_context_switches: u64,
}

/// A knob change, as remembered for `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KnobChange {
    pub unix_seconds: u64,
    pub name: String,
    pub old: String,
    pub new: String,
}

/// Everything `/stats` serves.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub unix_millis: u64,
    pub uptime_seconds: f64,
    pub health: String,
    pub stats_enabled: bool,
    /// `durable` or `memory` (the config's `durability`); empty in recordings made before it.
    #[serde(default)]
    pub durability: String,
    pub process: ProcessFigures,
    pub shards: Vec<ShardSnapshot>,
    pub knobs: Knobs,
    pub knob_changes: Vec<KnobChange>,
}

impl StatsSnapshot {
    pub fn alerts(&self) -> impl Iterator<Item = &AlertSnapshot> {
        self.shards.iter().flat_map(|s| s.alerts.iter())
    }
}

/// Process and thread figures read from `/proc` (Linux). Missing files give `None` / zeros.
pub mod procfs {
    use super::{ProcessFigures, ThreadFigures};

    fn clock_ticks_per_second() -> f64 {
        // SAFETY: sysconf reads a constant of the running system; no memory is touched.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            ticks as f64
        } else {
            100.0
        }
    }

    /// utime and stime (seconds) from a `stat` file; the command name may hold spaces, so
    /// fields are counted after its closing parenthesis.
    fn cpu_seconds(stat: &str) -> Option<(f64, f64)> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state is field 3 of stat(5), so utime (14) and stime (15) are 11, 12.
        let utime: f64 = fields.get(11)?.parse().ok()?;
        let stime: f64 = fields.get(12)?.parse().ok()?;
        let hz = clock_ticks_per_second();
        Some((utime / hz, stime / hz))
    }

    fn status_value(status: &str, key: &str) -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    }

    pub fn process() -> ProcessFigures {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let (user, system) = cpu_seconds(&stat).unwrap_or_default();
        ProcessFigures {
            pid: std::process::id(),
            rss_bytes: status_value(&status, "VmRSS:").unwrap_or(0) * 1024,
            threads: status_value(&status, "Threads:").unwrap_or(0),
            cpu_user_seconds: user,
            cpu_system_seconds: system,
            voluntary_context_switches: status_value(&status, "voluntary_ctxt_switches:")
                .unwrap_or(0),
            involuntary_context_switches: status_value(&status, "nonvoluntary_ctxt_switches:")
                .unwrap_or(0),
        }
    }

    /// The calling thread's id.
    pub fn current_tid() -> i32 {
        // SAFETY: gettid takes no arguments and cannot fail.
        unsafe { libc::gettid() }
    }

    pub fn thread(tid: i32) -> Option<ThreadFigures> {
        let dir = format!("/proc/self/task/{tid}");
        let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
        let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
        let (user, system) = cpu_seconds(&stat)?;
        Some(ThreadFigures {
            tid,
            cpu_user_seconds: user,
            cpu_system_seconds: system,
            voluntary_context_switches: status_value(&status, "voluntary_ctxt_switches:")
                .unwrap_or(0),
            involuntary_context_switches: status_value(&status, "nonvoluntary_ctxt_switches:")
                .unwrap_or(0),
        })
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn reads_this_process_and_thread() {
            let p = super::process();
            assert!(p.rss_bytes > 0 && p.threads >= 1, "{p:?}");
            let t = super::thread(super::current_tid()).expect("own thread");
            assert!(
                t.voluntary_context_switches + t.involuntary_context_switches > 0
                    || t.cpu_user_seconds >= 0.0
            );
        }

        #[test]
        fn command_names_with_spaces_and_parens() {
            let stat = "42 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0";
            let (u, s) = super::cpu_seconds(stat).unwrap();
            let hz = super::clock_ticks_per_second();
            assert_eq!((u, s), (250.0 / hz, 50.0 / hz));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_gauges_follow_phases() {
        let cell = RefCell::new(ShardStats::new(0, 2, true));
        let mut c = ConnReport::default();
        ShardStats::report_conn(&cell, &mut c, Phase::TlsHandshake, 0);
        assert_eq!(cell.borrow().connections_tls_handshake, 1);
        ShardStats::report_conn(&cell, &mut c, Phase::Auth, 1);
        ShardStats::report_conn(&cell, &mut c, Phase::Session, 1);
        let s = cell.borrow().snapshot(1, 1, &Knobs::default());
        assert_eq!(
            (
                s.connections_tls_handshake,
                s.connections_auth,
                s.connections_session
            ),
            (0, 0, 1)
        );
        assert_eq!((s.tls_handshakes, s.auth_failures), (1, 1));
        ShardStats::report_conn(&cell, &mut c, Phase::Gone, 1);
        let s = cell.borrow().snapshot(0, 0, &Knobs::default());
        assert_eq!(s.connections_session, 0);
        assert_eq!(s.tls_handshakes, 1, "closing is not a handshake");
    }

    #[test]
    fn disabled_stats_skip_hot_path_counters() {
        let mut s = ShardStats::new(0, 1, false);
        s.stanza_routed(Kind::Message, Instant::now());
        s.stanza_out(Kind::Message);
        s.bytes_in(10);
        let snap = s.snapshot(0, 0, &Knobs::default());
        assert_eq!((snap.stanzas_in.total(), snap.bytes_in), (0, 0));
        assert_eq!(snap.routing_latency.count, 0);
    }

    #[test]
    fn mesh_alert_raises_and_clears_on_tick() {
        let mut s = ShardStats::new(0, 2, true);
        let knobs = Knobs {
            alert_mesh_queue_batches: 4,
            ..Knobs::default()
        };
        let q = |d| QueueFigures {
            mesh_depth_batches: vec![0, d],
            ..QueueFigures::default()
        };
        let t = Instant::now();
        s.tick(t, q(5), &knobs);
        let alerts = s.snapshot(0, 0, &knobs).alerts;
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            (alerts[0].name.as_str(), alerts[0].peer, alerts[0].value),
            ("mesh_queue", Some(1), 5)
        );
        s.tick(t + Duration::from_secs(1), q(0), &knobs);
        assert!(s.snapshot(0, 0, &knobs).alerts.is_empty());
    }

    #[test]
    fn offline_api_keeps_gauges_and_totals() {
        let mut s = ShardStats::new(0, 1, true);
        s.set_offline(1, 50, 2, 1);
        let o = s.snapshot(0, 0, &Knobs::default()).offline;
        assert_eq!((o.messages, o.bytes, o.stored, o.drained), (1, 50, 2, 1));
    }
}
