//! A new stream pipelined behind a SASL success: after the k-th stanza the framer restarts
//! (`Framer::restart`), and from there it must give exactly the events a fresh framer gives for
//! the bytes it had not yet returned plus the rest of the input. Never panics either way.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::framer::{Event, FrameError, Framer};

/// Small, so size-limit errors are part of what must agree.
const STANZA_BYTES_MAX: usize = 512;

/// Events until the framer wants more input or fails (a failure ends the list).
fn drain(framer: &mut Framer, out: &mut Vec<Result<Event, FrameError>>) -> bool {
    loop {
        match framer.next_event() {
            Ok(Some(e)) => out.push(Ok(e)),
            Ok(None) => return true,
            Err(e) => {
                out.push(Err(e));
                return false;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let [split, restart_after, input @ ..] = data else {
        return;
    };
    let cut = usize::from(*split) * input.len() / 256;
    let restart_after = usize::from(*restart_after % 8);
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    let mut stanzas = 0;
    let mut pushed = 0;
    // Where the restarted stream starts in `input`, once it has.
    let mut restarted_at = None;
    let mut after = Vec::new();
    for chunk in [&input[..cut], &input[cut..]] {
        framer.push(chunk);
        pushed += chunk.len();
        loop {
            if restarted_at.is_some() {
                drain(&mut framer, &mut after);
                break;
            }
            match framer.next_event() {
                Ok(Some(Event::Stanza(_))) => {
                    stanzas += 1;
                    if stanzas > restart_after {
                        framer.restart();
                        restarted_at = Some(pushed - framer.buffered_bytes());
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if matches!(after.last(), Some(Err(_))) {
            break;
        }
    }
    let Some(at) = restarted_at else { return };
    let mut fresh = Framer::new(STANZA_BYTES_MAX);
    fresh.push(&input[at..]);
    let mut expected = Vec::new();
    drain(&mut fresh, &mut expected);
    assert_eq!(
        after, expected,
        "restart at byte {at} differs from a fresh framer"
    );
});
