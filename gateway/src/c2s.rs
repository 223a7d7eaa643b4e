//! The sans-IO client-to-server stream machine (RFC 6120): stream negotiation, STARTTLS, SASL,
//! resource binding, stream errors; XEP-0388 SASL2 with XEP-0386 Bind 2 and XEP-0198 inline
//! (a login in one round trip after TLS), with XEP-0509 (Initial Authentication Pipelining) so a
//! client may send its `<authenticate/>` with the stream header; XEP-0198. It takes decrypted
//! bytes, time and service answers and writes the bytes to send into `out`; it performs no I/O
//! and reads no clock.
//!
//! Authentication ends with `Step::Authenticated`: the driver may then move the connection to
//! the user's home shard, where binding (and a SASL2 `<success/>`, which carries the bound JID)
//! happens on the next `handle_bytes`. Bytes the client pipelined after authenticating stay in
//! the framer and are handled there, in order.
//!
//! The state is one enum with a variant per thing awaited; every event takes the state out of the
//! machine, consumes it and puts the next one back. Anything the machine does not expect closes
//! the stream with the RFC 6120 §4.9.3 condition that fits; it never panics on input.

mod authenticate;
mod sasl;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use base64::engine::general_purpose::STANDARD as Base64;
use base64::Engine;
use bytes::Bytes;
use router::credentials::Credentials;
use router::BindError;
use shared::escape::escape;
use shared::framer::{Event, Framer, StreamHeader};
use shared::limits::{
    AUTH_ATTEMPTS_MAX, BIND2_TAG_BYTES_MAX, IAP_MISMATCHES_MAX,
    IAP_PIPELINED_STANZAS_DISCARDED_MAX, SM_REQUEST_EVERY_STANZAS, SM_UNACKED_STANZAS_MAX,
};
use shared::stanza::{Kind, Stanza};

use self::sasl::{Failure, ScramHash, ScramServer};

const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
const NS_CLIENT: &str = "jabber:client";
const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
const NS_SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
const NS_STANZA_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const NS_SM3: &str = "urn:xmpp:sm:3";
/// XEP-0388 Extensible SASL Profile.
const NS_SASL2: &str = "urn:xmpp:sasl:2";
/// XEP-0386 Bind 2.
const NS_BIND2: &str = "urn:xmpp:bind:0";
/// XEP-0509 Initial Authentication Pipelining.
const NS_IAP: &str = "urn:xmpp:iap:0";

/// Per-listener settings, shared by all connections of a shard (and sent along on handoff).
#[derive(Debug, Clone)]
pub struct C2sConfig {
    pub domain: String,
    /// Offer `<starttls/>` (c2s port with a certificate loaded).
    pub starttls_offered: bool,
    /// Allow SASL PLAIN and sessions without TLS.
    pub allow_plaintext: bool,
    /// The server's `scram_iterations`, the PBKDF2 count new accounts get: what SCRAM shows and
    /// PLAIN spends for a user that does not exist, so that failing tells nothing of existence.
    pub scram_iterations: u32,
    pub stanza_bytes_max: usize,
    /// An unauthenticated connection must have bound a resource by then.
    pub unauthenticated_timeout: std::time::Duration,
    /// XEP-0198: how long a session that lost its connection may be resumed (zero: never).
    pub sm_resume_timeout: std::time::Duration,
    /// Where stream ids, generated resources and resumption ids come from (`fill_random`
    /// outside tests).
    pub random: RandomFill,
}

/// Fills a buffer with cryptographically secure random bytes, or says it could not.
pub type RandomFill = fn(&mut [u8]) -> Result<(), RandomUnavailable>;

/// No secure random bytes could be had: the caller must not go on with predictable ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("no secure random bytes: the random number generator failed")]
pub struct RandomUnavailable;

/// The gateway's `RandomFill`: aws-lc's DRBG (the one rustls's handshakes draw from too, see
/// `tls::CryptoLibrary`), seeded and reseeded from the OS by aws-lc and safe across fork. Unlike
/// `getrandom`, a draw is no syscall: a login draws three ids or so.
pub fn fill_random(buf: &mut [u8]) -> Result<(), RandomUnavailable> {
    aws_lc_rs::rand::fill(buf).map_err(|_| RandomUnavailable)
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
    /// XEP-0198 was enabled on this stream.
    fn sm_enabled(&mut self);
    /// Stanzas passed to `stanza` so far, and how many of them, counted from the first, are
    /// settled (durable or delivered): an ack may cover only those.
    fn received(&mut self) -> u64;
    fn settled(&mut self) -> u64;
    /// The client acknowledged these stored messages (offline sequence numbers).
    fn acked(&mut self, seqs: &[u64]);
    /// XEP-0198 resumption: takes over the detached session `previd` of `node`, if it is still
    /// waiting; returns its stream-management state and full JID. The driver adopts the old
    /// session's connection id and send queue.
    fn resume(&mut self, node: &str, previd: &str) -> Option<(SmState, String)>;
    /// Whether this client's address has used up its failed logins for now: the login is
    /// refused before any password is checked.
    fn auth_refused(&mut self) -> bool {
        false
    }
    /// A login of this client failed on its credentials.
    fn auth_failed(&mut self) {}
}

/// Runs a SASL step unless the client's address has used up its failed logins
/// (`temporary-auth-failure` then, before any credential lookup); tells the driver when the
/// step failed on the credentials.
fn limited(
    services: &mut dyn Services,
    step: impl FnOnce(&mut dyn Services) -> Outcome,
) -> Outcome {
    if services.auth_refused() {
        return Outcome::Failure(Failure::TemporaryAuth);
    }
    let outcome = step(services);
    if matches!(outcome, Outcome::Failure(Failure::NotAuthorized)) {
        services.auth_failed();
    }
    outcome
}

/// The XEP-0198 state of a session whose connection was lost, kept for resumption.
#[derive(Debug)]
pub struct SmState(Box<Sm>);

impl SmState {
    /// What the client never acknowledged, except stored messages (the offline queue keeps
    /// those until an ack erases them).
    pub fn into_unacked(self) -> Vec<Bytes> {
        unacked_unstored(self.0.unacked)
    }
}

fn unacked_unstored(unacked: VecDeque<(Bytes, Option<u64>)>) -> Vec<Bytes> {
    unacked
        .into_iter()
        .filter(|(_, seq)| seq.is_none())
        .map(|(bytes, _)| bytes)
        .collect()
}

/// XEP-0198 state of a stream that enabled it.
#[derive(Debug)]
struct Sm {
    /// `Services::received` when it was enabled: `h` counts from there.
    base: u64,
    /// Stanzas after enable that the machine answered itself (never passed to `stanza`).
    local: u64,
    /// A `<r/>` came while some stanzas were unsettled: send `<a/>` as they settle.
    ack_wanted: bool,
    /// Stanzas sent since enable, and how many of them the client acknowledged (mod 2^32).
    sent: u32,
    acked: u32,
    /// What was sent and not acknowledged, oldest first, with its offline sequence number.
    /// Its buffer is freed whenever the client has acknowledged everything, so an idle session
    /// keeps none.
    unacked: VecDeque<(Bytes, Option<u64>)>,
    /// Stanzas sent since we last asked for an ack.
    since_request: usize,
    /// The resumption id (128 random bits, sent as hex), when the client asked for resumption
    /// and it is on.
    id: Option<[u8; RESUME_ID_BYTES]>,
}

/// What the driver must do after a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Continue,
    /// `<proceed/>` is in `out`: write it, then run the TLS handshake, then `handle_tls_established`.
    StartTls,
    /// `<success/>` is in `out`: write it. The user is `node`; the driver may hand the connection to
    /// the user's home shard before feeding more bytes (call `handle_bytes(&[])` there first).
    Authenticated {
        node: String,
    },
    /// The stream is over: write `out`, then close the socket.
    Close,
}

