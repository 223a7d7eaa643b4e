//! The admin HTTP port: `GET /health` (`ready` 200, or `starting` / `draining` 503), `/metrics`
//! (Prometheus text, one label per shard), `/stats` (JSON), `/alerts` (JSON), `GET /knobs` and
//! `POST /knobs` (a run-time change). Hand-written because it serves a few fixed answers on a
//! cold path; a full HTTP stack would cost more than it gives here. It runs on shard 0 and asks
//! every shard for its figures over bounded channels.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use serde::{Deserialize, Serialize};
use shared::limits::{ADMIN_REQUEST_BODY_BYTES_MAX, KNOB_CHANGES_KEPT};

use crate::knobs::Knobs;
use crate::shard::{AdminRequest, Shard};
use crate::stats::{procfs, KnobChange, ShardSnapshot, StatsSnapshot};

/// Largest request head read; the rest is ignored.
const REQUEST_HEAD_BYTES_MAX: usize = 8 * 1024;

/// How long the admin port waits for one shard's answer before reporting without it.
const SHARD_REPLY_TIMEOUT_MILLISECONDS: u64 = 2_000;

/// The body of `POST /knobs`.
#[derive(Debug, Serialize, Deserialize)]
pub struct KnobRequest {
    pub name: String,
    pub value: String,
}

struct Admin {
    shard: Rc<Shard>,
    all_ready: Arc<AtomicBool>,
    /// Every shard's admin loop, this one's included.
    shards: Vec<flume::Sender<AdminRequest>>,
    token: Option<String>,
    stats_enabled: bool,
    /// The config's `durability` (`durable` or `memory`), shown in every report.
    durability: String,
    started: Instant,
    changes: RefCell<VecDeque<KnobChange>>,
}

/// Serves the admin port until the shard stops.
pub async fn serve(
    listener: TcpListener,
    shard: Rc<Shard>,
    all_ready: Arc<AtomicBool>,
    shards: Vec<flume::Sender<AdminRequest>>,
    token: Option<String>,
    stats_enabled: bool,
    durability: String,
) {
    let admin = Rc::new(Admin {
        shard: shard.clone(),
        all_ready,
        shards,
        token: token.filter(|t| !t.is_empty()),
        stats_enabled,
        durability,
        started: Instant::now(),
        changes: RefCell::new(VecDeque::new()),
    });
    // The accept loop is unbounded by design: it is the admin port's event loop.
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.stopping.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        match accepted {
            Ok(stream) => {
                let admin = admin.clone();
                glommio::spawn_local(async move {
                    if let Err(e) = answer(stream, &admin).await {
                        tracing::debug!(error = %e, "admin request failed");
                    }
                })
                .detach();
            }
            Err(e) => tracing::warn!(error = %e, "admin accept failed"),
        }
    }
}

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Request> {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    let head_end = loop {
        if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if head.len() >= REQUEST_HEAD_BYTES_MAX {
            break head.len();
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break head.len();
        }
        head.extend_from_slice(&chunk[..n]);
    };
    let mut body = head.split_off(head_end.min(head.len()));
    let text = String::from_utf8_lossy(&head);
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let method = first.next().unwrap_or("").to_owned();
    let path = first.next().unwrap_or("").to_owned();
    let mut length = 0usize;
    let mut authorization = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = value.parse().unwrap_or(0);
        } else if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.to_owned());
        }
    }
    let length = length.min(ADMIN_REQUEST_BODY_BYTES_MAX);
    // Bounded by `ADMIN_REQUEST_BODY_BYTES_MAX`.
    while body.len() < length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(Request {
        method,
        path,
        authorization,
        body,
    })
}

