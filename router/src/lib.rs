//! Per-shard state that knows no sockets: the user directory and sessions, routing decisions,
//! presence and rosters, the cross-shard mesh frames, and storage of accounts and rosters. It
//! knows JIDs and frames, never sockets, TLS or glommio, and takes time as an argument.
#![forbid(unsafe_code)]

pub mod build;
pub mod credentials;
pub mod errors;
pub mod mesh;
pub mod offline;
pub mod roster;
pub mod roster_store;
pub mod routing;
pub mod store;

pub use errors::error_reply;
pub use mesh::Frame;
pub use roster_store::{MemoryRosterStore, RosterStore};
pub use routing::{Action, BindError, Bound, CommitTicket, Router};
pub use store::{Store, StoreError};

/// A connection's id, unique within its shard for the process's life.
pub type ConnId = u64;
pub use offline::{MemoryOfflineStore, OfflineLimits, OfflineStore};
