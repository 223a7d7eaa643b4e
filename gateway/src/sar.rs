//! `gateway sar`: records `/stats` samples to a file and prints a recording as a table, like
//! sar(1). The file is JSON lines, one `StatsSnapshot` per line, appended to; a recording can
//! span restarts and be read while it grows.

use std::fmt::Write as _;
use std::io::{BufRead, BufWriter, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::admin_client;
use crate::stats::StatsSnapshot;

/// Appends `count` samples (forever when `None`), one per `interval`, to `output`.
pub fn record(
    addr: SocketAddr,
    interval: Duration,
    count: Option<u64>,
    output: &Path,
) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(output)
        .with_context(|| format!("cannot open {} for appending", output.display()))?;
    let mut file = BufWriter::new(file);
    let mut taken = 0u64;
    let mut next = std::time::Instant::now();
    // Bounded by `count` when given; otherwise records until interrupted, like sar -o.
    while count.is_none_or(|c| taken < c) {
        let now = std::time::Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        }
        next += interval;
        let snapshot = admin_client::stats(addr)?;
        serde_json::to_writer(&mut file, &snapshot)?;
        file.write_all(b"\n")?;
        // Each sample reaches the file before the next wait, so a reader sees it at once.
        file.flush()
            .with_context(|| format!("writing {}", output.display()))?;
        taken += 1;
    }
    Ok(())
}

/// Reads a recording.
pub fn read(path: &Path) -> Result<Vec<StatsSnapshot>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the recording {}", path.display()))?;
    let mut samples = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let sample = serde_json::from_str(&line).with_context(|| {
            format!(
                "{} line {}: not a gateway sar sample",
                path.display(),
                i + 1
            )
        })?;
        samples.push(sample);
    }
    if samples.is_empty() {
        bail!(
            "{} holds no samples; record some with `gateway sar record`",
            path.display()
        );
    }
    Ok(samples)
}

