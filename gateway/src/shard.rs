//! One shard: the state a pinned executor owns by value (router, connections, mesh endpoints)
//! and the glue that executes the router's actions. Shared with the shard's tasks through `Rc`;
//! nothing here is touched by another thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hashbrown::HashMap;
use router::{Action, ConnId, Frame, Router, Store};
use shared::limits::{
    MESH_BATCH_FRAMES_MAX, READ_CHUNK_BYTES, ROUTER_HELD_ACTIONS_MAX,
    ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX, ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE,
    SESSION_SEND_QUEUE_STANZAS_MAX, STORE_PENDING_WRITES_MAX,
    STORE_PENDING_WRITES_PER_CONNECTION_PAUSE,
};
use shared::stanza::Stanza;
use shared::table::ShrinkIfSparse;

use crate::c2s::{C2sConfig, SmState};
use crate::conn::Handoff;
use crate::knobs::Knobs;
pub use crate::stats::ShardStats;
use crate::stats::{QueueFigures, ShardSnapshot};

/// A level-triggered flag tasks can wait on (stop requested, mesh unblocked). Few tasks wait on
/// one flag at a time, so a plain waker list is enough.
#[derive(Default)]
pub struct Flag {
    set: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

impl Flag {
    pub fn set(&self) {
        self.set.set(true);
        for w in self.waiters.borrow_mut().drain(..) {
            w.wake();
        }
    }
    pub fn clear(&self) {
        self.set.set(false);
    }
    pub fn is_open(&self) -> bool {
        self.set.get()
    }
    /// Resolves once the flag is set.
    pub fn wait(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.set.get() {
                return Poll::Ready(());
            }
            let mut waiters = self.waiters.borrow_mut();
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

/// The stream error a session gets when its send queue is full (it reads slower than it is
/// written to; RFC 6120 §4.9.3.18).
pub const SLOW_READER_STREAM_ERROR: &str = "resource-constraint";

/// What the shard sends a connection's task: stanzas to write, or an order to close. Single
/// consumer (the connection's task), bounded by `SESSION_SEND_QUEUE_STANZAS_MAX`; it allocates
/// nothing until something is queued, so idle connections pay only for the empty struct.
#[derive(Default)]
pub struct Outbox {
    queue: RefCell<VecDeque<Outgoing>>,
    close: Cell<Option<&'static str>>,
    /// More of the connection's stanzas are settled: a XEP-0198 ack may be due.
    settled: Cell<bool>,
    /// The connection's reads are paused until the store's commit is done
    /// (`Shard::refresh_connection_pauses`).
    input_paused: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

/// One stanza for a connection: its bytes and, for a stored message the session acknowledges
/// (XEP-0198), its sequence number in the user's offline queue.
pub type Outgoing = (Bytes, Option<u64>);

impl Outbox {
    /// Queues bytes; gives them back when the queue is full.
    pub fn push(&self, bytes: Bytes) -> Result<(), Bytes> {
        self.push_stored(bytes, None).map_err(|(b, _)| b)
    }
    /// Queues a stanza with its offline sequence number; gives it back when the queue is full.
    pub fn push_stored(&self, bytes: Bytes, seq: Option<u64>) -> Result<(), Outgoing> {
        let mut q = self.queue.borrow_mut();
        if q.len() >= SESSION_SEND_QUEUE_STANZAS_MAX {
            return Err((bytes, seq));
        }
        q.push_back((bytes, seq));
        drop(q);
        self.wake();
        Ok(())
    }
    /// Tells the connection that more of its stanzas are settled.
    pub fn notify_settled(&self) {
        self.settled.set(true);
        self.wake();
    }
    /// Whether `notify_settled` was called since the last call.
    pub fn take_settled(&self) -> bool {
        self.settled.replace(false)
    }
    /// Whether the connection's reads are paused (see `Shard::refresh_connection_pauses`).
    pub fn input_paused(&self) -> bool {
        self.input_paused.get()
    }
    /// Resolves once the connection's reads may go on.
    pub fn input_resumed(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.input_paused.get() {
                return Poll::Ready(());
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }
    fn pause_input(&self) {
        self.input_paused.set(true);
    }
    fn resume_input(&self) {
        self.input_paused.set(false);
        self.wake();
    }
    /// Orders the connection closed with this stream error condition (`""` for a plain close).
    pub fn close(&self, condition: &'static str) {
        if self.close.get().is_none() {
            self.close.set(Some(condition));
        }
        self.wake();
    }
    /// Stanzas queued now.
    pub fn len(&self) -> usize {
        self.queue.borrow().len()
    }
    pub fn close_requested(&self) -> Option<&'static str> {
        self.close.get()
    }
    /// Takes everything queued, and the queue's allocation with it: a connection that goes idle
    /// after a burst keeps no queue capacity.
    pub fn drain_into(&self, out: &mut Vec<Outgoing>) {
        out.extend(std::mem::take(&mut *self.queue.borrow_mut()));
    }
    /// Resolves once a close was ordered.
    pub fn closing(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.close.get().is_some() {
                return Poll::Ready(());
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }
    /// Resolves when something is queued or a close was ordered.
    pub fn ready(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if !self.queue.borrow().is_empty() || self.close.get().is_some() || self.settled.get() {
                return Poll::Ready(());
            }
            self.waker.set(Some(cx.waker().clone()));
            Poll::Pending
        })
    }
    /// Wakes `waker` at the next push, settlement or close order (replacing any earlier one):
    /// the io_uring engine's way to hear of work for a connection that has no task.
    pub fn set_waker(&self, waker: Waker) {
        self.waker.set(Some(waker));
    }
    /// Forgets the waker (the connection it named is gone).
    pub fn clear_waker(&self) {
        self.waker.set(None);
    }
    /// Whether a wake-up would find work: stanzas queued, a close ordered, or (`bound`) a
    /// settlement to acknowledge.
    pub fn has_work(&self, bound: bool) -> bool {
        !self.queue.borrow().is_empty()
            || self.close.get().is_some()
            || (bound && self.settled.get())
    }
    fn wake(&self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

/// A XEP-0198 session waiting for its client to resume it.
struct Detached {
    conn: ConnId,
    sm: SmState,
    full_jid: String,
    /// Tells this detachment's timer from a later one under the same id.
    generation: u64,
}

/// Cross-shard endpoints of one shard.
pub struct MeshPorts {
    /// `to[j]`: batches for shard j (`None` for this shard itself).
    pub to: Vec<Option<flume::Sender<Vec<Frame>>>>,
    /// Batches from every other shard.
    pub from: Vec<flume::Receiver<Vec<Frame>>>,
    /// `handoff_to[j]`: connections handed to shard j after authentication.
    pub handoff_to: Vec<flume::Sender<Handoff>>,
    pub handoff_from: flume::Receiver<Handoff>,
}

/// One shard's state.
pub struct Shard {
    pub id: usize,
    pub shards: usize,
    pub domain: String,
    pub router: RefCell<Router>,
    pub stores: Arc<Vec<Store>>,
    pub conns: RefCell<HashMap<ConnId, Rc<Outbox>>>,
    next_conn: Cell<ConnId>,
    pub open_connections: Cell<usize>,
    pub c2s_starttls: Arc<C2sConfig>,
    pub c2s_direct_tls: Arc<C2sConfig>,
    pub tls: Arc<rustls::ServerConfig>,
    mesh_to: Vec<Option<flume::Sender<Vec<Frame>>>>,
    pub handoff_to: Vec<flume::Sender<Handoff>>,
    /// Frames waiting to be sent to each shard; flushed once per turn of the event loop.
    mesh_pending: RefCell<Vec<Vec<Frame>>>,
    mesh_flush_scheduled: Cell<bool>,
    /// Peers whose channel was full: their batch waits in a task, and later frames wait behind it
    /// so order per peer is kept.
    mesh_blocked: RefCell<Vec<bool>>,
    /// Cleared while a mesh channel is full, or while too much waits for the store's commit in
    /// flight (`commit_backlog_full`): connections stop reading until it is set again.
    pub input_unblocked: Flag,
    /// Too much waits for the store's commit in flight: actions held behind roster changes, or
    /// offline writes (`STORE_PENDING_WRITES_MAX`; see `input_unblocked`).
    commit_backlog_full: Cell<bool>,
    /// The connections whose reads are paused until the store's commit is done, so far
    /// (`refresh_connection_pauses`); usually none.
    paused_conns: RefCell<Vec<ConnId>>,
    /// Set when a delivery left a session's send queue at least half full: whoever feeds stanzas
    /// to the router yields to the writers before feeding more, so the recipient's writer runs
    /// before its queue overflows (a recipient that does not read still fills it and is closed
    /// as a slow reader). The io_uring engine feeds no more input for the rest of its turn and
    /// clears the flag at the next; a connection task of the tasks engine and a mesh pump clear
    /// it when they yield.
    pub send_pressure: Cell<bool>,
    /// Set when the shard is stopping: accept loops end, connections close.
    pub stopping: Flag,
    /// A task is scheduled to commit the router's store batch at the end of this turn.
    commit_scheduled: Cell<bool>,
    /// XEP-0198 sessions whose connection was lost, by resumption id, until resumed or expired.
    /// Bounded by the sessions bound here (each is still a router session).
    detached: RefCell<HashMap<String, Detached>>,
    next_detach: Cell<u64>,
    /// How long a detached session waits.
    pub sm_resume_timeout: Cell<std::time::Duration>,
    /// How long a connection's peer may take none of its pending bytes (`send_timeout_seconds`).
    pub send_timeout: Cell<std::time::Duration>,
    /// Failed logins by client address (`auth_failures_per_address_max`); off until set.
    pub auth_limit: RefCell<shared::address_limit::AddressLimit>,
    /// The push hook, when configured.
    pub push: RefCell<Option<Rc<crate::push::Pusher>>>,
    /// Runs store commits off the reactor; without it they run inline.
    pub committer: RefCell<Option<crate::storage::Committer>>,
    pub stats: RefCell<ShardStats>,
    /// This shard's copy of the run-time knobs, replaced by the admin port.
    pub knobs: RefCell<Knobs>,
    /// Token bucket of `accepts_per_second_per_shard`: tokens, and when it was last filled.
    accept_bucket: Cell<(f64, Instant)>,
    /// Cleared while the `mesh_receive_paused` knob is on: mesh pumps wait.
    pub mesh_receive_open: Flag,
    /// The shard thread's id, for its CPU figures in `/proc`.
    pub tid: Cell<i32>,
    /// The one large read buffer of the shard, borrowed only between two awaits (never across
    /// one), so connections share it instead of each holding their own.
    pub read_buf: RefCell<Vec<u8>>,
}

#[allow(clippy::too_many_arguments)]
impl Shard {
    pub fn new(
        id: usize,
        shards: usize,
        domain: String,
        router: Router,
        stores: Arc<Vec<Store>>,
        c2s_starttls: Arc<C2sConfig>,
        c2s_direct_tls: Arc<C2sConfig>,
        tls: Arc<rustls::ServerConfig>,
        mesh_to: Vec<Option<flume::Sender<Vec<Frame>>>>,
        handoff_to: Vec<flume::Sender<Handoff>>,
        knobs: Knobs,
        stats_enabled: bool,
    ) -> Shard {
        assert_eq!(mesh_to.len(), shards);
        assert_eq!(handoff_to.len(), shards);
        let input_unblocked = Flag::default();
        input_unblocked.set();
        let mesh_receive_open = Flag::default();
        if !knobs.mesh_receive_paused {
            mesh_receive_open.set();
        }
        Shard {
            id,
            shards,
            domain,
            router: RefCell::new(router),
            stores,
            conns: RefCell::new(HashMap::new()),
            // Ids carry the shard in the top bits so a handed-off connection keeps a unique id.
            next_conn: Cell::new(((id as u64) << 48) + 1),
            open_connections: Cell::new(0),
            c2s_starttls,
            c2s_direct_tls,
            tls,
            mesh_to,
            handoff_to,
            mesh_pending: RefCell::new((0..shards).map(|_| Vec::new()).collect()),
            mesh_flush_scheduled: Cell::new(false),
            mesh_blocked: RefCell::new(vec![false; shards]),
            input_unblocked,
            commit_backlog_full: Cell::new(false),
            paused_conns: RefCell::new(Vec::new()),
            send_pressure: Cell::new(false),
            stopping: Flag::default(),
            stats: RefCell::new(ShardStats::new(id, shards, stats_enabled)),
            knobs: RefCell::new(knobs),
            accept_bucket: Cell::new((0.0, Instant::now())),
            mesh_receive_open,
            tid: Cell::new(0),
            commit_scheduled: Cell::new(false),
            detached: RefCell::new(HashMap::new()),
            next_detach: Cell::new(0),
            sm_resume_timeout: Cell::new(std::time::Duration::ZERO),
            send_timeout: Cell::new(std::time::Duration::from_secs(
                shared::limits::SEND_TIMEOUT_SECONDS_DEFAULT,
            )),
            auth_limit: RefCell::new(shared::address_limit::AddressLimit::new(
                0,
                std::time::Duration::ZERO,
            )),
            push: RefCell::new(None),
            committer: RefCell::new(None),
            read_buf: RefCell::new(vec![0u8; READ_CHUNK_BYTES]),
        }
    }

    /// The home shard of the local part `node` of this domain.
    pub fn home_of(&self, node: &str) -> usize {
        shared::shard::home_shard(&format!("{node}@{}", self.domain), self.shards)
    }

    pub fn next_conn_id(&self) -> ConnId {
        let id = self.next_conn.get();
        self.next_conn.set(id + 1);
        id
    }

    /// Pauses the reads of the connections with `ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`
    /// actions held for them behind a roster change not yet committed, or whose stanzas added
    /// `STORE_PENDING_WRITES_PER_CONNECTION_PAUSE` offline writes behind the commit in flight,
    /// and resumes those below both now (the commit is done). Actions held on a connection's
    /// account (its stanzas for one whose actions are held) count too. A client pipelining
    /// behind its own change, sending to one whose change waits, or flooding offline users while
    /// the disk is slow so stops itself and no one else; the shard-wide pause
    /// (`commit_backlog_full`) is left for many senders at once.
    fn refresh_connection_pauses(&self) {
        let over = {
            let router = self.router.borrow();
            let mut over =
                router.connections_held_at_least(ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE);
            for conn in
                router.connections_writing_at_least(STORE_PENDING_WRITES_PER_CONNECTION_PAUSE)
            {
                if !over.contains(&conn) {
                    over.push(conn);
                }
            }
            over
        };
        if over.is_empty() && self.paused_conns.borrow().is_empty() {
            return;
        }
        let previous = std::mem::replace(&mut *self.paused_conns.borrow_mut(), over);
        let conns = self.conns.borrow();
        let now = self.paused_conns.borrow();
        let mut resumed = false;
        for conn in previous.iter().filter(|c| !now.contains(c)) {
            if let Some(outbox) = conns.get(conn) {
                outbox.resume_input();
                resumed = true;
            }
        }
        for conn in now.iter().filter(|c| !previous.contains(c)) {
            if let Some(outbox) = conns.get(conn) {
                outbox.pause_input();
                self.stats.borrow_mut().connection_pauses += 1;
                tracing::debug!(
                    shard = self.id,
                    conn,
                    "reads of one connection paused until the store's commit is done"
                );
            }
        }
        if resumed {
            // The io_uring engine re-arms the resumed connections' reads in its next turn.
            crate::uring::wake_driver();
        }
    }

    /// Opens connection input unless a mesh channel is full or too much waits for the store's
    /// commit in flight; closes it otherwise.
    fn refresh_input_gate(&self) {
        let blocked =
            self.commit_backlog_full.get() || self.mesh_blocked.borrow().iter().any(|&b| b);
        if blocked {
            self.input_unblocked.clear();
        } else if !self.input_unblocked.is_open() {
            self.input_unblocked.set();
        }
    }

    /// Executes every action the router has queued. Called after each router input.
    pub fn drain_router(self: &Rc<Self>) {
        // Bounded: each action is handled once; a bounce adds at most one more per delivery.
        loop {
            let action = self.router.borrow_mut().poll_action();
            let Some(action) = action else { break };
            match action {
                Action::Deliver { conn, stanza } => self.deliver(conn, stanza),
                Action::CloseConn { conn, condition } => {
                    if let Some(outbox) = self.conns.borrow().get(&conn) {
                        outbox.close(condition);
                    }
                }
                Action::Send { shard, frame } => self.queue_frame(shard, frame),
                Action::DeliverStored { conn, stanza, seq } => {
                    let outbox = self.conns.borrow().get(&conn).cloned();
                    let queued = outbox.as_ref().map(|o| o.push_stored(stanza.bytes, seq));
                    match (outbox, queued) {
                        (Some(o), Some(Ok(()))) => {
                            self.stats.borrow_mut().delivered += 1;
                            self.note_send_pressure(&o);
                        }
                        (Some(o), Some(Err(_))) => {
                            // It stays in the offline queue, and the session must not go on
                            // without it (later messages would reach it live first, and this one
                            // only at the next login). With XEP-0198 (a sequence number) the
                            // session takes its queue from this message on, page by page as its
                            // send queue drains (also while detached, awaiting resumption);
                            // without, it is closed as the slow reader it is.
                            match seq {
                                Some(seq) => self.router.borrow_mut().handle_queue_full(conn, seq),
                                None => o.close(SLOW_READER_STREAM_ERROR),
                            }
                            self.stats.borrow_mut().undeliverable += 1;
                        }
                        // The session is gone: the next login drains the queue.
                        _ => self.stats.borrow_mut().undeliverable += 1,
                    }
                }
                Action::Push { node, count } => {
                    if let Some(push) = self.push.borrow().as_ref() {
                        push.enqueue(&node, count);
                    }
                }
                Action::Settled { conn } => {
                    if let Some(outbox) = self.conns.borrow().get(&conn) {
                        outbox.notify_settled();
                    }
                }
            }
        }
        let commit_backlog_full = {
            let router = self.router.borrow();
            router.held_actions() >= ROUTER_HELD_ACTIONS_MAX
                || router.held_for_one_connection() >= ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX
                || (router.commit_in_flight()
                    && router.pending_writes() >= STORE_PENDING_WRITES_MAX)
        };
        if commit_backlog_full != self.commit_backlog_full.get() {
            self.commit_backlog_full.set(commit_backlog_full);
            if commit_backlog_full {
                self.stats.borrow_mut().commit_pauses += 1;
                tracing::warn!(
                    shard = self.id,
                    "too much waits for the store's commit in flight (actions held behind \
                     roster changes, or offline writes): reads paused until it is done"
                );
            }
            self.refresh_input_gate();
        }
        self.refresh_connection_pauses();
        if !self.commit_scheduled.get() && self.router.borrow().needs_commit() {
            // Group commit: the store writes of everything runnable in this turn go into one
            // transaction (one fsync), committed by a task that runs after them.
            self.commit_scheduled.set(true);
            let shard = self.clone();
            glommio::spawn_local(async move {
                glommio::yield_if_needed().await;
                let committer = shard.committer.borrow().clone();
                let ticket = {
                    let mut router = shard.router.borrow_mut();
                    router.set_clock(unix_ms());
                    match &committer {
                        Some(_) => router.begin_commit(),
                        None => {
                            router.commit();
                            None
                        }
                    }
                };
                shard.drain_router();
                if let (Some(committer), Some(mut ticket)) = (committer, ticket) {
                    // The fsync runs on the blocking thread; routing goes on, filling the next
                    // batch, which the next commit takes whole.
                    committer.run(&mut ticket).await;
                    shard.router.borrow_mut().finish_commit(ticket);
                }
                shard.commit_scheduled.set(false);
                shard.drain_router();
            })
            .detach();
        }
    }

    /// Passes a stanza of a bound local session to the router (with the wall clock set) and
    /// executes what it decides.
    pub fn route_stanza(self: &Rc<Self>, conn: ConnId, stanza: Stanza) {
        {
            let mut router = self.router.borrow_mut();
            router.set_clock(unix_ms());
            router.handle_stanza(conn, stanza);
        }
        self.drain_router();
    }

    /// Keeps the session of lost connection `conn` for resumption under `resume_id`; its router
    /// session and send queue stay. Past the timeout it ends like any closed session (its
    /// unacknowledged messages are still in the offline queue for the next login).
    pub fn detach(self: &Rc<Self>, conn: ConnId, resume_id: String, sm: SmState, full_jid: String) {
        let generation = self.next_detach.get();
        self.next_detach.set(generation + 1);
        self.detached.borrow_mut().insert(
            resume_id.clone(),
            Detached {
                conn,
                sm,
                full_jid,
                generation,
            },
        );
        let shard = self.clone();
        let timeout = self.sm_resume_timeout.get();
        glommio::spawn_local(async move {
            glommio::timer::sleep(timeout).await;
            let expired = {
                let mut detached = shard.detached.borrow_mut();
                match detached.get(&resume_id) {
                    Some(d) if d.generation == generation => detached.remove(&resume_id),
                    _ => None,
                }
            };
            if let Some(d) = expired {
                shard.end_session(d.conn, d.sm.into_unacked());
            }
        })
        .detach();
    }

    /// Deregisters connection `conn`'s send queue; the table gives its buckets back once sparse.
    pub fn remove_conn(&self, conn: ConnId) -> Option<Rc<Outbox>> {
        let mut conns = self.conns.borrow_mut();
        let outbox = conns.remove(&conn);
        conns.shrink_if_sparse();
        outbox
    }

    /// Session `conn` ends without resumption. `unacked` is what its client was given and never
    /// acknowledged; with what is still in its send queue it goes to the router (an IQ request
    /// among it gets an error reply), then the session is gone.
    pub fn end_session(self: &Rc<Self>, conn: ConnId, mut unacked: Vec<Bytes>) {
        if let Some(outbox) = self.remove_conn(conn) {
            let mut queued = Vec::new();
            outbox.drain_into(&mut queued);
            unacked.extend(
                queued
                    .into_iter()
                    .filter(|(_, seq)| seq.is_none())
                    .map(|(b, _)| b),
            );
        }
        {
            let mut router = self.router.borrow_mut();
            for bytes in unacked {
                router.handle_unacked(conn, bytes);
            }
            router.handle_disconnect(conn);
        }
        self.drain_router();
    }

    /// Takes the detached session `resume_id` if it belongs to `node` and is still bound:
    /// (its connection id, XEP-0198 state, full JID).
    pub fn resume(&self, node: &str, resume_id: &str) -> Option<(ConnId, SmState, String)> {
        let mut detached = self.detached.borrow_mut();
        let d = detached.get(resume_id)?;
        let bare = format!("{node}@{}/", self.domain);
        let still_bound = self.router.borrow().full_jid(d.conn) == Some(d.full_jid.as_str());
        if !d.full_jid.starts_with(&bare) || !still_bound {
            return None;
        }
        let d = detached.remove(resume_id)?;
        Some((d.conn, d.sm, d.full_jid))
    }

    /// Sets `send_pressure` when a delivery left `outbox` at least half full.
    fn note_send_pressure(&self, outbox: &Outbox) {
        if outbox.len() >= SESSION_SEND_QUEUE_STANZAS_MAX / 2 {
            self.send_pressure.set(true);
        }
    }

    fn deliver(self: &Rc<Self>, conn: ConnId, stanza: Stanza) {
        let outbox = self.conns.borrow().get(&conn).cloned();
        // Cloning `Bytes` bumps a reference count: fan-out shares one buffer.
        let queued = outbox.is_some_and(|o| match o.push(stanza.bytes.clone()) {
            Ok(()) => {
                self.note_send_pressure(&o);
                true
            }
            Err(_) => {
                // A reader this slow holds memory for everyone writing to it: close its stream.
                o.close(SLOW_READER_STREAM_ERROR);
                false
            }
        });
        match queued {
            true => {
                let mut stats = self.stats.borrow_mut();
                stats.delivered += 1;
                stats.stanza_out(stanza.kind);
            }
            false => {
                self.stats.borrow_mut().undeliverable += 1;
                tracing::warn!(
                    shard = self.id,
                    conn,
                    "session send queue full or gone, bounced"
                );
                self.router.borrow_mut().handle_undeliverable(conn, stanza);
            }
        }
    }

    fn queue_frame(self: &Rc<Self>, to: usize, frame: Frame) {
        assert_ne!(
            to, self.id,
            "the router never sends a frame to its own shard"
        );
        let full = {
            let mut pending = self.mesh_pending.borrow_mut();
            pending[to].push(frame);
            pending[to].len() >= MESH_BATCH_FRAMES_MAX
        };
        self.stats.borrow_mut().mesh_frames_out += 1;
        if full {
            self.flush_peer(to);
        }
        if !self.mesh_flush_scheduled.get() {
            // Batching per turn of the event loop: the flush task runs after the tasks that are
            // runnable now, so everything they route goes out in one batch per peer.
            self.mesh_flush_scheduled.set(true);
            let shard = self.clone();
            glommio::spawn_local(async move {
                glommio::yield_if_needed().await;
                shard.mesh_flush_scheduled.set(false);
                for peer in 0..shard.shards {
                    shard.flush_peer(peer);
                }
            })
            .detach();
        }
    }

    /// Sends the pending batch for `peer`. A full channel is backpressure: the batch waits in a
    /// task and connections stop reading until it is through, so nothing is buffered without
    /// bound (each blocked batch is at most `MESH_BATCH_FRAMES_MAX` frames, and readers stop).
    fn flush_peer(self: &Rc<Self>, peer: usize) {
        if self.mesh_blocked.borrow()[peer] {
            return;
        }
        let batch = std::mem::take(&mut self.mesh_pending.borrow_mut()[peer]);
        if batch.is_empty() {
            return;
        }
        let Some(tx) = self.mesh_to[peer].clone() else {
            return;
        };
        match tx.try_send(batch) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(batch)) => {
                self.stats.borrow_mut().mesh_full[peer] += 1;
                tracing::warn!(shard = self.id, peer, "mesh channel full, pausing reads");
                self.input_unblocked.clear();
                self.mesh_blocked.borrow_mut()[peer] = true;
                let shard = self.clone();
                glommio::spawn_local(async move {
                    let _ = tx.send_async(batch).await;
                    shard.mesh_blocked.borrow_mut()[peer] = false;
                    shard.flush_peer(peer);
                    shard.refresh_input_gate();
                })
                .detach();
            }
            Err(flume::TrySendError::Disconnected(_)) => {
                // Only during shutdown: the peer shard has stopped.
                tracing::debug!(shard = self.id, peer, "mesh peer gone");
            }
        }
    }

    /// Receives batches from one peer until it stops.
    pub async fn pump_mesh(self: Rc<Self>, rx: flume::Receiver<Vec<Frame>>) {
        // Unbounded loop by design: it is this shard's mesh event loop for one peer.
        loop {
            self.mesh_receive_open.wait().await;
            let Ok(batch) = rx.recv_async().await else {
                break;
            };
            self.stats.borrow_mut().mesh_frames_in += batch.len() as u64;
            self.router.borrow_mut().set_clock(unix_ms());
            for frame in batch {
                self.router.borrow_mut().handle_frame(frame);
                self.drain_router();
                if self.send_pressure.replace(false) {
                    // A delivery left a send queue half full: let the writers run before the next
                    // frame, as connection input waits for them. Without this a burst from a peer
                    // (its channel holds up to MESH_CHANNEL_BATCHES_MAX batches) went into one
                    // session's queue in a single turn, overflowed it, and closed a recipient
                    // that was reading as a slow reader.
                    futures_lite::future::yield_now().await;
                }
            }
            glommio::yield_if_needed().await;
        }
    }

    /// How long the accept loop should wait before its next accept: `None` to accept now. Pauses
    /// while the shard holds `max_sessions_per_shard` connections, and paces accepts to
    /// `accepts_per_second_per_shard` with a token bucket of one second's worth.
    pub fn admission_wait(&self) -> Option<Duration> {
        const FULL_RETRY: Duration =
            Duration::from_millis(shared::limits::ADMISSION_RETRY_MILLISECONDS);
        let knobs = self.knobs.borrow();
        if self.open_connections.get() as u64 >= knobs.max_sessions_per_shard {
            return Some(FULL_RETRY);
        }
        let rate = knobs.accepts_per_second_per_shard;
        if rate == 0 {
            return None;
        }
        let now = Instant::now();
        let (tokens, at) = self.accept_bucket.get();
        let (tokens, wait) =
            crate::knobs::take_token(tokens, now.saturating_duration_since(at), rate);
        self.accept_bucket.set((tokens, now));
        wait
    }

    /// Queue depths now: the mesh channels and every session's send queue (a scan of the
    /// connection table: cold path, once per tick).
    fn queue_figures(&self) -> QueueFigures {
        let mesh_depth_batches = self
            .mesh_to
            .iter()
            .map(|tx| tx.as_ref().map_or(0, |tx| tx.len() as u64))
            .collect();
        let (mut max, mut total) = (0u64, 0u64);
        for outbox in self.conns.borrow().values() {
            let n = outbox.len() as u64;
            max = max.max(n);
            total += n;
        }
        QueueFigures {
            mesh_depth_batches,
            send_queue_stanzas_max: max,
            send_queue_stanzas_total: total,
        }
    }

    /// Folds counters into rates and checks alerts, once per `STATS_TICK_MILLISECONDS`, until
    /// the shard stops.
    pub async fn stats_loop(self: Rc<Self>) {
        let period = Duration::from_millis(shared::limits::STATS_TICK_MILLISECONDS);
        // Unbounded by design: the shard's statistics clock; it ends when the shard stops.
        while !self.stopping.is_open() {
            glommio::timer::sleep(period).await;
            let queues = self.queue_figures();
            let knobs = self.knobs.borrow().clone();
            self.sync_offline();
            self.stats.borrow_mut().tick(Instant::now(), queues, &knobs);
        }
    }

    /// Copies the offline-queue figures the router keeps into the statistics.
    fn sync_offline(&self) {
        let o = self.router.borrow().offline_stats();
        self.stats
            .borrow_mut()
            .set_offline(o.held_messages, o.held_bytes, o.stored, o.erased);
    }

    /// This shard's statistics now.
    pub fn snapshot(&self) -> ShardSnapshot {
        self.sync_offline();
        let sessions = self.router.borrow().session_count() as u64;
        let connections = self.open_connections.get() as u64;
        let knobs = self.knobs.borrow();
        let mut snap = self.stats.borrow().snapshot(sessions, connections, &knobs);
        snap.auth_limit_untracked = self.auth_limit.borrow().untracked;
        snap.thread = crate::stats::procfs::thread(self.tid.get());
        snap
    }

    /// Puts new knob values in force on this shard.
    pub fn apply_knobs(&self, knobs: Knobs) {
        if knobs.mesh_receive_paused {
            self.mesh_receive_open.clear();
        } else {
            self.mesh_receive_open.set();
        }
        self.router.borrow_mut().set_offline_bounds(
            usize::try_from(knobs.offline_queue_messages_max).unwrap_or(usize::MAX),
            usize::try_from(knobs.offline_queue_bytes_max).unwrap_or(usize::MAX),
        );
        *self.knobs.borrow_mut() = knobs;
        // The io_uring engine's accepts follow `max_sessions_per_shard` and the accept rate.
        crate::uring::wake_driver();
    }

    /// Answers the admin port's requests (snapshots, knob changes) until every sender is gone.
    pub async fn admin_loop(self: Rc<Self>, rx: flume::Receiver<AdminRequest>) {
        // Unbounded by design: the shard's admin event loop; it ends with the senders.
        while let Ok(request) = rx.recv_async().await {
            match request {
                AdminRequest::Snapshot(reply) => {
                    let _ = reply.try_send(self.snapshot());
                }
                AdminRequest::SetKnobs(knobs, reply) => {
                    self.apply_knobs(knobs);
                    let _ = reply.try_send(());
                }
            }
        }
    }
}

/// What the admin port asks of each shard. Replies travel on a bounded(1) channel each.
pub enum AdminRequest {
    Snapshot(flume::Sender<ShardSnapshot>),
    SetKnobs(Knobs, flume::Sender<()>),
}

/// The wall clock in Unix milliseconds (stamps and ages of stored messages).
fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
