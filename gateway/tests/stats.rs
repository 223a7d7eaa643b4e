//! Live statistics against the real binary: alerts that fire and clear, knobs that take effect on
//! the next connection, `gateway sar` and `gateway top`. (The exact counter movements after a
//! login and a message are checked with a real Prometheus parser in tests/interop.)

mod support;

use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::*;

const CLI_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a figure may take to show: rates and alerts move once per 1 s tick.
const SETTLE: Duration = Duration::from_secs(10);

fn knob(admin: SocketAddr, name: &str, value: &str, extra: &[&str]) -> CmdOutput {
    let admin = admin.to_string();
    let mut args = vec!["knob", "--admin-addr", admin.as_str(), name, value];
    args.extend_from_slice(extra);
    run_gateway(&args, None, CLI_TIMEOUT)
}

fn set_knob(server: &Server, name: &str, value: &str) {
    let out = knob(server.admin, name, value, &[]);
    assert!(
        out.success(),
        "knob {name}={value}: {out:?}\n{}",
        server.log()
    );
}

/// Polls `path` until `accept` holds; panics past `SETTLE` with the last body.
fn wait_for(server: &Server, path: &str, accept: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + SETTLE;
    loop {
        let body = http_get(server.admin, path)
            .map(|(_, b)| b)
            .unwrap_or_default();
        if accept(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never matched; last:\n{body}\n--- log ---\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn mesh_alert_fires_when_the_queue_fills_and_clears_when_it_drains() {
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new().users(&[&a, &b]).start();
    let mut alice = server.login(&a, "r");
    let mut bob = server.login(&b, "r");
    let to = bob.jid.clone().expect("bound");
    set_knob(&server, "alert_mesh_queue_batches", "4");
    set_knob(&server, "mesh_receive_paused", "true");
    assert_eq!(http_get(server.admin, "/alerts").unwrap().1.trim(), "[]");

    // One stanza per write and a pause between them: each goes out in its own mesh batch, and
    // shard 1 takes none of them off the channel while paused.
    const MESSAGES: usize = 12;
    for i in 0..MESSAGES {
        alice.send(&format!(
            "<message to='{to}' type='chat' id='m{i}'><body>{i}</body></message>"
        ));
        std::thread::sleep(Duration::from_millis(20));
    }
    let alerts = wait_for(&server, "/alerts", |b| b.contains("mesh_queue"));
    assert!(alerts.contains("\"peer\": 1"), "{alerts}");
    let metrics = http_get(server.admin, "/metrics").unwrap().1;
    assert!(
        metrics.contains("gateway_alert{shard=\"0\",alert=\"mesh_queue\",peer=\"1\"} 1"),
        "{metrics}"
    );
    assert!(server.log().contains("alert raised"), "{}", server.log());

    set_knob(&server, "mesh_receive_paused", "false");
    for i in 0..MESSAGES {
        bob.expect_stanza("message", &format!("id='m{i}'"));
    }
    wait_for(&server, "/alerts", |b| b.trim() == "[]");
    let metrics = http_get(server.admin, "/metrics").unwrap().1;
    assert!(
        metrics.contains("gateway_alert{shard=\"0\",alert=\"mesh_queue\",peer=\"1\"} 0"),
        "{metrics}"
    );
    let log = server.log();
    assert_eq!(log.matches("alert cleared").count(), 1, "{log}");
}

/// True when the server answers a stream header on `c` within `wait`.
fn answers(c: &mut TcpStream, wait: Duration) -> bool {
    c.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 256];
    matches!(c.read(&mut buf), Ok(n) if n > 0)
}

#[test]
fn max_sessions_knob_takes_effect_on_the_next_connection() {
    let server = ServerBuilder::new().allow_plaintext().start();
    set_knob(&server, "max_sessions_per_shard", "1");
    // Three connections on two shards holding one each: at least one is not accepted.
    let header = Client::stream_header(DOMAIN);
    let mut conns: Vec<TcpStream> = (0..3)
        .map(|_| {
            let mut c = TcpStream::connect(server.c2s).unwrap();
            std::io::Write::write_all(&mut c, header.as_bytes()).unwrap();
            c
        })
        .collect();
    let answered: Vec<bool> = conns
        .iter_mut()
        .map(|c| answers(c, Duration::from_secs(2)))
        .collect();
    let waiting: Vec<usize> = (0..3).filter(|&i| !answered[i]).collect();
    assert!(
        !waiting.is_empty(),
        "all three accepted: {answered:?}\n{}",
        server.log()
    );
    assert!(waiting.len() < 3, "none accepted: {answered:?}");

    // Raising the knob lets the waiting connections in, without a restart.
    set_knob(&server, "max_sessions_per_shard", "100");
    for i in waiting {
        assert!(
            answers(&mut conns[i], IO_TIMEOUT),
            "connection {i} still waits"
        );
    }
    let stats = http_get(server.admin, "/stats").unwrap().1;
    assert!(stats.contains("\"max_sessions_per_shard\": 100"), "{stats}");
    assert!(
        stats.contains("\"old\": \"1\""),
        "the change is listed in /stats: {stats}"
    );
    assert!(server.log().contains("knob changed"), "{}", server.log());
}

#[test]
fn knobs_need_the_token_when_one_is_configured_and_bad_values_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gateway.toml");
    std::fs::write(&config, "admin_token = 's3cret'\n").unwrap();
    let server = ServerBuilder::new()
        .arg("--config")
        .arg(config.to_str().unwrap())
        .start();
    let refused = knob(
        server.admin,
        "accepts_per_second_per_shard",
        "5",
        &["--token", "nope"],
    );
    assert!(!refused.success());
    assert!(refused.stderr.contains("401"), "{refused:?}");
    let ok = knob(
        server.admin,
        "accepts_per_second_per_shard",
        "5",
        &["--token", "s3cret"],
    );
    assert!(ok.success(), "{ok:?}");
    assert_eq!(ok.stdout.trim(), "accepts_per_second_per_shard: 0 -> 5");
    let bad = knob(
        server.admin,
        "max_sessions_per_shard",
        "lots",
        &["--token", "s3cret"],
    );
    assert!(!bad.success());
    assert!(bad.stderr.contains("max_sessions_per_shard"), "{bad:?}");
}

#[test]
fn admin_off_loopback_without_a_token_refuses_to_start() {
    let out = run_gateway(
        &["serve", "--admin-addr", "0.0.0.0:5999"],
        None,
        CLI_TIMEOUT,
    );
    assert!(!out.success());
    assert!(out.stderr.contains("admin_token"), "{out:?}");
}

#[test]
fn sar_records_and_reads_back_and_top_prints_frames() {
    let a = users_on_shard(0, 1).remove(0);
    let server = ServerBuilder::new().user(&a).start();
    let _alice = server.login(&a, "r");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rec.jsonl");
    let admin = server.admin.to_string();
    let file_arg = file.to_str().unwrap();
    let rec = run_gateway(
        &[
            "sar",
            "record",
            "--admin-addr",
            &admin,
            "--interval",
            "200ms",
            "--count",
            "3",
            "--output",
            file_arg,
        ],
        None,
        CLI_TIMEOUT,
    );
    assert!(rec.success(), "{rec:?}");
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 3, "{text}");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let sessions: u64 = v["shards"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["sessions"].as_u64().unwrap())
            .sum();
        assert_eq!(sessions, 1, "{line}");
    }
    let show = run_gateway(&["sar", "show", file_arg], None, CLI_TIMEOUT);
    assert!(show.success(), "{show:?}");
    let lines: Vec<&str> = show.stdout.lines().collect();
    assert_eq!(
        lines.len(),
        5,
        "header, 3 samples, average:\n{}",
        show.stdout
    );
    assert!(lines[0].contains("sessions") && lines[4].starts_with("Average:"));
    for row in &lines[1..4] {
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cols[2], "1", "one session in every sample: {row}");
    }

    let top = run_gateway(
        &[
            "top",
            "--admin-addr",
            &admin,
            "--interval",
            "200ms",
            "--count",
            "2",
        ],
        None,
        CLI_TIMEOUT,
    );
    assert!(top.success(), "{top:?}");
    assert_eq!(
        top.stdout.matches("gateway top").count(),
        2,
        "{}",
        top.stdout
    );
    let rows: Vec<&str> = top
        .stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("all"))
        .collect();
    assert_eq!(rows.len(), 2, "{}", top.stdout);
    assert_eq!(
        rows[1].split_whitespace().nth(2),
        Some("1"),
        "{}",
        top.stdout
    );
}