fn clock(unix_millis: u64) -> String {
    let s = (unix_millis / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The table of a recording: one row per sample, rates over the interval before it (the first
/// row uses the server's 1 s rates), and the averages of the rates at the bottom.
pub fn table(samples: &[StatsSnapshot]) -> String {
    let mut f = String::new();
    let _ = writeln!(
        f,
        "{:>8}  {:>7} {:>8} {:>9} {:>9} {:>10} {:>10} {:>5} {:>5} {:>7} {:>9} {:>8} {:>6} {:>6}",
        "UTC",
        "conns",
        "sessions",
        "in/s",
        "out/s",
        "rx B/s",
        "tx B/s",
        "meshq",
        "sendq",
        "offline",
        "p99 ms",
        "rss MiB",
        "cpu",
        "alerts"
    );
    let mut sums = [0.0f64; 4];
    let mut rows = 0usize;
    let mut previous: Option<&StatsSnapshot> = None;
    for s in samples {
        let sum =
            |f: &dyn Fn(&crate::stats::ShardSnapshot) -> u64| s.shards.iter().map(f).sum::<u64>();
        let totals = |x: &StatsSnapshot| {
            (
                x.shards.iter().map(|s| s.stanzas_in.total()).sum::<u64>(),
                x.shards.iter().map(|s| s.stanzas_out.total()).sum::<u64>(),
                x.shards.iter().map(|s| s.bytes_in).sum::<u64>(),
                x.shards.iter().map(|s| s.bytes_out).sum::<u64>(),
            )
        };
        let now = totals(s);
        let dt = previous.map_or(0.0, |p| {
            s.unix_millis.saturating_sub(p.unix_millis) as f64 / 1000.0
        });
        // A restart between samples resets the counters: fall back to the server's own rates.
        let (rates, cpu) = match previous {
            Some(p) if dt > 0.0 && s.uptime_seconds > p.uptime_seconds => {
                let before = totals(p);
                let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
                let used = (s.process.cpu_user_seconds + s.process.cpu_system_seconds)
                    - (p.process.cpu_user_seconds + p.process.cpu_system_seconds);
                (
                    [
                        rate(now.0, before.0),
                        rate(now.1, before.1),
                        rate(now.2, before.2),
                        rate(now.3, before.3),
                    ],
                    format!("{:.0}%", 100.0 * used / dt),
                )
            }
            _ => {
                let r = |f: &dyn Fn(&crate::stats::ShardSnapshot) -> f64| {
                    s.shards.iter().map(f).sum::<f64>()
                };
                (
                    [
                        r(&|x| x.stanzas_in_per_second[0]),
                        r(&|x| x.stanzas_out_per_second[0]),
                        r(&|x| x.bytes_in_per_second[0]),
                        r(&|x| x.bytes_out_per_second[0]),
                    ],
                    "-".to_owned(),
                )
            }
        };
        for (total, r) in sums.iter_mut().zip(rates) {
            *total += r;
        }
        rows += 1;
        let mesh = s
            .shards
            .iter()
            .flat_map(|x| x.mesh.iter().map(|m| m.depth_batches))
            .max()
            .unwrap_or(0);
        let send_queue = s
            .shards
            .iter()
            .map(|x| x.send_queue_stanzas_max)
            .max()
            .unwrap_or(0);
        let p99 = s
            .shards
            .iter()
            .map(|x| x.routing_latency_last_tick.p99_micros)
            .max()
            .unwrap_or(0);
        let _ = writeln!(
            f,
            "{:>8}  {:>7} {:>8} {:>9.1} {:>9.1} {:>10.0} {:>10.0} {:>5} {:>5} {:>7} {:>9.3} {:>8.1} {:>6} {:>6}",
            clock(s.unix_millis),
            sum(&|x| x.connections),
            sum(&|x| x.sessions),
            rates[0],
            rates[1],
            rates[2],
            rates[3],
            mesh,
            send_queue,
            sum(&|x| x.offline.messages),
            p99 as f64 / 1000.0,
            s.process.rss_bytes as f64 / (1024.0 * 1024.0),
            cpu,
            s.alerts().count()
        );
        previous = Some(s);
    }
    let n = rows.max(1) as f64;
    let _ = writeln!(
        f,
        "{:>8}  {:>7} {:>8} {:>9.1} {:>9.1} {:>10.0} {:>10.0}",
        "Average:",
        "",
        "",
        sums[0] / n,
        sums[1] / n,
        sums[2] / n,
        sums[3] / n
    );
    f
}

/// Prints a recording.
pub fn show(path: &Path) -> Result<()> {
    let samples = read(path)?;
    let mut out = std::io::stdout().lock();
    write!(out, "{}", table(&samples))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{KindCounts, ShardSnapshot};

    fn sample(ms: u64, up: f64, messages: u64) -> StatsSnapshot {
        StatsSnapshot {
            unix_millis: ms,
            uptime_seconds: up,
            shards: vec![ShardSnapshot {
                stanzas_in: KindCounts {
                    message: messages,
                    ..KindCounts::default()
                },
                stanzas_in_per_second: [7.0, 0.0, 0.0],
                ..ShardSnapshot::default()
            }],
            ..StatsSnapshot::default()
        }
    }

    #[test]
    fn rates_come_from_counter_deltas_and_restarts_fall_back() {
        let t = 3_600_000;
        let samples = [
            sample(t, 10.0, 100),
            sample(t + 2000, 12.0, 300),
            sample(t + 3000, 1.0, 5),
        ];
        let table = table(&samples);
        let rows: Vec<Vec<&str>> = table
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(rows[1][0], "01:00:00");
        assert_eq!(
            rows[1][3], "7.0",
            "first row: the server's 1 s rate\n{table}"
        );
        assert_eq!(rows[2][3], "100.0", "200 messages in 2 s\n{table}");
        assert_eq!(
            rows[3][3], "7.0",
            "after a restart: the server's rate\n{table}"
        );
        assert_eq!(rows[4][0], "Average:");
        assert_eq!(rows[4][1], "38.0", "{table}");
    }
}
