//! TLS 1.3 application traffic after the handshake: the record layer (RFC 8446 §5) run here over
//! ring's AEAD, the way the kernel's kTLS runs it, with rustls doing the whole handshake.
//!
//! Why not stay on rustls: its connection state costs about 1.1 KiB inline plus its record
//! layer's expanded AES-GCM keys and handshake leftovers on the heap, for the connection's life,
//! and it has no smaller idle form (measured: an idle direct-TLS session cost ~4,000 B more than
//! a plaintext one). Once the handshake is done, all a TLS 1.3 session needs is, per direction,
//! its traffic secret (for KeyUpdate), the AEAD key and IV derived from it, and a sequence
//! number: `Tls13Records` holds exactly that (208 B; with its two empty buffers the whole
//! `TlsSession` is 256 B). AEAD keys are held raw and expanded on the
//! stack once per call (ring's `LessSafeKey` is 544 B each, expanded AES schedule and GHASH
//! table included); only the record framing is ours, the cryptography is ring's.
//!
//! rustls hands over the keys and sequence numbers (`dangerous_into_kernel_connection`); the
//! traffic secrets, which a KeyUpdate needs and which rustls keeps only inside its
//! `KernelConnection` (~800 B with its boxed key schedule), reach us through the server
//! configuration's key log (`TrafficSecretCapture`), on the shard's own thread during the
//! handshake call, and are checked against rustls's keys before use.

use std::cell::Cell;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use ring::hkdf;
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, SupportedCipherSuite};

/// Largest plaintext in one record (RFC 8446 §5.1).
pub const RECORD_PLAINTEXT_BYTES_MAX: usize = 1 << 14;
/// Largest ciphertext in one record (RFC 8446 §5.2: plaintext, content type, padding and tag).
pub const RECORD_CIPHERTEXT_BYTES_MAX: usize = RECORD_PLAINTEXT_BYTES_MAX + 256;
/// A record's header: content type, legacy version, length.
pub const RECORD_HEADER_BYTES: usize = 5;
/// The AEAD tag of every TLS 1.3 suite.
const TAG_BYTES: usize = 16;
/// What one record adds to its data: header, inner content type, tag.
pub const RECORD_OVERHEAD_BYTES: usize = RECORD_HEADER_BYTES + 1 + TAG_BYTES;
/// Longest traffic secret (SHA-384 suites).
const SECRET_BYTES_MAX: usize = 48;
/// Longest AEAD key (AES-256, ChaCha20).
const KEY_BYTES_MAX: usize = 32;
/// TLS 1.3 per-record nonce and IV length (RFC 8446 §5.3).
const IV_BYTES: usize = 12;

const CONTENT_CHANGE_CIPHER_SPEC: u8 = 20;
const CONTENT_ALERT: u8 = 21;
const CONTENT_HANDSHAKE: u8 = 22;
const CONTENT_APPLICATION_DATA: u8 = 23;
const HANDSHAKE_KEY_UPDATE: u8 = 24;
const KEY_UPDATE_NOT_REQUESTED: u8 = 0;
const KEY_UPDATE_REQUESTED: u8 = 1;
const ALERT_WARNING: u8 = 1;
const ALERT_FATAL: u8 = 2;
const ALERT_CLOSE_NOTIFY: u8 = 0;
const ALERT_UNEXPECTED_MESSAGE: u8 = 10;
const ALERT_BAD_RECORD_MAC: u8 = 20;
const ALERT_RECORD_OVERFLOW: u8 = 22;
const ALERT_DECODE_ERROR: u8 = 50;
const ALERT_USER_CANCELED: u8 = 90;