async fn answer(mut stream: TcpStream, admin: &Admin) -> std::io::Result<()> {
    let request = read_request(&mut stream).await?;
    let path = request.path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (request.method.as_str(), path) {
        ("GET", "/health") => {
            let health = admin.health();
            let status = if health == "ready" {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, "text/plain", format!("{health}\n"))
        }
        ("GET", "/metrics") => {
            let snapshot = admin.collect().await;
            ("200 OK", "text/plain; version=0.0.4", prometheus(&snapshot))
        }
        ("GET", "/stats") => ("200 OK", "application/json", json(&admin.collect().await)),
        ("GET", "/alerts") => {
            let snapshot = admin.collect().await;
            let alerts: Vec<_> = snapshot.alerts().cloned().collect();
            ("200 OK", "application/json", json(&alerts))
        }
        ("GET", "/knobs") => (
            "200 OK",
            "application/json",
            json(&*admin.shard.knobs.borrow()),
        ),
        ("POST", "/knobs") => match admin.change_knob(&request).await {
            Ok(change) => ("200 OK", "application/json", json(&change)),
            Err((status, message)) => (status, "text/plain", format!("{message}\n")),
        },
        _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.close().await
}

fn json<T: Serialize>(value: &T) -> String {
    let mut s = serde_json::to_string_pretty(value).unwrap_or_else(|e| format!("\"{e}\""));
    s.push('\n');
    s
}

impl Admin {
    fn health(&self) -> &'static str {
        if self.shard.stopping.is_open() {
            "draining"
        } else if !self.all_ready.load(Ordering::Acquire) {
            "starting"
        } else {
            "ready"
        }
    }

    /// Every shard's snapshot (a shard that does not answer in time is left out and logged).
    async fn collect(&self) -> StatsSnapshot {
        let mut replies = Vec::with_capacity(self.shards.len());
        for tx in &self.shards {
            let (reply_tx, reply_rx) = flume::bounded::<ShardSnapshot>(1);
            if tx
                .send_async(AdminRequest::Snapshot(reply_tx))
                .await
                .is_ok()
            {
                replies.push(reply_rx);
            }
        }
        let mut shards = Vec::with_capacity(replies.len());
        for (i, rx) in replies.into_iter().enumerate() {
            let timeout = Duration::from_millis(SHARD_REPLY_TIMEOUT_MILLISECONDS);
            let got = futures_lite::future::or(async { rx.recv_async().await.ok() }, async {
                glommio::timer::sleep(timeout).await;
                None
            })
            .await;
            match got {
                Some(s) => shards.push(s),
                None => tracing::warn!(shard = i, "shard did not answer a statistics request"),
            }
        }
        StatsSnapshot {
            unix_millis: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            health: self.health().to_owned(),
            stats_enabled: self.stats_enabled,
            durability: self.durability.clone(),
            process: procfs::process(),
            shards,
            knobs: self.shard.knobs.borrow().clone(),
            knob_changes: self.changes.borrow().iter().cloned().collect(),
        }
    }

    /// Validates a knob change, puts it in force on every shard and remembers it.
    async fn change_knob(&self, request: &Request) -> Result<KnobChange, (&'static str, String)> {
        if let Some(token) = &self.token {
            let given = request
                .authorization
                .as_deref()
                .and_then(|a| a.strip_prefix("Bearer "));
            if given != Some(token.as_str()) {
                return Err((
                    "401 Unauthorized",
                    "a knob change needs `authorization: Bearer TOKEN` with the config's \
                     admin_token"
                        .to_owned(),
                ));
            }
        }
        let knob: KnobRequest = serde_json::from_slice(&request.body).map_err(|e| {
            (
                "400 Bad Request",
                format!("body must be JSON {{\"name\": ..., \"value\": ...}}: {e}"),
            )
        })?;
        let mut knobs: Knobs = self.shard.knobs.borrow().clone();
        let old = knobs
            .set(&knob.name, &knob.value)
            .map_err(|e| ("400 Bad Request", e.to_string()))?;
        let new = knobs.get(&knob.name).unwrap_or_default();
        if knob.name == "log_level" {
            crate::logging::set_filter(&new).map_err(|e| ("500 Internal Server Error", e))?;
        }
        for (i, tx) in self.shards.iter().enumerate() {
            let (reply_tx, reply_rx) = flume::bounded(1);
            let sent = tx
                .send_async(AdminRequest::SetKnobs(knobs.clone(), reply_tx))
                .await;
            if sent.is_err() || reply_rx.recv_async().await.is_err() {
                return Err((
                    "503 Service Unavailable",
                    format!("shard {i} is stopping; the change may be partial"),
                ));
            }
        }
        tracing::info!(knob = %knob.name, old = %old, new = %new, "knob changed");
        let change = KnobChange {
            unix_seconds: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            name: knob.name,
            old,
            new,
        };
        let mut changes = self.changes.borrow_mut();
        if changes.len() >= KNOB_CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back(change.clone());
        Ok(change)
    }
}

/// Extra labels of one sample, rendered: `direction="in",kind="iq"`.
fn labels(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(",")
}

/// The samples of one per-shard family, by extra labels (empty: the shard label alone).
type PerShard = fn(&ShardSnapshot) -> Vec<(String, f64)>;

