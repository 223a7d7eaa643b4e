//! A client connection: `Session` (TLS, the sans-IO `c2s` machine, the send queue and pending
//! output, and how input, output, StartTLS, handoff and the end are handled) whatever drives its
//! socket, and the `tasks` engine (`io_engine = "tasks"`): one glommio task per connection that
//! reads the socket, runs rustls, feeds the machine and the router, and writes what they produce.
//! The default `uring` engine (`uring.rs`) drives the same `Session`s from one io_uring per shard.

use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use router::credentials::Credentials;
use router::{BindError, ConnId};
use shared::limits::{
    CLOSE_WRITE_GRACE_MILLISECONDS, MEMORY_RETURN_CLOSED_CONNECTIONS_MIN,
    MEMORY_RETURN_INTERVAL_MILLISECONDS,
};
use shared::shard::home_shard;
use shared::stanza::Stanza;

use crate::c2s::{C2s, Security, Services, SmState, Step};
use crate::shard::{Outbox, Outgoing, Shard};
use crate::stats::{self, ConnReport, Phase, ShardStats};
use crate::sys;
use crate::tls::{Received, TlsError, TlsSession};

/// The inline read buffer every connection's pending read uses (kept small: idle connections
/// hold one each). A read that fills it continues through the shard's `READ_CHUNK_BYTES` buffer.
const SMALL_READ_BYTES: usize = 256;

/// Most reads through the shard buffer per wake-up of one connection (64 x 4 KiB = 256 KiB).
const DRAIN_READS_MAX: usize = 64;

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// RFC 6120 c2s port: plaintext until STARTTLS.
    StartTls,
    /// XEP-0368 direct TLS port.
    DirectTls,
}

/// An authenticated connection moving to its user's home shard.
pub struct Handoff {
    pub socket: StdTcpStream,
    /// The TLS session with any ciphertext and plaintext it holds that the machine has not seen.
    pub tls: Option<Box<TlsSession>>,
    pub machine: C2s,
    /// Bytes read from the socket but not yet given to the machine.
    pub unread: Vec<u8>,
    /// Plaintext the machine wrote and nobody sent yet: the home shard sends it with what it
    /// writes next, so a login costs one send fewer (a pipelined XEP-0388 login's features go
    /// out with its `<success/>`).
    pub out: Vec<u8>,
}

/// Accepts connections on one listener until the shard stops.
pub async fn accept_loop(shard: Rc<Shard>, listener: TcpListener, kind: Listener) {
    // Unbounded by design: this is the listener's event loop; it ends when the shard stops.
    loop {
        while let (Some(wait), false) = (shard.admission_wait(), shard.stopping.is_open()) {
            // No free slot or over the accept rate (knobs): stop accepting (the kernel's listen
            // queue holds the rest) and look again shortly. Connections are never dropped.
            glommio::timer::sleep(wait).await;
        }
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            shard.stopping.wait().await;
            None
        })
        .await;
        let Some(accepted) = accepted else { return };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: say so and back off instead of spinning.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                glommio::timer::sleep(std::time::Duration::from_millis(
                    shared::limits::ACCEPT_RETRY_MILLISECONDS,
                ))
                .await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        shard.stats.borrow_mut().accepted += 1;
        let Some(session) = Session::accepted(&shard, kind) else {
            continue;
        };
        spawn_conn(shard.clone(), stream, session, Vec::new());
    }
}

/// Hands freed memory back to the OS after many connections closed (a storm of disconnects),
/// looking every `MEMORY_RETURN_INTERVAL_MILLISECONDS`; ends when the shard stops.
pub async fn return_memory_loop(shard: Rc<Shard>) {
    let mut high = shard.open_connections.get();
    // Unbounded by design: one cheap check per interval for the shard's life.
    loop {
        let stopped = futures_lite::future::or(
            async {
                glommio::timer::sleep(Duration::from_millis(MEMORY_RETURN_INTERVAL_MILLISECONDS))
                    .await;
                false
            },
            async {
                shard.stopping.wait().await;
                true
            },
        )
        .await;
        if stopped {
            return;
        }
        let open = shard.open_connections.get();
        high = high.max(open);
        if high - open >= MEMORY_RETURN_CLOSED_CONNECTIONS_MIN {
            sys::return_freed_memory();
            high = open;
        }
    }
}

