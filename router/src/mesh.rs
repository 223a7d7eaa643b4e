//! Frames that cross between shards over the mesh: one bounded flume channel per ordered pair of
//! shards, carrying batches (`Vec<Frame>`) so one wake-up moves many frames.

use shared::stanza::Stanza;

/// One item sent to another shard.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A stanza addressed to a user whose home is the receiving shard; `from` is already stamped
    /// by the sender's home shard.
    Stanza(Stanza),
}
