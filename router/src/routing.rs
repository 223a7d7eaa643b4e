//! The per-shard router: who is online here, where each stanza goes, presence and rosters.
//!
//! Sans-IO: every method only changes in-memory state and queues `Action`s, which the shard's
//! driver takes with `poll_action` and executes (write to a session, close a connection, send a
//! frame to another shard). Each user lives on its home shard (`home_shard("node@domain")`); a
//! stanza for a user homed elsewhere becomes an `Action::Send` to that shard, whose router
//! handles it in `handle_frame`.
//!
//! Rosters are read from the `RosterStore` on first need and cached while the user has sessions,
//! in a per-shard cache bounded by `ROSTER_CACHE_USERS_MAX` (not per session: idle sessions
//! hold no roster).
//! A roster change goes into the shard's next group commit (with the offline-queue writes, in
//! one transaction, off the reactor where the driver has a committer): the cache holds the new
//! roster at once, and what the change causes (the IQ result, roster pushes, subscription
//! stanzas) is held until the commit is durable, as are later actions for the connections
//! involved, so nothing overtakes them. If the commit fails, the requester gets
//! `internal-server-error` instead and the roster is read again from the store.

use std::collections::{BTreeSet, HashMap, VecDeque};

use bytes::Bytes;
use shared::limits::{
    JID_PART_BYTES_MAX, OFFLINE_DRAIN_PAGE_MESSAGES, OFFLINE_USAGE_CACHE_USERS_MAX,
    ROSTER_CACHE_USERS_MAX, ROSTER_ITEMS_MAX, STORE_BATCH_WRITES_MAX, USER_SESSIONS_MAX,
};
use shared::shard::home_shard;
use shared::stanza::{Kind, Stanza};
use shared::table::ShrinkIfSparse;

use crate::build::{self, Attrs};
use crate::errors::error_reply;
use crate::mesh::{Frame, Origin};
use crate::offline::{self, Batch, MemoryOfflineStore, OfflineLimits, OfflineStore, Stored, Usage};
use crate::roster::{self, RosterItem, ROSTER_NS};
use crate::roster_store::RosterStore;
use crate::store::StoreError;
use crate::ConnId;

/// XEP-0030 namespaces.
pub const DISCO_INFO_NS: &str = "http://jabber.org/protocol/disco#info";
pub const DISCO_ITEMS_NS: &str = "http://jabber.org/protocol/disco#items";
/// XEP-0199.
pub const PING_NS: &str = "urn:xmpp:ping";
/// RFC 3921's legacy session establishment, still sent by some clients.
pub const SESSION_NS: &str = "urn:ietf:params:xml:ns:xmpp-session";

/// What the shard's driver must do on the router's behalf.
#[derive(Debug)]
pub enum Action {
    /// Write this stanza (`stanza.bytes`) to a local connection's session. It carries the
    /// `Stanza`, not just bytes, so that if the session's queue is full the driver can hand it
    /// back to `Router::handle_undeliverable` for a bounce without re-parsing.
    Deliver { conn: ConnId, stanza: Stanza },
    /// Close a local connection with this RFC 6120 stream error condition (e.g. `conflict`).
    CloseConn {
        conn: ConnId,
        condition: &'static str,
    },
    /// Send a frame to another shard's router.
    Send { shard: usize, frame: Frame },
    /// Write this stored message to a local connection. `seq` is its number in the user's
    /// offline queue when the session will acknowledge it (XEP-0198): on its ack the driver calls
    /// `handle_acked`. If the connection's queue is full it is not bounced: it stays stored.
    DeliverStored {
        conn: ConnId,
        stanza: Stanza,
        seq: Option<u64>,
    },
    /// More of the connection's stanzas are settled (see `settled`): the driver lets its stream
    /// machine send a XEP-0198 ack that was waiting for them.
    Settled { conn: ConnId },
    /// A message was stored for `node`, who has no session to take it: the push hook may tell
    /// the user's devices. `count` is how many messages wait. Never carries the message.
    Push { node: String, count: usize },
}

/// A successful bind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound {
    pub full_jid: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BindError {
    #[error("too many sessions for this account")]
    TooManySessions,
    #[error("resource is not valid")]
    BadResource,
}

/// One bound session (resource) on this shard. Most sessions sit idle for hours, so this is
/// kept small (see the size test): the full JID is the one copy of the session's address, and
/// what few sessions need at once lives in `extra`, allocated only while needed.
#[derive(Debug)]
struct Session {
    /// `node@domain/resource`; `node()` and `resource()` are slices of it.
    full_jid: Box<str>,
    /// Length of the node part of `full_jid` (at most `JID_PART_BYTES_MAX`).
    node_len: u16,
    /// Sent available presence and not since unavailable (RFC 6121 §4.2).
    available: bool,
    priority: i8,
    /// Requested the roster, so it gets roster pushes (RFC 6121 §2.1.6).
    interested: bool,
    /// Acknowledges what it receives (XEP-0198): stored messages delivered to it are erased on
    /// its ack, not on delivery.
    sm: bool,
    /// Stanzas received from it (`handle_stanza` calls).
    received: u64,
    /// A custom presence, messages in flight, an offline queue being delivered; `None` when
    /// the session has none of these (an idle session that sent a plain `<presence/>`).
    extra: Option<Box<SessionExtra>>,
}

// `Session::node_len` holds a node's length.
const _: () = assert!(JID_PART_BYTES_MAX <= u16::MAX as usize);

/// The parts of a session that most idle sessions do not need.
#[derive(Debug, Default)]
struct SessionExtra {
    /// The last available presence it broadcast (from = its full JID, no `to`), for probes,
    /// unless it was the plain `<presence from='full JID'/>`, which is rebuilt when needed.
    presence: Option<Stanza>,
    /// Sequence numbers of its messages not yet settled (stored durably, delivered or refused).
    outstanding: BTreeSet<u64>,
    /// While its offline queue is being delivered: the next sequence number to load. New
    /// messages for the user are stored, not delivered live, until the queue is through, so
    /// order is kept.
    draining: Option<u64>,
}

impl SessionExtra {
    fn is_empty(&self) -> bool {
        self.presence.is_none() && self.outstanding.is_empty() && self.draining.is_none()
    }
}

impl Session {
    fn new(full_jid: Box<str>, node_len: usize) -> Session {
        assert!(node_len < full_jid.len());
        assert_eq!(full_jid.as_bytes()[node_len], b'@');
        Session {
            // `bind` checked the node against JID_PART_BYTES_MAX, which fits (asserted above).
            node_len: u16::try_from(node_len).expect("node length fits u16"),
            full_jid,
            available: false,
            priority: 0,
            interested: false,
            sm: false,
            received: 0,
            extra: None,
        }
    }

    fn node(&self) -> &str {
        &self.full_jid[..usize::from(self.node_len)]
    }

    /// The resource: what follows the first `/` after the domain.
    fn resource(&self) -> &str {
        let rest = &self.full_jid[usize::from(self.node_len)..];
        rest.split_once('/').map_or("", |(_, r)| r)
    }

    fn draining(&self) -> Option<u64> {
        self.extra.as_ref().and_then(|e| e.draining)
    }

    /// How many of its stanzas are settled, counted from the first.
    fn settled(&self) -> u64 {
        self.extra
            .as_ref()
            .and_then(|e| e.outstanding.first().copied())
            .unwrap_or(self.received)
    }

    /// The presence it broadcast last, addressed from its full JID, if available.
    fn presence(&self) -> Option<Stanza> {
        if !self.available {
            return None;
        }
        match self.extra.as_ref().and_then(|e| e.presence.as_ref()) {
            Some(p) => Some(p.clone()),
            None => Some(build::stanza(
                "presence",
                Attrs {
                    from: Some(&self.full_jid),
                    ..Attrs::default()
                },
                "",
            )),
        }
    }

    /// Records an available presence (already stamped with its full JID); a plain one is not
    /// kept, since `presence()` rebuilds it.
    fn set_presence(&mut self, stanza: &Stanza) {
        let custom = (!is_plain_presence(stanza)).then(|| stanza.clone());
        if custom.is_some() || self.extra.is_some() {
            self.extra_mut().presence = custom;
        }
        self.compact();
    }

    fn extra_mut(&mut self) -> &mut SessionExtra {
        self.extra.get_or_insert_with(Box::default)
    }

    fn set_draining(&mut self, next: Option<u64>) {
        if next.is_some() || self.extra.is_some() {
            self.extra_mut().draining = next;
        }
        self.compact();
    }

    /// Frees `extra` once it holds nothing.
    fn compact(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }
}

/// Whether an available presence stamped by the server is exactly `<presence from='...'/>`:
/// no other attribute, no content.
fn is_plain_presence(stanza: &Stanza) -> bool {
    let h = &stanza.header;
    let Some(from_attr) = &h.from_attr else {
        return false;
    };
    stanza.kind == Kind::Presence
        && h.self_closing
        && h.to.is_none()
        && h.id.is_none()
        && h.type_.is_none()
        && h.xmlns.is_none()
        && stanza.bytes.len() == "<presence".len() + from_attr.len() + "/>".len()
}

/// A user with at least one session here.
#[derive(Debug)]
struct User {
    /// Its sessions, in bind order (each session's resource is in its full JID).
    conns: Conns,
}

/// A user's connections in bind order: one inline (the usual case), more on the heap.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Conns {
    One(ConnId),
    Many(Vec<ConnId>),
}

