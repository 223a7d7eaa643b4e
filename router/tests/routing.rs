//! A simulated multi-shard setup: one `Router` per shard with in-memory roster stores, a loop
//! that carries `Action::Send` frames to the target shard's `handle_frame`, and per-connection
//! inboxes of delivered stanzas.

use std::collections::HashMap;
use std::rc::Rc;

use router::errors::error_condition;
use router::offline::Stored;
use router::roster::{RosterItem, Subscription};
use router::{
    Action, BindError, MemoryOfflineStore, MemoryRosterStore, OfflineLimits, RosterStore, Router,
};
use shared::framer::{Event, Framer};
use shared::shard::home_shard;
use shared::stanza::Stanza;

const DOMAIN: &str = "localhost";

/// Frames one stanza with the real framer, inside a client stream header.
fn stanza(xml: &str) -> Stanza {
    let mut f = Framer::new(shared::limits::STANZA_BYTES_MAX);
    f.push(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    f.push(xml.as_bytes());
    loop {
        match f.next_event().expect("test stanza frames") {
            Some(Event::StreamOpen(_)) => continue,
            Some(Event::Stanza(s)) => return s,
            other => panic!("no stanza in {xml}: {other:?}"),
        }
    }
}

/// A user name whose home is `shard` (of `shards`), the `skip`-th such.
fn user_on(shard: usize, shards: usize, skip: usize) -> String {
    (0..)
        .map(|i| format!("user{i}"))
        .filter(|n| home_shard(&format!("{n}@{DOMAIN}"), shards) == shard)
        .nth(skip)
        .unwrap()
}

struct Net {
    routers: Vec<Router>,
    stores: Vec<Rc<MemoryRosterStore>>,
    offline: Vec<Rc<MemoryOfflineStore>>,
    /// conn -> offline sequence numbers of stored messages delivered to it for ack, in order.
    stored_seqs: HashMap<u64, Vec<u64>>,
    /// conns told that more of their stanzas are settled.
    settled_told: Vec<u64>,
    /// Push hook calls: (user, messages waiting).
    pushes: Vec<(String, usize)>,
    /// conn -> its shard.
    conn_shard: HashMap<u64, usize>,
    inbox: HashMap<u64, Vec<Stanza>>,
    closed: Vec<(u64, &'static str)>,
    next_conn: u64,
}

impl Net {
    fn new(shards: usize) -> Net {
        let stores: Vec<_> = (0..shards)
            .map(|_| Rc::new(MemoryRosterStore::new()))
            .collect();
        Net::with_limits(shards, stores, OfflineLimits::default())
    }

    fn with_limits(
        shards: usize,
        stores: Vec<Rc<MemoryRosterStore>>,
        limits: OfflineLimits,
    ) -> Net {
        let offline: Vec<_> = (0..shards)
            .map(|_| Rc::new(MemoryOfflineStore::new()))
            .collect();
        let routers = (0..shards)
            .map(|i| {
                let mut r = Router::new(
                    i,
                    shards,
                    DOMAIN.to_string(),
                    Box::new(Rc::clone(&stores[i])),
                );
                r.set_offline(Box::new(Rc::clone(&offline[i])), limits);
                r.set_clock(CLOCK_MS);
                r
            })
            .collect();
        Net {
            routers,
            stores,
            offline,
            stored_seqs: HashMap::new(),
            settled_told: Vec::new(),
            pushes: Vec::new(),
            conn_shard: HashMap::new(),
            inbox: HashMap::new(),
            closed: Vec::new(),
            next_conn: 1,
        }
    }

    fn shards(&self) -> usize {
        self.routers.len()
    }

    fn home(&self, node: &str) -> usize {
        home_shard(&format!("{node}@{DOMAIN}"), self.shards())
    }

    /// Binds `node/resource` on a fresh conn; returns the conn.
    fn bind(&mut self, node: &str, resource: &str) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        let shard = self.home(node);
        let bound = self.routers[shard]
            .bind(node, Some(resource), conn)
            .unwrap();
        assert_eq!(bound.full_jid, format!("{node}@{DOMAIN}/{resource}"));
        self.conn_shard.insert(conn, shard);
        self.run();
        conn
    }

    /// A stanza from `conn`, `from` stamped as the driver does.
    fn send(&mut self, conn: u64, xml: &str) {
        let shard = self.conn_shard[&conn];
        let full = self.routers[shard]
            .full_jid(conn)
            .expect("bound")
            .to_string();
        let s = stanza(xml).with_from(&full);
        self.routers[shard].handle_stanza(conn, s);
        self.run();
    }

    fn disconnect(&mut self, conn: u64) {
        let shard = self.conn_shard[&conn];
        self.routers[shard].handle_disconnect(conn);
        self.run();
    }

    /// Executes actions until every router is idle.
    fn run(&mut self) {
        loop {
            let mut idle = true;
            for i in 0..self.routers.len() {
                while let Some(a) = self.routers[i].poll_action() {
                    idle = false;
                    match a {
                        Action::Deliver { conn, stanza } => {
                            assert_eq!(
                                self.conn_shard.get(&conn),
                                Some(&i),
                                "delivery on the conn's own shard"
                            );
                            assert!(
                                self.routers[i].full_jid(conn).is_some(),
                                "delivery to an unbound conn {conn}"
                            );
                            self.inbox.entry(conn).or_default().push(stanza);
                        }
                        Action::CloseConn { conn, condition } => {
                            self.closed.push((conn, condition))
                        }
                        Action::Send { shard, frame } => {
                            assert_ne!(shard, i, "Send to self");
                            self.routers[shard].handle_frame(frame);
                        }
                        Action::DeliverStored { conn, stanza, seq } => {
                            assert_eq!(self.conn_shard.get(&conn), Some(&i));
                            self.inbox.entry(conn).or_default().push(stanza);
                            if let Some(seq) = seq {
                                self.stored_seqs.entry(conn).or_default().push(seq);
                            }
                        }
                        Action::Settled { conn } => self.settled_told.push(conn),
                        Action::Push { node, count } => self.pushes.push((node, count)),
                    }
                }
            }
            if idle {
                // End of the turn: each shard commits its batch (group commit).
                let mut committed = false;
                for r in &mut self.routers {
                    if r.needs_commit() {
                        r.commit();
                        committed = true;
                    }
                }
                if !committed {
                    return;
                }
            }
        }
    }

    fn take(&mut self, conn: u64) -> Vec<Stanza> {
        self.inbox.remove(&conn).unwrap_or_default()
    }

    fn take_all(&mut self) {
        self.inbox.clear();
    }

    fn roster(&self, node: &str) -> Vec<RosterItem> {
        self.stores[self.home(node)].roster(node).unwrap()
    }
}

/// The wall clock the routers see: 2026-11-26T17:01:52Z.
const CLOCK_MS: u64 = 1_795_712_512_000;

fn bare(node: &str) -> String {
    format!("{node}@{DOMAIN}")
}

fn texts(v: &[Stanza]) -> Vec<String> {
    v.iter().map(|s| s.as_str().to_string()).collect()
}

fn item<'a>(roster: &'a [RosterItem], jid: &str) -> &'a RosterItem {
    roster
        .iter()
        .find(|i| i.jid == jid)
        .unwrap_or_else(|| panic!("{jid} not in {roster:?}"))
}

