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
