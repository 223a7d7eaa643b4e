//! TLS setup: the rustls server configuration from configured PEM files, or from a self-signed
//! certificate for the domain that is generated into the data dir on first start.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::sign::CertifiedKey;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError, WriteTraffic,
};
use rustls::{ProtocolVersion, ServerConfig};
use shared::config::Config;

use crate::record::{Opened, RecordError, Tls13Records, TrafficSecretCapture, TrafficSecrets};

/// Builds the server TLS configuration (TLS 1.2 and 1.3, no client auth) on `CRYPTO_LIBRARY`.
pub fn server_config(config: &Config) -> Result<Arc<ServerConfig>> {
    server_config_with(
        config,
        CRYPTO_LIBRARY.login_cheap_provider(),
        CRYPTO_LIBRARY.ticketer()?,
    )
}

/// `server_config` on a given provider and ticketer (benchmarks compare libraries with it).
pub fn server_config_with(
    config: &Config,
    provider: rustls::crypto::CryptoProvider,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
) -> Result<Arc<ServerConfig>> {
    let pairs = match (&config.tls_cert_path, &config.tls_key_path) {
        (Some(c), Some(k)) => {
            let mut pairs = vec![CertFiles::configured(c, k, "tls_cert_path", "tls_key_path")];
            if let (Some(c), Some(k)) = (&config.tls_alt_cert_path, &config.tls_alt_key_path) {
                pairs.push(CertFiles::configured(
                    c,
                    k,
                    "tls_alt_cert_path",
                    "tls_alt_key_path",
                ));
            }
            pairs
        }
        _ => generated_paths(config)?,
    };
    let keys = pairs
        .iter()
        .map(|files| files.load(&provider))
        .collect::<Result<Vec<_>>>()?;
    let mut server = ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(CheapestSigner::new(keys)));
    server.alpn_protocols = vec![b"xmpp-client".to_vec()];
    // Our cipher suite order, not the client's: AES-128-GCM-SHA256 first (see
    // `CryptoLibrary::login_cheap_provider`).
    server.ignore_client_order = true;
    // Stateless TLS 1.3 tickets (keys rotated by rustls): a reconnecting client resumes without
    // a certificate signature, and the server keeps no per-session cache.
    server.ticketer = ticketer;
    server.send_tls13_tickets = TLS13_TICKETS_PER_HANDSHAKE;
    // TLS 1.3 sessions leave rustls after the handshake for our lean record layer (`record`):
    // rustls hands over the keys, its key log the traffic secrets (kept in memory, never
    // written anywhere).
    server.enable_secret_extraction = true;
    server.key_log = Arc::new(TrafficSecretCapture);
    Ok(Arc::new(server))
}

/// The cryptography under rustls's handshake (key exchange, signature, key schedule, tickets).
/// Server CPU per full TLS 1.3 handshake (X25519, ECDSA P-256 certificate, one ticket; `cargo
/// bench -p gateway --bench login_crypto --profile fastrel -- paired`, 2-core AMD EPYC VM):
/// `Ring` ~130 us, `AwsLc` ~0.86x that, `Mixed` ~0.79x. aws-lc-rs's X25519 key generation is
/// ~3x ring's speed, but a handshake on its cipher suites (HKDF, transcript hash, AEAD) costs
/// more than on ring's (one with P-256 key exchange, where X25519 plays no part, is 1.12-1.19x
/// ring's), so `Mixed` keeps ring's suites and takes X25519 from aws-lc-rs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoLibrary {
    Ring,
    AwsLc,
    /// ring's cipher suites and P-256/P-384 key exchange, with aws-lc-rs's X25519, signing keys,
    /// ticketer and random number generator.
    Mixed,
}

/// The library the gateway runs its handshakes on.
pub const CRYPTO_LIBRARY: CryptoLibrary = CryptoLibrary::Mixed;

