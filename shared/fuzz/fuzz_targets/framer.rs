//! Arbitrary bytes, split at a fuzz-chosen point: the framer must never panic, must never emit a
//! stanza over its size limit, and every stanza it emits must be usable (UTF-8, valid ranges).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::framer::{Event, Framer};

/// Small, so the fuzzer reaches the size limit often.
const STANZA_BYTES_MAX: usize = 512;

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split) * input.len() / 256;
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    for chunk in [&input[..cut], &input[cut..]] {
        framer.push(chunk);
        loop {
            match framer.next_event() {
                Ok(Some(Event::Stanza(s))) => {
                    assert!(s.bytes.len() <= STANZA_BYTES_MAX);
                    // Accessors slice by the header's ranges and check UTF-8: they must hold.
                    let _ = (
                        s.as_str(),
                        s.name(),
                        s.to(),
                        s.from(),
                        s.id(),
                        s.type_(),
                        s.xmlns(),
                    );
                    let stamped = s.with_from("a@b/c");
                    assert_eq!(stamped.from().as_deref(), Some("a@b/c"));
                    assert_eq!(stamped.id(), s.id());
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) => {
                    // Poisoned: the same error forever.
                    assert_eq!(framer.next_event(), Err(e));
                    return;
                }
            }
        }
    }
});