/// What the stream awaits; each variant holds only what that step needs.
#[derive(Debug)]
enum State {
    /// The client's `<stream:stream>`. `node` is set on the stream restarted after SASL success.
    ExpectStreamHeader {
        node: Option<String>,
    },
    /// Features sent before authentication: `<starttls/>` or `<auth/>`.
    ExpectStartTlsOrAuth,
    /// `<proceed/>` sent; the driver runs the TLS handshake, then calls `handle_tls_established`.
    TlsHandshake,
    /// A challenge was sent; the client's response is awaited, in the RFC 6120 profile
    /// (`sasl2` is `None`) or the XEP-0388 one (with what the `<authenticate/>` asked for).
    SaslResponse {
        exchange: Exchange,
        sasl2: Option<Box<Sasl2Request>>,
    },
    /// XEP-0388 authentication succeeded and `Step::Authenticated` was returned; on the user's
    /// home shard the next `handle_bytes` binds (XEP-0386) and writes `<success/>`. There is no
    /// stream restart: the framer keeps what the client pipelined after `<authenticate/>`.
    Sasl2Success(Box<Sasl2Success>),
    /// Authenticated, stream restarted, features sent: the bind IQ.
    ExpectBind {
        node: String,
    },
    /// A bound session: stanzas flow.
    Established {
        full_jid: Box<str>,
    },
    Closed,
}

/// A SASL exchange in progress, whichever profile carries it.
#[derive(Debug)]
enum Exchange {
    /// PLAIN chosen without an initial response; an empty challenge was sent.
    Plain,
    /// SCRAM chosen without an initial response; an empty challenge was sent.
    ScramClientFirst(ScramHash),
    /// The SCRAM server-first-message was sent; the client-final-message is awaited.
    ScramClientFinal(Box<ScramServer>),
}

/// Where a mechanism step leaves the exchange.
enum Outcome {
    Challenge(Vec<u8>, Exchange),
    Success { node: String, additional: Vec<u8> },
    Failure(Failure),
}

/// Why a XEP-0198 resumption did not take over a session.
enum TakeOver {
    /// No detached session of this user with that id (expired, or never was).
    NotFound,
    /// The client's `h` acknowledges more than was sent: a stream error.
    CountTooHigh,
}

/// What a XEP-0388 `<authenticate/>` asked for besides authentication.
#[derive(Debug, Default)]
struct Sasl2Request {
    /// XEP-0198 `<resume previd h/>` inline (XEP-0198 §6.2): `(previd, h)`; `h` is `None` when
    /// it is not a number (the resumption then fails with `bad-request`).
    resume: Option<(String, Option<u32>)>,
    /// XEP-0388 `<user-agent id=.../>`: makes the generated resource stable (never shown).
    user_agent_id: Option<String>,
    /// XEP-0386 `<bind/>`, when present.
    bind: Option<Bind2Request>,
}

/// A XEP-0386 bind request.
#[derive(Debug, Default)]
struct Bind2Request {
    tag: Option<String>,
    /// XEP-0198 `<enable/>` inline: `Some(resume)`.
    sm_enable: Option<bool>,
}

/// An authenticated XEP-0388 exchange whose `<success/>` is not written yet.
#[derive(Debug)]
struct Sasl2Success {
    node: String,
    /// The mechanism's success data (SCRAM's server-final-message).
    additional: Vec<u8>,
    request: Sasl2Request,
}

/// The name of the stream element every client we know of sends (`<stream:stream>`): an idle
/// stream with this name drops its framer (see `C2s::framer`).
const STREAM_NAME: &[u8] = b"stream:stream";

/// One client stream's state. Most streams sit idle for hours, so an idle established stream
/// holds little: no framer, the full JID once, XEP-0198 state only when enabled.
pub struct C2s {
    config: Arc<C2sConfig>,
    security: Security,
    /// The stream's framer; once established, `None` between stanzas of an open
    /// `<stream:stream>` with nothing buffered (all a framer would hold then), rebuilt with
    /// `Framer::in_stream` when bytes arrive.
    framer: Option<Box<Framer>>,
    /// The unauthenticated deadline runs from here.
    started: Instant,
    /// Whether our `<stream:stream>` for the current stream (restarts begin new ones) is out.
    header_sent: bool,
    auth_failures: u32,
    /// XEP-0509 config-version mismatches on this connection (see `IAP_MISMATCHES_MAX`).
    iap_mismatches: u8,
    /// Stanzas pipelined behind an `<authenticate/>` rejected for a config-version mismatch
    /// that may still be discarded (see `IAP_PIPELINED_STANZAS_DISCARDED_MAX`); zero otherwise.
    iap_discards_left: u8,
    state: State,
    sm: Option<Box<Sm>>,
}

/// The outcome of one event: the next state and what the driver must do.
type Next = (State, Step);

fn cont(state: State) -> Next {
    (state, Step::Continue)
}

impl C2s {
    pub fn new(config: Arc<C2sConfig>, security: Security, now: Instant) -> C2s {
        let framer = Some(Box::new(Framer::new(config.stanza_bytes_max)));
        C2s {
            config,
            security,
            framer,
            started: now,
            header_sent: false,
            auth_failures: 0,
            iap_mismatches: 0,
            iap_discards_left: 0,
            state: State::ExpectStreamHeader { node: None },
            sm: None,
        }
    }

    /// A stanza for the client (from the router): written to `out` and, with XEP-0198 on, kept
    /// until the client acknowledges it, with an ack request every `SM_REQUEST_EVERY_STANZAS`.
    /// `seq` is the stanza's offline sequence number when it is a stored message. Past
    /// `SM_UNACKED_STANZAS_MAX` unacknowledged stanzas the stream is closed.
    pub fn handle_outbound(&mut self, bytes: Bytes, seq: Option<u64>, out: &mut Vec<u8>) -> Step {
        if matches!(self.state, State::Closed) {
            return Step::Close;
        }
        out.extend_from_slice(&bytes);
        let Some(sm) = self.sm.as_mut() else {
            return Step::Continue;
        };
        sm.unacked.push_back((bytes, seq));
        sm.sent = sm.sent.wrapping_add(1);
        sm.since_request += 1;
        if sm.unacked.len() > SM_UNACKED_STANZAS_MAX {
            tracing::debug!(unacked = sm.unacked.len(), "client does not acknowledge");
            let (state, step) = self.stream_error("policy-violation", out);
            self.state = state;
            return step;
        }
        if sm.since_request >= SM_REQUEST_EVERY_STANZAS {
            sm.since_request = 0;
            let _ = write!(Sink(out), "<r xmlns='{NS_SM3}'/>");
        }
        Step::Continue
    }

    /// More of this stream's stanzas are settled: sends the ack a `<r/>` was waiting for.
    pub fn handle_settled(&mut self, services: &mut dyn Services, out: &mut Vec<u8>) {
        if matches!(self.state, State::Closed) {
            return;
        }
        if self.sm.as_ref().is_some_and(|sm| sm.ack_wanted) {
            self.send_ack(services, out);
        }
    }

    /// The session ends for good: takes what the client never acknowledged (see
    /// [`SmState::into_unacked`]); empty without XEP-0198.
    pub fn take_unacked(&mut self) -> Vec<Bytes> {
        self.sm
            .as_mut()
            .map(|sm| unacked_unstored(std::mem::take(&mut sm.unacked)))
            .unwrap_or_default()
    }

    /// Whether XEP-0198 is on.
    pub fn sm_enabled(&self) -> bool {
        self.sm.is_some()
    }

    /// The connection was lost (not closed by either side): if the session may be resumed,
    /// returns its resumption id, its XEP-0198 state and full JID, and the machine is closed.
    pub fn detach(&mut self) -> Option<(String, SmState, String)> {
        let State::Established { full_jid } = &self.state else {
            return None;
        };
        let id = hex(&self.sm.as_ref()?.id?);
        let full_jid = full_jid.to_string();
        let sm = self.sm.take()?;
        self.state = State::Closed;
        Some((id, SmState(sm), full_jid))
    }