impl Conns {
    fn len(&self) -> usize {
        match self {
            Conns::One(_) => 1,
            Conns::Many(v) => v.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = ConnId> + '_ {
        let slice = match self {
            Conns::One(c) => std::slice::from_ref(c),
            Conns::Many(v) => v.as_slice(),
        };
        slice.iter().copied()
    }

    fn push(&mut self, conn: ConnId) {
        match self {
            Conns::One(c) => *self = Conns::Many(vec![*c, conn]),
            Conns::Many(v) => v.push(conn),
        }
    }

    /// Removes `conn`; returns whether none is left.
    fn remove(&mut self, conn: ConnId) -> bool {
        match self {
            Conns::One(c) => *c == conn,
            Conns::Many(v) => {
                v.retain(|c| *c != conn);
                match *v.as_slice() {
                    [] => true,
                    [only] => {
                        *self = Conns::One(only);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

/// Where a `to` address points.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// Our domain itself (or `domain/resource`).
    Server,
    /// A user at our domain.
    User {
        node: String,
        resource: Option<String>,
    },
    /// Another domain: we do not federate.
    Remote,
}

#[derive(Debug)]
enum RosterError {
    Store(StoreError),
    Full,
}

impl From<StoreError> for RosterError {
    fn from(e: StoreError) -> Self {
        RosterError::Store(e)
    }
}

/// An item's state before and after a change (`None`: no such item).
type ItemChange = (Option<RosterItem>, Option<RosterItem>);

/// Actions waiting for a commit (see the module comment).
#[derive(Debug)]
struct Held {
    actions: Vec<Action>,
    /// Sent instead of `actions` if the commit fails: the requester's error.
    on_failure: Vec<Action>,
    /// The actions follow a roster write; otherwise they only queue behind held ones.
    depends: bool,
    /// The local connection whose stanza caused them: its later frames queue behind.
    origin: Option<ConnId>,
}

/// Per connection, how many: held actions for it (an origin counts none; later actions for it
/// queue behind), or store writes its stanzas added to the pending batch.
#[derive(Debug, Default)]
struct HeldConns {
    counts: HashMap<ConnId, usize>,
    /// The largest count.
    max: usize,
}

impl HeldConns {
    fn contains(&self, conn: ConnId) -> bool {
        self.counts.contains_key(&conn)
    }

    fn add_action(&mut self, action: &Action) {
        if let Some(conn) = action_conn(action) {
            self.bump(conn);
        }
    }

    fn bump(&mut self, conn: ConnId) {
        let n = self.counts.entry(conn).or_default();
        *n += 1;
        self.max = self.max.max(*n);
    }

    /// The connections counted at least `limit` times; nothing scanned while none is.
    fn at_least(&self, limit: usize) -> Vec<ConnId> {
        if self.max < limit {
            return Vec::new();
        }
        self.counts
            .iter()
            .filter(|&(_, &n)| n >= limit)
            .map(|(&conn, _)| conn)
            .collect()
    }

    fn add(&mut self, held: &Held) {
        if let Some(conn) = held.origin {
            self.counts.entry(conn).or_default();
        }
        for action in &held.actions {
            self.add_action(action);
        }
    }

    fn clear(&mut self) {
        self.counts.clear();
        self.max = 0;
    }
}

/// The local connection an action is for, if any.
fn action_conn(action: &Action) -> Option<ConnId> {
    match action {
        Action::Deliver { conn, .. }
        | Action::DeliverStored { conn, .. }
        | Action::CloseConn { conn, .. }
        | Action::Settled { conn } => Some(*conn),
        Action::Send { .. } | Action::Push { .. } => None,
    }
}

/// One shard's routing state.
pub struct Router {
    shard: usize,
    shards: usize,
    domain: String,
    store: Box<dyn RosterStore>,
    sessions: HashMap<ConnId, Session>,
    users: HashMap<Box<str>, User>,
    /// Rosters of users with sessions here, once loaded; an entry goes with the user's last
    /// session, and all go when `ROSTER_CACHE_USERS_MAX` is reached. Boxed slices: no spare
    /// capacity, no allocation for an empty roster.
    rosters: HashMap<Box<str>, Box<[RosterItem]>>,
    actions: VecDeque<Action>,
    next_resource: u64,
    next_push: u64,
    delivered: u64,
    bounced: u64,
    forwarded: u64,
    offline: Box<dyn OfflineStore>,
    offline_limits: OfflineLimits,
    /// Usage of users' offline queues including the pending batch, loaded on first need. Bounded
    /// by `evict_usage` (see `OFFLINE_USAGE_CACHE_USERS_MAX`).
    queues: HashMap<String, Usage>,
    /// `queues` is swept once it holds more than this many users.
    queues_sweep_at: usize,
    queues_max: usize,
    /// Writes of this turn, committed together by `commit`.
    batch: Batch,
    /// Origins whose messages the pending batch stores: settled when it commits.
    batch_origins: Vec<Origin>,
    /// Settled messages of other shards' connections, per shard, sent by `commit`.
    remote_settled: Vec<Vec<(ConnId, u64)>>,
    /// The origin of the message being routed now, until something takes responsibility for it.
    current_origin: Option<Origin>,
    clock_unix_ms: u64,
    stats: OfflineStats,
    /// A batch is being committed elsewhere (`begin_commit` .. `finish_commit`).
    commit_in_flight: bool,
    /// Sessions whose offline delivery waits for the commit in flight (its messages must be
    /// visible to the page they load).
    drain_after_commit: Vec<ConnId>,
    /// Rosters changed since the last commit began (whole rosters, by user): the next commit
    /// writes them.
    roster_writes: HashMap<String, Vec<RosterItem>>,
    /// Rosters the commit in flight writes: read from here while not cached.
    roster_committing: HashMap<String, Vec<RosterItem>>,
    /// Actions held until the roster writes they follow are committed, oldest first.
    held: Vec<Held>,
    /// Actions in `held` and in the ticket of the commit in flight (see `held_actions`).
    held_count: usize,
    /// Connections with held actions: later actions for them, and frames their own stanzas
    /// cause, queue behind.
    held_conns: HeldConns,
    /// Per local connection, the actions its stanzas caused that wait behind others' held ones
    /// (a message to a user whose roster change is not committed yet); counted until the next
    /// commit is done.
    held_sources: HeldConns,
    /// The offline writes each local connection's stanzas added to the pending batch (the one
    /// the next commit takes).
    pending_conns: HeldConns,
    /// The call being handled (`handle_stanza`, `handle_frame`) wrote a roster.
    call_wrote_roster: bool,
    /// The requester's error, should the roster write of the call being handled fail.
    call_on_failure: Vec<Action>,
    /// The local connection whose stanza is being handled.
    call_conn: Option<ConnId>,
    /// A stanza or frame is being handled (`begin_call` .. `end_call`).
    in_call: bool,
}

/// A batch on its way to the store (see `Router::begin_commit`).
#[derive(Debug)]
pub struct CommitTicket {
    pub batch: Batch,
    origins: Vec<Origin>,
    /// Whole rosters to write in the same transaction, by user.
    pub rosters: Vec<(String, Vec<RosterItem>)>,
    /// The store's answer, set by whoever ran the commit.
    pub result: Option<Result<Vec<(String, usize)>, StoreError>>,
    /// Actions released when the commit is done.
    held: Vec<Held>,
}

/// Counters of the offline queues of one shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OfflineStats {
    /// Messages written to a queue.
    pub stored: u64,
    /// Messages erased after delivery (and ack).
    pub erased: u64,
    /// Messages purged for age.
    pub purged: u64,
    /// Messages refused because the recipient's queue was full.
    pub refused_full: u64,
    /// Batches committed, and the writes they held.
    pub commits: u64,
    pub commit_writes: u64,
    /// Commits that failed (their messages were answered with errors).
    pub commit_failures: u64,
    /// Bytes of the messages stored (`stored`) and erased (`erased`).
    pub stored_bytes: u64,
    pub erased_bytes: u64,
    /// What the shard's queues hold now (committed): counted once when the store is set, then
    /// kept by every commit.
    pub held_messages: u64,
    pub held_bytes: u64,
}

impl Router {
    /// The router of shard `shard` of `shards`, serving `domain`.
    pub fn new(shard: usize, shards: usize, domain: String, store: Box<dyn RosterStore>) -> Router {
        assert!(shard < shards, "shard {shard} out of {shards}");
        let domain = jid::BareJid::new(&domain)
            .map(|j| j.domain().as_str().to_string())
            .unwrap_or_else(|_| domain.to_lowercase());
        Router {
            shard,
            shards,
            domain,
            store,
            sessions: HashMap::new(),
            users: HashMap::new(),
            rosters: HashMap::new(),
            actions: VecDeque::new(),
            next_resource: 0,
            next_push: 0,
            delivered: 0,
            bounced: 0,
            forwarded: 0,
            offline: Box::new(MemoryOfflineStore::new()),
            offline_limits: OfflineLimits::default(),
            queues: HashMap::new(),
            queues_sweep_at: OFFLINE_USAGE_CACHE_USERS_MAX,
            queues_max: OFFLINE_USAGE_CACHE_USERS_MAX,
            batch: Batch::default(),
            batch_origins: Vec::new(),
            remote_settled: (0..shards).map(|_| Vec::new()).collect(),
            current_origin: None,
            clock_unix_ms: 0,
            stats: OfflineStats::default(),
            commit_in_flight: false,
            drain_after_commit: Vec::new(),
            roster_writes: HashMap::new(),
            roster_committing: HashMap::new(),
            held: Vec::new(),
            held_count: 0,
            held_conns: HeldConns::default(),
            held_sources: HeldConns::default(),
            pending_conns: HeldConns::default(),
            call_wrote_roster: false,
            call_on_failure: Vec::new(),
            call_conn: None,
            in_call: false,
        }
    }

    /// Replaces the offline-queue storage (in-memory by default) and its limits.
    pub fn set_offline(&mut self, store: Box<dyn OfflineStore>, limits: OfflineLimits) {
        match store.totals() {
            Ok((messages, bytes)) => {
                self.stats.held_messages = messages;
                self.stats.held_bytes = bytes;
            }
            Err(e) => tracing::warn!(shard = self.shard, error = %e,
                "cannot count the offline queues; their gauges start at 0"),
        }
        self.offline = store;
        self.offline_limits = limits;
        self.queues.clear();
    }

    /// Changes the per-user offline bounds (a run-time knob); queues already past a lowered
    /// bound keep what they hold and refuse more.
    pub fn set_offline_bounds(&mut self, messages_max: usize, bytes_max: usize) {
        self.offline_limits.messages_max = messages_max;
        self.offline_limits.bytes_max = bytes_max;
    }

    /// Sets the wall clock (Unix milliseconds) used to stamp and age stored messages.
    pub fn set_clock(&mut self, now_unix_ms: u64) {
        self.clock_unix_ms = now_unix_ms;
    }

    /// Offline-queue counters.
    pub fn offline_stats(&self) -> OfflineStats {
        self.stats
    }

    /// Sets the bound of the offline-usage cache (default `OFFLINE_USAGE_CACHE_USERS_MAX`).
    pub fn set_usage_cache_max(&mut self, users: usize) {
        self.queues_max = users.max(1);
        self.queues_sweep_at = self.queues_max;
    }

    /// Users whose offline-queue usage is cached now.
    pub fn usage_cache_len(&self) -> usize {
        self.queues.len()
    }

    /// Past the cache bound, forgets the usage of users with no session here and no write in
    /// the pending batch, unless a commit is in flight (its writes are not in the store yet, so
    /// a reload would miss them and hand out their sequence numbers again). Reloading gives
    /// `next_seq` one past the highest stored: a sequence number below it that was erased can
    /// come back, but only a session of that user could still acknowledge it, and none exists.
    /// If nothing can go, the next sweep waits until the cache has doubled (amortised cost).
    fn evict_usage(&mut self) {
        if self.queues.len() <= self.queues_sweep_at || self.commit_in_flight {
            return;
        }
        let pending: std::collections::HashSet<&str> = self
            .batch
            .puts
            .iter()
            .map(|(u, _)| u.as_str())
            .chain(self.batch.deletes.iter().map(|(u, _)| u.as_str()))
            .collect();
        let users = &self.users;
        self.queues
            .retain(|node, _| users.contains_key(node.as_str()) || pending.contains(node.as_str()));
        self.queues.shrink_if_sparse();
        self.queues_sweep_at = self.queues_max.max(self.queues.len() * 2);
    }

    /// Whether `commit` has work: store writes, or settlements to send to other shards.
    pub fn needs_commit(&self) -> bool {
        !self.batch.is_empty()
            || !self.batch_origins.is_empty()
            || !self.roster_writes.is_empty()
            || self.remote_settled.iter().any(|v| !v.is_empty())
    }

    /// Commits the writes collected since the last commit in one transaction (group commit),
    /// then settles the messages it stored. Call once per turn of the event loop when
    /// `needs_commit`. If the store fails, every message the batch would have stored is answered
    /// with `internal-server-error` (type `wait`): an error, never a silent loss.
    pub fn commit(&mut self) {
        if let Some(mut ticket) = self.begin_commit() {
            let rosters = ticket
                .rosters
                .iter()
                .try_for_each(|(node, items)| self.store.set_roster(node, items));
            let result = match rosters {
                Ok(()) => self.offline.commit(&ticket.batch),
                Err(e) => Err(e),
            };
            ticket.result = Some(result);
            self.finish_commit(ticket);
        }
    }

    /// Starts a commit to be run elsewhere (the shard's blocking thread, so the reactor does not
    /// wait for the fsync and the next batch fills meanwhile: group commit). Sends settlements
    /// that need no commit. `None` while another commit is in flight or there is nothing to
    /// write. Run `ticket.batch` through the store, put the result in `ticket.result`, then call
    /// `finish_commit`.
    pub fn begin_commit(&mut self) -> Option<CommitTicket> {
        self.send_remote_settled();
        if self.commit_in_flight
            || (self.batch.is_empty()
                && self.batch_origins.is_empty()
                && self.roster_writes.is_empty())
        {
            return None;
        }
        self.commit_in_flight = true;
        self.pending_conns.clear();
        self.roster_committing = std::mem::take(&mut self.roster_writes);
        Some(CommitTicket {
            batch: std::mem::take(&mut self.batch),
            origins: std::mem::take(&mut self.batch_origins),
            rosters: self
                .roster_committing
                .iter()
                .map(|(node, items)| (node.clone(), items.clone()))
                .collect(),
            result: None,
            held: std::mem::take(&mut self.held),
        })
    }

    /// Whether a commit is in flight.
    pub fn commit_in_flight(&self) -> bool {
        self.commit_in_flight
    }

    /// Ends a commit begun with `begin_commit`: counts it, settles the messages it stored (or
    /// answers them with `internal-server-error` if it failed), and resumes offline deliveries
    /// that waited for it.
    pub fn finish_commit(&mut self, ticket: CommitTicket) {
        self.commit_in_flight = false;
        let CommitTicket {
            batch,
            origins,
            rosters,
            result,
            held,
        } = ticket;
        let result = result.unwrap_or_else(|| Err(StoreError::Backend("commit not run".into())));
        self.finish_roster_writes(&rosters, held, result.is_ok());
        if !batch.is_empty() {
            match result {
                Ok(erased) => {
                    self.stats.commits += 1;
                    self.stats.commit_writes += batch.len() as u64;
                    self.stats.stored += batch.puts.len() as u64;
                    let put_bytes: u64 = batch.puts.iter().map(|(_, m)| m.bytes.len() as u64).sum();
                    self.stats.stored_bytes += put_bytes;
                    self.stats.held_messages += batch.puts.len() as u64;
                    self.stats.held_bytes += put_bytes;
                    for (user, bytes) in erased {
                        self.stats.erased += 1;
                        self.stats.erased_bytes += bytes as u64;
                        self.stats.held_messages = self.stats.held_messages.saturating_sub(1);
                        self.stats.held_bytes = self.stats.held_bytes.saturating_sub(bytes as u64);
                        if let Some(u) = self.queues.get_mut(&user) {
                            u.messages = u.messages.saturating_sub(1);
                            u.bytes = u.bytes.saturating_sub(bytes);
                        }
                    }
                }
                Err(e) => {
                    self.stats.commit_failures += 1;
                    tracing::error!(shard = self.shard, error = %e, writes = batch.len(),
                        "offline store commit failed; its messages are answered with errors");
                    // What is on disk is unknown now: reload usage on next need. A user with
                    // sessions may have been given the failed messages' sequence numbers, and
                    // may ack them later: those users keep their next sequence number.
                    let users = &self.users;
                    self.queues
                        .retain(|node, _| users.contains_key(node.as_str()));
                    let kept: Vec<String> = self.queues.keys().cloned().collect();
                    for node in kept {
                        let fresh = self.offline.usage(&node);
                        if let (Ok(mut fresh), Some(old)) = (fresh, self.queues.get_mut(&node)) {
                            fresh.next_seq = fresh.next_seq.max(old.next_seq);
                            *old = fresh;
                        }
                    }
                    for (_, m) in batch.puts {
                        if let Some(stanza) = build::from_bytes(m.bytes) {
                            self.bounce(&stanza, "wait", "internal-server-error");
                        }
                    }
                }
            }
        }
        for origin in origins {
            self.settle(origin);
        }
        self.send_remote_settled();
        for conn in std::mem::take(&mut self.drain_after_commit) {
            self.drain_page(conn);
        }
        self.evict_usage();
    }

    fn send_remote_settled(&mut self) {
        for shard in 0..self.shards {
            if !self.remote_settled[shard].is_empty() {
                let settled = std::mem::take(&mut self.remote_settled[shard]);
                self.emit(Action::Send {
                    shard,
                    frame: Frame::Settled(settled),
                });
            }
        }
    }

    /// XEP-0198 was enabled on `conn`'s stream.
    pub fn handle_sm_enabled(&mut self, conn: ConnId) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.sm = true;
        }
    }

    /// `conn`'s client acknowledged these stored messages (sequence numbers in its user's
    /// queue): they are erased.
    pub fn handle_acked(&mut self, conn: ConnId, seqs: &[u64]) {
        let Some(node) = self.sessions.get(&conn).map(|s| s.node().to_owned()) else {
            return;
        };
        for &seq in seqs {
            self.erase(&node, seq);
        }
    }

    /// `conn`'s send queue has drained: the next page of its offline queue, if it is being
    /// delivered.
    pub fn handle_room(&mut self, conn: ConnId) {
        if self
            .sessions
            .get(&conn)
            .is_some_and(|s| s.draining().is_some())
        {
            self.drain_page(conn);
        }
    }

    /// `conn`'s send queue was full for its stored message `seq`: the session stops taking
    /// messages live and takes its offline queue from `seq` on, a page each time its queue
    /// drains (`handle_room`), so it misses none and gets them in order. Only for sessions with
    /// XEP-0198 (whose messages stay stored until acknowledged).
    pub fn handle_queue_full(&mut self, conn: ConnId, seq: u64) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            if s.sm {
                let from = s.draining().map_or(seq, |d| d.min(seq));
                s.set_draining(Some(from));
            }
        }
    }

    /// How many of the stanzas `conn` sent are settled, counted from the first: every stanza
    /// before the first unsettled message. A XEP-0198 `h` may cover only these.
    pub fn settled(&self, conn: ConnId) -> u64 {
        self.sessions.get(&conn).map(Session::settled).unwrap_or(0)
    }

    /// Stanzas received from `conn` so far.
    pub fn received(&self, conn: ConnId) -> u64 {
        self.sessions.get(&conn).map(|s| s.received).unwrap_or(0)
    }

    /// The (normalised) domain served.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The full JID bound to `conn`, if any.
    pub fn full_jid(&self, conn: ConnId) -> Option<&str> {
        self.sessions.get(&conn).map(|s| &*s.full_jid)
    }

    /// Sessions bound on this shard.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Stanzas handed to local sessions (`Action::Deliver`).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }
    /// Error replies generated for undeliverable stanzas.
    pub fn bounced(&self) -> u64 {
        self.bounced
    }
    /// Stanzas sent to other shards.
    pub fn forwarded(&self) -> u64 {
        self.forwarded
    }

    /// Binds a session for `node` (whose home must be this shard) on `conn`. `resource` is the
    /// client's choice (validated and normalised) or `None` for a generated one. A session
    /// already bound to the same full JID is replaced: its connection is closed with `conflict`.
    pub fn bind(
        &mut self,
        node: &str,
        resource: Option<&str>,
        conn: ConnId,
    ) -> Result<Bound, BindError> {
        debug_assert_eq!(
            home_shard(&format!("{node}@{}", self.domain), self.shards),
            self.shard,
            "bind on a shard that is not the user's home"
        );
        // The node was normalised by authentication; a longer one is our bug.
        assert!(
            node.len() <= JID_PART_BYTES_MAX,
            "node longer than JID_PART_BYTES_MAX"
        );
        let resource = match resource {
            Some(r) => self.validate_resource(node, r)?,
            None => self.generate_resource(node),
        };
        if self.sessions.contains_key(&conn) {
            // A second bind on one connection; the caller should not do this. Treat the old
            // session as gone.
            self.handle_disconnect(conn);
        }
        let existing = self.conn_of(node, &resource);
        match existing {
            Some(old) => {
                self.emit(Action::CloseConn {
                    conn: old,
                    condition: "conflict",
                });
                self.handle_disconnect(old);
            }
            None => {
                if self
                    .users
                    .get(node)
                    .is_some_and(|u| u.conns.len() >= USER_SESSIONS_MAX)
                {
                    return Err(BindError::TooManySessions);
                }
            }
        }
        let full_jid = format!("{node}@{}/{resource}", self.domain);
        match self.users.get_mut(node) {
            Some(user) => user.conns.push(conn),
            None => {
                let user = User {
                    conns: Conns::One(conn),
                };
                self.users.insert(node.into(), user);
            }
        }
        let session = Session::new(full_jid.as_str().into(), node.len());
        self.sessions.insert(conn, session);
        Ok(Bound { full_jid })
    }

    fn validate_resource(&self, node: &str, r: &str) -> Result<String, BindError> {
        if r.is_empty() || r.len() > JID_PART_BYTES_MAX || r.chars().any(char::is_control) {
            return Err(BindError::BadResource);
        }
        let full = jid::FullJid::new(&format!("{node}@{}/{r}", self.domain))
            .map_err(|_| BindError::BadResource)?;
        let normalised = full.resource().as_str();
        if normalised.is_empty()
            || normalised.len() > JID_PART_BYTES_MAX
            || normalised.chars().any(char::is_control)
        {
            return Err(BindError::BadResource);
        }
        Ok(normalised.to_string())
    }

    fn generate_resource(&mut self, node: &str) -> String {
        loop {
            let n = self.next_resource;
            self.next_resource += 1;
            let r = format!("gw-{:x}-{:x}", self.shard, n);
            if self.conn_of(node, &r).is_none() {
                return r;
            }
        }
    }

    /// A stanza from the bound local session `conn`, its `from` already stamped with the
    /// session's full JID.
    pub fn handle_stanza(&mut self, conn: ConnId, stanza: Stanza) {
        let Some(sess) = self.sessions.get_mut(&conn) else {
            tracing::debug!(conn, "stanza from an unbound connection dropped");
            return;
        };
        let node = sess.node().to_owned();
        let seq = sess.received;
        sess.received += 1;
        if stanza.kind == Kind::Other {
            return;
        }
        if stanza.kind == Kind::Message {
            self.current_origin = Some(Origin {
                shard: self.shard,
                conn,
                seq,
            });
        }
        let mark = self.begin_call(Some(conn));
        self.handle_stanza_inner(conn, &node, stanza);
        // Nothing took the message over (delivered, refused, or not routable): it is settled.
        if let Some(origin) = self.current_origin.take() {
            self.settle(origin);
        }
        self.end_call(mark);
    }

    fn handle_stanza_inner(&mut self, conn: ConnId, node: &str, stanza: Stanza) {
        let node = node.to_string();
        let target = match stanza.to() {
            None => None,
            Some(to) => match self.classify(&to) {
                Some(t) => Some(t),
                None => {
                    self.reply_error(conn, &stanza, "modify", "jid-malformed");
                    return;
                }
            },
        };
        match (stanza.kind, target) {
            (Kind::Iq, None) => self.server_iq(conn, &stanza, true),
            (Kind::Iq, Some(Target::Server)) => self.server_iq(conn, &stanza, false),
            (
                Kind::Iq,
                Some(Target::User {
                    node: n,
                    resource: None,
                }),
            ) if n == node => self.server_iq(conn, &stanza, true),
            (Kind::Presence, None) => self.presence_broadcast(conn, stanza),
            (Kind::Presence, Some(Target::Server)) => {}
            (Kind::Message, None | Some(Target::Server)) => {
                if stanza.type_().as_deref() != Some("groupchat")
                    && stanza.type_().as_deref() != Some("headline")
                {
                    self.reply_error(conn, &stanza, "cancel", "service-unavailable");
                }
            }
            (_, Some(Target::Remote)) => {
                self.reply_error(conn, &stanza, "cancel", "remote-server-not-found")
            }
            (
                Kind::Presence,
                Some(Target::User {
                    node: contact,
                    resource,
                }),
            ) => self.outbound_presence(conn, &node, stanza, contact, resource),
            (
                _,
                Some(Target::User {
                    node: to_node,
                    resource,
                }),
            ) => self.route(stanza, &to_node, resource),
            (Kind::Other, _) => {}
        }
    }

    /// A frame from another shard.
    pub fn handle_frame(&mut self, frame: Frame) {
        let mark = self.begin_call(None);
        self.handle_frame_inner(frame);
        self.end_call(mark);
    }

    fn handle_frame_inner(&mut self, frame: Frame) {
        match frame {
            Frame::Settled(settled) => {
                for (conn, seq) in settled {
                    self.settle(Origin {
                        shard: self.shard,
                        conn,
                        seq,
                    });
                }
            }
            Frame::Message { stanza, origin } => {
                self.current_origin = Some(origin);
                self.handle_frame_inner(Frame::Stanza(stanza));
                if let Some(origin) = self.current_origin.take() {
                    self.settle(origin);
                }
            }
            Frame::Stanza(stanza) => {
                let target = stanza.to().and_then(|to| self.classify(&to));
                match target {
                    Some(Target::User { node, resource }) => {
                        if self.home(&node) == self.shard {
                            self.inbound(stanza, &node, resource);
                        } else {
                            tracing::warn!(
                                node,
                                "frame for a user whose home is another shard dropped"
                            );
                        }
                    }
                    _ => tracing::warn!("frame without a local user address dropped"),
                }
            }
        }
    }

    /// The connection `conn` is gone. If its session was available, its contacts and the user's
    /// other resources get unavailable presence.
    pub fn handle_disconnect(&mut self, conn: ConnId) {
        let Some(sess) = self.sessions.get(&conn) else {
            return;
        };
        let (node, full, was_available) = (
            sess.node().to_owned(),
            sess.full_jid.clone(),
            sess.available,
        );
        if was_available {
            let p = build::stanza(
                "presence",
                Attrs {
                    type_: Some("unavailable"),
                    ..Attrs::default()
                },
                "",
            );
            self.set_unavailable(conn);
            self.broadcast(&node, &full, &p, Some(conn));
        }
        let Some(sess) = self.sessions.remove(&conn) else {
            return;
        };
        self.sessions.shrink_if_sparse();
        if let Some(user) = self.users.get_mut(sess.node()) {
            if user.conns.remove(conn) {
                self.users.remove(sess.node());
                self.users.shrink_if_sparse();
                self.rosters.remove(sess.node());
            }
        }
    }

    /// The driver could not queue `stanza` for local connection `conn` (its queue is full). A
    /// message or IQ request bounces to its sender with `resource-constraint`; anything else is
    /// dropped.
    pub fn handle_undeliverable(&mut self, conn: ConnId, stanza: Stanza) {
        let _ = conn;
        if !matches!(stanza.kind, Kind::Message | Kind::Iq) {
            return;
        }
        if let Some(e) = error_reply(&stanza, "wait", "resource-constraint") {
            self.bounced += 1;
            self.route_addressed(e);
        }
    }

    /// A stanza written to (or queued for) session `conn` that the session never acknowledged,
    /// found when the session ended without resumption (XEP-0198 §5: as if never delivered).
    /// An IQ request answers its sender with `recipient-unavailable` (type `wait`: the
    /// addressee may come back); a message needs nothing here (a stored one is still in the
    /// offline queue, erased only by an ack); presence and the rest are dropped. Call it before
    /// `handle_disconnect`.
    pub fn handle_unacked(&mut self, conn: ConnId, bytes: Bytes) {
        let _ = conn;
        let Some(stanza) = build::from_bytes(bytes) else {
            return;
        };
        if stanza.kind == Kind::Iq && matches!(stanza.type_().as_deref(), Some("get" | "set")) {
            self.bounce(&stanza, "wait", "recipient-unavailable");
        }
    }

    /// The next action for the driver, oldest first.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Queues an action for the driver, or behind the held ones it must not overtake: those for
    /// the same connection, and (for frames) those caused by the same connection's stanzas.
    fn emit(&mut self, action: Action) {
        if !self.held_conns.counts.is_empty() {
            let behind = match &action {
                Action::Send {
                    frame: Frame::Settled(_),
                    ..
                }
                | Action::Push { .. } => false,
                Action::Send { .. } => self.call_conn.is_some_and(|c| self.held_conns.contains(c)),
                other => action_conn(other).is_some_and(|c| self.held_conns.contains(c)),
            };
            if behind {
                self.held_count += 1;
                self.held_conns.add_action(&action);
                if let Some(source) = self.call_conn {
                    if action_conn(&action) != Some(source) {
                        self.held_sources.bump(source);
                    }
                }
                match self.held.last_mut() {
                    Some(last) if !last.depends => last.actions.push(action),
                    _ => self.held.push(Held {
                        actions: vec![action],
                        on_failure: Vec::new(),
                        depends: false,
                        origin: None,
                    }),
                }
                return;
            }
        }
        self.actions.push_back(action);
    }

    /// Starts handling a stanza or frame (`conn`: the local connection it came from); returns
    /// where its actions start.
    fn begin_call(&mut self, conn: Option<ConnId>) -> usize {
        self.in_call = true;
        self.call_conn = conn;
        self.call_wrote_roster = false;
        self.call_on_failure.clear();
        self.actions.len()
    }

    /// Ends the call begun with `begin_call`: if it wrote a roster, what it caused waits for the
    /// commit, and so does whatever comes later for the connections involved.
    fn end_call(&mut self, mark: usize) {
        self.in_call = false;
        let conn = self.call_conn.take();
        if !std::mem::take(&mut self.call_wrote_roster) {
            return;
        }
        let held = Held {
            actions: self.actions.drain(mark..).collect(),
            on_failure: std::mem::take(&mut self.call_on_failure),
            depends: true,
            origin: conn,
        };
        self.held_count += held.actions.len();
        self.held_conns.add(&held);
        self.held.push(held);
    }

    /// The commit of `rosters` is over (`ok`: durable): releases the actions `held` for it (or,
    /// on failure, the requesters' errors, and the rosters are read again from the store). Held
    /// actions that follow no pending write go too.
    fn finish_roster_writes(
        &mut self,
        rosters: &[(String, Vec<RosterItem>)],
        held: Vec<Held>,
        ok: bool,
    ) {
        self.roster_committing.clear();
        if !ok && !rosters.is_empty() {
            tracing::error!(
                shard = self.shard,
                users = rosters.len(),
                "roster write failed; the requesters get internal-server-error"
            );
            for (node, _) in rosters {
                // Read again from the store, unless a later change is pending: that one writes
                // the whole roster, this change included, and is answered by its own commit.
                if !self.roster_writes.contains_key(node) {
                    self.rosters.remove(node.as_str());
                }
            }
        }
        for h in held {
            self.held_count -= h.actions.len();
            let actions = if ok || !h.depends {
                h.actions
            } else {
                h.on_failure
            };
            self.actions.extend(actions);
        }
        if self.roster_writes.is_empty() {
            // What is held now only keeps its order behind what was just released.
            for h in std::mem::take(&mut self.held) {
                self.held_count -= h.actions.len();
                self.actions.extend(h.actions);
            }
        }
        // Only what waits for the next commit is still held.
        self.held_conns.clear();
        self.held_sources.clear();
        for h in &self.held {
            self.held_conns.add(h);
        }
    }

    /// The most actions held for any one connection. Released at once, they go into its send
    /// queue together: the driver stops feeding connection input past
    /// `ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX` so that they fit.
    pub fn held_for_one_connection(&self) -> usize {
        self.held_conns.max
    }

    /// The connections with at least `limit` actions held for them, or held on their account
    /// (their stanzas for connections whose actions are held), in no order; empty (and nothing
    /// scanned) while none comes near. The driver pauses their reads
    /// (`ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`) until a commit releases the actions.
    pub fn connections_held_at_least(&self, limit: usize) -> Vec<ConnId> {
        let mut conns = self.held_conns.at_least(limit);
        for conn in self.held_sources.at_least(limit) {
            if !conns.contains(&conn) {
                conns.push(conn);
            }
        }
        conns
    }

    /// While a commit is in flight, the local connections whose stanzas added at least `limit`
    /// offline writes to the batch waiting behind it; empty otherwise (and nothing scanned while
    /// none comes near). The driver pauses their reads
    /// (`STORE_PENDING_WRITES_PER_CONNECTION_PAUSE`) until that commit is done.
    pub fn connections_writing_at_least(&self, limit: usize) -> Vec<ConnId> {
        if !self.commit_in_flight {
            return Vec::new();
        }
        self.pending_conns.at_least(limit)
    }

    /// Store writes (offline-queue inserts and erasures) waiting for the next commit. While a
    /// commit is in flight nothing else bounds them: the driver stops feeding connection input
    /// past `STORE_PENDING_WRITES_MAX`.
    pub fn pending_writes(&self) -> usize {
        self.batch.len()
    }

    /// Actions waiting for roster writes to be committed (and those queued behind them). The
    /// driver stops feeding connection input past `ROUTER_HELD_ACTIONS_MAX` until a commit
    /// releases them: nothing else bounds them while a commit is slow.
    pub fn held_actions(&self) -> usize {
        self.held_count
    }

    /// Should the roster write of the call being handled fail, `conn` gets this error for `req`.
    fn on_roster_failure(&mut self, conn: ConnId, req: &Stanza) {
        if let Some(e) = error_reply(req, "wait", "internal-server-error") {
            self.call_on_failure
                .push(Action::Deliver { conn, stanza: e });
        }
    }

    // ---- addressing and delivery ----

    fn home(&self, node: &str) -> usize {
        home_shard(&format!("{node}@{}", self.domain), self.shards)
    }

    fn bare(&self, node: &str) -> String {
        format!("{node}@{}", self.domain)
    }

    /// Parses and normalises an address; `None` if it is not a valid JID.
    fn classify(&self, to: &str) -> Option<Target> {
        let j = jid::Jid::new(to).ok()?;
        if j.domain().as_str() != self.domain {
            return Some(Target::Remote);
        }
        Some(match j.node() {
            None => Target::Server,
            Some(n) => Target::User {
                node: n.as_str().to_string(),
                resource: j.resource().map(|r| r.as_str().to_string()),
            },
        })
    }

    /// The sender's bare JID of an inbound stanza, normalised.
    fn sender_bare(stanza: &Stanza) -> Option<String> {
        let from = stanza.from()?;
        jid::Jid::new(&from).ok().map(|j| j.to_bare().to_string())
    }

    fn deliver(&mut self, conn: ConnId, stanza: Stanza) {
        self.delivered += 1;
        self.emit(Action::Deliver { conn, stanza });
    }

    /// Routes a stanza to the user `node` at our domain: handled here if this is their home,
    /// otherwise sent to their home shard.
    fn route(&mut self, stanza: Stanza, node: &str, resource: Option<String>) {
        let shard = self.home(node);
        if shard == self.shard {
            self.inbound(stanza, node, resource);
        } else {
            self.forwarded += 1;
            let frame = match self.current_origin.take() {
                Some(origin) if stanza.kind == Kind::Message => {
                    self.hold(origin);
                    Frame::Message { stanza, origin }
                }
                other => {
                    self.current_origin = other;
                    Frame::Stanza(stanza)
                }
            };
            self.emit(Action::Send { shard, frame });
        }
    }

    /// Routes a stanza by its own `to`; drops it unless it is for a user at our domain.
    fn route_addressed(&mut self, stanza: Stanza) {
        match stanza.to().and_then(|to| self.classify(&to)) {
            Some(Target::User { node, resource }) => self.route(stanza, &node, resource),
            _ => tracing::debug!("stanza for a non-local address dropped"),
        }
    }

    /// Sends an error reply for `stanza` straight back to the local session `conn`.
    fn reply_error(&mut self, conn: ConnId, stanza: &Stanza, error_type: &str, condition: &str) {
        if let Some(e) = error_reply(stanza, error_type, condition) {
            self.bounced += 1;
            self.deliver(conn, e);
        }
    }

    /// Bounces `stanza` to its sender, wherever they are.
    fn bounce(&mut self, stanza: &Stanza, error_type: &str, condition: &str) {
        if let Some(e) = error_reply(stanza, error_type, condition) {
            self.bounced += 1;
            self.route_addressed(e);
        }
    }

    fn conn_of(&self, node: &str, resource: &str) -> Option<ConnId> {
        self.users.get(node)?.conns.iter().find(|c| {
            self.sessions
                .get(c)
                .is_some_and(|s| s.resource() == resource)
        })
    }

    /// The sessions of `node`'s connections, in bind order.
    fn sessions_of<'a>(&'a self, node: &str) -> impl Iterator<Item = (ConnId, &'a Session)> + 'a {
        let conns = self.users.get(node).map(|u| &u.conns);
        conns
            .into_iter()
            .flat_map(Conns::iter)
            .filter_map(|c| self.sessions.get(&c).map(|s| (c, s)))
    }

    /// The user's available sessions: (conn, priority), in bind order.
    fn available(&self, node: &str) -> Vec<(ConnId, i8)> {
        self.sessions_of(node)
            .filter(|(_, s)| s.available)
            .map(|(c, s)| (c, s.priority))
            .collect()
    }

    /// The user's available sessions with their full JIDs, in bind order.
    fn available_full(&self, node: &str) -> Vec<(ConnId, Box<str>)> {
        self.sessions_of(node)
            .filter(|(_, s)| s.available)
            .map(|(c, s)| (c, s.full_jid.clone()))
            .collect()
    }

    /// Delivers to every available session of `node`.
    fn deliver_to_available(&mut self, node: &str, stanza: &Stanza) {
        for (conn, _) in self.available(node) {
            self.deliver(conn, stanza.clone());
        }
    }

    // ---- offline queues (XEP-0160) and settlement ----

    /// A chat or normal message for `node`, to be given to the sessions `targets` (none: the
    /// user is offline). It is stored unless a target without stream management (which cannot
    /// acknowledge) takes it live; stored messages are delivered live to targets that are not
    /// still receiving their offline queue, and erased on ack. A full queue or a failing store
    /// refuses the message with an error whenever it had to be stored: delivered live but not
    /// stored, it would be acked to its sender and then lost if the recipient's session ended
    /// (or the server crashed) before the recipient acknowledged it.
    fn store_and_deliver(&mut self, stanza: Stanza, node: &str, targets: Vec<ConnId>) {
        let (mut live, mut any_draining, mut all_sm) = (Vec::new(), false, true);
        for conn in targets {
            let Some(s) = self.sessions.get(&conn) else {
                continue;
            };
            if s.draining().is_some() {
                any_draining = true;
            } else {
                all_sm &= s.sm;
                live.push((conn, s.sm));
            }
        }
        if !(live.is_empty() || any_draining || all_sm) {
            for (conn, _) in live {
                self.deliver(conn, stanza.clone());
            }
            return;
        }
        match self.store(node, &stanza) {
            Ok(seq) => {
                if live.is_empty() && !any_draining {
                    let count = self.queues.get(node).map_or(1, |u| u.messages);
                    self.emit(Action::Push {
                        node: node.to_string(),
                        count,
                    });
                }
                for (conn, sm) in live {
                    self.delivered += 1;
                    self.emit(Action::DeliverStored {
                        conn,
                        stanza: stanza.clone(),
                        seq: sm.then_some(seq),
                    });
                }
            }
            Err(condition) => self.bounce(&stanza, "wait", condition),
        }
    }

    /// Adds `stanza` to `node`'s queue in the pending batch; the current origin, if any, is
    /// settled when the batch commits. Fails with the stanza error condition to answer.
    fn store(&mut self, node: &str, stanza: &Stanza) -> Result<u64, &'static str> {
        let limits = self.offline_limits;
        let usage = match self.queues.get_mut(node) {
            Some(u) => u,
            None => match self.offline.usage(node) {
                Ok(u) => self.queues.entry(node.to_string()).or_insert(u),
                Err(e) => {
                    tracing::error!(node, error = %e, "offline queue unreadable");
                    return Err("internal-server-error");
                }
            },
        };
        let len = stanza.bytes.len();
        if usage.messages >= limits.messages_max || usage.bytes + len > limits.bytes_max {
            self.stats.refused_full += 1;
            tracing::debug!(
                node,
                messages = usage.messages,
                bytes = usage.bytes,
                "offline queue full"
            );
            return Err("resource-constraint");
        }
        let seq = usage.next_seq;
        usage.next_seq += 1;
        usage.messages += 1;
        usage.bytes += len;
        self.batch.puts.push((
            node.to_string(),
            Stored {
                seq,
                stored_unix_ms: self.clock_unix_ms,
                bytes: stanza.bytes.clone(),
            },
        ));
        if let Some(origin) = self.current_origin.take() {
            self.hold(origin);
            self.batch_origins.push(origin);
        }
        if let Some(conn) = self.call_conn {
            self.pending_conns.bump(conn);
        }
        if self.batch.len() >= STORE_BATCH_WRITES_MAX && !self.commit_in_flight {
            self.commit();
        }
        // After the put joined the batch, so this user's entry stays.
        self.evict_usage();
        Ok(seq)
    }

