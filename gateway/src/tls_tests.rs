//! `TlsSession` in process against a stock rustls client: the TLS 1.3 record layer of `record`
//! after the handshake (sizes, splits, KeyUpdate, close, tampering), TLS 1.2 on rustls, resumption.

use std::io::{Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection};

use super::*;
use crate::record::{RECORD_OVERHEAD_BYTES, RECORD_PLAINTEXT_BYTES_MAX};

/// A server session and a rustls client wired together in memory.
struct Pair {
    server: TlsSession,
    client: ClientConnection,
    /// Plaintext the server's session handed to its machine.
    server_got: Vec<u8>,
    /// Plaintext the client read.
    client_got: Vec<u8>,
    server_saw_close: bool,
    /// Bytes per `receive` call on the server.
    chunk: usize,
}

/// The generated certificates (ECDSA P-256 and Ed25519) in the data dir `dir`.
const GENERATED_CERTS: [&str; 2] = ["cert.pem", "cert-ed25519.pem"];

fn cert_der(path: &std::path::Path) -> CertificateDer<'static> {
    let pem = std::fs::read(path).unwrap();
    let first = rustls_pemfile::certs(&mut pem.as_slice()).next();
    first.unwrap().unwrap()
}

/// A client trusting the certificates the server generated in `dir`, with the server's
/// preferred suite or only `suite`.
fn client_config(
    dir: &std::path::Path,
    suite: Option<rustls::SupportedCipherSuite>,
    tls12: bool,
) -> Arc<ClientConfig> {
    client_config_verifying(dir, suite, tls12, |_| true)
}

/// `client_config` offering only the signature schemes `offer` keeps (the certificate chain is
/// still verified with every algorithm).
fn client_config_verifying(
    dir: &std::path::Path,
    suite: Option<rustls::SupportedCipherSuite>,
    tls12: bool,
    offer: impl Fn(rustls::SignatureScheme) -> bool,
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for name in GENERATED_CERTS {
        let path = dir.join("tls").join(name);
        if path.exists() {
            roots.add(cert_der(&path)).unwrap();
        }
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    let algorithms = &mut provider.signature_verification_algorithms;
    let mapping: Vec<_> = algorithms
        .mapping
        .iter()
        .filter(|(scheme, _)| offer(*scheme))
        .copied()
        .collect();
    algorithms.mapping = Vec::leak(mapping);
    let provider = Arc::new(provider);
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

fn server() -> (tempfile::TempDir, Arc<ServerConfig>) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = server_config(&config).unwrap();
    (dir, server)
}

impl Pair {
    fn connect(server: &Arc<ServerConfig>, client: Arc<ClientConfig>) -> Pair {
        Self::connect_split(server, client, usize::MAX)
    }

    fn connect_split(server: &Arc<ServerConfig>, client: Arc<ClientConfig>, chunk: usize) -> Pair {
        let name = ServerName::try_from("localhost").unwrap();
        let mut client = ClientConnection::new(client, name).unwrap();
        client.set_buffer_limit(None);
        let mut pair = Pair {
            server: TlsSession::new(server.clone()).unwrap(),
            client,
            server_got: Vec::new(),
            client_got: Vec::new(),
            server_saw_close: false,
            chunk,
        };
        // Bounded: a handshake is two round trips, the ticket one more flight.
        for _ in 0..8 {
            pair.pump().unwrap();
        }
        assert!(!pair.client.is_handshaking() && !pair.server.is_handshaking());
        pair
    }

    /// Client records to the server, `chunk` bytes per call.
    fn deliver_to_server(&mut self) -> Result<(), TlsError> {
        let mut wire = Vec::new();
        while self.client.wants_write() {
            self.client.write_tls(&mut wire).unwrap();
        }
        let got = &mut self.server_got;
        let mut feed = |plain: &[u8]| -> Option<()> {
            got.extend_from_slice(plain);
            None
        };
        for piece in wire.chunks(self.chunk) {
            if let Received::PeerClosed = self.server.receive(piece, &mut feed)? {
                self.server_saw_close = true;
            }
        }
        Ok(())
    }

    /// Server records to the client.
    fn deliver_to_client(&mut self) -> Result<(), rustls::Error> {
        let wire = std::mem::take(&mut self.server.outgoing);
        self.server.release_idle();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            self.client.read_tls(&mut rest).unwrap();
            let state = self.client.process_new_packets()?;
            let mut buf = vec![0; state.plaintext_bytes_to_read()];
            self.client.reader().read_exact(&mut buf).unwrap();
            self.client_got.extend_from_slice(&buf);
        }
        Ok(())
    }

    fn pump(&mut self) -> Result<(), TlsError> {
        self.deliver_to_server()?;
        self.deliver_to_client().map_err(TlsError::Rustls)
    }

    fn client_sends(&mut self, data: &[u8]) {
        self.client.writer().write_all(data).unwrap();
        self.deliver_to_server().unwrap();
    }

    fn server_sends(&mut self, data: &[u8]) {
        self.server.send(data).unwrap();
        self.deliver_to_client().unwrap();
    }
}