    /// `<resume previd h/>` instead of a bind (XEP-0198 §5).
    fn on_resume(
        &mut self,
        stanza: &Stanza,
        node: String,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        let text = stanza.as_str();
        let end = stanza.header.start_tag_end;
        let previd = attr_value(text, end, "previd").unwrap_or_default();
        let h = attr_value(text, end, "h").and_then(|h| h.parse::<u32>().ok());
        let (Some(h), false) = (h, previd.is_empty()) else {
            let _ = write!(
                Sink(out),
                "<failed xmlns='{NS_SM3}'><bad-request xmlns='{NS_STANZA_ERRORS}'/></failed>"
            );
            return cont(State::ExpectBind { node });
        };
        let full_jid = match self.take_over(&node, &previd, h, services) {
            Ok(full_jid) => full_jid,
            Err(TakeOver::NotFound) => {
                let _ = write!(
                    Sink(out),
                    "<failed xmlns='{NS_SM3}'><item-not-found xmlns='{NS_STANZA_ERRORS}'/></failed>"
                );
                return cont(State::ExpectBind { node });
            }
            Err(TakeOver::CountTooHigh) => return self.handled_count_too_high(out),
        };
        self.write_resumed(&previd, services, out);
        self.resend_unacked(out);
        cont(State::Established {
            full_jid: full_jid.into(),
        })
    }

    /// Takes over the detached session `previd` of `node` (XEP-0198 §5) and releases what the
    /// client's `h` acknowledges; returns the session's full JID.
    fn take_over(
        &mut self,
        node: &str,
        previd: &str,
        h: u32,
        services: &mut dyn Services,
    ) -> Result<String, TakeOver> {
        let (SmState(sm), full_jid) = services.resume(node, previd).ok_or(TakeOver::NotFound)?;
        self.sm = Some(sm);
        if !self.release_acked(h, services) {
            return Err(TakeOver::CountTooHigh);
        }
        Ok(full_jid)
    }

    /// `<resumed/>` with our `h`, after `take_over`.
    fn write_resumed(&mut self, previd: &str, services: &mut dyn Services, out: &mut Vec<u8>) {
        let Some(sm) = self.sm.as_mut() else {
            return;
        };
        let (received, settled) = (services.received(), services.settled());
        let ours = settled.saturating_sub(sm.base).wrapping_add(sm.local) as u32;
        sm.ack_wanted = settled < received;
        let _ = write!(
            Sink(out),
            "<resumed xmlns='{NS_SM3}' h='{ours}' previd='{}'/>",
            escape(previd)
        );
    }

    /// What the client had not acknowledged, sent again after `<resumed/>` (XEP-0198 §5), still
    /// unacked, with a request for an ack.
    fn resend_unacked(&mut self, out: &mut Vec<u8>) {
        let Some(sm) = self.sm.as_mut() else {
            return;
        };
        for (bytes, _) in &sm.unacked {
            out.extend_from_slice(bytes);
        }
        if !sm.unacked.is_empty() {
            sm.since_request = 0;
            let _ = write!(Sink(out), "<r xmlns='{NS_SM3}'/>");
        }
    }

    fn handled_count_too_high(&mut self, out: &mut Vec<u8>) -> Next {
        let _ = write!(
            Sink(out),
            "<stream:error><undefined-condition xmlns='{NS_STREAM_ERRORS}'/>\
             <handled-count-too-high xmlns='{NS_SM3}'/></stream:error></stream:stream>"
        );
        (State::Closed, Step::Close)
    }

    /// Writes `<a h=.../>` for what is settled; keeps `ack_wanted` while some is not.
    fn send_ack(&mut self, services: &mut dyn Services, out: &mut Vec<u8>) {
        let Some(sm) = self.sm.as_mut() else {
            return;
        };
        let (received, settled) = (services.received(), services.settled());
        let h = settled.saturating_sub(sm.base).wrapping_add(sm.local) as u32;
        sm.ack_wanted = settled < received;
        let _ = write!(Sink(out), "<a xmlns='{NS_SM3}' h='{h}'/>");
    }

    /// `<a h=.../>` from the client: releases what it covers; stored messages among them are
    /// erased. An `h` beyond what was sent is a stream error (XEP-0198 §4).
    fn on_client_ack(&mut self, stanza: &Stanza, services: &mut dyn Services) -> bool {
        let h = attr_value(stanza.as_str(), stanza.header.start_tag_end, "h")
            .and_then(|h| h.parse::<u32>().ok());
        match h {
            Some(h) => self.release_acked(h, services),
            None => false,
        }
    }

    /// The client has handled `h` of our stanzas: releases them; false if `h` is beyond what was
    /// sent.
    fn release_acked(&mut self, h: u32, services: &mut dyn Services) -> bool {
        let Some(sm) = self.sm.as_mut() else {
            return true;
        };
        let newly = h.wrapping_sub(sm.acked) as usize;
        if newly > sm.unacked.len() {
            tracing::debug!(
                h,
                acked = sm.acked,
                unacked = sm.unacked.len(),
                "ack beyond sent"
            );
            return false;
        }
        sm.acked = h;
        let seqs: Vec<u64> = sm
            .unacked
            .drain(..newly)
            .filter_map(|(_, seq)| seq)
            .collect();
        if sm.unacked.is_empty() {
            sm.unacked = VecDeque::new();
        }
        if !seqs.is_empty() {
            services.acked(&seqs);
        }
        true
    }

