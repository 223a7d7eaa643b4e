//! Building `Stanza` values the router emits (replies, errors, pushes, probes, re-addressed
//! presence) with a header computed exactly, without the framer. Cold paths only.
//!
//! Everything here assumes well-formed input: either our own output or bytes the framer already
//! validated. On anything else the functions return `None` rather than panic.

use std::ops::Range;

use bytes::Bytes;
use shared::escape::escape;
use shared::stanza::{Header, Kind, Stanza};

/// One attribute of a start tag: its qualified name and the raw (still escaped) value range.
#[derive(Debug, Clone)]
struct Attr {
    /// Whole attribute including leading whitespace, name, `=`, quotes.
    whole: Range<usize>,
    name: Range<usize>,
    value: Range<usize>,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Scans the start tag of `text` (which must begin with `<`). Returns the name range, the
/// attributes, the offset of the `>` (or the `/` of `/>`), and whether the element is empty.
fn scan_start_tag(text: &[u8]) -> Option<(Range<usize>, Vec<Attr>, usize, bool)> {
    if text.first() != Some(&b'<') {
        return None;
    }
    let mut i = 1;
    let name_start = i;
    while i < text.len() && !is_ws(text[i]) && text[i] != b'>' && text[i] != b'/' {
        i += 1;
    }
    let name = name_start..i;
    if name.is_empty() {
        return None;
    }
    let mut attrs = Vec::new();
    loop {
        let attr_start = i;
        while i < text.len() && is_ws(text[i]) {
            i += 1;
        }
        match text.get(i)? {
            b'>' => return Some((name, attrs, i, false)),
            b'/' => {
                if text.get(i + 1) == Some(&b'>') {
                    return Some((name, attrs, i, true));
                }
                return None;
            }
            _ => {}
        }
        if i == attr_start {
            // An attribute must be preceded by whitespace.
            return None;
        }
        let an_start = i;
        while i < text.len()
            && !is_ws(text[i])
            && text[i] != b'='
            && text[i] != b'>'
            && text[i] != b'/'
        {
            i += 1;
        }
        let an = an_start..i;
        if an.is_empty() {
            return None;
        }
        while i < text.len() && is_ws(text[i]) {
            i += 1;
        }
        if text.get(i)? != &b'=' {
            return None;
        }
        i += 1;
        while i < text.len() && is_ws(text[i]) {
            i += 1;
        }
        let quote = *text.get(i)?;
        if quote != b'\'' && quote != b'"' {
            return None;
        }
        i += 1;
        let v_start = i;
        while i < text.len() && text[i] != quote {
            if text[i] == b'<' {
                return None;
            }
            i += 1;
        }
        if i >= text.len() {
            return None;
        }
        let value = v_start..i;
        i += 1;
        attrs.push(Attr {
            whole: attr_start..i,
            name: an,
            value,
        });
    }
}

fn kind_of(name: &str) -> Kind {
    match name {
        "message" => Kind::Message,
        "presence" => Kind::Presence,
        "iq" => Kind::Iq,
        _ => Kind::Other,
    }
}

/// Builds a `Stanza` from complete element bytes by locating the start tag's attributes. The
/// bytes must be one well-formed element (our own output, or framed input). Returns `None` if the
/// start tag cannot be scanned or the text is not UTF-8. Only the start tag is checked.
pub fn from_bytes(bytes: Bytes) -> Option<Stanza> {
    let text = std::str::from_utf8(&bytes).ok()?;
    let (name, attrs, end, self_closing) = scan_start_tag(text.as_bytes())?;
    let mut header = Header {
        name: name.clone(),
        start_tag_end: end,
        self_closing,
        ..Header::default()
    };
    for a in &attrs {
        let slot = match &text[a.name.clone()] {
            "to" => &mut header.to,
            "from" => {
                header.from_attr = Some(a.whole.clone());
                &mut header.from
            }
            "id" => &mut header.id,
            "type" => &mut header.type_,
            "xmlns" => &mut header.xmlns,
            _ => continue,
        };
        if slot.is_some() {
            // Duplicate attribute: not well-formed.
            return None;
        }
        *slot = Some(a.value.clone());
    }
    let kind = kind_of(&text[name]);
    Some(Stanza {
        kind,
        header,
        bytes,
    })
}

/// The attributes of a stanza to build. `None` leaves the attribute out.
#[derive(Debug, Clone, Copy, Default)]
pub struct Attrs<'a> {
    pub to: Option<&'a str>,
    pub from: Option<&'a str>,
    pub id: Option<&'a str>,
    pub type_: Option<&'a str>,
}

