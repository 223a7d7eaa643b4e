//! The sans-IO client-to-server stream machine (RFC 6120): stream negotiation, STARTTLS, SASL,
//! resource binding, stream errors. It takes decrypted bytes, time and service answers and writes
//! the bytes to send into `out`; it performs no I/O and reads no clock.

use std::sync::Arc;
use std::time::Instant;

use router::credentials::Credentials;
use router::BindError;
use shared::stanza::Stanza;

/// Per-listener settings, shared by all connections of a shard (and sent along on handoff).
#[derive(Debug, Clone)]
pub struct C2sConfig {
    pub domain: String,
    /// Offer `<starttls/>` (c2s port with a certificate loaded).
    pub starttls_offered: bool,
    /// Allow SASL PLAIN and sessions without TLS.
    pub allow_plaintext: bool,
    pub stanza_bytes_max: usize,
    /// An unauthenticated connection must have bound a resource by then.
    pub unauthenticated_timeout: std::time::Duration,
}

/// Whether the bytes the machine sees travelled under TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    Plain,
    Tls,
}

/// What the machine asks of the shard (implemented by the driver; a mock in tests).
pub trait Services {
    /// Stored credentials of the local part `node` (already lowercased), or `None`.
    fn credentials(&mut self, node: &str) -> Option<Credentials>;
    /// Binds a resource for `node` on its home shard; returns the full JID.
    fn bind(&mut self, node: &str, resource: Option<&str>) -> Result<String, BindError>;
    /// A stanza from the bound session, `from` already stamped with the full JID.
    fn stanza(&mut self, stanza: Stanza);
}

/// What the driver must do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// `<proceed/>` is in `out`: write it, then run the TLS handshake, then `handle_tls_established`.
    StartTls,
    /// `<success/>` is in `out`: write it. The user is `node`; the driver may hand the connection to
    /// the user's home shard before feeding more bytes (call `handle_bytes(&[])` there first).
    Authenticated { node: String },
    /// The stream is over: write `out`, then close the socket.
    Close,
}

/// One client stream's state.
pub struct C2s {}

impl C2s {
    pub fn new(config: Arc<C2sConfig>, security: Security, now: Instant) -> C2s {
        let _ = (config, security, now);
        todo!()
    }
    pub fn handle_bytes(&mut self, data: &[u8], services: &mut dyn Services, out: &mut Vec<u8>, now: Instant) -> Step {
        let _ = (data, services, out, now);
        todo!()
    }
    pub fn handle_tls_established(&mut self) {
        todo!()
    }
    /// Checks deadlines; past the unauthenticated deadline writes `connection-timeout`.
    pub fn handle_tick(&mut self, out: &mut Vec<u8>, now: Instant) -> Step {
        let _ = (out, now);
        todo!()
    }
    /// Server-side close with a stream error condition (e.g. `system-shutdown`, `conflict`) or
    /// none (plain `</stream:stream>`).
    pub fn handle_close(&mut self, condition: Option<&str>, out: &mut Vec<u8>) {
        let _ = (condition, out);
        todo!()
    }
    /// When `handle_tick` must next be called, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        todo!()
    }
    pub fn full_jid(&self) -> Option<&str> {
        todo!()
    }
}