impl CryptoLibrary {
    /// The library's provider with the cheapest safe choices first, since a full handshake is
    /// most of a login's CPU: AES-128-GCM with SHA-256 before AES-256-GCM with SHA-384 (the key
    /// schedule's HKDF and the transcript hash then run on SHA-256, which has CPU instructions
    /// on current x86 and ARM, where SHA-384 has none), same for TLS 1.2. Key exchange groups
    /// are ring's set (X25519, P-256, P-384) in every library, X25519 first; when aws-lc-rs is
    /// in, X25519 is aws-lc's and P-256 and P-384 stay ring's (aws-lc-rs's P-256 measured no
    /// cheaper inside a handshake: see `benches/login_crypto.rs`). The self-signed certificate
    /// is ECDSA P-256 (rcgen's default), far cheaper to sign with than RSA.
    pub fn login_cheap_provider(self) -> rustls::crypto::CryptoProvider {
        let mut provider = match self {
            Self::Ring | Self::Mixed => rustls::crypto::ring::default_provider(),
            Self::AwsLc => rustls::crypto::aws_lc_rs::default_provider(),
        };
        if self == Self::Mixed {
            let aws_lc = rustls::crypto::aws_lc_rs::default_provider();
            provider.key_provider = aws_lc.key_provider;
            // ring's `SecureRandom` makes a getrandom syscall per fill (~3 per handshake: server
            // random, session id, ticket nonce); aws-lc's draws from its DRBG, seeded and
            // reseeded from the OS by aws-lc and safe across fork, without a syscall per call.
            provider.secure_random = aws_lc.secure_random;
        }
        // Stable sort: suites keep the library's order within each rank.
        provider.cipher_suites.sort_by_key(|suite| {
            use rustls::crypto::hash::HashAlgorithm::SHA256;
            use rustls::SupportedCipherSuite::{Tls12, Tls13};
            match suite {
                Tls13(s) if s.common.hash_provider.algorithm() == SHA256 => 0,
                Tls13(_) => 1,
                Tls12(s) if s.common.hash_provider.algorithm() == SHA256 => 2,
                Tls12(_) => 3,
            }
        });
        provider.kx_groups = match self {
            Self::Ring => provider.kx_groups,
            Self::AwsLc | Self::Mixed => vec![
                rustls::crypto::aws_lc_rs::kx_group::X25519,
                rustls::crypto::ring::kx_group::SECP256R1,
                rustls::crypto::ring::kx_group::SECP384R1,
            ],
        };
        provider
    }

    /// The stateless TLS 1.3 ticketer (one seal per ticket issued, under keys rustls rotates
    /// every 6 hours): aws-lc-rs's (AES-256-CBC and HMAC-SHA256, RFC 5077) when the library
    /// includes aws-lc-rs, ring's (ChaCha20-Poly1305) otherwise; they measured the same within
    /// 2 us per handshake.
    pub fn ticketer(self) -> Result<Arc<dyn rustls::server::ProducesTickets>> {
        match self {
            Self::Ring => rustls::crypto::ring::Ticketer::new(),
            Self::AwsLc | Self::Mixed => rustls::crypto::aws_lc_rs::Ticketer::new(),
        }
        .context("TLS session ticketer")
    }
}

/// Key exchange groups the server accepts, most preferred first: ring's set and order, whatever
/// the library (rustls takes the client's preferred one among these; the post-quantum hybrid
/// X25519MLKEM768 of aws-lc-rs is not offered: see `benches/login_crypto.rs` for its cost).
pub const KX_GROUPS: [rustls::NamedGroup; 3] = [
    rustls::NamedGroup::X25519,
    rustls::NamedGroup::secp256r1,
    rustls::NamedGroup::secp384r1,
];

/// Tickets sent after each full TLS 1.3 handshake: one per reconnect a client may attempt
/// before its next full handshake.
const TLS13_TICKETS_PER_HANDSHAKE: usize = 1;

/// A certificate chain and its key, as PEM files, with the config keys that named them (for
/// errors).
#[derive(Clone, Debug)]
struct CertFiles {
    cert: PathBuf,
    key: PathBuf,
    cert_setting: &'static str,
    key_setting: &'static str,
}

