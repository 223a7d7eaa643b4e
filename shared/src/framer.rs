//! The incremental XMPP stream framer (hand-written: it is the hot path). It takes bytes as they
//! arrive, in chunks split anywhere (mid-tag, mid-UTF-8 sequence), and yields the stream header,
//! each complete top-level stanza with its header located, and the stream's close. It enforces
//! RFC 6120 §11's restricted XML and the size limits; it never builds a DOM.
//!
//! Design: one byte-level state machine over a `BytesMut`. Every transition depends only on the
//! bytes seen so far, so the events (and errors) are the same however the input is split, and each
//! byte is examined once. The bytes of the unit in progress (the stream header, or one stanza)
//! always start at offset 0 of the buffer: whitespace between stanzas is dropped as it is seen and
//! each finished stanza is cut off with `split_to`, which shares the allocation (no copy).
//! Scanning never looks past the unit's size limit, so a size violation is reported at the same
//! byte no matter how the input was chunked.

use std::ops::Range;

use bytes::{Buf, BytesMut};

use crate::escape::unescape;
use crate::limits::{ELEMENT_ATTRIBUTES_MAX, STANZA_DEPTH_MAX, STREAM_HEADER_BYTES_MAX};
use crate::stanza::{Header, Kind, Stanza};

/// The only `<!` construct restricted XML allows, matched after the `<!`.
const CDATA_OPEN: &[u8] = b"[CDATA[";
/// The XML declaration's target, matched after `<?` at the start of the stream.
const XML_DECL_TARGET: &[u8] = b"xml";

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

use FrameError::{NotWellFormed, PolicyViolation, RestrictedXml};

/// Where the stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Before the stream header has been read (XML declaration, whitespace, the header tag).
    Prolog,
    /// After the header: stanzas.
    Stream,
    /// After `</stream:stream>`: only whitespace may follow.
    Closed,
}

/// The scanner's position within the XML grammar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Character data (inside a stanza) or whitespace (between stanzas, in the prolog).
    Content,
    /// In a reference in character data, after the `&` at `ref_start`.
    ContentRef,
    /// After `<`.
    Lt,
    /// After `<!`, with this many bytes of `[CDATA[` matched.
    Bang(u8),
    /// Inside a CDATA section; how many `]` were just seen (capped at 2).
    Cdata(u8),
    /// After `<?` at the start of the stream, with this many bytes of `xml` matched.
    DeclTarget(u8),
    /// In the XML declaration; whether the previous byte was `?`.
    DeclBody(bool),
    /// In a start tag's name.
    StartName,
    /// In a start tag after its name or an attribute; `ws` when whitespace has been seen since,
    /// which XML requires before another attribute.
    InTag {
        ws: bool,
    },
    /// After the `/` of `/>`.
    EmptyTagEnd,
    AttrName,
    /// After an attribute name, before `=`.
    AttrBeforeEq,
    /// After `=`, before the opening quote.
    AttrAfterEq,
    /// In an attribute value delimited by this quote byte.
    AttrValue(u8),
    /// In a reference in an attribute value delimited by this quote byte.
    AttrRef(u8),
    /// In an end tag's name.
    EndName,
    /// In an end tag after its name, before `>`.
    EndAfterName,
}

/// One attribute of the start tag being scanned; offsets into the buffer.
#[derive(Debug, Clone)]
struct Attr {
    name: Range<usize>,
    /// The raw value, without quotes.
    value: Range<usize>,
    /// Where the whitespace run before the name begins.
    ws_start: usize,
}

/// Incremental framer for one stream. After STARTTLS and after SASL success the stream restarts
/// (RFC 6120 §5.4.3.3, §6.4.6): call `reset`.
#[derive(Debug)]
pub struct Framer {
    stanza_bytes_max: usize,
    buf: BytesMut,
    /// Bytes of `buf` before this have been scanned.
    pos: usize,
    state: State,
    phase: Phase,
    /// Set by the first error; returned from then on.
    poisoned: Option<FrameError>,
    /// Open elements of the stanza in progress (its root first), as name ranges into `buf`.
    stack: Vec<Range<usize>>,
    /// Namespace prefixes declared in the stanza in progress (`xmlns:p`), with the depth of the
    /// element declaring them, as ranges into `buf`; emptied with the stanza.
    prefixes: Vec<(usize, Range<usize>)>,
    /// The stream element's qualified name, to match `</stream:stream>`.
    stream_name: Vec<u8>,
    /// Offset of the `<` of the tag or markup being scanned.
    tag_start: usize,
    /// Start of the name being scanned (element or attribute).
    name_start: usize,
    /// The current tag's name, once complete.
    tag_name: Range<usize>,
    /// The current start tag's attributes; reused across tags so scanning does not allocate.
    attrs: Vec<Attr>,
    attr_name: Range<usize>,
    attr_ws_start: usize,
    value_start: usize,
    /// Offset of the `&` of the reference being scanned.
    ref_start: usize,
    /// The header of the stanza in progress, filled when its start tag ends.
    header: Header,
}

impl Framer {
    pub fn new(stanza_bytes_max: usize) -> Framer {
        Framer {
            stanza_bytes_max,
            buf: BytesMut::new(),
            pos: 0,
            state: State::Content,
            phase: Phase::Prolog,
            poisoned: None,
            stack: Vec::new(),
            prefixes: Vec::new(),
            stream_name: Vec::new(),
            tag_start: 0,
            name_start: 0,
            tag_name: 0..0,
            attrs: Vec::new(),
            attr_name: 0..0,
            attr_ws_start: 0,
            value_start: 0,
            ref_start: 0,
            header: Header::default(),
        }
    }

    /// Appends received bytes. Cheap; parsing happens in `next_event`.
    pub fn push(&mut self, data: &[u8]) {
        // A poisoned stream is about to be closed; holding more of its bytes serves nothing.
        if self.poisoned.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// The next complete event, `Ok(None)` when more bytes are needed. After an error the framer
    /// is poisoned: the caller sends the stream error and closes.
    pub fn next_event(&mut self) -> Result<Option<Event>, FrameError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        match self.scan() {
            Ok(ev) => Ok(ev),
            Err(e) => {
                self.poisoned = Some(e.clone());
                // The bytes can never become an event now.
                self.buf.clear();
                self.pos = 0;
                Err(e)
            }
        }
    }

