//! Roster changes against the real binary. A roster change goes into the shard's group commit,
//! off the reactor; its answer waits for the commit. So a crash right after the answers keeps
//! every change answered, and answers come in the order of the requests. Meanwhile the shard
//! serves everyone else.

mod support;

use support::*;

/// Roster items one client sets in a row, without waiting for the answers.
const ROSTER_SETS: usize = 50;

/// A ping IQ with id `id`.
fn ping(id: impl std::fmt::Display) -> String {
    format!("<iq type='get' id='{id}'><ping xmlns='urn:xmpp:ping'/></iq>")
}

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
    burst.push_str(&ping("ping"));
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
        b.send(&ping(format_args!("ping{i}")));
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
/// it as a slow reader, so the client's reads pause once a sixteenth of a queue waits
/// (`ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`); after the commit what it sent meanwhile is
/// handled a read at a time, its writer keeping up. Every answer comes, in order, the stream
/// stays up, and the pauses are counted.
#[test]
fn reads_pause_while_a_slow_roster_commit_holds_too_much() {
    use std::io::Write;
    let node = "user1";
    let server = ServerBuilder::new()
        .users(&[node])
        .one_shard_slow_commits(300)
        .start();
    let mut c = server.login_plaintext(node, "r");
    let mut burst = roster_set(0);
    for i in 0..PINGS_BEHIND {
        burst.push_str(&ping(format_args!("p{i}")));
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
        metric(&server, "gateway_connection_pauses_total", "") >= 1.0,
        "reads never paused"
    );
}

/// `senders` clients each send `per_sender` messages to a recipient whose roster change waits
/// for a slow commit (1 s): they wait behind the change. Every message arrives, each sender's in
/// order, and the recipient stays up.
fn messages_to_a_client_behind_a_slow_roster_commit(senders: usize, per_sender: usize) -> Server {
    let a_node = "user0";
    let nodes: Vec<String> = (0..=senders).map(|i| format!("user{i}")).collect();
    let users: Vec<&str> = nodes.iter().map(String::as_str).collect();
    let server = ServerBuilder::new()
        .users(&users)
        .one_shard_slow_commits(1000)
        .start();
    let mut a = server.login_plaintext(a_node, "r");
    let mut clients: Vec<Client> = nodes[1..]
        .iter()
        .map(|n| server.login_plaintext(n, "r"))
        .collect();
    a.send(&roster_set(0));
    for (k, c) in clients.iter_mut().enumerate() {
        let flood: String = (0..per_sender)
            .map(|i| {
                format!(
                    "<message to='{a_node}@{DOMAIN}/r' id='m{k}-{i}'><body>{i}</body></message>"
                )
            })
            .collect();
        c.send(&flood);
    }
    let got = a.expect("id='set0'");
    assert!(!got.contains("type='error'"), "{got}");
    let ids = a.message_ids("m", senders * per_sender);
    assert_eq!(ids.len(), senders * per_sender, "lost: {ids:?}");
    for k in 0..senders {
        let prefix = format!("{k}-");
        let got: Vec<&str> = ids
            .iter()
            .filter_map(|id| id.strip_prefix(&prefix))
            .collect();
        let want: Vec<String> = (0..per_sender).map(|i| i.to_string()).collect();
        assert_eq!(got, want, "sender {k}: repeated or out of order");
    }
    server
}

/// One client's 600 messages to a recipient whose roster change waits: they are held on the
/// sender's account, so the sender's reads pause (`ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`)
/// and the shard never stops reading as a whole.
#[test]
fn messages_to_a_client_behind_a_slow_roster_commit_pause_their_sender() {
    let server = messages_to_a_client_behind_a_slow_roster_commit(1, 600);
    assert!(metric(&server, "gateway_connection_pauses_total", "") >= 1.0);
    assert_eq!(
        metric(&server, "gateway_commit_pauses_total", ""),
        0.0,
        "the whole shard paused"
    );
}

/// Five clients' 60 messages each to that recipient: no sender reaches its own pause, but
/// together past a quarter of the recipient's send queue (`ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX`)
/// the shard stops reading until the commit is done.
#[test]
fn messages_from_many_clients_to_a_client_behind_a_slow_roster_commit_pause_the_shard() {
    let server = messages_to_a_client_behind_a_slow_roster_commit(5, 60);
    assert!(
        metric(&server, "gateway_commit_pauses_total", "") >= 1.0,
        "the shard never paused"
    );
}