impl CertFiles {
    fn configured(
        cert: &Path,
        key: &Path,
        cert_setting: &'static str,
        key_setting: &'static str,
    ) -> Self {
        CertFiles {
            cert: cert.to_owned(),
            key: key.to_owned(),
            cert_setting,
            key_setting,
        }
    }

    /// The chain and its signing key on `provider`, checked to belong together.
    fn load(&self, provider: &rustls::crypto::CryptoProvider) -> Result<Arc<CertifiedKey>> {
        let certs = load_certs(&self.cert, self.cert_setting)?;
        let key = load_key(&self.key, self.key_setting)?;
        let certified = CertifiedKey::from_der(certs, key, provider).with_context(|| {
            format!(
                "config key `{}`: {} does not match the certificate {}, or its key type is not \
                 supported; give the key that belongs to the certificate (ECDSA, Ed25519 or RSA)",
                self.key_setting,
                self.key.display(),
                self.cert.display()
            )
        })?;
        Ok(Arc::new(certified))
    }
}

/// Picks, for each handshake, the certificate whose key is cheapest to sign with among those the
/// client can verify (its `signature_algorithms`). A full TLS 1.3 handshake signs once, and the
/// signature is a fifth of its server CPU with ECDSA P-256; Ed25519 signs in about half the
/// time (`cargo bench -p gateway --bench login_crypto -- paired`: 104 against 89 us a
/// handshake), so a server with both serves Ed25519 to clients that offer it and ECDSA to the
/// rest.
#[derive(Debug)]
struct CheapestSigner {
    /// Cheapest to sign with first; never empty.
    keys: Vec<Arc<CertifiedKey>>,
}

impl CheapestSigner {
    fn new(mut keys: Vec<Arc<CertifiedKey>>) -> Self {
        assert!(!keys.is_empty(), "a TLS server needs a certificate");
        // Stable: keys of one type keep the configured order.
        keys.sort_by_key(|k| signing_cost_rank(k.key.algorithm()));
        CheapestSigner { keys }
    }
}

/// Relative cost of one signature (a full handshake makes one): Ed25519 ~10 us, ECDSA P-256
/// ~21 us, RSA-2048 ~1 ms on this box's class of CPU.
fn signing_cost_rank(algorithm: rustls::SignatureAlgorithm) -> u8 {
    use rustls::SignatureAlgorithm as A;
    match algorithm {
        A::ED25519 => 0,
        A::ECDSA => 1,
        A::ED448 => 2,
        _ => 3,
    }
}

impl rustls::server::ResolvesServerCert for CheapestSigner {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let offered = hello.signature_schemes();
        let usable = self
            .keys
            .iter()
            .find(|k| k.key.choose_scheme(offered).is_some());
        // None the client can verify: the first certificate, and rustls ends the handshake
        // with its usual alert, as with a single certificate.
        Some(Arc::clone(usable.unwrap_or(&self.keys[0])))
    }
}

