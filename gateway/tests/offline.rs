//! Store and forward against the real binary: offline queues across restarts and a change of
//! `--shards`, XEP-0198 acks that cover only durable messages, the per-user bound, and the crash
//! test (SIGKILL at random moments; every message acknowledged to its sender must be delivered).
//!
//! The crash test's size comes from `CRASH_RUNS` and `CRASH_MESSAGES` (defaults small for CI);
//! `scripts/crash-test.sh` runs it long.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::*;

const NS_SM: &str = "urn:xmpp:sm:3";

/// Logs in and enables XEP-0198.
fn sm_login(server: &Server, node: &str, resource: &str) -> Client {
    let mut c = server.login(node, resource);
    c.send(&format!("<enable xmlns='{NS_SM}'/>"));
    c.expect("<enabled");
    c
}

/// The highest `h` in the acks `<a h=.../>` that arrive within `timeout`, after asking with
/// `<r/>`, once one is at least `want` (or the deadline passes).
fn acked_h(c: &mut Client, want: u32, timeout: Duration) -> u32 {
    let deadline = Instant::now() + timeout;
    let mut best = 0;
    c.send(&format!("<r xmlns='{NS_SM}'/>"));
    while best < want && Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(text) = c.try_read_until(left.min(Duration::from_millis(500)), |s| {
            let i = s.find("<a xmlns='urn:xmpp:sm:3' h='")?;
            let j = s[i..].find("/>")?;
            Some(i + j + 2)
        }) else {
            c.send(&format!("<r xmlns='{NS_SM}'/>"));
            continue;
        };
        best = best.max(h_of(&text));
    }
    best
}

fn h_of(text: &str) -> u32 {
    let i = text.rfind(" h='").expect("h") + 4;
    let j = text[i..].find('\'').expect("h end");
    text[i..i + j].parse().expect("numeric h")
}

/// A chat message with a receipt request to `to` (a local part, or `node@domain/resource`).
fn chat(to: &str, id: &str) -> String {
    let to = if to.contains('@') {
        to.to_owned()
    } else {
        format!("{to}@{DOMAIN}")
    };
    format!("<message to='{to}' id='{id}' type='chat'><request xmlns='urn:xmpp:receipts'/><body>{id}</body></message>")
}

/// Logs `node` in with XEP-0198, sends initial presence and collects the ids of messages whose id
/// starts with `prefix`, until `want` distinct ones arrived and no more came for `quiet`; then
/// acknowledges everything received. Returns ids in arrival order.
fn collect(server: &Server, node: &str, prefix: &str, want: usize, quiet: Duration) -> Vec<String> {
    let mut c = sm_login(server, node, "collect");
    c.send("<presence/>");
    let mut got = Vec::new();
    let mut stanzas = 0u32;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = Instant::now();
    let needle = format!(" id='{prefix}");
    while Instant::now() < deadline {
        let distinct: BTreeSet<_> = got.iter().collect();
        if distinct.len() >= want && last.elapsed() >= quiet {
            break;
        }
        let Ok(text) = c.try_read_until(Duration::from_millis(200), |s| {
            let i = s.find("<message")?;
            let j = s[i..].find("</message>")?;
            Some(i + j + "</message>".len())
        }) else {
            continue;
        };
        stanzas += 1 + text.matches("<presence").count() as u32;
        last = Instant::now();
        let msg = &text[text.find("<message").unwrap()..];
        if let Some(i) = msg.find(&needle) {
            let rest = &msg[i + 5..];
            let id = &rest[..rest.find('\'').unwrap()];
            assert!(msg.contains("urn:xmpp:delay"), "no delay stamp: {msg}");
            got.push(id.to_owned());
        }
    }
    // Everything this session received is acknowledged, so the queue is erased.
    c.send(&format!("<a xmlns='{NS_SM}' h='{stanzas}'/>"));
    c.assert_alive();
    got
}