/// Why the record layer ended the session. The variants that are our verdict on the peer's
/// records have queued the matching fatal alert.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("a record failed authentication (bad_record_mac)")]
    BadRecordMac,
    #[error("a record is longer than RFC 8446 allows (record_overflow)")]
    RecordOverflow,
    #[error("unexpected message after the handshake: {0} (unexpected_message)")]
    UnexpectedMessage(&'static str),
    #[error("malformed {0} (decode_error)")]
    Decode(&'static str),
    #[error("the peer sent alert {0}")]
    PeerAlert(u8),
    #[error("sequence number space spent")]
    SequenceSpent,
    #[error("a record could not be sealed")]
    Seal,
    #[error("the session was closed")]
    Closed,
    #[error("cannot take over the session from rustls: {0}")]
    Takeover(String),
}

/// What `Tls13Records::open` found in the received bytes.
pub enum Opened<S> {
    /// Every complete record was read; `Some` is the step that stopped the feeding (the records
    /// after it stay in `incoming`, unopened).
    Fed(Option<S>),
    /// The peer sent close_notify.
    PeerClosed,
}

/// The record protection of one TLS 1.3 session after its handshake: per direction the
/// traffic secret, key, IV and sequence number, nothing else.
pub struct Tls13Records {
    /// Sequence numbers of the next record each way (kept outside `Direction`, which then has
    /// no padding: the whole session fits mimalloc's 256-byte size class).
    tx_seq: u64,
    rx_seq: u64,
    tx: Direction,
    rx: Direction,
    suite: Suite,
    /// The peer asked for our KeyUpdate; it goes before our next record.
    key_update_owed: bool,
    /// A fatal alert or close_notify was sent, or the peer closed: nothing more is sealed.
    closed: bool,
}

impl Tls13Records {
    /// Takes over from rustls: its keys and sequence numbers, and the captured traffic secrets
    /// (checked: they must derive exactly rustls's keys).
    pub fn new(
        suite: SupportedCipherSuite,
        extracted: ExtractedSecrets,
        secrets: &TrafficSecrets,
    ) -> Result<Self, RecordError> {
        let takeover = |why: &str| RecordError::Takeover(why.to_string());
        let SupportedCipherSuite::Tls13(tls13) = suite else {
            return Err(takeover("not TLS 1.3"));
        };
        let (tx_seq, tx_keys) = extracted.tx;
        let (rx_seq, rx_keys) = extracted.rx;
        let suite = Suite::of(&tx_keys).ok_or_else(|| takeover("unknown AEAD"))?;
        if Suite::of(&rx_keys) != Some(suite)
            || suite.hash_bytes() != tls13.common.hash_provider.output_len()
        {
            return Err(takeover("cipher suites disagree"));
        }
        // Server side: we transmit with the server's secret, receive with the client's.
        let (Some(server), Some(client)) = (secrets.server, secrets.client) else {
            return Err(takeover("traffic secrets were not captured"));
        };
        let tx = Direction::from_secret(suite, server.bytes())?;
        let rx = Direction::from_secret(suite, client.bytes())?;
        if !tx.has_keys(&tx_keys) || !rx.has_keys(&rx_keys) {
            return Err(takeover("captured secrets do not match rustls's keys"));
        }
        if suite.tx_records_max() > tls13.common.confidentiality_limit {
            return Err(takeover(
                "the suite's confidentiality limit is lower than ours",
            ));
        }
        Ok(Self {
            tx_seq,
            rx_seq,
            tx,
            rx,
            suite,
            key_update_owed: false,
            closed: false,
        })
    }

    /// Opens the complete records at the front of `incoming` and hands their application data
    /// to `feed` in order; `feed` returns `Some` to stop. Opened records leave `incoming`; an
    /// incomplete record stays. A KeyUpdate the peer asks for is queued in `outgoing`. On an
    /// error the matching alert is queued in `outgoing` and the session is closed.
    pub fn open<S>(
        &mut self,
        incoming: &mut Vec<u8>,
        outgoing: &mut Vec<u8>,
        feed: &mut dyn FnMut(&[u8]) -> Option<S>,
    ) -> Result<Opened<S>, RecordError> {
        let result = self.open_records(incoming, feed);
        if self.key_update_owed && !self.closed {
            self.send_key_update(outgoing, KEY_UPDATE_NOT_REQUESTED);
        }
        if let Err(e) = &result {
            if let Some(alert) = e.alert() {
                self.send_alert(outgoing, ALERT_FATAL, alert);
            }
            self.closed = true;
        }
        result
    }

    /// Seals `data` into application data records (at most 2^14 bytes each) in `outgoing`.
    pub fn seal(&mut self, data: &[u8], outgoing: &mut Vec<u8>) -> Result<(), RecordError> {
        if self.closed {
            return Err(RecordError::Closed);
        }
        let records = data.len().div_ceil(RECORD_PLAINTEXT_BYTES_MAX);
        outgoing.reserve(data.len() + records * RECORD_OVERHEAD_BYTES);
        if self.key_update_owed {
            self.send_key_update(outgoing, KEY_UPDATE_NOT_REQUESTED);
        }
        let mut key = self.tx.key(self.suite);
        for chunk in data.chunks(RECORD_PLAINTEXT_BYTES_MAX) {
            if self.tx_seq >= self.suite.tx_records_max() {
                // RFC 8446 §5.5: update the key before the suite's limit.
                self.send_key_update(outgoing, KEY_UPDATE_NOT_REQUESTED);
                key = self.tx.key(self.suite);
            }
            self.tx.seal(
                &key,
                &mut self.tx_seq,
                CONTENT_APPLICATION_DATA,
                chunk,
                outgoing,
            )?;
        }
        Ok(())
    }

    /// Queues a close_notify alert; nothing is sealed after it.
    pub fn close_notify(&mut self, outgoing: &mut Vec<u8>) {
        if !self.closed {
            self.send_alert(outgoing, ALERT_WARNING, ALERT_CLOSE_NOTIFY);
            self.closed = true;
        }
    }

    #[cfg(test)]
    pub fn tx_seq(&self) -> u64 {
        self.tx_seq
    }

    /// Lowers every suite's key limit on this thread (tests reach it in a few records).
    #[cfg(test)]
    pub fn set_tx_records_max_for_tests(records: Option<u64>) {
        TX_RECORDS_MAX_FOR_TESTS.set(records);
    }

    fn open_records<S>(
        &mut self,
        incoming: &mut Vec<u8>,
        feed: &mut dyn FnMut(&[u8]) -> Option<S>,
    ) -> Result<Opened<S>, RecordError> {
        let mut at = 0;
        // Expanded on first use, again after a KeyUpdate.
        let mut rx_key = None;
        let mut outcome = Opened::Fed(None);
        // Bounded: every pass consumes one complete record of `incoming`.
        while let Some(&[content_type, _, _, high, low]) =
            incoming.get(at..at + RECORD_HEADER_BYTES)
        {
            let len = usize::from(u16::from_be_bytes([high, low]));
            if len > RECORD_CIPHERTEXT_BYTES_MAX {
                return Err(RecordError::RecordOverflow);
            }
            if content_type != CONTENT_APPLICATION_DATA {
                // RFC 8446 §5: unprotected records (change_cipher_spec included) end with the
                // handshake.
                let what = if content_type == CONTENT_CHANGE_CIPHER_SPEC {
                    "change_cipher_spec"
                } else {
                    "an unprotected record"
                };
                return Err(RecordError::UnexpectedMessage(what));
            }
            let end = at + RECORD_HEADER_BYTES + len;
            if incoming.len() < end {
                break;
            }
            let key = rx_key.get_or_insert_with(|| self.rx.key(self.suite));
            let (header, body) = incoming[at..end].split_at_mut(RECORD_HEADER_BYTES);
            let nonce = self.rx.nonce(next_seq(&mut self.rx_seq)?);
            let inner = key
                .open_in_place(nonce, Aad::from(&*header), body)
                .map_err(|_| RecordError::BadRecordMac)?;
            // RFC 8446 §5.4: the content type is the last non-zero byte; zeros after it pad.
            let Some(type_at) = inner.iter().rposition(|&b| b != 0) else {
                return Err(RecordError::UnexpectedMessage(
                    "a record without content type",
                ));
            };
            if type_at > RECORD_PLAINTEXT_BYTES_MAX {
                return Err(RecordError::RecordOverflow);
            }
            let inner_type = inner[type_at];
            let payload = &inner[..type_at];
            at = end;
            match inner_type {
                CONTENT_APPLICATION_DATA => {
                    if payload.is_empty() {
                        continue;
                    }
                    if let Some(step) = feed(payload) {
                        outcome = Opened::Fed(Some(step));
                        break;
                    }
                }
                CONTENT_HANDSHAKE => {
                    let requested = key_update_request(payload)?;
                    // RFC 8446 §4.6.3: decrypt what follows with the next key; answer with ours
                    // (once, however many requests) before our next record.
                    self.rx.update(self.suite);
                    self.rx_seq = 0;
                    rx_key = None;
                    self.key_update_owed |= requested;
                }
                CONTENT_ALERT => match payload {
                    [_, ALERT_CLOSE_NOTIFY] => {
                        outcome = Opened::PeerClosed;
                        self.closed = true;
                        break;
                    }
                    // A warning that a close_notify should follow: wait for it.
                    [_, ALERT_USER_CANCELED] => {}
                    [_, description] => return Err(RecordError::PeerAlert(*description)),
                    _ => return Err(RecordError::Decode("alert")),
                },
                _ => return Err(RecordError::UnexpectedMessage("a record of unknown type")),
            }
        }
        incoming.drain(..at);
        Ok(outcome)
    }

    /// Queues a KeyUpdate (under the current key), then moves to the next transmit key.
    fn send_key_update(&mut self, outgoing: &mut Vec<u8>, request: u8) {
        let key = self.tx.key(self.suite);
        let message = [HANDSHAKE_KEY_UPDATE, 0, 0, 1, request];
        if self
            .tx
            .seal(
                &key,
                &mut self.tx_seq,
                CONTENT_HANDSHAKE,
                &message,
                outgoing,
            )
            .is_err()
        {
            self.closed = true;
        } else {
            self.tx.update(self.suite);
            self.tx_seq = 0;
        }
        self.key_update_owed = false;
    }

    /// Queues an alert record (best effort: the session is closing).
    fn send_alert(&mut self, outgoing: &mut Vec<u8>, level: u8, description: u8) {
        let key = self.tx.key(self.suite);
        let _ = self.tx.seal(
            &key,
            &mut self.tx_seq,
            CONTENT_ALERT,
            &[level, description],
            outgoing,
        );
    }
}

impl RecordError {
    /// The alert that tells the peer why (none for the peer's own alert or close).
    fn alert(&self) -> Option<u8> {
        match self {
            Self::BadRecordMac => Some(ALERT_BAD_RECORD_MAC),
            Self::RecordOverflow => Some(ALERT_RECORD_OVERFLOW),
            Self::UnexpectedMessage(_) => Some(ALERT_UNEXPECTED_MESSAGE),
            Self::Decode(_) => Some(ALERT_DECODE_ERROR),
            Self::PeerAlert(_)
            | Self::Closed
            | Self::Takeover(_)
            | Self::SequenceSpent
            | Self::Seal => None,
        }
    }
}

/// A post-handshake handshake record from the client: only a lone KeyUpdate is allowed
/// (we request no client certificate, and a client sends no tickets). Its `request_update`.
/// A KeyUpdate is 5 bytes; a client never fragments it, and RFC 8446 §5.1 forbids one sharing
/// a record with what follows it across the key change, so one record must hold exactly one.
fn key_update_request(message: &[u8]) -> Result<bool, RecordError> {
    match message {
        [HANDSHAKE_KEY_UPDATE, 0, 0, 1, KEY_UPDATE_NOT_REQUESTED] => Ok(false),
        [HANDSHAKE_KEY_UPDATE, 0, 0, 1, KEY_UPDATE_REQUESTED] => Ok(true),
        [HANDSHAKE_KEY_UPDATE, ..] => Err(RecordError::Decode("KeyUpdate")),
        _ => Err(RecordError::UnexpectedMessage(
            "a handshake message other than KeyUpdate",
        )),
    }
}

/// The three TLS 1.3 AEAD suites rustls's ring provider offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Suite {
    Aes128GcmSha256,
    Aes256GcmSha384,
    Chacha20Poly1305Sha256,
}

