//! The connection driver: one thread per core, each a mio (epoll) event loop over its sessions.
//!
//! Leanness is the point. A session is one slot in a per-thread `Vec<Option<Conn>>` (the slot
//! index is the mio token): the sans-IO [`Client`] machine, the socket, an optional boxed rustls
//! connection and a `Vec` holding only the bytes the kernel would not take yet (usually empty, so
//! no allocation). Reads go into ONE 16 KiB buffer per thread and are fed straight into the
//! machine; writes are tried at once.
//!
//! Memory per idle session, client side (RSS growth while held / sessions, `idle` report's
//! `client.bytes_per_session`, measured against the gateway on loopback):
//! - plaintext: about 340 bytes (a 200-byte slot plus the machine's full JID and allocator
//!   overhead): `bench idle --sessions 15000 --hold 4 --tls none --ramp 5000` gave 335 B.
//! - TLS (direct or STARTTLS): about 9 KB, nearly all of it rustls: a buffered
//!   `ClientConnection` keeps its boxed state, record-layer keys and a 4 KiB deframer buffer that
//!   it never shrinks below 4 KiB: `bench idle --sessions 10000 --hold 4 --tls direct --insecure
//!   --ramp 3000` gave 8815 B. (rustls' unbuffered API could bring that down; not done.)
//!
//! Kernel socket buffers are not in either figure (see `kernel_tcp_bytes` in the report).
//!
//! Threads take commands (connect, chat, close, drop) over a channel with a mio `Waker`; the
//! worker's coordinator follows progress through atomics in [`Shared`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token, Waker};
use rustls::pki_types::ServerName;

use crate::client::{Client, ClientConfig, Event, FailReason, TlsMode};
use crate::latency::Recorder;
use crate::schedule::PartSchedule;

const WAKER: Token = Token(usize::MAX);
/// Bytes `probe_config_version` reads at most before the features must have come.
const PROBE_BYTES_MAX: usize = 64 * 1024;
/// Bytes read from a socket at once (one buffer per thread).
const READ_BUF: usize = 16 * 1024;
/// Connects started per loop iteration at most, so I/O keeps being served during a burst.
const CONNECT_BATCH: usize = 512;
/// Whitespace keepalive period for established sessions.
pub const KEEPALIVE: Duration = Duration::from_secs(30);

/// XEP-0509: opens one connection, sends the stream header, reads the features and returns
/// their config version (`None` when the server advertises none), so that a worker's sessions
/// pipeline their logins from the first one. Blocking; bounded by `timeout` per read and write
/// and by `PROBE_BYTES_MAX`. Direct TLS or plaintext only.
pub fn probe_config_version(
    config: &DriverConfig,
    timeout: Duration,
) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    let sock = std::net::TcpStream::connect_timeout(&config.target, timeout)
        .with_context(|| format!("connecting to {}", config.target))?;
    sock.set_read_timeout(Some(timeout))?;
    sock.set_write_timeout(Some(timeout))?;
    let header = crate::client::stream_header(&config.client.domain);
    let features = match (&config.tls, config.client.tls) {
        (Some(tls), TlsMode::Direct) => {
            let conn = rustls::ClientConnection::new(tls.clone(), config.server_name.clone())
                .context("TLS client")?;
            let mut stream = rustls::StreamOwned::new(conn, sock);
            read_features(&mut stream, header.as_bytes())?
        }
        (_, TlsMode::None) => {
            let mut sock = sock;
            read_features(&mut sock, header.as_bytes())?
        }
        _ => anyhow::bail!("the config version probe runs on direct TLS or plaintext only"),
    };
    Ok(crate::client::config_version_of(&features))
}

/// Writes `header`, then reads until the end of the stream features.
fn read_features(stream: &mut (impl Read + Write), header: &[u8]) -> anyhow::Result<String> {
    stream.write_all(header)?;
    stream.flush()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while got.len() < PROBE_BYTES_MAX {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            anyhow::bail!("the server closed the stream before its features");
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("</stream:features>") {
            return Ok(text[..end].to_owned());
        }
    }
    anyhow::bail!("no stream features in the first {PROBE_BYTES_MAX} bytes")
}

/// Everything a driver thread needs to know, shared read-only by the worker's threads.
pub struct DriverConfig {
    pub client: Arc<ClientConfig>,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub server_name: ServerName<'static>,
    pub target: SocketAddr,
    /// Source addresses, used round-robin by global session index; empty: the kernel picks.
    pub sources: Vec<IpAddr>,
    pub user_prefix: String,
    pub first: u64,
    pub worker_index: u64,
    pub worker_count: u64,
    /// Sessions this worker owns (local indices `0..local_sessions`).
    pub local_sessions: u64,
    pub threads: usize,
    pub pin: bool,
    pub login_timeout: Duration,
    /// `--handshake-only`: direct TLS without XMPP; established when the handshake completes,
    /// then close_notify, and the server's close ends the session.
    pub handshake_only: bool,
    /// `--resume`: the TLS ticket pool the sessions share (lending starts after the warm-up).
    pub tickets: Option<Arc<crate::tickets::TicketPool>>,
}