/// Takes over connections handed to this shard.
pub async fn adopt_loop(shard: Rc<Shard>, rx: flume::Receiver<Handoff>) {
    // Unbounded by design: the shard's handoff event loop; ends when every sender is gone.
    while let Ok(h) = rx.recv_async().await {
        shard.stats.borrow_mut().handoffs_in += 1;
        let stream = sys::adopt_socket(h.socket);
        let mut session = Session::register(&shard, shard.next_conn_id(), h.tls, h.machine);
        session.out = h.out;
        spawn_conn(shard.clone(), stream, session, h.unread);
    }
}

fn spawn_conn(shard: Rc<Shard>, stream: TcpStream, session: Session, unread: Vec<u8>) {
    // A write the peer takes nothing of for this long fails (glommio restarts the timer on
    // every byte the socket takes), and the connection closes: `send_timeout_seconds`.
    if let Err(e) = stream.set_write_timeout(Some(shard.send_timeout.get())) {
        tracing::warn!(error = %e, "cannot set a connection's send timeout");
    }
    let conn = Conn { s: session, shard };
    let task = conn.run(stream, unread);
    // For per-session memory breakdowns (`--log-level gateway::conn=trace`).
    tracing::trace!(
        task_bytes = std::mem::size_of_val(&task),
        machine_bytes = std::mem::size_of::<C2s>(),
        tls_session_bytes = std::mem::size_of::<TlsSession>(),
        "connection task"
    );
    glommio::spawn_local(task).detach();
}

/// How a connection's run ended.
enum End {
    /// Closed (by either side or on error): clean up here.
    Closed,
    /// Handed to another shard: the connection lives on there.
    HandedOff,
}

/// What every connection carries whatever engine drives its socket (a task per connection, or
/// a slot of the shard's io_uring driver): its id, TLS, machine, send queue and pending output.
pub(crate) struct Session {
    pub id: ConnId,
    pub tls: Option<Box<TlsSession>>,
    pub machine: C2s,
    pub outbox: Rc<Outbox>,
    pub bound: bool,
    /// Plaintext produced by the machine, not yet written.
    pub out: Vec<u8>,
    pub report: ConnReport,
}

struct Conn {
    shard: Rc<Shard>,
    s: Session,
}

enum Wake {
    Read(std::io::Result<usize>),
    Outbox,
    Tick,
}

impl Session {
    /// A connection starting on this shard: registers its send queue and counts it open.
    pub fn register(
        shard: &Shard,
        id: ConnId,
        tls: Option<Box<TlsSession>>,
        machine: C2s,
    ) -> Session {
        let outbox = Rc::new(Outbox::default());
        shard.conns.borrow_mut().insert(id, outbox.clone());
        shard.open_connections.set(shard.open_connections.get() + 1);
        Session {
            report: ConnReport::starting(machine.auth_failures()),
            id,
            tls,
            machine,
            outbox,
            bound: false,
            out: Vec::new(),
        }
    }

