//! Property tests of the framer: a stream of random valid stanzas gives the same events however
//! its bytes are split into pushes, and each stanza's bytes are exactly its serialized text.

use proptest::prelude::*;
use shared::escape::escape;
use shared::framer::{Event, FrameError, Framer};
use shared::limits::STANZA_BYTES_MAX;

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";
const CLOSE: &str = "</stream:stream>";

const TOP_NAMES: &[&str] = &["message", "presence", "iq", "r", "sm:a"];
const CHILD_NAMES: &[&str] = &["body", "x", "query", "item", "pubsub:items", "thread"];
const ATTR_NAMES: &[&str] = &[
    "to", "from", "id", "type", "xmlns", "xml:lang", "jid", "node",
];

#[derive(Debug, Clone)]
enum Node {
    Element(Element),
    Text(String),
    Cdata(String),
}

#[derive(Debug, Clone)]
struct Element {
    name: &'static str,
    /// Name, unescaped value, quote byte.
    attrs: Vec<(&'static str, String, char)>,
    children: Vec<Node>,
}

/// Values mixing ASCII, characters that need escaping and multi-byte UTF-8.
fn value() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            "a", "Z", "0", " ", "é", "日本", "🎉", "&", "<", ">", "'", "\"", "@/", "]", "]>",
        ]),
        0..6,
    )
    .prop_map(|parts| parts.concat())
}

fn attrs() -> impl Strategy<Value = Vec<(&'static str, String, char)>> {
    // A subset of distinct names, so no element has a duplicate attribute.
    prop::sample::subsequence(ATTR_NAMES.to_vec(), 0..=4).prop_flat_map(|names| {
        let n = names.len();
        (
            Just(names),
            prop::collection::vec(value(), n),
            prop::collection::vec(prop::sample::select(vec!['\'', '"']), n),
        )
            .prop_map(|(names, values, quotes)| {
                names
                    .into_iter()
                    .zip(values)
                    .zip(quotes)
                    .map(|((a, v), q)| (a, v, q))
                    .collect()
            })
    })
}

fn node() -> impl Strategy<Value = Node> {
    let leaf = prop_oneof![
        value().prop_map(Node::Text),
        // CDATA may hold anything but its terminator.
        value().prop_map(|mut v| {
            // Removing one terminator can join the pieces into another.
            while v.contains("]]>") {
                v = v.replace("]]>", "");
            }
            Node::Cdata(v)
        }),
        (prop::sample::select(CHILD_NAMES.to_vec()), attrs()).prop_map(|(name, attrs)| {
            Node::Element(Element {
                name,
                attrs,
                children: vec![],
            })
        }),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        (
            prop::sample::select(CHILD_NAMES.to_vec()),
            attrs(),
            prop::collection::vec(inner, 0..4),
        )
            .prop_map(|(name, attrs, children)| {
                Node::Element(Element {
                    name,
                    attrs,
                    children,
                })
            })
    })
}

fn stanza() -> impl Strategy<Value = Element> {
    (
        prop::sample::select(TOP_NAMES.to_vec()),
        attrs(),
        prop::collection::vec(node(), 0..4),
    )
        .prop_map(|(name, attrs, children)| Element {
            name,
            attrs,
            children,
        })
}

fn write_element(e: &Element, out: &mut String) {
    out.push('<');
    out.push_str(e.name);
    // A prefixed name declares its prefix (the framer requires it declared in the stanza).
    if let Some((prefix, _)) = e.name.split_once(':') {
        out.push_str(&format!(" xmlns:{prefix}='urn:test:{prefix}'"));
    }
    for (name, value, quote) in &e.attrs {
        out.push_str(&format!(" {name}={quote}{}{quote}", escape(value)));
    }
    if e.children.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    for child in &e.children {
        match child {
            Node::Element(c) => write_element(c, out),
            Node::Text(t) => out.push_str(&escape(t)),
            Node::Cdata(t) => out.push_str(&format!("<![CDATA[{t}]]>")),
        }
    }
    out.push_str(&format!("</{}>", e.name));
}