#[test]
fn messages_to_full_and_bare_jids_cross_shards() {
    // Goal: a message reaches exactly the addressed session, wherever its user's home is.
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "one");
    let b1 = net.bind(&b, "one");
    let b2 = net.bind(&b, "two");
    net.send(b1, "<presence/>");
    net.send(b2, "<presence/>");
    net.take_all();

    net.send(
        a1,
        &format!("<message to='{b}@{DOMAIN}/two' type='chat' id='m1'><body>hi</body></message>"),
    );
    let got = net.take(b2);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].id().as_deref(), Some("m1"));
    assert_eq!(
        got[0].from().as_deref(),
        Some(format!("{a}@{DOMAIN}/one").as_str())
    );
    assert!(net.take(b1).is_empty());
    assert!(net.take(a1).is_empty());

    // Bare JID, equal priorities: both available resources.
    net.send(
        a1,
        &format!(
            "<message to='{}' type='chat' id='m2'><body>hi</body></message>",
            bare(&b).to_uppercase()
        ),
    );
    assert_eq!(net.take(b1).len(), 1);
    assert_eq!(net.take(b2).len(), 1);

    // A full JID whose resource is not bound falls back to the bare JID rules.
    net.send(
        a1,
        &format!("<message to='{b}@{DOMAIN}/gone' id='m3'><body>hi</body></message>"),
    );
    assert_eq!(net.take(b1).len(), 1);
    assert_eq!(net.take(b2).len(), 1);
    assert!(net.routers[0].forwarded() >= 3);
}

#[test]
fn bare_jid_message_goes_to_highest_priority() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b_low = net.bind(&b, "low");
    let b_high = net.bind(&b, "high");
    let b_high2 = net.bind(&b, "high2");
    let b_neg = net.bind(&b, "neg");
    let _b_silent = net.bind(&b, "silent");
    net.send(b_low, "<presence><priority>1</priority></presence>");
    net.send(b_high, "<presence><priority>5</priority></presence>");
    net.send(
        b_high2,
        "<presence><show>away</show><priority>5</priority></presence>",
    );
    net.send(b_neg, "<presence><priority>-1</priority></presence>");
    net.take_all();
    net.send(
        a1,
        &format!("<message to='{b}@{DOMAIN}' id='x'><body>hi</body></message>"),
    );
    assert_eq!(net.take(b_high).len(), 1);
    assert_eq!(net.take(b_high2).len(), 1);
    assert!(net.inbox.is_empty(), "{:?}", net.inbox);
}

impl Net {
    fn enable_sm(&mut self, conn: u64) {
        let shard = self.conn_shard[&conn];
        self.routers[shard].handle_sm_enabled(conn);
    }
    /// The client on `conn` acknowledges every stored message it was given.
    fn ack_all(&mut self, conn: u64) {
        let shard = self.conn_shard[&conn];
        let seqs = self.stored_seqs.remove(&conn).unwrap_or_default();
        self.routers[shard].handle_acked(conn, &seqs);
        self.run();
    }
    fn room(&mut self, conn: u64) {
        let shard = self.conn_shard[&conn];
        self.routers[shard].handle_room(conn);
        self.run();
    }
    fn queued(&self, node: &str) -> Vec<Stored> {
        self.offline[self.home(node)].messages(node)
    }
    fn settled(&self, conn: u64) -> u64 {
        self.routers[self.conn_shard[&conn]].settled(conn)
    }
}

fn chat(to: &str, id: &str) -> String {
    format!("<message to='{to}@{DOMAIN}' id='{id}' type='chat'><body>{id}</body></message>")
}

/// The ids of the messages among `v`.
fn ids(v: &[Stanza]) -> Vec<String> {
    v.iter()
        .filter(|s| s.name() == "message")
        .map(|s| s.id().unwrap_or_default().into_owned())
        .collect()
}

#[test]
fn offline_messages_wait_and_arrive_after_initial_presence_in_order_with_delay() {
    // Goal: XEP-0160 on the recipient's home shard, cross-shard and same-shard senders alike.
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let same = user_on(0, 2, 1);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let s1 = net.bind(&same, "r");
    for i in 0..5 {
        net.send(a1, &chat(&b, &format!("m{i}")));
    }
    net.send(s1, &chat(&b, "m5"));
    assert!(net.take(a1).is_empty(), "the sender got no error");
    assert!(net.take(s1).is_empty());
    assert_eq!(net.queued(&b).len(), 6, "stored on b's home shard");
    let pushes: Vec<usize> = net
        .pushes
        .iter()
        .map(|(n, c)| {
            assert_eq!(n, &b);
            *c
        })
        .collect();
    assert_eq!(
        pushes,
        [1, 2, 3, 4, 5, 6],
        "one push per stored message, with the count"
    );
    assert_eq!(
        net.settled(a1),
        5,
        "every message of a1 is settled once committed"
    );
    // Bound without presence: nothing yet.
    let b1 = net.bind(&b, "phone");
    assert!(net.take(b1).is_empty());
    net.send(b1, "<presence/>");
    let got: Vec<_> = net
        .take(b1)
        .into_iter()
        .filter(|s| s.name() == "message")
        .collect();
    assert_eq!(ids(&got), ["m0", "m1", "m2", "m3", "m4", "m5"]);
    for m in &got {
        assert!(
            m.as_str().contains(
                "<delay xmlns='urn:xmpp:delay' from='localhost' stamp='2026-11-26T17:01:52.000Z'/>"
            ),
            "{}",
            m.as_str()
        );
        assert_eq!(
            m.from()
                .as_deref()
                .map(|f| f.split('/').next().unwrap().to_owned()),
            Some(if m.id().as_deref() == Some("m5") {
                bare(&same)
            } else {
                bare(&a)
            })
        );
    }
    // Without stream management delivery is all the server can know: erased.
    assert!(net.queued(&b).is_empty());
    // Online now: live delivery, nothing stored.
    net.send(a1, &chat(&b, "live"));
    assert_eq!(ids(&net.take(b1)), ["live"]);
    assert!(net.queued(&b).is_empty());
}