    pub fn handle_bytes(
        &mut self,
        data: &[u8],
        services: &mut dyn Services,
        out: &mut Vec<u8>,
        now: Instant,
    ) -> Step {
        match self.state {
            State::Closed => return Step::Close,
            // Bytes sent in the clear after `<starttls/>` are never processed (they could be
            // injected by a man in the middle); the driver should not pass any.
            State::TlsHandshake => return Step::Continue,
            _ => {}
        }
        if let Some(step) = self.check_deadline(out, now) {
            return step;
        }
        if let State::Sasl2Success(_) = self.state {
            let State::Sasl2Success(done) = std::mem::replace(&mut self.state, State::Closed)
            else {
                unreachable!("matched above");
            };
            let (state, step) = self.sasl2_complete(*done, services, out);
            self.state = state;
            if step != Step::Continue {
                return step;
            }
        }
        if self.framer.is_none() && data.is_empty() {
            return Step::Continue;
        }
        let max = self.config.stanza_bytes_max;
        self.framer
            .get_or_insert_with(|| Box::new(Framer::in_stream(max, STREAM_NAME)))
            .push(data);
        loop {
            // Events may restart the stream (a new framer) but never leave it without one.
            let framer = self
                .framer
                .as_mut()
                .expect("a framer while bytes are handled");
            let event = match framer.next_event() {
                Ok(Some(event)) => event,
                Ok(None) => {
                    // Only an established stream drops its idle framer: a login's next flight
                    // comes within a round trip, and a framer rebuilt for each one cost ~5
                    // allocations (the box, its buffers, names and attribute list).
                    if framer.idle_stream_name() == Some(STREAM_NAME)
                        && matches!(self.state, State::Established { .. })
                    {
                        self.framer = None;
                    }
                    return Step::Continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "c2s framing error");
                    let (state, step) = self.stream_error(e.condition(), out);
                    self.state = state;
                    return step;
                }
            };
            let state = std::mem::replace(&mut self.state, State::Closed);
            let (state, step) = self.on_event(state, event, services, out);
            self.state = state;
            if step != Step::Continue {
                return step;
            }
        }
    }

    pub fn handle_tls_established(&mut self) {
        if matches!(self.state, State::TlsHandshake) {
            self.security = Security::Tls;
            self.state = self.restart_stream();
        }
    }

    /// Checks deadlines; past the unauthenticated deadline writes `connection-timeout`.
    pub fn handle_tick(&mut self, out: &mut Vec<u8>, now: Instant) -> Step {
        if matches!(self.state, State::Closed) {
            return Step::Close;
        }
        self.check_deadline(out, now).unwrap_or(Step::Continue)
    }

    /// Server-side close with a stream error condition (e.g. `system-shutdown`, `conflict`) or
    /// none (plain `</stream:stream>`).
    pub fn handle_close(&mut self, condition: Option<&str>, out: &mut Vec<u8>) {
        if matches!(self.state, State::Closed) {
            return;
        }
        let (state, _) = match condition {
            Some(condition) => self.stream_error(condition, out),
            None => self.close_stream(out),
        };
        self.state = state;
    }

    /// When `handle_tick` must next be called, if ever.
    pub fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Established { .. } | State::Closed => None,
            _ => Some(self.started + self.config.unauthenticated_timeout),
        }
    }

    pub fn full_jid(&self) -> Option<&str> {
        match &self.state {
            State::Established { full_jid } => Some(full_jid),
            _ => None,
        }
    }

    /// SASL failures on this stream so far.
    pub fn auth_failures(&self) -> u32 {
        self.auth_failures
    }

    /// True once a resource is bound and until the stream closes.
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Established { .. })
    }

    fn check_deadline(&mut self, out: &mut Vec<u8>, now: Instant) -> Option<Step> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        let (state, step) = self.stream_error("connection-timeout", out);
        self.state = state;
        Some(step)
    }

    /// A new stream begins on the same connection after STARTTLS: what was buffered in the clear
    /// is dropped (RFC 6120 §5.4.3.3: it could have been injected).
    fn restart_stream(&mut self) -> State {
        match self.framer.as_mut() {
            Some(framer) => framer.reset(),
            None => self.framer = Some(Box::new(Framer::new(self.config.stanza_bytes_max))),
        }
        self.header_sent = false;
        State::ExpectStreamHeader { node: None }
    }

    fn plain_allowed(&self) -> bool {
        self.feature_set().plain_allowed()
    }

    /// Plain connection where STARTTLS is offered and mandatory.
    fn tls_required(&self) -> bool {
        self.feature_set().tls_required()
    }

    fn feature_set(&self) -> FeatureSet {
        FeatureSet {
            tls: self.security == Security::Tls,
            starttls_offered: self.config.starttls_offered,
            allow_plaintext: self.config.allow_plaintext,
        }
    }

    /// The features before authentication of this connection's feature set, rendered once per
    /// process.
    fn pre_auth_features(&self) -> &'static PreAuthFeatures {
        self.feature_set().pre_auth_features()
    }

    // ---- output ----

    /// Writes our `<stream:stream>` with a fresh random id (RFC 6120 §4.7.3: unique and
    /// unpredictable); nothing is written when no random id can be had.
    fn write_header(&mut self, out: &mut Vec<u8>) -> Result<(), RandomUnavailable> {
        let id = self.random_id()?;
        self.write_header_with_id(Some(&id), out);
        Ok(())
    }

    fn write_header_with_id(&mut self, id: Option<&[u8; RESUME_ID_BYTES]>, out: &mut Vec<u8>) {
        let domain = escape(&self.config.domain);
        let _ = write!(
            Sink(out),
            "<?xml version='1.0'?><stream:stream from='{domain}'"
        );
        if let Some(id) = id {
            out.extend_from_slice(b" id='");
            push_hex(out, id);
            out.push(b'\'');
        }
        let _ = write!(
            Sink(out),
            " version='1.0' xml:lang='en' xmlns='{NS_CLIENT}' xmlns:stream='{NS_STREAMS}'>"
        );
        self.header_sent = true;
    }

    /// The header that must precede a stream error or close when ours is not out yet (RFC 6120
    /// §4.9.1.2). Without randomness it goes out without an id: the stream ends right after it.
    fn write_header_before_close(&mut self, out: &mut Vec<u8>) {
        if !self.header_sent && self.write_header(out).is_err() {
            self.write_header_with_id(None, out);
        }
    }

    /// 128 random bits for an id (stream, generated resource, XEP-0198 resumption).
    fn random_id(&self) -> Result<[u8; RESUME_ID_BYTES], RandomUnavailable> {
        let mut id = [0u8; RESUME_ID_BYTES];
        (self.config.random)(&mut id).inspect_err(|e| tracing::error!(error = %e, "c2s id"))?;
        Ok(id)
    }

    /// Writes a stream error (preceded by our header if not yet sent) and the stream's close.
    fn stream_error(&mut self, condition: &str, out: &mut Vec<u8>) -> Next {
        tracing::debug!(condition, "c2s stream error");
        self.write_header_before_close(out);
        let _ = write!(
            Sink(out),
            "<stream:error><{condition} xmlns='{NS_STREAM_ERRORS}'/></stream:error></stream:stream>"
        );
        (State::Closed, Step::Close)
    }

    fn close_stream(&mut self, out: &mut Vec<u8>) -> Next {
        self.write_header_before_close(out);
        out.extend_from_slice(b"</stream:stream>");
        (State::Closed, Step::Close)
    }

    /// A SASL `<failure/>` in the RFC 6120 profile, or the XEP-0388 one (`sasl2`: the RFC 6120
    /// §6.5 condition in its own namespace; nothing inline is processed); after
    /// `AUTH_ATTEMPTS_MAX` of them the stream is closed.
    fn any_sasl_failure(&mut self, failure: Failure, sasl2: bool, out: &mut Vec<u8>) -> Next {
        tracing::debug!(condition = failure.condition(), sasl2, "c2s SASL failure");
        let condition = failure.condition();
        let _ = if sasl2 {
            write!(
                Sink(out),
                "<failure xmlns='{NS_SASL2}'><{condition} xmlns='{NS_SASL}'/></failure>"
            )
        } else {
            write!(
                Sink(out),
                "<failure xmlns='{NS_SASL}'><{condition}/></failure>"
            )
        };
        self.auth_failures += 1;
        if self.auth_failures >= AUTH_ATTEMPTS_MAX {
            return self.stream_error("policy-violation", out);
        }
        cont(State::ExpectStartTlsOrAuth)
    }

    fn sasl_success(&mut self, node: String, additional: &[u8], out: &mut Vec<u8>) -> Next {
        if additional.is_empty() {
            let _ = write!(Sink(out), "<success xmlns='{NS_SASL}'/>");
        } else {
            let _ = write!(
                Sink(out),
                "<success xmlns='{NS_SASL}'>{}</success>",
                Base64.encode(additional)
            );
        }
        // RFC 6120 §6.4.6: the stream restarts. What the client pipelined after its last SASL
        // element (the new stream header, even a bind) stays buffered and is handled next, on
        // the user's home shard after a handoff.
        match self.framer.as_mut() {
            Some(framer) => framer.restart(),
            None => self.framer = Some(Box::new(Framer::new(self.config.stanza_bytes_max))),
        }
        self.header_sent = false;
        let state = State::ExpectStreamHeader {
            node: Some(node.clone()),
        };
        (state, Step::Authenticated { node })
    }

    fn challenge(out: &mut Vec<u8>, data: &[u8]) {
        if data.is_empty() {
            let _ = write!(Sink(out), "<challenge xmlns='{NS_SASL}'/>");
        } else {
            let _ = write!(
                Sink(out),
                "<challenge xmlns='{NS_SASL}'>{}</challenge>",
                Base64.encode(data)
            );
        }
    }

    // ---- events ----

    fn on_event(
        &mut self,
        state: State,
        event: Event,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        match event {
            Event::StreamClose => self.close_stream(out),
            Event::StreamOpen(header) => match state {
                State::ExpectStreamHeader { node } => self.on_stream_header(header, node, out),
                // The framer reports one header per stream; a second one is a framing bug.
                _ => self.stream_error("not-well-formed", out),
            },
            Event::Stanza(stanza) => {
                if stanza.kind == Kind::Other && stanza.name() == "stream:error" {
                    // The client reports an error and will close: close our side too.
                    return self.close_stream(out);
                }
                match state {
                    State::ExpectStartTlsOrAuth => self.on_pre_auth(stanza, services, out),
                    State::SaslResponse { exchange, sasl2 } => {
                        self.on_sasl_response(stanza, exchange, sasl2, services, out)
                    }
                    State::ExpectBind { node } => self.on_expect_bind(stanza, node, services, out),
                    State::Established { full_jid } => {
                        self.on_established(stanza, full_jid, services, out)
                    }
                    State::ExpectStreamHeader { .. } | State::TlsHandshake | State::Closed => {
                        self.stream_error("not-well-formed", out)
                    }
                    // `handle_bytes` completes it before reading further events.
                    State::Sasl2Success(_) => self.stream_error("internal-server-error", out),
                }
            }
        }
    }

    fn on_stream_header(
        &mut self,
        header: StreamHeader,
        node: Option<String>,
        out: &mut Vec<u8>,
    ) -> Next {
        let local_name = header.name.rsplit(':').next().unwrap_or_default();
        if header.stream_ns.as_deref() != Some(NS_STREAMS)
            || header.default_ns.as_deref() != Some(NS_CLIENT)
            || local_name != "stream"
        {
            return self.stream_error("invalid-namespace", out);
        }
        if let Some(to) = &header.to {
            if !to.eq_ignore_ascii_case(&self.config.domain) {
                return self.stream_error("host-unknown", out);
            }
        }
        if !version_supported(header.version.as_deref()) {
            return self.stream_error("unsupported-version", out);
        }
        if self.write_header(out).is_err() {
            return self.stream_error("internal-server-error", out);
        }
        out.extend_from_slice(b"<stream:features>");
        let next = match node {
            Some(node) => {
                let _ = write!(
                    Sink(out),
                    "<bind xmlns='{NS_BIND}'/><session xmlns='{NS_SESSION}'><optional/></session><sm xmlns='{NS_SM3}'/>"
                );
                State::ExpectBind { node }
            }
            None => {
                out.extend_from_slice(&self.pre_auth_features().rendered);
                State::ExpectStartTlsOrAuth
            }
        };
        out.extend_from_slice(b"</stream:features>");
        cont(next)
    }

    fn on_pre_auth(
        &mut self,
        stanza: Stanza,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        let ns = stanza.xmlns();
        let ns = ns.as_deref();
        if stanza.kind == Kind::Other && stanza.name() == "starttls" && ns == Some(NS_TLS) {
            if self.security == Security::Plain && self.config.starttls_offered {
                let _ = write!(Sink(out), "<proceed xmlns='{NS_TLS}'/>");
                return (State::TlsHandshake, Step::StartTls);
            }
            // RFC 6120 §5.4.2.2: failure, then the stream is closed.
            let _ = write!(Sink(out), "<failure xmlns='{NS_TLS}'/></stream:stream>");
            return (State::Closed, Step::Close);
        }
        if self.tls_required() {
            // RFC 6120 §5.3.1: nothing but STARTTLS is negotiated before TLS when it is mandatory.
            return self.stream_error("policy-violation", out);
        }
        if self.iap_discards_left > 0
            && matches!(stanza.kind, Kind::Message | Kind::Presence | Kind::Iq)
        {
            // Pipelined behind an `<authenticate/>` refused for a config-version mismatch, on
            // the assumption that it would succeed (XEP-0509): the rejection said these go.
            self.iap_discards_left -= 1;
            tracing::debug!(kind = ?stanza.kind, "pipelined behind a stale authenticate, discarded");
            return cont(State::ExpectStartTlsOrAuth);
        }
        self.iap_discards_left = 0;
        if stanza.kind == Kind::Other
            && ns == Some(NS_SASL2)
            && stanza.name() == "authenticate"
            && self.plain_allowed()
        {
            return self.on_authenticate(&stanza, services, out);
        }
        if stanza.kind != Kind::Other || ns != Some(NS_SASL) {
            return self.stream_error("not-authorized", out);
        }
        match stanza.name() {
            "auth" => {}
            "abort" => return self.sasl_failure(Failure::Aborted, out),
            "response" => return self.sasl_failure(Failure::MalformedRequest, out),
            _ => return self.stream_error("not-authorized", out),
        }
        let stanza_text = stanza.as_str();
        let mechanism =
            attr_value(stanza_text, stanza.header.start_tag_end, "mechanism").unwrap_or_default();
        let payload = match sasl_payload(&stanza) {
            Ok(payload) => payload,
            Err(failure) => return self.sasl_failure(failure, out),
        };
        let outcome = self.start_mechanism(&mechanism, payload, services);
        self.sasl_outcome(outcome, out)
    }

    /// The first step of `mechanism` with the client's initial response, if any; refused at
    /// once (`temporary-auth-failure`) while the client's address has used up its failed logins.
    fn start_mechanism(
        &self,
        mechanism: &str,
        initial: Option<Vec<u8>>,
        services: &mut dyn Services,
    ) -> Outcome {
        limited(services, |services| {
            self.first_step(mechanism, initial, services)
        })
    }

    fn first_step(
        &self,
        mechanism: &str,
        initial: Option<Vec<u8>>,
        services: &mut dyn Services,
    ) -> Outcome {
        if mechanism == "PLAIN" {
            if !self.plain_allowed() {
                return Outcome::Failure(Failure::EncryptionRequired);
            }
            return match initial {
                Some(data) => self.plain(&data, services),
                None => Outcome::Challenge(Vec::new(), Exchange::Plain),
            };
        }
        let Some(hash) = ScramHash::from_mechanism(mechanism) else {
            return Outcome::Failure(Failure::InvalidMechanism);
        };
        match initial {
            Some(data) => self.scram_first(hash, &data, services),
            None => Outcome::Challenge(Vec::new(), Exchange::ScramClientFirst(hash)),
        }
    }

    /// The next step of `exchange` with the client's response `data` (refused like
    /// `start_mechanism`: a mechanism started without an initial response checks here).
    fn continue_exchange(
        &self,
        exchange: Exchange,
        data: &[u8],
        services: &mut dyn Services,
    ) -> Outcome {
        limited(services, |services| {
            self.next_step(exchange, data, services)
        })
    }

    fn next_step(&self, exchange: Exchange, data: &[u8], services: &mut dyn Services) -> Outcome {
        match exchange {
            Exchange::Plain => self.plain(data, services),
            Exchange::ScramClientFirst(hash) => self.scram_first(hash, data, services),
            Exchange::ScramClientFinal(server) => match server.finish(data) {
                Ok(server_final) => Outcome::Success {
                    node: server.node().to_owned(),
                    additional: server_final,
                },
                Err(failure) => Outcome::Failure(failure),
            },
        }
    }

    /// Writes a mechanism step's result in the RFC 6120 profile.
    fn sasl_outcome(&mut self, outcome: Outcome, out: &mut Vec<u8>) -> Next {
        match outcome {
            Outcome::Challenge(data, exchange) => {
                Self::challenge(out, &data);
                cont(State::SaslResponse {
                    exchange,
                    sasl2: None,
                })
            }
            Outcome::Success { node, additional } => self.sasl_success(node, &additional, out),
            Outcome::Failure(failure) => self.sasl_failure(failure, out),
        }
    }

    /// During an exchange: `<response/>` continues it, `<abort/>` ends it, anything else fails it
    /// (in the XEP-0388 profile anything but those two closes the stream, §2.5.1).
    fn on_sasl_response(
        &mut self,
        stanza: Stanza,
        exchange: Exchange,
        sasl2: Option<Box<Sasl2Request>>,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        let ns = if sasl2.is_some() { NS_SASL2 } else { NS_SASL };
        if stanza.kind != Kind::Other || stanza.xmlns().as_deref() != Some(ns) {
            return self.stream_error("not-authorized", out);
        }
        let data = match stanza.name() {
            "response" => match sasl_payload(&stanza) {
                Ok(data) => data.unwrap_or_default(),
                Err(failure) => return self.any_sasl_failure(failure, sasl2.is_some(), out),
            },
            "abort" => return self.any_sasl_failure(Failure::Aborted, sasl2.is_some(), out),
            _ if sasl2.is_some() => return self.stream_error("not-authorized", out),
            _ => return self.sasl_failure(Failure::MalformedRequest, out),
        };
        let outcome = self.continue_exchange(exchange, &data, services);
        match sasl2 {
            None => self.sasl_outcome(outcome, out),
            Some(request) => self.sasl2_outcome(outcome, request, out),
        }
    }

    fn sasl_failure(&mut self, failure: Failure, out: &mut Vec<u8>) -> Next {
        self.any_sasl_failure(failure, false, out)
    }

    fn sasl2_failure(&mut self, failure: Failure, out: &mut Vec<u8>) -> Next {
        self.any_sasl_failure(failure, true, out)
    }

    /// XEP-0509 §2.2: a pipelined `<authenticate/>` whose config version is not the one these
    /// features carry is refused "without prejudice": `<aborted/>` with
    /// `<config-version-mismatch/>`, not counted as a failed login; the client retries on this
    /// stream with the features it has now received. Stanzas it pipelined behind the refused
    /// `<authenticate/>` are discarded (up to `IAP_PIPELINED_STANZAS_DISCARDED_MAX`), as the
    /// `<text/>` says. A client that keeps sending stale values is closed after
    /// `IAP_MISMATCHES_MAX`.
    fn iap_mismatch(&mut self, out: &mut Vec<u8>) -> Next {
        tracing::debug!(
            mismatches = self.iap_mismatches,
            "XEP-0509 config version mismatch"
        );
        let _ = write!(
            Sink(out),
            "<failure xmlns='{NS_SASL2}'><aborted xmlns='{NS_SASL}'/>\
             <config-version-mismatch xmlns='{NS_IAP}'/><text>Configuration version mismatch: \
             authenticate again with the features just sent; stanzas pipelined behind this \
             authenticate were discarded</text></failure>"
        );
        self.iap_mismatches = self.iap_mismatches.saturating_add(1);
        if self.iap_mismatches >= IAP_MISMATCHES_MAX {
            return self.stream_error("policy-violation", out);
        }
        self.iap_discards_left = IAP_PIPELINED_STANZAS_DISCARDED_MAX;
        cont(State::ExpectStartTlsOrAuth)
    }

    fn plain(&self, data: &[u8], services: &mut dyn Services) -> Outcome {
        let config = &self.config;
        match sasl::plain(data, &config.domain, config.scram_iterations, |node| {
            services.credentials(node)
        }) {
            Ok(node) => Outcome::Success {
                node,
                additional: Vec::new(),
            },
            Err(failure) => Outcome::Failure(failure),
        }
    }

    fn scram_first(&self, hash: ScramHash, data: &[u8], services: &mut dyn Services) -> Outcome {
        let first = match sasl::parse_client_first(data) {
            Ok(first) => first,
            Err(failure) => return Outcome::Failure(failure),
        };
        let Some(node) = sasl::normalize_node(&first.username, &self.config.domain) else {
            return Outcome::Failure(Failure::NotAuthorized);
        };
        let credentials = services.credentials(&node);
        match ScramServer::start(
            hash,
            first,
            node,
            &self.config.domain,
            credentials,
            self.config.scram_iterations,
        ) {
            Ok((server, server_first)) => {
                Outcome::Challenge(server_first, Exchange::ScramClientFinal(Box::new(server)))
            }
            Err(failure) => Outcome::Failure(failure),
        }
    }

    // ---- XEP-0388 (SASL2) with XEP-0386 (Bind 2) ----

    /// `<authenticate mechanism=...>` (XEP-0388 §2.3): parses what it asks for, then runs the
    /// mechanism's first step.
    fn on_authenticate(
        &mut self,
        stanza: &Stanza,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        let Some(element) = authenticate::parse(stanza.as_str()) else {
            return self.sasl2_failure(Failure::MalformedRequest, out);
        };
        // XEP-0509: an `<authenticate/>` built on features the client cached is checked before
        // anything else; a stale one is refused without prejudice and costs no credential lookup.
        if let Some(version) = &element.config_version {
            let current = self.pre_auth_features().config_version.as_deref();
            if version.as_deref() != current {
                return self.iap_mismatch(out);
            }
        }
        let mechanism = element.mechanism.unwrap_or_default();
        let initial = match element.initial_response {
            // XEP-0388 §2.3: an empty element is an empty response; no element, no response.
            Some(text) => match Base64.decode(text.trim()) {
                Ok(data) => Some(data),
                Err(_) => return self.sasl2_failure(Failure::IncorrectEncoding, out),
            },
            None => None,
        };
        let user_agent_id = element
            .user_agent
            .flatten()
            .filter(|id| !id.is_empty() && id.len() <= BIND2_TAG_BYTES_MAX);
        let bind = element.bind.map(|bind| Bind2Request {
            tag: bind.tag.map(|t| t.trim().to_owned()).filter(|t| {
                !t.is_empty()
                    && t.len() <= BIND2_TAG_BYTES_MAX
                    && !t.chars().any(|c| c.is_control() || c.is_whitespace())
            }),
            sm_enable: bind
                .enable
                .map(|resume| matches!(resume.as_deref(), Some("true" | "1"))),
        });
        let resume = element.resume.map(|(previd, h)| {
            (
                previd.unwrap_or_default(),
                h.and_then(|h| h.parse::<u32>().ok()),
            )
        });
        let request = Box::new(Sasl2Request {
            resume,
            user_agent_id,
            bind,
        });
        let outcome = self.start_mechanism(&mechanism, initial, services);
        self.sasl2_outcome(outcome, request, out)
    }

    /// Writes a mechanism step's result in the XEP-0388 profile. Success is not written here:
    /// the connection first goes to the user's home shard, where `sasl2_complete` binds.
    fn sasl2_outcome(
        &mut self,
        outcome: Outcome,
        request: Box<Sasl2Request>,
        out: &mut Vec<u8>,
    ) -> Next {
        match outcome {
            Outcome::Challenge(data, exchange) => {
                let _ = write!(
                    Sink(out),
                    "<challenge xmlns='{NS_SASL2}'>{}</challenge>",
                    Base64.encode(&data)
                );
                cont(State::SaslResponse {
                    exchange,
                    sasl2: Some(request),
                })
            }
            Outcome::Success { node, additional } => (
                State::Sasl2Success(Box::new(Sasl2Success {
                    node: node.clone(),
                    additional,
                    request: *request,
                })),
                Step::Authenticated { node },
            ),
            Outcome::Failure(failure) => self.sasl2_failure(failure, out),
        }
    }

    /// On the user's home shard: binds what `<bind/>` asked for (XEP-0386), enables XEP-0198 if
    /// asked inline, and writes `<success/>` with the authorization identifier (the full JID
    /// when bound) and the features of the authenticated stream (no restart, XEP-0388 §2.6.1).
    /// A bind the router refuses leaves the session unbound: `<success/>` carries the bare JID
    /// and the features offer RFC 6120 binding.
    fn sasl2_complete(
        &mut self,
        done: Sasl2Success,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        let Sasl2Success {
            node,
            additional,
            request,
        } = done;
        // XEP-0198 §6.2: a resumption first; when it takes over the session, the bind is
        // ignored and no features follow; when it fails, `<failed/>` and a new session.
        let mut resume_failed = None;
        if let Some((previd, h)) = &request.resume {
            match h.filter(|_| !previd.is_empty()) {
                None => resume_failed = Some("bad-request"),
                Some(h) => match self.take_over(&node, previd, h, services) {
                    Ok(full_jid) => {
                        sasl2_success_start(out, &additional);
                        let _ = write!(
                            Sink(out),
                            "<authorization-identifier>{}</authorization-identifier>",
                            escape(&full_jid)
                        );
                        self.write_resumed(previd, services, out);
                        out.extend_from_slice(b"</success>");
                        self.resend_unacked(out);
                        return cont(State::Established {
                            full_jid: full_jid.into(),
                        });
                    }
                    Err(TakeOver::NotFound) => resume_failed = Some("item-not-found"),
                    Err(TakeOver::CountTooHigh) => return self.handled_count_too_high(out),
                },
            }
        }
        sasl2_success_start(out, &additional);
        let failed = resume_failed
            .map(|c| format!("<failed xmlns='{NS_SM3}'><{c} xmlns='{NS_STANZA_ERRORS}'/></failed>"))
            .unwrap_or_default();
        let bound = request.bind.as_ref().and_then(|bind| {
            // Without randomness there is no resource to generate: no Bind 2, and the client
            // binds with RFC 6120 bind (the server's resource is made by the router).
            let unique = match &request.user_agent_id {
                Some(id) => sasl::stable_resource_id(&node, id),
                None => hex(&self.random_id().ok()?)[..16].to_owned(),
            };
            let tagged = bind.tag.as_ref().map(|tag| format!("{tag}/{unique}"));
            let bound = match tagged {
                Some(resource) => services
                    .bind(&node, Some(&resource))
                    .or_else(|_| services.bind(&node, Some(&unique))),
                None => services.bind(&node, Some(&unique)),
            };
            match bound {
                Ok(full_jid) => Some((full_jid, bind.sm_enable)),
                Err(e) => {
                    tracing::debug!(error = ?e, "bind 2 refused");
                    None
                }
            }
        });
        let Some((full_jid, sm_enable)) = bound else {
            let _ = write!(
                Sink(out),
                "<authorization-identifier>{}@{}</authorization-identifier>{failed}</success>\
                 <stream:features><bind xmlns='{NS_BIND}'/><sm xmlns='{NS_SM3}'/></stream:features>",
                escape(&node),
                escape(&self.config.domain)
            );
            return cont(State::ExpectBind { node });
        };
        let _ = write!(
            Sink(out),
            "<authorization-identifier>{}</authorization-identifier>{failed}\
             <bound xmlns='{NS_BIND2}'>",
            escape(&full_jid)
        );
        if let Some(resume) = sm_enable {
            self.enable_sm(resume, services, out);
        }
        out.extend_from_slice(b"</bound></success>");
        if self.sm.is_none() {
            let _ = write!(
                Sink(out),
                "<stream:features><sm xmlns='{NS_SM3}'/></stream:features>"
            );
        } else {
            out.extend_from_slice(b"<stream:features/>");
        }
        cont(State::Established {
            full_jid: full_jid.into(),
        })
    }

    fn on_expect_bind(
        &mut self,
        stanza: Stanza,
        node: String,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        if stanza.kind == Kind::Other
            && stanza.name() == "resume"
            && stanza.xmlns().as_deref() == Some(NS_SM3)
        {
            return self.on_resume(&stanza, node, services, out);
        }
        // The requested resource: read from the bytes for the plain request every client sends,
        // from a parsed tree for any other shape.
        let request = if stanza.kind != Kind::Iq {
            None
        } else {
            router::build::bind_request(&stanza, NS_BIND)
                .or_else(|| router::build::bind_request_parsed(&stanza, NS_BIND))
        };
        let Some(resource) = request else {
            return self.stream_error("not-authorized", out);
        };
        let id = stanza.id();
        let id = id.as_deref();
        if stanza.type_().as_deref() != Some("set") {
            iq_error(out, id, "modify", "bad-request");
            return cont(State::ExpectBind { node });
        }
        match services.bind(&node, resource.as_deref()) {
            Ok(full_jid) => {
                let _ = write!(Sink(out), "<iq type='result'");
                write_id(out, id);
                let _ = write!(
                    Sink(out),
                    "><bind xmlns='{NS_BIND}'><jid>{}</jid></bind></iq>",
                    escape(&full_jid)
                );
                cont(State::Established {
                    full_jid: full_jid.into(),
                })
            }
            Err(BindError::TooManySessions) => {
                iq_error(out, id, "wait", "resource-constraint");
                cont(State::ExpectBind { node })
            }
            Err(BindError::BadResource) => {
                iq_error(out, id, "modify", "bad-request");
                cont(State::ExpectBind { node })
            }
        }
    }

    fn on_established(
        &mut self,
        stanza: Stanza,
        full_jid: Box<str>,
        services: &mut dyn Services,
        out: &mut Vec<u8>,
    ) -> Next {
        match stanza.kind {
            Kind::Message | Kind::Presence | Kind::Iq => {
                if let Some(ns) = stanza.xmlns() {
                    if ns != NS_CLIENT {
                        return self.stream_error("invalid-namespace", out);
                    }
                }
                if stanza.kind == Kind::Iq && is_session_iq(&stanza) {
                    // RFC 3921 legacy session establishment: a no-op, answered here.
                    let mut result = Vec::new();
                    let _ = write!(Sink(&mut result), "<iq type='result'");
                    write_id(&mut result, stanza.id().as_deref());
                    result.extend_from_slice(b"/>");
                    if let Some(sm) = self.sm.as_mut() {
                        sm.local += 1;
                    }
                    self.state = State::Established { full_jid };
                    let step = self.handle_outbound(Bytes::from(result), None, out);
                    let state = std::mem::replace(&mut self.state, State::Closed);
                    return (state, step);
                }
                services.stanza(stanza.with_from(&full_jid));
                cont(State::Established { full_jid })
            }
            Kind::Other if stanza.xmlns().as_deref() == Some(NS_SM3) => {
                match stanza.name() {
                    "enable" if self.sm.is_none() => {
                        let text = stanza.as_str();
                        let wants_resume = matches!(
                            attr_value(text, stanza.header.start_tag_end, "resume").as_deref(),
                            Some("true" | "1")
                        );
                        self.enable_sm(wants_resume, services, out);
                    }
                    "r" if self.sm.is_some() => self.send_ack(services, out),
                    "a" if self.sm.is_some() => {
                        if !self.on_client_ack(&stanza, services) {
                            return self.handled_count_too_high(out);
                        }
                    }
                    // `<enable/>` twice, `<resume/>` on a live stream, `<r/>`/`<a/>` before
                    // enable: XEP-0198 §3 `unexpected-request`.
                    _ => {
                        let _ = write!(
                            Sink(out),
                            "<failed xmlns='{NS_SM3}'><unexpected-request xmlns='{NS_STANZA_ERRORS}'/></failed>"
                        );
                    }
                }
                cont(State::Established { full_jid })
            }
            Kind::Other => self.stream_error("unsupported-stanza-type", out),
        }
    }
}