fn push_attr(out: &mut String, name: &str, value: Option<&str>) {
    if let Some(v) = value {
        out.push(' ');
        out.push_str(name);
        out.push_str("='");
        out.push_str(&escape(v));
        out.push('\'');
    }
}

/// Builds `<name to from id type>inner</name>` (or `<name .../>` when `inner` is empty).
/// Attribute values are escaped here; `inner` must already be well-formed XML content.
///
/// # Panics
/// If `name` is not a valid element name (a programming error: names are literals).
pub fn stanza(name: &str, attrs: Attrs<'_>, inner: &str) -> Stanza {
    let mut out = String::with_capacity(64 + inner.len());
    out.push('<');
    out.push_str(name);
    push_attr(&mut out, "to", attrs.to);
    push_attr(&mut out, "from", attrs.from);
    push_attr(&mut out, "id", attrs.id);
    push_attr(&mut out, "type", attrs.type_);
    if inner.is_empty() {
        out.push_str("/>");
    } else {
        out.push('>');
        out.push_str(inner);
        out.push_str("</");
        out.push_str(name);
        out.push('>');
    }
    from_bytes(Bytes::from(out)).expect("builder output is a well-formed start tag")
}

/// Returns a copy of `original` with `to` and `from` replaced (every other attribute and the
/// content kept as written). `None` for either removes that attribute.
pub fn readdress(original: &Stanza, to: Option<&str>, from: Option<&str>) -> Stanza {
    let text = original.as_str();
    let Some((name, attrs, end, _)) = scan_start_tag(text.as_bytes()) else {
        // Cannot happen for framed or built stanzas; keep the original rather than panic.
        return original.clone();
    };
    let mut out = String::with_capacity(text.len() + 64);
    out.push('<');
    out.push_str(&text[name.clone()]);
    push_attr(&mut out, "to", to);
    push_attr(&mut out, "from", from);
    for a in &attrs {
        match &text[a.name.clone()] {
            "to" | "from" => {}
            _ => out.push_str(&text[a.whole.clone()]),
        }
    }
    out.push_str(&text[end..]);
    from_bytes(Bytes::from(out)).unwrap_or_else(|| original.clone())
}

/// Parses the stanza with minidom for cold paths (IQ payloads, presence children). Stanzas
/// inherit `jabber:client` from the stream and carry no `xmlns` of their own, which minidom
/// refuses, so the declaration is inserted when missing. `None` if minidom rejects the text.
pub fn parse(stanza: &Stanza) -> Option<minidom::Element> {
    let text = stanza.as_str();
    if stanza.header.xmlns.is_some() {
        return parse_element(text).ok();
    }
    let at = stanza.header.name.end;
    if at > text.len() || !text.is_char_boundary(at) {
        return None;
    }
    let mut s = String::with_capacity(text.len() + 24);
    s.push_str(&text[..at]);
    s.push_str(" xmlns='jabber:client'");
    s.push_str(&text[at..]);
    parse_element(&s).ok()
}

