//! Protocol model, XMPP framing and serialisation, config types, named limits and stats
//! primitives. This crate does no I/O and uses no runtime, so it can be fuzzed and benched alone.
#![forbid(unsafe_code)]

pub mod address_limit;
pub mod config;
pub mod escape;
pub mod framer;
pub mod limits;
pub mod shard;
pub mod stanza;
pub mod stats;
pub mod table;