impl C2s {
    /// XEP-0198 `<enable/>` on a bound stream (or inline in a Bind 2 request): writes
    /// `<enabled/>`, with a resumption id when asked for and resumption is on.
    fn enable_sm(&mut self, wants_resume: bool, services: &mut dyn Services, out: &mut Vec<u8>) {
        let max = self.config.sm_resume_timeout.as_secs();
        // Without randomness there is no unguessable resumption id: the stream gets XEP-0198
        // without resumption (the server may always decline it, XEP-0198 §5).
        let id = if wants_resume && max > 0 {
            self.random_id().ok()
        } else {
            None
        };
        self.sm = Some(Box::new(Sm {
            base: services.received(),
            local: 0,
            ack_wanted: false,
            sent: 0,
            acked: 0,
            unacked: VecDeque::new(),
            since_request: 0,
            id,
        }));
        services.sm_enabled();
        match id.as_ref().map(hex) {
            Some(id) => {
                let _ = write!(
                    Sink(out),
                    "<enabled xmlns='{NS_SM3}' id='{id}' resume='true' max='{max}'/>"
                );
            }
            None => {
                let _ = write!(Sink(out), "<enabled xmlns='{NS_SM3}'/>");
            }
        }
    }
}

/// What the features before authentication depend on: nothing else goes into them, so they are
/// rendered (and their XEP-0509 config version computed) once per process per set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FeatureSet {
    /// The bytes travel under TLS (direct TLS, or after STARTTLS).
    tls: bool,
    starttls_offered: bool,
    allow_plaintext: bool,
}

