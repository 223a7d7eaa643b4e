//! Roster changes against the real binary. A roster change goes into the shard's group commit,
//! off the reactor; its answer waits for the commit. So a crash right after the answers keeps
//! every change answered, and answers come in the order of the requests. Meanwhile the shard
//! serves everyone else.

mod support;

use support::*;

/// Roster items one client sets in a row, without waiting for the answers.
const ROSTER_SETS: usize = 50;

fn roster_set(i: usize) -> String {
    format!(
        "<iq type='set' id='set{i}'><query xmlns='jabber:iq:roster'>\
         <item jid='contact{i}@{DOMAIN}' name='c{i}'/></query></iq>"
    )
}

/// A client sends many roster sets in a row, then a ping. The answers come in order, all
/// results, the ping's last. Then the gateway is killed (SIGKILL: nothing is flushed) and
/// restarted on the same data dir: every item answered is in the roster.
#[test]
fn roster_changes_are_answered_in_order_and_survive_a_crash() {
    let node = "user1";
    let mut server = ServerBuilder::new().users(&[node]).start();
    let mut c = server.login(node, "r");
    let mut burst: String = (0..ROSTER_SETS).map(roster_set).collect();
    burst.push_str("<iq type='get' id='ping'><ping xmlns='urn:xmpp:ping'/></iq>");
    c.send(&burst);
    for i in 0..ROSTER_SETS {
        // `expect` reads past anything before the marker: an answer out of order leaves a later
        // one missing.
        let got = c.expect(&format!("id='set{i}'"));
        assert!(
            !got.contains("type='error'"),
            "set {i} answered with an error: {got}"
        );
    }
    let got = c.expect_stanza("iq", "id='ping'");
    assert!(got.contains("type='result'"), "{got}");
    server.kill();
    server.restart();
    let mut c = server.login(node, "r");
    c.send("<iq type='get' id='get'><query xmlns='jabber:iq:roster'/></iq>");
    let roster = c.expect_stanza("iq", "id='get'");
    for i in 0..ROSTER_SETS {
        assert!(
            roster.contains(&format!("contact{i}@{DOMAIN}")),
            "item {i} answered but lost in the crash: {roster}"
        );
    }
}

/// One client's roster changes and another client's pings on the same shard, interleaved: all
/// are answered, each client's in order (commits overlap with routing; nothing held is left
/// behind).
#[test]
fn roster_changes_and_another_clients_pings_interleaved_are_all_answered() {
    let (a_node, b_node) = ("user1", "user2");
    let server = ServerBuilder::new()
        .users(&[a_node, b_node])
        .arg("--shards")
        .arg("1")
        .start();
    let mut a = server.login(a_node, "r");
    let mut b = server.login(b_node, "r");
    let burst: String = (0..ROSTER_SETS).map(roster_set).collect();
    a.send(&burst);
    for i in 0..ROSTER_SETS {
        b.send(&format!(
            "<iq type='get' id='ping{i}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
        b.expect(&format!("id='ping{i}'"));
    }
    for i in 0..ROSTER_SETS {
        let got = a.expect(&format!("id='set{i}'"));
        assert!(!got.contains("type='error'"), "set {i}: {got}");
    }
}

/// Pings a client pipelines behind a roster change in
/// `reads_pause_while_a_slow_roster_commit_holds_too_much`: more than its send queue holds
/// (`SESSION_SEND_QUEUE_STANZAS_MAX`, 1,024).
const PINGS_BEHIND: usize = 3_000;

/// A slow commit (a test hook delays every commit by 300 ms, as a stalling disk) while a client
/// pipelines thousands of stanzas behind its roster change, reading all the while. Their answers
/// wait for the commit; released together they would overflow the client's send queue and close
/// it as a slow reader, so the shard stops reading once a quarter of a queue waits
/// (`ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX`) and goes on after the commit. Every answer comes,
/// in order, the stream stays up, and the pauses are counted.
#[test]
fn reads_pause_while_a_slow_roster_commit_holds_too_much() {
    use std::io::Write;
    let node = "user1";
    let server = ServerBuilder::new()
        .users(&[node])
        .allow_plaintext()
        .arg("--shards")
        .arg("1")
        .env("GATEWAY_TEST_COMMIT_DELAY_MS", "300")
        .start();
    let mut c = server.login_plaintext(node, "r");
    let mut burst = roster_set(0);
    for i in 0..PINGS_BEHIND {
        burst.push_str(&format!(
            "<iq type='get' id='p{i}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
    }
    let mut tcp = c.tcp().try_clone().expect("clone");
    let writer = std::thread::spawn(move || tcp.write_all(burst.as_bytes()));
    let got = c.expect("id='set0'");
    assert!(!got.contains("type='error'"), "{got}");
    for i in 0..PINGS_BEHIND {
        let got = c.expect(&format!("id='p{i}'"));
        assert!(!got.contains("stream:error"), "closed at ping {i}: {got}");
    }
    writer.join().expect("writer").expect("write");
    assert!(
        metric(&server, "gateway_commit_pauses_total", "") >= 1.0,
        "reads never paused"
    );
}