/// Samples: extra labels rendered, and the value.
type Samples = Vec<(String, f64)>;

fn one(v: u64) -> Vec<(String, f64)> {
    vec![(String::new(), v as f64)]
}

fn by(label: &str, values: &[(&str, u64)]) -> Vec<(String, f64)> {
    values
        .iter()
        .map(|(name, v)| (labels(&[(label, name)]), *v as f64))
        .collect()
}

/// Every per-shard family: name, type, help, samples.
const PER_SHARD: &[(&str, &str, &str, PerShard)] = &[
    (
        "gateway_connections",
        "gauge",
        "Open connections by state.",
        |sh| {
            by(
                "state",
                &[
                    ("tls_handshake", sh.connections_tls_handshake),
                    ("auth", sh.connections_auth),
                    ("session", sh.connections_session),
                ],
            )
        },
    ),
    (
        "gateway_sessions",
        "gauge",
        "Bound sessions homed on the shard.",
        |sh| one(sh.sessions),
    ),
    (
        "gateway_accepted_total",
        "counter",
        "Connections accepted.",
        |sh| one(sh.accepted),
    ),
    (
        "gateway_handoffs_total",
        "counter",
        "Authenticated connections moved between shards.",
        |sh| {
            by(
                "direction",
                &[("in", sh.handoffs_in), ("out", sh.handoffs_out)],
            )
        },
    ),
    (
        "gateway_stanzas_total",
        "counter",
        "Stanzas routed from sessions (in) and queued to sessions (out), by kind.",
        |sh| {
            let mut v = Vec::new();
            for (dir, k) in [("in", &sh.stanzas_in), ("out", &sh.stanzas_out)] {
                for (kind, n) in [
                    ("message", k.message),
                    ("presence", k.presence),
                    ("iq", k.iq),
                    ("other", k.other),
                ] {
                    v.push((labels(&[("direction", dir), ("kind", kind)]), n as f64));
                }
            }
            v
        },
    ),
    (
        "gateway_stanzas_per_second",
        "gauge",
        "Decaying rate of stanzas over the window.",
        |sh| {
            let mut v = Vec::new();
            for (dir, r) in [
                ("in", sh.stanzas_in_per_second),
                ("out", sh.stanzas_out_per_second),
            ] {
                for (window, x) in ["1s", "10s", "100s"].iter().zip(r) {
                    v.push((labels(&[("direction", dir), ("window", window)]), x));
                }
            }
            v
        },
    ),
    (
        "gateway_bytes_total",
        "counter",
        "Bytes read from and written to client sockets (TLS records included).",
        |sh| by("direction", &[("in", sh.bytes_in), ("out", sh.bytes_out)]),
    ),
    (
        "gateway_tls_handshakes_total",
        "counter",
        "TLS handshakes completed.",
        |sh| one(sh.tls_handshakes),
    ),
    (
        "gateway_auth_refused_total",
        "counter",
        "Logins refused before any password check: their client address made \
         auth_failures_per_address_max failed logins within the window.",
        |sh| one(sh.auth_refused_address),
    ),
    (
        "gateway_auth_limit_untracked_total",
        "counter",
        "Failed logins from new client addresses that the per-address limit did not track, \
         its table (65,536 addresses per shard) being full of live windows: logins from many \
         addresses are failing; the limit lets those addresses through.",
        |sh| one(sh.auth_limit_untracked),
    ),
    (
        "gateway_send_timeouts_total",
        "counter",
        "Connections closed because their peer took none of the bytes waiting for it for \
         send_timeout_seconds (clients that stopped reading; XEP-0198 sessions are detached).",
        |sh| one(sh.send_timeouts),
    ),
    (
        "gateway_commit_pauses_total",
        "counter",
        "Times a shard paused reading connections because too much waited for the store's \
         commit in flight: actions held behind roster changes not yet committed (16,384 a \
         shard, 256 for one connection) or offline writes (16,384). The store's commits are \
         slow (see gateway_storage_latency_seconds).",
        |sh| one(sh.commit_pauses),
    ),
    (
        "gateway_connection_pauses_total",
        "counter",
        "Times one connection's reads were paused, and no one else's, until the store's \
         commit was done: 64 answers and stanzas for it or on its account waited behind a \
         roster change not yet committed (a client pipelining behind its own change, or \
         sending to one whose change waits), or its stanzas added 4,096 \
         offline writes behind the commit in flight (a sender flooding offline users while \
         the disk is slow).",
        |sh| one(sh.connection_pauses),
    ),
    (
        "gateway_recv_buffer_shortages_total",
        "counter",
        "Reads of the uring engine that found the shard's receive buffers all in use; the \
         connection waited for a buffer (nothing is lost). Rising steadily: raise \
         uring_recv_buffers, or check that uring_recv_buffer_fill is incremental (Linux 6.12).",
        |sh| one(sh.recv_buffer_shortages),
    ),
    (
        "gateway_auth_total",
        "counter",
        "SASL authentications by result.",
        |sh| {
            by(
                "result",
                &[
                    ("success", sh.auth_successes),
                    ("failure", sh.auth_failures),
                ],
            )
        },
    ),
    (
        "gateway_delivered_total",
        "counter",
        "Stanzas queued to a session.",
        |sh| one(sh.delivered),
    ),
    (
        "gateway_undeliverable_total",
        "counter",
        "Stanzas bounced because a session's send queue was full or gone.",
        |sh| one(sh.undeliverable),
    ),
    (
        "gateway_mesh_frames_total",
        "counter",
        "Frames sent to and received from other shards.",
        |sh| {
            by(
                "direction",
                &[("in", sh.mesh_frames_in), ("out", sh.mesh_frames_out)],
            )
        },
    ),
    (
        "gateway_mesh_queue_batches",
        "gauge",
        "Batches waiting on the channel from shard to peer.",
        |sh| {
            sh.mesh
                .iter()
                .map(|m| {
                    (
                        labels(&[("peer", &m.peer.to_string())]),
                        m.depth_batches as f64,
                    )
                })
                .collect()
        },
    ),
    (
        "gateway_mesh_full_total",
        "counter",
        "Times the channel from shard to peer was full (backpressure).",
        |sh| {
            sh.mesh
                .iter()
                .map(|m| {
                    (
                        labels(&[("peer", &m.peer.to_string())]),
                        m.full_events as f64,
                    )
                })
                .collect()
        },
    ),
    (
        "gateway_send_queue_stanzas_max",
        "gauge",
        "Deepest session send queue of the shard.",
        |sh| one(sh.send_queue_stanzas_max),
    ),
    (
        "gateway_send_queue_stanzas",
        "gauge",
        "Stanzas in all session send queues of the shard.",
        |sh| one(sh.send_queue_stanzas_total),
    ),
    (
        "gateway_offline_messages",
        "gauge",
        "Messages held in the shard's offline queues.",
        |sh| one(sh.offline.messages),
    ),
    (
        "gateway_offline_bytes",
        "gauge",
        "Bytes held in the shard's offline queues.",
        |sh| one(sh.offline.bytes),
    ),
    (
        "gateway_offline_stored_total",
        "counter",
        "Messages stored in offline queues.",
        |sh| one(sh.offline.stored),
    ),
    (
        "gateway_offline_drained_total",
        "counter",
        "Messages that left offline queues.",
        |sh| one(sh.offline.drained),
    ),
    (
        "gateway_alert",
        "gauge",
        "1 while a queue is past its alert threshold.",
        |sh| {
            let up = |name: &str, peer: Option<usize>| {
                u8::from(sh.alerts.iter().any(|a| a.name == name && a.peer == peer)) as f64
            };
            let mut v: Vec<(String, f64)> = sh
                .mesh
                .iter()
                .map(|m| {
                    let peer = m.peer.to_string();
                    let l = labels(&[("alert", "mesh_queue"), ("peer", &peer)]);
                    (l, up("mesh_queue", Some(m.peer)))
                })
                .collect();
            for name in ["send_queue", "offline_queue"] {
                v.push((labels(&[("alert", name), ("peer", "")]), up(name, None)));
            }
            v
        },
    ),
    (
        "gateway_shard_cpu_seconds_total",
        "counter",
        "CPU time of the shard's thread.",
        |sh| {
            sh.thread
                .iter()
                .flat_map(|t| {
                    [
                        (labels(&[("mode", "user")]), t.cpu_user_seconds),
                        (labels(&[("mode", "system")]), t.cpu_system_seconds),
                    ]
                })
                .collect()
        },
    ),
    (
        "gateway_shard_context_switches_total",
        "counter",
        "Context switches of the shard's thread.",
        |sh| {
            sh.thread
                .iter()
                .flat_map(|t| {
                    by(
                        "kind",
                        &[
                            ("voluntary", t.voluntary_context_switches),
                            ("involuntary", t.involuntary_context_switches),
                        ],
                    )
                })
                .collect()
        },
    ),
];

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Prometheus text exposition (format 0.0.4) of a snapshot: every per-shard figure with a
/// `shard` label, latency histograms as summaries in seconds.
pub fn prometheus(s: &StatsSnapshot) -> String {
    let mut out = String::with_capacity(16 * 1024);
    let p = &s.process;
    let k = &s.knobs;
    let process: [(&str, &str, &str, Samples); 8] = [
        ("gateway_up", "gauge", "1 while the gateway serves.", one(1)),
        (
            "gateway_ready",
            "gauge",
            "1 when every shard runs and the gateway is not draining.",
            one(u64::from(s.health == "ready")),
        ),
        (
            "gateway_stats_enabled",
            "gauge",
            "1 when hot-path counting (stanzas, bytes, routing latency) is on.",
            one(u64::from(s.stats_enabled)),
        ),
        (
            "gateway_durable",
            "gauge",
            "1 when stored messages are fsynced before they are acknowledged (durability = durable), 0 for memory.",
            one(u64::from(s.durability == "durable")),
        ),
        (
            "gateway_process_resident_memory_bytes",
            "gauge",
            "Resident set size of the process.",
            one(p.rss_bytes),
        ),
        (
            "gateway_process_cpu_seconds_total",
            "counter",
            "CPU time of the whole process.",
            vec![
                (labels(&[("mode", "user")]), p.cpu_user_seconds),
                (labels(&[("mode", "system")]), p.cpu_system_seconds),
            ],
        ),
        (
            "gateway_process_context_switches_total",
            "counter",
            "Context switches of the process's main thread.",
            by(
                "kind",
                &[
                    ("voluntary", p.voluntary_context_switches),
                    ("involuntary", p.involuntary_context_switches),
                ],
            ),
        ),
        (
            "gateway_knob",
            "gauge",
            "Numeric run-time knobs in force.",
            by(
                "name",
                &[
                    (
                        "accepts_per_second_per_shard",
                        k.accepts_per_second_per_shard,
                    ),
                    ("max_sessions_per_shard", k.max_sessions_per_shard),
                    ("offline_queue_messages_max", k.offline_queue_messages_max),
                    ("offline_queue_bytes_max", k.offline_queue_bytes_max),
                    ("alert_mesh_queue_batches", k.alert_mesh_queue_batches),
                    ("alert_send_queue_stanzas", k.alert_send_queue_stanzas),
                    ("alert_offline_messages", k.alert_offline_messages),
                    ("mesh_receive_paused", u64::from(k.mesh_receive_paused)),
                ],
            ),
        ),
    ];
    for (name, kind, help, samples) in process {
        family(&mut out, name, kind, help);
        for (l, v) in samples {
            match l.is_empty() {
                true => writeln!(out, "{name} {v}"),
                false => writeln!(out, "{name}{{{l}}} {v}"),
            }
            .ok();
        }
    }
    for (name, kind, help, samples) in PER_SHARD {
        family(&mut out, name, kind, help);
        for sh in &s.shards {
            for (l, v) in samples(sh) {
                let sep = if l.is_empty() { "" } else { "," };
                let _ = writeln!(out, "{name}{{shard=\"{}\"{sep}{l}}} {v}", sh.shard);
            }
        }
    }
    for (name, help, pick) in [
        (
            "gateway_routing_latency_seconds",
            "From a stanza's bytes read to the stanza queued for its recipient (or its shard).",
            (|sh: &ShardSnapshot| sh.routing_latency) as fn(&ShardSnapshot) -> _,
        ),
        (
            "gateway_storage_latency_seconds",
            "Store writes (rosters) of the shard.",
            |sh: &ShardSnapshot| sh.storage_latency,
        ),
    ] {
        family(&mut out, name, "summary", help);
        for sh in &s.shards {
            let l = pick(sh);
            let id = sh.shard;
            for (q, v) in [
                ("0.5", l.p50_micros),
                ("0.9", l.p90_micros),
                ("0.99", l.p99_micros),
                ("0.999", l.p999_micros),
            ] {
                let _ = writeln!(
                    out,
                    "{name}{{shard=\"{id}\",quantile=\"{q}\"}} {}",
                    v as f64 / 1e6
                );
            }
            let _ = writeln!(
                out,
                "{name}_sum{{shard=\"{id}\"}} {}",
                l.sum_micros as f64 / 1e6
            );
            let _ = writeln!(out, "{name}_count{{shard=\"{id}\"}} {}", l.count);
        }
    }
    out
}