#[test]
fn stream_management_sessions_erase_only_on_ack() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    net.send(a1, &chat(&b, "o1"));
    net.send(a1, &chat(&b, "o2"));
    let b1 = net.bind(&b, "r");
    net.enable_sm(b1);
    net.send(b1, "<presence/>");
    assert_eq!(ids(&net.take(b1)), ["o1", "o2"]);
    assert_eq!(net.queued(&b).len(), 2, "kept until acked");
    // Live messages to an SM session are stored too, and delivered.
    net.send(a1, &chat(&b, "l1"));
    assert_eq!(ids(&net.take(b1)), ["l1"]);
    assert_eq!(net.queued(&b).len(), 3);
    // The session ends without acking: the next login gets all of them, in order.
    net.stored_seqs.clear();
    net.disconnect(b1);
    let b2 = net.bind(&b, "r");
    net.enable_sm(b2);
    net.send(b2, "<presence/>");
    assert_eq!(ids(&net.take(b2)), ["o1", "o2", "l1"]);
    net.ack_all(b2);
    assert!(net.queued(&b).is_empty(), "erased once acked");
    assert_eq!(net.routers[net.home(&b)].offline_stats().erased, 3);
}

#[test]
fn sender_settles_only_after_the_recipients_shard_commits() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    net.enable_sm(a1);
    let full = net.routers[0].full_jid(a1).unwrap().to_string();
    // Drive by hand: the message crosses to shard 1, which has not committed yet.
    net.routers[0].handle_stanza(a1, stanza(&chat(&b, "x")).with_from(&full));
    assert_eq!(net.routers[0].received(a1), 1);
    assert_eq!(net.settled(a1), 0, "in flight");
    let Some(Action::Send { shard: 1, frame }) = net.routers[0].poll_action() else {
        panic!("expected a frame to shard 1");
    };
    net.routers[1].handle_frame(frame);
    // Only the push hook's nudge: nothing settles before the commit.
    assert!(matches!(
        net.routers[1].poll_action(),
        Some(Action::Push { count: 1, .. })
    ));
    assert!(net.routers[1].poll_action().is_none());
    assert_eq!(net.settled(a1), 0, "stored but not committed");
    assert!(net.routers[1].needs_commit());
    net.routers[1].commit();
    assert_eq!(net.offline[1].commits(), 1);
    net.run();
    assert_eq!(net.settled(a1), 1);
    assert_eq!(net.settled_told, [a1]);
    // An IQ to the server is settled at once.
    net.send(
        a1,
        "<iq type='get' id='p'><ping xmlns='urn:xmpp:ping'/></iq>",
    );
    assert_eq!(net.settled(a1), 2);
}

#[test]
fn one_commit_per_turn_holds_many_messages() {
    let mut net = Net::new(1);
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let a1 = net.bind(&a, "r");
    let full = net.routers[0].full_jid(a1).unwrap().to_string();
    for i in 0..50 {
        net.routers[0].handle_stanza(a1, stanza(&chat(&b, &format!("m{i}"))).with_from(&full));
    }
    net.run();
    assert_eq!(net.offline[0].commits(), 1, "group commit");
    assert_eq!(net.queued(&b).len(), 50);
    assert_eq!(net.settled(a1), 50);
}

#[test]
fn full_queue_refuses_with_resource_constraint_and_keeps_what_it_had() {
    let limits = OfflineLimits {
        messages_max: 3,
        bytes_max: 1 << 20,
        ..OfflineLimits::default()
    };
    let stores = (0..2).map(|_| Rc::new(MemoryRosterStore::new())).collect();
    let mut net = Net::with_limits(2, stores, limits);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    for i in 0..5 {
        net.send(a1, &chat(&b, &format!("m{i}")));
    }
    let errors = net.take(a1);
    assert_eq!(ids(&errors), ["m3", "m4"]);
    for e in &errors {
        assert_eq!(
            error_condition(e),
            Some(("wait".into(), "resource-constraint".into()))
        );
    }
    assert_eq!(net.queued(&b).len(), 3);
    assert_eq!(
        net.settled(a1),
        5,
        "an error answer settles the message too"
    );
    // The recipient online with XEP-0198 but not acknowledging: its queue fills just the same,
    // and past the bound the sender is refused rather than acked for a message only delivered.
    let b1 = net.bind(&b, "r");
    net.enable_sm(b1);
    net.send(b1, "<presence/>");
    assert_eq!(ids(&net.take(b1)), ["m0", "m1", "m2"]);
    net.send(a1, &chat(&b, "live1"));
    assert!(net.take(b1).is_empty(), "not delivered unstored");
    let e = net.take(a1);
    assert_eq!(ids(&e), ["live1"]);
    assert_eq!(
        error_condition(&e[0]),
        Some(("wait".into(), "resource-constraint".into()))
    );
    // Once acked, the queue has room: stored and delivered.
    net.ack_all(b1);
    net.send(a1, &chat(&b, "live2"));
    assert_eq!(ids(&net.take(b1)), ["live2"]);
    assert!(net.take(a1).is_empty());
    assert_eq!(net.queued(&b).len(), 1, "only live2, kept until acked");
    // A byte bound too.
    let small = OfflineLimits {
        messages_max: 100,
        bytes_max: 200,
        ..OfflineLimits::default()
    };
    let stores = (0..1).map(|_| Rc::new(MemoryRosterStore::new())).collect();
    let mut net = Net::with_limits(1, stores, small);
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let a1 = net.bind(&a, "r");
    for i in 0..5 {
        net.send(a1, &chat(&b, &format!("m{i}")));
    }
    let stored = net.queued(&b).len();
    assert!((1..5).contains(&stored), "{stored}");
    assert_eq!(net.take(a1).len(), 5 - stored);
}

#[test]
fn a_failing_store_answers_with_errors() {
    let mut net = Net::new(1);
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let a1 = net.bind(&a, "r");
    net.offline[0].set_failing(true);
    net.send(a1, &chat(&b, "m0"));
    let got = net.take(a1);
    assert_eq!(
        error_condition(&got[0]),
        Some(("wait".into(), "internal-server-error".into()))
    );
    assert_eq!(net.settled(a1), 1);
    // A recipient online with XEP-0198 was given the failed message with its sequence number
    // (delivery does not wait for the commit): a later message must not reuse that number, or
    // a late ack of the first would erase the second.
    let b1 = net.bind(&b, "r");
    net.enable_sm(b1);
    net.send(b1, "<presence/>");
    net.offline[0].set_failing(false);
    net.send(a1, &chat(&b, "m1"));
    net.offline[0].set_failing(true);
    net.send(a1, &chat(&b, "m2"));
    assert_eq!(ids(&net.take(b1)), ["m1", "m2"]);
    assert_eq!(ids(&net.take(a1)), ["m2"], "m2 refused: not stored");
    net.offline[0].set_failing(false);
    net.send(a1, &chat(&b, "m3"));
    let seqs = net.stored_seqs[&b1].clone();
    assert_eq!(seqs.len(), 3);
    assert!(seqs[2] > seqs[1], "m3 reuses m2's number: {seqs:?}");
    net.routers[0].handle_acked(b1, &seqs[1..2]);
    net.run();
    assert_eq!(net.queued(&b).len(), 2, "m1 and m3 kept");
}