    /// Erases `node`'s message `seq`: dropped from the pending batch if not yet committed,
    /// else erased by the next commit.
    fn erase(&mut self, node: &str, seq: u64) {
        if let Some(i) = self
            .batch
            .puts
            .iter()
            .position(|(u, m)| m.seq == seq && u == node)
        {
            let (_, m) = self.batch.puts.swap_remove(i);
            if let Some(u) = self.queues.get_mut(node) {
                u.messages = u.messages.saturating_sub(1);
                u.bytes = u.bytes.saturating_sub(m.bytes.len());
            }
            return;
        }
        self.batch.deletes.push((node.to_string(), seq));
        if self.batch.len() >= STORE_BATCH_WRITES_MAX && !self.commit_in_flight {
            self.commit();
        }
    }

    /// A message of a local connection is now in flight: its ack waits for `settle`.
    fn hold(&mut self, origin: Origin) {
        if origin.shard == self.shard {
            if let Some(s) = self.sessions.get_mut(&origin.conn) {
                s.extra_mut().outstanding.insert(origin.seq);
            }
        }
    }

    /// `origin`'s message is handled: its connection's ack may cover it.
    fn settle(&mut self, origin: Origin) {
        if origin.shard != self.shard {
            self.remote_settled[origin.shard].push((origin.conn, origin.seq));
            return;
        }
        if let Some(s) = self.sessions.get_mut(&origin.conn) {
            let removed = s
                .extra
                .as_mut()
                .is_some_and(|e| e.outstanding.remove(&origin.seq));
            s.compact();
            if removed && s.sm {
                self.actions
                    .push_back(Action::Settled { conn: origin.conn });
            }
        }
    }