/// The generated self-signed certificates, creating them on first start: ECDSA P-256 (every
/// TLS client verifies it) and Ed25519 (cheaper to sign with; for clients that offer it). A
/// data dir made before the Ed25519 one existed keeps serving its one certificate, which its
/// users' clients may have pinned.
fn generated_paths(config: &Config) -> Result<Vec<CertFiles>> {
    let dir = config.data_dir.join("tls");
    let generated = |cert: &str, key: &str| {
        CertFiles::configured(
            &dir.join(cert),
            &dir.join(key),
            "tls_cert_path",
            "tls_key_path",
        )
    };
    let ecdsa = generated("cert.pem", "key.pem");
    let ed25519 = generated("cert-ed25519.pem", "key-ed25519.pem");
    if ecdsa.cert.exists() && ecdsa.key.exists() {
        let mut pairs = vec![ecdsa];
        if ed25519.cert.exists() && ed25519.key.exists() {
            pairs.push(ed25519);
        }
        return Ok(pairs);
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create {}; check `data_dir`", dir.display()))?;
    for (files, key_pair) in [
        (
            &ecdsa,
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
        ),
        (&ed25519, ed25519_key_pair()),
    ] {
        let key_pair = key_pair.context("generating a certificate key")?;
        let cert = rcgen::CertificateParams::new(vec![config.domain.clone()])
            .and_then(|params| params.self_signed(&key_pair))
            .context("generating a self-signed certificate")?;
        write_private(&files.key, key_pair.serialize_pem().as_bytes())?;
        std::fs::write(&files.cert, cert.pem())
            .with_context(|| format!("cannot write {}", files.cert.display()))?;
    }
    tracing::warn!(
        cert = %ecdsa.cert.display(),
        domain = %config.domain,
        "no TLS certificate configured: made a self-signed one (ECDSA P-256, and Ed25519 for \
         clients that offer it); clients must accept it (set tls_cert_path and tls_key_path for \
         a real one)"
    );
    Ok(vec![ecdsa, ed25519])
}

/// A fresh Ed25519 key, kept as PKCS#8 v1 (RFC 5208). rcgen's own generation (on ring) writes
/// v2 (RFC 5958, the public key included), which OpenSSL 3.0 cannot read, so an operator could
/// not hand the generated key to other software (a proxy in front, `openssl pkey`).
fn ed25519_key_pair() -> Result<rcgen::KeyPair, rcgen::Error> {
    use aws_lc_rs::signature::Ed25519KeyPair;
    let v1 = Ed25519KeyPair::generate()
        .and_then(|k| k.to_pkcs8v1())
        .map_err(|_| rcgen::Error::KeyGenerationUnavailable)?;
    let der = rustls::pki_types::PrivatePkcs8KeyDer::from(v1.as_ref());
    rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&der, &rcgen::PKCS_ED25519)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn load_certs(path: &Path, setting: &str) -> Result<Vec<CertificateDer<'static>>> {
    let data = std::fs::read(path).with_context(|| {
        format!(
            "config key `{setting}`: cannot read {}; give a readable PEM file",
            path.display()
        )
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice())
        .collect::<Result<_, _>>()
        .with_context(|| format!("config key `{setting}`: {} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!(
            "config key `{setting}`: {} holds no certificate; give a PEM certificate chain",
            path.display()
        );
    }
    Ok(certs)
}

fn load_key(path: &Path, setting: &str) -> Result<PrivateKeyDer<'static>> {
    let data = std::fs::read(path).with_context(|| {
        format!(
            "config key `{setting}`: cannot read {}; give a readable PEM file",
            path.display()
        )
    })?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .with_context(|| format!("config key `{setting}`: {} is not PEM", path.display()))?
        .with_context(|| {
            format!(
                "config key `{setting}`: {} holds no private key",
                path.display()
            )
        })
}