    /// A freshly accepted connection on listener `kind`: its TLS session (direct TLS) and
    /// machine. `None` when no TLS session can be made (logged).
    pub fn accepted(shard: &Shard, kind: Listener) -> Option<Session> {
        let (config, security, tls) = match kind {
            Listener::StartTls => (shard.c2s_starttls.clone(), Security::Plain, None),
            Listener::DirectTls => match TlsSession::new(shard.tls.clone()) {
                Ok(tls) => (
                    shard.c2s_direct_tls.clone(),
                    Security::Tls,
                    Some(Box::new(tls)),
                ),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start a TLS session");
                    return None;
                }
            },
        };
        let machine = C2s::new(config, security, Instant::now());
        Some(Session::register(shard, shard.next_conn_id(), tls, machine))
    }

    /// The connection is gone (closed or lost): statistics, then its session ends, or waits
    /// for a XEP-0198 resumption.
    pub fn cleanup(&mut self, shard: &Rc<Shard>) {
        let failures = self.machine.auth_failures();
        ShardStats::report_conn(&shard.stats, &mut self.report, Phase::Gone, failures);
        shard.open_connections.set(shard.open_connections.get() - 1);
        if self.bound && !shard.stopping.is_open() {
            // Lost, not closed: a XEP-0198 session waits to be resumed (its send queue stays).
            if let Some((resume_id, sm, full_jid)) = self.machine.detach() {
                shard.detach(self.id, resume_id, sm, full_jid);
                return;
            }
        }
        if self.bound {
            let unacked = self.machine.take_unacked();
            shard.end_session(self.id, unacked);
        } else {
            shard.remove_conn(self.id);
        }
    }

    /// Reports the connection's phase to the shard's statistics (when it changed).
    pub fn report_phase(&mut self, shard: &Shard) {
        let phase = stats::phase_of(
            self.bound,
            self.tls.as_ref().is_some_and(|t| t.is_handshaking()),
        );
        let failures = self.machine.auth_failures();
        ShardStats::report_conn(&shard.stats, &mut self.report, phase, failures);
    }

    /// Handles a wake-up of the send queue: stanzas to write, or an ordered close (what is
    /// queued is written first, then the stream error).
    pub fn handle_outbox(&mut self, shard: &Rc<Shard>, drained: &mut Vec<Outgoing>) -> Step {
        if let Some(condition) = self.outbox.close_requested() {
            let condition = (!condition.is_empty()).then_some(condition);
            self.outbox.drain_into(drained);
            self.write_outgoing(shard, drained);
            self.machine.handle_close(condition, &mut self.out);
            Step::Close
        } else {
            self.outbox.drain_into(drained);
            let step = self.write_outgoing(shard, drained);
            // A burst should not leave its queue's capacity on an idle connection.
            *drained = Vec::new();
            step
        }
    }

    /// Passes stanzas from the outbox through the machine (XEP-0198 counts and keeps them) into
    /// the write buffer, sends an ack that waited for settlement, and asks the router for the
    /// next page of an offline queue being delivered.
    fn write_outgoing(&mut self, shard: &Rc<Shard>, drained: &mut Vec<Outgoing>) -> Step {
        let mut step = Step::Continue;
        for (bytes, seq) in drained.drain(..) {
            if step == Step::Continue {
                step = self.machine.handle_outbound(bytes, seq, &mut self.out);
            }
        }
        if step != Step::Continue || !self.bound {
            return step;
        }
        let settled = self.outbox.take_settled();
        let mut services = ShardServices {
            shard,
            conn: &mut self.id,
            outbox: &mut self.outbox,
            bound: &mut self.bound,
            arrived: Instant::now(),
            fd: None,
        };
        if settled {
            self.machine.handle_settled(&mut services, &mut self.out);
        }
        shard.router.borrow_mut().handle_room(self.id);
        shard.drain_router();
        step
    }

    /// `Step::StartTls`: the TLS session begins (after `<proceed/>` was written). False when no
    /// TLS session can be made (logged): close the connection.
    pub fn start_tls(&mut self, shard: &Shard) -> bool {
        match TlsSession::new(shard.tls.clone()) {
            Ok(tls) => {
                self.tls = Some(Box::new(tls));
                self.machine.handle_tls_established();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot start a TLS session");
                false
            }
        }
    }

    /// Seals the pending plaintext and queues TLS close_notify right after it, so the last
    /// bytes and the alert leave in one send (one segment on the wire instead of two).
    pub fn seal_close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            if tls.send(&self.out).is_ok() {
                self.out.clear();
                let _ = tls.close_notify();
            }
        }
    }

    /// Takes what is to be written to the wire: the machine's plaintext, through TLS when on.
    /// The error (a TLS failure) comes after any records queued before it (an alert), which
    /// still go out; the connection closes after them. An idle connection keeps no buffer.
    pub fn take_wire(&mut self) -> (Vec<u8>, Result<(), TlsError>) {
        let (wire, result) = match self.tls.as_mut() {
            None => (std::mem::take(&mut self.out), Ok(())),
            Some(tls) => {
                let sent = tls.send(&self.out);
                self.out.clear();
                let wire = std::mem::take(&mut tls.outgoing);
                tls.release_idle();
                (wire, sent)
            }
        };
        if self.out.capacity() > 0 {
            self.out = Vec::new();
        }
        (wire, result)
    }

    /// Deregisters the connection from this shard and packs it for shard `home`: the socket,
    /// the TLS state (with records not yet written), the machine (with its framer's buffered
    /// bytes), any unread bytes and the plaintext not yet written.
    pub fn hand_off(&mut self, shard: &Shard, socket: StdTcpStream, unread: Vec<u8>) -> Handoff {
        // The machine moves; a closed placeholder stays behind (it is never used again).
        let placeholder = C2s::new(shard.c2s_direct_tls.clone(), Security::Tls, Instant::now());
        let failures = self.machine.auth_failures();
        ShardStats::report_conn(&shard.stats, &mut self.report, Phase::Gone, failures);
        let machine = std::mem::replace(&mut self.machine, placeholder);
        shard.stats.borrow_mut().handoffs_out += 1;
        // Deregister before the send: the connection is no longer this shard's.
        shard.remove_conn(self.id);
        shard.open_connections.set(shard.open_connections.get() - 1);
        Handoff {
            socket,
            tls: self.tls.take(),
            machine,
            unread,
            out: std::mem::take(&mut self.out),
        }
    }

    /// Feeds received bytes through TLS (if any) into the machine. Returns the step and the
    /// bytes not yet fed when the machine stopped early (authenticated: they follow the handoff).
    /// `fd` is the connection's socket (its peer's address is looked up for a login only when
    /// failed logins are being counted).
    pub fn handle_input(&mut self, shard: &Rc<Shard>, fd: RawFd, data: &[u8]) -> (Step, Vec<u8>) {
        let now = Instant::now();
        let mut services = ShardServices {
            shard,
            conn: &mut self.id,
            outbox: &mut self.outbox,
            bound: &mut self.bound,
            arrived: now,
            fd: Some(fd),
        };
        let Some(tls) = self.tls.as_mut() else {
            return (
                self.machine
                    .handle_bytes(data, &mut services, &mut self.out, now),
                Vec::new(),
            );
        };
        let machine = &mut self.machine;
        let out = &mut self.out;
        let mut feed = |plain: &[u8]| match machine.handle_bytes(plain, &mut services, out, now) {
            Step::Continue => None,
            step => Some(step),
        };
        match tls.receive(data, &mut feed) {
            // Lets the machine work through what its framer already holds (after a handoff).
            Ok(Received::Fed(None)) => (feed(&[]).unwrap_or(Step::Continue), Vec::new()),
            Ok(Received::Fed(Some(step))) => (step, Vec::new()),
            Ok(Received::PeerClosed) => (Step::Close, Vec::new()),
            Err(e) => {
                tracing::debug!(error = %e, "TLS error");
                // An alert may be queued in the session's outgoing records; flush writes it.
                (Step::Close, Vec::new())
            }
        }
    }
}

