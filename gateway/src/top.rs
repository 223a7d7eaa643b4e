//! `gateway top`: a live view of a running gateway, one row per shard, redrawn every interval
//! from the admin port's `/stats`. On a terminal the screen is cleared between frames; otherwise
//! frames are printed one after another (for logs, tests and screen captures).

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

use crate::admin_client;
use crate::stats::{ShardSnapshot, StatsSnapshot};

/// Runs `top` against `addr`: `count` frames (forever when `None`), one per `interval`.
pub fn run(addr: SocketAddr, interval: Duration, count: Option<u64>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let terminal = std::io::stdout().is_terminal();
    let mut previous: Option<StatsSnapshot> = None;
    let mut shown = 0u64;
    // Bounded by `count` when given; otherwise runs until interrupted, like top(1).
    while count.is_none_or(|c| shown < c) {
        if shown > 0 {
            std::thread::sleep(interval);
        }
        let snapshot = admin_client::stats(addr)?;
        let frame = render(addr, previous.as_ref(), &snapshot);
        if terminal {
            // Home the cursor and clear the screen.
            write!(out, "\x1b[H\x1b[2J")?;
        }
        writeln!(out, "{frame}")?;
        out.flush()?;
        previous = Some(snapshot);
        shown += 1;
    }
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn cpu_seconds(s: &ShardSnapshot) -> Option<f64> {
    s.thread
        .as_ref()
        .map(|t| t.cpu_user_seconds + t.cpu_system_seconds)
}

/// One frame: a header, a row per shard and the totals.
pub fn render(addr: SocketAddr, previous: Option<&StatsSnapshot>, s: &StatsSnapshot) -> String {
    let mut f = String::new();
    let p = &s.process;
    let elapsed =
        previous.map(|prev| (s.unix_millis.saturating_sub(prev.unix_millis)) as f64 / 1000.0);
    let process_cpu = match (previous, elapsed) {
        (Some(prev), Some(dt)) if dt > 0.0 => {
            let used = (p.cpu_user_seconds + p.cpu_system_seconds)
                - (prev.process.cpu_user_seconds + prev.process.cpu_system_seconds);
            format!("{:.0}%", 100.0 * used / dt)
        }
        _ => "-".to_owned(),
    };
    let _ = writeln!(
        f,
        "gateway top  {addr}  {}  up {:.0} s  rss {:.1} MiB  cpu {process_cpu}  threads {}{}{}",
        s.health,
        s.uptime_seconds,
        mib(p.rss_bytes),
        p.threads,
        if s.stats_enabled { "" } else { "  (stats off)" },
        if s.durability == "memory" {
            "  (durability memory: no fsync)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        f,
        "{:>5} {:>7} {:>8} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>7} {:>9} {:>5}  alerts",
        "shard",
        "conns",
        "sessions",
        "in/s 1s",
        "10s",
        "100s",
        "out/s 1s",
        "meshq",
        "sendq",
        "offline",
        "p99 route",
        "cpu"
    );
    let mut total = Totals::default();
    for sh in &s.shards {
        let mesh = sh.mesh.iter().map(|m| m.depth_batches).max().unwrap_or(0);
        let cpu = match (previous, elapsed) {
            (Some(prev), Some(dt)) if dt > 0.0 => prev
                .shards
                .iter()
                .find(|o| o.shard == sh.shard)
                .and_then(|o| Some((cpu_seconds(sh)? - cpu_seconds(o)?) / dt * 100.0))
                .map_or("-".to_owned(), |c| format!("{c:.0}%")),
            _ => "-".to_owned(),
        };
        let alerts: Vec<String> = sh
            .alerts
            .iter()
            .map(|a| match a.peer {
                Some(peer) => format!("{}->{peer}={}", a.name, a.value),
                None => format!("{}={}", a.name, a.value),
            })
            .collect();
        let _ = writeln!(
            f,
            "{:>5} {:>7} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6} {:>6} {:>7} {:>6.2} ms {:>5}  {}",
            sh.shard,
            sh.connections,
            sh.sessions,
            sh.stanzas_in_per_second[0],
            sh.stanzas_in_per_second[1],
            sh.stanzas_in_per_second[2],
            sh.stanzas_out_per_second[0],
            mesh,
            sh.send_queue_stanzas_max,
            sh.offline.messages,
            sh.routing_latency_last_tick.p99_micros as f64 / 1000.0,
            cpu,
            if alerts.is_empty() {
                "-".to_owned()
            } else {
                alerts.join(" ")
            }
        );
        total.add(sh, mesh);
    }
    let _ = writeln!(
        f,
        "{:>5} {:>7} {:>8} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>6} {:>6} {:>7} {:>6.2} ms {:>5}  {}",
        "all",
        total.connections,
        total.sessions,
        total.rates_in[0],
        total.rates_in[1],
        total.rates_in[2],
        total.rate_out,
        total.mesh,
        total.send_queue,
        total.offline,
        total.p99_micros as f64 / 1000.0,
        "",
        total.alerts
    );
    f
}

#[derive(Default)]
struct Totals {
    connections: u64,
    sessions: u64,
    rates_in: [f64; 3],
    rate_out: f64,
    mesh: u64,
    send_queue: u64,
    offline: u64,
    /// The worst shard's p99 (quantiles do not add up).
    p99_micros: u64,
    alerts: usize,
}

impl Totals {
    fn add(&mut self, sh: &ShardSnapshot, mesh: u64) {
        self.connections += sh.connections;
        self.sessions += sh.sessions;
        for (t, r) in self.rates_in.iter_mut().zip(sh.stanzas_in_per_second) {
            *t += r;
        }
        self.rate_out += sh.stanzas_out_per_second[0];
        self.mesh = self.mesh.max(mesh);
        self.send_queue = self.send_queue.max(sh.send_queue_stanzas_max);
        self.offline += sh.offline.messages;
        self.p99_micros = self.p99_micros.max(sh.routing_latency_last_tick.p99_micros);
        self.alerts += sh.alerts.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::AlertSnapshot;

    #[test]
    fn frame_has_a_row_per_shard_and_totals() {
        let mut s = StatsSnapshot {
            health: "ready".to_owned(),
            ..StatsSnapshot::default()
        };
        for i in 0..2 {
            s.shards.push(ShardSnapshot {
                shard: i,
                sessions: 10 + i as u64,
                stanzas_in_per_second: [100.0, 50.0, 5.0],
                ..ShardSnapshot::default()
            });
        }
        s.shards[1].alerts.push(AlertSnapshot {
            shard: 1,
            name: "mesh_queue".to_owned(),
            peer: Some(0),
            value: 9,
            threshold: 4,
        });
        let frame = render(([127, 0, 0, 1], 5280).into(), None, &s);
        let lines: Vec<&str> = frame.lines().collect();
        assert_eq!(lines.len(), 5, "{frame}");
        assert!(lines[3].contains("mesh_queue->0=9"), "{frame}");
        let totals: Vec<&str> = lines[4].split_whitespace().collect();
        assert_eq!(&totals[..4], ["all", "0", "21", "200.0"], "{frame}");
        assert_eq!(totals.last(), Some(&"1"), "{frame}");
    }
}
