//! Framed stanzas through `router::build::bind_request` (the c2s reads a plain bind request from
//! the bytes): it must never panic, and whenever it answers, the answer must be what the tree
//! gives (`router::build::parse`, then the `bind` child's `resource` text, empty as none).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::framer::{Event, Framer};

const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const STANZA_BYTES_MAX: usize = 4096;
const STREAM_HEADER: &[u8] = b"<stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";

fuzz_target!(|data: &[u8]| {
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    framer.push(STREAM_HEADER);
    framer.push(data);
    // Ends: each event consumes input, and an error poisons the framer.
    while let Ok(Some(event)) = framer.next_event() {
        let Event::Stanza(stanza) = event else {
            continue;
        };
        let Some(fast) = router::build::bind_request(&stanza, NS_BIND) else {
            continue;
        };
        let tree = router::build::parse(&stanza).and_then(|iq| {
            let bind = iq.get_child("bind", NS_BIND)?;
            let resource = bind.get_child("resource", NS_BIND).map(|r| r.text());
            Some(resource.filter(|r| !r.is_empty()))
        });
        assert_eq!(Some(fast), tree, "{}", stanza.as_str());
    }
});
