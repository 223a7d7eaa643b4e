//! The gateway: executors, listeners, TLS, c2s connection state machines, admin HTTP, the CLI.
//! All I/O of the product lives in this crate; the protocol machine in `c2s` does none.

mod admin;
pub mod c2s;
mod conn;
mod push;
pub mod server;
mod shard;
mod storage;
mod sys;
pub mod tls;