/// Why a TLS session ended.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The peer sent something rustls rejected (rustls has queued an alert in `outgoing`).
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The session can no longer encrypt (after close, or its key's use count is spent).
    #[error("TLS: cannot encrypt: {0}")]
    Encrypt(#[from] EncryptError),
    /// The TLS 1.3 record layer after the handshake ended the session (an alert is queued in
    /// `outgoing` when the peer's records were at fault).
    #[error("TLS: {0}")]
    Record(#[from] RecordError),
    /// A state this server never enables (early data).
    #[error("TLS: unexpected state {0}")]
    Unexpected(&'static str),
}

/// One connection's TLS session. rustls's unbuffered API runs the handshake (and TLS 1.2
/// sessions for their life); a TLS 1.3 session then moves to `Tls13Records`, which holds only
/// its keys (see `record`). `incoming` keeps only the bytes of a record not yet complete and
/// `outgoing` only records not yet written; both give their allocation back once empty
/// (`release_idle`), so an idle session holds no TLS buffer.
pub struct TlsSession {
    layer: Layer,
    /// Received TLS bytes not consumed yet (a partial record, or records after the machine
    /// stopped early). Bounded by one TLS record plus one socket read.
    incoming: Vec<u8>,
    /// TLS records to write, in order.
    pub outgoing: Vec<u8>,
}

// The TLS 1.3 form is the one an idle session lives in: inline, so it costs no allocation of its
// own (the driver boxes the whole session); the handshake's big state is boxed and freed.
#[allow(clippy::large_enum_variant)]
enum Layer {
    /// The handshake, and TLS 1.2 sessions for their life (they stay on rustls). `secrets` are
    /// the TLS 1.3 traffic secrets, once rustls computed them.
    Rustls {
        conn: Box<UnbufferedServerConnection>,
        secrets: Option<Box<TrafficSecrets>>,
        /// Plaintext rustls decrypted but not yet given to the machine, because it stopped
        /// early (authenticated: the rest follows the handoff).
        plain_unread: Vec<u8>,
    },
    /// A TLS 1.3 session after its handshake.
    Tls13(Tls13Records),
    /// The takeover from rustls failed: the session is closing.
    Failed,
}

/// What `TlsSession::receive` produced.
pub enum Received<S> {
    /// Decrypted plaintext went to `feed`; `Some` is the step that stopped it.
    Fed(Option<S>),
    /// The peer sent close_notify.
    PeerClosed,
}

/// How one pass of rustls over the received bytes ended.
enum RustlsPass<S> {
    Done(Received<S>),
    /// The TLS 1.3 handshake is complete: the rest goes to `Tls13Records`.
    TakeOver,
}

impl TlsSession {
    /// True until the handshake is complete.
    pub fn is_handshaking(&self) -> bool {
        match &self.layer {
            Layer::Rustls { conn, .. } => conn.is_handshaking(),
            Layer::Tls13(_) | Layer::Failed => false,
        }
    }

    pub fn new(config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self {
            layer: Layer::Rustls {
                conn: Box::new(UnbufferedServerConnection::new(config)?),
                secrets: None,
                plain_unread: Vec::new(),
            },
            incoming: Vec::new(),
            outgoing: Vec::new(),
        })
    }

    /// True once the session runs on its own TLS 1.3 record layer (after the handshake).
    pub fn is_lean(&self) -> bool {
        matches!(self.layer, Layer::Tls13(_))
    }

    /// Takes `data` off the wire, runs the handshake (its records land in `outgoing`) and hands
    /// decrypted plaintext to `feed` in order, starting with plaintext left from an earlier call.
    /// `feed` returns `None` to go on; a step stops the feeding and the rest of the plaintext
    /// and ciphertext stays here for the next call (possibly on another shard).
    pub fn receive<S>(
        &mut self,
        data: &[u8],
        feed: &mut dyn FnMut(&[u8]) -> Option<S>,
    ) -> Result<Received<S>, TlsError> {
        self.incoming.extend_from_slice(data);
        if let Layer::Rustls { plain_unread, .. } = &mut self.layer {
            if !plain_unread.is_empty() {
                let plain = std::mem::take(plain_unread);
                if let Some(step) = feed(&plain) {
                    return Ok(Received::Fed(Some(step)));
                }
            }
        }
        if let Layer::Rustls { .. } = self.layer {
            match self.receive_rustls(feed)? {
                RustlsPass::Done(received) => {
                    self.release_idle();
                    return Ok(received);
                }
                RustlsPass::TakeOver => self.take_over()?,
            }
        }
        let result = match &mut self.layer {
            Layer::Tls13(records) => records.open(&mut self.incoming, &mut self.outgoing, feed),
            _ => return Err(TlsError::Unexpected("no record layer")),
        };
        self.release_idle();
        match result? {
            Opened::Fed(step) => Ok(Received::Fed(step)),
            Opened::PeerClosed => Ok(Received::PeerClosed),
        }
    }

    /// Encrypts `plain` into `outgoing`. Plaintext produced before the handshake finished (a
    /// timeout's stream error) cannot be sent and is dropped, as the connection is closing.
    pub fn send(&mut self, plain: &[u8]) -> Result<(), TlsError> {
        if plain.is_empty() {
            return Ok(());
        }
        if self.is_handshaking() {
            tracing::debug!(
                bytes = plain.len(),
                "TLS handshake unfinished: output dropped"
            );
            return Ok(());
        }
        if let Layer::Tls13(records) = &mut self.layer {
            return Ok(records.seal(plain, &mut self.outgoing)?);
        }
        self.with_write_traffic(&mut |traffic, out| encrypt_into(traffic, plain, out))
    }

    /// Queues a close_notify alert in `outgoing` (nothing when the handshake never finished).
    pub fn close_notify(&mut self) -> Result<(), TlsError> {
        if self.is_handshaking() {
            return Ok(());
        }
        if let Layer::Tls13(records) = &mut self.layer {
            records.close_notify(&mut self.outgoing);
            return Ok(());
        }
        self.with_write_traffic(&mut |traffic, out| {
            let start = out.len();
            out.resize(start + CLOSE_NOTIFY_RECORD_BYTES_MAX, 0);
            let n = traffic.queue_close_notify(&mut out[start..])?;
            out.truncate(start + n);
            Ok(())
        })
    }

    /// Gives back the allocations of empty buffers: an idle session holds none.
    pub fn release_idle(&mut self) {
        let plain_unread = match &mut self.layer {
            Layer::Rustls { plain_unread, .. } => Some(plain_unread),
            _ => None,
        };
        for buf in [
            Some(&mut self.incoming),
            plain_unread,
            Some(&mut self.outgoing),
        ]
        .into_iter()
        .flatten()
        {
            if buf.is_empty() && buf.capacity() > 0 {
                *buf = Vec::new();
            }
        }
    }

    /// Runs rustls over `incoming` until it needs more input, the machine stops, or a TLS 1.3
    /// handshake is complete (then the caller takes the session over).
    fn receive_rustls<S>(
        &mut self,
        feed: &mut dyn FnMut(&[u8]) -> Option<S>,
    ) -> Result<RustlsPass<S>, TlsError> {
        let Layer::Rustls {
            conn,
            secrets,
            plain_unread,
        } = &mut self.layer
        else {
            return Err(TlsError::Unexpected("not on rustls"));
        };
        let mut step = None;
        // Bounded: every pass consumes a record, encodes a queued handshake message, or ends.
        loop {
            let status = conn.process_tls_records(&mut self.incoming);
            // The key log ran inside that call, on this thread (see `record`).
            let captured = TrafficSecrets::take_captured();
            if !captured.is_empty() {
                secrets.get_or_insert_with(Default::default).merge(captured);
            }
            let mut discard = status.discard;
            let mut done = false;
            let mut peer_closed = false;
            let state = match status.state {
                Ok(state) => state,
                Err(e) => {
                    queue_alert(conn, &mut self.outgoing);
                    return Err(e.into());
                }
            };
            match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record?;
                        discard += record.discard;
                        if step.is_none() {
                            step = feed(record.payload);
                        } else {
                            // The machine stopped: keep the rest for the next call, in order.
                            plain_unread.extend_from_slice(record.payload);
                        }
                    }
                    done = step.is_some();
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut encode, &mut self.outgoing)?
                }
                // Records are written in order by the driver before anything else: marking them
                // sent here is sound.
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                ConnectionState::WriteTraffic(_) => {
                    // Handshake done, our tickets encoded, every complete record read.
                    let tls13 = conn.protocol_version() == Some(ProtocolVersion::TLSv1_3);
                    if tls13 && secrets.as_ref().is_some_and(|s| s.is_complete()) {
                        self.incoming.drain(..discard);
                        return Ok(RustlsPass::TakeOver);
                    }
                    done = true;
                }
                ConnectionState::BlockedHandshake => done = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    done = true;
                    peer_closed = true;
                }
                ConnectionState::ReadEarlyData(_) => {
                    return Err(TlsError::Unexpected("early data"))
                }
                _ => return Err(TlsError::Unexpected("unknown")),
            }
            self.incoming.drain(..discard);
            if peer_closed {
                return Ok(RustlsPass::Done(Received::PeerClosed));
            }
            if done {
                return Ok(RustlsPass::Done(Received::Fed(step)));
            }
        }
    }

    /// Moves a TLS 1.3 session from rustls to `Tls13Records`: rustls's keys and sequence
    /// numbers with the traffic secrets captured during the handshake. rustls's state is freed.
    /// A client KeyUpdate in the very flight that completes the handshake would have moved
    /// rustls past the captured secrets: the check in `Tls13Records::new` then fails and the
    /// session closes with an error (never corrupts; clients update keys far later, if ever).
    fn take_over(&mut self) -> Result<(), TlsError> {
        let Layer::Rustls { conn, secrets, .. } = std::mem::replace(&mut self.layer, Layer::Failed)
        else {
            return Err(TlsError::Unexpected("not on rustls"));
        };
        let (extracted, kernel) = conn.dangerous_into_kernel_connection()?;
        let secrets = secrets.ok_or(TlsError::Unexpected("no traffic secrets"))?;
        let records = Tls13Records::new(kernel.negotiated_cipher_suite(), extracted, &secrets)?;
        self.layer = Layer::Tls13(records);
        Ok(())
    }

    /// Drives the session to its write state without taking input, then runs `write`.
    fn with_write_traffic(&mut self, write: &mut WriteRecords<'_>) -> Result<(), TlsError> {
        let Layer::Rustls { conn, .. } = &mut self.layer else {
            return Err(TlsError::Unexpected("not on rustls"));
        };
        // Bounded: each pass encodes a queued message or ends (rustls queues a few at most).
        for _ in 0..TLS_STATE_STEPS_MAX {
            let status = conn.process_tls_records(&mut []);
            match status.state? {
                ConnectionState::WriteTraffic(mut traffic) => {
                    return write(&mut traffic, &mut self.outgoing)
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    encode_into(&mut encode, &mut self.outgoing)?
                }
                ConnectionState::TransmitTlsData(transmit) => transmit.done(),
                // Edge-triggered once; the next pass gives the write state.
                ConnectionState::PeerClosed => {}
                ConnectionState::Closed => return Err(TlsError::Unexpected("closed")),
                ConnectionState::ReadTraffic(_) => {
                    return Err(TlsError::Unexpected("unread traffic"))
                }
                ConnectionState::BlockedHandshake => {
                    return Err(TlsError::Unexpected("handshaking"))
                }
                _ => return Err(TlsError::Unexpected("unknown")),
            }
        }
        Err(TlsError::Unexpected("no write state"))
    }
}