#[test]
fn a_long_queue_is_delivered_in_pages_and_live_messages_wait_their_turn() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let n = shared::limits::OFFLINE_DRAIN_PAGE_MESSAGES * 2 + 10;
    for i in 0..n {
        net.send(a1, &chat(&b, &format!("m{i}")));
    }
    let b1 = net.bind(&b, "r");
    net.enable_sm(b1);
    net.send(b1, "<presence/>");
    let mut got = ids(&net.take(b1));
    assert_eq!(got.len(), shared::limits::OFFLINE_DRAIN_PAGE_MESSAGES);
    // A live message while the queue is being delivered goes behind it.
    net.send(a1, &chat(&b, "late"));
    assert!(net.take(b1).is_empty());
    // Bounded: each page needs a drained send queue.
    for _ in 0..4 {
        net.room(b1);
        got.extend(ids(&net.take(b1)));
    }
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.push("late".into());
    assert_eq!(got, want);
    // Through: live delivery again.
    net.send(a1, &chat(&b, "after"));
    assert_eq!(ids(&net.take(b1)), ["after"]);
}

#[test]
fn old_messages_are_purged_not_delivered() {
    let mut net = Net::new(1);
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let a1 = net.bind(&a, "r");
    net.send(a1, &chat(&b, "old"));
    let age = OfflineLimits::default().age_max.as_millis() as u64;
    net.routers[0].set_clock(CLOCK_MS + age + 1);
    net.send(a1, &chat(&b, "new"));
    let b1 = net.bind(&b, "r");
    net.send(b1, "<presence/>");
    assert_eq!(ids(&net.take(b1)), ["new"]);
    assert_eq!(net.routers[0].offline_stats().purged, 1);
    assert!(net.queued(&b).is_empty());
}

#[test]
fn full_jid_to_an_absent_resource_is_stored_for_the_bare_jid() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    net.send(
        a1,
        &format!("<message to='{b}@{DOMAIN}/gone' id='f' type='chat'><body>x</body></message>"),
    );
    assert!(net.take(a1).is_empty());
    assert_eq!(net.queued(&b).len(), 1);
}

#[test]
fn error_messages_and_groupchat_are_never_answered() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    for t in ["error", "groupchat", "headline"] {
        net.send(
            a1,
            &format!("<message to='{b}@{DOMAIN}' type='{t}' id='e'><body>x</body></message>"),
        );
        assert!(net.take(a1).is_empty(), "type {t} answered");
    }
    // IQ results and errors to absent resources vanish too.
    net.send(
        a1,
        &format!("<iq to='{b}@{DOMAIN}/x' type='result' id='r'/>"),
    );
    assert!(net.inbox.is_empty());
}

#[test]
fn iq_to_users() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b1 = net.bind(&b, "r");
    // To a bound full JID: delivered, no presence needed.
    net.send(
        a1,
        &format!(
            "<iq to='{b}@{DOMAIN}/r' type='get' id='q1'><query xmlns='jabber:iq:version'/></iq>"
        ),
    );
    assert_eq!(net.take(b1).len(), 1);
    // The answer goes back.
    net.send(
        b1,
        &format!("<iq to='{a}@{DOMAIN}/r' type='result' id='q1'/>"),
    );
    assert_eq!(net.take(a1)[0].type_().as_deref(), Some("result"));
    // To an unbound full JID, and to a bare JID: service-unavailable from the server.
    for to in [format!("{b}@{DOMAIN}/nope"), format!("{b}@{DOMAIN}")] {
        net.send(
            a1,
            &format!("<iq to='{to}' type='get' id='q2'><query xmlns='jabber:iq:version'/></iq>"),
        );
        let got = net.take(a1);
        assert_eq!(got.len(), 1, "{to}");
        assert_eq!(error_condition(&got[0]).unwrap().1, "service-unavailable");
        assert!(net.take(b1).is_empty());
    }
}

#[test]
fn bind_conflict_closes_the_old_conn() {
    let mut net = Net::new(2);
    let b = user_on(1, 2, 0);
    let a = user_on(0, 2, 0);
    let a1 = net.bind(&a, "r");
    let old = net.bind(&b, "same");
    net.send(old, "<presence/>");
    let new = net.bind(&b, "same");
    assert_eq!(net.closed, vec![(old, "conflict")]);
    assert!(net.routers[1].full_jid(old).is_none());
    net.take_all();
    net.send(
        a1,
        &format!("<message to='{b}@{DOMAIN}/same' id='x'><body>hi</body></message>"),
    );
    // The new session has not sent presence, but a full JID reaches it.
    assert_eq!(net.take(new).len(), 1);
    assert!(net.take(old).is_empty());
}

#[test]
fn bind_limits_and_generated_resources() {
    let mut router = Router::new(0, 1, DOMAIN.into(), Box::new(MemoryRosterStore::new()));
    assert_eq!(router.bind("u", Some(""), 1), Err(BindError::BadResource));
    assert_eq!(
        router.bind("u", Some("a\u{7}b"), 1),
        Err(BindError::BadResource)
    );
    assert_eq!(
        router.bind("u", Some(&"x".repeat(2000)), 1),
        Err(BindError::BadResource)
    );
    let mut seen = std::collections::HashSet::new();
    for conn in 0..shared::limits::USER_SESSIONS_MAX as u64 {
        let b = router.bind("u", None, conn).unwrap();
        assert!(b.full_jid.starts_with("u@localhost/"));
        assert!(seen.insert(b.full_jid));
    }
    assert_eq!(router.bind("u", None, 100), Err(BindError::TooManySessions));
    // Replacing an existing resource is still allowed at the cap.
    let taken = router
        .full_jid(3)
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    assert!(router.bind("u", Some(&taken), 101).is_ok());
    assert!(matches!(
        router.poll_action(),
        Some(Action::CloseConn {
            conn: 3,
            condition: "conflict"
        })
    ));
}

