//! The CPU floor of a direct-TLS login on the server (issue 4): what the server spends on the
//! TLS handshake and on SASL PLAIN's password check, with no network and no XMPP around them.
//!
//! Each handshake runs in memory between our server session (`gateway::tls::TlsSession` with the
//! gateway's own `ServerConfig`) and a stock rustls client; only the time spent inside the server's
//! calls is counted, so the figures are server CPU per login. `1 / (handshake + PLAIN check)` is
//! the most logins per server CPU-second any I/O path can reach on this CPU.
//!
//!   cargo bench -p gateway --bench login_crypto --profile fastrel

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::tls::{server_config, TlsSession};
use router::credentials::{device_key_hash, new_device_key, Credentials};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
use shared::config::Config;

/// Most client/server exchanges one handshake may take before the bench calls it stuck.
const HANDSHAKE_ROUNDS_MAX: usize = 16;

/// The server's configuration as `gateway serve` builds it, with the certificate in `dir` (made
/// there with `algorithm` when given; the gateway's own generated one otherwise).
fn server(dir: &Path, algorithm: Option<&'static rcgen::SignatureAlgorithm>) -> Arc<ServerConfig> {
    let mut config = Config {
        data_dir: dir.to_path_buf(),
        ..Config::default()
    };
    if let Some(algorithm) = algorithm {
        let key = rcgen::KeyPair::generate_for(algorithm).expect("key pair");
        let cert = rcgen::CertificateParams::new(vec![config.domain.clone()])
            .expect("certificate parameters")
            .self_signed(&key)
            .expect("self-signed certificate");
        let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        config.tls_cert_path = Some(cert_path);
        config.tls_key_path = Some(key_path);
    }
    server_config(&config).expect("server config")
}

/// A client trusting the certificate at `cert_path`, offering `groups` (rustls's default order
/// when `None`), keeping tickets to resume with when `resume`.
fn client(
    cert_path: &Path,
    groups: Option<Vec<&'static dyn rustls::crypto::SupportedKxGroup>>,
    resume: bool,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(cert_path).expect("read cert");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("PEM")).expect("root");
    }
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(groups) = groups {
        provider.kx_groups = groups;
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Arc::new(config)
}

/// Runs one handshake to the end (the server's session ticket included); returns the time spent
/// in the server's calls and whether the client resumed.
fn handshake(server: &Arc<ServerConfig>, client: &Arc<ClientConfig>) -> (Duration, bool) {
    let started = Instant::now();
    let mut session = TlsSession::new(server.clone()).expect("server session");
    let mut spent = started.elapsed();
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn = ClientConnection::new(client.clone(), name).expect("client");
    let mut wire = Vec::new();
    for _ in 0..HANDSHAKE_ROUNDS_MAX {
        wire.clear();
        while conn.wants_write() {
            conn.write_tls(&mut wire).expect("client write");
        }
        let started = Instant::now();
        session
            .receive(&wire, &mut |_| None::<()>)
            .expect("server receive");
        spent += started.elapsed();
        let reply = std::mem::take(&mut session.outgoing);
        let mut rest = reply.as_slice();
        while !rest.is_empty() {
            conn.read_tls(&mut rest).expect("client read");
            conn.process_new_packets().expect("client process");
        }
        if wire.is_empty() && reply.is_empty() && !conn.is_handshaking() {
            assert!(!session.is_handshaking(), "server still handshaking");
            let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            return (spent, resumed);
        }
    }
    panic!("handshake did not finish in {HANDSHAKE_ROUNDS_MAX} rounds");
}

/// Server CPU of `iters` handshakes; a resumed one follows an uncounted full handshake.
fn server_time(
    iters: u64,
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    resumed: bool,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        if resumed {
            // A full handshake first leaves the client a ticket (single use in TLS 1.3).
            handshake(server, client);
        }
        let (spent, did_resume) = handshake(server, client);
        assert_eq!(did_resume, resumed, "resumption not as expected");
        total += spent;
    }
    total
}

fn tls_handshakes(c: &mut Criterion) {
    let ecdsa_dir = tempfile::tempdir().expect("tempdir");
    let ed25519_dir = tempfile::tempdir().expect("tempdir");
    let ecdsa = server(ecdsa_dir.path(), None);
    let ed25519 = server(ed25519_dir.path(), Some(&rcgen::PKCS_ED25519));
    let ecdsa_cert = ecdsa_dir.path().join("tls").join("cert.pem");
    let ed25519_cert = ed25519_dir.path().join("cert.pem");
    let x25519 = client(&ecdsa_cert, None, false);
    let p256 = client(
        &ecdsa_cert,
        Some(vec![rustls::crypto::ring::kx_group::SECP256R1]),
        false,
    );
    let x25519_ed = client(&ed25519_cert, None, false);
    let resuming = client(&ecdsa_cert, None, true);

    let mut group = c.benchmark_group("server_tls13_handshake");
    group.bench_function("full_x25519_ecdsa_p256_default", |b| {
        b.iter_custom(|iters| server_time(iters, &ecdsa, &x25519, false))
    });
    group.bench_function("full_p256_ecdsa_p256", |b| {
        b.iter_custom(|iters| server_time(iters, &ecdsa, &p256, false))
    });
    group.bench_function("full_x25519_ed25519", |b| {
        b.iter_custom(|iters| server_time(iters, &ed25519, &x25519_ed, false))
    });
    group.bench_function("resumed_x25519", |b| {
        b.iter_custom(|iters| server_time(iters, &ecdsa, &resuming, true))
    });
    group.finish();
}

fn sasl_plain(c: &mut Criterion) {
    let mut group = c.benchmark_group("server_sasl_plain_check");
    for iterations in [64, 4096] {
        let credentials = Credentials::derive("pencil", iterations);
        group.bench_function(format!("password_{iterations}_iterations"), |b| {
            b.iter(|| assert!(credentials.verify_plain(std::hint::black_box("pencil"))))
        });
    }
    let mut credentials = Credentials::derive("pencil", 4096);
    let key = new_device_key();
    credentials.device_keys.push(device_key_hash(&key));
    group.bench_function("device_key", |b| {
        b.iter(|| assert!(credentials.verify_plain(std::hint::black_box(&key))))
    });
    group.finish();
}

criterion_group!(benches, tls_handshakes, sasl_plain);
criterion_main!(benches);