    /// Forgets all state and buffered bytes: a new stream begins.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.pos = 0;
        self.state = State::Content;
        self.phase = Phase::Prolog;
        self.poisoned = None;
        self.stack.clear();
        self.prefixes.clear();
        self.stream_name.clear();
        self.attrs.clear();
        self.header = Header::default();
    }

    /// A new stream begins right after the last event (a SASL success, RFC 6120 §6.4.6): forgets
    /// the old stream's state but keeps the bytes not yet returned as events, which a client may
    /// have pipelined (its new stream header and more, XEP-0305 §2.3). Never after STARTTLS:
    /// bytes sent in the clear must not be carried into the TLS stream (use `reset`).
    pub fn restart(&mut self) {
        // After an event the buffer starts at the first unread byte and no element is open.
        debug_assert_eq!(self.pos, 0);
        debug_assert!(self.stack.is_empty());
        let buf = std::mem::take(&mut self.buf);
        self.reset();
        self.buf = buf;
    }

    /// Bytes buffered and not yet returned as an event.
    pub fn buffered_bytes(&self) -> usize {
        self.buf.len()
    }

    /// The stream element's name when the framer sits between stanzas of an open stream with
    /// nothing buffered: all it holds then is that name, and `in_stream` with it builds a framer
    /// that yields the same events for any further input. A connection that is idle can drop
    /// its framer (a few hundred bytes and its buffers) and rebuild it when bytes arrive.
    pub fn idle_stream_name(&self) -> Option<&[u8]> {
        let idle = self.phase == Phase::Stream
            && self.state == State::Content
            && self.stack.is_empty()
            && self.buf.is_empty()
            && self.poisoned.is_none();
        idle.then_some(self.stream_name.as_slice())
    }

    /// A framer inside an open stream named `stream_name`, between stanzas: the framer
    /// `idle_stream_name` described.
    pub fn in_stream(stanza_bytes_max: usize, stream_name: &[u8]) -> Framer {
        let mut framer = Framer::new(stanza_bytes_max);
        framer.phase = Phase::Stream;
        framer.stream_name.extend_from_slice(stream_name);
        framer
    }

    /// Size limit of the unit in progress (the prolog with the stream header, or one stanza).
    fn unit_bytes_max(&self) -> usize {
        match self.phase {
            Phase::Prolog => STREAM_HEADER_BYTES_MAX,
            Phase::Stream | Phase::Closed => self.stanza_bytes_max,
        }
    }

    /// Runs the state machine until an event, an error, or the end of the scannable bytes.
    fn scan(&mut self) -> Result<Option<Event>, FrameError> {
        loop {
            let limit = self.unit_bytes_max();
            // Never look past one byte beyond the limit: what lies further must not influence
            // which error is reported, or the result would depend on how the input was split.
            let end = self.buf.len().min(limit.saturating_add(1));
            if self.pos >= end {
                if self.pos > limit {
                    return Err(PolicyViolation(match self.phase {
                        Phase::Prolog => "stream header too large",
                        _ => "stanza too large",
                    }));
                }
                return Ok(None);
            }
            let b = self.buf[self.pos];
            match self.state {
                State::Content if self.stack.is_empty() => self.between_stanzas(b)?,
                State::Content => match b {
                    b'<' => {
                        self.tag_start = self.pos;
                        self.state = State::Lt;
                        self.pos += 1;
                    }
                    b'&' => {
                        self.ref_start = self.pos;
                        self.state = State::ContentRef;
                        self.pos += 1;
                    }
                    b'>' => {
                        // `]]>` only ends a CDATA section (XML 1.0 §2.4): in text it is not
                        // well-formed, and passed on it would end the recipient's stream in
                        // its client's parser. Inside a stanza `buf` holds the stanza from
                        // offset 0, and two `]` just before a `>` in content are content too.
                        if self.pos >= 2 && self.buf[self.pos - 2..self.pos] == *b"]]" {
                            return Err(NotWellFormed("']]>' in text"));
                        }
                        self.pos += 1;
                    }
                    _ if is_forbidden_control(b) => return Err(NotWellFormed("control character")),
                    _ => {
                        // Fast path: skip plain character data in one go.
                        let run = self.buf[self.pos..end]
                            .iter()
                            .position(|&c| {
                                c == b'<' || c == b'&' || c == b'>' || is_forbidden_control(c)
                            })
                            .unwrap_or(end - self.pos);
                        self.pos += run;
                    }
                },
                State::ContentRef | State::AttrRef(_) => {
                    if b == b';' {
                        check_reference(&self.buf[self.ref_start + 1..self.pos])?;
                        self.state = match self.state {
                            State::AttrRef(q) => State::AttrValue(q),
                            _ => State::Content,
                        };
                    } else if !(is_name_char(b) || b == b'#') {
                        return Err(NotWellFormed("malformed reference"));
                    }
                    self.pos += 1;
                }
                State::Lt => {
                    match b {
                        b'/' => {
                            self.name_start = self.pos + 1;
                            self.state = State::EndName;
                        }
                        b'!' => self.state = State::Bang(0),
                        b'?' if self.phase == Phase::Prolog && self.tag_start == 0 => {
                            self.state = State::DeclTarget(0)
                        }
                        b'?' => return Err(RestrictedXml("processing instruction")),
                        _ if is_name_start(b) => {
                            self.name_start = self.pos;
                            self.attrs.clear();
                            self.state = State::StartName;
                        }
                        _ => return Err(NotWellFormed("bad character after '<'")),
                    }
                    self.pos += 1;
                }
                State::Bang(n) => {
                    let n = usize::from(n);
                    if CDATA_OPEN.get(n) != Some(&b) {
                        return Err(RestrictedXml(match (n, b) {
                            (0, b'-') => "comment",
                            (0, b'D') => "document type declaration",
                            _ => "markup declaration",
                        }));
                    }
                    if n + 1 == CDATA_OPEN.len() {
                        if self.stack.is_empty() {
                            return Err(NotWellFormed("character data outside a stanza"));
                        }
                        self.state = State::Cdata(0);
                    } else {
                        self.state = State::Bang(n as u8 + 1);
                    }
                    self.pos += 1;
                }
                State::Cdata(k) => {
                    match b {
                        b']' => self.state = State::Cdata((k + 1).min(2)),
                        b'>' if k == 2 => self.state = State::Content,
                        _ if is_forbidden_control(b) => {
                            return Err(NotWellFormed("control character"))
                        }
                        _ => self.state = State::Cdata(0),
                    }
                    self.pos += 1;
                }
                State::DeclTarget(n) => {
                    let n = usize::from(n);
                    match XML_DECL_TARGET.get(n) {
                        Some(&want) if want == b => self.state = State::DeclTarget(n as u8 + 1),
                        None if is_ws(b) => self.state = State::DeclBody(false),
                        _ => return Err(RestrictedXml("processing instruction")),
                    }
                    self.pos += 1;
                }
                State::DeclBody(question) => {
                    match b {
                        b'>' if question => self.state = State::Content,
                        b'<' => return Err(NotWellFormed("'<' in XML declaration")),
                        _ if is_forbidden_control(b) => {
                            return Err(NotWellFormed("control character"))
                        }
                        _ => self.state = State::DeclBody(b == b'?'),
                    }
                    self.pos += 1;
                }
                State::StartName => {
                    if is_name_char(b) {
                        self.pos += 1;
                        continue;
                    }
                    self.tag_name = self.name_start..self.pos;
                    check_name(&self.buf[self.tag_name.clone()])?;
                    match b {
                        b'>' => {
                            if let Some(ev) = self.start_tag_done(self.pos, false)? {
                                return Ok(Some(ev));
                            }
                        }
                        b'/' => {
                            self.state = State::EmptyTagEnd;
                            self.pos += 1;
                        }
                        _ if is_ws(b) => {
                            self.attr_ws_start = self.pos;
                            self.state = State::InTag { ws: true };
                            self.pos += 1;
                        }
                        _ => return Err(NotWellFormed("bad character in element name")),
                    }
                }
                State::InTag { ws } => match b {
                    b'>' => {
                        if let Some(ev) = self.start_tag_done(self.pos, false)? {
                            return Ok(Some(ev));
                        }
                    }
                    b'/' => {
                        self.state = State::EmptyTagEnd;
                        self.pos += 1;
                    }
                    _ if is_ws(b) => {
                        if !ws {
                            self.attr_ws_start = self.pos;
                            self.state = State::InTag { ws: true };
                        }
                        self.pos += 1;
                    }
                    _ if is_name_start(b) && ws => {
                        self.name_start = self.pos;
                        self.state = State::AttrName;
                        self.pos += 1;
                    }
                    _ if is_name_start(b) => {
                        return Err(NotWellFormed("no whitespace between attributes"))
                    }
                    _ => return Err(NotWellFormed("bad character in start tag")),
                },
                State::EmptyTagEnd => {
                    if b != b'>' {
                        return Err(NotWellFormed("'/' not followed by '>'"));
                    }
                    if let Some(ev) = self.start_tag_done(self.pos, true)? {
                        return Ok(Some(ev));
                    }
                }
                State::AttrName => {
                    if is_name_char(b) {
                        self.pos += 1;
                        continue;
                    }
                    if !(b == b'=' || is_ws(b)) {
                        return Err(NotWellFormed("bad character in attribute name"));
                    }
                    self.attr_name = self.name_start..self.pos;
                    check_name(&self.buf[self.attr_name.clone()])?;
                    self.check_new_attribute()?;
                    self.state = if b == b'=' {
                        State::AttrAfterEq
                    } else {
                        State::AttrBeforeEq
                    };
                    self.pos += 1;
                }
                State::AttrBeforeEq => {
                    match b {
                        b'=' => self.state = State::AttrAfterEq,
                        _ if is_ws(b) => {}
                        _ => return Err(NotWellFormed("attribute without '='")),
                    }
                    self.pos += 1;
                }
                State::AttrAfterEq => {
                    match b {
                        b'\'' | b'"' => {
                            self.value_start = self.pos + 1;
                            self.state = State::AttrValue(b);
                        }
                        _ if is_ws(b) => {}
                        _ => return Err(NotWellFormed("unquoted attribute value")),
                    }
                    self.pos += 1;
                }
                State::AttrValue(quote) => {
                    match b {
                        _ if b == quote => {
                            self.attrs.push(Attr {
                                name: self.attr_name.clone(),
                                value: self.value_start..self.pos,
                                ws_start: self.attr_ws_start,
                            });
                            self.state = State::InTag { ws: false };
                        }
                        b'<' => return Err(NotWellFormed("'<' in attribute value")),
                        b'&' => {
                            self.ref_start = self.pos;
                            self.state = State::AttrRef(quote);
                        }
                        _ if is_forbidden_control(b) => {
                            return Err(NotWellFormed("control character"))
                        }
                        _ => {
                            let run = self.buf[self.pos..end]
                                .iter()
                                .position(|&c| {
                                    c == quote || c == b'<' || c == b'&' || is_forbidden_control(c)
                                })
                                .unwrap_or(end - self.pos);
                            self.pos += run;
                            continue;
                        }
                    }
                    self.pos += 1;
                }
                State::EndName => {
                    if self.pos == self.name_start && !is_name_start(b) {
                        return Err(NotWellFormed("bad end tag name"));
                    }
                    if is_name_char(b) {
                        self.pos += 1;
                        continue;
                    }
                    self.tag_name = self.name_start..self.pos;
                    match b {
                        b'>' => {
                            if let Some(ev) = self.end_tag_done(self.pos)? {
                                return Ok(Some(ev));
                            }
                        }
                        _ if is_ws(b) => {
                            self.state = State::EndAfterName;
                            self.pos += 1;
                        }
                        _ => return Err(NotWellFormed("bad character in end tag")),
                    }
                }
                State::EndAfterName => match b {
                    b'>' => {
                        if let Some(ev) = self.end_tag_done(self.pos)? {
                            return Ok(Some(ev));
                        }
                    }
                    _ if is_ws(b) => self.pos += 1,
                    _ => return Err(NotWellFormed("bad character in end tag")),
                },
            }
        }
    }

    /// Content outside any stanza: whitespace (keepalives, the prolog) or the next `<`.
    fn between_stanzas(&mut self, b: u8) -> Result<(), FrameError> {
        if is_ws(b) {
            if self.phase == Phase::Prolog {
                // Kept: the prolog is emitted (and UTF-8 checked) as one unit with the header.
                self.pos += 1;
            } else {
                // Dropped at once so the next stanza starts at offset 0 and idle keepalives do
                // not accumulate. Outside a stanza `pos` is 0.
                let run = self.buf[self.pos..]
                    .iter()
                    .take_while(|&&c| is_ws(c))
                    .count();
                self.buf.advance(self.pos + run);
                self.pos = 0;
            }
            return Ok(());
        }
        match (b, self.phase) {
            (b'<', Phase::Prolog | Phase::Stream) => {
                self.tag_start = self.pos;
                self.state = State::Lt;
                self.pos += 1;
                Ok(())
            }
            (_, Phase::Closed) => Err(NotWellFormed("data after the stream's end")),
            _ => Err(NotWellFormed("text outside a stanza")),
        }
    }

    /// Checks the attribute whose name was just scanned against the element's others.
    fn check_new_attribute(&self) -> Result<(), FrameError> {
        if self.attrs.len() >= ELEMENT_ATTRIBUTES_MAX {
            return Err(PolicyViolation("too many attributes"));
        }
        let name = &self.buf[self.attr_name.clone()];
        if self.attrs.iter().any(|a| &self.buf[a.name.clone()] == name) {
            return Err(NotWellFormed("duplicate attribute"));
        }
        Ok(())
    }

    /// A start tag ended at `gt` (the offset of its `>`). Returns the event it completes, if any.
    fn start_tag_done(
        &mut self,
        gt: usize,
        self_closing: bool,
    ) -> Result<Option<Event>, FrameError> {
        let end = gt + 1;
        match self.phase {
            Phase::Prolog => {
                if self_closing {
                    return Err(NotWellFormed("self-closing stream header"));
                }
                return self.open_stream(end).map(Some);
            }
            // `between_stanzas` refuses `<` after the close, so no tag starts there.
            Phase::Closed => return Err(NotWellFormed("data after the stream's end")),
            Phase::Stream => {}
        }
        let depth = self.stack.len() + 1;
        if depth > STANZA_DEPTH_MAX {
            return Err(PolicyViolation("elements nested too deep"));
        }
        self.check_namespaces(depth)?;
        if self_closing {
            // Its declarations end with it.
            self.prefixes.retain(|(d, _)| *d < depth);
        }
        if depth == 1 {
            let start_tag_end = if self_closing { gt - 1 } else { gt };
            self.header = self.stanza_header(start_tag_end, self_closing);
            if self_closing {
                return self.emit_stanza(end).map(Some);
            }
        }
        if !self_closing {
            self.stack.push(self.tag_name.clone());
        }
        self.state = State::Content;
        self.pos = end;
        Ok(None)
    }

    /// An end tag ended at `gt`. Returns the event it completes, if any.
    fn end_tag_done(&mut self, gt: usize) -> Result<Option<Event>, FrameError> {
        let end = gt + 1;
        let name = &self.buf[self.tag_name.clone()];
        match self.phase {
            Phase::Prolog => return Err(NotWellFormed("end tag before the stream header")),
            Phase::Closed => return Err(NotWellFormed("data after the stream's end")),
            Phase::Stream => {}
        }
        let Some(open) = self.stack.pop() else {
            if name != self.stream_name.as_slice() {
                return Err(NotWellFormed("mismatched end tag"));
            }
            self.buf.advance(end);
            self.pos = 0;
            self.state = State::Content;
            self.phase = Phase::Closed;
            return Ok(Some(Event::StreamClose));
        };
        if self.buf[open] != *name {
            return Err(NotWellFormed("mismatched end tag"));
        }
        let depth = self.stack.len();
        self.prefixes.retain(|(d, _)| *d <= depth);
        if self.stack.is_empty() {
            return self.emit_stanza(end).map(Some);
        }
        self.state = State::Content;
        self.pos = end;
        Ok(None)
    }

    /// Locates routing attributes of a stanza's top-level element (the attributes just scanned).
    fn stanza_header(&self, start_tag_end: usize, self_closing: bool) -> Header {
        let mut h = Header {
            name: self.tag_name.clone(),
            start_tag_end,
            self_closing,
            ..Header::default()
        };
        for a in &self.attrs {
            let value = Some(a.value.clone());
            match &self.buf[a.name.clone()] {
                b"to" => h.to = value,
                b"from" => {
                    h.from = value;
                    // Through the closing quote, which directly follows the value.
                    h.from_attr = Some(a.ws_start..a.value.end + 1);
                }
                b"id" => h.id = value,
                b"type" => h.type_ = value,
                b"xmlns" => h.xmlns = value,
                _ => {}
            }
        }
        h
    }

    /// The current start tag at `depth` is namespace-well-formed (Namespaces in XML 1.0 §3, §5,
    /// which RFC 6120 §11.4 requires): qualified names with at most one `:`, prefixes declared
    /// in the stanza itself (a stanza is passed on alone, so a prefix declared on the sender's
    /// stream header would be unbound at the recipient), bound to a namespace. `xml` is always
    /// bound, and the stream's prefix on a top-level element (`stream:error`). A stanza a
    /// namespace-aware parser refuses would end its recipient's stream (found by the
    /// `framer_vs_parser` fuzz target).
    fn check_namespaces(&mut self, depth: usize) -> Result<(), FrameError> {
        /// Namespaces in XML 1.0 §3: `xml` is bound to this and nothing else is, and nothing is
        /// bound to `xmlns`'s.
        const NS_XML: &str = "http://www.w3.org/XML/1998/namespace";
        const NS_XMLNS: &str = "http://www.w3.org/2000/xmlns/";
        for a in &self.attrs {
            let name = &self.buf[a.name.clone()];
            let declared = match name.strip_prefix(b"xmlns") {
                Some(b"") => None,
                Some([b':', prefix @ ..]) => Some(prefix),
                _ => continue,
            };
            // Declarations are rare: their value is read whole (the references were checked).
            let value = std::str::from_utf8(&self.buf[a.value.clone()])
                .ok()
                .and_then(crate::escape::unescape)
                .ok_or(NotWellFormed("malformed namespace name"))?;
            let reserved = value == NS_XML || value == NS_XMLNS;
            match declared {
                None if reserved => return Err(NotWellFormed("a reserved default namespace")),
                None => {}
                Some(b"xml") if value == NS_XML => {}
                Some(prefix) => {
                    if prefix.is_empty() || prefix.contains(&b':') || prefix == b"xmlns" {
                        return Err(NotWellFormed("malformed namespace prefix"));
                    }
                    if value.is_empty() || reserved || prefix == b"xml" {
                        return Err(NotWellFormed(
                            "a prefix declared with no or a reserved namespace",
                        ));
                    }
                    self.prefixes.push((depth, a.name.start + 6..a.name.end));
                }
            }
        }
        let bound = |prefix: &[u8]| {
            prefix == b"xml"
                // Only a top-level element (`stream:error`), which is never passed on.
                || (depth == 1
                    && (self.stream_name.iter().position(|&c| c == b':'))
                        .is_some_and(|i| self.stream_name[..i] == *prefix))
                || self
                    .prefixes
                    .iter()
                    .any(|(_, r)| self.buf[r.clone()] == *prefix)
        };
        let prefix_of = |name: &[u8]| -> Result<Option<usize>, FrameError> {
            let mut colons = name.iter().enumerate().filter(|(_, &c)| c == b':');
            match (colons.next(), colons.next()) {
                (None, _) => Ok(None),
                // Both parts NCNames: the local part starts like a name too (`xmlns:5r` no).
                (Some((i, _)), None)
                    if i > 0
                        && std::str::from_utf8(&name[i + 1..])
                            .ok()
                            .and_then(|local| local.chars().next())
                            .is_some_and(is_name_start_char) =>
                {
                    Ok(Some(i))
                }
                _ => Err(NotWellFormed("malformed qualified name")),
            }
        };
        let element = &self.buf[self.tag_name.clone()];
        if let Some(i) = prefix_of(element)? {
            // `xml` is for attributes (`xml:lang`); rxml refuses an element in it (found by the
            // `framer_vs_parser` fuzz target), and no XMPP element is one.
            if matches!(&element[..i], b"xmlns" | b"xml") || !bound(&element[..i]) {
                return Err(NotWellFormed("undeclared namespace prefix"));
            }
        }
        for a in &self.attrs {
            let name = &self.buf[a.name.clone()];
            if let Some(i) = prefix_of(name)? {
                let prefix = &name[..i];
                if prefix != b"xmlns" && !bound(prefix) {
                    return Err(NotWellFormed("undeclared namespace prefix"));
                }
            }
        }
        Ok(())
    }

    /// Cuts the finished stanza `buf[..end]` off the buffer (no copy) and wraps it.
    fn emit_stanza(&mut self, end: usize) -> Result<Event, FrameError> {
        if end > self.stanza_bytes_max {
            return Err(PolicyViolation("stanza too large"));
        }
        // Once per stanza: it also covers multi-byte sequences split across pushes.
        if std::str::from_utf8(&self.buf[..end]).is_err() {
            return Err(NotWellFormed("stanza is not UTF-8"));
        }
        let bytes = self.buf.split_to(end).freeze();
        if self.buf.is_empty() {
            // Nothing of the next stanza has arrived: let the stanza's `Bytes` own the old
            // allocation alone, so an idle connection holds no buffer (the next `push` allocates).
            self.buf = BytesMut::new();
        }
        let header = std::mem::take(&mut self.header);
        let kind = match &bytes[header.name.clone()] {
            b"message" => Kind::Message,
            b"presence" => Kind::Presence,
            b"iq" => Kind::Iq,
            _ => Kind::Other,
        };
        self.stack.clear();
        self.pos = 0;
        self.state = State::Content;
        Ok(Event::Stanza(Stanza {
            kind,
            header,
            bytes,
        }))
    }

    /// The stream header tag ended at `end` (exclusive): decode it and drop the prolog.
    fn open_stream(&mut self, end: usize) -> Result<Event, FrameError> {
        const NOT_UTF8: FrameError = NotWellFormed("stream header is not UTF-8");
        let text = std::str::from_utf8(&self.buf[..end]).map_err(|_| NOT_UTF8)?;
        // Every range is delimited by ASCII bytes, so `get` only fails on our own bug; refuse
        // the stream rather than panic.
        let name = text.get(self.tag_name.clone()).ok_or(NOT_UTF8)?;
        let prefix = name.split_once(':').map(|(p, _)| p);
        let mut h = StreamHeader {
            name: name.to_owned(),
            ..StreamHeader::default()
        };
        let mut prefix_ns = None;
        for a in &self.attrs {
            let attr = text.get(a.name.clone()).ok_or(NOT_UTF8)?;
            let raw = text.get(a.value.clone()).ok_or(NOT_UTF8)?;
            let value = unescape(raw)
                .ok_or(NotWellFormed("malformed reference"))?
                .into_owned();
            match attr {
                "to" => h.to = Some(value),
                "from" => h.from = Some(value),
                "id" => h.id = Some(value),
                "version" => h.version = Some(value),
                "xml:lang" => h.lang = Some(value),
                "xmlns" => h.default_ns = Some(value),
                _ => {
                    if prefix.is_some() && attr.strip_prefix("xmlns:") == prefix {
                        prefix_ns = Some(value);
                    }
                }
            }
        }
        h.stream_ns = if prefix.is_some() {
            prefix_ns
        } else {
            h.default_ns.clone()
        };
        self.stream_name.clear();
        self.stream_name.extend_from_slice(name.as_bytes());
        self.buf.advance(end);
        self.pos = 0;
        self.state = State::Content;
        self.phase = Phase::Stream;
        Ok(Event::StreamOpen(h))
    }
}

