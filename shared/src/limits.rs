//! Every limit the server enforces, as a named constant with its unit in the name. Config keys
//! may override some of them; these are the defaults and the hard ceilings.

/// RFC 6120 §13.12 lets servers cap stanza size; 64 KiB is ejabberd's c2s default too. Past it
/// the stream gets `<policy-violation/>` and is closed.
pub const STANZA_BYTES_MAX: usize = 64 * 1024;

/// The stream header itself (`<stream:stream ...>`) is small; anything longer is abuse.
pub const STREAM_HEADER_BYTES_MAX: usize = 4 * 1024;

/// Deepest element nesting accepted inside one stanza. Real clients stay under 10; the cap
/// bounds the framer's tag stack (each level costs one small `Vec` entry).
pub const STANZA_DEPTH_MAX: usize = 64;

/// Most attributes on one element; bounds the duplicate-attribute check.
pub const ELEMENT_ATTRIBUTES_MAX: usize = 64;

/// Bytes read from a socket per read call.
pub const READ_CHUNK_BYTES: usize = 4 * 1024;

/// Stanzas queued for one session before delivery to it bounces with `resource-constraint`.
/// Each queued stanza is a `Bytes` handle (32 bytes) plus its shared payload.
pub const SESSION_SEND_QUEUE_STANZAS_MAX: usize = 1024;

/// Once a connection's close is ordered (its send queue overflowed, shutdown, conflict), a write
/// blocked on a peer that does not read gets this long before the socket is closed anyway.
pub const CLOSE_WRITE_GRACE_MILLISECONDS: u64 = 2_000;

/// A connection whose peer takes none of the bytes waiting for it for this long is closed
/// (`send_timeout_seconds`): a client that stopped reading would otherwise hold its socket's
/// kernel buffers (megabytes when autotuned) and its session for ever. A XEP-0198 session is
/// detached, its messages kept for resumption or the next login.
pub const SEND_TIMEOUT_SECONDS_DEFAULT: u64 = 60;

/// Largest `send_timeout_seconds`.
pub const SEND_TIMEOUT_SECONDS_MAX: u64 = 3_600;

/// How often a shard looks whether enough connections closed to hand freed memory back to the OS.
pub const MEMORY_RETURN_INTERVAL_MILLISECONDS: u64 = 1_000;

/// Back-off after a failed accept (EMFILE and friends), both I/O engines.
pub const ACCEPT_RETRY_MILLISECONDS: u64 = 50;

/// How often a shard at its session bound looks again for room to accept.
pub const ADMISSION_RETRY_MILLISECONDS: u64 = 10;

/// Connections a shard must have lost since its last return of freed memory before it does it
/// again (the allocator keeps freed pages per thread until asked; a storm of closes frees many).
pub const MEMORY_RETURN_CLOSED_CONNECTIONS_MIN: usize = 256;

/// Batches queued on one cross-shard channel (one channel per ordered pair of shards). A full
/// channel is backpressure: the sending shard stops reading from its connections.
pub const MESH_CHANNEL_BATCHES_MAX: usize = 1024;

/// Frames in one cross-shard batch; a shard flushes a batch at this size or at the end of a
/// turn of its event loop, whichever comes first.
pub const MESH_BATCH_FRAMES_MAX: usize = 256;

/// Connections handed to one shard and not yet picked up.
pub const HANDOFF_CHANNEL_CONNECTIONS_MAX: usize = 4096;

/// Resources (sessions) one account may have open at once.
pub const USER_SESSIONS_MAX: usize = 16;

/// Items in one roster.
pub const ROSTER_ITEMS_MAX: usize = 5_000;

/// Rosters a shard's router keeps in memory, of users with sessions on the shard. Rosters are
/// read through from the store on first need (a login's presence broadcast, probes, roster gets)
/// and written through on every change; past this many the cache is emptied and refills, so an
/// idle session holds no roster. Memory: up to this many rosters per shard, ~110 B per item
/// (1,024 rosters of 100 contacts: ~11 MiB).
pub const ROSTER_CACHE_USERS_MAX: usize = 1_024;

/// Failed SASL attempts on one connection before it is closed.
pub const AUTH_ATTEMPTS_MAX: u32 = 3;

/// XEP-0509 config-version mismatches (a pipelined `<authenticate/>` built on stale features)
/// one connection may have before it is closed with `policy-violation`. They are rejected
/// "without prejudice", so they do not count toward `AUTH_ATTEMPTS_MAX`; a client that follows
/// the XEP has one at most (the features it gets with the rejection carry the current value).
pub const IAP_MISMATCHES_MAX: u8 = 8;