/// Feeds `chunks` in order, draining events after each; stops at the first error.
fn events_of<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Vec<Result<Event, FrameError>> {
    events_limited(STANZA_BYTES_MAX, chunks)
}

fn events_limited<'a>(
    stanza_bytes_max: usize,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> Vec<Result<Event, FrameError>> {
    let mut framer = Framer::new(stanza_bytes_max);
    let mut events = Vec::new();
    for chunk in chunks {
        framer.push(chunk);
        loop {
            match framer.next_event() {
                Ok(Some(ev)) => events.push(Ok(ev)),
                Ok(None) => break,
                Err(e) => {
                    events.push(Err(e));
                    return events;
                }
            }
        }
    }
    events
}

/// The SASL element after which the stream restarts (RFC 6120 §6.4.6).
const AUTH: &str =
    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AGEAYg==</auth>";

type Events = Vec<Result<Event, FrameError>>;

/// Feeds `chunks`, calling `Framer::restart` right after the `<auth/>` stanza's event, as the
/// c2s machine does on SASL success; returns the events up to it and those after it.
fn events_with_restart<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Events, Events) {
    let mut framer = Framer::new(STANZA_BYTES_MAX);
    let (mut old, mut new) = (Vec::new(), Vec::new());
    let mut restarted = false;
    for chunk in chunks {
        framer.push(chunk);
        loop {
            let ev = match framer.next_event() {
                Ok(Some(ev)) => Ok(ev),
                Ok(None) => break,
                Err(e) => Err(e),
            };
            let failed = ev.is_err();
            let auth = matches!(&ev, Ok(Event::Stanza(s)) if s.name() == "auth");
            if restarted {
                new.push(ev)
            } else {
                old.push(ev)
            }
            if failed {
                return (old, new);
            }
            if auth && !restarted {
                framer.restart();
                restarted = true;
            }
        }
    }
    (old, new)
}

