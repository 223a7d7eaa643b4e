//! The incremental XMPP stream framer (hand-written: it is the hot path). It takes bytes as they
//! arrive, in chunks split anywhere (mid-tag, mid-UTF-8 sequence), and yields the stream header,
//! each complete top-level stanza with its header located, and the stream's close. It enforces
//! RFC 6120 §11's restricted XML and the size limits; it never builds a DOM.

use crate::stanza::Stanza;

/// The opening `<stream:stream>` tag's attributes (values unescaped).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StreamHeader {
    /// The qualified name as written (`stream:stream` normally).
    pub name: String,
    pub to: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    pub lang: Option<String>,
    /// The default namespace (`xmlns`), expected `jabber:client`.
    pub default_ns: Option<String>,
    /// The namespace bound to the element's prefix (expected `http://etherx.jabber.org/streams`),
    /// or the default namespace when the element has no prefix.
    pub stream_ns: Option<String>,
}

/// What the framer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StreamOpen(StreamHeader),
    Stanza(Stanza),
    /// `</stream:stream>`.
    StreamClose,
}

/// Why the input was refused; each maps to one RFC 6120 §4.9.3 stream error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Not well-formed XML (including bad UTF-8, mismatched tags, bad attribute syntax).
    #[error("not well-formed: {0}")]
    NotWellFormed(&'static str),
    /// Comments, processing instructions, DTDs or undefined entity references (§11.1).
    #[error("restricted XML: {0}")]
    RestrictedXml(&'static str),
    /// A stanza (or the stream header) larger than the limit, or nested deeper than allowed.
    #[error("policy violation: {0}")]
    PolicyViolation(&'static str),
}

impl FrameError {
    /// The RFC 6120 §4.9.3 defined-condition element name for this error.
    pub fn condition(&self) -> &'static str {
        match self {
            FrameError::NotWellFormed(_) => "not-well-formed",
            FrameError::RestrictedXml(_) => "restricted-xml",
            FrameError::PolicyViolation(_) => "policy-violation",
        }
    }
}

/// Incremental framer for one stream. After STARTTLS and after SASL success the stream restarts
/// (RFC 6120 §5.4.3.3, §6.4.6): call `reset`.
#[derive(Debug)]
pub struct Framer {
    stanza_bytes_max: usize,
}

impl Framer {
    pub fn new(stanza_bytes_max: usize) -> Framer {
        Framer { stanza_bytes_max }
    }

    /// Appends received bytes. Cheap; parsing happens in `next_event`.
    pub fn push(&mut self, data: &[u8]) {
        let _ = (data, self.stanza_bytes_max);
        todo!()
    }

    /// The next complete event, `Ok(None)` when more bytes are needed. After an error the framer
    /// is poisoned: the caller sends the stream error and closes.
    pub fn next_event(&mut self) -> Result<Option<Event>, FrameError> {
        todo!()
    }

    /// Forgets all state and buffered bytes: a new stream begins.
    pub fn reset(&mut self) {
        todo!()
    }

    /// Bytes buffered and not yet returned as an event.
    pub fn buffered_bytes(&self) -> usize {
        todo!()
    }
}
