//! Stanza error replies (RFC 6120 §8.3).

use shared::stanza::{Kind, Stanza};

use crate::build::{self, Attrs};

/// The namespace of stanza error conditions.
pub const STANZAS_NS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

/// Builds the error reply to `original`: same element name and id, `to` and `from` swapped,
/// `type='error'`, and `<error type='ERROR_TYPE'><CONDITION xmlns='...stanzas'/></error>`.
/// The original payload is not echoed back (RFC 6120 §8.3.1 makes that optional).
///
/// Returns `None` when no error may be sent: the original is itself an error (no loops), an IQ
/// result (RFC 6120 §8.2.3), or not a stanza (`Kind::Other`).
///
/// `error_type` is one of RFC 6120 §8.3.2's `auth`, `cancel`, `continue`, `modify`, `wait`;
/// `condition` an RFC 6120 §8.3.3 element name, e.g. `service-unavailable`.
pub fn error_reply(original: &Stanza, error_type: &str, condition: &str) -> Option<Stanza> {
    if original.kind == Kind::Other {
        return None;
    }
    let type_ = original.type_();
    match type_.as_deref() {
        Some("error") => return None,
        Some("result") if original.kind == Kind::Iq => return None,
        _ => {}
    }
    let to = original.from();
    let from = original.to();
    let id = original.id();
    let inner = format!(
        "<error type='{}'><{} xmlns='{STANZAS_NS}'/></error>",
        build::esc(error_type),
        condition
    );
    Some(build::stanza(
        original.name(),
        Attrs {
            to: to.as_deref(),
            from: from.as_deref(),
            id: id.as_deref(),
            type_: Some("error"),
        },
        &inner,
    ))
}

/// The error condition and type of an error stanza, if it has one (`<error type='T'><COND .../>`).
/// Used by tests and diagnostics; parses with minidom.
pub fn error_condition(stanza: &Stanza) -> Option<(String, String)> {
    let el = build::parse(stanza)?;
    let err = el.children().find(|c| c.name() == "error")?;
    let cond = err.children().find(|c| c.ns() == STANZAS_NS)?;
    Some((
        err.attr("type").unwrap_or("").to_string(),
        cond.name().to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::stanza;

    #[test]
    fn swaps_and_keeps_id() {
        let m = stanza(
            "message",
            Attrs {
                to: Some("b@x"),
                from: Some("a@x/r"),
                id: Some("m1"),
                type_: Some("chat"),
            },
            "<body>hi</body>",
        );
        let e = error_reply(&m, "cancel", "service-unavailable").unwrap();
        assert_eq!(
            e.as_str(),
            "<message to='a@x/r' from='b@x' id='m1' type='error'><error type='cancel'>\
             <service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
        );
        assert_eq!(
            error_condition(&e),
            Some(("cancel".into(), "service-unavailable".into()))
        );
        assert!(error_reply(&e, "cancel", "service-unavailable").is_none());
        let r = stanza(
            "iq",
            Attrs {
                type_: Some("result"),
                ..Attrs::default()
            },
            "",
        );
        assert!(error_reply(&r, "cancel", "service-unavailable").is_none());
    }
}