/// Pings a client pipelines behind its roster change in
/// `a_client_pipelining_behind_its_roster_change_pauses_only_itself`: past the shard-wide
/// per-connection bound (`ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX`, 256), well past the point
/// where its own reads pause (`ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`, 64).
const PINGS_PAST_THE_PAUSE: usize = 400;

/// A slow commit (3 s, the test hook) while client A pipelines hundreds of pings behind its
/// roster change: A's reads pause, nobody else's. Client B on the same shard is answered at
/// once, before A's change is; then A gets its result and every ping, in order. The pause is
/// counted per connection and the shard never paused as a whole.
fn a_client_pipelining_behind_its_roster_change_pauses_only_itself(engine: &str) {
    let (a_node, b_node) = ("user1", "user2");
    let server = ServerBuilder::new()
        .users(&[a_node, b_node])
        .arg("--io-engine")
        .arg(engine)
        .one_shard_slow_commits(3000)
        .start();
    let mut a = server.login_plaintext(a_node, "r");
    let mut b = server.login_plaintext(b_node, "r");
    let mut burst = roster_set(0);
    for i in 0..PINGS_PAST_THE_PAUSE {
        burst.push_str(&ping(format_args!("p{i}")));
    }
    a.send(&burst);
    // Until A's reads pause, its pings are handled (and held); B's ping comes after that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while metric(&server, "gateway_connection_pauses_total", "") < 1.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "A's reads did not pause"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    b.send(&ping("b-ping"));
    let got = b.expect_stanza("iq", "id='b-ping'");
    assert!(got.contains("type='result'"), "{got}");
    assert!(
        a.try_expect("id='set0'", std::time::Duration::from_millis(50))
            .is_err(),
        "B waited for A's commit: it was answered after A's roster change"
    );
    let got = a.expect("id='set0'");
    assert!(!got.contains("type='error'"), "{got}");
    for i in 0..PINGS_PAST_THE_PAUSE {
        let got = a.expect(&format!("id='p{i}'"));
        assert!(!got.contains("stream:error"), "closed at ping {i}: {got}");
    }
    assert_eq!(
        metric(&server, "gateway_commit_pauses_total", ""),
        0.0,
        "the whole shard paused"
    );
    // A reads again once its pings are answered.
    a.send(&ping("after"));
    a.expect("id='after'");
}

#[test]
fn a_client_pipelining_behind_its_roster_change_pauses_only_itself_uring() {
    a_client_pipelining_behind_its_roster_change_pauses_only_itself("uring");
}

#[test]
fn a_client_pipelining_behind_its_roster_change_pauses_only_itself_tasks() {
    a_client_pipelining_behind_its_roster_change_pauses_only_itself("tasks");
}

/// Three rounds of a roster change followed by 200 pings, pipelined in one write while commits
/// are slow (300 ms): the client's reads pause behind each change in turn, and what it sent
/// meanwhile is handled once each commit is done, part of it while the next change pauses it
/// again. Every answer comes, in order (a build that skipped the read's worth at which the pause
/// took hold again cut a stanza in two here, and the stream ended as not well-formed).
#[test]
fn changes_and_pings_pipelined_in_rounds_behind_slow_commits_are_all_answered() {
    const ROUNDS: usize = 3;
    const PINGS: usize = 200;
    let node = "user1";
    let server = ServerBuilder::new()
        .users(&[node])
        .one_shard_slow_commits(300)
        .start();
    let mut c = server.login_plaintext(node, "r");
    let mut burst = String::new();
    for r in 0..ROUNDS {
        burst.push_str(&roster_set(r));
        for i in 0..PINGS {
            burst.push_str(&ping(format_args!("p{r}-{i}")));
        }
    }
    c.send(&burst);
    for r in 0..ROUNDS {
        let got = c.expect(&format!("id='set{r}'"));
        assert!(!got.contains("type='error'"), "{got}");
        for i in 0..PINGS {
            let got = c.expect(&format!("id='p{r}-{i}'"));
            assert!(!got.contains("stream:error"), "closed at {r}-{i}: {got}");
        }
    }
    assert!(metric(&server, "gateway_connection_pauses_total", "") >= ROUNDS as f64);
}
