//! Every stanza the framer passes on must be one a standard XML parser reads (rxml, through
//! `router::build::parse`): the framer forwards stanzas as bytes, so one it takes and a strict
//! parser refuses would end the recipient's stream in its client. Stanzas holding a literal
//! carriage return are left out: XML allows one anywhere (§2.11 turns it into a line feed), but
//! rxml refuses one alone in an attribute value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::framer::{Event, Framer};

const STANZA_BYTES_MAX: usize = 4096;
const STREAM_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";

fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    framer.push(STREAM_HEADER);
    framer.push(data);
    // Ends: each event consumes input, and an error poisons the framer.
    while let Ok(Some(event)) = framer.next_event() {
        if let Event::Stanza(stanza) = event {
            // Top-level elements in the stream's prefix (`stream:error`) are never passed on.
            if stanza.as_str().contains('\r') || stanza.name().starts_with("stream:") {
                continue;
            }
            assert!(
                router::build::parse(&stanza).is_some(),
                "the framer passed what rxml refuses: {:?}",
                stanza.as_str()
            );
        }
    }
});
