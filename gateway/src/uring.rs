//! The io_uring engine (`io_engine = "uring"`): one ring per shard, driven by one glommio task of
//! the shard, and every connection a slot in a per-shard slab. An idle connection holds no task,
//! no future, no read buffer and no send buffer: reads land in a ring of provided buffers shared
//! by the shard (multishot recv), sends go from a buffer that lives only while a send is in
//! flight, and one timer heap per shard serves every connection's deadlines.
//!
//! The driver sleeps on an eventfd registered with the ring, read through glommio's own ring, so
//! the shard's other tasks (mesh pumps, commits, the admin port) run beside it as before.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{RawWaker, RawWakerVTable, Waker};
use std::time::{Duration, Instant};

use hashbrown::HashMap;
use io_uring::types::{self, BufRingEntry, Fd};
use io_uring::{cqueue, opcode, squeue, IoUring};
use shared::limits::{
    CLOSE_WRITE_GRACE_MILLISECONDS, READ_CHUNK_BYTES, URING_ACCEPTS_IN_FLIGHT_MAX,
    URING_COMPLETIONS_PER_TURN, URING_CQ_PER_SQ_ENTRIES, URING_RECV_BUFFERS_MAX,
    URING_SEND_BACKLOG_BYTES_MAX, URING_SLOTS_RESERVED_MAX, URING_SQ_ENTRIES,
};

use crate::c2s::Step;
use crate::conn::{Handoff, Listener, Session};
use crate::shard::{Outgoing, Shard};
use crate::sys;

/// The buffer group id of the shard's provided receive buffers.
const BUFFER_GROUP: u16 = 0;

/// Operation kinds in the top byte of an io_uring `user_data`.
const OP_RECV: u64 = 1;
const OP_SEND: u64 = 2;
const OP_CANCEL: u64 = 3;
const OP_ACCEPT: u64 = 4;
/// The socket's close at the end of a connection (completions only on failure).
const OP_CLOSE: u64 = 5;

/// Generations are kept to 24 bits in `user_data` (kind 8 | generation 24 | slot 32).
const GENERATION_MASK: u32 = 0x00FF_FFFF;

/// Turns of the shard's other tasks the driver looks at its ring after, before it sleeps.
const URING_IDLE_YIELDS: usize = 8;
/// Capacity of the list of sends started in a turn that is kept between turns (entries).
const SENDS_WATCHED_CAPACITY_KEPT: usize = 4_096;

const ADMISSION_RETRY: Duration =
    Duration::from_millis(shared::limits::ADMISSION_RETRY_MILLISECONDS);
const ACCEPT_RETRY: Duration = Duration::from_millis(shared::limits::ACCEPT_RETRY_MILLISECONDS);

fn user_data(op: u64, slot: u32, generation: u32) -> u64 {
    (op << 56) | (u64::from(generation & GENERATION_MASK) << 32) | u64::from(slot)
}

fn decode(data: u64) -> (u64, u32, u32) {
    (
        data >> 56,
        ((data >> 32) as u32) & GENERATION_MASK,
        data as u32,
    )
}

/// Sizes of the engine, from the config.
#[derive(Debug, Clone, Copy)]
pub struct UringSizes {
    pub recv_buffers: u32,
    pub recv_buffer_bytes: usize,
    /// Reads take only the bytes they need from a buffer (`uring_recv_buffer_fill`).
    pub recv_incremental: bool,
}

// The ready list: slots whose send queue has work, pushed by their outbox's waker. Each shard is
// one thread with one driver, so a thread-local list needs no lock; the wakers are never sent to
// another thread (outboxes live in the shard's `Rc`s).
thread_local! {
    static READY: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static DRIVER_WAKER: Cell<Option<Waker>> = const { Cell::new(None) };
}

static SLOT_WAKER_VTABLE: RawWakerVTable = RawWakerVTable::new(
    slot_waker_clone,
    slot_waker_wake,
    slot_waker_wake,
    slot_waker_drop,
);

fn slot_waker_clone(data: *const ()) -> RawWaker {
    RawWaker::new(data, &SLOT_WAKER_VTABLE)
}

fn slot_waker_wake(data: *const ()) {
    READY.with(|r| r.borrow_mut().push(data as usize as u32));
    DRIVER_WAKER.with(|w| {
        if let Some(w) = w.take() {
            w.wake();
        }
    });
}

fn slot_waker_drop(_: *const ()) {}

/// Wakes this shard thread's driver (knobs changed: its accepts may have to change).
pub fn wake_driver() {
    DRIVER_WAKER.with(|w| {
        if let Some(w) = w.take() {
            w.wake();
        }
    });
}

/// A waker that puts slot `index` on the shard's ready list: no allocation, no reference count.
fn slot_waker(index: u32) -> Waker {
    // SAFETY: the vtable's functions treat the data pointer as a plain integer (the slot index)
    // and never dereference it; they touch only thread-local state of the shard thread.
    unsafe {
        Waker::from_raw(RawWaker::new(
            index as usize as *const (),
            &SLOT_WAKER_VTABLE,
        ))
    }
}

/// The shard's provided receive buffers: one allocation cut into `count` buffers, and the ring
/// through which they are given to the kernel (`IORING_REGISTER_PBUF_RING`).
///
/// Filled incrementally where the kernel can (`IOU_PBUF_RING_INC`, Linux 6.12): a read takes
/// only the bytes it needs from the buffer at the ring's head, so many connections' reads share
/// one buffer and the ring holds its bytes' worth of input, not `count` reads. Without it (older
/// kernels, or `uring_recv_buffer_fill = "whole"`) every read takes a whole buffer, and a login
/// storm of thousands of small reads runs a ring of 256 dry every turn: each read that finds it
/// empty ends its connection's multishot recv, which then costs a completion and a re-arm
/// (5,000 logins on one shard with 256 whole buffers: ~16 such per login).
///
/// A buffer goes back to the ring once the kernel is done with it (a completion without
/// `IORING_CQE_F_BUF_MORE`; always, when whole) and every piece of it handed out has been given
/// back (`release`).
struct BufRing {
    /// The ring of `count` entries, page aligned (mmap'd).
    ring: *mut BufRingEntry,
    ring_bytes: usize,
    count: u16,
    /// Our tail (published to the kernel by `publish`).
    tail: u16,
    buffers: Vec<u8>,
    size: usize,
    /// Buffers the kernel is done with that are not yet back in the ring.
    out: usize,
    incremental: bool,
    /// Per buffer: bytes the kernel has filled since it was put in the ring (where its next
    /// piece starts).
    filled: Vec<u32>,
    /// Per buffer: pieces handed out and not given back, plus one while the kernel may still
    /// fill it.
    refs: Vec<u32>,
}