#[test]
fn subscription_handshake_then_presence_across_shards() {
    // Goal: RFC 6121 §3.1 across shards: A subscribes to B, B approves; A ends with `to`, B with
    // `from`; then B's presence reaches A (A is subscribed to B), A's does not reach B.
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b1 = net.bind(&b, "r");
    net.send(
        a1,
        "<iq type='get' id='rg'><query xmlns='jabber:iq:roster'/></iq>",
    );
    net.send(
        b1,
        "<iq type='get' id='rg'><query xmlns='jabber:iq:roster'/></iq>",
    );
    net.send(a1, "<presence/>");
    net.send(b1, "<presence/>");
    net.take_all();

    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='subscribe'/>"),
    );
    // A gets a push with ask='subscribe'; B gets the request from A's bare JID.
    let a_got = texts(&net.take(a1));
    assert_eq!(a_got.len(), 1, "{a_got:?}");
    assert!(
        a_got[0].contains("ask='subscribe'") && a_got[0].contains("type='set'"),
        "{a_got:?}"
    );
    let b_got = net.take(b1);
    assert_eq!(b_got.len(), 1);
    assert_eq!(b_got[0].type_().as_deref(), Some("subscribe"));
    assert_eq!(b_got[0].from().as_deref(), Some(bare(&a).as_str()));
    // B's stored roster holds the pending request but B's roster get does not show it.
    assert!(item(&net.roster(&b), &bare(&a)).pending_in);
    net.send(
        b1,
        "<iq type='get' id='rg2'><query xmlns='jabber:iq:roster'/></iq>",
    );
    let r = texts(&net.take(b1));
    assert!(!r[0].contains(&bare(&a)), "{r:?}");

    net.send(
        b1,
        &format!("<presence to='{a}@{DOMAIN}' type='subscribed'/>"),
    );
    let ra = net.roster(&a);
    let rb = net.roster(&b);
    assert_eq!(item(&ra, &bare(&b)).subscription, Subscription::To);
    assert!(!item(&ra, &bare(&b)).ask_out);
    assert_eq!(item(&rb, &bare(&a)).subscription, Subscription::From);
    assert!(!item(&rb, &bare(&a)).pending_in);
    // A: push (to), the subscribed notice, and B's current presence.
    let a_got = net.take(a1);
    let kinds: Vec<_> = a_got
        .iter()
        .map(|s| (s.name().to_string(), s.type_().map(|t| t.to_string())))
        .collect();
    assert!(
        kinds.contains(&("iq".into(), Some("set".into()))),
        "{kinds:?}"
    );
    assert!(
        kinds.contains(&("presence".into(), Some("subscribed".into()))),
        "{kinds:?}"
    );
    assert!(kinds.contains(&("presence".into(), None)), "{kinds:?}");
    let b_pres = a_got
        .iter()
        .find(|s| s.name() == "presence" && s.type_().is_none())
        .unwrap();
    assert_eq!(
        b_pres.from().as_deref(),
        Some(format!("{b}@{DOMAIN}/r").as_str())
    );
    // B: push (from).
    let b_got = texts(&net.take(b1));
    assert_eq!(b_got.len(), 1, "{b_got:?}");
    assert!(b_got[0].contains("subscription='from'"));

    // B's presence change reaches A; A's does not reach B (B is not subscribed to A).
    net.send(b1, "<presence><show>away</show></presence>");
    assert_eq!(net.take(a1).len(), 1);
    net.take(b1); // B's own reflection
    net.send(a1, "<presence><show>dnd</show></presence>");
    assert!(net.take(b1).is_empty());

    // A new session of A probes B and gets B's presence.
    let a2 = net.bind(&a, "two");
    net.send(a2, "<presence/>");
    let got = net.take(a2);
    let from_b: Vec<_> = got
        .iter()
        .filter(|s| s.from().as_deref() == Some(&format!("{b}@{DOMAIN}/r")))
        .collect();
    assert_eq!(from_b.len(), 1, "{:?}", texts(&got));
    assert!(from_b[0].as_str().contains("<show>away</show>"));
    net.take_all();

    // B disconnects: A's available sessions get unavailable from B's full JID.
    net.disconnect(b1);
    for conn in [a1, a2] {
        let got = net.take(conn);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].type_().as_deref(), Some("unavailable"));
        assert_eq!(
            got[0].from().as_deref(),
            Some(format!("{b}@{DOMAIN}/r").as_str())
        );
    }
}

#[test]
fn mutual_subscription_and_unsubscribe() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b1 = net.bind(&b, "r");
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='subscribe'/>"),
    );
    net.send(
        b1,
        &format!("<presence to='{a}@{DOMAIN}' type='subscribed'/>"),
    );
    net.send(
        b1,
        &format!("<presence to='{a}@{DOMAIN}' type='subscribe'/>"),
    );
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='subscribed'/>"),
    );
    assert_eq!(
        item(&net.roster(&a), &bare(&b)).subscription,
        Subscription::Both
    );
    assert_eq!(
        item(&net.roster(&b), &bare(&a)).subscription,
        Subscription::Both
    );
    // Already subscribed: a repeated subscribe is auto-approved, not shown to B.
    net.send(b1, "<presence/>");
    net.take_all();
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='subscribe'/>"),
    );
    assert!(net.take(b1).is_empty());
    assert_eq!(
        item(&net.roster(&a), &bare(&b)).subscription,
        Subscription::Both
    );

    // A unsubscribes from B: A both->from, B both->to; A gets B's unavailable.
    net.send(a1, "<presence/>");
    net.take_all();
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='unsubscribe'/>"),
    );
    assert_eq!(
        item(&net.roster(&a), &bare(&b)).subscription,
        Subscription::From
    );
    assert_eq!(
        item(&net.roster(&b), &bare(&a)).subscription,
        Subscription::To
    );
    let a_got = net.take(a1);
    assert!(
        a_got
            .iter()
            .any(|s| s.type_().as_deref() == Some("unavailable")),
        "{:?}",
        texts(&a_got)
    );

    // A revokes B's subscription to A: A from->none, B to->none.
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='unsubscribed'/>"),
    );
    assert_eq!(
        item(&net.roster(&a), &bare(&b)).subscription,
        Subscription::None
    );
    assert_eq!(
        item(&net.roster(&b), &bare(&a)).subscription,
        Subscription::None
    );
}

#[test]
fn denied_request_leaves_no_visible_item() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    // B offline: the request waits and is delivered on B's initial presence.
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='subscribe'/>"),
    );
    assert!(item(&net.roster(&b), &bare(&a)).pending_in);
    let b1 = net.bind(&b, "r");
    net.send(b1, "<presence/>");
    let got = net.take(b1);
    assert!(
        got.iter()
            .any(|s| s.type_().as_deref() == Some("subscribe")),
        "{:?}",
        texts(&got)
    );
    net.send(
        b1,
        &format!("<presence to='{a}@{DOMAIN}' type='unsubscribed'/>"),
    );
    assert!(net.roster(&b).is_empty());
    let ra = net.roster(&a);
    assert_eq!(item(&ra, &bare(&b)).subscription, Subscription::None);
    assert!(!item(&ra, &bare(&b)).ask_out);
}