/// After an error rustls has queued an alert: encode it into `outgoing` (best effort; the
/// connection closes after writing it).
fn queue_alert(conn: &mut UnbufferedServerConnection, outgoing: &mut Vec<u8>) {
    for _ in 0..TLS_STATE_STEPS_MAX {
        let status = conn.process_tls_records(&mut []);
        match status.state {
            Ok(ConnectionState::EncodeTlsData(mut encode)) => {
                if encode_into(&mut encode, outgoing).is_err() {
                    return;
                }
            }
            Ok(ConnectionState::TransmitTlsData(transmit)) => transmit.done(),
            _ => return,
        }
    }
}

/// Writes records into `outgoing` once the session may send application data.
type WriteRecords<'a> = dyn FnMut(&mut WriteTraffic<'_, ServerConnectionData>, &mut Vec<u8>) -> Result<(), TlsError>
    + 'a;

/// Passes through `process_tls_records` without a write state before giving up (a handful
/// suffices: queued handshake messages, a key update).
const TLS_STATE_STEPS_MAX: usize = 64;

/// A close_notify record: header, alert, TLS 1.3 content type and AEAD tag (TLS 1.2: explicit
/// nonce instead of the type), with room to spare.
const CLOSE_NOTIFY_RECORD_BYTES_MAX: usize = 64;