impl BufRing {
    fn new(ring: &IoUring, count: u32, size: usize, incremental: bool) -> std::io::Result<BufRing> {
        let count = u16::try_from(count)
            .ok()
            .filter(|c| c.is_power_of_two() && u32::from(*c) <= URING_RECV_BUFFERS_MAX)
            .ok_or_else(|| {
                std::io::Error::other(format!(
                    "uring_recv_buffers must be a power of two up to {URING_RECV_BUFFERS_MAX}"
                ))
            })?;
        let ring_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // Touched now: the buffers are a fixed cost of the shard, not of the first sessions.
        let buffers = vec![1u8; usize::from(count) * size];
        let mut this = BufRing {
            ring: p.cast(),
            ring_bytes,
            count,
            tail: 0,
            buffers,
            size,
            out: 0,
            incremental,
            filled: vec![0; usize::from(count)],
            refs: vec![0; usize::from(count)],
        };
        if incremental {
            // SAFETY: the mapping is `count` entries, page aligned, and lives until `drop`,
            // after the ring (the driver drops its ring first).
            let result = unsafe {
                ring.submitter().register_buf_ring_with_flags(
                    p as u64,
                    count,
                    BUFFER_GROUP,
                    io_uring::types::IOU_PBUF_RING_INC as u16,
                )
            };
            match result {
                Ok(()) => {}
                // Kernels before 6.12 refuse the flag.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::info!(
                        "the kernel cannot fill receive buffers incrementally (Linux 6.12); \
                         each read takes a whole buffer (uring_recv_buffer_fill = \"whole\")"
                    );
                    this.incremental = false;
                }
                Err(e) => return Err(e),
            }
        }
        if !this.incremental {
            // SAFETY: as above.
            unsafe {
                ring.submitter()
                    .register_buf_ring_with_flags(p as u64, count, BUFFER_GROUP, 0)?;
            }
        }
        for bid in 0..count {
            this.push(bid);
        }
        this.out = 0;
        this.publish();
        Ok(this)
    }

    /// Queues buffer `bid` for the kernel again (visible after `publish`), whole and empty.
    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.count - 1));
        // SAFETY: `index` < `count`, inside the mapping; the kernel reads only entries between its
        // head and our published tail, and this one lies at or past the tail.
        let entry = unsafe { &mut *self.ring.add(index) };
        let addr = self.buffers[usize::from(bid) * self.size..].as_ptr();
        entry.set_addr(addr as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        self.out = self.out.saturating_sub(1);
        self.filled[usize::from(bid)] = 0;
        self.refs[usize::from(bid)] = 1;
    }

    /// The kernel put `len` bytes in buffer `bid` (`more`: it may put more there later). Returns
    /// where in the buffer they start; the piece is ours until `release`.
    fn take(&mut self, bid: u16, len: u32, more: bool) -> u32 {
        let b = usize::from(bid);
        let offset = if self.incremental { self.filled[b] } else { 0 };
        self.filled[b] = offset.saturating_add(len);
        self.refs[b] += 1;
        if !more || !self.incremental {
            // The kernel is done with it: its reference goes.
            self.refs[b] -= 1;
            self.out += 1;
        }
        offset
    }

    /// Gives back a piece of buffer `bid` taken with `take`; the buffer returns to the ring with
    /// its last piece.
    fn release(&mut self, bid: u16) {
        let b = usize::from(bid);
        self.refs[b] = self.refs[b].saturating_sub(1);
        if self.refs[b] == 0 {
            self.push(bid);
        }
    }

    fn publish(&self) {
        // SAFETY: the tail field of the ring's first entry, inside the mapping; the kernel reads
        // it concurrently, so it is written atomically with release ordering.
        unsafe {
            let tail = BufRingEntry::tail(self.ring) as *mut u16;
            AtomicU16::from_ptr(tail).store(self.tail, Ordering::Release);
        }
    }

    fn get(&self, bid: u16, offset: u32, len: u32) -> &[u8] {
        let start = usize::from(bid) * self.size;
        let end = start + self.size;
        let from = (start + offset as usize).min(end);
        &self.buffers[from..(from + len as usize).min(end)]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; the ring that used it is gone (dropped first).
        unsafe { libc::munmap(self.ring.cast(), self.ring_bytes) };
    }
}

/// One connection of the shard.
struct Slot {
    fd: RawFd,
    session: Session,
    /// The send in flight, if any (an idle connection holds none).
    send: Option<Box<Sending>>,
    recv_armed: bool,
    recv_cancelled: bool,
    /// Reading paused: too much waits to be sent.
    write_blocked: bool,
    /// Reading paused until the store's commit is done (its outbox says so: many answers for
    /// the connection, or on its account, wait behind a roster change, or it added many offline
    /// writes). What arrived meanwhile waits in `Driver::paused_input`; `resume_paused` feeds it
    /// and reads again.
    input_paused: bool,
    closing: bool,
    /// The sends from now on are the connection's last: they carry `MSG_MORE`, so their tail is
    /// held in the socket until the close sends it with the FIN in the same segment.
    last_sends: bool,
    /// A send carried `MSG_MORE`: the close must shut the write side down first (see
    /// `finish_close`).
    corked: bool,
    grace_armed: bool,
    /// The machine's deadline is in the timer heap.
    deadline_scheduled: bool,
    /// A send-stall timer is in the heap (`send_timeout_seconds`).
    stall_timer: bool,
    /// Waiting to move to its home shard: (home, bytes read meanwhile).
    handoff: Option<Box<(usize, Vec<u8>)>>,
}

/// A send in flight: the wire bytes the kernel is sending, how many went out, and the bytes
/// produced meanwhile (sent next).
struct Sending {
    bytes: Vec<u8>,
    sent: usize,
    queued: Vec<u8>,
    /// When the peer last took bytes of this send, kept only while a stall timer watches it
    /// (`None`: not watched yet, so no clock read on the common path).
    since: Option<Instant>,
}

impl Slot {
    /// Whether more output may be produced now: no send in flight, or less than
    /// `URING_SEND_BACKLOG_BYTES_MAX` waiting behind it (so a recipient's queue keeps draining
    /// into its socket while the kernel takes the previous batch).
    fn takes_output(&self) -> bool {
        self.send
            .as_ref()
            .is_none_or(|s| s.queued.len() < URING_SEND_BACKLOG_BYTES_MAX)
    }
}

struct Entry {
    generation: u32,
    slot: Option<Box<Slot>>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    /// The machine's deadline (login timeout).
    Deadline,
    /// A closing connection's last write gets `CLOSE_WRITE_GRACE_MILLISECONDS`.
    Grace,
    /// A send that did not complete in the turn it was submitted in must make progress within
    /// `send_timeout_seconds`.
    SendStall,
}

/// Input of one connection, in order: data in a provided buffer, or the end of the stream.
#[derive(Clone, Copy)]
enum Input {
    /// A piece of provided buffer `bid`.
    Data {
        bid: u16,
        offset: u32,
        len: u32,
    },
    End,
}

/// What a paused connection sent, in order (see `Driver::paused_input`).
struct PausedInput {
    generation: u32,
    bytes: Vec<u8>,
    /// How much of `bytes` was handled since the reads went on.
    fed: usize,
    /// The peer closed after these bytes.
    end: bool,
}

struct ListenerState {
    fd: RawFd,
    kind: Listener,
    /// Accepts submitted and not completed.
    in_flight: usize,
    /// All of them are being cancelled (stopping, or a knob lowered the session bound).
    cancelling: bool,
    retry_at: Option<Instant>,
}

type RingWait = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Why the driver woke.
enum Wake {
    Ring,
    Other,
    Handoff(Box<Handoff>),
}

