//! Rosters and subscription states (RFC 6121 §2, §3).

use serde::{Deserialize, Serialize};

/// RFC 6121 §2.1.2.5 subscription states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Subscription {
    #[default]
    None,
    To,
    From,
    Both,
}

/// One contact in a user's roster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RosterItem {
    /// The contact's bare JID.
    pub jid: String,
    pub name: Option<String>,
    pub subscription: Subscription,
    /// The user asked to subscribe to the contact and awaits an answer (`ask='subscribe'`).
    pub ask_out: bool,
    /// The contact asked to subscribe to the user and awaits an answer.
    pub pending_in: bool,
    pub groups: Vec<String>,
}

/// The roster namespace (RFC 6121 §2).
pub const ROSTER_NS: &str = "jabber:iq:roster";

impl Subscription {
    /// The `subscription` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Subscription::None => "none",
            Subscription::To => "to",
            Subscription::From => "from",
            Subscription::Both => "both",
        }
    }
    /// The user receives the contact's presence.
    pub fn has_to(self) -> bool {
        matches!(self, Subscription::To | Subscription::Both)
    }
    /// The contact receives the user's presence.
    pub fn has_from(self) -> bool {
        matches!(self, Subscription::From | Subscription::Both)
    }
    fn from_halves(to: bool, from: bool) -> Subscription {
        match (to, from) {
            (false, false) => Subscription::None,
            (true, false) => Subscription::To,
            (false, true) => Subscription::From,
            (true, true) => Subscription::Both,
        }
    }
    pub fn with_to(self, to: bool) -> Subscription {
        Subscription::from_halves(to, self.has_from())
    }
    pub fn with_from(self, from: bool) -> Subscription {
        Subscription::from_halves(self.has_to(), from)
    }
}

impl RosterItem {
    /// A new item with subscription `none`, no name, no groups.
    pub fn new(jid: &str) -> RosterItem {
        RosterItem {
            jid: jid.to_string(),
            name: None,
            subscription: Subscription::None,
            ask_out: false,
            pending_in: false,
            groups: Vec::new(),
        }
    }

    /// Whether the item is shown to the user (roster get, pushes). An item that only records an
    /// inbound subscription request the user has not answered is kept hidden (RFC 6121 §3.1.3:
    /// the item is not created until the user approves).
    pub fn is_visible(&self) -> bool {
        self.subscription != Subscription::None
            || self.ask_out
            || !self.pending_in
            || self.name.is_some()
            || !self.groups.is_empty()
    }

    /// The `<item/>` element for roster results and pushes (RFC 6121 §2.1.2).
    pub fn to_xml(&self) -> String {
        let mut s = format!("<item jid='{}'", crate::build::esc(&self.jid));
        if let Some(name) = &self.name {
            s.push_str(&format!(" name='{}'", crate::build::esc(name)));
        }
        s.push_str(&format!(" subscription='{}'", self.subscription.as_str()));
        if self.ask_out {
            s.push_str(" ask='subscribe'");
        }
        if self.groups.is_empty() {
            s.push_str("/>");
        } else {
            s.push('>');
            for g in &self.groups {
                s.push_str(&format!("<group>{}</group>", crate::build::esc(g)));
            }
            s.push_str("</item>");
        }
        s
    }
}

/// The `<item subscription='remove'/>` element of a removal push (RFC 6121 §2.5.2).
pub fn removed_item_xml(jid: &str) -> String {
    format!(
        "<item jid='{}' subscription='remove'/>",
        crate::build::esc(jid)
    )
}

/// One item of a roster set, as the client sent it (jid not yet normalised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RosterSet {
    pub jid: String,
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub remove: bool,
}

/// Parses a roster set's `<query xmlns='jabber:iq:roster'>`: exactly one `<item/>` with a `jid`
/// (RFC 6121 §2.3.3). Errors are RFC 6120 condition names (`bad-request`,
/// `not-acceptable`).
pub fn parse_roster_set(query: &minidom::Element) -> Result<RosterSet, &'static str> {
    let mut items = query
        .children()
        .filter(|c| c.name() == "item" && c.ns() == ROSTER_NS);
    let item = items.next().ok_or("bad-request")?;
    if items.next().is_some() {
        return Err("bad-request");
    }
    let jid = item.attr("jid").ok_or("bad-request")?.to_string();
    let name = item
        .attr("name")
        .filter(|n| !n.is_empty())
        .map(str::to_string);
    let remove = item.attr("subscription") == Some("remove");
    let mut groups: Vec<String> = Vec::new();
    for g in item
        .children()
        .filter(|c| c.name() == "group" && c.ns() == ROSTER_NS)
    {
        let text = g.text();
        if text.is_empty() {
            // RFC 6121 §2.3.3: empty group names are refused.
            return Err("not-acceptable");
        }
        if groups.contains(&text) {
            return Err("bad-request");
        }
        groups.push(text);
    }
    Ok(RosterSet {
        jid,
        name,
        groups,
        remove,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halves() {
        assert_eq!(Subscription::None.with_to(true), Subscription::To);
        assert_eq!(Subscription::To.with_from(true), Subscription::Both);
        assert_eq!(Subscription::Both.with_to(false), Subscription::From);
        assert_eq!(Subscription::From.with_from(false), Subscription::None);
    }

    #[test]
    fn item_xml_escapes() {
        let mut it = RosterItem::new("a@b");
        it.name = Some("A & 'B'".into());
        it.ask_out = true;
        it.groups = vec!["<g>".into()];
        assert_eq!(
            it.to_xml(),
            "<item jid='a@b' name='A &amp; &apos;B&apos;' subscription='none' ask='subscribe'>\
             <group>&lt;g&gt;</group></item>"
        );
        let mut hidden = RosterItem::new("c@d");
        hidden.pending_in = true;
        assert!(!hidden.is_visible());
    }

    #[test]
    fn parse_set() {
        let q: minidom::Element = "<query xmlns='jabber:iq:roster'><item jid='x@y' name='X'>\
            <group>G</group></item></query>"
            .parse()
            .unwrap();
        let s = parse_roster_set(&q).unwrap();
        assert_eq!(s.jid, "x@y");
        assert_eq!(s.groups, vec!["G".to_string()]);
        assert!(!s.remove);
        let two: minidom::Element =
            "<query xmlns='jabber:iq:roster'><item jid='a@b'/><item jid='c@d'/></query>"
                .parse()
                .unwrap();
        assert_eq!(parse_roster_set(&two), Err("bad-request"));
    }
}