impl Conn {
    async fn run(mut self, mut stream: TcpStream, unread: Vec<u8>) {
        let end = self.run_inner(&mut stream, unread).await;
        match end {
            End::HandedOff => {}
            End::Closed => {
                let _ = stream.close().await;
                self.s.cleanup(&self.shard);
            }
        }
    }

    async fn run_inner(&mut self, stream: &mut TcpStream, unread: Vec<u8>) -> End {
        // Bytes buffered before a handoff come first; an empty call also lets the machine work
        // through what its framer already holds.
        let (step, rest) = self
            .s
            .handle_input(&self.shard, stream.as_raw_fd(), &unread);
        if let Some(end) = self.after_step(stream, step, rest).await {
            return end;
        }
        // Idle connections must not hold a read buffer: the pending read targets this small array
        // inside the task, and a read that fills it drains the socket through the shard's one
        // large buffer (`Shard::read_buf`), synchronously, before the next await.
        let mut small = [0u8; SMALL_READ_BYTES];
        let mut drained: Vec<Outgoing> = Vec::new();
        // Unbounded by design: the connection's event loop; every iteration waits for input.
        loop {
            let deadline = self.s.machine.deadline();
            let wake = {
                let shard = &self.shard;
                let outbox = &self.s.outbox;
                let read = async {
                    shard.input_unblocked.wait().await;
                    // Paused until the store's commit is done (`Shard::refresh_connection_pauses`).
                    outbox.input_resumed().await;
                    Wake::Read(stream.read(&mut small).await)
                };
                let queued = async {
                    outbox.ready().await;
                    Wake::Outbox
                };
                let tick = async {
                    match deadline {
                        Some(at) => {
                            let now = Instant::now();
                            glommio::timer::sleep(at.saturating_duration_since(now)).await;
                            Wake::Tick
                        }
                        None => std::future::pending().await,
                    }
                };
                futures_lite::future::or(queued, futures_lite::future::or(read, tick)).await
            };
            let step = match wake {
                Wake::Read(Ok(0)) | Wake::Read(Err(_)) => return End::Closed,
                Wake::Read(Ok(n)) => {
                    self.shard.stats.borrow_mut().bytes_in(n);
                    let (mut step, mut rest) =
                        self.s
                            .handle_input(&self.shard, stream.as_raw_fd(), &small[..n]);
                    let mut more = false;
                    if n == small.len() && step == Step::Continue {
                        (step, rest, more) = self.drain_socket(stream);
                    }
                    if let Some(end) = self.after_step(stream, step, rest).await {
                        return end;
                    }
                    // The socket still holds input, or a delivery left a recipient's send queue
                    // half full: let the shard's other tasks (the recipients' writers among
                    // them) run before this one reads again, so a recipient that reads is never
                    // overrun and closed as a slow reader.
                    if self.shard.send_pressure.replace(false) || more {
                        futures_lite::future::yield_now().await;
                    }
                    continue;
                }
                Wake::Outbox => self.s.handle_outbox(&self.shard, &mut drained),
                Wake::Tick => self.s.machine.handle_tick(&mut self.s.out, Instant::now()),
            };
            if let Some(end) = self.after_step(stream, step, Vec::new()).await {
                return end;
            }
        }
    }