/// Stanzas (message, presence, iq) a client pipelined behind an `<authenticate/>` that was
/// rejected for a XEP-0509 config-version mismatch, which the server discards instead of
/// closing the stream with `not-authorized`, so that the client can retry on the same stream as
/// XEP-0509 intends. The rejection's `<text/>` says they were discarded; one more before the next
/// SASL element is the RFC 6120 `not-authorized` stream error as before.
pub const IAP_PIPELINED_STANZAS_DISCARDED_MAX: u8 = 8;

/// Longest local part (RFC 7622 §3.3.1: 1023 bytes); resource likewise.
pub const JID_PART_BYTES_MAX: usize = 1023;

/// Longest XEP-0386 `<tag/>` (or XEP-0388 user-agent id) kept in a generated resource; a longer
/// one is left out. The resource (tag, `/`, 16 hex digits) stays far within
/// `JID_PART_BYTES_MAX`, and the request's strings are dropped after the bind.
pub const BIND2_TAG_BYTES_MAX: usize = 64;
const _: () = assert!(BIND2_TAG_BYTES_MAX + 17 <= JID_PART_BYTES_MAX);

/// Default SCRAM iteration count for stored credentials (RFC 7677 recommends at least 4096).
pub const SCRAM_ITERATIONS_DEFAULT: u32 = 4096;
/// Device keys one account may hold (`gateway user add-device-key`); each is 32 bytes of stored
/// hash and one constant-time comparison per SASL PLAIN login.
pub const DEVICE_KEYS_PER_ACCOUNT_MAX: usize = 16;

/// Seconds an unauthenticated connection may take to finish SASL and bind.
pub const UNAUTHENTICATED_TIMEOUT_SECONDS_DEFAULT: u64 = 30;

/// Seconds a graceful shutdown may take before remaining connections are dropped.
pub const SHUTDOWN_TIMEOUT_SECONDS_DEFAULT: u64 = 5;

/// Connections one gateway process accepts in total (all shards); past it, accepts pause.
pub const MAX_CONNECTIONS_DEFAULT: usize = 1_000_000;

/// Messages one user's offline queue may hold (XEP-0160) before senders get
/// `resource-constraint`. Config key `offline_messages_max`.
pub const OFFLINE_MESSAGES_MAX_DEFAULT: usize = 10_000;

/// Bytes of stanzas one user's offline queue may hold. Config key `offline_bytes_max`.
pub const OFFLINE_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;

/// Days an offline message is kept; older ones are purged (and counted) instead of delivered.
/// Config key `offline_age_days_max`.
pub const OFFLINE_AGE_DAYS_MAX_DEFAULT: u64 = 30;

/// Offline messages loaded and queued for a session at once during delivery at login; the next
/// page follows when the session's send queue has drained. Must fit the send queue.
pub const OFFLINE_DRAIN_PAGE_MESSAGES: usize = 256;

/// Users whose offline-queue usage (messages, bytes, next sequence number) a shard's router keeps
/// in memory. Past it, entries of users with no session and no write pending or in flight are
/// evicted and reloaded from the store on next need (a user's sessions are what could still
/// acknowledge old sequence numbers, so a user with sessions is never evicted).
pub const OFFLINE_USAGE_CACHE_USERS_MAX: usize = 65_536;

/// Actions a shard's router holds behind roster changes not yet committed (their answers,
/// pushes, and later stanzas for the same connections) before the shard stops reading
/// connections' input until a commit releases them: bounds them while the disk is slow.
pub const ROUTER_HELD_ACTIONS_MAX: usize = 16_384;

/// The same for the actions held for one connection. Released together when the commit is
/// done, they go into its send queue at once: a quarter of it (`SESSION_SEND_QUEUE_STANZAS_MAX`)
/// leaves room for what is already queued, so a client that reads is never closed as a slow
/// reader for what it pipelined behind a roster change. Reached only when others' stanzas fill
/// it (that connection's own reads pause much earlier,
/// `ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE`).
pub const ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX: usize = SESSION_SEND_QUEUE_STANZAS_MAX / 4;

/// Actions held for one connection behind an uncommitted roster change at which that
/// connection's own reads pause until a commit releases them; nobody else's do. Low enough that
/// what it sent before the pause took hold (up to one read, `READ_CHUNK_BYTES`, of ~60-byte
/// stanzas, ~70 answers) stays under `ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX`.
pub const ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE: usize = SESSION_SEND_QUEUE_STANZAS_MAX / 16;

/// Store writes (offline-queue inserts and erasures) pending while a commit is in flight before
/// the shard stops reading connections' input until that commit is done: bounds the next batch
/// while the disk is slow (four inline batches, `STORE_BATCH_WRITES_MAX`).
pub const STORE_PENDING_WRITES_MAX: usize = 4 * STORE_BATCH_WRITES_MAX;