/// XML whitespace (S production).
fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// C0 controls other than tab, LF and CR are not XML characters at all.
fn is_forbidden_control(b: u8) -> bool {
    b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r')
}

/// First byte of a name. Bytes >= 0x80 are accepted as part of a UTF-8 letter; the stanza's
/// UTF-8 check catches invalid sequences.
fn is_name_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b == b':' || b >= 0x80
}

fn is_name_char(b: u8) -> bool {
    is_name_start(b) || b.is_ascii_digit() || b == b'-' || b == b'.'
}

/// The byte scan takes any non-ASCII byte in a name, so a name holding one is checked whole once
/// it ends: UTF-8 of XML 1.0 name characters (§2.3). Passed on, a name a recipient's parser
/// refuses would end the recipient's stream (a U+00B9 in an attribute name was found by the
/// `bind_request` fuzz target). End tags need no check: they must match their start tag.
fn check_name(name: &[u8]) -> Result<(), FrameError> {
    if name.is_ascii() {
        return Ok(());
    }
    let valid = std::str::from_utf8(name).is_ok_and(|s| {
        let mut chars = s.chars();
        chars.next().is_some_and(is_name_start_char) && chars.all(is_name_char_unicode)
    });
    if valid {
        Ok(())
    } else {
        Err(NotWellFormed("bad character in name"))
    }
}

