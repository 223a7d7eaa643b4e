//! The gateway: executors, listeners, TLS, c2s connection state machines, admin HTTP, the CLI.
//! All I/O of the product lives in this crate; the protocol machine in `c2s` does none.

pub mod admin;
pub mod admin_client;
pub mod c2s;
mod conn;
pub mod knobs;
pub mod logging;
mod push;
pub mod record;
pub mod sar;
pub mod server;
mod shard;
pub mod stats;
mod storage;
mod sys;
pub mod tls;
pub mod top;
mod uring;