/// `len` bytes that differ from record to record.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn round_trips(pair: &mut Pair, sizes: &[usize]) {
    for (i, &len) in sizes.iter().enumerate() {
        let up = pattern(len, i as u8);
        pair.server_got.clear();
        pair.client_sends(&up);
        assert!(pair.server_got == up, "client to server, {len} bytes");
        let down = pattern(len, 100 + i as u8);
        pair.client_got.clear();
        pair.server_sends(&down);
        assert!(pair.client_got == down, "server to client, {len} bytes");
    }
}

const SIZES: [usize; 7] = [
    1,
    2,
    1000,
    RECORD_PLAINTEXT_BYTES_MAX,
    RECORD_PLAINTEXT_BYTES_MAX + 1,
    100_000,
    1,
];

#[test]
fn tls13_sessions_leave_rustls_after_the_handshake_and_carry_data_both_ways() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    assert!(
        pair.server.is_lean(),
        "a TLS 1.3 session must run on our record layer"
    );
    round_trips(&mut pair, &SIZES);
    // Many records in one call each way.
    let many: Vec<u8> = (0..200)
        .flat_map(|i| pattern(i * 37 % 1500 + 1, i as u8))
        .collect();
    pair.server_got.clear();
    let mut wire = Vec::new();
    for piece in many.chunks(777) {
        // Each write is its own record.
        pair.client.writer().write_all(piece).unwrap();
        while pair.client.wants_write() {
            pair.client.write_tls(&mut wire).unwrap();
        }
    }
    pair.server
        .receive(&wire, &mut |p: &[u8]| -> Option<()> {
            pair.server_got.extend_from_slice(p);
            None
        })
        .unwrap();
    assert!(pair.server_got == many);
    pair.client_got.clear();
    for piece in many.chunks(999) {
        pair.server.send(piece).unwrap();
    }
    pair.deliver_to_client().unwrap();
    assert!(pair.client_got == many);
}

#[test]
fn records_split_byte_by_byte_arrive_whole() {
    let (dir, server) = server();
    // The handshake too goes one byte per call.
    let mut pair = Pair::connect_split(&server, client_config(dir.path(), None, false), 1);
    assert!(pair.server.is_lean());
    round_trips(&mut pair, &[1, 300, RECORD_PLAINTEXT_BYTES_MAX + 1]);
    for chunk in [2, 5, 6, 7, 4096] {
        pair.chunk = chunk;
        round_trips(&mut pair, &[3, 40_000]);
    }
}

#[test]
fn every_tls13_suite_works_on_the_lean_layer() {
    let (dir, server) = server();
    for suite in [
        rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
        rustls::crypto::ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        rustls::crypto::ring::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ] {
        let mut pair = Pair::connect(&server, client_config(dir.path(), Some(suite), false));
        assert_eq!(pair.client.negotiated_cipher_suite(), Some(suite));
        assert!(pair.server.is_lean(), "{suite:?}");
        round_trips(&mut pair, &SIZES);
    }
}

#[test]
fn a_client_key_update_moves_both_directions_to_new_keys() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    for round in 0..3 {
        // rustls asks for the peer's update too (update_requested).
        pair.client.refresh_traffic_keys().unwrap();
        round_trips(&mut pair, &[10 + round, RECORD_PLAINTEXT_BYTES_MAX + 1]);
    }
    // Without our own KeyUpdate in answer the client would fail to open our records above;
    // check the server's send sequence restarted at each update.
    let Layer::Tls13(records) = &pair.server.layer else {
        panic!("not lean")
    };
    assert!(records.tx_seq() < 10, "tx seq {}", records.tx_seq());
}

#[test]
fn the_server_updates_its_key_at_the_suites_limit() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    let Layer::Tls13(records) = &pair.server.layer else {
        panic!("not lean")
    };
    let start = records.tx_seq();
    Tls13Records::set_tx_records_max_for_tests(Some(start + 3));
    for i in 0..10 {
        pair.client_got.clear();
        pair.server_sends(&pattern(100, i));
        assert!(pair.client_got == pattern(100, i), "record {i}");
    }
    let Layer::Tls13(records) = &pair.server.layer else {
        panic!("not lean")
    };
    let seq = records.tx_seq();
    Tls13Records::set_tx_records_max_for_tests(None);
    assert!(seq <= start + 3, "no key update at the limit: seq {seq}");
    round_trips(&mut pair, &[1, 5000]);
}