/// XML 1.0 (fifth edition) `NameStartChar`.
fn is_name_start_char(c: char) -> bool {
    matches!(c,
        ':' | 'A'..='Z' | '_' | 'a'..='z'
        | '\u{C0}'..='\u{D6}' | '\u{D8}'..='\u{F6}' | '\u{F8}'..='\u{2FF}'
        | '\u{370}'..='\u{37D}' | '\u{37F}'..='\u{1FFF}' | '\u{200C}'..='\u{200D}'
        | '\u{2070}'..='\u{218F}' | '\u{2C00}'..='\u{2FEF}' | '\u{3001}'..='\u{D7FF}'
        | '\u{F900}'..='\u{FDCF}' | '\u{FDF0}'..='\u{FFFD}' | '\u{10000}'..='\u{EFFFF}')
}

/// XML 1.0 (fifth edition) `NameChar`.
fn is_name_char_unicode(c: char) -> bool {
    is_name_start_char(c)
        || matches!(c,
            '-' | '.' | '0'..='9' | '\u{B7}' | '\u{300}'..='\u{36F}' | '\u{203F}'..='\u{2040}')
}

/// Digits a character reference may have. XML sets no bound (leading zeros), but no character
/// needs more than 7 and rxml, which XMPP clients in Rust parse with, refuses references over
/// 8 (found by the `bind_request` fuzz target): such a stanza passed on would end their stream.
const CHARACTER_REFERENCE_DIGITS_MAX: usize = 8;