#[test]
fn roster_get_set_remove() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "one");
    let a2 = net.bind(&a, "two");
    net.send(
        a1,
        "<iq type='get' id='g1'><query xmlns='jabber:iq:roster'/></iq>",
    );
    let got = net.take(a1);
    assert_eq!(got[0].as_str(), format!("<iq to='{a}@{DOMAIN}/one' id='g1' type='result'><query xmlns='jabber:iq:roster'/></iq>"));
    net.send(
        a2,
        "<iq type='get' id='g1'><query xmlns='jabber:iq:roster'/></iq>",
    );
    net.take(a2);

    net.send(
        a1,
        &format!("<iq type='set' id='s1'><query xmlns='jabber:iq:roster'><item jid='{b}@{DOMAIN}' name='Bee &amp; co'><group>Friends</group></item></query></iq>"),
    );
    let got = texts(&net.take(a1));
    assert_eq!(got.len(), 2, "{got:?}"); // push + result
    assert!(got
        .iter()
        .any(|s| s.contains("type='result'") && s.contains("id='s1'")));
    let push = format!("<item jid='{b}@{DOMAIN}' name='Bee &amp; co' subscription='none'><group>Friends</group></item>");
    assert!(
        got.iter()
            .any(|s| s.contains("type='set'") && s.contains(&push)),
        "{got:?}"
    );
    assert_eq!(texts(&net.take(a2)).len(), 1); // the push only
    let stored = net.roster(&a);
    assert_eq!(item(&stored, &bare(&b)).name.as_deref(), Some("Bee & co"));
    assert_eq!(item(&stored, &bare(&b)).groups, vec!["Friends".to_string()]);

    net.send(
        a1,
        "<iq type='get' id='g2'><query xmlns='jabber:iq:roster'/></iq>",
    );
    assert!(texts(&net.take(a1))[0].contains(&push));

    // Two items in one set: bad-request.
    net.send(a1, "<iq type='set' id='s2'><query xmlns='jabber:iq:roster'><item jid='x@y'/><item jid='z@y'/></query></iq>");
    assert_eq!(error_condition(&net.take(a1)[0]).unwrap().1, "bad-request");

    // Subscribe, then remove: B gets unsubscribe (from ask_out) and the item is gone.
    let b1 = net.bind(&b, "r");
    net.send(b1, "<presence/>");
    net.send(
        a1,
        &format!("<presence to='{b}@{DOMAIN}' type='subscribe'/>"),
    );
    net.take_all();
    net.send(a1, &format!("<iq type='set' id='rm'><query xmlns='jabber:iq:roster'><item jid='{b}@{DOMAIN}' subscription='remove'/></query></iq>"));
    let got = texts(&net.take(a1));
    assert!(
        got.iter().any(|s| s.contains("subscription='remove'")),
        "{got:?}"
    );
    assert!(got
        .iter()
        .any(|s| s.contains("id='rm'") && s.contains("type='result'")));
    assert!(net.roster(&a).is_empty());
    assert!(
        net.roster(&b).is_empty(),
        "the pending request was cancelled: {:?}",
        net.roster(&b)
    );
    // Removing again: item-not-found.
    net.send(a1, &format!("<iq type='set' id='rm2'><query xmlns='jabber:iq:roster'><item jid='{b}@{DOMAIN}' subscription='remove'/></query></iq>"));
    assert_eq!(
        error_condition(&net.take(a1)[0]).unwrap().1,
        "item-not-found"
    );
}

#[test]
fn server_iqs() {
    let mut net = Net::new(1);
    let a1 = net.bind("alice", "r");
    net.send(a1, &format!("<iq type='get' to='{DOMAIN}' id='d1'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>"));
    let got = texts(&net.take(a1));
    assert!(
        got[0].contains("type='result'") && got[0].contains("id='d1'"),
        "{got:?}"
    );
    assert!(got[0].contains("<identity category='server' type='im'/>"));
    assert!(got[0].contains("<feature var='urn:xmpp:ping'/>"));
    assert!(got[0].contains("<feature var='jabber:iq:roster'/>"));
    net.send(a1, &format!("<iq type='get' to='{DOMAIN}' id='d2'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>"));
    assert!(texts(&net.take(a1))[0].contains("type='result'"));
    for ping in [
        format!("<iq type='get' to='{DOMAIN}' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>"),
        "<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>".to_string(),
    ] {
        net.send(a1, &ping);
        let got = texts(&net.take(a1));
        assert_eq!(got.len(), 1);
        assert!(
            got[0].contains("type='result'") && got[0].contains("id='p1'"),
            "{got:?}"
        );
    }
    net.send(
        a1,
        "<iq type='set' id='s'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>",
    );
    assert!(texts(&net.take(a1))[0].contains("type='result'"));
    net.send(
        a1,
        &format!("<iq type='get' to='{DOMAIN}' id='u'><query xmlns='jabber:iq:version'/></iq>"),
    );
    let got = net.take(a1);
    assert_eq!(
        error_condition(&got[0]),
        Some(("cancel".into(), "service-unavailable".into()))
    );
    assert_eq!(got[0].id().as_deref(), Some("u"));
    // Results and errors to the server are ignored.
    net.send(a1, &format!("<iq type='result' to='{DOMAIN}' id='r'/>"));
    net.send(a1, &format!("<iq type='error' to='{DOMAIN}' id='r'/>"));
    assert!(net.take(a1).is_empty());
    // Empty IQ get: bad-request.
    net.send(a1, "<iq type='get' id='e'/>");
    assert_eq!(error_condition(&net.take(a1)[0]).unwrap().1, "bad-request");
}

#[test]
fn bad_and_remote_addresses() {
    let mut net = Net::new(1);
    let a1 = net.bind("alice", "r");
    net.send(a1, "<message to='a@b@c' id='1'><body>x</body></message>");
    assert_eq!(
        error_condition(&net.take(a1)[0]),
        Some(("modify".into(), "jid-malformed".into()))
    );
    net.send(
        a1,
        "<message to='bob@elsewhere.example' id='2'><body>x</body></message>",
    );
    assert_eq!(
        error_condition(&net.take(a1)[0]).unwrap().1,
        "remote-server-not-found"
    );
}

#[test]
fn undeliverable_bounces_resource_constraint() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b1 = net.bind(&b, "r");
    net.send(
        a1,
        &format!("<message to='{b}@{DOMAIN}/r' id='full'><body>x</body></message>"),
    );
    let s = net.take(b1).pop().unwrap();
    net.routers[1].handle_undeliverable(b1, s);
    net.run();
    let got = net.take(a1);
    assert_eq!(
        error_condition(&got[0]),
        Some(("wait".into(), "resource-constraint".into()))
    );
    assert_eq!(got[0].id().as_deref(), Some("full"));
}

#[test]
fn unacked_iq_requests_get_an_error_when_the_session_ends() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b1 = net.bind(&b, "r");
    net.enable_sm(b1);
    let to = format!("{b}@{DOMAIN}/r");
    net.send(
        a1,
        &format!("<iq to='{to}' id='get1' type='get'><q xmlns='x'/></iq>"),
    );
    net.send(a1, &format!("<iq to='{to}' id='res1' type='result'/>"));
    net.send(a1, &format!("<presence to='{to}' id='p1'/>"));
    let given = net.take(b1);
    assert_eq!(given.len(), 3);
    // b1 ends without acknowledging any of them.
    for s in given {
        net.routers[1].handle_unacked(b1, s.bytes.clone());
    }
    net.disconnect(b1);
    net.run();
    let got = net.take(a1);
    assert_eq!(got.len(), 1, "{:?}", texts(&got));
    assert_eq!(got[0].id().as_deref(), Some("get1"));
    assert_eq!(got[0].type_().as_deref(), Some("error"));
    assert_eq!(
        error_condition(&got[0]),
        Some(("wait".into(), "recipient-unavailable".into()))
    );
}