    /// Writes what is pending and carries out the machine's step. `Some` ends the loop.
    async fn after_step(
        &mut self,
        stream: &mut TcpStream,
        step: Step,
        unread: Vec<u8>,
    ) -> Option<End> {
        self.s.report_phase(&self.shard);
        if matches!(step, Step::Close) {
            self.s.seal_close_notify();
        }
        // After authentication the output waits for what the home shard adds (see
        // `Handoff::out`; at home, the recursion below), so a login costs one send fewer.
        let authenticated = matches!(step, Step::Authenticated { .. });
        let last = matches!(step, Step::Close);
        if !authenticated && self.flush(stream, last).await.is_err() {
            return Some(End::Closed);
        }
        match step {
            Step::Continue => None,
            Step::Close => Some(End::Closed),
            Step::StartTls => match self.s.start_tls(&self.shard) {
                true => None,
                false => Some(End::Closed),
            },
            Step::Authenticated { node } => {
                self.shard.stats.borrow_mut().auth_succeeded();
                let home = self.shard.home_of(&node);
                if home == self.shard.id {
                    // Already home: go on with whatever the client sent after authenticating.
                    let (step, rest) =
                        self.s
                            .handle_input(&self.shard, stream.as_raw_fd(), &unread);
                    return Box::pin(self.after_step(stream, step, rest)).await;
                }
                Some(self.hand_off(stream, home, unread).await)
            }
        }
    }