/// Offline writes one connection's stanzas may add behind a commit in flight (an inline batch's
/// worth) before that connection's reads pause until the commit is done; nobody else's do. A
/// sender flooding offline users while the disk is slow so stops itself, a quarter of the way to
/// the shard-wide bound (`STORE_PENDING_WRITES_MAX`), which is left for many senders at once.
pub const STORE_PENDING_WRITES_PER_CONNECTION_PAUSE: usize = STORE_BATCH_WRITES_MAX;

/// Store writes (inserts and erasures) collected in one turn before they are committed inline,
/// without waiting for the end of the turn. Bounds the pending batch's memory.
pub const STORE_BATCH_WRITES_MAX: usize = 4096;

/// XEP-0198: stanzas sent to a client and not yet acknowledged by it. Past this the stream is
/// closed (`policy-violation`); unacknowledged messages stay in the offline queue. Each entry is
/// a `Bytes` handle (32 bytes) plus its shared payload.
pub const SM_UNACKED_STANZAS_MAX: usize = 20_000;

/// XEP-0198: the server asks for an ack (`<r/>`) after this many unacknowledged stanzas.
pub const SM_REQUEST_EVERY_STANZAS: usize = 32;

/// Push notifications waiting per shard for the push hook; past it new ones are dropped and
/// counted (the messages themselves are stored; only the nudge is lost). Config key
/// `push_queue_max`. Each entry is a user name and a count (~64 bytes).
pub const PUSH_QUEUE_NOTIFICATIONS_MAX_DEFAULT: usize = 4096;

/// Attempts per push notification before it is dropped (and counted).
pub const PUSH_ATTEMPTS_MAX: u32 = 5;

/// First retry delay of a failed push, doubled per attempt.
pub const PUSH_RETRY_BASE_MS: u64 = 100;

/// Milliseconds one push request (connect, send, status line) may take.
pub const PUSH_REQUEST_TIMEOUT_MS: u64 = 2_000;

/// XEP-0198: default seconds a session that lost its connection waits to be resumed.
/// Config key `sm_resume_timeout_seconds`.
pub const SM_RESUME_TIMEOUT_SECONDS_DEFAULT: u64 = 300;

const _: () = assert!(OFFLINE_DRAIN_PAGE_MESSAGES < SESSION_SEND_QUEUE_STANZAS_MAX);
const _: () =
    assert!(ROUTER_HELD_ACTIONS_PER_CONNECTION_PAUSE < ROUTER_HELD_ACTIONS_PER_CONNECTION_MAX);
const _: () = assert!(STORE_PENDING_WRITES_PER_CONNECTION_PAUSE < STORE_PENDING_WRITES_MAX);
const _: () =
    assert!(OFFLINE_MESSAGES_MAX_DEFAULT + SESSION_SEND_QUEUE_STANZAS_MAX < SM_UNACKED_STANZAS_MAX);
const _: () = assert!(STREAM_HEADER_BYTES_MAX < STANZA_BYTES_MAX);
const _: () = assert!(MESH_BATCH_FRAMES_MAX > 0);
const _: () = assert!(STANZA_DEPTH_MAX >= 8);

/// How often each shard folds its counters into the decaying rates and checks its alerts.
pub const STATS_TICK_MILLISECONDS: u64 = 1_000;

/// While an alert stays raised, its warning is logged again at most this often.
pub const ALERT_REPEAT_LOG_SECONDS: u64 = 10;

/// Default alert threshold on one cross-shard channel's depth, in batches (half its capacity).
pub const ALERT_MESH_QUEUE_BATCHES_DEFAULT: u64 = MESH_CHANNEL_BATCHES_MAX as u64 / 2;

/// Default alert threshold on the deepest session send queue of a shard, in stanzas (half the
/// bound at which delivery bounces).
pub const ALERT_SEND_QUEUE_STANZAS_DEFAULT: u64 = SESSION_SEND_QUEUE_STANZAS_MAX as u64 / 2;

/// Default alert threshold on the messages held in one shard's offline queues.
pub const ALERT_OFFLINE_MESSAGES_DEFAULT: u64 = 1_000_000;

/// Requests (snapshots, knob changes) queued for one shard from the admin port.
pub const ADMIN_CHANNEL_REQUESTS_MAX: usize = 16;

/// Largest admin request body (a knob change), in bytes.
pub const ADMIN_REQUEST_BODY_BYTES_MAX: usize = 4 * 1024;

/// Knob changes remembered for `/stats` (the oldest is forgotten first).
pub const KNOB_CHANGES_KEPT: usize = 32;

