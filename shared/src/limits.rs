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

/// How often a shard looks whether enough connections closed to hand freed memory back to the OS.
pub const MEMORY_RETURN_INTERVAL_MILLISECONDS: u64 = 1_000;

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

/// Failed SASL attempts on one connection before it is closed.
pub const AUTH_ATTEMPTS_MAX: u32 = 3;

/// Longest local part (RFC 7622 §3.3.1: 1023 bytes); resource likewise.
pub const JID_PART_BYTES_MAX: usize = 1023;

/// Default SCRAM iteration count for stored credentials (RFC 7677 recommends at least 4096).
pub const SCRAM_ITERATIONS_DEFAULT: u32 = 4096;

/// Seconds an unauthenticated connection may take to finish SASL and bind.
pub const UNAUTHENTICATED_TIMEOUT_SECONDS_DEFAULT: u64 = 30;

/// Seconds a graceful shutdown may take before remaining connections are dropped.
pub const SHUTDOWN_TIMEOUT_SECONDS_DEFAULT: u64 = 5;

/// Connections one gateway process accepts in total (all shards); past it, accepts pause.
pub const MAX_CONNECTIONS_DEFAULT: usize = 1_000_000;

const _: () = assert!(STREAM_HEADER_BYTES_MAX < STANZA_BYTES_MAX);
const _: () = assert!(MESH_BATCH_FRAMES_MAX > 0);
const _: () = assert!(STANZA_DEPTH_MAX >= 8);