/// The resource an RFC 6120 §7 bind request asks for, read straight from the bytes of an iq
/// the framer validated: `Some(None)` for no or an empty `<resource/>`, `Some(Some(text))`
/// (unescaped) for one. Only the plain shape every client sends is read here: the iq's only
/// child `<bind xmlns='NS'>` (that one attribute), holding nothing or only
/// `<resource>text</resource>` (no attribute, text without markup), whitespace around them.
/// Anything else (comments, CDATA, prefixes, more attributes or children) is `None`, and the
/// caller parses a tree (`parse`) as before: this saves a login ~7 us of rxml and minidom and
/// their allocations (`perf record` over a storm) without deciding anything differently.
pub fn bind_request(stanza: &Stanza, ns: &str) -> Option<Option<String>> {
    let text = stanza.as_str();
    // A literal carriage return: XML parsers turn it into a line feed in text (XML 1.0 §2.11),
    // and rxml refuses one alone in an attribute value, where the framer takes it (both found
    // by the fuzz target). No client puts one in a bind request: the tree decides those.
    if text.contains('\r') {
        return None;
    }
    let body = text.strip_suffix("</iq>")?;
    let (name, attrs, gt, empty) = scan_start_tag(body.as_bytes())?;
    // A prefixed attribute (its prefix's declaration, `xml:lang`): the tree decides those. The
    // `bind_request` fuzz target found a prefix bound nowhere here, which the framer now refuses.
    if empty || &body[name] != "iq" || attrs.iter().any(|a| body[a.name.clone()].contains(':')) {
        return None;
    }
    let inner = body[gt + 1..].trim_matches(is_xml_ws);
    let (name, attrs, gt, empty) = scan_start_tag(inner.as_bytes())?;
    if &inner[name] != "bind"
        || attrs.len() != 1
        || &inner[attrs[0].name.clone()] != "xmlns"
        || &inner[attrs[0].value.clone()] != ns
    {
        return None;
    }
    if empty {
        return (inner[gt..] == *"/>").then_some(None);
    }
    let content = inner[gt + 1..]
        .strip_suffix("</bind>")?
        .trim_matches(is_xml_ws);
    if content.is_empty() || content == "<resource/>" {
        return Some(None);
    }
    let resource = content
        .strip_prefix("<resource>")?
        .strip_suffix("</resource>")?;
    if resource.contains('<') {
        return None;
    }
    let resource = shared::escape::unescape(resource)?;
    Some((!resource.is_empty()).then(|| resource.into_owned()))
}

/// What `bind_request` reads, from a parsed tree: any shape of bind request. `None` if the
/// stanza does not parse or has no `bind` child.
pub fn bind_request_parsed(stanza: &Stanza, ns: &str) -> Option<Option<String>> {
    let iq = parse(stanza)?;
    let bind = iq.get_child("bind", ns)?;
    let resource = bind.get_child("resource", ns).map(|r| r.text());
    Some(resource.filter(|r| !r.is_empty()))
}

fn is_xml_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\r' | '\n')
}

/// Parses one element held whole in `text`, as `text.parse::<minidom::Element>()` does (the
/// same rxml parser and tree builder, the first root element; bytes after it are not read),
/// but without minidom's reader: that one treats its input as a stream and before each event
/// asks rxml for one from no new bytes, which rxml answers with a `WouldBlock` `io::Error`
/// (three allocations each, ~15 times per login). Told that `text` is all there is, rxml
/// never runs out of buffer.
pub fn parse_element(text: &str) -> Result<minidom::Element, minidom::Error> {
    use rxml::Parse as _;
    let mut parser = rxml::RawParser::default();
    let mut builder = minidom::tree_builder::TreeBuilder::new();
    let mut rest = text.as_bytes();
    // Ends: told that `text` is all there is, rxml returns `None` or an error once it is used up.
    while let Some(event) = parser.parse(&mut rest, true)? {
        builder.process_event(event)?;
        if let Some(root) = builder.root.take() {
            return Ok(root);
        }
    }
    Err(minidom::Error::EndOfDocument)
}