#[test]
fn close_notify_goes_both_ways() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    pair.client.send_close_notify();
    pair.deliver_to_server().unwrap();
    assert!(pair.server_saw_close, "client close_notify not seen");

    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    pair.server.close_notify().unwrap();
    pair.deliver_to_client().unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(pair.client.reader().read(&mut buf).unwrap(), 0, "clean EOF");
    assert!(
        pair.server.send(b"late").is_err(),
        "nothing is sent after close"
    );
}

#[test]
fn a_tampered_record_is_bad_record_mac_and_closes_the_session() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    pair.client.writer().write_all(b"<message/>").unwrap();
    let mut wire = Vec::new();
    pair.client.write_tls(&mut wire).unwrap();
    let last = wire.len() - 1;
    wire[last] ^= 1;
    let err = pair
        .server
        .receive(&wire, &mut |_: &[u8]| -> Option<()> {
            panic!("tampered data fed")
        })
        .err()
        .expect("tampering undetected");
    assert!(
        matches!(err, TlsError::Record(RecordError::BadRecordMac)),
        "{err}"
    );
    // The client learns why.
    let err = pair.deliver_to_client().expect_err("no alert sent");
    assert_eq!(
        err,
        rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
    );
    assert!(pair.server.send(b"more").is_err());
}

#[test]
fn unprotected_records_after_the_handshake_are_unexpected() {
    let (dir, server) = server();
    for record in [&[20u8, 3, 3, 0, 1, 1][..], &[22, 3, 3, 0, 4, 24, 0, 0, 0]] {
        let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
        let err = pair
            .server
            .receive(record, &mut |_: &[u8]| -> Option<()> { None })
            .err()
            .expect("accepted");
        assert!(
            matches!(err, TlsError::Record(RecordError::UnexpectedMessage(_))),
            "{err}"
        );
        let err = pair.deliver_to_client().expect_err("no alert sent");
        assert_eq!(
            err,
            rustls::Error::AlertReceived(rustls::AlertDescription::UnexpectedMessage)
        );
    }
}

#[test]
fn an_oversized_record_is_record_overflow() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    let len = (RECORD_PLAINTEXT_BYTES_MAX + 256 + 1) as u16;
    let [high, low] = len.to_be_bytes();
    let err = pair
        .server
        .receive(&[23, 3, 3, high, low], &mut |_: &[u8]| -> Option<()> {
            None
        })
        .err()
        .expect("accepted");
    assert!(
        matches!(err, TlsError::Record(RecordError::RecordOverflow)),
        "{err}"
    );
}

#[test]
fn a_stopped_machine_leaves_the_rest_for_the_next_call() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, false));
    let mut wire = Vec::new();
    for i in 0..3u8 {
        pair.client.writer().write_all(&[b'a' + i; 10]).unwrap();
        pair.client.write_tls(&mut wire).unwrap();
    }
    let mut seen = Vec::new();
    let stop = pair
        .server
        .receive(&wire, &mut |p: &[u8]| {
            seen.extend_from_slice(p);
            Some(())
        })
        .unwrap();
    assert!(matches!(stop, Received::Fed(Some(()))));
    assert_eq!(seen, [b'a'; 10]);
    let rest = pair
        .server
        .receive(&[], &mut |p: &[u8]| -> Option<()> {
            seen.extend_from_slice(p);
            None
        })
        .unwrap();
    assert!(matches!(rest, Received::Fed(None)));
    let mut expected = [b'a'; 10].to_vec();
    expected.extend([b'b'; 10]);
    expected.extend([b'c'; 10]);
    assert_eq!(seen, expected);
}

#[test]
fn tls12_sessions_stay_on_rustls_and_work() {
    let (dir, server) = server();
    let mut pair = Pair::connect(&server, client_config(dir.path(), None, true));
    assert_eq!(
        pair.client.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    assert!(!pair.server.is_lean());
    round_trips(&mut pair, &SIZES);
    pair.server.close_notify().unwrap();
    pair.deliver_to_client().unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(pair.client.reader().read(&mut buf).unwrap(), 0);
}

#[test]
fn a_resumed_session_also_runs_lean() {
    let (dir, server) = server();
    let client = client_config(dir.path(), None, false);
    let mut first = Pair::connect(&server, client.clone());
    assert_eq!(
        first.client.handshake_kind(),
        Some(rustls::HandshakeKind::Full)
    );
    round_trips(&mut first, &[10]);
    let mut second = Pair::connect(&server, client);
    assert_eq!(
        second.client.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed)
    );
    assert!(second.server.is_lean());
    round_trips(&mut second, &SIZES);
}

#[test]
fn an_idle_lean_session_is_small() {
    let (dir, server) = server();
    let pair = Pair::connect(&server, client_config(dir.path(), None, false));
    assert!(pair.server.is_lean());
    assert_eq!(pair.server.incoming.capacity(), 0);
    assert_eq!(pair.server.outgoing.capacity(), 0);
    let bytes = std::mem::size_of::<TlsSession>();
    // Keys, IVs, secrets and sequence numbers both ways, and three empty buffers.
    assert!(bytes <= 256, "TlsSession is {bytes} B");
    // One full record's overhead is what the framing adds.
    assert_eq!(RECORD_OVERHEAD_BYTES, 22);
}