/// The io_uring engine of one shard. Field order matters: the ring drops before the buffers
/// and listeners it refers to.
pub struct Driver {
    ring: IoUring,
    bufs: BufRing,
    shard: Rc<Shard>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u32, TimerKind)>>,
    /// Sends submitted this turn, as (slot, generation): those still in flight after the next
    /// turn's completions get a stall timer (`watch_sends`).
    sends_started: Vec<(u32, u32)>,
    /// Input waiting while the mesh is blocked or a send queue fills (each holds a provided
    /// buffer: bounded by them).
    held: VecDeque<(u32, u32, Input)>,
    /// Connections whose multishot recv ended for want of buffers, to re-arm as they return.
    starved: VecDeque<(u32, u32)>,
    /// Input of connections whose reads are paused (`Slot::input_paused`), copied out of the
    /// provided buffers so they go back to the ring: what arrived before the recv's cancel took
    /// hold, at most what the ring held. Usually empty.
    paused_input: HashMap<u32, PausedInput>,
    /// The slots with `input_paused`, to resume once their outbox lets them read.
    paused_slots: Vec<(u32, u32)>,
    listeners: Vec<ListenerState>,
    /// Keeps the listening sockets open.
    _listener_sockets: Vec<std::net::TcpListener>,
    drained: Vec<Outgoing>,
    cqes: Vec<(u64, i32, u32)>,
    eventfd: Rc<glommio::io::BufferedFile>,
}