    /// Delivers the next page of `conn`'s offline queue, stamped with XEP-0203 delays. Messages
    /// past the age limit are purged instead. The pending batch is committed first so the page
    /// holds everything stored so far.
    fn drain_page(&mut self, conn: ConnId) {
        let Some((node, from, sm)) = self
            .sessions
            .get(&conn)
            .and_then(|s| Some((s.node().to_owned(), s.draining()?, s.sm)))
        else {
            return;
        };
        if self.commit_in_flight {
            // Its messages may be in the batch being committed: load once it is.
            if !self.drain_after_commit.contains(&conn) {
                self.drain_after_commit.push(conn);
            }
            return;
        }
        if !self.batch.is_empty() {
            self.commit();
        }
        let page = match self.offline.load(&node, from, OFFLINE_DRAIN_PAGE_MESSAGES) {
            Ok(page) => page,
            Err(e) => {
                tracing::error!(node, error = %e, "offline queue unreadable; delivery stopped");
                if let Some(s) = self.sessions.get_mut(&conn) {
                    s.set_draining(None);
                }
                return;
            }
        };
        let age_max_ms = self.offline_limits.age_max.as_millis() as u64;
        let mut next = from;
        for m in &page {
            next = m.seq + 1;
            // A stamp of 0 means the clock was never set when it was stored: keep it.
            if m.stored_unix_ms > 0
                && m.stored_unix_ms.saturating_add(age_max_ms) < self.clock_unix_ms
            {
                self.stats.purged += 1;
                self.erase(&node, m.seq);
                continue;
            }
            let stanza = offline::with_delay(&m.bytes, &self.domain, m.stored_unix_ms)
                .and_then(build::from_bytes)
                .or_else(|| build::from_bytes(m.bytes.clone()));
            let Some(stanza) = stanza else {
                tracing::warn!(node, seq = m.seq, "stored message unreadable; erased");
                self.erase(&node, m.seq);
                continue;
            };
            self.delivered += 1;
            self.emit(Action::DeliverStored {
                conn,
                stanza,
                seq: sm.then_some(m.seq),
            });
            if !sm {
                // Nothing will acknowledge it: delivery is all we can know.
                self.erase(&node, m.seq);
            }
        }
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.set_draining((page.len() == OFFLINE_DRAIN_PAGE_MESSAGES).then_some(next));
        }
    }

    // ---- inbound: stanzas for users whose home is this shard ----

    fn inbound(&mut self, stanza: Stanza, node: &str, resource: Option<String>) {
        match stanza.kind {
            Kind::Message => self.inbound_message(stanza, node, resource),
            Kind::Iq => self.inbound_iq(stanza, node, resource),
            Kind::Presence => self.inbound_presence(stanza, node, resource),
            Kind::Other => {}
        }
    }

    /// RFC 6121 §8.5.
    fn inbound_message(&mut self, stanza: Stanza, node: &str, resource: Option<String>) {
        let stored_kind = !matches!(
            stanza.type_().as_deref(),
            Some("error" | "groupchat" | "headline")
        );
        if let Some(conn) = resource.as_deref().and_then(|r| self.conn_of(node, r)) {
            if stored_kind {
                self.store_and_deliver(stanza, node, vec![conn]);
            } else {
                self.deliver(conn, stanza);
            }
            return;
        }
        let type_ = stanza.type_().map(|t| t.into_owned());
        match type_.as_deref() {
            // Never answer an error with an error.
            Some("error") => {}
            // §8.5.2.1.3 / §8.5.3.2: groupchat without a matching session is not delivered.
            Some("groupchat") => {}
            Some("headline") => {
                for (conn, prio) in self.available(node) {
                    if prio >= 0 {
                        self.deliver(conn, stanza.clone());
                    }
                }
            }
            _ => {
                let avail: Vec<_> = self
                    .available(node)
                    .into_iter()
                    .filter(|(_, p)| *p >= 0)
                    .collect();
                let best = avail.iter().map(|(_, p)| *p).max();
                let targets = avail
                    .into_iter()
                    .filter(|(_, p)| Some(*p) == best)
                    .map(|(c, _)| c)
                    .collect();
                self.store_and_deliver(stanza, node, targets);
            }
        }
    }

    /// RFC 6121 §8.5.1, §8.5.3.
    fn inbound_iq(&mut self, stanza: Stanza, node: &str, resource: Option<String>) {
        if let Some(conn) = resource.as_deref().and_then(|r| self.conn_of(node, r)) {
            self.deliver(conn, stanza);
            return;
        }
        if matches!(stanza.type_().as_deref(), Some("get" | "set")) {
            self.bounce(&stanza, "cancel", "service-unavailable");
        }
    }

    fn inbound_presence(&mut self, stanza: Stanza, node: &str, resource: Option<String>) {
        let type_ = stanza.type_().map(|t| t.into_owned());
        let subscription_type = matches!(
            type_.as_deref(),
            Some("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed" | "probe")
        );
        if subscription_type {
            let Some(sender) = Self::sender_bare(&stanza) else {
                return;
            };
            match type_.as_deref() {
                Some("subscribe") => self.inbound_subscribe(node, &sender, stanza),
                Some("subscribed") => self.inbound_subscribed(node, &sender, stanza),
                Some("unsubscribe") => self.inbound_unsubscribe(node, &sender, stanza),
                Some("unsubscribed") => self.inbound_unsubscribed(node, &sender, stanza),
                _ => self.inbound_probe(node, &sender),
            }
            return;
        }
        // Available, unavailable or error presence: to the addressed resource if the address
        // is a full JID, else to every available resource.
        match resource {
            Some(r) => {
                if let Some(conn) = self.conn_of(node, &r) {
                    self.deliver(conn, stanza);
                }
            }
            None => self.deliver_to_available(node, &stanza),
        }
    }

    // ---- presence broadcast (RFC 6121 §4) ----

    fn presence_broadcast(&mut self, conn: ConnId, stanza: Stanza) {
        let Some(sess) = self.sessions.get(&conn) else {
            return;
        };
        let (node, full) = (sess.node().to_owned(), sess.full_jid.clone());
        match stanza.type_().as_deref() {
            None => {
                let priority = presence_priority(&stanza);
                let sess = self.sessions.get_mut(&conn).expect("session checked above");
                let initial = !sess.available;
                sess.available = true;
                sess.priority = priority;
                sess.set_presence(&stanza);
                self.broadcast(&node, &full, &stanza, None);
                if initial {
                    self.after_initial_presence(conn, &node);
                    // XEP-0160: the offline queue follows initial presence.
                    if let Some(s) = self.sessions.get_mut(&conn) {
                        s.set_draining(Some(0));
                    }
                    self.drain_page(conn);
                }
            }
            // Only an available session's unavailable is broadcast. Broadcast before marking
            // it unavailable so the sender gets its own unavailable reflected.
            Some("unavailable") if self.sessions.get(&conn).is_some_and(|s| s.available) => {
                self.broadcast(&node, &full, &stanza, None);
                self.set_unavailable(conn);
            }
            _ => {}
        }
    }

    fn set_unavailable(&mut self, conn: ConnId) {
        if let Some(s) = self.sessions.get_mut(&conn) {
            s.available = false;
            if let Some(e) = s.extra.as_mut() {
                e.presence = None;
            }
            s.compact();
            s.priority = 0;
        }
    }

    /// Sends `presence` (from `full`) to every contact subscribed to `node`'s presence (`from`
    /// or `both`) and to the user's available sessions except `skip`.
    fn broadcast(&mut self, node: &str, full: &str, presence: &Stanza, skip: Option<ConnId>) {
        let contacts = self
            .with_roster(node, |r| {
                r.iter().filter(|i| i.subscription.has_from()).map(|i| i.jid.clone()).collect::<Vec<_>>()
            })
            .unwrap_or_else(|e| {
                tracing::error!(node, error = %e, "roster unreadable; presence not broadcast to contacts");
                Vec::new()
            });
        for contact in contacts {
            self.route_addressed(build::readdress(presence, Some(&contact), Some(full)));
        }
        for (conn, their_full) in self.available_full(node) {
            if Some(conn) != skip {
                self.deliver(
                    conn,
                    build::readdress(presence, Some(&their_full), Some(full)),
                );
            }
        }
    }

    /// After a session's initial presence: probe the contacts it is subscribed to, show it its
    /// other resources' presence, and deliver subscription requests that wait for an answer.
    fn after_initial_presence(&mut self, conn: ConnId, node: &str) {
        let bare = self.bare(node);
        let Some(full) = self.sessions.get(&conn).map(|s| s.full_jid.clone()) else {
            return;
        };
        let (to_contacts, pending) = self
            .with_roster(node, |r| {
                let to: Vec<String> = r
                    .iter()
                    .filter(|i| i.subscription.has_to())
                    .map(|i| i.jid.clone())
                    .collect();
                let pending: Vec<String> = r
                    .iter()
                    .filter(|i| i.pending_in)
                    .map(|i| i.jid.clone())
                    .collect();
                (to, pending)
            })
            .unwrap_or_default();
        for contact in to_contacts {
            let probe = build::stanza(
                "presence",
                Attrs {
                    to: Some(&contact),
                    from: Some(&bare),
                    type_: Some("probe"),
                    ..Attrs::default()
                },
                "",
            );
            self.route_addressed(probe);
        }
        let others: Vec<(Box<str>, Stanza)> = self
            .sessions_of(node)
            .filter(|(c, _)| *c != conn)
            .filter_map(|(_, s)| s.presence().map(|p| (s.full_jid.clone(), p)))
            .collect();
        for (their_full, p) in others {
            self.deliver(conn, build::readdress(&p, Some(&full), Some(&their_full)));
        }
        for contact in pending {
            let sub = build::stanza(
                "presence",
                Attrs {
                    to: Some(&bare),
                    from: Some(&contact),
                    type_: Some("subscribe"),
                    ..Attrs::default()
                },
                "",
            );
            self.deliver(conn, sub);
        }
    }

    /// A probe from `prober` (bare) for `node`: answer with the current presence of each
    /// available resource if `prober` is subscribed to `node`.
    fn inbound_probe(&mut self, node: &str, prober: &str) {
        let avail = self.available(node);
        if avail.is_empty() {
            return;
        }
        let subscribed = self.with_roster(node, |r| {
            r.iter()
                .any(|i| i.jid == prober && i.subscription.has_from())
        });
        if subscribed.unwrap_or(false) {
            self.send_presence_of(node, prober);
        }
    }

    /// Sends the current presence of each available resource of `node` to `to`.
    fn send_presence_of(&mut self, node: &str, to: &str) {
        let presences: Vec<(Box<str>, Stanza)> = self
            .sessions_of(node)
            .filter_map(|(_, s)| s.presence().map(|p| (s.full_jid.clone(), p)))
            .collect();
        for (full, p) in presences {
            self.route_addressed(build::readdress(&p, Some(to), Some(&full)));
        }
    }

    /// Sends unavailable presence from each available resource of `node` to `to`.
    fn send_unavailable_of(&mut self, node: &str, to: &str) {
        for (_, full) in self.available_full(node) {
            let p = build::stanza(
                "presence",
                Attrs {
                    to: Some(to),
                    from: Some(&full),
                    type_: Some("unavailable"),
                    ..Attrs::default()
                },
                "",
            );
            self.route_addressed(p);
        }
    }

    // ---- subscriptions (RFC 6121 §3) ----

    /// A presence with a `to` from the local session `conn` of `node`.
    fn outbound_presence(
        &mut self,
        conn: ConnId,
        node: &str,
        stanza: Stanza,
        contact_node: String,
        resource: Option<String>,
    ) {
        let type_ = stanza.type_().map(|t| t.into_owned());
        let Some(kind @ ("subscribe" | "subscribed" | "unsubscribe" | "unsubscribed")) =
            type_.as_deref()
        else {
            // Directed presence, probes, presence errors: route as addressed.
            self.route(stanza, &contact_node, resource);
            return;
        };
        if contact_node == node {
            // Subscribing to oneself is meaningless; the user always has their own presence.
            return;
        }
        let contact = self.bare(&contact_node);
        let bare = self.bare(node);
        // §3.1.2: subscription stanzas are stamped with the user's bare JID and addressed to the
        // contact's bare JID.
        let out = build::readdress(&stanza, Some(&contact), Some(&bare));
        let result = match kind {
            "subscribe" => self
                .update_item(node, &contact, |slot| {
                    let item = slot.get_or_insert_with(|| RosterItem::new(&contact));
                    if !item.subscription.has_to() {
                        item.ask_out = true;
                    }
                })
                .map(|_| Some(out)),
            "subscribed" => self
                .update_item(node, &contact, |slot| {
                    if let Some(item) = slot.as_mut().filter(|i| i.pending_in) {
                        item.pending_in = false;
                        item.subscription = item.subscription.with_from(true);
                    }
                })
                .map(|(before, after)| {
                    // Without a pending request there is nothing to approve (no pre-approval).
                    let approved = before.is_some_and(|b| b.pending_in) && after.is_some();
                    approved.then_some(out)
                }),
            "unsubscribe" => self
                .update_item(node, &contact, |slot| {
                    if let Some(item) = slot.as_mut() {
                        item.subscription = item.subscription.with_to(false);
                        item.ask_out = false;
                    }
                })
                .map(|_| Some(out)),
            _ => self
                .update_item(node, &contact, |slot| {
                    if let Some(item) = slot.as_mut() {
                        item.subscription = item.subscription.with_from(false);
                        item.pending_in = false;
                    }
                })
                .map(|(before, after)| (before != after).then_some(out)),
        };
        if result.is_ok() {
            self.on_roster_failure(conn, &stanza);
        }
        match result {
            Ok(Some(out)) => {
                self.route(out, &contact_node, None);
                match kind {
                    // §3.1.5: the contact now sees the user's current presence.
                    "subscribed" => self.send_presence_of(node, &contact),
                    // §3.2.2: and stops seeing it.
                    "unsubscribed" => self.send_unavailable_of(node, &contact),
                    _ => {}
                }
            }
            Ok(None) => {}
            Err(RosterError::Full) => {
                self.reply_error(conn, &stanza, "wait", "resource-constraint")
            }
            Err(RosterError::Store(e)) => {
                tracing::error!(node, error = %e, "roster write failed");
                self.reply_error(conn, &stanza, "wait", "internal-server-error");
            }
        }
    }

    /// §3.1.3: `sender` asks to see `node`'s presence.
    fn inbound_subscribe(&mut self, node: &str, sender: &str, stanza: Stanza) {
        let bare = self.bare(node);
        let mut already_approved = false;
        let mut already_pending = false;
        let r = self.update_item(node, sender, |slot| match slot {
            Some(item) if item.subscription.has_from() => already_approved = true,
            Some(item) if item.pending_in => already_pending = true,
            Some(item) => item.pending_in = true,
            None => {
                let mut item = RosterItem::new(sender);
                item.pending_in = true;
                *slot = Some(item);
            }
        });
        if let Err(e) = r {
            tracing::warn!(node, error = ?e, "inbound subscribe not recorded");
            return;
        }
        if already_approved {
            let reply = build::stanza(
                "presence",
                Attrs {
                    to: Some(sender),
                    from: Some(&bare),
                    type_: Some("subscribed"),
                    ..Attrs::default()
                },
                "",
            );
            self.route_addressed(reply);
        } else if !already_pending {
            self.deliver_to_available(node, &stanza);
        }
    }

    /// §3.1.6: `sender` approved `node`'s request.
    fn inbound_subscribed(&mut self, node: &str, sender: &str, stanza: Stanza) {
        let r = self.update_item(node, sender, |slot| {
            if let Some(item) = slot.as_mut().filter(|i| i.ask_out) {
                item.ask_out = false;
                item.subscription = item.subscription.with_to(true);
            }
        });
        if let Ok((before, after)) = r {
            if before != after {
                self.deliver_to_available(node, &stanza);
            }
        }
    }

    /// §3.3.3: `sender` no longer wants `node`'s presence.
    fn inbound_unsubscribe(&mut self, node: &str, sender: &str, stanza: Stanza) {
        let r = self.update_item(node, sender, |slot| {
            if let Some(item) = slot.as_mut() {
                item.subscription = item.subscription.with_from(false);
                item.pending_in = false;
            }
        });
        if let Ok((Some(before), _)) = r {
            if before.subscription.has_from() {
                self.deliver_to_available(node, &stanza);
                self.send_unavailable_of(node, sender);
            }
        }
    }

    /// §3.2.3: `sender` cancelled or denied `node`'s subscription.
    fn inbound_unsubscribed(&mut self, node: &str, sender: &str, stanza: Stanza) {
        let r = self.update_item(node, sender, |slot| {
            if let Some(item) = slot.as_mut() {
                item.subscription = item.subscription.with_to(false);
                item.ask_out = false;
            }
        });
        if let Ok((before, after)) = r {
            if before != after {
                self.deliver_to_available(node, &stanza);
            }
        }
    }

    // ---- rosters ----

    /// Takes the user's roster out of the cache, or reads it from the store.
    fn take_roster(&mut self, node: &str) -> Result<Vec<RosterItem>, StoreError> {
        if let Some(r) = self.rosters.remove(node) {
            return Ok(r.into_vec());
        }
        // Written and not yet committed: what the store will hold.
        if let Some(r) = self
            .roster_writes
            .get(node)
            .or_else(|| self.roster_committing.get(node))
        {
            return Ok(r.clone());
        }
        self.store.roster(node)
    }

    /// Puts a roster back in the cache if the user has sessions here (see `rosters`).
    fn put_roster(&mut self, node: &str, roster: Vec<RosterItem>) {
        if !self.users.contains_key(node) {
            return;
        }
        if self.rosters.len() >= ROSTER_CACHE_USERS_MAX {
            // Emptied rather than evicted one by one: O(1) amortised, and still bounded.
            self.rosters = HashMap::new();
        }
        self.rosters.insert(node.into(), roster.into_boxed_slice());
    }

    fn with_roster<T>(
        &mut self,
        node: &str,
        f: impl FnOnce(&[RosterItem]) -> T,
    ) -> Result<T, StoreError> {
        let r = self.take_roster(node)?;
        let out = f(&r);
        self.put_roster(node, r);
        Ok(out)
    }

    /// Changes `node`'s item for `jid` through `f` (`None` in the slot: no item; setting it to
    /// `None` removes the item). If anything changed, queues the roster for the next commit
    /// (what the calling stanza causes then waits for it; see the module comment) and pushes the
    /// change to the user's interested sessions. Items that only record an
    /// unanswered inbound request stay hidden and are never pushed.
    fn update_item(
        &mut self,
        node: &str,
        jid: &str,
        f: impl FnOnce(&mut Option<RosterItem>),
    ) -> Result<ItemChange, RosterError> {
        let mut roster = self.take_roster(node)?;
        let pos = roster.iter().position(|i| i.jid == jid);
        let before = pos.map(|p| roster[p].clone());
        let mut slot = before.clone();
        f(&mut slot);
        // An item that was hidden and is now a bare `none` item with nothing pending was never
        // shown to the user: drop it instead of revealing it.
        if let Some(item) = &slot {
            let was_hidden = before.as_ref().is_none_or(|b| !b.is_visible());
            if was_hidden
                && item.subscription == roster::Subscription::None
                && !item.ask_out
                && !item.pending_in
                && item.name.is_none()
                && item.groups.is_empty()
                && before.as_ref().is_some_and(|b| b.pending_in)
            {
                slot = None;
            }
        }
        if slot == before {
            self.put_roster(node, roster);
            return Ok((before, slot));
        }
        match (pos, &slot) {
            (Some(p), Some(item)) => roster[p] = item.clone(),
            (Some(p), None) => {
                roster.remove(p);
            }
            (None, Some(item)) => {
                if roster.len() >= ROSTER_ITEMS_MAX {
                    self.put_roster(node, roster);
                    return Err(RosterError::Full);
                }
                roster.push(item.clone());
            }
            (None, None) => {}
        }
        // Written by the next commit; what the change causes waits for it (`end_call`), so only
        // the calls that hold their actions may change a roster.
        debug_assert!(
            self.in_call,
            "a roster write outside handle_stanza or handle_frame"
        );
        self.roster_writes.insert(node.to_owned(), roster.clone());
        self.call_wrote_roster = true;
        self.put_roster(node, roster);
        let was_visible = before.as_ref().is_some_and(RosterItem::is_visible);
        let xml = match &slot {
            Some(item) if item.is_visible() || was_visible => Some(item.to_xml()),
            None if was_visible => Some(roster::removed_item_xml(jid)),
            _ => None,
        };
        if let Some(xml) = xml {
            self.roster_push(node, &xml);
        }
        Ok((before, slot))
    }

    /// RFC 6121 §2.1.6: an IQ set with the changed item to each interested session.
    fn roster_push(&mut self, node: &str, item_xml: &str) {
        let targets: Vec<(ConnId, Box<str>)> = self
            .sessions_of(node)
            .filter(|(_, s)| s.interested)
            .map(|(c, s)| (c, s.full_jid.clone()))
            .collect();
        let inner = format!("<query xmlns='{ROSTER_NS}'>{item_xml}</query>");
        for (conn, full) in targets {
            self.next_push += 1;
            let id = format!("push{:x}", self.next_push);
            let push = build::stanza(
                "iq",
                Attrs {
                    to: Some(&full),
                    id: Some(&id),
                    type_: Some("set"),
                    ..Attrs::default()
                },
                &inner,
            );
            self.deliver(conn, push);
        }
    }

    // ---- IQs the server answers ----

    /// An IQ for the server (`for_account`: addressed to the user's own account, i.e. no `to` or
    /// the user's bare JID; otherwise to the domain).
    fn server_iq(&mut self, conn: ConnId, stanza: &Stanza, for_account: bool) {
        let type_ = stanza.type_().map(|t| t.into_owned());
        let is_set = match type_.as_deref() {
            Some("get") => false,
            Some("set") => true,
            Some("result" | "error") => return,
            _ => {
                self.reply_error(conn, stanza, "modify", "bad-request");
                return;
            }
        };
        let Some(el) = build::parse(stanza) else {
            self.reply_error(conn, stanza, "modify", "bad-request");
            return;
        };
        let Some(payload) = el.children().next() else {
            self.reply_error(conn, stanza, "modify", "bad-request");
            return;
        };
        let ns = payload.ns();
        match (is_set, payload.name(), ns.as_str()) {
            (false, "query", DISCO_INFO_NS) => {
                let inner = if for_account {
                    format!(
                        "<query xmlns='{DISCO_INFO_NS}'><identity category='account' type='registered'/>\
                         <feature var='{DISCO_INFO_NS}'/></query>"
                    )
                } else {
                    format!(
                        "<query xmlns='{DISCO_INFO_NS}'><identity category='server' type='im'/>\
                         <feature var='{DISCO_INFO_NS}'/><feature var='{DISCO_ITEMS_NS}'/>\
                         <feature var='{PING_NS}'/><feature var='{ROSTER_NS}'/></query>"
                    )
                };
                self.reply_result(conn, stanza, &inner);
            }
            (false, "query", DISCO_ITEMS_NS) => {
                self.reply_result(conn, stanza, &format!("<query xmlns='{DISCO_ITEMS_NS}'/>"))
            }
            (false, "ping", PING_NS) => self.reply_result(conn, stanza, ""),
            (true, "session", SESSION_NS) => self.reply_result(conn, stanza, ""),
            (false, "query", ROSTER_NS) if for_account => self.roster_get(conn, stanza),
            (true, "query", ROSTER_NS) if for_account => self.roster_set(conn, stanza, payload),
            _ => self.reply_error(conn, stanza, "cancel", "service-unavailable"),
        }
    }

    /// Sends `type='result'` for the IQ `req` to the local session `conn`.
    fn reply_result(&mut self, conn: ConnId, req: &Stanza, inner: &str) {
        let Some(full) = self.sessions.get(&conn).map(|s| s.full_jid.clone()) else {
            return;
        };
        let from = req.to();
        let id = req.id();
        let reply = build::stanza(
            "iq",
            Attrs {
                to: Some(&full),
                from: from.as_deref(),
                id: id.as_deref(),
                type_: Some("result"),
            },
            inner,
        );
        self.deliver(conn, reply);
    }

    /// RFC 6121 §2.2.
    fn roster_get(&mut self, conn: ConnId, req: &Stanza) {
        let Some(sess) = self.sessions.get_mut(&conn) else {
            return;
        };
        sess.interested = true;
        let node = sess.node().to_owned();
        match self.with_roster(&node, |r| {
            r.iter()
                .filter(|i| i.is_visible())
                .map(RosterItem::to_xml)
                .collect::<String>()
        }) {
            Ok(items) => {
                let inner = if items.is_empty() {
                    format!("<query xmlns='{ROSTER_NS}'/>")
                } else {
                    format!("<query xmlns='{ROSTER_NS}'>{items}</query>")
                };
                self.reply_result(conn, req, &inner);
            }
            Err(e) => {
                tracing::error!(node, error = %e, "roster read failed");
                self.reply_error(conn, req, "wait", "internal-server-error");
            }
        }
    }

    /// RFC 6121 §2.3 (update) and §2.5 (remove).
    fn roster_set(&mut self, conn: ConnId, req: &Stanza, query: &minidom::Element) {
        let Some(node) = self.sessions.get(&conn).map(|s| s.node().to_owned()) else {
            return;
        };
        let set = match roster::parse_roster_set(query) {
            Ok(s) => s,
            Err(condition) => {
                self.reply_error(conn, req, "modify", condition);
                return;
            }
        };
        let contact = match jid::Jid::new(&set.jid) {
            Ok(j) => j.to_bare().to_string(),
            Err(_) => {
                self.reply_error(conn, req, "modify", "bad-request");
                return;
            }
        };
        if contact == self.bare(&node) {
            self.reply_error(conn, req, "cancel", "not-allowed");
            return;
        }
        let result = if set.remove {
            self.update_item(&node, &contact, |slot| *slot = None)
        } else {
            self.update_item(&node, &contact, |slot| {
                let item = slot.get_or_insert_with(|| RosterItem::new(&contact));
                item.name = set.name.clone();
                item.groups = set.groups.clone();
            })
        };
        match result {
            Ok((before, _)) => {
                if set.remove {
                    let Some(before) = before else {
                        self.reply_error(conn, req, "cancel", "item-not-found");
                        return;
                    };
                    // §2.5.2: cancel both directions of the subscription with the contact.
                    let bare = self.bare(&node);
                    let mut notices = Vec::new();
                    if before.subscription.has_to() || before.ask_out {
                        notices.push("unsubscribe");
                    }
                    if before.subscription.has_from() || before.pending_in {
                        notices.push("unsubscribed");
                    }
                    if before.subscription.has_from() {
                        self.send_unavailable_of(&node, &contact);
                    }
                    for t in notices {
                        let p = build::stanza(
                            "presence",
                            Attrs {
                                to: Some(&contact),
                                from: Some(&bare),
                                type_: Some(t),
                                ..Attrs::default()
                            },
                            "",
                        );
                        self.route_addressed(p);
                    }
                }
                self.reply_result(conn, req, "");
                self.on_roster_failure(conn, req);
            }
            Err(RosterError::Full) => self.reply_error(conn, req, "cancel", "not-allowed"),
            Err(RosterError::Store(e)) => {
                tracing::error!(node, error = %e, "roster write failed");
                self.reply_error(conn, req, "wait", "internal-server-error");
            }
        }
    }
}

