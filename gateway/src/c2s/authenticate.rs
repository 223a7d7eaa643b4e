//! The XEP-0388 `<authenticate/>` request read straight from rxml's namespace-aware events,
//! without building a minidom tree: a login's one parse, and the tree cost ~30 allocations (an
//! owned name, namespace, prefix map and attribute map per element). The fields are what
//! minidom's `get_child` (the first child of that name and namespace) and `text()` (the
//! element's own text) would give, so the machine's checks stay as they were.

use rxml::{Event, Namespace, Parse as _};

use super::{NS_BIND2, NS_IAP, NS_SASL2, NS_SM3};

/// What an `<authenticate/>` holds; `Option` is `None` when the child is absent.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Authenticate {
    /// The root's `mechanism`.
    pub mechanism: Option<String>,
    /// XEP-0509 `<config-version/>`: its `value`.
    pub config_version: Option<Option<String>>,
    /// `<initial-response/>`: its text, untrimmed.
    pub initial_response: Option<String>,
    /// `<user-agent/>`: its `id`.
    pub user_agent: Option<Option<String>>,
    /// XEP-0386 `<bind/>`.
    pub bind: Option<Bind>,
    /// XEP-0198 `<resume/>`: its `previd` and `h`.
    pub resume: Option<(Option<String>, Option<String>)>,
}

/// A XEP-0386 `<bind/>` as sent.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Bind {
    /// `<tag/>`: its text, untrimmed.
    pub tag: Option<String>,
    /// XEP-0198 `<enable/>`: its `resume`.
    pub enable: Option<Option<String>>,
}

/// What an open element is to the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Root,
    InitialResponse,
    Bind,
    Tag,
    /// Anything else: its text and children are not read.
    Other,
}