#[test]
fn offline_messages_survive_restart_and_a_shard_change_and_the_bound_holds() {
    // Goal: XEP-0160 end to end: a message for an offline user is stored on its home shard,
    // acked to the sender only once durable, kept across a restart and a change of --shards,
    // delivered in order after initial presence with a delay stamp; past the per-user bound the
    // sender gets resource-constraint and the store keeps what it had.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let mut server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--offline-messages-max")
        .arg("25")
        .start();
    let mut sender = sm_login(&server, &a, "r");
    for i in 0..30 {
        sender.send(&chat(&b, &format!("q{i:02}")));
    }
    for i in 25..30 {
        let err = sender.expect_stanza("message", &format!("id='q{i}'"));
        assert!(is_type(&err, "error"), "{err}");
        assert!(err.contains("<resource-constraint"), "{err}");
    }
    let h = acked_h(&mut sender, 30, Duration::from_secs(10));
    assert_eq!(h, 30, "every message is handled (stored or refused)");
    drop(sender);
    server.stop();
    server.set_args(&["--shards", "3"]);
    server.restart();
    server.stop();
    server.set_args(&["--shards", "2"]);
    server.restart();
    let want: Vec<String> = (0..25).map(|i| format!("q{i:02}")).collect();
    let got = collect(&server, &b, "q", 25, Duration::from_millis(300));
    assert_eq!(got, want, "\n--- log ---\n{}", server.log());
    // Acknowledged: erased. The next login gets nothing.
    let again = collect(&server, &b, "q", 0, Duration::from_millis(500));
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn crash_test_every_acknowledged_message_is_delivered() {
    // Goal: the durability promise. A sender streams messages to offline users on both shards
    // with XEP-0198 acks; the gateway is SIGKILLed at a random moment after some acks; after a
    // restart every message acked to the sender arrives, whatever the moment.
    let runs: usize = env_or("CRASH_RUNS", 5);
    let messages: usize = env_or("CRASH_MESSAGES", 300);
    let sender = users_on_shard(0, 1).remove(0);
    let mut recipients = users_on_shard(0, 3)[1..].to_vec();
    recipients.extend(users_on_shard(1, 2));
    let mut all = vec![sender.clone()];
    all.extend(recipients.iter().cloned());
    let mut server = ServerBuilder::new().users(&all).start();
    let (mut total_acked, mut total_delivered, mut total_lost, mut total_extra) = (0, 0, 0, 0);
    for run in 0..runs {
        let chunk = 50;
        let chunks = messages.div_ceil(chunk);
        // Kill after a random number of chunks (at least one ack seen).
        let kill_after = 1 + random_below(chunks.max(2) - 1);
        let mut c = sm_login(&server, &sender, "s");
        let mut acked = 0u32;
        let mut sent = 0usize;
        let mut per: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for k in 0..chunks {
            for _ in 0..chunk.min(messages - sent) {
                let to = &recipients[sent % recipients.len()];
                let id = format!("c{run}x{sent:06}");
                c.send(&chat(to, &id));
                per.entry(to.as_str()).or_default().push(id);
                sent += 1;
            }
            if k + 1 == kill_after {
                // Some acks seen, the latest chunk in flight: crash now.
                c.send(&format!("<r xmlns='{NS_SM}'/>"));
                acked = acked.max(read_acks_now(&mut c));
                server.kill();
                break;
            }
            acked = acked.max(acked_h(&mut c, sent as u32, Duration::from_secs(10)));
        }
        drop(c);
        server.restart();
        // h counts the sender's stanzas after enable: exactly its messages, in order.
        let acked_ids: BTreeSet<String> = (0..acked as usize)
            .map(|i| format!("c{run}x{i:06}"))
            .collect();
        let mut delivered = BTreeSet::new();
        for r in &recipients {
            let want = per
                .get(r.as_str())
                .map(|ids| ids.iter().filter(|i| acked_ids.contains(*i)).count())
                .unwrap_or(0);
            let got = collect(
                &server,
                r,
                &format!("c{run}x"),
                want,
                Duration::from_millis(300),
            );
            let distinct: BTreeSet<_> = got.iter().cloned().collect();
            assert_eq!(
                distinct.len(),
                got.len(),
                "duplicates at a first login: {got:?}"
            );
            let mut sorted = got.clone();
            sorted.sort();
            assert_eq!(got, sorted, "out of order for {r}");
            delivered.extend(distinct);
        }
        let lost: Vec<_> = acked_ids.difference(&delivered).collect();
        eprintln!(
            "crash run {run}: sent {sent}, acked {acked}, delivered {}, lost {}, unacked but delivered {}",
            delivered.len(),
            lost.len(),
            delivered.difference(&acked_ids).count()
        );
        assert!(
            lost.is_empty(),
            "run {run}: acked but lost: {lost:?}\n--- log ---\n{}",
            server.log()
        );
        total_acked += acked as usize;
        total_delivered += delivered.len();
        total_lost += lost.len();
        total_extra += delivered.difference(&acked_ids).count();
    }
    eprintln!(
        "crash test: runs {runs}, messages acked {total_acked}, delivered {total_delivered}, \
         lost {total_lost}, delivered though not acked {total_extra}"
    );
}

/// Reads whatever acks arrive within a short moment, without waiting for any in particular.
fn read_acks_now(c: &mut Client) -> u32 {
    let mut best = 0;
    let deadline = Instant::now() + Duration::from_millis(50);
    while Instant::now() < deadline {
        match c.try_read_until(Duration::from_millis(20), |s| {
            let i = s.find("<a xmlns='urn:xmpp:sm:3' h='")?;
            let j = s[i..].find("/>")?;
            Some(i + j + 2)
        }) {
            Ok(text) => best = best.max(h_of(&text)),
            Err(_) => continue,
        }
    }
    best
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random_below(n: usize) -> usize {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("random bytes");
    (u64::from_le_bytes(b) % n as u64) as usize
}

/// Logs in with XEP-0198 and resumption; returns the client and the resumption id.
fn sm_login_resumable(server: &Server, node: &str, resource: &str) -> (Client, String) {
    let mut c = server.login(node, resource);
    c.send(&format!("<enable xmlns='{NS_SM}' resume='true'/>"));
    let enabled = c.expect("/>");
    let at = enabled.find("id='").expect("resumption id in <enabled/>") + 4;
    let id = enabled[at..at + enabled[at..].find('\'').unwrap()].to_owned();
    assert!(enabled.contains("resume='true'"), "{enabled}");
    (c, id)
}

/// Reads messages whose id starts with `prefix` until `n` arrived; returns their ids.
fn read_messages(c: &mut Client, prefix: &str, n: usize) -> Vec<String> {
    let needle = format!(" id='{prefix}");
    let mut got = Vec::new();
    while got.len() < n {
        let text = c
            .try_read_until(IO_TIMEOUT, |s| {
                let i = s.find("<message")?;
                let j = s[i..].find("</message>")?;
                Some(i + j + "</message>".len())
            })
            .unwrap_or_else(|e| panic!("after {got:?}: {e}"));
        let msg = &text[text.rfind("<message").unwrap()..];
        if let Some(i) = msg.find(&needle) {
            let rest = &msg[i + 5..];
            got.push(rest[..rest.find('\'').unwrap()].to_owned());
        }
    }
    got
}

#[test]
fn resumption_redelivers_exactly_what_was_not_acknowledged() {
    // Goal: XEP-0198 resumption. B drops its TCP connection mid-stream, having received 5
    // messages but acknowledged 3; A sends 2 more meanwhile. B resumes with h=5: it gets the 2
    // new ones and nothing twice. Then a session that never resumes: what it had not
    // acknowledged arrives at its next login once the window has passed.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--sm-resume-timeout-seconds")
        .arg("2")
        .start();
    let mut sender = sm_login(&server, &a, "r");
    let (mut rb, id) = sm_login_resumable(&server, &b, "r");
    let to_b = format!("{b}@{DOMAIN}/r");
    for i in 0..5 {
        sender.send(&chat(&to_b, &format!("r{i}")));
    }
    assert_eq!(
        read_messages(&mut rb, "r", 5),
        ["r0", "r1", "r2", "r3", "r4"]
    );
    rb.send(&format!("<a xmlns='{NS_SM}' h='3'/>"));
    assert_eq!(acked_h(&mut sender, 5, IO_TIMEOUT), 5);
    drop(rb);
    for i in 5..7 {
        sender.send(&chat(&to_b, &format!("r{i}")));
    }
    assert_eq!(
        acked_h(&mut sender, 7, IO_TIMEOUT),
        7,
        "stored while B is away"
    );

    let mut rb = Client::connect_starttls(server.c2s);
    rb.auth_plain(&b, &password_of(&b)).unwrap();
    rb.send(&format!("<resume xmlns='{NS_SM}' previd='{id}' h='5'/>"));
    let resumed = rb.expect("/>");
    assert!(resumed.contains("<resumed"), "{resumed}\n{}", server.log());
    assert_eq!(read_messages(&mut rb, "r", 2), ["r5", "r6"]);
    assert!(
        rb.try_expect("id='r", Duration::from_millis(500)).is_err(),
        "nothing else, nothing twice"
    );
    rb.jid = Some(format!("{b}@{DOMAIN}/r"));
    rb.assert_alive();

    // It drops again, having acknowledged nothing more, and never resumes.
    drop(rb);
    std::thread::sleep(Duration::from_secs(3));
    // r0..r4 were acknowledged (h=5 on resume); r5 and r6 were not.
    let got = collect(&server, &b, "r", 2, Duration::from_millis(300));
    assert_eq!(got, ["r5", "r6"], "{}", server.log());
}

#[test]
fn unacked_iq_requests_are_answered_with_an_error_when_the_session_ends() {
    // Goal: XEP-0198 §5: a session that ends without resumption must not swallow IQ requests
    // it never acknowledged: their senders get recipient-unavailable, both when the connection
    // ends with no resumption possible and when a resumable session's window runs out.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--sm-resume-timeout-seconds")
        .arg("1")
        .start();
    let mut sender = server.login(&a, "r");
    for (resumable, id) in [(false, "gone1"), (true, "gone2")] {
        let mut rb = if resumable {
            sm_login_resumable(&server, &b, "r").0
        } else {
            sm_login(&server, &b, "r")
        };
        sender.send(&format!(
            "<iq to='{b}@{DOMAIN}/r' id='{id}' type='get'><query xmlns='jabber:iq:version'/></iq>"
        ));
        let got = rb.expect_stanza("iq", &format!("id='{id}'"));
        assert!(is_type(&got, "get"), "{got}");
        drop(rb);
        let err = sender.expect_stanza("iq", &format!("id='{id}'"));
        assert!(is_type(&err, "error"), "{err}\n{}", server.log());
        assert!(err.contains("<recipient-unavailable"), "{err}");
    }
    sender.assert_alive();
}

#[test]
fn a_full_queue_refuses_even_when_the_recipient_is_online_with_stream_management() {
    // Goal: the durability promise when the recipient is online with XEP-0198 but does not
    // acknowledge: its messages are stored until it does, so its queue fills; past the bound
    // the sender gets resource-constraint and the recipient gets nothing unstored.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--offline-messages-max")
        .arg("3")
        .start();
    let mut rb = sm_login(&server, &b, "r");
    rb.send("<presence/>");
    let mut sender = sm_login(&server, &a, "r");
    let to_b = format!("{b}@{DOMAIN}/r");
    for i in 0..5 {
        sender.send(&chat(&to_b, &format!("f{i}")));
    }
    for i in 3..5 {
        let err = sender.expect_stanza("message", &format!("id='f{i}'"));
        assert!(is_type(&err, "error"), "{err}");
        assert!(err.contains("<resource-constraint"), "{err}");
    }
    assert_eq!(acked_h(&mut sender, 5, IO_TIMEOUT), 5);
    assert_eq!(read_messages(&mut rb, "f", 3), ["f0", "f1", "f2"]);
    assert!(
        rb.try_expect("id='f", Duration::from_millis(500)).is_err(),
        "refused messages are not delivered"
    );
    sender.assert_alive();
}

#[test]
fn push_hook_posts_user_and_count_with_retries() {
    // Goal: the push hook. A message stored for a user with no session makes the server POST
    // {"user","count"} (never the body) to the configured URL; a failed POST is retried.
    // Method: a local HTTP receiver answers 500 first, then 200; A sends 3 messages to offline B.
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/push", listener.local_addr().unwrap());
    let (tx, rx) = std::sync::mpsc::channel::<(String, String)>();
    std::thread::spawn(move || {
        // Bounded: at most 20 requests, each with a read timeout.
        for (n, conn) in listener.incoming().take(20).enumerate() {
            let Ok(mut conn) = conn else { continue };
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut req = Vec::new();
            let mut chunk = [0u8; 1024];
            while let Ok(k) = conn.read(&mut chunk) {
                if k == 0 {
                    break;
                }
                req.extend_from_slice(&chunk[..k]);
                let text = String::from_utf8_lossy(&req);
                if let Some(i) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if req.len() >= i + 4 + len {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&req).into_owned();
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
            if tx.send((head.to_owned(), body.to_owned())).is_err() {
                return;
            }
        }
    });
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new()
        .users(&[&a, &b])
        .arg("--push-url")
        .arg(&url)
        .start();
    let mut sender = sm_login(&server, &a, "r");
    for i in 0..3 {
        sender.send(&chat(&b, &format!("secret-body-{i}")));
    }
    assert_eq!(acked_h(&mut sender, 3, IO_TIMEOUT), 3);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut requests = Vec::new();
    let mut max_count = 0;
    while (max_count < 3 || requests.len() < 2) && Instant::now() < deadline {
        let Ok((head, body)) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        assert!(head.starts_with("POST /push HTTP/1.1"), "{head}");
        assert!(
            body.starts_with(&format!("{{\"user\":\"{b}@{DOMAIN}\",\"count\":")),
            "{body}"
        );
        assert!(
            !body.contains("secret"),
            "the message never travels: {body}"
        );
        let count: usize = body
            .rsplit(':')
            .next()
            .unwrap()
            .trim_end_matches('}')
            .parse()
            .unwrap();
        max_count = max_count.max(count);
        requests.push(body);
    }
    assert_eq!(max_count, 3, "requests: {requests:?}\n{}", server.log());
    assert!(
        requests.len() >= 2,
        "the first (refused) was retried: {requests:?}"
    );
}

#[test]
fn resumption_mid_flood_delivers_the_rest_exactly_once_in_order() {
    // A recipient drops its connection in the middle of a flood, having handled 1,500 messages
    // and acknowledged 500; the sender goes on, and is acked for every message (stored). On
    // resumption with h=1500 the recipient gets every later message exactly once and in order:
    // those written to the dead socket, those queued while it was away, and those its full send
    // queue left in the store.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new().users(&[&a, &b]).start();
    let mut sender = sm_login(&server, &a, "r");
    let (mut rb, id) = sm_login_resumable(&server, &b, "r");
    let to_b = format!("{b}@{DOMAIN}/r");
    const MESSAGES: usize = 4_000;
    const PER_WRITE: usize = 50;
    const HANDLED: usize = 1_500;
    let writer = std::thread::spawn(move || {
        for chunk in 0..MESSAGES / PER_WRITE {
            let text: String = (chunk * PER_WRITE..(chunk + 1) * PER_WRITE)
                .map(|i| chat(&to_b, &format!("z{i}")))
                .collect();
            sender.send(&text);
            std::thread::sleep(Duration::from_millis(2));
        }
        sender
    });
    let first = read_messages(&mut rb, "z", HANDLED);
    let want: Vec<String> = (0..HANDLED).map(|i| format!("z{i}")).collect();
    assert_eq!(first, want);
    rb.send(&format!("<a xmlns='{NS_SM}' h='500'/>"));
    drop(rb);
    // The flood ends while B is away, each message stored: more than B's send queue holds
    // (1,024 stanzas) wait for it.
    let mut sender = writer.join().expect("writer");
    assert_eq!(
        acked_h(&mut sender, MESSAGES as u32, IO_TIMEOUT),
        MESSAGES as u32
    );

    let mut rb = Client::connect_starttls(server.c2s);
    rb.auth_plain(&b, &password_of(&b)).unwrap();
    rb.send(&format!(
        "<resume xmlns='{NS_SM}' previd='{id}' h='{HANDLED}'/>"
    ));
    let resumed = rb.expect("/>");
    assert!(resumed.contains("<resumed"), "{resumed}\n{}", server.log());
    let rest = read_messages(&mut rb, "z", MESSAGES - HANDLED);
    let want: Vec<String> = (HANDLED..MESSAGES).map(|i| format!("z{i}")).collect();
    assert_eq!(rest, want, "the rest, once each, in order");
    assert!(
        rb.try_expect("id='z", Duration::from_millis(500)).is_err(),
        "nothing twice"
    );
}

fn offline_then_live(sm: bool) {
    // B is offline while A sends 3,000 messages (stored). B logs in and sends initial presence;
    // at once A sends 3,000 more. The stored ones come first (a page at a time as B's send queue
    // drains), the live ones wait behind them: all 6,000 once each, in order.
    let a = users_on_shard(0, 1).remove(0);
    let b = users_on_shard(1, 1).remove(0);
    let server = ServerBuilder::new().users(&[&a, &b]).start();
    let mut sender = sm_login(&server, &a, "r");
    const EACH: usize = 3_000;
    const PER_WRITE: usize = 100;
    let batch = |from: usize| -> String {
        (from..from + PER_WRITE)
            .map(|i| chat(&b, &format!("o{i}")))
            .collect()
    };
    for from in (0..EACH).step_by(PER_WRITE) {
        sender.send(&batch(from));
    }
    assert_eq!(
        acked_h(&mut sender, EACH as u32, IO_TIMEOUT),
        EACH as u32,
        "stored"
    );
    let mut rb = if sm {
        sm_login(&server, &b, "r")
    } else {
        server.login(&b, "r")
    };
    rb.send("<presence/>");
    for from in (EACH..2 * EACH).step_by(PER_WRITE) {
        sender.send(&batch(from));
    }
    let got = rb.message_ids("o", 2 * EACH);
    let want: Vec<String> = (0..2 * EACH).map(|i| i.to_string()).collect();
    if got != want {
        let k = got.iter().zip(&want).position(|(g, w)| g != w);
        panic!(
            "{} of {} messages; first out of place at {k:?}: {:?}",
            got.len(),
            want.len(),
            k.map(|k| &got[k.saturating_sub(2)..(k + 4).min(got.len())])
        );
    }
    assert_eq!(
        acked_h(&mut sender, 2 * EACH as u32, IO_TIMEOUT),
        2 * EACH as u32
    );
}

#[test]
fn live_messages_wait_behind_the_offline_queue_with_stream_management() {
    offline_then_live(true);
}

#[test]
fn live_messages_wait_behind_the_offline_queue_without_stream_management() {
    offline_then_live(false);
}

/// Messages in `offline_flood_behind_a_slow_commit`: more than the offline writes that may wait
/// behind a commit in flight on a shard (`STORE_PENDING_WRITES_MAX`, 16,384).
const FLOOD_MESSAGES: usize = 18_000;

/// Three offline recipients of the floods.
const FLOOD_RECIPIENTS: [&str; 3] = ["rcpt1", "rcpt2", "rcpt3"];

/// A slow commit (a test hook delays every commit by 1 s, as a stalling disk) while `senders`
/// clients flood `FLOOD_MESSAGES` in all to users who are offline, each sender's share in one
/// write. A bystander on the same shard pings once some reads paused. Every message is stored,
/// every sender's last ping is answered; returns the server and whether the bystander was
/// answered while no sender's flood was yet.
fn offline_flood_behind_a_slow_commit(senders: usize) -> (Server, bool) {
    use std::io::Write;
    let sender_nodes: Vec<String> = (0..senders).map(|i| format!("sender{i}")).collect();
    let mut users: Vec<&str> = sender_nodes.iter().map(String::as_str).collect();
    users.extend(FLOOD_RECIPIENTS);
    users.push("bystander");
    let server = ServerBuilder::new()
        .users(&users)
        .one_shard_slow_commits(1000)
        .start();
    let mut bystander = server.login_plaintext("bystander", "r");
    let mut clients: Vec<Client> = sender_nodes
        .iter()
        .map(|n| server.login_plaintext(n, "r"))
        .collect();
    let per_sender = FLOOD_MESSAGES / senders;
    let mut writers = Vec::new();
    for (s, c) in clients.iter().enumerate() {
        let mut burst = String::new();
        for i in 0..per_sender {
            let r = FLOOD_RECIPIENTS[i % FLOOD_RECIPIENTS.len()];
            burst.push_str(&format!(
                "<message to='{r}@{DOMAIN}' type='chat' id='m{s}-{i}'><body>{i}</body></message>"
            ));
        }
        burst.push_str("<iq type='get' id='last'><ping xmlns='urn:xmpp:ping'/></iq>");
        let mut tcp = c.tcp().try_clone().expect("clone");
        writers.push(std::thread::spawn(move || tcp.write_all(burst.as_bytes())));
    }
    let paused = |server: &Server| {
        metric(server, "gateway_commit_pauses_total", "")
            + metric(server, "gateway_connection_pauses_total", "")
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while paused(&server) < 1.0 {
        assert!(Instant::now() < deadline, "reads never paused");
        std::thread::sleep(Duration::from_millis(20));
    }
    bystander.send("<iq type='get' id='by'><ping xmlns='urn:xmpp:ping'/></iq>");
    let got = bystander.expect_stanza("iq", "id='by'");
    assert!(got.contains("type='result'"), "{got}");
    // Whether a sender's flood was already answered when the bystander was.
    let early: Vec<Option<String>> = clients
        .iter_mut()
        .map(|c| {
            c.try_expect_stanza("iq", "id='last'", Duration::from_millis(10))
                .ok()
        })
        .collect();
    let bystander_first = early.iter().all(Option::is_none);
    for (c, early) in clients.iter_mut().zip(early) {
        let got = early.unwrap_or_else(|| {
            c.try_expect_stanza("iq", "id='last'", Duration::from_secs(60))
                .unwrap_or_else(|e| panic!("no answer to the last ping: {e}"))
        });
        assert!(!got.contains("type='error'"), "{got}");
    }
    for w in writers {
        w.join().expect("writer").expect("write");
    }
    let total = (per_sender * senders) as f64;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(&server, "gateway_offline_messages", "") < total {
        assert!(
            Instant::now() < deadline,
            "not all stored: {} of {total}",
            metric(&server, "gateway_offline_messages", "")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric(&server, "gateway_offline_messages", ""), total);
    (server, bystander_first)
}

/// One sender floods offline users while the disk is slow: its reads pause once a batch's worth
/// waits behind the commit in flight (`STORE_PENDING_WRITES_PER_CONNECTION_PAUSE`), nobody
/// else's; the shard never stops reading as a whole, and a bystander is answered at once.
#[test]
fn one_sender_flooding_offline_users_behind_a_slow_commit_pauses_only_itself() {
    let (server, bystander_first) = offline_flood_behind_a_slow_commit(1);
    assert!(metric(&server, "gateway_connection_pauses_total", "") >= 1.0);
    assert_eq!(
        metric(&server, "gateway_commit_pauses_total", ""),
        0.0,
        "the whole shard paused"
    );
    assert!(
        bystander_first,
        "the bystander waited for the sender's flood"
    );
}

/// Twenty senders flood offline users at once while the disk is slow, each under its own bound:
/// together past `STORE_PENDING_WRITES_MAX`, the shard stops reading until the commit is done
/// (the pause is counted), then goes on, and every message is stored.
#[test]
fn many_senders_flooding_offline_users_behind_a_slow_commit_pause_the_shard() {
    let (server, _) = offline_flood_behind_a_slow_commit(20);
    assert!(
        metric(&server, "gateway_commit_pauses_total", "") >= 1.0,
        "the shard never paused"
    );
}