    /// Moves the connection to shard `home` (the socket as a duplicated descriptor).
    async fn hand_off(&mut self, stream: &mut TcpStream, home: usize, unread: Vec<u8>) -> End {
        let socket = match sys::dup_socket(stream) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot duplicate a socket for handoff");
                return End::Closed;
            }
        };
        let handoff = self.s.hand_off(&self.shard, socket, unread);
        let tx = self.shard.handoff_to[home].clone();
        if tx.send_async(handoff).await.is_err() {
            tracing::debug!(home, "handoff target stopped");
        }
        End::HandedOff
    }

    /// Reads what else the socket holds through the shard's large buffer, without awaiting: each
    /// read is polled once and completes at once when data is there (glommio tries the `recv`
    /// before arming a poll). Bounded by `DRAIN_READS_MAX` so one busy connection cannot starve
    /// the shard; what is left waits for the next turn (`true` in the result: there may be more).
    fn drain_socket(&mut self, stream: &mut TcpStream) -> (Step, Vec<u8>, bool) {
        let shard = self.shard.clone();
        for _ in 0..DRAIN_READS_MAX {
            let mut big = shard.read_buf.borrow_mut();
            let got = futures_lite::future::block_on(futures_lite::future::poll_once(
                stream.read(&mut big[..]),
            ));
            let n = match got {
                Some(Ok(n)) if n > 0 => {
                    shard.stats.borrow_mut().bytes_in(n);
                    n
                }
                Some(Ok(_)) | Some(Err(_)) => return (Step::Close, Vec::new(), false),
                None => return (Step::Continue, Vec::new(), false),
            };
            let (step, rest) = self.s.handle_input(&shard, stream.as_raw_fd(), &big[..n]);
            if step != Step::Continue || n < big.len() {
                return (step, rest, false);
            }
            if shard.send_pressure.get() || self.s.outbox.input_paused() {
                // A delivery left a recipient's send queue half full: its writer runs first. Or
                // this connection's reads are paused until the store's commit is done.
                return (Step::Continue, rest, true);
            }
        }
        (Step::Continue, Vec::new(), true)
    }

    /// Writes pending plaintext (through TLS when on) and TLS records. The `last` bytes of the
    /// connection (its close follows) go with `MSG_MORE` as far as the socket takes them at
    /// once: `End::Closed` always ends in `TcpStream::close`, whose shutdown of the write side
    /// sends them with the FIN in one segment (a close alone could reset the connection when
    /// input is unread, and drop them).
    async fn flush(&mut self, stream: &mut TcpStream, last: bool) -> std::io::Result<()> {
        let (wire, sent) = self.s.take_wire();
        // Records queued before a failure (an alert) still go out.
        let mut rest = &wire[..];
        if last && !rest.is_empty() {
            match sys::send_more(stream, rest) {
                Ok(n) => {
                    self.shard.stats.borrow_mut().bytes_out(n);
                    rest = &rest[n..];
                }
                // Full: the write below waits for room (without MSG_MORE: nothing is held).
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if !rest.is_empty() {
            write_wire(stream, &self.shard, &self.s.outbox, rest).await?;
        }
        sent.map_err(std::io::Error::other)
    }
}

/// Writes `bytes`; once the connection's close is ordered, a write the peer does not take within
/// `CLOSE_WRITE_GRACE_MILLISECONDS` fails, so a peer that stopped reading cannot hold its session
/// (and the memory queued for it) open; before that, a write that the peer takes nothing of for
/// `send_timeout_seconds` fails (the stream's write timeout). Written bytes count in the shard's
/// statistics.
async fn write_wire(
    stream: &mut TcpStream,
    shard: &Shard,
    outbox: &Outbox,
    bytes: &[u8],
) -> std::io::Result<()> {
    let write = async {
        if let Err(e) = stream.write_all(bytes).await {
            if e.kind() == std::io::ErrorKind::TimedOut {
                shard.stats.borrow_mut().send_timeouts += 1;
                tracing::debug!(
                    shard = shard.id,
                    "closing a connection whose peer stopped reading"
                );
            }
            return Err(e);
        }
        shard.stats.borrow_mut().bytes_out(bytes.len());
        Ok(())
    };
    let give_up = async {
        outbox.closing().await;
        glommio::timer::sleep(Duration::from_millis(CLOSE_WRITE_GRACE_MILLISECONDS)).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "closing, and the peer does not read",
        ))
    };
    futures_lite::future::or(write, give_up).await
}