impl Driver {
    /// Sets up the shard's ring, its provided buffers and its eventfd; fails (for a fallback to
    /// the task engine) when the kernel lacks what the engine needs.
    pub fn new(
        shard: Rc<Shard>,
        listeners: Vec<(std::net::TcpListener, Listener)>,
        sizes: UringSizes,
        slots_reserved: usize,
    ) -> std::io::Result<Driver> {
        // Cooperative task work: a completion arriving while the shard runs does not interrupt it
        // with an IPI (reschedule IPIs were ~2% of the gateway's cycles in a login storm, perf;
        // none with the flag); it is posted at the shard's next syscall, and the task-run flag
        // tells `reap`, `submit` and the idle check when one is owed. Kernels before 5.19 lack
        // both flags: the ring is built without them.
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .setup_taskrun_flag()
            .setup_cqsize(URING_SQ_ENTRIES * URING_CQ_PER_SQ_ENTRIES)
            .build(URING_SQ_ENTRIES)
            .or_else(|_| {
                IoUring::builder()
                    .setup_single_issuer()
                    .setup_cqsize(URING_SQ_ENTRIES * URING_CQ_PER_SQ_ENTRIES)
                    .build(URING_SQ_ENTRIES)
            })?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::RecvMulti::CODE, "recv"),
            (opcode::Send::CODE, "send"),
            (opcode::Accept::CODE, "accept"),
            (opcode::AsyncCancel::CODE, "async cancel"),
            (opcode::Close::CODE, "close"),
        ] {
            if !probe.is_supported(code) {
                return Err(std::io::Error::other(format!(
                    "the kernel's io_uring lacks {name}"
                )));
            }
        }
        let bufs = BufRing::new(
            &ring,
            sizes.recv_buffers,
            sizes.recv_buffer_bytes,
            sizes.recv_incremental,
        )?;
        // SAFETY: eventfd takes plain integers and returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `efd` is a fresh descriptor owned by nothing else; glommio's file takes it over.
        let eventfd = unsafe { glommio::io::BufferedFile::from_raw_fd(efd) };
        ring.submitter().register_eventfd(efd)?;
        let mut listener_states = Vec::new();
        let mut sockets = Vec::new();
        for (l, kind) in listeners {
            listener_states.push(ListenerState {
                fd: l.as_raw_fd(),
                kind,
                in_flight: 0,
                cancelling: false,
                retry_at: None,
            });
            sockets.push(l);
        }
        Ok(Driver {
            ring,
            bufs,
            shard,
            entries: Vec::with_capacity(slots_reserved.min(URING_SLOTS_RESERVED_MAX)),
            free: Vec::new(),
            timers: BinaryHeap::new(),
            sends_started: Vec::new(),
            held: VecDeque::new(),
            starved: VecDeque::new(),
            paused_input: HashMap::new(),
            paused_slots: Vec::new(),
            listeners: listener_states,
            _listener_sockets: sockets,
            drained: Vec::new(),
            cqes: Vec::with_capacity(URING_COMPLETIONS_PER_TURN),
            eventfd: Rc::new(eventfd),
        })
    }

    /// Bytes of one connection slot (with its session) when idle, for memory breakdowns.
    pub fn slot_bytes() -> usize {
        std::mem::size_of::<Slot>() + std::mem::size_of::<Entry>()
    }

    /// Runs the shard's connections until the shard stops and they are all closed.
    pub async fn run(mut self, handoffs: flume::Receiver<Handoff>) {
        // What was applied: the buffer fill falls back to whole buffers on kernels before 6.12.
        tracing::info!(
            shard = self.shard.id,
            slot_bytes = Self::slot_bytes(),
            recv_buffers = self.bufs.count,
            recv_buffer_bytes = self.bufs.size,
            recv_buffer_fill = if self.bufs.incremental {
                "incremental"
            } else {
                "whole"
            },
            "io_uring engine running"
        );
        let mut ring_wait = self.ring_wait();
        // Unbounded by design: the shard's connection event loop; it ends when the shard stops.
        loop {
            // A new turn: the recipients that were filling had their writers run.
            self.shard.send_pressure.set(false);
            let mut started = std::mem::take(&mut self.sends_started);
            let mut worked = self.reap();
            self.watch_sends(&mut started);
            if self.sends_started.is_empty() {
                // Keep the allocation (the sends started while reaping stay in the other one).
                std::mem::swap(&mut self.sends_started, &mut started);
            }
            worked |= self.run_ready();
            worked |= self.run_timers(Instant::now());
            worked |= self.feed_held();
            worked |= self.resume_paused();
            for _ in 0..URING_COMPLETIONS_PER_TURN {
                match handoffs.try_recv() {
                    Ok(h) => {
                        self.adopt(h);
                        worked = true;
                    }
                    Err(_) => break,
                }
            }
            self.rearm_starved();
            self.manage_accepts();
            self.bufs.publish();
            self.submit();
            if self.shard.stopping.is_open() && self.shard.open_connections.get() == 0 {
                return;
            }
            if worked {
                futures_lite::future::yield_now().await;
                continue;
            }
            // Before sleeping, look at the ring again after each of a few turns of the shard's
            // other tasks: glommio learns of the eventfd only when it polls its own ring, which it
            // may not do for a while when other tasks stay runnable (a busy mesh pump).
            let mut arrived = false;
            for _ in 0..URING_IDLE_YIELDS {
                futures_lite::future::yield_now().await;
                if !self.ring.completion().is_empty()
                    || self.ring.submission().taskrun()
                    || READY.with(|r| !r.borrow().is_empty())
                {
                    arrived = true;
                    break;
                }
            }
            if arrived {
                continue;
            }
            let wake = self.wait(&mut ring_wait, &handoffs).await;
            match wake {
                Wake::Ring => ring_wait = self.ring_wait(),
                Wake::Other => {}
                Wake::Handoff(h) => self.adopt(*h),
            }
        }
    }

    /// A read of the eventfd the ring signals on every completion, through glommio's ring.
    fn ring_wait(&self) -> RingWait {
        let efd = self.eventfd.clone();
        Box::pin(async move {
            if let Err(e) = efd.read_at(0, 8).await {
                // Never seen; without the eventfd the driver looks at its ring every millisecond.
                tracing::warn!(error = %e, "reading the io_uring eventfd failed");
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        })
    }

    /// Sleeps until a completion, a ready slot, a timer, a handoff, the mesh clearing for held
    /// input, or the shard stopping.
    async fn wait(&self, ring_wait: &mut RingWait, handoffs: &flume::Receiver<Handoff>) -> Wake {
        let next_timer = self.timers.peek().map(|Reverse((at, ..))| *at);
        let next_accept = self.listeners.iter().filter_map(|l| l.retry_at).min();
        let at = match (next_timer, next_accept) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let shard = &self.shard;
        let held = !self.held.is_empty();
        let stopping_seen = shard.stopping.is_open();
        let ring = async {
            ring_wait.as_mut().await;
            Wake::Ring
        };
        let mut registered = false;
        let ready = std::future::poll_fn(|cx| {
            // Woken through `DRIVER_WAKER` (it is taken then), or work already listed.
            let woken = registered
                && DRIVER_WAKER.with(|w| {
                    let w2 = w.take();
                    let taken = w2.is_none();
                    w.set(w2);
                    taken
                });
            if woken || READY.with(|r| !r.borrow().is_empty()) {
                return std::task::Poll::Ready(Wake::Other);
            }
            DRIVER_WAKER.with(|w| w.set(Some(cx.waker().clone())));
            registered = true;
            std::task::Poll::Pending
        });
        let timer = async {
            match at {
                Some(at) => {
                    glommio::timer::sleep(at.saturating_duration_since(Instant::now())).await;
                    Wake::Other
                }
                None => std::future::pending().await,
            }
        };
        let flags = async {
            if stopping_seen {
                if held {
                    shard.input_unblocked.wait().await;
                    return Wake::Other;
                }
                return std::future::pending().await;
            }
            let unblocked = async {
                if held {
                    shard.input_unblocked.wait().await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            futures_lite::future::or(unblocked, shard.stopping.wait()).await;
            Wake::Other
        };
        let handoff = async {
            match handoffs.recv_async().await {
                Ok(h) => Wake::Handoff(Box::new(h)),
                Err(_) => std::future::pending().await,
            }
        };
        use futures_lite::future::or;
        or(ring, or(ready, or(timer, or(flags, handoff)))).await
    }

    /// Pushes an entry, submitting first when the submission queue is full.
    fn push(&mut self, entry: io_uring::squeue::Entry) {
        // SAFETY (for every entry pushed): the buffers an entry points to (send buffers in a slot,
        // provided buffers) stay alive and unmoved until its completion is reaped: a slot is
        // freed only when no operation of it is in flight, and the ring drops before the buffers.
        loop {
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                return;
            }
            if let Err(e) = self.ring.submit() {
                tracing::warn!(error = %e, "io_uring submit failed");
            }
        }
    }

    /// Submits what is queued; also enters the kernel when it owes the ring task work
    /// (cooperative task run), so that work's completions get posted.
    fn submit(&mut self) {
        if self.ring.submission().is_empty() && !self.ring.submission().taskrun() {
            return;
        }
        if let Err(e) = self.ring.submit() {
            tracing::warn!(error = %e, "io_uring submit failed");
        }
    }

    /// Handles the completions that are there (at most a turn's worth). True when any were.
    fn reap(&mut self) -> bool {
        if self.ring.completion().is_empty() && self.ring.submission().taskrun() {
            self.submit();
        }
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.extend(
            self.ring
                .completion()
                .take(URING_COMPLETIONS_PER_TURN)
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let any = !cqes.is_empty();
        for (data, result, flags) in cqes.drain(..) {
            let (op, generation, slot) = decode(data);
            match op {
                OP_RECV => self.on_recv(slot, generation, result, flags),
                OP_SEND => self.on_send(slot, generation, result),
                OP_ACCEPT => self.on_accept(slot as usize, result),
                OP_CLOSE => {
                    // Only a failed close completes (SKIP_SUCCESS); nothing to undo.
                    tracing::trace!(
                        error = %std::io::Error::from_raw_os_error(-result),
                        "closing a socket"
                    );
                }
                _ => {}
            }
        }
        self.cqes = cqes;
        any
    }

    fn slot(&mut self, index: u32, generation: u32) -> Option<&mut Slot> {
        let e = self.entries.get_mut(index as usize)?;
        if e.generation & GENERATION_MASK != generation {
            return None;
        }
        e.slot.as_deref_mut()
    }

    fn generation(&self, index: u32) -> u32 {
        self.entries[index as usize].generation & GENERATION_MASK
    }

    fn on_recv(&mut self, index: u32, generation: u32, result: i32, flags: u32) {
        let bid = cqueue::buffer_select(flags);
        let len = u32::try_from(result).unwrap_or(0);
        let offset = bid.map_or(0, |bid| {
            self.bufs.take(bid, len, cqueue::buffer_more(flags))
        });
        let more = cqueue::more(flags);
        let Some(slot) = self.slot(index, generation) else {
            if let Some(bid) = bid {
                self.bufs.release(bid);
            }
            return;
        };
        let mut rearm = false;
        if !more {
            slot.recv_armed = false;
            // A recv cancelled on purpose is re-armed too when what stopped it is already over
            // by now (a send queue that drained, a pause lifted while the cancel was in flight):
            // `arm_recv` refuses while it lasts (closing, handoff, blocked or paused reads).
            rearm = result > 0 || result == -libc::ECANCELED;
            slot.recv_cancelled = false;
        }
        let input = match (result, bid) {
            (n, Some(bid)) if n > 0 => Some(Input::Data { bid, offset, len }),
            (n, bid) => {
                if let Some(bid) = bid {
                    self.bufs.release(bid);
                }
                if n == -libc::ENOBUFS {
                    self.shard.stats.borrow_mut().recv_buffer_shortages += 1;
                    self.starved.push_back((index, generation));
                    None
                } else if n == -libc::ECANCELED || more {
                    None
                } else {
                    // 0: the peer closed; another error: the connection is broken.
                    rearm = false;
                    Some(Input::End)
                }
            }
        };
        if let Some(input) = input {
            if self.held.is_empty() && self.input_open() {
                self.input(index, generation, input);
            } else {
                self.held.push_back((index, generation, input));
            }
        }
        if rearm {
            self.arm_recv(index, generation);
        }
        self.progress(index, generation);
    }

    /// Whether input may be fed now: not while a mesh channel is full, nor for the rest of a turn
    /// in which a delivery left a send queue half full.
    fn input_open(&self) -> bool {
        self.shard.input_unblocked.is_open() && !self.shard.send_pressure.get()
    }

    /// Feeds input held while the mesh was blocked or a send queue was filling, in order. True
    /// when any was fed.
    fn feed_held(&mut self) -> bool {
        let mut any = false;
        while self.input_open() {
            let Some((index, generation, input)) = self.held.pop_front() else {
                break;
            };
            self.input(index, generation, input);
            self.progress(index, generation);
            any = true;
        }
        any
    }

    /// Resumes the connections whose reads were paused for the store's commit once their
    /// outbox lets them read: what they sent meanwhile is handled first, a read's worth
    /// (`READ_CHUNK_BYTES`) at a time and only while input is open (a delivery that left a send
    /// queue half full stops it for the turn, as for any input), then they read again. True
    /// when any made progress.
    fn resume_paused(&mut self) -> bool {
        let mut any = false;
        let mut i = 0;
        while i < self.paused_slots.len() && self.input_open() {
            let (index, generation) = self.paused_slots[i];
            let Some(slot) = self.slot(index, generation) else {
                self.paused_slots.swap_remove(i);
                continue;
            };
            if slot.session.outbox.input_paused() || slot.closing {
                i += 1;
                continue;
            }
            let shard = self.shard.clone();
            // Fed in order; stops early when input closes or the connection pauses again.
            while self.input_open() {
                match self.slot(index, generation) {
                    Some(slot) if !slot.closing && !slot.session.outbox.input_paused() => {}
                    _ => break,
                }
                let Some(stash) = self
                    .paused_input
                    .get_mut(&index)
                    .filter(|p| p.generation == generation && p.fed < p.bytes.len())
                else {
                    break;
                };
                let from = stash.fed;
                let to = (from + READ_CHUNK_BYTES).min(stash.bytes.len());
                stash.fed = to;
                let chunk = stash.bytes[from..to].to_vec();
                let slot = self.slot(index, generation).expect("checked above");
                shard.stats.borrow_mut().bytes_in(chunk.len());
                let (step, rest) = slot.session.handle_input(&shard, slot.fd, &chunk);
                self.after_step(index, step, rest);
                any = true;
            }
            let drained = self
                .paused_input
                .get(&index)
                .is_none_or(|p| p.generation != generation || p.fed == p.bytes.len());
            let Some(slot) = self.slot(index, generation) else {
                continue;
            };
            if !drained || slot.closing || slot.session.outbox.input_paused() {
                // Later turns go on (or the slot closes, or waits for the next commit).
                i += 1;
                continue;
            }
            slot.input_paused = false;
            self.paused_slots.swap_remove(i);
            any = true;
            let end = self.paused_input.remove(&index).is_some_and(|p| p.end);
            if end {
                self.begin_close(index);
            } else {
                self.arm_recv(index, generation);
            }
            self.progress(index, generation);
        }
        any
    }

    fn input(&mut self, index: u32, generation: u32, input: Input) {
        let shard = self.shard.clone();
        let Some(e) = self.entries.get_mut(index as usize) else {
            return;
        };
        let slot = match e.slot.as_deref_mut() {
            Some(s) if e.generation & GENERATION_MASK == generation => s,
            _ => {
                if let Input::Data { bid, .. } = input {
                    self.bufs.release(bid);
                }
                return;
            }
        };
        if (slot.input_paused || slot.session.outbox.input_paused())
            && !slot.closing
            && slot.handoff.is_none()
        {
            // Kept, in order, for when the commit releases what waits for this connection; its
            // recv stops meanwhile, so the peer's further bytes wait in the socket.
            let first = !slot.input_paused;
            slot.input_paused = true;
            let stash = self.paused_input.entry(index).or_insert(PausedInput {
                generation,
                bytes: Vec::new(),
                fed: 0,
                end: false,
            });
            match input {
                Input::Data { bid, offset, len } => {
                    stash
                        .bytes
                        .extend_from_slice(self.bufs.get(bid, offset, len));
                    self.bufs.release(bid);
                }
                Input::End => stash.end = true,
            }
            let cancel = slot.recv_armed && !slot.recv_cancelled;
            slot.recv_cancelled |= cancel;
            if first {
                self.paused_slots.push((index, generation));
            }
            if cancel {
                self.cancel(user_data(OP_RECV, index, generation));
            }
            return;
        }
        let (bid, offset, len) = match input {
            Input::Data { bid, offset, len } => (bid, offset, len),
            Input::End => {
                if slot.handoff.is_none() {
                    self.begin_close(index);
                }
                return;
            }
        };
        if slot.closing {
            self.bufs.release(bid);
            return;
        }
        let data = self.bufs.get(bid, offset, len);
        if let Some(h) = slot.handoff.as_mut() {
            h.1.extend_from_slice(data);
            self.bufs.release(bid);
            return;
        }
        shard.stats.borrow_mut().bytes_in(data.len());
        let (step, rest) = slot.session.handle_input(&shard, slot.fd, data);
        self.bufs.release(bid);
        self.after_step(index, step, rest);
    }

    /// Writes what the machine produced and carries out its step.
    fn after_step(&mut self, index: u32, mut step: Step, unread: Vec<u8>) {
        let shard = self.shard.clone();
        let Some(slot) = self.entries[index as usize].slot.as_deref_mut() else {
            return;
        };
        slot.session.report_phase(&shard);
        if step == Step::Continue
            && slot.session.outbox.len() > 0
            && slot.session.outbox.close_requested().is_none()
            && slot.takes_output()
        {
            // What the router queued for this connection while its input was handled (its own
            // presence coming back after a login, an IQ answered at once) goes out in the same
            // send; the wake-up it caused then finds the queue empty.
            let mut drained = std::mem::take(&mut self.drained);
            step = slot.session.handle_outbox(&shard, &mut drained);
            self.drained = drained;
        }
        if matches!(step, Step::Close) {
            slot.session.seal_close_notify();
            slot.last_sends = true;
        }
        // After authentication the output waits for what the home shard adds (see
        // `Handoff::out`; at home, the recursion below), so a login costs one send fewer.
        let authenticated = matches!(step, Step::Authenticated { .. });
        if !authenticated && !self.flush(index) {
            self.begin_close(index);
            return;
        }
        let slot = self.entries[index as usize]
            .slot
            .as_deref_mut()
            .expect("flush keeps the slot");
        match step {
            Step::Continue => {}
            Step::Close => self.begin_close(index),
            Step::StartTls => {
                if !slot.session.start_tls(&shard) {
                    self.begin_close(index);
                }
            }
            Step::Authenticated { node } => {
                shard.stats.borrow_mut().auth_succeeded();
                let home = shard.home_of(&node);
                if home == shard.id {
                    // Already home: go on with whatever the client sent after authenticating.
                    let (step, rest) = slot.session.handle_input(&shard, slot.fd, &unread);
                    return self.after_step(index, step, rest);
                }
                slot.handoff = Some(Box::new((home, unread)));
                if slot.recv_armed && !slot.recv_cancelled {
                    slot.recv_cancelled = true;
                    let generation = self.generation(index);
                    self.cancel(user_data(OP_RECV, index, generation));
                }
            }
        }
    }

    /// Moves the session's pending output to the wire: it starts a send, or waits behind the
    /// one in flight. False on a TLS failure (what was queued before it still goes out).
    fn flush(&mut self, index: u32) -> bool {
        let generation = self.generation(index);
        let Some(slot) = self.entries[index as usize].slot.as_deref_mut() else {
            return false;
        };
        let (wire, result) = slot.session.take_wire();
        if !wire.is_empty() {
            if let Some(send) = slot.send.as_mut() {
                send.queued.extend_from_slice(&wire);
                if send.queued.len() >= URING_SEND_BACKLOG_BYTES_MAX
                    && !slot.write_blocked
                    && slot.handoff.is_none()
                {
                    // The peer does not read what it asks for: stop reading from it.
                    slot.write_blocked = true;
                    if slot.recv_armed && !slot.recv_cancelled {
                        slot.recv_cancelled = true;
                        self.cancel(user_data(OP_RECV, index, generation));
                    }
                }
            } else {
                slot.send = Some(Box::new(Sending {
                    bytes: wire,
                    sent: 0,
                    queued: Vec::new(),
                    since: None,
                }));
                self.start_send(index);
            }
        }
        result.is_ok()
    }

    fn start_send(&mut self, index: u32) {
        let generation = self.generation(index);
        let Some(slot) = self.entries[index as usize].slot.as_deref_mut() else {
            return;
        };
        let Some(send) = slot.send.as_ref() else {
            return;
        };
        let rest = &send.bytes[send.sent..];
        // The connection's last bytes (`</stream:stream>`, close_notify) wait in the socket for
        // the FIN (`finish_close`): one segment instead of two. Every path that sets
        // `last_sends` ends in `finish_close` once the send completes or the close grace cancels
        // it, so a held tail never stays: MSG_MORE holds only what is less than a segment, the
        // shutdown there pushes it out, and so does any segment from the peer meanwhile (the
        // kernel pushes on input with the socket's own TCP_NODELAY, not the send's MSG_MORE).
        let flags = if slot.last_sends || slot.closing {
            slot.corked = true;
            libc::MSG_NOSIGNAL | libc::MSG_MORE
        } else {
            libc::MSG_NOSIGNAL
        };
        let entry = opcode::Send::new(Fd(slot.fd), rest.as_ptr(), rest.len() as u32)
            .flags(flags)
            .build()
            .user_data(user_data(OP_SEND, index, generation));
        self.push(entry);
        self.sends_started.push((index, generation));
    }

    /// Watches the sends submitted last turn that are still in flight after this turn's
    /// completions (a send the socket has room for completes at once): each gets a stall timer,
    /// and a peer that takes none of it for `send_timeout_seconds` has its connection closed.
    /// Sends that complete at once arm nothing, so an idle session holds no timer.
    fn watch_sends(&mut self, started: &mut Vec<(u32, u32)>) {
        let timeout = self.shard.send_timeout.get();
        let mut now = None;
        for (index, generation) in started.drain(..) {
            let Some(slot) = self.slot(index, generation) else {
                continue;
            };
            if slot.stall_timer || slot.closing {
                continue;
            }
            let Some(send) = slot.send.as_mut() else {
                continue;
            };
            let at = *now.get_or_insert_with(Instant::now);
            send.since = Some(at);
            slot.stall_timer = true;
            self.timers.push(Reverse((
                at + timeout,
                index,
                generation,
                TimerKind::SendStall,
            )));
        }
        // Reused every turn; bounded by the sends of one turn.
        started.shrink_to(SENDS_WATCHED_CAPACITY_KEPT);
    }

    fn on_send(&mut self, index: u32, generation: u32, result: i32) {
        let shard = self.shard.clone();
        let Some(slot) = self.slot(index, generation) else {
            return;
        };
        if result < 0 {
            // The peer is gone (or the close grace ran out): nothing more can be written.
            slot.send = None;
            self.begin_close(index);
            self.progress(index, generation);
            return;
        }
        shard.stats.borrow_mut().bytes_out(result as usize);
        let Some(send) = slot.send.as_mut() else {
            return;
        };
        send.sent += result as usize;
        if slot.stall_timer && result > 0 {
            send.since = Some(Instant::now());
        }
        if send.sent < send.bytes.len() {
            self.start_send(index);
            return;
        }
        if !send.queued.is_empty() {
            send.bytes = std::mem::take(&mut send.queued);
            send.sent = 0;
            self.start_send(index);
            return;
        }
        // Done: an idle connection holds no send buffer.
        slot.send = None;
        if slot.write_blocked {
            slot.write_blocked = false;
            if !slot.recv_armed && !slot.closing && slot.handoff.is_none() {
                self.arm_recv(index, generation);
            }
        }
        self.progress(index, generation);
    }

    /// After an operation of slot `index` completed: finishes a close or a handoff that waited
    /// for it, or lets the slot take more from its send queue.
    fn progress(&mut self, index: u32, generation: u32) {
        let Some(slot) = self.slot(index, generation) else {
            return;
        };
        let idle_ops = !slot.recv_armed && slot.send.is_none();
        if slot.closing {
            if idle_ops {
                self.finish_close(index);
            }
            return;
        }
        if slot.handoff.is_some() {
            if idle_ops {
                self.finish_handoff(index);
            }
            return;
        }
        self.park(index);
    }

    /// Registers the slot's waker with its send queue (a wake-up there puts it on the ready list)
    /// and its deadline with the timer heap; a queue with work already goes on the list now.
    fn park(&mut self, index: u32) {
        let generation = self.generation(index);
        let Some(slot) = self.entries[index as usize].slot.as_deref_mut() else {
            return;
        };
        let outbox = &slot.session.outbox;
        outbox.set_waker(slot_waker(index));
        if slot.takes_output() && outbox.has_work(slot.session.bound) {
            READY.with(|r| r.borrow_mut().push(index));
        }
        // The machine's deadline is fixed from the start of the stream until it is gone.
        if !slot.deadline_scheduled {
            if let Some(at) = slot.session.machine.deadline() {
                slot.deadline_scheduled = true;
                self.timers
                    .push(Reverse((at, index, generation, TimerKind::Deadline)));
            }
        }
    }

    /// Serves the slots whose send queue woke them. True when any did.
    fn run_ready(&mut self) -> bool {
        let ready = READY.with(|r| std::mem::take(&mut *r.borrow_mut()));
        let any = !ready.is_empty();
        let shard = self.shard.clone();
        for index in ready {
            let generation = match self.entries.get(index as usize) {
                Some(e) if e.slot.is_some() => e.generation & GENERATION_MASK,
                _ => continue,
            };
            let slot = self.entries[index as usize]
                .slot
                .as_deref_mut()
                .expect("checked above");
            if slot.closing || slot.handoff.is_some() {
                continue;
            }
            if !slot.takes_output() && slot.session.outbox.close_requested().is_none() {
                // Enough waits behind the send in flight: the queue waits for it (and past its
                // bound the recipient is closed as a slow reader).
                slot.session.outbox.set_waker(slot_waker(index));
                continue;
            }
            let mut drained = std::mem::take(&mut self.drained);
            let step = slot.session.handle_outbox(&shard, &mut drained);
            self.drained = drained;
            self.after_step(index, step, Vec::new());
            self.progress(index, generation);
        }
        any
    }

    /// Fires the timers that are due. True when any did.
    fn run_timers(&mut self, now: Instant) -> bool {
        let mut any = false;
        let send_timeout = self.shard.send_timeout.get();
        while let Some(Reverse((at, index, generation, kind))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(slot) = self.slot(index, generation) else {
                continue;
            };
            any = true;
            match kind {
                TimerKind::Deadline => {
                    if slot.closing || slot.handoff.is_some() {
                        continue;
                    }
                    if slot.session.machine.deadline().is_none_or(|d| d > now) {
                        continue;
                    }
                    slot.deadline_scheduled = false;
                    let step = slot.session.machine.handle_tick(&mut slot.session.out, now);
                    self.after_step(index, step, Vec::new());
                    self.progress(index, generation);
                }
                TimerKind::Grace => {
                    if slot.send.is_some() {
                        // The peer did not take its last bytes in time: give up on them.
                        self.cancel(user_data(OP_SEND, index, generation));
                    }
                }
                TimerKind::SendStall => {
                    slot.stall_timer = false;
                    if slot.closing {
                        continue;
                    }
                    let Some(send) = slot.send.as_mut() else {
                        continue;
                    };
                    match send.since {
                        Some(since) if now.saturating_duration_since(since) >= send_timeout => {
                            // The peer took nothing for the whole timeout: it stopped reading.
                            self.shard.stats.borrow_mut().send_timeouts += 1;
                            tracing::debug!(
                                shard = self.shard.id,
                                "closing a connection whose peer stopped reading"
                            );
                            self.cancel(user_data(OP_SEND, index, generation));
                            self.begin_close(index);
                        }
                        since => {
                            // Progress, or a later send (`None`): watch on from its last progress.
                            let since = *send.since.insert(since.unwrap_or(now));
                            slot.stall_timer = true;
                            self.timers.push(Reverse((
                                since + send_timeout,
                                index,
                                generation,
                                TimerKind::SendStall,
                            )));
                        }
                    }
                }
            }
        }
        any
    }

    fn cancel(&mut self, target: u64) {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data(OP_CANCEL, 0, 0));
        self.push(entry);
    }

    /// Arms `index`'s multishot recv unless it is armed already or may not read now; true when
    /// armed.
    fn arm_recv(&mut self, index: u32, generation: u32) -> bool {
        let Some(slot) = self.slot(index, generation) else {
            return false;
        };
        if slot.recv_armed
            || slot.closing
            || slot.write_blocked
            || slot.input_paused
            || slot.handoff.is_some()
        {
            return false;
        }
        slot.recv_armed = true;
        let entry = opcode::RecvMulti::new(Fd(slot.fd), BUFFER_GROUP)
            .build()
            .user_data(user_data(OP_RECV, index, generation));
        self.push(entry);
        true
    }

    /// Re-arms the recvs that ran out of buffers, one per buffer back in the ring. A starved
    /// connection has input queued, so its recv takes a buffer as soon as it is submitted: arming
    /// more of them than there are free buffers only has the rest run out again at once, each
    /// costing a submission and a completion (all of them re-armed whenever one buffer was free
    /// made a storm of 5,000 logins on 256 buffers run out ~16 times per login).
    fn rearm_starved(&mut self) {
        let mut free = usize::from(self.bufs.count).saturating_sub(self.bufs.out);
        while free > 0 {
            let Some((index, generation)) = self.starved.pop_front() else {
                break;
            };
            if self.arm_recv(index, generation) {
                free -= 1;
            }
        }
    }

    fn begin_close(&mut self, index: u32) {
        let generation = self.generation(index);
        let Some(slot) = self.entries[index as usize].slot.as_deref_mut() else {
            return;
        };
        if !slot.closing {
            slot.closing = true;
            slot.session.outbox.clear_waker();
        }
        if slot.recv_armed && !slot.recv_cancelled {
            slot.recv_cancelled = true;
            self.cancel(user_data(OP_RECV, index, generation));
        }
        let slot = self.entries[index as usize]
            .slot
            .as_deref_mut()
            .expect("still there");
        if slot.send.is_some() && !slot.grace_armed {
            slot.grace_armed = true;
            let at = Instant::now() + Duration::from_millis(CLOSE_WRITE_GRACE_MILLISECONDS);
            self.timers
                .push(Reverse((at, index, generation, TimerKind::Grace)));
        }
    }

    fn release(&mut self, index: u32) -> Box<Slot> {
        let e = &mut self.entries[index as usize];
        e.generation = e.generation.wrapping_add(1);
        let slot = e.slot.take().expect("a slot in use");
        self.free.push(index);
        self.paused_input.remove(&index);
        self.sweep_timers();
        slot
    }

    /// Drops the timers of released slots once they are most of the heap. They are otherwise
    /// skipped when due, so after a storm closes the heap would keep one entry per closed
    /// session until its deadline passed, and its capacity for good. Each slot has at most a
    /// deadline, a grace and a send-stall timer live; the sweep is O(heap) after at least as
    /// many releases (amortised O(1)).
    fn sweep_timers(&mut self) {
        let live_slots = self.entries.len() - self.free.len();
        let heap = self.timers.len();
        if heap < shared::table::TABLE_SHRINK_CAPACITY_MIN_ENTRIES
            || heap <= shared::table::TABLE_SPARSE_FACTOR * 3 * live_slots
        {
            return;
        }
        let entries = &self.entries;
        self.timers.retain(|Reverse((_, index, generation, _))| {
            entries
                .get(*index as usize)
                .is_some_and(|e| e.slot.is_some() && e.generation & GENERATION_MASK == *generation)
        });
        self.timers.shrink_to(self.timers.len() * 2);
    }

    /// No operation of the slot is in flight any more: close the socket (in the ring, with the
    /// turn's other submissions) and end the session.
    fn finish_close(&mut self, index: u32) {
        let mut slot = self.release(index);
        self.close_socket(slot.fd, slot.corked);
        slot.session.cleanup(&self.shard);
    }

    /// Closes `fd` through the ring. A socket whose last sends were held with `MSG_MORE` is shut
    /// down for writing first: that sends the held bytes with the FIN in one segment, and unlike
    /// a bare close it cannot lose them (a close with unread input resets the connection and
    /// drops what was never sent; after the shutdown they are on the wire). The shutdown is a
    /// direct `shutdown(2)`, not `IORING_OP_SHUTDOWN`: the kernel always hands that one to an
    /// io-wq worker thread (a wake-up and a context switch per close; ~3% of the gateway's
    /// cycles in a login storm when it was used), where the syscall queues the FIN in place. A
    /// failure (the peer already reset: ENOTCONN) changes nothing: the close follows regardless.
    fn close_socket(&mut self, fd: RawFd, corked: bool) {
        if corked {
            // SAFETY: `fd` is this slot's open socket, closed just below and by nothing else.
            unsafe { libc::shutdown(fd, libc::SHUT_WR) };
        }
        let close = opcode::Close::new(Fd(fd))
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data(OP_CLOSE, 0, 0));
        self.push(close);
    }

    /// No operation of the slot is in flight any more: send it to its home shard.
    fn finish_handoff(&mut self, index: u32) {
        let mut slot = self.release(index);
        let (home, unread) = *slot.handoff.take().expect("handing off");
        slot.session.outbox.clear_waker();
        let socket = sys::socket_from_fd(slot.fd);
        let handoff = slot.session.hand_off(&self.shard, socket, unread);
        let tx = self.shard.handoff_to[home].clone();
        match tx.try_send(handoff) {
            Ok(()) => {}
            Err(flume::TrySendError::Full(handoff)) => {
                glommio::spawn_local(async move {
                    if tx.send_async(handoff).await.is_err() {
                        tracing::debug!(home, "handoff target stopped");
                    }
                })
                .detach();
            }
            Err(flume::TrySendError::Disconnected(_)) => {
                tracing::debug!(home, "handoff target stopped");
            }
        }
    }

    fn insert(&mut self, fd: RawFd, session: Session) -> u32 {
        let slot = Box::new(Slot {
            fd,
            session,
            send: None,
            recv_armed: false,
            recv_cancelled: false,
            write_blocked: false,
            input_paused: false,
            closing: false,
            last_sends: false,
            corked: false,
            grace_armed: false,
            deadline_scheduled: false,
            stall_timer: false,
            handoff: None,
        });
        match self.free.pop() {
            Some(index) => {
                self.entries[index as usize].slot = Some(slot);
                index
            }
            None => {
                self.entries.push(Entry {
                    generation: 0,
                    slot: Some(slot),
                });
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// Starts a connection in a new slot: feeds what it brought (after a handoff), arms its recv.
    fn start(&mut self, fd: RawFd, session: Session, unread: Vec<u8>) {
        let index = self.insert(fd, session);
        let generation = self.generation(index);
        let shard = self.shard.clone();
        let slot = self.entries[index as usize]
            .slot
            .as_deref_mut()
            .expect("just inserted");
        let (step, rest) = slot.session.handle_input(&shard, slot.fd, &unread);
        self.after_step(index, step, rest);
        self.arm_recv(index, generation);
        self.progress(index, generation);
    }

    fn adopt(&mut self, h: Handoff) {
        self.shard.stats.borrow_mut().handoffs_in += 1;
        let fd = h.socket.into_raw_fd();
        let mut session =
            Session::register(&self.shard, self.shard.next_conn_id(), h.tls, h.machine);
        session.out = h.out;
        self.start(fd, session, h.unread);
    }

    fn on_accept(&mut self, listener: usize, result: i32) {
        let Some(l) = self.listeners.get_mut(listener) else {
            return;
        };
        l.in_flight = l.in_flight.saturating_sub(1);
        if l.in_flight == 0 {
            l.cancelling = false;
        }
        if result < 0 {
            if result != -libc::ECANCELED {
                tracing::warn!(
                    shard = self.shard.id,
                    error = %std::io::Error::from_raw_os_error(-result),
                    "accept failed"
                );
                l.retry_at = Some(Instant::now() + ACCEPT_RETRY);
            }
            return;
        }
        let kind = l.kind;
        let fd = result;
        self.shard.stats.borrow_mut().accepted += 1;
        match Session::accepted(&self.shard, kind) {
            Some(session) => self.start(fd, session, Vec::new()),
            // SAFETY: the descriptor the accept gave us, used by nothing else.
            None => unsafe {
                libc::close(fd);
            },
        }
    }

    /// Cancels every accept of listener `i` in flight.
    fn cancel_accepts(&mut self, i: usize) {
        let l = &mut self.listeners[i];
        if l.in_flight == 0 || l.cancelling {
            return;
        }
        l.cancelling = true;
        let entry = opcode::AsyncCancel2::new(
            types::CancelBuilder::user_data(user_data(OP_ACCEPT, i as u32, 0)).all(),
        )
        .build()
        .user_data(user_data(OP_CANCEL, 0, 0));
        self.push(entry);
    }

    /// Keeps accepts in flight on the listeners while admission allows: never more than the
    /// sessions the shard may still take (`max_sessions_per_shard`), and one at a time under an
    /// accept rate (`accepts_per_second_per_shard`, checked before each). While admission says
    /// no, the kernel's listen queue holds the rest and the driver looks again shortly. A knob
    /// lowered below what is in flight, or the shard stopping, cancels them.
    fn manage_accepts(&mut self) {
        let stopping = self.shard.stopping.is_open();
        let (max, rate) = {
            let knobs = self.shard.knobs.borrow();
            (
                usize::try_from(knobs.max_sessions_per_shard).unwrap_or(usize::MAX),
                knobs.accepts_per_second_per_shard,
            )
        };
        let open = self.shard.open_connections.get();
        let in_flight: usize = self.listeners.iter().map(|l| l.in_flight).sum();
        // Each listener may keep one accept whenever the shard is below its bound (so one
        // listener cannot hold the last free session away from the other, at the cost of going
        // one over, as the task engine's accept loops do); more only within the room left.
        let excess = open + in_flight > max && in_flight > self.listeners.len();
        if stopping || excess {
            for i in 0..self.listeners.len() {
                self.cancel_accepts(i);
            }
            if stopping {
                for l in &mut self.listeners {
                    l.retry_at = None;
                }
                return;
            }
        }
        let mut room = max.saturating_sub(open + in_flight);
        let per_listener = if rate > 0 {
            1
        } else {
            URING_ACCEPTS_IN_FLIGHT_MAX
        };
        let now = Instant::now();
        for i in 0..self.listeners.len() {
            let l = &self.listeners[i];
            if l.cancelling || l.retry_at.is_some_and(|at| at > now) {
                continue;
            }
            self.listeners[i].retry_at = None;
            while self.listeners[i].in_flight < per_listener {
                let first = self.listeners[i].in_flight == 0;
                if !(if first { open < max } else { room > 0 }) {
                    if first {
                        // Full: look again shortly (sessions close, knobs change).
                        self.listeners[i].retry_at = Some(now + ADMISSION_RETRY);
                    }
                    break;
                }
                if rate > 0 {
                    if let Some(wait) = self.shard.admission_wait() {
                        self.listeners[i].retry_at = Some(now + wait);
                        break;
                    }
                }
                room = room.saturating_sub(1);
                let l = &mut self.listeners[i];
                l.in_flight += 1;
                let entry =
                    opcode::Accept::new(Fd(l.fd), std::ptr::null_mut(), std::ptr::null_mut())
                        .flags(libc::SOCK_CLOEXEC)
                        .build()
                        .user_data(user_data(OP_ACCEPT, i as u32, 0));
                self.push(entry);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_carries_op_generation_and_slot() {
        let data = user_data(OP_SEND, 123_456, 0x0123_4567);
        // The generation keeps its low 24 bits; a wrapped one still tells slots apart.
        assert_eq!(decode(data), (OP_SEND, 0x0023_4567, 123_456));
        assert_eq!(
            decode(user_data(OP_RECV, u32::MAX, 0)),
            (OP_RECV, 0, u32::MAX)
        );
        assert_ne!(
            user_data(OP_RECV, 7, 1),
            user_data(OP_RECV, 7, 2),
            "a reused slot's completions must differ from the old one's"
        );
    }

    #[test]
    fn an_idle_slot_stays_within_its_budget() {
        // An idle connection costs its slot (and what the session points to); 584 bytes when
        // this was written, most of it the c2s machine.
        let bytes = Driver::slot_bytes();
        assert!(bytes <= 640, "an idle slot is {bytes} bytes");
    }
}