#[test]
fn json_logs_and_the_log_level_knob() {
    let a = users_on_shard(0, 1).remove(0);
    let server = ServerBuilder::new()
        .user(&a)
        .arg("--log-format")
        .arg("json")
        .start();
    let fail_once = || {
        let mut c = Client::connect_starttls(server.c2s);
        assert!(c.auth_plain(&a, "wrong").is_err());
    };
    // At `info`, a SASL failure (logged at debug) leaves no line.
    fail_once();
    set_knob(&server, "log_level", "gateway=debug");
    fail_once();
    let deadline = Instant::now() + SETTLE;
    while !server.log().contains("c2s SASL failure") {
        assert!(
            Instant::now() < deadline,
            "no debug line after the knob:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = server.log();
    assert_eq!(log.matches("c2s SASL failure").count(), 1, "{log}");
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
    }
    assert!(log.contains("\"knob\":\"log_level\""), "{log}");
}

/// The value of `name{shard="N"}` in a `/metrics` body.
fn metric(body: &str, name: &str, shard: usize) -> Option<f64> {
    let prefix = format!("{name}{{shard=\"{shard}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn offline_figures_follow_the_queues_and_the_offline_bound_knob_takes_effect() {
    // Goal: the offline gauges and counters on /metrics are the router's (stored, held, drained),
    // and `offline_queue_messages_max` changed at run time bounds the next message.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new().users(&[&a, &b]).start();
    set_knob(&server, "offline_queue_messages_max", "3");
    let mut sender = server.login(&a, "r");
    for i in 0..5 {
        sender.send(&format!(
            "<message to='{b}@{DOMAIN}' id='k{i}' type='chat'><body>k{i}</body></message>"
        ));
    }
    for i in 3..5 {
        let err = sender.expect_stanza("message", &format!("id='k{i}'"));
        assert!(is_type(&err, "error"), "{err}");
        assert!(err.contains("<resource-constraint"), "{err}");
    }
    let body = wait_for(&server, "/metrics", |m| {
        metric(m, "gateway_offline_messages", 1) == Some(3.0)
            && metric(m, "gateway_offline_stored_total", 1) == Some(3.0)
    });
    let bytes = metric(&body, "gateway_offline_bytes", 1).expect("offline bytes");
    assert!(bytes > 3.0 * 40.0, "3 stored messages hold {bytes} bytes");
    assert_eq!(metric(&body, "gateway_offline_messages", 0), Some(0.0));
    // The recipient logs in: delivered without XEP-0198, the queue drains.
    let mut recipient = server.login(&b, "r");
    recipient.send("<presence/>");
    for i in 0..3 {
        recipient.expect_stanza("message", &format!("id='k{i}'"));
    }
    wait_for(&server, "/metrics", |m| {
        metric(m, "gateway_offline_messages", 1) == Some(0.0)
            && metric(m, "gateway_offline_bytes", 1) == Some(0.0)
            && metric(m, "gateway_offline_drained_total", 1) == Some(3.0)
    });
}

#[test]
fn durability_mode_is_in_stats_and_metrics() {
    // Goal: a benchmark report taken from the admin port says whether stored messages were
    // fsynced (the issue's "`durability = memory` ... printed in every report").
    let server = ServerBuilder::new()
        .arg("--durability")
        .arg("memory")
        .start();
    let stats = wait_for(&server, "/stats", |b| b.contains("\"durability\""));
    assert!(stats.contains("\"durability\": \"memory\""), "{stats}");
    let metrics = wait_for(&server, "/metrics", |b| b.contains("gateway_durable "));
    assert!(
        metrics.lines().any(|l| l == "gateway_durable 0"),
        "{metrics}"
    );
    let durable = ServerBuilder::new().start();
    let metrics = wait_for(&durable, "/metrics", |b| b.contains("gateway_durable "));
    assert!(
        metrics.lines().any(|l| l == "gateway_durable 1"),
        "{metrics}"
    );
}

#[test]
fn every_huge_page_mode_starts_and_a_bad_one_is_refused() {
    // Goal: `huge_pages` never stops the gateway from starting, whatever this host offers (a
    // warning says what it lacks), and a typo is refused with the key named.
    for mode in ["off", "thp", "reserved"] {
        let mut server = ServerBuilder::new().arg("--huge-pages").arg(mode).start();
        wait_for(&server, "/stats", |b| b.contains("\"durability\""));
        let log = server.log();
        let applied = log.contains("allocator pages");
        let warned = log.contains("huge pages not applied");
        // `off` needs nothing from the host; the others apply or say why not.
        assert!(
            applied != warned && (applied || mode != "off"),
            "{mode}: {log}"
        );
        server.stop();
    }
    let out = run_gateway(
        &[
            "serve",
            "--huge-pages",
            "on",
            "--data-dir",
            "/nonexistent-gw-test",
        ],
        None,
        Duration::from_secs(30),
    );
    assert!(!out.success());
    assert!(out.stderr.contains("huge_pages"), "{}", out.stderr);
}

/// The channel from one shard to another holds `MESH_CHANNEL_BATCHES_MAX` batches. When it is
/// full, the sending shard stops feeding its connections' input to the router (holds it) until the
/// peer takes batches off; once the peer does, every message arrives, in order, none lost, and
/// the sending shard serves its connections again.
#[test]
fn a_full_mesh_channel_holds_input_and_loses_nothing() {
    full_mesh_channel("uring");
}

#[test]
fn a_full_mesh_channel_holds_input_and_loses_nothing_on_tasks() {
    full_mesh_channel("tasks");
}

fn full_mesh_channel(io_engine: &str) {
    let a = users_on_shard(0, 2);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a[0], &a[1], &b])
        .arg("--io-engine")
        .arg(io_engine)
        .start();
    let mut alice = server.login(&a[0], "r");
    let mut carol = server.login(&a[1], "r");
    let mut bob = server.login(&b, "r");
    let to = bob.jid.clone().expect("bound");
    set_knob(&server, "mesh_receive_paused", "true");
    let full = || support::metric(&server, "gateway_mesh_full_total", "shard=\"0\",peer=\"1\"");
    assert_eq!(full(), 0.0);

    // One stanza per write with a pause between them: most go out in a mesh batch of their own,
    // so shard 0's channel to the paused shard 1 fills after about a thousand. The counter moves
    // on the statistics tick, so a few hundred more may be sent meanwhile (the held input waits
    // in provided buffers and socket buffers; nothing is dropped).
    const MESSAGES_MAX: usize = 6_000;
    const CHECK_EVERY_MESSAGES: usize = 100;
    let mut sent = 0;
    while full() == 0.0 {
        assert!(
            sent < MESSAGES_MAX,
            "{sent} messages and the mesh channel never filled\n{}",
            server.log()
        );
        for _ in 0..CHECK_EVERY_MESSAGES {
            alice.send(&format!(
                "<message to='{to}' type='chat' id='m{sent}'><body>{sent}</body></message>"
            ));
            sent += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    assert!(
        server.log().contains("mesh channel full, pausing reads"),
        "{}",
        server.log()
    );

    set_knob(&server, "mesh_receive_paused", "false");
    // In order and complete: a missing or reordered message makes its expect time out.
    for i in 0..sent {
        bob.expect_stanza("message", &format!("id='m{i}'"));
    }
    // Shard 0 reads its connections again.
    carol.send("<iq type='get' id='ping1'><ping xmlns='urn:xmpp:ping'/></iq>");
    carol.expect_stanza("iq", "id='ping1'");
    alice.send("<iq type='get' id='ping2'><ping xmlns='urn:xmpp:ping'/></iq>");
    alice.expect_stanza("iq", "id='ping2'");
    wait_for(&server, "/metrics", |m| {
        m.contains("gateway_mesh_queue_batches{shard=\"0\",peer=\"1\"} 0")
    });
}

/// A sender that writes as fast as it can to a recipient who reads as fast as it can: every
/// message arrives, in order, and the recipient is never closed as a slow reader. Across shards
/// and within one, on both io engines.
#[test]
fn a_flood_across_shards_reaches_a_reading_recipient_whole() {
    flood(1, "uring", false);
}

#[test]
fn a_flood_within_a_shard_reaches_a_reading_recipient_whole() {
    flood(0, "uring", false);
}

#[test]
fn a_flood_across_shards_reaches_a_reading_recipient_whole_on_tasks() {
    flood(1, "tasks", false);
}

#[test]
fn a_flood_within_a_shard_reaches_a_reading_recipient_whole_on_tasks() {
    flood(0, "tasks", false);
}

/// With XEP-0198 on both ends every message is also stored until the recipient acknowledges it,
/// and the sender's acks wait for the store.
#[test]
fn a_flood_with_stream_management_is_stored_delivered_and_acked_whole() {
    flood(1, "uring", true);
    flood(0, "uring", true);
}

const NS_SM: &str = "urn:xmpp:sm:3";

fn flood(recipient_shard: usize, io_engine: &str, sm: bool) {
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(recipient_shard, 2)
        .into_iter()
        .find(|u| *u != a)
        .expect("a second user");
    let server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--io-engine")
        .arg(io_engine)
        .start();
    let mut alice = server.login(&a, "r");
    let mut bob = server.login(&b, "r");
    if sm {
        for c in [&mut alice, &mut bob] {
            c.send(&format!("<enable xmlns='{NS_SM}'/>"));
            c.expect("<enabled");
        }
    }
    let to = bob.jid.clone().expect("bound");
    const MESSAGES: usize = 5_000;
    // With XEP-0198 the recipient acknowledges as it goes, as a client does.
    const ACK_EVERY_MESSAGES: usize = 500;
    // Large writes of many stanzas each, so the sending shard reads many per turn.
    const MESSAGES_PER_WRITE: usize = 100;
    let writer = std::thread::spawn(move || {
        let mut chunk = String::new();
        for i in 0..MESSAGES {
            chunk.push_str(&format!(
                "<message to='{to}' type='chat' id='f{i}'><body>{i}</body></message>"
            ));
            if (i + 1) % MESSAGES_PER_WRITE == 0 {
                alice.send(&chunk);
                chunk.clear();
            }
        }
        alice
    });
    for i in 0..MESSAGES {
        bob.expect_stanza("message", &format!("id='f{i}'"));
        if sm && (i + 1) % ACK_EVERY_MESSAGES == 0 {
            bob.send(&format!("<a xmlns='{NS_SM}' h='{}'/>", i + 1));
        }
    }
    let mut alice = writer.join().expect("writer");
    if sm {
        // Every message is settled (stored, or delivered and acknowledged) and acked to its
        // sender.
        alice.send(&format!("<r xmlns='{NS_SM}'/>"));
        alice.expect(&format!("<a xmlns='{NS_SM}' h='{MESSAGES}'/>"));
    }
    alice.send("<iq type='get' id='ping'><ping xmlns='urn:xmpp:ping'/></iq>");
    let pong = alice.expect_stanza("iq", "id='ping'");
    assert!(pong.contains("result"), "{pong}");
    assert_eq!(
        support::metric(&server, "gateway_undeliverable_total", ""),
        0.0,
        "{}",
        server.log()
    );
}

/// A recipient with XEP-0198 that stops reading while a flood comes: its send queue fills, the
/// server keeps the rest stored (the sender is acked for every message) instead of skipping any,
/// and when the recipient reads again it gets all of them, in order, a page at a time from the
/// store after what its queue held.
#[test]
fn a_recipient_that_stops_reading_gets_everything_in_order_when_it_reads_again() {
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new().users(&[&a, &b]).start();
    let (_alice, mut bob) = flood_an_unread_recipient(&server, &a, &b);
    assert!(
        support::metric(&server, "gateway_undeliverable_total", "") > 0.0,
        "the flood outran bob's send queue"
    );

    // Every message once, in order: no gap, no repeat.
    let ids = bob.message_ids("s", UNREAD_FLOOD_MESSAGES);
    let want: Vec<String> = (0..UNREAD_FLOOD_MESSAGES).map(|i| i.to_string()).collect();
    if ids != want {
        let first_bad = ids.iter().zip(&want).position(|(a, b)| a != b);
        panic!(
            "{} messages; first out of place at {first_bad:?}: {:?}",
            ids.len(),
            first_bad.map(|k| &ids[k.saturating_sub(3)..(k + 5).min(ids.len())])
        );
    }
    // The ack, and bob's liveness check (a ping, then a message to himself, the 6,001st stanza).
    bob.send(&format!("<a xmlns='{NS_SM}' h='{UNREAD_FLOOD_MESSAGES}'/>"));
    bob.assert_alive();
    bob.send(&format!(
        "<a xmlns='{NS_SM}' h='{}'/>",
        UNREAD_FLOOD_MESSAGES + 2
    ));
    // All acknowledged: the next login finds nothing stored.
    let mut again = server.login(&b, "again");
    again.send("<presence/>");
    assert!(
        again
            .try_expect("<message", Duration::from_millis(500))
            .is_err(),
        "nothing left stored"
    );
}

/// Messages `flood_an_unread_recipient` sends: 12 MB, more than the socket buffers and a
/// session's 1,024-stanza send queue hold, less than the offline queue's default bounds (10,000
/// messages, 16 MiB).
const UNREAD_FLOOD_MESSAGES: usize = 6_000;

/// Logs `a` and `b` in with XEP-0198, then `a` sends `b`'s full JID `UNREAD_FLOOD_MESSAGES`
/// messages of 2,000 bytes (ids `s0`, `s1`, ...) while `b` reads nothing, and waits for the
/// server's ack of them all (each stored or delivered).
fn flood_an_unread_recipient(server: &Server, a: &str, b: &str) -> (Client, Client) {
    let mut alice = server.login(a, "r");
    let mut bob = server.login(b, "r");
    for c in [&mut alice, &mut bob] {
        c.send(&format!("<enable xmlns='{NS_SM}'/>"));
        c.expect("<enabled");
    }
    // The full JID: bob sent no presence, so a message to his bare JID would only be stored.
    let to = bob.jid.clone().expect("bound");
    let body = "x".repeat(2_000);
    for i in 0..UNREAD_FLOOD_MESSAGES {
        alice.send(&format!(
            "<message to='{to}' type='chat' id='s{i}'><body>{body}</body></message>"
        ));
    }
    alice.send(&format!("<r xmlns='{NS_SM}'/>"));
    alice.expect(&format!("<a xmlns='{NS_SM}' h='{UNREAD_FLOOD_MESSAGES}'/>"));
    (alice, bob)
}

/// A recipient that stops reading is closed once its connection has taken nothing for
/// `--send-timeout-seconds` (instead of holding its socket's buffers and its session for ever),
/// on both engines, and counted; with XEP-0198 its messages stay stored, so its next login gets
/// every one, in order.
#[test]
fn a_recipient_that_stops_reading_is_closed_after_the_send_timeout() {
    stalled_recipient("uring");
}

#[test]
fn a_recipient_that_stops_reading_is_closed_after_the_send_timeout_on_tasks() {
    stalled_recipient("tasks");
}

fn stalled_recipient(io_engine: &str) {
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--io-engine")
        .arg(io_engine)
        .arg("--send-timeout-seconds")
        .arg("2")
        .start();
    let (mut alice, mut bob) = flood_an_unread_recipient(&server, &a, &b);

    let deadline = Instant::now() + Duration::from_secs(30);
    while support::metric(&server, "gateway_send_timeouts_total", "") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the stalled connection was not closed\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // What the socket held, then the close.
    bob.expect_eof();
    assert_eq!(
        support::metric(&server, "gateway_send_timeouts_total", ""),
        1.0,
        "only bob stalled"
    );

    // Nothing acknowledged, nothing lost: the next login gets all of them, once, in order.
    let mut again = server.login(&b, "again");
    again.send("<presence/>");
    let ids = again.message_ids("s", UNREAD_FLOOD_MESSAGES);
    let want: Vec<String> = (0..UNREAD_FLOOD_MESSAGES).map(|i| i.to_string()).collect();
    assert!(
        ids == want,
        "{} messages, not 0..{UNREAD_FLOOD_MESSAGES} in order",
        ids.len()
    );
    alice.assert_alive();
}

/// Two senders, one on each shard, flood one recipient at once (who reads as fast as it can):
/// each sender's messages arrive whole and in their order, nothing undeliverable.
#[test]
fn a_fan_in_flood_from_both_shards_arrives_whole_in_each_senders_order() {
    let s0 = users_on_shard(0, 1).remove(0);
    let s1 = users_on_shard(1, 1).remove(0);
    let r = users_on_shard(1, 2)
        .into_iter()
        .find(|u| *u != s1)
        .expect("a second user on shard 1");
    let server = ServerBuilder::new().users(&[&s0, &s1, &r]).start();
    let mut recipient = server.login(&r, "r");
    let to = recipient.jid.clone().expect("bound");
    const MESSAGES: usize = 4_000;
    const PER_WRITE: usize = 100;
    let writers: Vec<_> = [(s0, "a"), (s1, "b")]
        .into_iter()
        .map(|(node, tag)| {
            let mut c = server.login(&node, "r");
            let to = to.clone();
            std::thread::spawn(move || {
                for from in (0..MESSAGES).step_by(PER_WRITE) {
                    let text: String = (from..from + PER_WRITE)
                        .map(|i| {
                            format!(
                                "<message to='{to}' type='chat' id='{tag}{i}'><body>{i}</body></message>"
                            )
                        })
                        .collect();
                    c.send(&text);
                }
                c
            })
        })
        .collect();
    let mut next = [0usize; 2];
    let needle = " id='";
    while next[0] < MESSAGES || next[1] < MESSAGES {
        let text = recipient
            .try_read_until(IO_TIMEOUT, |s| {
                let i = s.find("<message")?;
                let j = s[i..].find("</message>")?;
                Some(i + j + "</message>".len())
            })
            .unwrap_or_else(|e| panic!("after {next:?}: {e}"));
        let msg = &text[text.rfind("<message").unwrap()..];
        let at = msg.find(needle).expect("id") + needle.len();
        let id = &msg[at..at + msg[at..].find('\'').unwrap()];
        let (k, n): (usize, usize) = match id.split_at(1) {
            ("a", n) => (0, n.parse().unwrap()),
            ("b", n) => (1, n.parse().unwrap()),
            _ => panic!("unexpected {msg}"),
        };
        assert_eq!(n, next[k], "sender {k}: {id} out of order");
        next[k] += 1;
    }
    for w in writers {
        w.join().expect("writer");
    }
    assert_eq!(
        support::metric(&server, "gateway_undeliverable_total", ""),
        0.0
    );
}

/// An address that failed `--auth-failures-per-address-max` logins within the window gets
/// `temporary-auth-failure` for its next logins, even with the right password, until its window
/// ends; the refusals are counted.
#[test]
fn an_address_with_too_many_failed_logins_is_refused_until_its_window_ends() {
    failed_logins_per_address("uring");
}

#[test]
fn an_address_with_too_many_failed_logins_is_refused_on_tasks() {
    failed_logins_per_address("tasks");
}

fn failed_logins_per_address(io_engine: &str) {
    let a = users_on_shard(0, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a])
        .arg("--io-engine")
        .arg(io_engine)
        // One shard: each shard counts its own failures.
        .arg("--shards")
        .arg("1")
        .arg("--auth-failures-per-address-max")
        .arg("3")
        .arg("--auth-failure-window-seconds")
        .arg("2")
        .start();
    let password = password_of(&a);
    let mut c = Client::connect_starttls(server.c2s);
    for _ in 0..2 {
        let answer = c.auth_plain(&a, "wrong").unwrap_err();
        assert!(answer.contains("<not-authorized"), "{answer}");
    }
    let mut c = Client::connect_starttls(server.c2s);
    let answer = c.auth_plain(&a, "wrong").unwrap_err();
    assert!(answer.contains("<not-authorized"), "{answer}");

    let mut c = Client::connect_starttls(server.c2s);
    let answer = c.auth_plain(&a, &password).unwrap_err();
    assert!(answer.contains("<temporary-auth-failure"), "{answer}");
    assert_eq!(
        support::metric(&server, "gateway_auth_refused_total", ""),
        1.0
    );
    // One address fits the table (the count past a full table: shared::address_limit's tests).
    assert_eq!(
        support::metric(&server, "gateway_auth_limit_untracked_total", ""),
        0.0
    );

    std::thread::sleep(Duration::from_millis(2_100));
    let mut c = Client::connect_starttls(server.c2s);
    c.auth_plain(&a, &password)
        .unwrap_or_else(|e| panic!("the window ended: {e}\n{}", server.log()));
}