impl Suite {
    fn of(keys: &ConnectionTrafficSecrets) -> Option<Self> {
        match keys {
            ConnectionTrafficSecrets::Aes128Gcm { .. } => Some(Self::Aes128GcmSha256),
            ConnectionTrafficSecrets::Aes256Gcm { .. } => Some(Self::Aes256GcmSha384),
            ConnectionTrafficSecrets::Chacha20Poly1305 { .. } => Some(Self::Chacha20Poly1305Sha256),
            _ => None,
        }
    }

    fn aead(self) -> &'static aead::Algorithm {
        match self {
            Self::Aes128GcmSha256 => &aead::AES_128_GCM,
            Self::Aes256GcmSha384 => &aead::AES_256_GCM,
            Self::Chacha20Poly1305Sha256 => &aead::CHACHA20_POLY1305,
        }
    }

    fn hkdf(self) -> hkdf::Algorithm {
        match self {
            Self::Aes256GcmSha384 => hkdf::HKDF_SHA384,
            _ => hkdf::HKDF_SHA256,
        }
    }

    fn hash_bytes(self) -> usize {
        match self {
            Self::Aes256GcmSha384 => 48,
            _ => 32,
        }
    }

    fn key_bytes(self) -> usize {
        self.aead().key_len()
    }

    /// Records sealed under one key before we update it: RFC 8446 §5.5 puts AES-GCM's limit at
    /// 2^24.5 full-size records (rustls's ring suites say 2^24); ChaCha20-Poly1305 has none
    /// that a sequence number reaches.
    fn tx_records_max(self) -> u64 {
        #[cfg(test)]
        if let Some(records) = TX_RECORDS_MAX_FOR_TESTS.get() {
            return records;
        }
        match self {
            Self::Aes128GcmSha256 | Self::Aes256GcmSha384 => 1 << 24,
            Self::Chacha20Poly1305Sha256 => u64::MAX,
        }
    }
}