fn encode_into(
    encode: &mut EncodeTlsData<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
) -> Result<(), TlsError> {
    let start = out.len();
    // Handshake messages are small but certificate chains are not: grow to what rustls asks.
    out.resize(start + ENCODE_GUESS_BYTES, 0);
    let n = match encode.encode(&mut out[start..]) {
        Ok(n) => n,
        Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(start + required_size, 0);
            encode
                .encode(&mut out[start..])
                .map_err(|_| TlsError::Unexpected("encode"))?
        }
        Err(EncodeError::AlreadyEncoded) => return Err(TlsError::Unexpected("encoded twice")),
    };
    out.truncate(start + n);
    Ok(())
}

/// First guess of the room one handshake record needs.
const ENCODE_GUESS_BYTES: usize = 2048;

fn encrypt_into(
    traffic: &mut WriteTraffic<'_, ServerConnectionData>,
    plain: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), TlsError> {
    let start = out.len();
    // Per record of up to 16 KiB: 5 bytes of header, 1 of content type, 16 of tag (TLS 1.2
    // GCM: 8 of explicit nonce); rustls tells the exact need if this falls short.
    let records = plain.len() / TLS_RECORD_PLAINTEXT_BYTES_MAX + 1;
    out.resize(
        start + plain.len() + records * TLS_RECORD_OVERHEAD_BYTES_MAX,
        0,
    );
    let n = match traffic.encrypt(plain, &mut out[start..]) {
        Ok(n) => n,
        Err(EncryptError::InsufficientSize(InsufficientSizeError { required_size })) => {
            out.resize(start + required_size, 0);
            traffic.encrypt(plain, &mut out[start..])?
        }
        Err(e) => return Err(e.into()),
    };
    out.truncate(start + n);
    Ok(())
}