/// The rendered features before authentication of one `FeatureSet`.
#[derive(Debug)]
struct PreAuthFeatures {
    /// The children of `<stream:features>`, the XEP-0509 `<config-version/>` last.
    rendered: Box<[u8]>,
    /// The XEP-0509 config version, when SASL2 is offered.
    config_version: Option<Box<str>>,
}

/// Bytes of SHA-256 kept in a XEP-0509 config version (96 bits: 16 base64 characters).
const CONFIG_VERSION_HASH_BYTES: usize = 12;

impl FeatureSet {
    fn plain_allowed(self) -> bool {
        self.tls || self.allow_plaintext
    }

    fn tls_required(self) -> bool {
        !self.tls && self.starttls_offered && !self.allow_plaintext
    }

    fn index(self) -> usize {
        usize::from(self.tls) * 4
            + usize::from(self.starttls_offered) * 2
            + usize::from(self.allow_plaintext)
    }

    /// This set's features, rendered on first use. Read-only afterwards: every shard reads the
    /// same bytes, nothing is written on the hot path.
    fn pre_auth_features(self) -> &'static PreAuthFeatures {
        static CACHE: [OnceLock<PreAuthFeatures>; 8] = [const { OnceLock::new() }; 8];
        CACHE[self.index()].get_or_init(|| self.render())
    }

    /// The features, then (when SASL2 is offered) the XEP-0509 config version: a hash of the
    /// features rendered without it (XEP-0509 §2.3.1's example), so any change to what is
    /// offered, such as PLAIN or an inline feature, gives a new version.
    fn render(self) -> PreAuthFeatures {
        let mut out = Vec::with_capacity(512);
        if !self.tls && self.starttls_offered {
            if self.tls_required() {
                let _ = write!(
                    Sink(&mut out),
                    "<starttls xmlns='{NS_TLS}'><required/></starttls>"
                );
            } else {
                let _ = write!(Sink(&mut out), "<starttls xmlns='{NS_TLS}'/>");
            }
        }
        let mut config_version = None;
        if !self.tls_required() {
            let _ = write!(
                Sink(&mut out),
                "<mechanisms xmlns='{NS_SASL}'><mechanism>SCRAM-SHA-256</mechanism><mechanism>SCRAM-SHA-1</mechanism>"
            );
            if self.plain_allowed() {
                out.extend_from_slice(b"<mechanism>PLAIN</mechanism>");
            }
            out.extend_from_slice(b"</mechanisms>");
            // SASL2 is offered where PLAIN is (under TLS, or in the loopback plaintext mode):
            // XEP-0388 §7 wants it only after TLS.
            if self.plain_allowed() {
                let _ = write!(
                    Sink(&mut out),
                    "<authentication xmlns='{NS_SASL2}'><mechanism>SCRAM-SHA-256</mechanism>\
                     <mechanism>SCRAM-SHA-1</mechanism><mechanism>PLAIN</mechanism><inline>\
                     <sm xmlns='{NS_SM3}'/><bind xmlns='{NS_BIND2}'><inline><feature var='{NS_SM3}'/>\
                     </inline></bind></inline></authentication>"
                );
                let digest = sasl::sha256(&out);
                let version = Base64.encode(&digest[..CONFIG_VERSION_HASH_BYTES]);
                let _ = write!(
                    Sink(&mut out),
                    "<config-version xmlns='{NS_IAP}' value='{version}'/>"
                );
                config_version = Some(version.into_boxed_str());
            }
        }
        PreAuthFeatures {
            rendered: out.into_boxed_slice(),
            config_version,
        }
    }
}