/// Parses `text`, one whole `<authenticate/>` element (bytes after it are not read). `None`
/// when it is not well-formed or namespace-valid XML (a repeated attribute too, which minidom
/// let through with its last value).
pub(super) fn parse(text: &str) -> Option<Authenticate> {
    let mut parser = rxml::Parser::default();
    let mut rest = text.as_bytes();
    let mut request = Authenticate::default();
    // The elements open now, outermost first; at most as deep as the stanza, which the framer
    // has bounded in bytes.
    let mut open: Vec<Open> = Vec::with_capacity(4);
    // Ends: told that `text` is all there is, rxml returns `None` or an error once it is used up.
    while let Some(event) = parser.parse(&mut rest, true).ok()? {
        match event {
            Event::XmlDeclaration(..) => {}
            Event::StartElement(_, (ns, name), attrs) => {
                let attr = |key: &str| attrs.get(Namespace::none(), key).map(|v| v.to_string());
                let this = match (open.last(), ns.as_str(), name.as_str()) {
                    (None, _, _) => {
                        request.mechanism = attr("mechanism");
                        Open::Root
                    }
                    (Some(Open::Root), NS_IAP, "config-version")
                        if request.config_version.is_none() =>
                    {
                        request.config_version = Some(attr("value"));
                        Open::Other
                    }
                    (Some(Open::Root), NS_SASL2, "initial-response")
                        if request.initial_response.is_none() =>
                    {
                        request.initial_response = Some(String::new());
                        Open::InitialResponse
                    }
                    (Some(Open::Root), NS_SASL2, "user-agent") if request.user_agent.is_none() => {
                        request.user_agent = Some(attr("id"));
                        Open::Other
                    }
                    (Some(Open::Root), NS_BIND2, "bind") if request.bind.is_none() => {
                        request.bind = Some(Bind::default());
                        Open::Bind
                    }
                    (Some(Open::Root), NS_SM3, "resume") if request.resume.is_none() => {
                        request.resume = Some((attr("previd"), attr("h")));
                        Open::Other
                    }
                    (Some(Open::Bind), NS_BIND2, "tag") => match request.bind.as_mut() {
                        Some(bind) if bind.tag.is_none() => {
                            bind.tag = Some(String::new());
                            Open::Tag
                        }
                        _ => Open::Other,
                    },
                    (Some(Open::Bind), NS_SM3, "enable") => {
                        if let Some(bind) = request.bind.as_mut().filter(|b| b.enable.is_none()) {
                            bind.enable = Some(attr("resume"));
                        }
                        Open::Other
                    }
                    _ => Open::Other,
                };
                open.push(this);
            }
            Event::EndElement(_) => {
                open.pop();
                if open.is_empty() {
                    return Some(request);
                }
            }
            Event::Text(_, text) => {
                let target = match open.last() {
                    Some(Open::InitialResponse) => request.initial_response.as_mut(),
                    Some(Open::Tag) => request.bind.as_mut().and_then(|b| b.tag.as_mut()),
                    _ => None,
                };
                if let Some(target) = target {
                    target.push_str(&text);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The request as minidom's tree gives it (what the machine read before this module).
    fn from_minidom(text: &str) -> Option<Authenticate> {
        let root = text.parse::<minidom::Element>().ok()?;
        let attr = |e: &minidom::Element, k: &str| e.attr(k).map(str::to_owned);
        Some(Authenticate {
            mechanism: attr(&root, "mechanism"),
            config_version: root
                .get_child("config-version", NS_IAP)
                .map(|c| attr(c, "value")),
            initial_response: root
                .get_child("initial-response", NS_SASL2)
                .map(|c| c.text()),
            user_agent: root
                .get_child("user-agent", NS_SASL2)
                .map(|c| attr(c, "id")),
            bind: root.get_child("bind", NS_BIND2).map(|b| Bind {
                tag: b.get_child("tag", NS_BIND2).map(|t| t.text()),
                enable: b.get_child("enable", NS_SM3).map(|e| attr(e, "resume")),
            }),
            resume: root
                .get_child("resume", NS_SM3)
                .map(|r| (attr(r, "previd"), attr(r, "h"))),
        })
    }

    /// Goal: the request read from rxml's events is the one minidom's tree gives, so the
    /// machine's checks see the same values. Method: both readings of full requests, requests
    /// with repeated, misplaced, foreign-namespace, prefixed and nested children, entities and
    /// CDATA in text, and broken ones (both must refuse those; a repeated attribute only rxml
    /// refuses).
    #[test]
    fn agrees_with_minidom() {
        let cases = [
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>AGFs\
             aWNlAHB3</initial-response><user-agent id='d4565fa7'><software>T</software>\
             </user-agent><bind xmlns='urn:xmpp:bind:0'><tag>Phone</tag><enable \
             xmlns='urn:xmpp:sm:3' resume='true'/></bind><config-version \
             xmlns='urn:xmpp:iap:0' value='v1'/></authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='SCRAM-SHA-256'/>",
            "<authenticate xmlns='urn:xmpp:sasl:2'><initial-response/></authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response> a&#x42;\
             <![CDATA[C=]]><x>not mine</x>d </initial-response><initial-response>second\
             </initial-response></authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2'><user-agent/><user-agent id='2'/>\
             <resume xmlns='urn:xmpp:sm:3' previd='p' h='7'/><resume xmlns='urn:xmpp:sm:3' \
             previd='q'/></authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2'><bind xmlns='urn:xmpp:bind:0'><tag>a</tag>\
             <tag>b</tag><x><tag>nested</tag></x><enable xmlns='urn:xmpp:sm:3'/><enable \
             xmlns='urn:xmpp:sm:3' resume='1'/></bind><bind xmlns='urn:xmpp:bind:0'><tag>c\
             </tag></bind></authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2'><tag xmlns='urn:xmpp:bind:0'>top</tag>\
             <enable xmlns='urn:xmpp:sm:3'/><bind><tag>wrong ns</tag></bind><x><bind \
             xmlns='urn:xmpp:bind:0'/></x></authenticate>",
            "<s:authenticate xmlns:s='urn:xmpp:sasl:2' xmlns:b='urn:xmpp:bind:0' \
             mechanism='PLAIN' s:mechanism='no'><s:initial-response>QQ==</s:initial-response>\
             <b:bind><b:tag>T</b:tag></b:bind><config-version xmlns='urn:xmpp:iap:0'/>\
             </s:authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'><initial-response>",
            "<authenticate xmlns='urn:xmpp:sasl:2'><p:x/></authenticate>",
            "<authenticate xmlns='urn:xmpp:sasl:2'></authenticat>",
            "",
        ];
        for case in cases {
            assert_eq!(parse(case), from_minidom(case), "{case}");
        }
        assert!(parse(cases[0]).is_some_and(|r| r.bind.is_some_and(|b| b.tag.is_some())));
        assert_eq!(parse(cases[8]), None);
        // The one difference: a repeated attribute breaks XML 1.0's "Unique Att Spec"
        // well-formedness constraint (§3.1); minidom keeps the last value, rxml refuses it.
        let repeated = "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN' mechanism='X'/>";
        assert_eq!(parse(repeated), None);
    }
}
