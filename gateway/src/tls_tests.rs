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

/// A client trusting the certificate the server generated in `dir`, with the server's preferred
/// suite or only `suite`.
fn client_config(
    dir: &std::path::Path,
    suite: Option<rustls::SupportedCipherSuite>,
    tls12: bool,
) -> Arc<ClientConfig> {
    let pem = std::fs::read(dir.join("tls").join("cert.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
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