/// Checks the text between `&` and `;`: one of the five predefined entities or a character
/// reference to an XML character. Any other well-formed name is an entity §11.1 forbids.
fn check_reference(r: &[u8]) -> Result<(), FrameError> {
    const MALFORMED: FrameError = NotWellFormed("malformed reference");
    let (digits, radix) = match r {
        b"amp" | b"lt" | b"gt" | b"apos" | b"quot" => return Ok(()),
        [b'#', b'x', hex @ ..] => (hex, 16),
        [b'#', dec @ ..] => (dec, 10),
        [first, rest @ ..] if is_name_start(*first) && rest.iter().all(|&c| is_name_char(c)) => {
            return Err(RestrictedXml("undefined entity"))
        }
        _ => return Err(MALFORMED),
    };
    if digits.is_empty() {
        return Err(MALFORMED);
    }
    if digits.len() > CHARACTER_REFERENCE_DIGITS_MAX {
        return Err(NotWellFormed("character reference of over 8 digits"));
    }
    let mut code: u32 = 0;
    for &d in digits {
        let v = char::from(d).to_digit(radix).ok_or(MALFORMED)?;
        code = code
            .checked_mul(radix)
            .and_then(|c| c.checked_add(v))
            .ok_or(MALFORMED)?;
    }
    if is_xml_char(code) {
        Ok(())
    } else {
        Err(MALFORMED)
    }
}

