//! Frames that cross between shards over the mesh: one bounded flume channel per ordered pair of
//! shards, carrying batches (`Vec<Frame>`) so one wake-up moves many frames.

use shared::stanza::Stanza;

use crate::ConnId;

/// One item sent to another shard.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A stanza addressed to a user whose home is the receiving shard; `from` is already stamped
    /// by the sender's home shard.
    Stanza(Stanza),
    /// A message a client sent, addressed to a user whose home is the receiving shard. Once it is
    /// delivered, stored durably or answered with an error, the receiving shard sends `Settled`
    /// back for `origin`, so the sender's XEP-0198 ack may cover it.
    Message { stanza: Stanza, origin: Origin },
    /// Messages of the receiving shard's connections that are now handled: (conn, the stanza's
    /// sequence number on that connection).
    Settled(Vec<(ConnId, u64)>),
}

/// Where a message came from: the sending session's shard, connection and the message's
/// sequence number among the stanzas that connection sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub shard: usize,
    pub conn: ConnId,
    pub seq: u64,
}