/// The start of a XEP-0388 `<success/>`, with the mechanism's success data if any.
fn sasl2_success_start(out: &mut Vec<u8>, additional: &[u8]) {
    let _ = write!(Sink(out), "<success xmlns='{NS_SASL2}'>");
    if !additional.is_empty() {
        let _ = write!(
            Sink(out),
            "<additional-data>{}</additional-data>",
            Base64.encode(additional)
        );
    }
}

/// Bytes of a random id: stream ids, XEP-0198 resumption ids (and, cut, generated resources).
const RESUME_ID_BYTES: usize = 16;

/// Lowercase hex, as resumption ids are sent.
fn hex(bytes: &[u8; RESUME_ID_BYTES]) -> String {
    let mut out = Vec::with_capacity(2 * RESUME_ID_BYTES);
    push_hex(&mut out, bytes);
    String::from_utf8(out).expect("hex digits are ASCII")
}

/// Appends lowercase hex, as `hex` makes it, without a `String` in between.
fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)]);
        out.push(DIGITS[usize::from(b & 15)]);
    }
}

/// `Vec<u8>` as a `fmt::Write` target.
struct Sink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Sink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

fn write_id(out: &mut Vec<u8>, id: Option<&str>) {
    if let Some(id) = id {
        let _ = write!(Sink(out), " id='{}'", escape(id));
    }
}