#[test]
fn usage_cache_stays_bounded_and_never_reuses_a_sequence_a_session_may_ack() {
    let mut net = Net::new(1);
    net.routers[0].set_usage_cache_max(8);
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let a1 = net.bind(&a, "r");
    let (b1, b2) = (net.bind(&b, "one"), net.bind(&b, "two"));
    for c in [b1, b2] {
        net.enable_sm(c);
        net.send(c, "<presence/>");
    }
    net.take_all();
    net.send(a1, &chat(&b, "m0"));
    let seq0 = net.stored_seqs[&b2][0];
    // b1 acknowledges m0: erased, b's queue is empty; b2 still holds m0 unacknowledged.
    net.routers[0].handle_acked(b1, &[seq0]);
    net.run();
    assert!(net.queued(&b).is_empty());
    let churn = |net: &mut Net, round: usize| {
        for i in 0..100 {
            net.send(a1, &chat(&format!("churn{round}x{i}"), "c"));
            let len = net.routers[0].usage_cache_len();
            assert!(len <= 9, "cache holds {len} users");
        }
    };
    churn(&mut net, 0);
    net.send(a1, &chat(&b, "m1"));
    let seq1 = *net.stored_seqs[&b2].last().unwrap();
    assert_ne!(
        seq1, seq0,
        "b has sessions: its next sequence number is kept"
    );
    // b2's late ack of m0 must not erase m1.
    net.routers[0].handle_acked(b2, &[seq0]);
    net.run();
    let q = net.queued(&b);
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].seq, seq1);
    // Without sessions b's entry goes too, and comes back from the store intact.
    net.disconnect(b1);
    net.disconnect(b2);
    net.stored_seqs.clear();
    net.take_all();
    churn(&mut net, 1);
    let b3 = net.bind(&b, "three");
    net.enable_sm(b3);
    net.send(b3, "<presence/>");
    assert_eq!(ids(&net.take(b3)), ["m1"]);
    net.send(a1, &chat(&b, "m2"));
    assert_eq!(ids(&net.take(b3)), ["m2"]);
    assert_eq!(net.stored_seqs[&b3], [seq1, seq1 + 1]);
    assert!(net.take(a1).is_empty(), "nothing refused");
}

#[test]
fn directed_presence_and_reflection() {
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "one");
    let a2 = net.bind(&a, "two");
    let b1 = net.bind(&b, "r");
    net.send(b1, "<presence/>");
    net.send(a1, "<presence/>");
    // Initial presence is reflected to the sender (RFC 6121 §4.2.2), and shown to no one else yet.
    assert_eq!(net.take(a1).len(), 1);
    assert!(net.take(a2).is_empty());
    net.send(a2, "<presence/>");
    // a2 sees its reflection and a1's presence; a1 sees a2's.
    assert_eq!(net.take(a2).len(), 2);
    assert_eq!(net.take(a1).len(), 1);
    net.take_all();
    net.send(a1, &format!("<presence to='{b}@{DOMAIN}'/>"));
    assert_eq!(net.take(b1).len(), 1);
    net.disconnect(a1);
    let got = net.take(a2);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].type_().as_deref(), Some("unavailable"));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Bind {
            user: usize,
            resource: usize,
        },
        Disconnect {
            pick: usize,
        },
        Presence {
            pick: usize,
            priority: i8,
            unavailable: bool,
        },
        Message {
            pick: usize,
            to_user: usize,
            to_resource: Option<usize>,
        },
        Subscribe {
            pick: usize,
            to_user: usize,
            approve: bool,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4usize, 0..3usize).prop_map(|(user, resource)| Op::Bind { user, resource }),
            any::<usize>().prop_map(|pick| Op::Disconnect { pick }),
            (any::<usize>(), -2..3i8, any::<bool>()).prop_map(|(pick, priority, unavailable)| {
                Op::Presence {
                    pick,
                    priority,
                    unavailable,
                }
            }),
            (any::<usize>(), 0..4usize, proptest::option::of(0..3usize)).prop_map(
                |(pick, to_user, to_resource)| Op::Message {
                    pick,
                    to_user,
                    to_resource
                }
            ),
            (any::<usize>(), 0..4usize, any::<bool>()).prop_map(|(pick, to_user, approve)| {
                Op::Subscribe {
                    pick,
                    to_user,
                    approve,
                }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        // Goal: whatever sessions come and go, no stanza is ever delivered to an unbound conn or
        // on the wrong shard (asserted in Net::run), and a message to a user with no available
        // session is stored (or comes back as an error) rather than vanishing.
        #[test]
        fn never_delivers_to_unbound_conns(ops in proptest::collection::vec(op(), 1..60)) {
            let mut net = Net::new(2);
            let users: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
            let mut live: Vec<(u64, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Bind { user, resource } => {
                        let conn = net.bind(&users[user], &format!("r{resource}"));
                        live.retain(|(c, _)| !net.closed.iter().any(|(x, _)| x == c));
                        live.push((conn, user));
                    }
                    Op::Disconnect { pick } if !live.is_empty() => {
                        let (conn, _) = live.remove(pick % live.len());
                        net.disconnect(conn);
                    }
                    Op::Presence { pick, priority, unavailable } if !live.is_empty() => {
                        let (conn, _) = live[pick % live.len()];
                        if unavailable {
                            net.send(conn, "<presence type='unavailable'/>");
                        } else {
                            net.send(conn, &format!("<presence><priority>{priority}</priority></presence>"));
                        }
                    }
                    Op::Message { pick, to_user, to_resource } if !live.is_empty() => {
                        let (conn, _) = live[pick % live.len()];
                        let to = match to_resource {
                            Some(r) => format!("{}@{DOMAIN}/r{r}", users[to_user]),
                            None => format!("{}@{DOMAIN}", users[to_user]),
                        };
                        let stored = |net: &Net| -> u64 {
                            net.routers.iter().map(|r| r.offline_stats().stored).sum()
                        };
                        let before: usize = net.inbox.values().map(Vec::len).sum();
                        let stored_before = stored(&net);
                        net.send(conn, &format!("<message to='{to}' type='chat' id='pm'><body>x</body></message>"));
                        let after: usize = net.inbox.values().map(Vec::len).sum();
                        prop_assert!(
                            after > before || stored(&net) > stored_before,
                            "message to {to} vanished"
                        );
                    }
                    Op::Subscribe { pick, to_user, approve } if !live.is_empty() => {
                        let (conn, _) = live[pick % live.len()];
                        let t = if approve { "subscribed" } else { "subscribe" };
                        net.send(conn, &format!("<presence to='{}@{DOMAIN}' type='{t}'/>", users[to_user]));
                    }
                    _ => {}
                }
            }
            for (conn, _) in live.clone() {
                net.disconnect(conn);
            }
            for r in &net.routers {
                prop_assert_eq!(r.session_count(), 0);
            }
        }
    }
}