/// The shard's services as the c2s machine sees them.
pub(crate) struct ShardServices<'a> {
    shard: &'a Rc<Shard>,
    /// The connection's id and send queue; a XEP-0198 resumption replaces both with the resumed
    /// session's.
    conn: &'a mut ConnId,
    outbox: &'a mut Rc<Outbox>,
    bound: &'a mut bool,
    /// When the bytes being handled were read: routing latency runs from here.
    arrived: Instant,
    /// The connection's socket, when handling its input.
    fd: Option<RawFd>,
}

impl ShardServices<'_> {
    /// The connection's peer address (`getpeername`), or `None` if it cannot be had.
    fn peer_ip(&self) -> Option<std::net::IpAddr> {
        crate::sys::peer_ip(self.fd?)
    }
}

impl Services for ShardServices<'_> {
    fn auth_refused(&mut self) -> bool {
        // No lookup of the peer's address while no failure is counted (the common case).
        if !self.shard.auth_limit.borrow().tracking() {
            return false;
        }
        let Some(ip) = self.peer_ip() else {
            return false;
        };
        let refused = self.shard.auth_limit.borrow().refused(ip, Instant::now());
        if refused {
            self.shard.stats.borrow_mut().auth_refused_address += 1;
            tracing::debug!(shard = self.shard.id, %ip, "login refused: too many failures from its address");
        }
        refused
    }

    fn auth_failed(&mut self) {
        if !self.shard.auth_limit.borrow().enabled() {
            return;
        }
        if let Some(ip) = self.peer_ip() {
            self.shard
                .auth_limit
                .borrow_mut()
                .failed(ip, Instant::now());
        }
    }

    fn credentials(&mut self, node: &str) -> Option<Credentials> {
        let home = home_shard(&format!("{node}@{}", self.shard.domain), self.shard.shards);
        // A read of another shard's database on a cold path (logins): redb reads are lock-free
        // MVCC snapshots, so this takes no lock another shard's hot path holds.
        match self.shard.stores[home].credentials(node) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "credentials lookup failed");
                None
            }
        }
    }

    fn bind(&mut self, node: &str, resource: Option<&str>) -> Result<String, BindError> {
        let bound = self
            .shard
            .router
            .borrow_mut()
            .bind(node, resource, *self.conn);
        if bound.is_ok() {
            *self.bound = true;
        }
        self.shard.drain_router();
        bound.map(|b| b.full_jid)
    }

    fn stanza(&mut self, stanza: Stanza) {
        let kind = stanza.kind;
        self.shard.route_stanza(*self.conn, stanza);
        self.shard
            .stats
            .borrow_mut()
            .stanza_routed(kind, self.arrived);
    }

    fn sm_enabled(&mut self) {
        self.shard.router.borrow_mut().handle_sm_enabled(*self.conn);
    }

    fn received(&mut self) -> u64 {
        self.shard.router.borrow().received(*self.conn)
    }

    fn settled(&mut self) -> u64 {
        self.shard.router.borrow().settled(*self.conn)
    }

    fn resume(&mut self, node: &str, previd: &str) -> Option<(SmState, String)> {
        let (old, sm, full_jid) = self.shard.resume(node, previd)?;
        // This connection becomes the old session: its id, its send queue (with whatever was
        // queued while it was away); its own fresh entry goes.
        let outbox = self.shard.conns.borrow().get(&old).cloned()?;
        self.shard.remove_conn(*self.conn);
        *self.conn = old;
        *self.outbox = outbox;
        *self.bound = true;
        Some((sm, full_jid))
    }

    fn acked(&mut self, seqs: &[u64]) {
        self.shard
            .router
            .borrow_mut()
            .handle_acked(*self.conn, seqs);
        self.shard.drain_router();
    }
}
