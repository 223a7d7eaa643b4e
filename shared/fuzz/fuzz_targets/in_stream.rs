//! Shared by the targets that look at framed stanzas (`#[path]` module): the stanzas the
//! framer passes from fuzz bytes sent after a client's stream header.

use shared::framer::{Event, Framer};
use shared::stanza::Stanza;

const STANZA_BYTES_MAX: usize = 4096;
const STREAM_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";

/// Calls `f` with each stanza the framer passes from `data`, up to its first error.
pub fn each_stanza(data: &[u8], mut f: impl FnMut(&Stanza)) {
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    framer.push(STREAM_HEADER);
    framer.push(data);
    // Ends: each event consumes input, and an error poisons the framer.
    while let Ok(Some(event)) = framer.next_event() {
        if let Event::Stanza(stanza) = event {
            f(&stanza);
        }
    }
}