/// Which generated certificate the server presented to the client of `pair`.
fn presented(pair: &Pair, dir: &std::path::Path) -> &'static str {
    let got = &pair.client.peer_certificates().unwrap()[0];
    GENERATED_CERTS
        .into_iter()
        .find(|name| *got == cert_der(&dir.join("tls").join(name)))
        .expect("one of the generated certificates")
}

fn is_ed25519(scheme: rustls::SignatureScheme) -> bool {
    scheme == rustls::SignatureScheme::ED25519
}

#[test]
fn ed25519_goes_to_clients_that_offer_it_and_ecdsa_to_the_rest() {
    let (dir, server) = server();
    for tls12 in [false, true] {
        let pair = Pair::connect(&server, client_config(dir.path(), None, tls12));
        assert_eq!(presented(&pair, dir.path()), "cert-ed25519.pem");
        let without = client_config_verifying(dir.path(), None, tls12, |s| !is_ed25519(s));
        let pair = Pair::connect(&server, without);
        assert_eq!(presented(&pair, dir.path()), "cert.pem", "tls12 {tls12}");
        let only = client_config_verifying(dir.path(), None, tls12, is_ed25519);
        let mut pair = Pair::connect(&server, only);
        assert_eq!(presented(&pair, dir.path()), "cert-ed25519.pem");
        round_trips(&mut pair, &[10]);
    }
}

#[test]
fn the_generated_ed25519_key_is_pkcs8_v1_which_openssl_reads() {
    let (dir, _) = server();
    let pem = std::fs::read(dir.path().join("tls").join("key-ed25519.pem")).unwrap();
    let Some(PrivateKeyDer::Pkcs8(der)) = rustls_pemfile::private_key(&mut pem.as_slice()).unwrap()
    else {
        panic!("not PKCS#8");
    };
    // SEQUENCE of 46 bytes, version 0 (v1), the Ed25519 OID, the 32-byte seed; nothing else.
    let der = der.secret_pkcs8_der();
    assert_eq!(der.len(), 48);
    assert_eq!(
        &der[..16],
        b"\x30\x2e\x02\x01\x00\x30\x05\x06\x03\x2b\x65\x70\x04\x22\x04\x20"
    );
}

#[test]
fn a_data_dir_with_one_generated_certificate_keeps_serving_it() {
    let (dir, _) = server();
    let tls = dir.path().join("tls");
    std::fs::remove_file(tls.join("cert-ed25519.pem")).unwrap();
    std::fs::remove_file(tls.join("key-ed25519.pem")).unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let server = server_config(&config).unwrap();
    assert!(!tls.join("cert-ed25519.pem").exists());
    let pair = Pair::connect(&server, client_config(dir.path(), None, false));
    assert_eq!(presented(&pair, dir.path()), "cert.pem");
}

#[test]
fn configured_certificates_are_picked_by_key_type_not_order() {
    let (made, _) = server();
    let tls = made.path().join("tls");
    let other = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: other.path().to_path_buf(),
        tls_cert_path: Some(tls.join("cert-ed25519.pem")),
        tls_key_path: Some(tls.join("key-ed25519.pem")),
        tls_alt_cert_path: Some(tls.join("cert.pem")),
        tls_alt_key_path: Some(tls.join("key.pem")),
        ..Config::default()
    };
    let server = server_config(&config).unwrap();
    assert!(!other.path().join("tls").exists(), "nothing generated");
    let only_ecdsa = client_config_verifying(made.path(), None, false, |s| !is_ed25519(s));
    let pair = Pair::connect(&server, only_ecdsa);
    assert_eq!(presented(&pair, made.path()), "cert.pem");
    let pair = Pair::connect(&server, client_config(made.path(), None, false));
    assert_eq!(presented(&pair, made.path()), "cert-ed25519.pem");
}

#[test]
fn a_second_key_that_is_not_its_certificates_is_refused_by_its_setting() {
    let (made, _) = server();
    let tls = made.path().join("tls");
    let config = Config {
        tls_cert_path: Some(tls.join("cert.pem")),
        tls_key_path: Some(tls.join("key.pem")),
        tls_alt_cert_path: Some(tls.join("cert-ed25519.pem")),
        tls_alt_key_path: Some(tls.join("key.pem")),
        ..Config::default()
    };
    let err = format!("{:#}", server_config(&config).unwrap_err());
    assert!(err.contains("`tls_alt_key_path`"), "{err}");
    assert!(err.contains("does not match"), "{err}");
}
