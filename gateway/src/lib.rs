//! The gateway: executors, listeners, TLS, c2s connection state machines, admin HTTP, the CLI.
//! All I/O of the product lives in this crate; the protocol machines in `c2s` do none.

pub mod c2s;