/// One direction's keys: traffic secret, the key and IV derived from it.
struct Direction {
    secret: [u8; SECRET_BYTES_MAX],
    key: [u8; KEY_BYTES_MAX],
    iv: [u8; IV_BYTES],
}

impl Direction {
    fn from_secret(suite: Suite, secret: &[u8]) -> Result<Self, RecordError> {
        let mut d = Self {
            secret: [0; SECRET_BYTES_MAX],
            key: [0; KEY_BYTES_MAX],
            iv: [0; IV_BYTES],
        };
        let secret = secret
            .get(..suite.hash_bytes())
            .ok_or_else(|| RecordError::Takeover("traffic secret too short".to_string()))?;
        d.secret[..secret.len()].copy_from_slice(secret);
        d.derive_keys(suite);
        Ok(d)
    }

    fn has_keys(&self, keys: &ConnectionTrafficSecrets) -> bool {
        let (ConnectionTrafficSecrets::Aes128Gcm { key, iv }
        | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
        | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv }) = keys
        else {
            return false;
        };
        key.as_ref() == &self.key[..key.as_ref().len()] && iv.as_ref() == self.iv
    }

    /// RFC 8446 §7.2: the next traffic secret, its key and IV (the caller restarts the sequence).
    fn update(&mut self, suite: Suite) {
        let len = suite.hash_bytes();
        let mut next = [0u8; SECRET_BYTES_MAX];
        expand_label(suite, &self.secret[..len], b"traffic upd", &mut next[..len]);
        self.secret = next;
        next.fill(0);
        self.derive_keys(suite);
    }

    /// RFC 8446 §7.3: key and IV from the traffic secret.
    fn derive_keys(&mut self, suite: Suite) {
        let secret = &self.secret[..suite.hash_bytes()];
        expand_label(suite, secret, b"key", &mut self.key[..suite.key_bytes()]);
        expand_label(suite, secret, b"iv", &mut self.iv);
    }

    /// The expanded AEAD key, built on the stack for one call's records.
    fn key(&self, suite: Suite) -> LessSafeKey {
        let raw = &self.key[..suite.key_bytes()];
        // The length is the algorithm's own, the only way this can fail.
        LessSafeKey::new(UnboundKey::new(suite.aead(), raw).expect("AEAD key length"))
    }

    /// RFC 8446 §5.3: the IV XOR the record's sequence number.
    fn nonce(&self, seq: u64) -> Nonce {
        let mut nonce = self.iv;
        for (n, s) in nonce[IV_BYTES - 8..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        Nonce::assume_unique_for_key(nonce)
    }

    /// Appends one record: header, `data`, inner content type, tag.
    fn seal(
        &self,
        key: &LessSafeKey,
        seq: &mut u64,
        content_type: u8,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        debug_assert!(data.len() <= RECORD_PLAINTEXT_BYTES_MAX);
        let nonce = self.nonce(next_seq(seq)?);
        let len = (data.len() + 1 + TAG_BYTES) as u16;
        let [high, low] = len.to_be_bytes();
        let header = [CONTENT_APPLICATION_DATA, 3, 3, high, low];
        out.extend_from_slice(&header);
        let start = out.len();
        out.extend_from_slice(data);
        out.push(content_type);
        let tag = key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut out[start..])
            .map_err(|_| RecordError::Seal)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }
}

