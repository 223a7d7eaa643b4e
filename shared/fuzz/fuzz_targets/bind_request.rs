//! Framed stanzas through `router::build::bind_request` (the c2s reads a plain bind request from
//! the bytes): it must never panic, and whenever it answers, the answer must be what the tree
//! gives (`router::build::bind_request_parsed`).
#![no_main]

#[path = "in_stream.rs"]
mod in_stream;

use libfuzzer_sys::fuzz_target;

const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";

fuzz_target!(|data: &[u8]| {
    in_stream::each_stanza(data, |stanza| {
        if let Some(fast) = router::build::bind_request(stanza, NS_BIND) {
            let tree = router::build::bind_request_parsed(stanza, NS_BIND);
            assert_eq!(Some(fast), tree, "{}", stanza.as_str());
        }
    });
});