impl DriverConfig {
    /// Global session index of local session `l`.
    pub fn global(&self, l: u64) -> u64 {
        self.worker_index + l * self.worker_count
    }
    /// The user node of local session `l`.
    pub fn node(&self, l: u64) -> String {
        format!("{}{}", self.user_prefix, self.first + self.global(l))
    }
    pub fn bare_jid(&self, l: u64) -> String {
        format!("{}@{}", self.node(l), self.client.domain)
    }
    fn thread_sessions(&self, t: usize) -> u64 {
        let t = t as u64;
        let n = self.threads as u64;
        if self.local_sessions > t {
            (self.local_sessions - t).div_ceil(n)
        } else {
            0
        }
    }
}

/// Progress counters the coordinator reads while threads work.
#[derive(Default)]
pub struct Shared {
    /// Sessions established in the current connect phase.
    pub phase_established: AtomicU64,
    /// Sessions that failed to log in in the current connect phase.
    pub phase_failed: AtomicU64,
    /// Sockets open now.
    pub open: AtomicU64,
    /// Established sessions that the server (or the network) closed.
    pub dropped: AtomicU64,
    /// TLS handshakes of the current connect phase that resumed a session (a ticket).
    pub phase_resumed: AtomicU64,
    /// TLS handshakes of the current connect phase whose server certificate has an Ed25519 key.
    pub phase_ed25519: AtomicU64,
}

/// One chat run (a step of a sweep): its schedule share and its delivery bookkeeping.
pub struct ChatStep {
    pub part: PartSchedule,
    /// When the schedule starts.
    pub start: Instant,
    /// `start` in ns since the worker's epoch (what goes into message bodies).
    pub start_ns: u64,
    pub epoch: Instant,
    /// Body size in bytes.
    pub size: usize,
    /// Partner (local index) of each local session.
    pub partners: Arc<Vec<u32>>,
    /// Delivered bits by part-local index.
    pub seen: Vec<AtomicU64>,
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    /// XEP-0198 (`--sm`): messages the server acknowledged to their senders (`<a h/>`).
    pub acked: AtomicU64,
    /// Scheduled sends skipped because the sender's session was not established.
    pub unsendable: AtomicU64,
}

impl ChatStep {
    pub fn new(
        part: PartSchedule,
        start: Instant,
        epoch: Instant,
        size: usize,
        partners: Arc<Vec<u32>>,
    ) -> ChatStep {
        let words = part.count().div_ceil(64) as usize;
        ChatStep {
            part,
            start,
            start_ns: start.saturating_duration_since(epoch).as_nanos() as u64,
            epoch,
            size,
            partners,
            seen: (0..words).map(|_| AtomicU64::new(0)).collect(),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            unsendable: AtomicU64::new(0),
        }
    }
}

/// What a thread hands back on [`Cmd::Collect`] (and resets).
pub struct ThreadReport {
    /// Connect start -> established, µs.
    pub login: Recorder,
    /// Established offsets from the phase start, ms.
    pub established_at_ms: hdrhistogram::Histogram<u64>,
    /// Message latency, µs.
    pub chat: Recorder,
    /// XEP-0198 ack latency (scheduled send to the server's `<a h/>` covering it), µs.
    pub ack: Recorder,
    pub failed_by_reason: BTreeMap<String, u64>,
    pub hints: BTreeSet<String>,
}

pub fn offsets_histogram() -> hdrhistogram::Histogram<u64> {
    hdrhistogram::Histogram::new_with_bounds(1, 24 * 3600 * 1000, 3).expect("valid bounds")
}

pub enum Cmd {
    /// Connect every session of the thread that is not open, paced at `rate` per second
    /// (`None`: as fast as possible). Offsets are measured from `phase_start`.
    Connect {
        phase_start: Instant,
        rate: Option<f64>,
    },
    /// Close every socket at once, without a stream close (RST via SO_LINGER 0).
    DropAll,
    /// Send `</stream:stream>` on every session; drop what is still open at `deadline`.
    CloseAll {
        deadline: Instant,
    },
    Chat(Arc<ChatStep>),
    EndChat,
    Collect(mpsc::Sender<ThreadReport>),
    Quit,
}

/// The worker's handle on its driver threads.
pub struct Driver {
    pub config: Arc<DriverConfig>,
    pub shared: Arc<Shared>,
    senders: Vec<(mpsc::Sender<Cmd>, Arc<Waker>)>,
    joins: Vec<std::thread::JoinHandle<()>>,
}