impl Drop for Direction {
    fn drop(&mut self) {
        // Best effort: do not leave keys in freed memory.
        self.secret.fill(0);
        self.key.fill(0);
        self.iv.fill(0);
        std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
    }
}

/// The sequence number for this record; the next one is one more. Never reuse a nonce: the
/// session closes before the number wraps.
fn next_seq(seq: &mut u64) -> Result<u64, RecordError> {
    let this = *seq;
    *seq = this.checked_add(1).ok_or(RecordError::SequenceSpent)?;
    Ok(this)
}

/// RFC 8446 §7.1 HKDF-Expand-Label with an empty context.
fn expand_label(suite: Suite, secret: &[u8], label: &[u8], out: &mut [u8]) {
    const PREFIX: &[u8] = b"tls13 ";
    let length = (out.len() as u16).to_be_bytes();
    let label_len = [(PREFIX.len() + label.len()) as u8];
    let context_len = [0u8];
    let info: [&[u8]; 5] = [&length, &label_len, PREFIX, label, &context_len];
    let prk = hkdf::Prk::new_less_safe(suite.hkdf(), secret);
    // Lengths are the suite's own (at most 255 hash blocks), the only way these can fail.
    prk.expand(&info, OutputLen(out.len()))
        .and_then(|okm| okm.fill(out))
        .expect("HKDF-Expand-Label length");
}