#[test]
fn odd_input_never_panics() {
    // Goal: cold-path parsing (IQ payloads, roster items, priorities, addresses) survives
    // anything the framer lets through.
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let a1 = net.bind(&a, "r");
    let inputs = [
        "<iq type='set' id='1'><query xmlns='jabber:iq:roster'/></iq>",
        "<iq type='set' id='1'><query xmlns='jabber:iq:roster'><item/></query></iq>",
        "<iq type='set' id='1'><query xmlns='jabber:iq:roster'><item jid='@@'/></query></iq>",
        "<iq type='set' id='1'><query xmlns='jabber:iq:roster'><item jid='x@y'><group/></item></query></iq>",
        "<iq type='set' id='1'><query xmlns='jabber:iq:roster'><item jid='x@y'><group>a</group><group>a</group></item></query></iq>",
        "<iq type='get' id='1'><x:query xmlns:x='jabber:iq:roster'/></iq>",
        "<iq type='get' id='1'><query xmlns='jabber:iq:roster'><item jid='x@y' subscription='both'/></query></iq>",
        "<iq type='bogus' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
        "<iq id='1'/>",
        "<iq type='get'>text only</iq>",
        "<presence><priority>999</priority></presence>",
        "<presence><priority>abc</priority></presence>",
        "<presence type='subscribe'/>",
        "<presence type='probe' to='nobody@localhost'/>",
        "<presence type='unsubscribed' to='nobody@localhost'/>",
        "<presence to='localhost/x' type='subscribe'/>",
        "<message to=''><body/></message>",
        "<message to='localhost'><body/></message>",
        "<message to='a@localhost/\u{e9}&amp;' type='bogus'/>",
        "<r xmlns='urn:xmpp:sm:3'/>",
    ];
    for xml in inputs {
        net.send(a1, xml);
    }
    let own = format!("<iq type='set' id='1'><query xmlns='jabber:iq:roster'><item jid='{a}@{DOMAIN}'/></query></iq>");
    net.send(a1, &own);
    assert_eq!(
        error_condition(net.take(a1).last().unwrap()).unwrap().1,
        "not-allowed"
    );
    assert!(net.roster(&a).is_empty(), "{:?}", net.roster(&a));
}

#[test]
fn a_message_stored_before_the_clock_was_set_is_not_purged() {
    // Regression: a shard that had only received mesh frames had never had its clock set, so
    // the first cross-shard message was stamped 0 and then purged as 56 years old at login.
    let mut net = Net::new(2);
    net.routers[1].set_clock(0);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    net.send(a1, &chat(&b, "first"));
    net.routers[1].set_clock(CLOCK_MS);
    let b1 = net.bind(&b, "r");
    net.send(b1, "<presence/>");
    assert_eq!(ids(&net.take(b1)), ["first"]);
    assert_eq!(net.routers[1].offline_stats().purged, 0);
}

#[test]
fn a_login_during_a_commit_in_flight_waits_for_it() {
    // The commit runs off the shard (begin_commit .. finish_commit); a login meanwhile must not
    // load a page that lacks the messages being committed.
    let mut net = Net::new(1);
    let a = user_on(0, 1, 0);
    let b = user_on(0, 1, 1);
    let a1 = net.bind(&a, "r");
    net.send(a1, &chat(&b, "m0"));
    let full = net.routers[0].full_jid(a1).unwrap().to_string();
    net.routers[0].handle_stanza(a1, stanza(&chat(&b, "m1")).with_from(&full));
    let mut ticket = net.routers[0].begin_commit().expect("a batch to commit");
    assert!(
        net.routers[0].begin_commit().is_none(),
        "one commit in flight at a time"
    );
    let b1 = net.bind(&b, "r");
    let full_b = net.routers[0].full_jid(b1).unwrap().to_string();
    net.routers[0].handle_stanza(b1, stanza("<presence/>").with_from(&full_b));
    while let Some(a) = net.routers[0].poll_action() {
        assert!(
            !matches!(a, Action::DeliverStored { .. }),
            "delivered before the commit"
        );
    }
    assert_eq!(net.settled(a1), 1, "m1 is not settled while in flight");
    use router::OfflineStore;
    ticket.result = Some(net.offline[0].commit(&ticket.batch));
    net.routers[0].finish_commit(ticket);
    net.run();
    assert_eq!(ids(&net.take(b1)), ["m0", "m1"]);
    assert_eq!(net.settled(a1), 2);
}

#[test]
fn a_full_send_queue_switches_a_stream_management_session_to_its_stored_queue() {
    // The driver could not queue stored message m3 for b1 (its send queue was full): b1 takes
    // its queue from m3 on, a page per drained send queue, and live messages wait behind it, so
    // it gets m3.. once each and in order after the m0..m2 it had.
    let mut net = Net::new(2);
    let a = user_on(0, 2, 0);
    let b = user_on(1, 2, 0);
    let a1 = net.bind(&a, "r");
    let b1 = net.bind(&b, "r");
    net.enable_sm(b1);
    net.send(b1, "<presence/>");
    net.take_all();
    for i in 0..6 {
        net.send(a1, &chat(&b, &format!("m{i}")));
    }
    let mut got = ids(&net.take(b1));
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5"]);
    // Say m3..m5 never made it into the send queue.
    let seqs = net.stored_seqs[&b1].clone();
    got.truncate(3);
    let shard = net.conn_shard[&b1];
    net.routers[shard].handle_queue_full(b1, seqs[3]);
    // A live message now goes behind the stored ones.
    net.send(a1, &chat(&b, "late"));
    assert!(
        net.take(b1).is_empty(),
        "nothing live while the queue is taken"
    );
    net.room(b1);
    got.extend(ids(&net.take(b1)));
    assert_eq!(got, ["m0", "m1", "m2", "m3", "m4", "m5", "late"]);
    // Through: live delivery again.
    net.room(b1);
    net.send(a1, &chat(&b, "after"));
    assert_eq!(ids(&net.take(b1)), ["after"]);

    // A session without XEP-0198 is left as it is (the driver closes it instead).
    let c = user_on(1, 2, 1);
    let c1 = net.bind(&c, "r");
    net.send(c1, "<presence/>");
    net.take_all();
    net.routers[net.conn_shard[&c1]].handle_queue_full(c1, 0);
    net.send(a1, &chat(&c, "live"));
    assert_eq!(ids(&net.take(c1)), ["live"]);
}
