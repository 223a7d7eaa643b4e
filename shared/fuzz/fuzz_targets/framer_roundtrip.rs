//! For any input, the events (and the error, if any) are the same whether it arrives whole or one
//! byte at a time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::framer::{Event, FrameError, Framer};

/// Small, so size-limit errors are part of what must agree.
const STANZA_BYTES_MAX: usize = 512;

fn events<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<Result<Event, FrameError>> {
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    let mut out = Vec::new();
    for chunk in chunks {
        framer.push(chunk);
        loop {
            match framer.next_event() {
                Ok(Some(ev)) => out.push(Ok(ev)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    assert_eq!(events([data]), events(data.chunks(1)));
});