struct OutputLen(usize);

impl hkdf::KeyType for OutputLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// One traffic secret as rustls's key log gave it.
#[derive(Clone, Copy)]
pub struct Secret {
    bytes: [u8; SECRET_BYTES_MAX],
    len: u8,
}

impl Secret {
    fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The application traffic secrets of the handshake in progress, taken from the key log right
/// after each rustls call (kept in the session until the takeover).
#[derive(Clone, Copy, Default)]
pub struct TrafficSecrets {
    pub client: Option<Secret>,
    pub server: Option<Secret>,
}

impl TrafficSecrets {
    /// Takes what the key log captured during the rustls call that just returned on this
    /// thread (that call ran one session's handshake, so nothing else's can be there).
    pub fn take_captured() -> Self {
        CAPTURED.with(Cell::take)
    }

    /// Keeps the secrets `other` has.
    pub fn merge(&mut self, other: Self) {
        self.client = other.client.or(self.client);
        self.server = other.server.or(self.server);
    }

    pub fn is_empty(&self) -> bool {
        self.client.is_none() && self.server.is_none()
    }

    pub fn is_complete(&self) -> bool {
        self.client.is_some() && self.server.is_some()
    }
}

#[cfg(test)]
thread_local! {
    static TX_RECORDS_MAX_FOR_TESTS: Cell<Option<u64>> = const { Cell::new(None) };
}

thread_local! {
    /// Secrets logged by rustls during the current call on this shard's thread.
    static CAPTURED: Cell<TrafficSecrets> = const { Cell::new(TrafficSecrets { client: None, server: None }) };
}

/// The server configuration's key log: keeps the two application traffic secrets (and nothing
/// else) on the calling thread for `TrafficSecrets::take_captured`. Writes no file.
#[derive(Debug)]
pub struct TrafficSecretCapture;

const CLIENT_TRAFFIC_SECRET_LABEL: &str = "CLIENT_TRAFFIC_SECRET_0";
const SERVER_TRAFFIC_SECRET_LABEL: &str = "SERVER_TRAFFIC_SECRET_0";

impl rustls::KeyLog for TrafficSecretCapture {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if secret.len() > SECRET_BYTES_MAX {
            return;
        }
        let mut s = Secret {
            bytes: [0; SECRET_BYTES_MAX],
            len: secret.len() as u8,
        };
        s.bytes[..secret.len()].copy_from_slice(secret);
        CAPTURED.with(|c| {
            let mut captured = c.get();
            match label {
                CLIENT_TRAFFIC_SECRET_LABEL => captured.client = Some(s),
                SERVER_TRAFFIC_SECRET_LABEL => captured.server = Some(s),
                _ => return,
            }
            c.set(captured);
        });
    }

    fn will_log(&self, label: &str) -> bool {
        matches!(
            label,
            CLIENT_TRAFFIC_SECRET_LABEL | SERVER_TRAFFIC_SECRET_LABEL
        )
    }
}