/// `huge_pages = "thp"`: virtual size of the arena handed to the allocator with
/// `madvise(MADV_HUGEPAGE)`, in bytes; only the pages touched are backed by memory.
pub const HUGE_PAGES_THP_ARENA_BYTES: usize = 1 << 30;

/// `huge_pages = "reserved"`: most of the host's free reserved 2 MiB pages the gateway maps, in
/// pages (1 GiB).
pub const HUGE_PAGES_RESERVED_PAGES_MAX: usize = 512;

/// Size of one reserved (hugetlb) page the gateway maps, in bytes.
pub const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Provided receive buffers per shard for the io_uring engine (a power of two, at most 32768):
/// connections share them; an idle connection holds none. Config key `uring_recv_buffers`.
pub const URING_RECV_BUFFERS_DEFAULT: u32 = 256;

/// Most entries the kernel takes in one provided-buffer ring (`uring_recv_buffers` at most).
pub const URING_RECV_BUFFERS_MAX: u32 = 32_768;

/// Bytes of each provided receive buffer of the io_uring engine. Config key
/// `uring_recv_buffer_bytes`.
pub const URING_RECV_BUFFER_BYTES_DEFAULT: usize = 4 * 1024;

/// Range of `uring_recv_buffer_bytes`: below, a stanza takes too many completions; above, idle
/// shards hold large buffers for nothing.
pub const URING_RECV_BUFFER_BYTES_MIN: usize = 256;
pub const URING_RECV_BUFFER_BYTES_MAX: usize = 64 * 1024;

/// Submission queue entries of each shard's io_uring (the completion queue has
/// `URING_CQ_PER_SQ_ENTRIES` times as many; the kernel keeps overflow beyond that).
pub const URING_SQ_ENTRIES: u32 = 1024;

/// Completion queue entries per submission queue entry of the io_uring engine's ring.
pub const URING_CQ_PER_SQ_ENTRIES: u32 = 8;

/// Bytes a connection may have waiting behind its in-flight send before the io_uring engine
/// stops reading from it (a peer that writes but does not read cannot grow this without bound).
pub const URING_SEND_BACKLOG_BYTES_MAX: usize = 256 * 1024;

/// Connection slots the io_uring engine reserves address space for at start (at most; fewer
/// when `max_sessions_per_shard` is lower). Untouched, they cost no memory; past it the slab
/// grows.
pub const URING_SLOTS_RESERVED_MAX: usize = 1 << 20;

/// Completions the io_uring engine handles per turn before it serves the send queues that woke
/// and lets the shard's other tasks run (64 x 4 KiB of input: a fast sender cannot fill its
/// recipients' send queues before their writers run, as with the task engine's 256 KiB).
pub const URING_COMPLETIONS_PER_TURN: usize = 64;

/// Accepts the io_uring engine keeps in flight per listener per shard (fewer near
/// `max_sessions_per_shard`; one at a time under `accepts_per_second_per_shard`).
pub const URING_ACCEPTS_IN_FLIGHT_MAX: usize = 32;

/// Page cache of each shard's database (redb), in bytes, by default. redb's own default is 1 GiB
/// per database, and a shard's cache fills with every page its logins and queues touch: on a host
/// with millions of users and dozens of shards, resident memory would grow by gigabytes that
/// look like a leak. A cache miss is a `pread` the OS page cache usually answers. Config key
/// `store_cache_bytes`.
pub const STORE_CACHE_BYTES_DEFAULT: usize = 64 * 1024 * 1024;

/// Smallest `store_cache_bytes` accepted (redb keeps a tenth of it for writes).
pub const STORE_CACHE_BYTES_MIN: usize = 1024 * 1024;

/// Largest `store_cache_bytes` accepted: redb's own default.
pub const STORE_CACHE_BYTES_MAX: usize = 1024 * 1024 * 1024;

/// Failed logins one client address may make per window before its logins are refused with
/// `temporary-auth-failure` without checking a password (per shard; `0` turns the limit off).
pub const AUTH_FAILURES_PER_ADDRESS_DEFAULT: u32 = 30;
/// The window of `AUTH_FAILURES_PER_ADDRESS_DEFAULT`, in seconds.
pub const AUTH_FAILURE_WINDOW_SECONDS_DEFAULT: u64 = 60;
/// Longest configurable failure window: a day.
pub const AUTH_FAILURE_WINDOW_SECONDS_MAX: u64 = 86_400;
/// Client addresses each shard tracks failures of. Past it, expired entries are swept; if none
/// has expired, a new address is not tracked (the limit fails open rather than grow).
pub const AUTH_FAILURE_ADDRESSES_MAX: usize = 65_536;