/// The `<priority/>` of an available presence (RFC 6121 §4.7.2.3), 0 when absent or invalid.
fn presence_priority(stanza: &Stanza) -> i8 {
    if stanza.header.self_closing || !stanza.as_str().contains("priority") {
        return 0;
    }
    let Some(el) = build::parse(stanza) else {
        return 0;
    };
    el.children()
        .find(|c| c.name() == "priority" && c.ns() == "jabber:client")
        .and_then(|c| c.text().trim().parse::<i8>().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    //! The compact per-session structures: what an idle session holds, and that the compact
    //! forms behave like the plain ones they replace. Routing behaviour is in `tests/routing.rs`.

    use super::*;

    fn router() -> Router {
        Router::new(
            0,
            1,
            "example.com".into(),
            Box::new(crate::MemoryRosterStore::new()),
        )
    }

    fn presence(bytes: &'static [u8], full: &str) -> Stanza {
        build::from_bytes(Bytes::from_static(bytes))
            .expect("test stanza")
            .with_from(full)
    }

    /// The entry of an idle session in the sessions table stays small: every byte here is paid
    /// per session, times the table's spare capacity (up to 2x).
    #[test]
    fn session_entry_is_small() {
        assert!(
            std::mem::size_of::<Session>() <= 40,
            "{}",
            std::mem::size_of::<Session>()
        );
        assert!(
            std::mem::size_of::<User>() <= 24,
            "{}",
            std::mem::size_of::<User>()
        );
        assert!(std::mem::size_of::<Conns>() <= 24);
    }

    #[test]
    fn conns_keep_bind_order_and_fall_back_to_one() {
        let mut c = Conns::One(7);
        assert_eq!(c.iter().collect::<Vec<_>>(), [7]);
        c.push(3);
        c.push(9);
        assert_eq!(c.len(), 3);
        assert_eq!(c.iter().collect::<Vec<_>>(), [7, 3, 9]);
        assert!(!c.remove(3));
        assert_eq!(c, Conns::Many(vec![7, 9]));
        assert!(!c.remove(7));
        assert_eq!(c, Conns::One(9));
        assert!(!c.remove(4), "an absent conn leaves the one there");
        assert!(c.remove(9));
    }

    #[test]
    fn session_node_and_resource_are_slices_of_the_full_jid() {
        let s = Session::new("alice@example.com/phone/2".into(), 5);
        assert_eq!(s.node(), "alice");
        assert_eq!(s.resource(), "phone/2");
        assert_eq!(&*s.full_jid, "alice@example.com/phone/2");
    }

    /// An idle session that sent a plain `<presence/>` holds no extra state, and its presence
    /// is rebuilt as it was broadcast; a presence with content is kept as sent.
    #[test]
    fn plain_presence_is_not_stored_and_custom_presence_is() {
        let mut r = router();
        let full = r.bind("alice", Some("phone"), 1).expect("bind").full_jid;
        r.handle_stanza(1, presence(b"<presence/>", &full));
        while r.poll_action().is_some() {}
        let s = &r.sessions[&1];
        assert!(s.available);
        assert!(
            s.extra.is_none(),
            "plain presence, nothing in flight: {:?}",
            s.extra
        );
        let rebuilt = s.presence().expect("available");
        assert_eq!(
            rebuilt.as_str(),
            "<presence from='alice@example.com/phone'/>"
        );
        assert_eq!(rebuilt.bytes, presence(b"<presence/>", &full).bytes);

        let custom = presence(b"<presence><show>away</show></presence>", &full);
        r.handle_stanza(1, custom.clone());
        while r.poll_action().is_some() {}
        let s = &r.sessions[&1];
        assert_eq!(s.presence().expect("available").bytes, custom.bytes);
        assert!(s.extra.is_some());

        // Back to plain: the custom one is dropped, and so is the box.
        r.handle_stanza(1, presence(b"<presence/>", &full));
        while r.poll_action().is_some() {}
        assert!(r.sessions[&1].extra.is_none());

        r.handle_stanza(1, presence(b"<presence type='unavailable'/>", &full));
        while r.poll_action().is_some() {}
        assert!(r.sessions[&1].presence().is_none());
    }

    #[test]
    fn only_an_attribute_free_empty_presence_counts_as_plain() {
        let full = "a@example.com/r";
        assert!(is_plain_presence(&presence(b"<presence/>", full)));
        assert!(is_plain_presence(&presence(
            b"<presence from='x@y'/>",
            full
        )));
        assert!(!is_plain_presence(&presence(b"<presence id='1'/>", full)));
        assert!(!is_plain_presence(&presence(
            b"<presence xml:lang='en'/>",
            full
        )));
        assert!(!is_plain_presence(&presence(
            b"<presence ></presence>",
            full
        )));
        assert!(!is_plain_presence(&presence(
            b"<presence><priority>1</priority></presence>",
            full
        )));
    }

    /// A message in flight needs `extra` only until it settles.
    #[test]
    fn extra_state_is_freed_once_settled() {
        let mut r = router();
        r.bind("alice", None, 1).expect("bind");
        let origin = Origin {
            shard: 0,
            conn: 1,
            seq: 0,
        };
        r.hold(origin);
        assert_eq!(r.settled(1), 0);
        assert!(r.sessions[&1].extra.is_some());
        r.settle(origin);
        assert!(r.sessions[&1].extra.is_none());
        assert_eq!(r.settled(1), r.received(1));
    }

    /// A second resource of a user moves its list to the heap; when it goes, back inline.
    #[test]
    fn user_entry_follows_its_sessions() {
        let mut r = router();
        r.bind("alice", Some("a"), 1).expect("bind");
        r.bind("alice", Some("b"), 2).expect("bind");
        assert_eq!(r.users["alice"].conns, Conns::Many(vec![1, 2]));
        assert_eq!(r.conn_of("alice", "b"), Some(2));
        r.handle_disconnect(1);
        assert_eq!(r.users["alice"].conns, Conns::One(2));
        assert_eq!(r.conn_of("alice", "a"), None);
        r.handle_disconnect(2);
        assert!(r.users.is_empty());
        assert!(r.sessions.is_empty());
    }

    /// The actions for local connections, in order: (connection, stanza text).
    fn deliveries(r: &mut Router) -> Vec<(ConnId, String)> {
        let mut out = Vec::new();
        while let Some(a) = r.poll_action() {
            if let Action::Deliver { conn, stanza } = a {
                out.push((conn, stanza.as_str().to_owned()));
            }
        }
        out
    }

    const ROSTER_SET: &[u8] = b"<iq type='set' id='set1'><query xmlns='jabber:iq:roster'>\
        <item jid='carol@example.com'/></query></iq>";
    const PING_1: &[u8] = b"<iq type='get' id='ping1'><ping xmlns='urn:xmpp:ping'/></iq>";
    const PING_2: &[u8] = b"<iq type='get' id='ping2'><ping xmlns='urn:xmpp:ping'/></iq>";

    /// A roster set is answered once the commit that writes it is over, and what comes later
    /// for the same connection waits behind it; other connections are answered meanwhile.
    #[test]
    fn a_roster_change_is_answered_once_committed_and_nothing_overtakes_it() {
        let mut r = router();
        let a = r.bind("alice", Some("a"), 1).expect("bind").full_jid;
        let b = r.bind("bob", Some("b"), 2).expect("bind").full_jid;
        r.handle_stanza(1, presence(ROSTER_SET, &a));
        r.handle_stanza(1, presence(PING_1, &a));
        r.handle_stanza(2, presence(PING_2, &b));
        let now = deliveries(&mut r);
        assert_eq!(now.len(), 1, "{now:?}");
        assert!(now[0].0 == 2 && now[0].1.contains("id='ping2'"), "{now:?}");
        assert!(r.needs_commit());
        assert_eq!(r.held_actions(), 2, "the result and the ping behind it");
        let ticket = r.begin_commit().expect("a commit");
        assert_eq!(ticket.rosters.len(), 1);
        assert_eq!(ticket.rosters[0].0, "alice");
        assert!(
            deliveries(&mut r).is_empty(),
            "released before the commit was over"
        );
        let mut ticket = ticket;
        ticket.result = Some(Ok(Vec::new()));
        r.finish_commit(ticket);
        let after = deliveries(&mut r);
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(after[0].1.contains("id='set1'") && after[0].1.contains("type='result'"));
        assert!(after[1].1.contains("id='ping1'") && after[1].1.contains("type='result'"));
        assert!(!r.needs_commit());
        assert_eq!(r.held_actions(), 0);
        // Nothing is held any more: the next stanza is answered at once.
        r.handle_stanza(1, presence(PING_1, &a));
        assert_eq!(deliveries(&mut r).len(), 1);
    }

    /// The connections with many actions held behind a roster change are named (the driver
    /// pauses their reads), others are not, and none once the commit released them.
    #[test]
    fn connections_with_many_held_actions_are_named_until_the_commit() {
        let mut r = router();
        let a = r.bind("alice", Some("a"), 1).expect("bind").full_jid;
        let b = r.bind("bob", Some("b"), 2).expect("bind").full_jid;
        assert!(r.connections_held_at_least(1).is_empty());
        r.handle_stanza(1, presence(ROSTER_SET, &a));
        for _ in 0..4 {
            r.handle_stanza(1, presence(PING_1, &a));
        }
        r.handle_stanza(2, presence(PING_2, &b));
        deliveries(&mut r);
        // The roster result and four pings wait for alice's connection; bob's went out.
        assert_eq!(r.connections_held_at_least(5), vec![1]);
        assert!(r.connections_held_at_least(6).is_empty());
        let mut ticket = r.begin_commit().expect("a commit");
        ticket.result = Some(Ok(Vec::new()));
        r.finish_commit(ticket);
        assert_eq!(deliveries(&mut r).len(), 5);
        assert!(r.connections_held_at_least(1).is_empty());
        // Bob's pings to alice while her change waits are held on his account too.
        const BOB_PINGS_ALICE: &[u8] =
            b"<iq type='get' id='bp' to='alice@example.com/a'><ping xmlns='urn:xmpp:ping'/></iq>";
        const ROSTER_SET_2: &[u8] = b"<iq type='set' id='set2'><query xmlns='jabber:iq:roster'>\
            <item jid='dave@example.com'/></query></iq>";
        r.handle_stanza(1, presence(ROSTER_SET_2, &a));
        for _ in 0..3 {
            r.handle_stanza(2, presence(BOB_PINGS_ALICE, &b));
        }
        deliveries(&mut r);
        let mut named = r.connections_held_at_least(3);
        named.sort_unstable();
        assert_eq!(
            named,
            vec![1, 2],
            "alice for what waits for her, bob for what he sent"
        );
        let mut ticket = r.begin_commit().expect("a commit");
        ticket.result = Some(Ok(Vec::new()));
        r.finish_commit(ticket);
        assert!(r.connections_held_at_least(1).is_empty());
    }

    /// While a commit is in flight, the connections whose messages to offline users wait
    /// behind it are named by how many; none once no commit is in flight.
    #[test]
    fn connections_with_many_offline_writes_behind_a_commit_are_named() {
        const TO_BOB: &[u8] = b"<message to='bob@example.com' id='m'><body>hi</body></message>";
        let mut r = router();
        let a = r.bind("alice", Some("a"), 1).expect("bind").full_jid;
        r.handle_stanza(1, presence(TO_BOB, &a));
        assert!(
            r.connections_writing_at_least(1).is_empty(),
            "no commit in flight"
        );
        let mut ticket = r.begin_commit().expect("a commit");
        for _ in 0..3 {
            r.handle_stanza(1, presence(TO_BOB, &a));
        }
        assert_eq!(r.connections_writing_at_least(3), vec![1]);
        assert!(r.connections_writing_at_least(4).is_empty());
        ticket.result = Some(Ok(Vec::new()));
        r.finish_commit(ticket);
        assert!(r.connections_writing_at_least(1).is_empty());
        // The next commit takes the three: they no longer count.
        let ticket = r.begin_commit().expect("the next commit");
        assert_eq!(ticket.batch.puts.len(), 3);
        assert!(r.connections_writing_at_least(1).is_empty());
    }

    /// A roster write whose commit fails: the requester gets `internal-server-error` instead of
    /// the result, what waited behind it goes out, and the roster is the store's again.
    #[test]
    fn a_roster_change_whose_commit_fails_is_answered_with_an_error_and_undone() {
        let mut r = router();
        let a = r.bind("alice", Some("a"), 1).expect("bind").full_jid;
        r.handle_stanza(1, presence(ROSTER_SET, &a));
        r.handle_stanza(1, presence(PING_1, &a));
        let mut ticket = r.begin_commit().expect("a commit");
        ticket.result = Some(Err(StoreError::Backend("disk full".into())));
        r.finish_commit(ticket);
        let after = deliveries(&mut r);
        assert_eq!(after.len(), 2, "{after:?}");
        assert!(
            after[0].1.contains("id='set1'") && after[0].1.contains("internal-server-error"),
            "{after:?}"
        );
        assert!(after[1].1.contains("id='ping1'") && after[1].1.contains("type='result'"));
        assert!(r
            .with_roster("alice", |items| items.is_empty())
            .expect("read"));
        assert!(!r.needs_commit());
    }

    /// A subscription request to a contact on another shard leaves once the requester's roster
    /// records it, and the requester's next stanza to that contact (a frame too) stays behind it.
    #[test]
    fn a_subscription_to_another_shard_and_what_follows_wait_for_the_commit() {
        let on = |shard: usize| {
            (0..1000)
                .map(|i| format!("u{i}"))
                .find(|n| home_shard(&format!("{n}@example.com"), 2) == shard)
                .expect("a user homed there")
        };
        let (user, contact) = (on(0), on(1));
        let mut r = Router::new(
            0,
            2,
            "example.com".into(),
            Box::new(crate::MemoryRosterStore::new()),
        );
        let full = r.bind(&user, Some("a"), 1).expect("bind").full_jid;
        let subscribe = format!("<presence to='{contact}@example.com' type='subscribe'/>");
        let message =
            format!("<message to='{contact}@example.com' id='m1'><body>hi</body></message>");
        for xml in [subscribe, message] {
            let stanza = build::from_bytes(Bytes::from(xml))
                .expect("test stanza")
                .with_from(&full);
            r.handle_stanza(1, stanza);
        }
        let sends = |r: &mut Router| {
            let mut out = Vec::new();
            while let Some(a) = r.poll_action() {
                if let Action::Send { shard, frame } = a {
                    out.push((shard, format!("{frame:?}")));
                }
            }
            out
        };
        assert!(sends(&mut r).is_empty(), "a frame left before the commit");
        r.commit();
        let out = sends(&mut r);
        assert_eq!(out.len(), 2, "{out:?}");
        assert!(
            out[0].1.contains("subscribe") && out[1].1.contains("m1"),
            "{out:?}"
        );
    }

    /// A change made while the commit of an earlier one is in flight goes into the next commit
    /// with the whole roster: if the earlier commit fails, its requester gets the error, and the
    /// later change, answered by its own commit, still writes both.
    #[test]
    fn a_change_pending_behind_a_failed_commit_is_written_by_the_next() {
        const SET_2: &[u8] = b"<iq type='set' id='set2'><query xmlns='jabber:iq:roster'>\
            <item jid='dave@example.com'/></query></iq>";
        let store = std::rc::Rc::new(crate::MemoryRosterStore::new());
        let mut r = Router::new(0, 1, "example.com".into(), Box::new(store.clone()));
        let a = r.bind("alice", Some("a"), 1).expect("bind").full_jid;
        r.handle_stanza(1, presence(ROSTER_SET, &a));
        let mut first = r.begin_commit().expect("a commit");
        r.handle_stanza(1, presence(SET_2, &a));
        assert!(r.begin_commit().is_none(), "one commit at a time");
        first.result = Some(Err(StoreError::Backend("disk full".into())));
        r.finish_commit(first);
        let after = deliveries(&mut r);
        assert_eq!(after.len(), 1, "set2 waits for its commit: {after:?}");
        assert!(after[0].1.contains("id='set1'") && after[0].1.contains("internal-server-error"));
        assert!(r.needs_commit());
        r.commit();
        let after = deliveries(&mut r);
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(after[0].1.contains("id='set2'") && after[0].1.contains("type='result'"));
        let stored: Vec<String> = store
            .roster("alice")
            .expect("read")
            .into_iter()
            .map(|i| i.jid)
            .collect();
        assert_eq!(stored, ["carol@example.com", "dave@example.com"]);
    }

    /// Rosters are cached per shard, not per session: read once while the user is here,
    /// written by the next commit, dropped with the user's last session, and never more than the
    /// bound.
    #[test]
    fn roster_cache_is_per_shard_and_bounded() {
        let store = std::rc::Rc::new(crate::MemoryRosterStore::new());
        let mut r = Router::new(0, 1, "example.com".into(), Box::new(store.clone()));
        let mut item = RosterItem::new("bob@example.com");
        item.subscription = roster::Subscription::Both;
        store
            .set_roster("alice", &[item.clone()])
            .expect("memory store");
        r.bind("alice", None, 1).expect("bind");
        assert_eq!(
            r.with_roster("alice", |items| items.to_vec())
                .expect("read"),
            [item.clone()]
        );
        assert!(r.rosters.contains_key("alice"));
        // A write goes to the cache at once and to the store with the next commit; until then
        // a read that misses the cache finds the pending write.
        let mark = r.begin_call(None);
        r.update_item("alice", "carol@example.com", |slot| {
            *slot = Some(RosterItem::new("carol@example.com"))
        })
        .expect("update");
        r.end_call(mark);
        assert_eq!(r.rosters["alice"].len(), 2);
        assert_eq!(
            store.roster("alice").expect("read").len(),
            1,
            "before the commit"
        );
        r.handle_disconnect(1);
        assert!(r.rosters.is_empty(), "gone with the last session");
        assert_eq!(r.with_roster("alice", |i| i.len()).expect("read"), 2);
        assert!(r.needs_commit());
        r.commit();
        assert_eq!(store.roster("alice").expect("read").len(), 2);
        // Without a session nothing is cached.
        r.with_roster("alice", |_| ()).expect("read");
        assert!(r.rosters.is_empty());

        for i in 0..ROSTER_CACHE_USERS_MAX + 10 {
            let node = format!("u{i}");
            r.bind(&node, None, 100 + i as ConnId).expect("bind");
            r.with_roster(&node, |_| ()).expect("read");
            assert!(r.rosters.len() <= ROSTER_CACHE_USERS_MAX);
        }
        assert_eq!(r.rosters.len(), 10, "emptied at the bound, then refilled");
    }
}