/// XML 1.0 `Char` production.
fn is_xml_char(c: u32) -> bool {
    matches!(c, 0x9 | 0xA | 0xD | 0x20..=0xD7FF | 0xE000..=0xFFFD | 0x10000..=0x10FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::STANZA_BYTES_MAX;

    const HEADER: &str = "<stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";

    /// Feeds `input` whole and drains events until more bytes are needed or an error.
    fn run(input: &[u8], max: usize) -> (Vec<Event>, Option<FrameError>) {
        let mut f = Framer::new(max);
        f.push(input);
        drain(&mut f)
    }

    fn drain(f: &mut Framer) -> (Vec<Event>, Option<FrameError>) {
        let mut events = Vec::new();
        loop {
            match f.next_event() {
                Ok(Some(ev)) => events.push(ev),
                Ok(None) => return (events, None),
                Err(e) => return (events, Some(e)),
            }
        }
    }

    /// The error a stanza provokes after a valid header.
    fn error_of(stanza: &str) -> FrameError {
        let (events, err) = run(format!("{HEADER}{stanza}").as_bytes(), STANZA_BYTES_MAX);
        assert!(
            matches!(events.first(), Some(Event::StreamOpen(_))),
            "{events:?}"
        );
        err.unwrap_or_else(|| panic!("no error for {stanza:?}: {events:?}"))
    }

    fn stanzas(events: &[Event]) -> Vec<&Stanza> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Stanza(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// An idle framer rebuilt with `in_stream` yields what the original would have: stanzas,
    /// the stream's close, and errors, for input split anywhere.
    #[test]
    fn rebuilt_idle_framer_continues_the_stream() {
        let rest =
            "<message to='a@b'><body>hi</body></message> <iq type='get' id='1'/></stream:stream>";
        let mut original = Framer::new(STANZA_BYTES_MAX);
        original.push(format!("{HEADER}<presence/>").as_bytes());
        let (events, err) = drain(&mut original);
        assert_eq!((events.len(), err), (2, None));
        let name = original
            .idle_stream_name()
            .expect("between stanzas")
            .to_vec();
        assert_eq!(name, b"stream:stream");
        for split in 0..=rest.len() {
            let mut a = Framer::new(STANZA_BYTES_MAX);
            a.push(format!("{HEADER}<presence/>").as_bytes());
            drain(&mut a);
            let mut b = Framer::in_stream(STANZA_BYTES_MAX, &name);
            assert_eq!(b.idle_stream_name(), Some(name.as_slice()));
            let mut got = (Vec::new(), Vec::new());
            for (f, out) in [(&mut a, &mut got.0), (&mut b, &mut got.1)] {
                f.push(&rest.as_bytes()[..split]);
                out.push(drain(f));
                f.push(&rest.as_bytes()[split..]);
                out.push(drain(f));
            }
            assert_eq!(got.0, got.1, "split at {split}");
        }
        let mut wrong = Framer::in_stream(STANZA_BYTES_MAX, &name);
        wrong.push(b"</stream:other>");
        assert_eq!(
            drain(&mut wrong).1,
            Some(NotWellFormed("mismatched end tag"))
        );
    }

    #[test]
    fn framer_is_idle_only_between_stanzas_of_an_open_stream() {
        let mut f = Framer::new(STANZA_BYTES_MAX);
        assert_eq!(f.idle_stream_name(), None, "before the header");
        f.push(format!("{HEADER} ").as_bytes());
        drain(&mut f);
        assert!(f.idle_stream_name().is_some());
        f.push(b"<message><bo");
        drain(&mut f);
        assert_eq!(f.idle_stream_name(), None, "inside a stanza");
        f.push(b"dy/></message>\n");
        drain(&mut f);
        assert!(
            f.idle_stream_name().is_some(),
            "whitespace after a stanza is dropped"
        );
        f.push(b"<");
        drain(&mut f);
        assert_eq!(f.idle_stream_name(), None, "a tag begun");
        f.push(b"/stream:stream>");
        drain(&mut f);
        assert_eq!(f.idle_stream_name(), None, "after the close");
    }

    #[test]
    fn happy_path() {
        let message = "<message to='juliet@example.com' type='chat' id='m1'>\
            <body>Wherefore art thou? &amp; &#233;&#x1F389; <![CDATA[<not a tag> & ]]]]></body>\
            <x xmlns='urn:x'><y a=\"1\"/></x></message>";
        let iq = "<iq type='get' id='i1'/>";
        let input = format!(
            "<?xml version='1.0' encoding='UTF-8'?>\n{HEADER}\n  {message}\r\n\t \n{iq} \n</stream:stream>"
        );
        let (events, err) = run(input.as_bytes(), STANZA_BYTES_MAX);
        assert_eq!(err, None);
        assert_eq!(events.len(), 4, "{events:?}");
        let Event::StreamOpen(h) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(h.name, "stream:stream");
        assert_eq!(h.to.as_deref(), Some("example.com"));
        assert_eq!(h.version.as_deref(), Some("1.0"));
        assert_eq!(h.default_ns.as_deref(), Some("jabber:client"));
        assert_eq!(
            h.stream_ns.as_deref(),
            Some("http://etherx.jabber.org/streams")
        );
        assert_eq!(h.from, None);
        let s = stanzas(&events);
        assert_eq!(s[0].kind, Kind::Message);
        assert_eq!(s[0].as_str(), message);
        assert_eq!(s[0].name(), "message");
        assert!(!s[0].header.self_closing);
        assert_eq!(&message[s[0].header.start_tag_end..][..1], ">");
        assert_eq!(s[1].kind, Kind::Iq);
        assert_eq!(s[1].as_str(), iq);
        assert!(s[1].header.self_closing);
        assert_eq!(&iq[s[1].header.start_tag_end..], "/>");
        assert_eq!(events[3], Event::StreamClose);
        // Same events however the input is split, including one byte at a time.
        let mut f = Framer::new(STANZA_BYTES_MAX);
        let mut split = Vec::new();
        for b in input.as_bytes() {
            f.push(std::slice::from_ref(b));
            let (evs, e) = drain(&mut f);
            assert_eq!(e, None);
            split.extend(evs);
        }
        assert_eq!(split, events);
        assert_eq!(f.buffered_bytes(), 0);
    }

    #[test]
    fn header_ranges_and_with_from() {
        let text =
            "<message  to='romeo@example.net/orchard'\n from=\"juliet@example.com/balcony\" \
            id='a&amp;b' type='chat' xmlns='jabber:client'><body>hi</body></message>";
        let (events, err) = run(format!("{HEADER}{text}").as_bytes(), STANZA_BYTES_MAX);
        assert_eq!(err, None);
        let s = stanzas(&events)[0].clone();
        assert_eq!(s.to().as_deref(), Some("romeo@example.net/orchard"));
        assert_eq!(s.from().as_deref(), Some("juliet@example.com/balcony"));
        assert_eq!(s.id().as_deref(), Some("a&b"));
        assert_eq!(s.type_().as_deref(), Some("chat"));
        assert_eq!(s.xmlns().as_deref(), Some("jabber:client"));
        let from_attr = s.header.from_attr.clone().expect("from_attr");
        assert_eq!(&text[from_attr], "\n from=\"juliet@example.com/balcony\"");

        let stamped = s.with_from("juliet@example.com/balcony2");
        assert_eq!(
            stamped.as_str(),
            "<message  to='romeo@example.net/orchard' from='juliet@example.com/balcony2' \
            id='a&amp;b' type='chat' xmlns='jabber:client'><body>hi</body></message>"
        );
        assert_eq!(
            stamped.from().as_deref(),
            Some("juliet@example.com/balcony2")
        );
        assert_eq!(stamped.id().as_deref(), Some("a&b"));

        // Without `from`, it is inserted after the name.
        let text = "<presence id='p1'/>";
        let (events, _) = run(format!("{HEADER}{text}").as_bytes(), STANZA_BYTES_MAX);
        let s = stanzas(&events)[0].clone();
        assert_eq!(s.kind, Kind::Presence);
        assert_eq!(s.from(), None);
        assert_eq!(s.header.from_attr, None);
        let stamped = s.with_from("a@b/c");
        assert_eq!(stamped.as_str(), "<presence from='a@b/c' id='p1'/>");
        assert_eq!(stamped.id().as_deref(), Some("p1"));
        assert_eq!(stamped.from().as_deref(), Some("a@b/c"));
    }

    #[test]
    fn unprefixed_stream_and_lang() {
        let input = "<stream xmlns='http://etherx.jabber.org/streams' xml:lang='en' id='x&lt;'>\
            <auth/></stream>";
        let (events, err) = run(input.as_bytes(), STANZA_BYTES_MAX);
        assert_eq!(err, None);
        let Event::StreamOpen(h) = &events[0] else {
            panic!()
        };
        assert_eq!(
            h.stream_ns.as_deref(),
            Some("http://etherx.jabber.org/streams")
        );
        assert_eq!(h.lang.as_deref(), Some("en"));
        assert_eq!(h.id.as_deref(), Some("x<"));
        assert_eq!(stanzas(&events)[0].kind, Kind::Other);
        assert_eq!(events[2], Event::StreamClose);
    }

    #[test]
    fn restricted_xml() {
        for (stanza, what) in [
            ("<!-- hi -->", "comment at depth 1"),
            ("<message><!-- hi --></message>", "comment in stanza"),
            ("<message><?pi x?></message>", "processing instruction"),
            ("<?xml version='1.0'?>", "xml decl after header"),
            ("<message><body>&foo;</body></message>", "undefined entity"),
            ("<message a='&nbsp;'/>", "undefined entity in attribute"),
            ("<message><!ENTITY x 'y'></message>", "entity declaration"),
        ] {
            assert!(matches!(error_of(stanza), RestrictedXml(_)), "{what}");
        }
        let (_, err) = run(b"<!DOCTYPE stream><stream:stream>", STANZA_BYTES_MAX);
        assert!(matches!(err, Some(RestrictedXml(_))), "{err:?}");
        let (_, err) = run(b" <?xml version='1.0'?><stream:stream>", STANZA_BYTES_MAX);
        assert!(
            matches!(err, Some(RestrictedXml(_))),
            "decl not at start: {err:?}"
        );
        assert_eq!(error_of("<!-- -->").condition(), "restricted-xml");
    }

    /// Prefixes declared in the stanza bind in the element and below; `xml` and the stream's
    /// prefix are always bound.
    #[test]
    fn declared_prefixes_pass() {
        let text =
            "<message xml:lang='en'><a:x xmlns:a='urn:a' a:k='1'><a:y/><b:z xmlns:b='urn:b' \
                    b:k='2'/></a:x><c:q xmlns:c='urn:c'/></message>";
        let input = format!("{HEADER}{text}<stream:error/>");
        let (events, err) = run(input.as_bytes(), STANZA_BYTES_MAX);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(stanzas(&events)[0].as_str(), text);
        assert_eq!(stanzas(&events)[1].as_str(), "<stream:error/>");
        // A later stanza does not inherit them.
        let later = format!("{HEADER}{text}<message><a:y/></message>");
        let (events, err) = run(later.as_bytes(), STANZA_BYTES_MAX);
        assert_eq!(stanzas(&events).len(), 1);
        assert!(matches!(err, Some(NotWellFormed(_))), "{err:?}");
    }

    /// Character references of up to 8 digits pass, leading zeros included.
    #[test]
    fn character_references_of_eight_digits_pass() {
        let text = "<message a='&#x0000004A;'><body>&#00000065;&#x10FFFF;</body></message>";
        let (events, err) = run(format!("{HEADER}{text}").as_bytes(), STANZA_BYTES_MAX);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(stanzas(&events)[0].as_str(), text);
    }

    /// Names may hold any XML name character beyond ASCII.
    #[test]
    fn non_ascii_names_that_are_xml_names_pass() {
        let text = "<message \u{E9}t\u{E9}='1' a\u{B7}b='2'><\u{65E5}\u{672C} xmlns='y' \
                    x\u{300}='3'/></message>";
        let (events, err) = run(format!("{HEADER}{text}").as_bytes(), STANZA_BYTES_MAX);
        assert!(err.is_none(), "{err:?}");
        assert_eq!(stanzas(&events)[0].as_str(), text);
    }

    /// `>` is plain text, and so are `]>` and `]]` before anything but `>`; only `]]>` is not.
    #[test]
    fn right_angle_brackets_in_text_are_text() {
        let text = "<message><body>a > b ]> c ]] > d ]]&gt; e ]]]</body></message>";
        for chunk in [usize::MAX, 1] {
            let mut f = Framer::new(STANZA_BYTES_MAX);
            let input = format!("{HEADER}{text}");
            for piece in input.as_bytes().chunks(chunk.min(input.len())) {
                f.push(piece);
            }
            let (events, err) = drain(&mut f);
            assert!(err.is_none(), "{err:?}");
            assert_eq!(stanzas(&events).len(), 1, "{events:?}");
            assert_eq!(stanzas(&events)[0].as_str(), text);
        }
        // Split anywhere, `]]>` is still found: the stanza's bytes stay in the buffer.
        let bad = format!("{HEADER}<message><body>x]]>y</body></message>");
        let mut f = Framer::new(STANZA_BYTES_MAX);
        for piece in bad.as_bytes().chunks(1) {
            f.push(piece);
        }
        let (_, err) = drain(&mut f);
        assert!(matches!(err, Some(NotWellFormed(_))), "{err:?}");
    }

    #[test]
    fn not_well_formed() {
        for (stanza, what) in [
            ("<message><body></message>", "mismatched tags"),
            ("<message></body>", "mismatched tags"),
            ("</iq>", "end tag at depth 1"),
            ("hello", "text at depth 1"),
            ("<message a='1' a='2'/>", "duplicate attribute"),
            ("<message a='1'b='2'/>", "no whitespace between attributes"),
            ("<message a=1/>", "unquoted value"),
            ("<message a='<'/>", "'<' in value"),
            ("<message><body>a < b</body></message>", "'<' in text"),
            ("<message><body>a & b</body></message>", "bare '&'"),
            (
                "<message><body>&#0;</body></message>",
                "reference to a non-character",
            ),
            (
                "<message><body>&#xD800;</body></message>",
                "reference to a surrogate",
            ),
            (
                "<message><body>&#99999999999;</body></message>",
                "overflowing reference",
            ),
            ("<message><body>\u{1}</body></message>", "control character"),
            ("<1message/>", "bad name start"),
            ("<message/ >", "'/' not before '>'"),
            ("<![CDATA[x]]>", "CDATA at depth 1"),
            ("<message><body>a ]]> b</body></message>", "']]>' in text"),
            (
                "<message><body>]]></body></message>",
                "']]>' at the start of text",
            ),
            ("<message>]]></message>", "']]>' in the stanza's own text"),
            (
                "<message><x\u{B9} xmlns='y'/></message>",
                "U+00B9 in an element name",
            ),
            ("<message a\u{B9}='1'/>", "U+00B9 in an attribute name"),
            ("<message><a:b/></message>", "undeclared element prefix"),
            ("<message a:b='1'/>", "undeclared attribute prefix"),
            (
                "<message><a:b:c xmlns:a='u'/></message>",
                "two colons in a name",
            ),
            (
                "<message><x xmlns:a='u'/><a:y/></message>",
                "a prefix used out of its scope",
            ),
            (
                "<message><x xmlns:a=''/></message>",
                "a prefix declared with no namespace",
            ),
            ("<message><:x/></message>", "an empty prefix"),
            (
                "<message><x xmlns:5r='u'/></message>",
                "a prefix that is no name",
            ),
            (
                "<message><a:-x xmlns:a='u'/></message>",
                "a local part that is no name",
            ),
            (
                "<message><xmlns:x/></message>",
                "the xmlns prefix on an element",
            ),
            (
                "<message><stream:error/></message>",
                "the stream's prefix inside a stanza",
            ),
            (
                "<message><xml:x/></message>",
                "an element in the xml prefix",
            ),
            (
                "<message><x xmlns='http://www.w3.org/XML/1998/namespace'/></message>",
                "the default namespace bound to xml's",
            ),
            (
                "<message><x xmlns:p='http://www.w3.org/2000/xmlns/'/></message>",
                "a prefix bound to xmlns's namespace",
            ),
            ("<message><x xmlns:xml='urn:x'/></message>", "xml rebound"),
            (
                "<message><x xmlns:xmlns='urn:x'/></message>",
                "xmlns declared",
            ),
            (
                "<message><body>&#000000009;</body></message>",
                "a character reference of 9 digits",
            ),
            (
                "<message a='&#x000000041;'/>",
                "a hexadecimal one of 9 digits in a value",
            ),
            (
                "<message \u{B7}a='1'/>",
                "U+00B7 starting an attribute name",
            ),
            (
                "<message><\u{300}x xmlns='y'/></message>",
                "a combining mark starting a name",
            ),
        ] {
            assert!(matches!(error_of(stanza), NotWellFormed(_)), "{what}");
        }
        let bad_utf8 = [
            HEADER.as_bytes(),
            b"<message><body>\xff\xfe</body></message>",
        ]
        .concat();
        assert!(matches!(
            run(&bad_utf8, STANZA_BYTES_MAX).1,
            Some(NotWellFormed(_))
        ));
        let (_, err) = run(b"<stream:stream/>", STANZA_BYTES_MAX);
        assert!(
            matches!(err, Some(NotWellFormed(_))),
            "self-closing header: {err:?}"
        );
        let (events, err) = run(
            format!("{HEADER}</stream:foo>").as_bytes(),
            STANZA_BYTES_MAX,
        );
        assert_eq!(events.len(), 1);
        assert!(
            matches!(err, Some(NotWellFormed(_))),
            "wrong stream end tag: {err:?}"
        );
        assert_eq!(error_of("x").condition(), "not-well-formed");
    }

    #[test]
    fn policy_violations() {
        // Too deep: STANZA_DEPTH_MAX levels are fine, one more is not.
        let nest = |n: usize| format!("{}{}", "<a>".repeat(n), "</a>".repeat(n));
        let (events, err) = run(
            format!("{HEADER}{}", nest(STANZA_DEPTH_MAX)).as_bytes(),
            1 << 20,
        );
        assert_eq!((events.len(), err), (2, None));
        assert!(matches!(
            error_of(&nest(STANZA_DEPTH_MAX + 1)),
            PolicyViolation(_)
        ));

        let attrs = |n: usize| (0..n).map(|i| format!(" a{i}='x'")).collect::<String>();
        let (_, err) = run(
            format!("{HEADER}<iq{}/>", attrs(ELEMENT_ATTRIBUTES_MAX)).as_bytes(),
            STANZA_BYTES_MAX,
        );
        assert_eq!(err, None);
        let too_many = format!("<iq{}/>", attrs(ELEMENT_ATTRIBUTES_MAX + 1));
        assert!(matches!(error_of(&too_many), PolicyViolation(_)));

        let header = format!(
            "<stream:stream to='{}'>",
            "x".repeat(STREAM_HEADER_BYTES_MAX)
        );
        let (_, err) = run(header.as_bytes(), STANZA_BYTES_MAX);
        assert!(matches!(err, Some(PolicyViolation(_))), "{err:?}");
        assert_eq!(PolicyViolation("x").condition(), "policy-violation");
    }

    #[test]
    fn oversized_stanza_is_refused_before_it_ends() {
        const MAX_BYTES: usize = 100;
        let exact = format!(
            "<message><body>{}</body></message>",
            "x".repeat(MAX_BYTES - 32)
        );
        assert_eq!(exact.len(), MAX_BYTES);
        let (events, err) = run(format!("{HEADER}{exact}").as_bytes(), MAX_BYTES);
        assert_eq!((events.len(), err), (2, None));

        // One byte over: refused, and never buffered past the limit.
        let mut f = Framer::new(MAX_BYTES);
        f.push(HEADER.as_bytes());
        assert!(matches!(f.next_event(), Ok(Some(Event::StreamOpen(_)))));
        f.push(b"<message><body>");
        let mut refused = false;
        for _ in 0..MAX_BYTES {
            f.push(b"y");
            match f.next_event() {
                Ok(None) => assert!(f.buffered_bytes() <= MAX_BYTES),
                Err(e) => {
                    assert!(matches!(e, PolicyViolation(_)));
                    refused = true;
                    break;
                }
                Ok(Some(ev)) => panic!("unexpected {ev:?}"),
            }
        }
        assert!(refused, "the stanza never ended, yet was never refused");
        // Poisoned: the same error again, and pushes are ignored.
        f.push(b"</body></message>");
        assert!(matches!(f.next_event(), Err(PolicyViolation(_))));
        assert_eq!(f.buffered_bytes(), 0);
    }

    #[test]
    fn reset_starts_a_new_stream() {
        let mut f = Framer::new(STANZA_BYTES_MAX);
        f.push(format!("{HEADER}<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>").as_bytes());
        let (events, err) = drain(&mut f);
        assert_eq!((events.len(), err), (2, None));
        f.push(b"<partial");
        assert_eq!(f.next_event(), Ok(None));
        assert_eq!(f.buffered_bytes(), 8);
        f.reset();
        assert_eq!(f.buffered_bytes(), 0);
        // A new header (with an XML declaration, only allowed at a stream's start) is accepted.
        f.push(format!("<?xml version='1.0'?>{HEADER}<iq id='1'/>").as_bytes());
        let (events, err) = drain(&mut f);
        assert_eq!(err, None);
        assert!(matches!(events[0], Event::StreamOpen(_)));
        assert_eq!(stanzas(&events)[0].id().as_deref(), Some("1"));
        // An error is cleared by reset too.
        f.push(b"<!--");
        assert!(f.next_event().is_err());
        f.reset();
        f.push(HEADER.as_bytes());
        assert!(matches!(f.next_event(), Ok(Some(Event::StreamOpen(_)))));
    }

    /// Goal: `restart` (after SASL success) begins a new stream but keeps what the client
    /// pipelined after the last event: the new header and a stanza, whole or split.
    #[test]
    fn restart_keeps_pipelined_bytes() {
        let auth =
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>";
        for split in [0, 5, HEADER.len() + 3] {
            let mut f = Framer::new(STANZA_BYTES_MAX);
            let rest = format!("<?xml version='1.0'?>{HEADER}<iq id='1'/>");
            f.push(format!("{HEADER}{auth}{}", &rest[..split]).as_bytes());
            assert!(matches!(f.next_event(), Ok(Some(Event::StreamOpen(_)))));
            assert!(matches!(f.next_event(), Ok(Some(Event::Stanza(_)))));
            f.restart();
            f.push(&rest.as_bytes()[split..]);
            let (events, err) = drain(&mut f);
            assert_eq!(err, None, "split {split}");
            assert!(matches!(events[0], Event::StreamOpen(_)), "split {split}");
            assert_eq!(stanzas(&events)[0].id().as_deref(), Some("1"));
        }
    }

    #[test]
    fn utf8_split_across_pushes() {
        let text = "<message to='日本'><body>é🎉</body></message>";
        let mut f = Framer::new(STANZA_BYTES_MAX);
        f.push(HEADER.as_bytes());
        assert!(matches!(f.next_event(), Ok(Some(Event::StreamOpen(_)))));
        let bytes = text.as_bytes();
        let cut = text.find('🎉').expect("emoji") + 2; // inside the 4-byte sequence
        f.push(&bytes[..cut]);
        assert_eq!(f.next_event(), Ok(None));
        f.push(&bytes[cut..]);
        let Ok(Some(Event::Stanza(s))) = f.next_event() else {
            panic!()
        };
        assert_eq!(s.as_str(), text);
        assert_eq!(s.to().as_deref(), Some("日本"));
    }
}