fn iq_error(out: &mut Vec<u8>, id: Option<&str>, type_: &str, condition: &str) {
    let _ = write!(Sink(out), "<iq type='error'");
    write_id(out, id);
    let _ = write!(
        Sink(out),
        "><error type='{type_}'><{condition} xmlns='{NS_STANZA_ERRORS}'/></error></iq>"
    );
}

/// RFC 6120 §4.7.5: `major.minor`; we speak 1.0, so any major version 1 or above is answered
/// with 1.0. A missing version means pre-1.0 (RFC 3920 era) and is refused.
fn version_supported(version: Option<&str>) -> bool {
    let Some((major, minor)) = version.and_then(|v| v.split_once('.')) else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.len() <= 9 && s.bytes().all(|b| b.is_ascii_digit());
    digits(major) && digits(minor) && major.parse::<u32>().is_ok_and(|m| m >= 1)
}

/// The unescaped value of attribute `name` in the start tag `text[..start_tag_end]` (which the
/// framer has checked to be well-formed).
fn attr_value(text: &str, start_tag_end: usize, name: &str) -> Option<String> {
    let tag = text.get(..start_tag_end)?;
    // Skip `<` and the element name.
    let mut rest = tag
        .get(1..)?
        .trim_start_matches(|c: char| !c.is_whitespace());
    loop {
        rest = rest.trim_start();
        let (attr, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let quote = after.chars().next()?;
        if quote != '\'' && quote != '"' {
            return None;
        }
        let (value, after) = after[1..].split_once(quote)?;
        if attr.trim_end() == name {
            return shared::escape::unescape(value).map(|v| v.into_owned());
        }
        rest = after;
    }
}

/// The base64 text of a SASL element: `None` for no data (an empty element), `Some(empty)` for
/// `=` (RFC 6120 §6.4.2).
fn sasl_payload(stanza: &Stanza) -> Result<Option<Vec<u8>>, Failure> {
    if stanza.header.self_closing {
        return Ok(None);
    }
    let text = stanza.as_str();
    let start = stanza.header.start_tag_end + 1;
    let end = text.rfind("</").ok_or(Failure::MalformedRequest)?;
    let inner = text
        .get(start..end)
        .ok_or(Failure::MalformedRequest)?
        .trim();
    if inner.contains('<') {
        return Err(Failure::MalformedRequest);
    }
    match inner {
        "" => Ok(None),
        "=" => Ok(Some(Vec::new())),
        _ => Base64
            .decode(inner)
            .map(Some)
            .map_err(|_| Failure::IncorrectEncoding),
    }
}

fn is_session_iq(stanza: &Stanza) -> bool {
    stanza.type_().as_deref() == Some("set")
        && stanza.as_str().contains(NS_SESSION)
        && router::build::parse(stanza)
            .is_some_and(|iq| iq.get_child("session", NS_SESSION).is_some())
}