/// Escapes text content (same escaping as attribute values; safe in both).
pub fn esc(s: &str) -> std::borrow::Cow<'_, str> {
    escape(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: `parse_element` is minidom's `FromStr` without its streaming reader: the same tree
    /// or the same refusal. Method: both on well-formed stanzas, SASL2 and bind payloads, text
    /// with entities and CDATA, trailing bytes, and broken, truncated or unbound-prefix input.
    #[test]
    fn parse_element_agrees_with_minidom() {
        let cases = [
            "<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
             <resource>r&amp;1</resource></bind></iq>",
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>AGFsaWNlAHB3\
             </initial-response><user-agent id='d4565fa7'><software>T</software></user-agent>\
             <bind xmlns='urn:xmpp:bind:0'><tag>Phone</tag><enable xmlns='urn:xmpp:sm:3' \
             resume='true'/></bind></authenticate>",
            "<message xmlns='jabber:client' xmlns:x='urn:x' x:a='1'><body><![CDATA[<b>]]> &#x263a;\
             </body><x:y/></message>",
            "<a xmlns='urn:a'/>",
            "<?xml version='1.0'?><a xmlns='urn:a'>t</a>",
            "<a xmlns='urn:a'/><b/>trailing",
            "<a xmlns='urn:a'>",
            "<a xmlns='urn:a'></b>",
            "<p:a/>",
            "<a xmlns='urn:a' x='1' x='2'/>",
            "",
            "text only",
        ];
        for case in cases {
            let ours = parse_element(case);
            let theirs = case.parse::<minidom::Element>();
            match (ours, theirs) {
                (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs, "{case}"),
                (Err(_), Err(_)) => {}
                (ours, theirs) => panic!("{case}: ours {ours:?}, minidom's {theirs:?}"),
            }
        }
        assert!(parse_element(cases[0]).is_ok());
        assert!(parse_element(cases[6]).is_err());
    }

    #[test]
    fn built_header_is_exact() {
        let s = stanza(
            "message",
            Attrs {
                to: Some("a@b/c"),
                from: Some("x'y@z"),
                id: Some("1"),
                type_: Some("chat"),
            },
            "<body>hi</body>",
        );
        assert_eq!(s.kind, Kind::Message);
        assert_eq!(s.to().as_deref(), Some("a@b/c"));
        assert_eq!(s.from().as_deref(), Some("x'y@z"));
        assert_eq!(s.id().as_deref(), Some("1"));
        assert_eq!(s.type_().as_deref(), Some("chat"));
        assert_eq!(
            &s.as_str()[s.header.start_tag_end..s.header.start_tag_end + 1],
            ">"
        );
        assert!(!s.header.self_closing);
        let f = s.with_from("q@r");
        assert_eq!(f.from().as_deref(), Some("q@r"));
        assert_eq!(f.to().as_deref(), Some("a@b/c"));
    }

    #[test]
    fn empty_and_readdress() {
        let s = stanza("presence", Attrs::default(), "");
        assert!(s.header.self_closing);
        assert_eq!(s.as_str(), "<presence/>");
        let t = from_bytes(Bytes::from_static(
            b"<presence xml:lang='en' from='a@b/r' id=\"p>1\"><show>away</show></presence>",
        ))
        .unwrap();
        assert_eq!(t.id().as_deref(), Some("p>1"));
        let r = readdress(&t, Some("c@d"), Some("a@b/r"));
        assert_eq!(
            r.as_str(),
            "<presence to='c@d' from='a@b/r' xml:lang='en' id=\"p>1\"><show>away</show></presence>"
        );
        assert_eq!(r.to().as_deref(), Some("c@d"));
        assert_eq!(r.id().as_deref(), Some("p>1"));
        let el = parse(&r).unwrap();
        assert_eq!(el.name(), "presence");
    }

    #[test]
    fn malformed_start_tags_are_refused() {
        for bad in [
            "",
            "x",
            "<",
            "<a b>",
            "<a b='1>",
            "<a b='1'c='2'/>",
            "<a to='1' to='2'/>",
        ] {
            assert!(from_bytes(Bytes::from(bad.to_string())).is_none(), "{bad}");
        }
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Goal: the start-tag scanner never panics, and whatever it accepts round-trips through
        // `readdress` with exact header ranges.
        #[test]
        fn scanner_never_panics(s in "<[a-z]{1,8}( [a-z:]{1,5}=('[^'<]*'|\"[^\"<]*\")){0,4} ?/?>.{0,20}") {
            if let Some(st) = from_bytes(Bytes::from(s.clone())) {
                let r = readdress(&st, Some("a@b"), Some("c@d/e"));
                let (to, from) = (r.to().map(|c| c.into_owned()), r.from().map(|c| c.into_owned()));
                prop_assert_eq!(to.as_deref(), Some("a@b"));
                prop_assert_eq!(from.as_deref(), Some("c@d/e"));
                prop_assert_eq!(r.name(), st.name());
                let _ = parse(&r);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(s in ".{0,64}") {
            let _ = from_bytes(Bytes::from(s));
        }

        // Goal: `bind_request` reads what the tree does, or declines. Method: bind iqs with
        // generated resources (escaped: entities, quotes, non-ASCII), whitespace and optional
        // extras that force the tree; where the fast path answers, it equals the tree's answer.
        #[test]
        fn bind_request_agrees_with_the_tree(
            resource in "[a-zA-Z0-9 &<>'\"é/@.]{0,12}",
            ws in "[ \n]{0,2}",
            shape in 0..6usize,
        ) {
            let r = shared::escape::escape(&resource);
            let bind = match shape {
                0 => format!("<bind xmlns='{NS}'>{ws}<resource>{r}</resource>{ws}</bind>"),
                1 => format!("<bind xmlns='{NS}'/>"),
                2 => format!("<bind xmlns='{NS}'>{ws}</bind>"),
                3 => format!("<bind xmlns='{NS}'><resource>{r}</resource><!-- c --></bind>"),
                4 => format!("<bind xmlns='{NS}'><resource xml:lang='en'>{r}</resource></bind>"),
                _ => format!("<bind xmlns='other'><resource>{r}</resource></bind>"),
            };
            let text = format!("<iq type='set' id='b'>{ws}{bind}{ws}</iq>");
            let stanza = from_bytes(Bytes::from(text.clone())).expect("scannable");
            let tree = bind_request_parsed(&stanza, NS);
            let fast = bind_request(&stanza, NS);
            if shape >= 3 {
                prop_assert_eq!(fast, None, "{}", text);
            } else {
                prop_assert_eq!(fast.clone(), tree.clone(), "{}", text);
                prop_assert!(fast.is_some(), "{}", text);
            }
        }
    }

    const NS: &str = "urn:ietf:params:xml:ns:xmpp-bind";

    #[test]
    fn bind_request_declines_what_it_does_not_read() {
        for text in [
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind><x/></iq>",
            "<iq type='set' id='b'><b:bind xmlns:b='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource><![CDATA[r]]></resource></bind></iq>",
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind' x='1'/></iq>",
            "<iq type='set' id='b'/>",
            // An unbound attribute prefix: the tree refuses the iq, so the bind must fail too.
            "<iq type='set' p:x='1' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>r</resource></bind></iq>",
            "<iq type='set' xml:lang='en' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
            // A literal CR in the text (the tree reads a line feed) or in an attribute value
            // (rxml refuses it alone there).
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>a\rb</resource></bind></iq>",
            "<iq type='set' id='b\ry'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
        ] {
            let stanza = from_bytes(Bytes::from(text)).expect("scannable");
            assert_eq!(bind_request(&stanza, NS), None, "{text}");
        }
        let stanza = from_bytes(Bytes::from(
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>a&amp;b</resource></bind></iq>",
        ))
        .unwrap();
        assert_eq!(bind_request(&stanza, NS), Some(Some("a&b".to_owned())));
        // A carriage return written as a character reference stays one, as in the tree.
        let stanza = from_bytes(Bytes::from(
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>a&#13;b</resource></bind></iq>",
        ))
        .unwrap();
        assert_eq!(bind_request(&stanza, NS), Some(Some("a\rb".to_owned())));
    }
}