/// Largest plaintext in one TLS record (RFC 8446 §5.1).
const TLS_RECORD_PLAINTEXT_BYTES_MAX: usize = 16 * 1024;
/// Most bytes a record adds to its plaintext with the AEAD suites we offer.
const TLS_RECORD_OVERHEAD_BYTES_MAX: usize = 32;

#[cfg(test)]
#[path = "tls_tests.rs"]
mod lean_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;

    #[test]
    fn sha256_suites_come_first() {
        for (library, default) in [
            (
                CryptoLibrary::Ring,
                rustls::crypto::ring::default_provider(),
            ),
            (
                CryptoLibrary::AwsLc,
                rustls::crypto::aws_lc_rs::default_provider(),
            ),
        ] {
            let suites: Vec<CipherSuite> = library
                .login_cheap_provider()
                .cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect();
            assert_eq!(suites[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
            assert_eq!(suites[1], CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
            assert_eq!(suites[2], CipherSuite::TLS13_AES_256_GCM_SHA384);
            // Nothing dropped: the same suites as the library's default, reordered.
            assert_eq!(suites.len(), default.cipher_suites.len(), "{library:?}");
        }
    }

    #[test]
    fn kx_groups_are_rings_in_every_library() {
        let names = |p: rustls::crypto::CryptoProvider| -> Vec<rustls::NamedGroup> {
            p.kx_groups.iter().map(|g| g.name()).collect()
        };
        let ring = names(rustls::crypto::ring::default_provider());
        assert_eq!(ring, KX_GROUPS);
        for library in [
            CryptoLibrary::Ring,
            CryptoLibrary::AwsLc,
            CryptoLibrary::Mixed,
        ] {
            assert_eq!(names(library.login_cheap_provider()), ring, "{library:?}");
        }
        // With aws-lc-rs in, X25519 is aws-lc's own, the rest ring's.
        let groups = CRYPTO_LIBRARY.login_cheap_provider().kx_groups;
        let same = |a: &dyn rustls::crypto::SupportedKxGroup,
                    b: &dyn rustls::crypto::SupportedKxGroup| {
            std::ptr::addr_eq(a, b)
        };
        assert!(same(groups[0], rustls::crypto::aws_lc_rs::kx_group::X25519));
        assert!(same(groups[1], rustls::crypto::ring::kx_group::SECP256R1));
    }
}