/// Splits `bytes` at the given points (taken modulo its length, sorted).
fn split_at<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut from = 0;
    for p in points {
        chunks.push(&bytes[from..p]);
        from = p;
    }
    chunks.push(&bytes[from..]);
    chunks
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn splitting_never_changes_events(
        stanzas in prop::collection::vec(stanza(), 0..6),
        gaps in prop::collection::vec(prop::sample::select(vec!["", " ", "\n", "\r\n\t "]), 6),
        cuts in prop::collection::vec(any::<usize>(), 0..12),
    ) {
        let texts: Vec<String> = stanzas
            .iter()
            .map(|s| {
                let mut out = String::new();
                write_element(s, &mut out);
                out
            })
            .collect();
        let mut stream = String::from(HEADER);
        for (i, t) in texts.iter().enumerate() {
            stream.push_str(gaps[i % gaps.len()]);
            stream.push_str(t);
        }
        stream.push_str(CLOSE);
        let bytes = stream.as_bytes();

        let whole = events_of([bytes]);
        prop_assert_eq!(whole.len(), texts.len() + 2, "{:?}", whole);
        prop_assert!(matches!(&whole[0], Ok(Event::StreamOpen(h)) if h.to.as_deref() == Some("example.com")));
        prop_assert_eq!(whole.last(), Some(&Ok(Event::StreamClose)));
        for ((ev, text), elem) in whole[1..].iter().zip(&texts).zip(&stanzas) {
            let Ok(Event::Stanza(s)) = ev else {
                return Err(TestCaseError::fail(format!("expected a stanza, got {ev:?}")));
            };
            prop_assert_eq!(s.as_str(), text.as_str());
            prop_assert_eq!(s.name(), elem.name);
            let attr = |n: &str| elem.attrs.iter().find(|a| a.0 == n).map(|a| a.1.clone());
            prop_assert_eq!(s.to().map(|c| c.into_owned()), attr("to"));
            prop_assert_eq!(s.from().map(|c| c.into_owned()), attr("from"));
            prop_assert_eq!(s.id().map(|c| c.into_owned()), attr("id"));
            prop_assert_eq!(s.type_().map(|c| c.into_owned()), attr("type"));
            prop_assert_eq!(s.xmlns().map(|c| c.into_owned()), attr("xmlns"));
            prop_assert_eq!(s.header.self_closing, elem.children.is_empty());
            // Stamping `from` keeps the element parseable and the other attributes intact.
            let stamped = s.with_from("日本@example.com/🎉");
            let mut again = events_of([HEADER.as_bytes(), stamped.bytes.as_ref()]);
            prop_assert_eq!(again.len(), 2);
            let Some(Ok(Event::Stanza(re))) = again.pop() else {
                return Err(TestCaseError::fail("stamped stanza did not frame"));
            };
            prop_assert_eq!(re.from().map(|c| c.into_owned()), Some("日本@example.com/🎉".to_owned()));
            prop_assert_eq!(re.to().map(|c| c.into_owned()), attr("to"));
            prop_assert_eq!(re.id().map(|c| c.into_owned()), attr("id"));
        }

        prop_assert_eq!(&events_of(split_at(bytes, &cuts)), &whole);
        prop_assert_eq!(&events_of(bytes.chunks(1)), &whole);
    }

    /// A client that pipelines its restarted stream behind its SASL `<auth/>`: with `restart`
    /// called right after the auth's event, however the bytes were split, the new stream's
    /// events are those of the new stream framed alone.
    #[test]
    fn restart_after_auth_keeps_the_pipelined_stream(
        first in prop::collection::vec(stanza(), 0..3),
        second in prop::collection::vec(stanza(), 0..4),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let text = |stanzas: &[Element]| {
            let mut out = String::new();
            for st in stanzas {
                write_element(st, &mut out);
            }
            out
        };
        let old_stream = format!("{HEADER}{}{AUTH}", text(&first));
        let new_stream = format!("{HEADER}{}{CLOSE}", text(&second));
        let bytes = format!("{old_stream}{new_stream}").into_bytes();
        let want_old = events_of([old_stream.as_bytes()]);
        let want_new = events_of([new_stream.as_bytes()]);
        for chunks in [split_at(&bytes, &cuts), bytes.chunks(1).collect()] {
            let (old, new) = events_with_restart(chunks);
            prop_assert_eq!(&old, &want_old);
            prop_assert_eq!(&new, &want_new);
        }
    }

    #[test]
    fn arbitrary_bytes_split_anywhere_agree(
        body in prop::collection::vec(
            prop::sample::select(b"<>/='\"&;#x!?-[]abmsg: \n\xc3\xa9\xff".to_vec()),
            0..200,
        ),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        stanza_bytes_max in 1usize..64,
    ) {
        // Mostly garbage, with a small limit so size errors occur too: whatever the verdict, it
        // must not depend on the split.
        let input = [HEADER.as_bytes(), &body].concat();
        let whole = events_limited(stanza_bytes_max, [input.as_slice()]);
        prop_assert_eq!(&events_limited(stanza_bytes_max, split_at(&input, &cuts)), &whole);
        prop_assert_eq!(&events_limited(stanza_bytes_max, input.chunks(1)), &whole);
        for ev in whole.iter().flatten() {
            if let Event::Stanza(s) = ev {
                prop_assert!(s.bytes.len() <= stanza_bytes_max);
            }
        }
    }
}

/// The fuzz seed corpus goes through the same checks as the fuzz targets, so the seeds stay
/// meaningful and the checks run without nightly.
#[test]
fn fuzz_seeds_agree_whole_and_byte_by_byte() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/framer");
    let mut seeds = 0;
    for entry in std::fs::read_dir(dir).expect("seed corpus") {
        let data = std::fs::read(entry.expect("seed").path()).expect("seed bytes");
        // The fuzz target `framer` uses the first byte to choose a split point.
        let input = &data[1..];
        let whole = events_of([input]);
        assert!(matches!(
            whole.first(),
            Some(Ok(Event::StreamOpen(_))) | Some(Err(_))
        ));
        assert_eq!(events_of(input.chunks(1)), whole);
        seeds += 1;
    }
    assert!(seeds >= 5, "seed corpus missing");
}