impl Driver {
    pub fn start(config: DriverConfig) -> anyhow::Result<Driver> {
        let config = Arc::new(config);
        let shared = Arc::new(Shared::default());
        let cores = if config.pin {
            core_affinity::get_core_ids().unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut senders = Vec::new();
        let mut joins = Vec::new();
        for t in 0..config.threads {
            let poll = Poll::new()?;
            let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
            let (tx, rx) = mpsc::channel();
            let core = if cores.is_empty() {
                None
            } else {
                Some(cores[(config.worker_index as usize * config.threads + t) % cores.len()])
            };
            let mut thread = Thread::new(t, config.clone(), shared.clone(), poll, rx);
            let join = std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    thread.run();
                })?;
            senders.push((tx, waker));
            joins.push(join);
        }
        Ok(Driver {
            config,
            shared,
            senders,
            joins,
        })
    }

    fn send(&self, make: impl Fn() -> Cmd) {
        for (tx, waker) in &self.senders {
            let _ = tx.send(make());
            let _ = waker.wake();
        }
    }

    /// Starts connecting every closed session at `rate` sessions/s for this whole worker.
    pub fn connect(&self, phase_start: Instant, rate: Option<f64>) {
        self.shared.phase_established.store(0, Ordering::SeqCst);
        self.shared.phase_failed.store(0, Ordering::SeqCst);
        self.shared.phase_resumed.store(0, Ordering::SeqCst);
        self.shared.phase_ed25519.store(0, Ordering::SeqCst);
        let per_thread = rate.map(|r| r / self.config.threads as f64);
        self.send(|| Cmd::Connect {
            phase_start,
            rate: per_thread,
        });
    }

    pub fn drop_all(&self) {
        self.send(|| Cmd::DropAll);
    }

    pub fn close_all(&self, deadline: Instant) {
        self.send(|| Cmd::CloseAll { deadline });
    }

    pub fn chat(&self, step: &Arc<ChatStep>) {
        self.send(|| Cmd::Chat(step.clone()));
    }

    pub fn end_chat(&self) {
        self.send(|| Cmd::EndChat);
    }

    /// Gathers (and resets) every thread's recorders and failure tallies.
    pub fn collect(&self, timeout: Duration) -> anyhow::Result<Vec<ThreadReport>> {
        let (tx, rx) = mpsc::channel();
        self.send(|| Cmd::Collect(tx.clone()));
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        for _ in 0..self.senders.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(
                rx.recv_timeout(left)
                    .map_err(|_| anyhow::anyhow!("driver thread did not answer"))?,
            );
        }
        Ok(out)
    }

    pub fn stop(self) {
        self.send(|| Cmd::Quit);
        for j in self.joins {
            let _ = j.join();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum State {
    Connecting,
    LoggingIn,
    Established,
    Closing,
}

struct Conn {
    client: Client,
    sock: TcpStream,
    tls: Option<Box<rustls::ClientConnection>>,
    /// Bytes the kernel did not take yet (TLS records when `tls` is set).
    pending: Vec<u8>,
    /// Connect start, µs since the thread's epoch.
    started_us: u64,
    state: State,
    /// TLS created on `Event::StartTls`; the machine is told once the handshake is done.
    starttls_wait: bool,
    /// The TLS handshake is done and was counted (resumed or not).
    tls_done: bool,
    /// XEP-0198: messages sent, the server's last `<a h/>` (both mod 2^32), and the scheduled
    /// send time (ns since the epoch) of the last message sent.
    sm_sent: u32,
    sm_acked: u32,
    last_scheduled_ns: u64,
}

/// Why a connection ends.
enum End {
    /// A login failure or a drop, with a reason key.
    Fail(String),
    /// The peer closed a session we were closing (or the stream ended cleanly while closing).
    Done,
}

struct Scratch {
    buf: Box<[u8]>,
    plain: Box<[u8]>,
    out: Vec<u8>,
    tls_out: Vec<u8>,
}

struct Thread {
    t: usize,
    config: Arc<DriverConfig>,
    shared: Arc<Shared>,
    poll: Poll,
    rx: mpsc::Receiver<Cmd>,
    conns: Vec<Option<Conn>>,
    scratch: Scratch,
    epoch: Instant,
    // Connect phase.
    connecting: bool,
    phase_start: Instant,
    rate: Option<f64>,
    next_connect: u64,
    connects_done: u64,
    /// (connect start µs, slot) of sessions not yet established, in start order (entries of
    /// sessions that got established or closed are skipped when they reach the front).
    logins: VecDeque<(u64, u32)>,
    /// Sockets this thread holds.
    open_count: u64,
    // Closing.
    close_deadline: Option<Instant>,
    // Chat.
    chat: Option<Arc<ChatStep>>,
    chat_cursor: u64,
    last_keepalive: Instant,
    // Tallies.
    login: Recorder,
    established_at_ms: hdrhistogram::Histogram<u64>,
    chat_rec: Recorder,
    ack_rec: Recorder,
    failed_by_reason: BTreeMap<String, u64>,
    hints: BTreeSet<String>,
    quit: bool,
}

impl Thread {
    fn new(
        t: usize,
        config: Arc<DriverConfig>,
        shared: Arc<Shared>,
        poll: Poll,
        rx: mpsc::Receiver<Cmd>,
    ) -> Thread {
        let now = Instant::now();
        Thread {
            t,
            config,
            shared,
            poll,
            rx,
            conns: Vec::new(),
            scratch: Scratch {
                buf: vec![0; READ_BUF].into_boxed_slice(),
                plain: vec![0; READ_BUF].into_boxed_slice(),
                out: Vec::with_capacity(4096),
                tls_out: Vec::with_capacity(READ_BUF + 1024),
            },
            epoch: now,
            connecting: false,
            phase_start: now,
            rate: None,
            next_connect: 0,
            connects_done: 0,
            logins: VecDeque::new(),
            open_count: 0,
            close_deadline: None,
            chat: None,
            chat_cursor: 0,
            last_keepalive: now,
            login: Recorder::new(),
            established_at_ms: offsets_histogram(),
            chat_rec: Recorder::new(),
            ack_rec: Recorder::new(),
            failed_by_reason: BTreeMap::new(),
            hints: BTreeSet::new(),
            quit: false,
        }
    }

    fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        while !self.quit {
            let timeout = self.next_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() != io::ErrorKind::Interrupted {
                    eprintln!("bench: poll failed: {e}");
                    return;
                }
            }
            for ev in events.iter() {
                if ev.token() == WAKER {
                    continue;
                }
                let slot = ev.token().0;
                self.service(
                    slot,
                    ev.is_readable() || ev.is_error() || ev.is_read_closed(),
                    ev.is_writable(),
                );
            }
            while let Ok(cmd) = self.rx.try_recv() {
                self.command(cmd);
            }
            self.tick();
        }
    }

    fn next_timeout(&self) -> Duration {
        let mut t = Duration::from_millis(100);
        let now = Instant::now();
        if self.connecting {
            match self.rate {
                None => t = Duration::ZERO,
                Some(r) => {
                    let due =
                        self.phase_start + Duration::from_secs_f64(self.next_connect as f64 / r);
                    t = t.min(due.saturating_duration_since(now));
                }
            }
        }
        if let Some(step) = &self.chat {
            if self.chat_cursor < step.part.count() {
                let g = step.part.global_index(self.chat_cursor);
                let due = step.start + step.part.whole.due(g);
                t = t.min(due.saturating_duration_since(now));
            }
        }
        t
    }

    fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Connect { phase_start, rate } => {
                self.connecting = true;
                self.phase_start = phase_start;
                self.rate = rate.filter(|r| r.is_finite() && *r > 0.0);
                self.next_connect = 0;
                self.connects_done = 0;
            }
            Cmd::DropAll => {
                self.connecting = false;
                for slot in 0..self.conns.len() {
                    if let Some(conn) = self.conns[slot].take() {
                        let _ = socket2::SockRef::from(&conn.sock).set_linger(Some(Duration::ZERO));
                        self.open_count -= 1;
                        self.shared.open.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
            Cmd::CloseAll { deadline } => {
                self.connecting = false;
                self.close_deadline = Some(deadline);
                for slot in 0..self.conns.len() {
                    let Some(conn) = self.conns[slot].as_mut() else {
                        continue;
                    };
                    if conn.state == State::Connecting {
                        self.remove(slot, End::Done);
                        continue;
                    }
                    let was = conn.state;
                    conn.state = State::Closing;
                    self.scratch.out.clear();
                    if self.config.handshake_only {
                        // No stream to close: close_notify, if the handshake got that far.
                        if was >= State::Established {
                            continue;
                        }
                        if let Some(tls) = conn.tls.as_mut() {
                            tls.send_close_notify();
                        }
                    } else {
                        conn.client.close(&mut self.scratch.out);
                    }
                    let r = send(conn, &mut self.scratch);
                    if r.is_err() {
                        self.remove(slot, End::Done);
                    }
                }
            }
            Cmd::Chat(step) => {
                self.chat = Some(step);
                self.chat_cursor = 0;
            }
            Cmd::EndChat => self.chat = None,
            Cmd::Collect(tx) => {
                let _ = tx.send(ThreadReport {
                    login: std::mem::take(&mut self.login),
                    established_at_ms: std::mem::replace(
                        &mut self.established_at_ms,
                        offsets_histogram(),
                    ),
                    chat: std::mem::take(&mut self.chat_rec),
                    ack: std::mem::take(&mut self.ack_rec),
                    failed_by_reason: std::mem::take(&mut self.failed_by_reason),
                    hints: std::mem::take(&mut self.hints),
                });
            }
            Cmd::Quit => self.quit = true,
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.connecting {
            self.connect_due(now);
        }
        if self.chat.is_some() {
            self.chat_due(now);
        }
        // Login timeouts: `logins` is in start order, so only its front can be late.
        let limit = self.config.login_timeout.as_micros() as u64;
        let now_us = self.now_us();
        while let Some(&(started_us, slot)) = self.logins.front() {
            let pending = matches!(&self.conns[slot as usize],
                Some(c) if c.started_us == started_us && c.state < State::Established);
            if pending {
                if now_us.saturating_sub(started_us) <= limit {
                    break;
                }
                self.remove(slot as usize, End::Fail("timeout".into()));
            }
            self.logins.pop_front();
        }
        if self.logins.is_empty() && self.logins.capacity() > 1024 {
            self.logins = VecDeque::new();
        }
        if let Some(deadline) = self.close_deadline {
            if now >= deadline || self.open_count == 0 {
                for slot in 0..self.conns.len() {
                    if self.conns[slot].is_some() {
                        self.remove(slot, End::Done);
                    }
                }
                self.close_deadline = None;
                self.conns = Vec::new();
            }
        }
        if now.duration_since(self.last_keepalive) >= KEEPALIVE {
            self.last_keepalive = now;
            for slot in 0..self.conns.len() {
                let Some(conn) = self.conns[slot].as_mut() else {
                    continue;
                };
                if conn.state == State::Established {
                    self.scratch.out.clear();
                    self.scratch.out.push(b' ');
                    if send(conn, &mut self.scratch).is_err() {
                        self.remove(slot, End::Fail("closed".into()));
                    }
                }
            }
        }
    }

    fn connect_due(&mut self, now: Instant) {
        let mine = self.config.thread_sessions(self.t);
        let due = match self.rate {
            None => mine,
            Some(r) => ((now
                .saturating_duration_since(self.phase_start)
                .as_secs_f64()
                * r) as u64
                + 1)
            .min(mine),
        };
        let mut batch = 0;
        while self.next_connect < due && batch < CONNECT_BATCH {
            let slot = self.next_connect as usize;
            self.next_connect += 1;
            if self.conns.len() <= slot {
                self.conns.resize_with(slot + 1, || None);
            }
            if self.conns[slot].is_some() {
                continue;
            }
            batch += 1;
            self.open(slot);
        }
        if self.next_connect >= mine {
            self.connecting = false;
        }
    }

    fn open(&mut self, slot: usize) {
        let l = (slot * self.config.threads + self.t) as u64;
        let g = self.config.global(l);
        let source = if self.config.sources.is_empty() {
            None
        } else {
            Some(self.config.sources[(g % self.config.sources.len() as u64) as usize])
        };
        let started_us = self.now_us();
        match open_socket(self.config.target, source) {
            Ok(mut sock) => {
                if let Err(e) = self.poll.registry().register(
                    &mut sock,
                    Token(slot),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    self.fail_connect(&e, source);
                    return;
                }
                let client = Client::new(self.config.client.clone(), &self.config.node(l));
                self.conns[slot] = Some(Conn {
                    client,
                    sock,
                    tls: None,
                    pending: Vec::new(),
                    started_us,
                    state: State::Connecting,
                    starttls_wait: false,
                    tls_done: false,
                    sm_sent: 0,
                    sm_acked: 0,
                    last_scheduled_ns: 0,
                });
                self.shared.open.fetch_add(1, Ordering::Relaxed);
                self.open_count += 1;
                self.logins.push_back((started_us, slot as u32));
            }
            Err(e) => {
                self.fail_connect(&e, source);
            }
        }
    }

    fn fail_connect(&mut self, e: &io::Error, source: Option<IpAddr>) {
        *self.failed_by_reason.entry("connect".into()).or_default() += 1;
        self.shared.phase_failed.fetch_add(1, Ordering::Relaxed);
        self.hints
            .insert(connect_hint(e, source, self.config.target));
    }

    fn chat_due(&mut self, now: Instant) {
        let Some(step) = self.chat.clone() else {
            return;
        };
        let elapsed = now.saturating_duration_since(step.start);
        if now < step.start {
            return;
        }
        let due = step.part.due_by(elapsed);
        let u_local = step.partners.len() as u64;
        let threads = self.config.threads as u64;
        while self.chat_cursor < due {
            let j = self.chat_cursor;
            self.chat_cursor += 1;
            if u_local == 0 {
                continue;
            }
            let l = j % u_local;
            if l % threads != self.t as u64 {
                continue;
            }
            let slot = (l / threads) as usize;
            let g = step.part.global_index(j);
            let scheduled_ns = step.start_ns + step.part.whole.due(g).as_nanos() as u64;
            let partner = step.partners[l as usize] as u64;
            let Some(conn) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else {
                step.unsendable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if conn.state != State::Established {
                step.unsendable.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let to = self.config.bare_jid(partner);
            let body = chat_body(scheduled_ns, g, step.size);
            self.scratch.out.clear();
            conn.client
                .send_message(&to, &g.to_string(), &body, &mut self.scratch.out);
            conn.sm_sent = conn.sm_sent.wrapping_add(1);
            conn.last_scheduled_ns = scheduled_ns;
            step.sent.fetch_add(1, Ordering::Relaxed);
            if send(conn, &mut self.scratch).is_err() {
                self.remove(slot, End::Fail("closed".into()));
            }
        }
    }

    /// Handles readiness of one connection.
    fn service(&mut self, slot: usize, readable: bool, writable: bool) {
        let Some(conn) = self.conns.get_mut(slot).and_then(|c| c.as_mut()) else {
            return;
        };
        let result = if conn.state == State::Connecting {
            self.finish_connect(slot)
        } else {
            Ok(())
        };
        let result = result.and_then(|()| {
            let conn = self.conns[slot].as_mut().expect("present");
            if writable && !conn.pending.is_empty() {
                flush_pending(conn).map_err(|e| io_end(conn, &e))?;
            }
            if readable && conn.state != State::Connecting {
                self.read(slot)?;
            }
            Ok(())
        });
        if let Err(end) = result {
            self.remove(slot, end);
        }
    }

    fn finish_connect(&mut self, slot: usize) -> Result<(), End> {
        let conn = self.conns[slot].as_mut().expect("present");
        match conn.sock.take_error() {
            Ok(Some(e)) | Err(e) => {
                self.hints
                    .insert(connect_hint(&e, None, self.config.target));
                return Err(End::Fail("connect".into()));
            }
            Ok(None) => {}
        }
        match conn.sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()),
            Err(e) => {
                self.hints
                    .insert(connect_hint(&e, None, self.config.target));
                return Err(End::Fail("connect".into()));
            }
        }
        conn.state = State::LoggingIn;
        if self.config.client.tls == TlsMode::Direct {
            let tls = self.new_tls()?;
            self.conns[slot].as_mut().expect("present").tls = Some(tls);
        }
        let conn = self.conns[slot].as_mut().expect("present");
        self.scratch.out.clear();
        if !self.config.handshake_only {
            conn.client.start(&mut self.scratch.out);
        }
        send(conn, &mut self.scratch).map_err(|e| io_end(conn, &e))?;
        self.events(slot)
    }

    fn new_tls(&self) -> Result<Box<rustls::ClientConnection>, End> {
        let cfg = self
            .config
            .tls
            .clone()
            .ok_or_else(|| End::Fail("tls".into()))?;
        rustls::ClientConnection::new(cfg, self.config.server_name.clone())
            .map(Box::new)
            .map_err(|_| End::Fail("tls".into()))
    }

    fn read(&mut self, slot: usize) -> Result<(), End> {
        loop {
            let conn = self.conns[slot].as_mut().expect("present");
            let n = match conn.sock.read(&mut self.scratch.buf) {
                Ok(0) => return Err(eof_end(conn)),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_end(conn, &e)),
            };
            if conn.tls.is_none() {
                self.scratch.out.clear();
                conn.client
                    .handle_bytes(&self.scratch.buf[..n], &mut self.scratch.out);
                send(conn, &mut self.scratch).map_err(|e| io_end(conn, &e))?;
                self.events(slot)?;
            } else {
                self.feed_tls(slot, n)?;
            }
        }
    }

    /// Feeds `n` raw bytes from `scratch.buf` through rustls into the machine.
    fn feed_tls(&mut self, slot: usize, n: usize) -> Result<(), End> {
        let mut offset = 0;
        while offset < n {
            let conn = self.conns[slot].as_mut().expect("present");
            let Some(tls) = conn.tls.as_mut() else {
                return Err(End::Fail("protocol".into()));
            };
            let mut rd = &self.scratch.buf[offset..n];
            let before = rd.len();
            tls.read_tls(&mut rd).map_err(|_| End::Fail("tls".into()))?;
            offset += before - rd.len();
            if let Err(e) = tls.process_new_packets() {
                // Let the alert out, best effort.
                self.scratch.tls_out.clear();
                let _ = tls.write_tls(&mut self.scratch.tls_out);
                let _ = conn.sock.write(&self.scratch.tls_out);
                let _ = e;
                return Err(End::Fail(
                    if conn.state == State::Closing {
                        "closing"
                    } else {
                        "tls"
                    }
                    .into(),
                ));
            }
            if !conn.tls_done && !tls.is_handshaking() {
                conn.tls_done = true;
                if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    self.shared.phase_resumed.fetch_add(1, Ordering::Relaxed);
                }
                if tls
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .is_some_and(|c| has_ed25519_key(c))
                {
                    self.shared.phase_ed25519.fetch_add(1, Ordering::Relaxed);
                }
            }
            if self.config.handshake_only {
                return self.handshake_only_step(slot);
            }
            // Plaintext for the machine.
            loop {
                let tls = conn.tls.as_mut().expect("tls");
                match tls.reader().read(&mut self.scratch.plain) {
                    Ok(0) => return Err(eof_end(conn)),
                    Ok(k) => {
                        self.scratch.out.clear();
                        conn.client
                            .handle_bytes(&self.scratch.plain[..k], &mut self.scratch.out);
                        send(conn, &mut self.scratch).map_err(|e| io_end(conn, &e))?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Err(eof_end(conn)),
                }
            }
            if conn.starttls_wait && !conn.tls.as_ref().expect("tls").is_handshaking() {
                conn.starttls_wait = false;
                self.scratch.out.clear();
                conn.client.handle_tls_started(&mut self.scratch.out);
            } else {
                self.scratch.out.clear();
            }
            // Handshake records and whatever the machine wrote.
            send(conn, &mut self.scratch).map_err(|e| io_end(conn, &e))?;
            self.events(slot)?;
        }
        Ok(())
    }

    /// `--handshake-only`, after rustls took in what arrived: once the handshake is done the
    /// session counts as established and the client says close_notify; what the server sends is
    /// dropped, and its close_notify or EOF ends the session (done, as it is closing).
    fn handshake_only_step(&mut self, slot: usize) -> Result<(), End> {
        let conn = self.conns[slot].as_mut().expect("present");
        let tls = conn.tls.as_mut().expect("tls");
        if conn.state == State::LoggingIn && !tls.is_handshaking() {
            tls.send_close_notify();
            self.established(slot);
            self.conns[slot].as_mut().expect("present").state = State::Closing;
        }
        let conn = self.conns[slot].as_mut().expect("present");
        loop {
            let tls = conn.tls.as_mut().expect("tls");
            match tls.reader().read(&mut self.scratch.plain) {
                Ok(0) => return Err(eof_end(conn)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => return Err(eof_end(conn)),
            }
        }
        self.scratch.out.clear();
        send(conn, &mut self.scratch).map_err(|e| io_end(conn, &e))
    }

    /// Counts session `slot` as established (once): its login time and offset in the phase.
    fn established(&mut self, slot: usize) {
        let conn = self.conns[slot].as_mut().expect("present");
        if conn.state >= State::Established {
            return;
        }
        conn.state = State::Established;
        if conn.client.fell_back_from_sasl2() {
            self.hints.insert(SASL2_FALLBACK_HINT.to_owned());
        }
        let now_us = self.epoch.elapsed().as_micros() as u64;
        self.login
            .record_us(now_us.saturating_sub(conn.started_us).max(1));
        let offset = self.phase_start.elapsed().as_millis() as u64;
        let _ = self.established_at_ms.record(offset.max(1));
        self.shared
            .phase_established
            .fetch_add(1, Ordering::Relaxed);
        conn.pending.shrink_to_fit();
    }

    /// Drains the machine's events.
    fn events(&mut self, slot: usize) -> Result<(), End> {
        loop {
            let conn = self.conns[slot].as_mut().expect("present");
            let Some(ev) = conn.client.poll_event() else {
                return Ok(());
            };
            match ev {
                Event::StartTls => {
                    let tls = self.new_tls()?;
                    let conn = self.conns[slot].as_mut().expect("present");
                    conn.tls = Some(tls);
                    conn.starttls_wait = true;
                    self.scratch.out.clear();
                    send(conn, &mut self.scratch).map_err(|e| io_end(conn, &e))?;
                }
                Event::Established { .. } => self.established(slot),
                Event::Message { body, .. } => self.receipt(&body),
                Event::Acked { h } => {
                    let newly = h.wrapping_sub(conn.sm_acked);
                    if newly == 0 || newly > conn.sm_sent.wrapping_sub(conn.sm_acked) {
                        continue; // A repeat, or more than we sent: nothing to count.
                    }
                    conn.sm_acked = h;
                    let Some(step) = &self.chat else { continue };
                    step.acked.fetch_add(newly as u64, Ordering::Relaxed);
                    // Timed only when the ack covers everything sent, so the last send's
                    // scheduled time is the covered message's.
                    if h == conn.sm_sent && conn.last_scheduled_ns >= step.start_ns {
                        let now_ns = step.epoch.elapsed().as_nanos() as u64;
                        let us = now_ns.saturating_sub(conn.last_scheduled_ns) / 1000;
                        self.ack_rec.record_us(us.max(1));
                    }
                }
                Event::Closed {
                    reason,
                    during_login,
                } => {
                    let _ = during_login;
                    return Err(if conn.state == State::Closing {
                        End::Done
                    } else {
                        End::Fail(reason_key(&reason))
                    });
                }
            }
        }
    }

    fn receipt(&mut self, body: &str) {
        let Some(step) = &self.chat else { return };
        let Some((t_ns, g)) = parse_body(body) else {
            return;
        };
        if t_ns < step.start_ns {
            return; // From an earlier step.
        }
        let part = &step.part;
        if g % part.parts as u64 != part.k as u64 {
            return;
        }
        let j = g / part.parts as u64;
        let Some(word) = step.seen.get((j / 64) as usize) else {
            return;
        };
        let bit = 1u64 << (j % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            step.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        step.delivered.fetch_add(1, Ordering::Relaxed);
        let now_ns = step.epoch.elapsed().as_nanos() as u64;
        self.chat_rec
            .record_us((now_ns.saturating_sub(t_ns) / 1000).max(1));
    }

    fn remove(&mut self, slot: usize, end: End) {
        let Some(conn) = self.conns[slot].take() else {
            return;
        };
        self.shared.open.fetch_sub(1, Ordering::Relaxed);
        self.open_count -= 1;
        if let End::Fail(reason) = end {
            if conn.state < State::Established {
                *self.failed_by_reason.entry(reason).or_default() += 1;
                self.shared.phase_failed.fetch_add(1, Ordering::Relaxed);
            } else if conn.state == State::Established {
                *self
                    .failed_by_reason
                    .entry(format!("dropped_{reason}"))
                    .or_default() += 1;
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        drop(conn);
    }
}

/// Sends `scratch.out` (plaintext from the machine) on `conn`, through TLS when active.
fn send(conn: &mut Conn, scratch: &mut Scratch) -> io::Result<()> {
    match conn.tls.as_mut() {
        None => {
            if scratch.out.is_empty() {
                return Ok(());
            }
            write_or_keep(&mut conn.sock, &mut conn.pending, &scratch.out)
        }
        Some(tls) => {
            if !scratch.out.is_empty() {
                tls.writer().write_all(&scratch.out)?;
            }
            while tls.wants_write() {
                scratch.tls_out.clear();
                tls.write_tls(&mut scratch.tls_out)?;
                write_or_keep(&mut conn.sock, &mut conn.pending, &scratch.tls_out)?;
            }
            Ok(())
        }
    }
}

/// Writes `data` now if nothing is queued; keeps only what the kernel refused.
fn write_or_keep(sock: &mut TcpStream, pending: &mut Vec<u8>, data: &[u8]) -> io::Result<()> {
    if !pending.is_empty() {
        pending.extend_from_slice(data);
        return flush_pending_raw(sock, pending);
    }
    let mut done = 0;
    while done < data.len() {
        match sock.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if done < data.len() {
        pending.extend_from_slice(&data[done..]);
    }
    Ok(())
}

fn flush_pending(conn: &mut Conn) -> io::Result<()> {
    flush_pending_raw(&mut conn.sock, &mut conn.pending)
}

fn flush_pending_raw(sock: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<()> {
    let mut done = 0;
    while done < pending.len() {
        match sock.write(&pending[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if done == pending.len() {
        // Give the memory back: an idle session keeps no buffer.
        *pending = Vec::new();
    } else {
        pending.drain(..done);
    }
    Ok(())
}

fn eof_end(conn: &Conn) -> End {
    match conn.state {
        State::Closing => End::Done,
        State::Connecting | State::LoggingIn
            if conn.tls.as_ref().is_some_and(|t| t.is_handshaking()) =>
        {
            End::Fail("tls".into())
        }
        _ => End::Fail("closed".into()),
    }
}

fn io_end(conn: &Conn, _e: &io::Error) -> End {
    eof_end(conn)
}

fn reason_key(reason: &FailReason) -> String {
    reason.as_str().to_string()
}

/// `t=<ns> i=<index> ` padded with `x` to `size` bytes.
pub fn chat_body(scheduled_ns: u64, g: u64, size: usize) -> String {
    let mut body = format!("t={scheduled_ns} i={g} ");
    while body.len() < size {
        body.push('x');
    }
    body
}

/// Parses `t=<ns> i=<index>` at the start of a body.
pub fn parse_body(body: &str) -> Option<(u64, u64)> {
    let rest = body.strip_prefix("t=")?;
    let (t, rest) = rest.split_once(' ')?;
    let rest = rest.strip_prefix("i=")?;
    let i = rest.split(' ').next()?;
    Some((t.parse().ok()?, i.parse().ok()?))
}

/// Said once per run when `--sasl2` sessions logged in the RFC 6120 way instead.
pub const SASL2_FALLBACK_HINT: &str = "--sasl2: the server did not offer XEP-0388 SASL2 with \
    the mechanism and inline XEP-0386 Bind 2, so sessions logged in with RFC 6120 SASL and bind \
    (the figures are not SASL2 logins)";

/// A clear hint for a connect error.
pub fn connect_hint(e: &io::Error, source: Option<IpAddr>, target: SocketAddr) -> String {
    let src = source
        .map(|s| s.to_string())
        .unwrap_or_else(|| "the default address".into());
    match e.raw_os_error() {
        Some(libc::EADDRNOTAVAIL) | Some(libc::EADDRINUSE) => format!(
            "connect: ephemeral ports exhausted for source {src} ({e}): add --source-ips or widen net.ipv4.ip_local_port_range"
        ),
        Some(libc::EMFILE) | Some(libc::ENFILE) => format!(
            "connect: too many open files ({e}): raise `ulimit -n` / fs.nr_open, or use more --procs"
        ),
        Some(libc::ECONNREFUSED) | Some(libc::ETIMEDOUT) | Some(libc::ECONNRESET) => format!(
            "connect to {target}: {e}: listen queue full? check net.core.somaxconn and the server's backlog (or is the server down?)"
        ),
        _ => format!("connect to {target} from {src}: {e}"),
    }
}

/// A nonblocking TCP socket, bound to `source` (port chosen at connect time) and connecting.
fn open_socket(target: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    sock.set_nonblocking(true)?;
    sock.set_nodelay(true)?;
    if let Some(src) = source {
        if src.is_ipv4() {
            // Without it, bind(addr, 0) reserves a port for the address alone, which caps the
            // sessions per source address at the ephemeral range even across targets.
            let _ = sys::bind_address_no_port(&sock);
        }
        sock.bind(&SocketAddr::new(src, 0).into())?;
    }
    match sock.connect(&target.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(sock.into()))
}

pub mod sys {
    //! The two system calls std and socket2 do not wrap.

    use std::os::fd::AsRawFd;

    /// Sets IP_BIND_ADDRESS_NO_PORT on a socket.
    pub fn bind_address_no_port(sock: &socket2::Socket) -> std::io::Result<()> {
        let one: libc::c_int = 1;
        // SAFETY: the fd is open (borrowed from `sock`), and the option value is a valid c_int
        // whose size is passed alongside it.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after the change.
    pub fn raise_nofile() -> std::io::Result<(u64, u64)> {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid, writable rlimit for getrlimit and a valid one for setrlimit.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if lim.rlim_cur < lim.rlim_max {
                let want = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                    lim = want;
                }
            }
        }
        Ok((lim.rlim_cur, lim.rlim_max))
    }
}

/// The DER of an Ed25519 `SubjectPublicKeyInfo` up to its 32 key bytes (RFC 8410 §4): a
/// SEQUENCE of 42 bytes, the algorithm (OID 1.3.101.112, no parameters), a BIT STRING of 33.
/// Found only in a certificate whose own key is Ed25519 (an issuer's Ed25519 signature shows
/// the algorithm without the BIT STRING header).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Whether the certificate's key is Ed25519 (which tells which of a server's certificates it
/// signed the handshake with).
fn has_ed25519_key(cert: &[u8]) -> bool {
    cert.windows(ED25519_SPKI_PREFIX.len())
        .any(|w| w == ED25519_SPKI_PREFIX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_slot_is_small() {
        // Goal: an idle plaintext session costs the client well under 2 KiB. Method: bound the
        // slot (machine, socket, TLS pointer, unsent-bytes Vec, start time, state); what the
        // machine keeps besides is its full JID and the `Arc` share (see client.rs).
        let slot = std::mem::size_of::<Option<Conn>>();
        eprintln!("session slot: {slot} bytes");
        assert!(slot <= 256, "{slot}");
    }

    #[test]
    fn body_round_trips_and_pads() {
        let b = chat_body(123456789, 42, 64);
        assert_eq!(b.len(), 64);
        assert_eq!(parse_body(&b), Some((123456789, 42)));
        let short = chat_body(1, 2, 0);
        assert_eq!(short, "t=1 i=2 ");
        assert_eq!(parse_body(&short), Some((1, 2)));
        assert_eq!(parse_body("hello"), None);
    }

    #[test]
    fn an_ed25519_key_is_told_from_an_ed25519_signature() {
        let mut ed_key = vec![0x30, 0x82, 0x01, 0x00];
        ed_key.extend_from_slice(&ED25519_SPKI_PREFIX);
        ed_key.extend_from_slice(&[7; 32]);
        assert!(has_ed25519_key(&ed_key));
        // An ECDSA key signed by an Ed25519 issuer: the algorithm appears, not the key's header.
        let signed = [
            0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x30, 0x59, 0x30, 0x13,
        ];
        assert!(!has_ed25519_key(&signed));
    }
}
