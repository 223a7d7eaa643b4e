//! A stanza as cut from the stream by the framer: its bytes, shared without copying, and a header
//! that locates the few attributes routing needs. The hot path never builds a DOM; cold paths
//! (roster, disco, IQ payloads) parse `bytes` with minidom when they need more.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{BufMut, Bytes, BytesMut};

use crate::escape::{escape, unescape};

/// The top-level element's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Message,
    Presence,
    Iq,
    /// Any other top-level element in the stream's namespace, e.g. `<auth/>`, `<starttls/>`,
    /// `<r/>`; the name is `Stanza::name()`.
    Other,
}

/// Byte ranges into `Stanza::bytes`. Attribute ranges cover the raw (still escaped) value,
/// without quotes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    /// The element's qualified name as written, e.g. `message` or `stream:error`.
    pub name: Range<usize>,
    pub to: Option<Range<usize>>,
    pub from: Option<Range<usize>>,
    pub id: Option<Range<usize>>,
    pub type_: Option<Range<usize>>,
    /// The element's own default-namespace declaration (`xmlns='...'`), if any.
    pub xmlns: Option<Range<usize>>,
    /// The whole `from='...'` attribute including name, `=`, quotes and leading whitespace,
    /// so it can be cut out when the server stamps `from`.
    pub from_attr: Option<Range<usize>>,
    /// Offset of the `>` (or of `/` in `/>`) that ends the start tag.
    pub start_tag_end: usize,
    /// True when the element is empty (`<x/>`).
    pub self_closing: bool,
}

/// One complete top-level element of the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stanza {
    pub kind: Kind,
    pub header: Header,
    /// The element's bytes, UTF-8, from `<` to the final `>`.
    pub bytes: Bytes,
}

impl Stanza {
    pub fn name(&self) -> &str {
        self.slice(&self.header.name)
    }
    pub fn to(&self) -> Option<Cow<'_, str>> {
        self.attr(&self.header.to)
    }
    pub fn from(&self) -> Option<Cow<'_, str>> {
        self.attr(&self.header.from)
    }
    pub fn id(&self) -> Option<Cow<'_, str>> {
        self.attr(&self.header.id)
    }
    pub fn type_(&self) -> Option<Cow<'_, str>> {
        self.attr(&self.header.type_)
    }
    pub fn xmlns(&self) -> Option<Cow<'_, str>> {
        self.attr(&self.header.xmlns)
    }
    /// The bytes as text. The framer only emits valid UTF-8.
    pub fn as_str(&self) -> &str {
        // The framer validated the whole element as UTF-8 before emitting it; a failure here is
        // our bug, not the peer's.
        std::str::from_utf8(&self.bytes).expect("framer emits UTF-8 stanzas")
    }

    /// Returns a copy with `from` set to `from` (replacing any `from` the client wrote), as
    /// RFC 6120 §8.1.2.1 requires of the server. One copy of the bytes; the header is adjusted.
    pub fn with_from(&self, from: &str) -> Stanza {
        self.with_attr_replaced(from)
    }

    fn with_attr_replaced(&self, from: &str) -> Stanza {
        let value = escape(from);
        let insert = format!(" from='{value}'");
        let (cut, cut_len) = match &self.header.from_attr {
            Some(r) => (r.start, r.len()),
            None => (self.header.name.end, 0),
        };
        let mut out = BytesMut::with_capacity(self.bytes.len() + insert.len());
        out.put_slice(&self.bytes[..cut]);
        out.put_slice(insert.as_bytes());
        out.put_slice(&self.bytes[cut + cut_len..]);
        let shift = |p: usize| -> usize {
            if p >= cut + cut_len {
                p + insert.len() - cut_len
            } else {
                p
            }
        };
        let shift_r = |r: &Option<Range<usize>>| r.as_ref().map(|r| shift(r.start)..shift(r.end));
        let value_start = cut + " from='".len();
        let header = Header {
            name: self.header.name.clone(),
            to: shift_r(&self.header.to),
            from: Some(value_start..value_start + value.len()),
            id: shift_r(&self.header.id),
            type_: shift_r(&self.header.type_),
            xmlns: shift_r(&self.header.xmlns),
            from_attr: Some(cut..cut + insert.len()),
            start_tag_end: shift(self.header.start_tag_end),
            self_closing: self.header.self_closing,
        };
        Stanza {
            kind: self.kind,
            header,
            bytes: out.freeze(),
        }
    }

    fn slice(&self, r: &Range<usize>) -> &str {
        &self.as_str()[r.clone()]
    }

    fn attr(&self, r: &Option<Range<usize>>) -> Option<Cow<'_, str>> {
        let raw = self.slice(r.as_ref()?);
        // The framer rejected undefined entities, so unescape cannot fail on framed input; fall
        // back to the raw text rather than panic if it ever does.
        Some(unescape(raw).unwrap_or(Cow::Borrowed(raw)))
    }
}
