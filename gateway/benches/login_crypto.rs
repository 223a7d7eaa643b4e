//! The CPU floor of a direct-TLS login on the server (issue 4): what the server spends on the
//! TLS handshake and on SASL PLAIN's password check, with no network and no XMPP around them.
//!
//! Each handshake runs in memory between our server session (`gateway::tls::TlsSession` with the
//! gateway's own `ServerConfig`) and a stock rustls client; only the thread CPU time spent inside
//! the server's calls is counted (so other load on a shared box does not inflate it), so the
//! figures are server CPU per login. `1 / (handshake + PLAIN check)` is
//! the most logins per server CPU-second any I/O path can reach on this CPU.
//!
//! Handshakes run on each crypto library rustls offers (ring, aws-lc-rs) with the gateway's own
//! configuration otherwise; `crypto_primitives` times the handshake's public-key operations
//! alone in both libraries.
//!
//!   cargo bench -p gateway --bench login_crypto --profile fastrel

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gateway::tls::{server_config_with, CryptoLibrary, TlsSession};
use router::credentials::{device_key_hash, new_device_key, Credentials};
use rustls::crypto::{CryptoProvider, SupportedKxGroup};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};
use shared::config::Config;

/// A typical stanza's record plaintext.
const RECORD_BENCH_BYTES: usize = 256;

/// Most client/server exchanges one handshake may take before the bench calls it stuck.
const HANDSHAKE_ROUNDS_MAX: usize = 16;

/// The server's configuration as `gateway serve` builds it on `library` (its provider reshaped by
/// `adjust`), with the certificate in `dir` (made there with `algorithm` when given; the
/// gateway's own generated one otherwise).
fn server(
    dir: &Path,
    algorithm: Option<&'static rcgen::SignatureAlgorithm>,
    library: CryptoLibrary,
    adjust: impl FnOnce(&mut CryptoProvider),
) -> Arc<ServerConfig> {
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
    let mut provider = library.login_cheap_provider();
    adjust(&mut provider);
    let ticketer = library.ticketer().expect("ticketer");
    server_config_with(&config, provider, ticketer).expect("server config")
}

/// A ring client trusting the certificate at `cert_path`, offering `groups` (rustls's default
/// order when `None`), keeping tickets to resume with when `resume`.
fn client(
    cert_path: &Path,
    groups: Option<Vec<&'static dyn SupportedKxGroup>>,
    resume: bool,
) -> Arc<ClientConfig> {
    client_on(
        rustls::crypto::ring::default_provider(),
        cert_path,
        groups,
        resume,
    )
}

fn client_on(
    mut provider: CryptoProvider,
    cert_path: &Path,
    groups: Option<Vec<&'static dyn SupportedKxGroup>>,
    resume: bool,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    let pem = std::fs::read(cert_path).expect("read cert");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("PEM")).expect("root");
    }
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
    let started = thread_cpu();
    let mut session = TlsSession::new(server.clone()).expect("server session");
    let mut spent = thread_cpu() - started;
    let name = ServerName::try_from("localhost").expect("name");
    let mut conn = ClientConnection::new(client.clone(), name).expect("client");
    let mut wire = Vec::new();
    for _ in 0..HANDSHAKE_ROUNDS_MAX {
        wire.clear();
        while conn.wants_write() {
            conn.write_tls(&mut wire).expect("client write");
        }
        let started = thread_cpu();
        session
            .receive(&wire, &mut |_| None::<()>)
            .expect("server receive");
        spent += thread_cpu() - started;
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

/// CPU time this thread has used (a system call, ~0.3 us: each handshake reads it 8 times).
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; this clock exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// Thread CPU time of `iters` runs of `f`.
fn cpu_time<T>(iters: u64, mut f: impl FnMut() -> T) -> Duration {
    let started = thread_cpu();
    for _ in 0..iters {
        std::hint::black_box(f());
    }
    thread_cpu() - started
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
    let mut group = c.benchmark_group("server_tls13_handshake");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    for (library, name) in [
        (CryptoLibrary::Ring, "ring"),
        (CryptoLibrary::AwsLc, "aws_lc"),
    ] {
        let ecdsa_dir = tempfile::tempdir().expect("tempdir");
        let ed25519_dir = tempfile::tempdir().expect("tempdir");
        let ecdsa = server(ecdsa_dir.path(), None, library, |_| {});
        let ed25519 = server(
            ed25519_dir.path(),
            Some(&rcgen::PKCS_ED25519),
            library,
            |_| {},
        );
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
        // The same server sending no session ticket: what issuing one costs.
        let mut no_ticket = ServerConfig::clone(&ecdsa);
        no_ticket.send_tls13_tickets = 0;
        let no_ticket = Arc::new(no_ticket);

        group.bench_function(format!("{name}/full_x25519_ecdsa_p256_default"), |b| {
            b.iter_custom(|iters| server_time(iters, &ecdsa, &x25519, false))
        });
        group.bench_function(format!("{name}/full_x25519_ecdsa_p256_no_ticket"), |b| {
            b.iter_custom(|iters| server_time(iters, &no_ticket, &x25519, false))
        });
        group.bench_function(format!("{name}/full_p256_ecdsa_p256"), |b| {
            b.iter_custom(|iters| server_time(iters, &ecdsa, &p256, false))
        });
        if library == CryptoLibrary::AwsLc {
            // P-256 key exchange on aws-lc's own group, which the gateway does not use.
            let aws_lc_p256 = server(ecdsa_dir.path(), None, library, |p| {
                p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP256R1]
            });
            group.bench_function(format!("{name}/full_p256_ecdsa_p256_aws_lc_kx"), |b| {
                b.iter_custom(|iters| server_time(iters, &aws_lc_p256, &p256, false))
            });
        }
        group.bench_function(format!("{name}/full_x25519_ed25519"), |b| {
            b.iter_custom(|iters| server_time(iters, &ed25519, &x25519_ed, false))
        });
        group.bench_function(format!("{name}/resumed_x25519"), |b| {
            b.iter_custom(|iters| server_time(iters, &ecdsa, &resuming, true))
        });
    }
    // What a post-quantum hybrid would cost if the server accepted it (it does not: see
    // `gateway::tls::KX_GROUPS`); only aws-lc-rs has ML-KEM.
    let pq_dir = tempfile::tempdir().expect("tempdir");
    let pq = server(pq_dir.path(), None, CryptoLibrary::AwsLc, |p| {
        p.kx_groups
            .insert(0, rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768)
    });
    let pq_client = client_on(
        rustls::crypto::aws_lc_rs::default_provider(),
        &pq_dir.path().join("tls").join("cert.pem"),
        Some(vec![rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768]),
        false,
    );
    group.bench_function("aws_lc/full_x25519mlkem768_ecdsa_p256", |b| {
        b.iter_custom(|iters| server_time(iters, &pq, &pq_client, false))
    });
    group.finish();
}

/// The handshake's public-key operations alone, as the server runs them: an ephemeral key pair
/// and its public key, the shared secret, the certificate signature.
fn crypto_primitives(c: &mut Criterion) {
    let mut group = c.benchmark_group("crypto_primitives");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    // Both libraries have ring's API under their own names; one macro times each.
    macro_rules! primitives {
        ($lib:ident, $name:literal, $from_pkcs8:expr, $agree:expr) => {{
            use $lib::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
            use $lib::rand::SystemRandom;
            use $lib::signature::{self, Ed25519KeyPair, KeyPair};
            let rng = SystemRandom::new();
            for (alg, curve) in [
                (&agreement::X25519, "x25519"),
                (&agreement::ECDH_P256, "p256"),
            ] {
                let peer = EphemeralPrivateKey::generate(alg, &rng).expect("key");
                let peer_public = peer.compute_public_key().expect("public");
                let peer_public = peer_public.as_ref().to_vec();
                group.bench_function(format!("{}/{curve}_keygen", $name), |b| {
                    b.iter_custom(|iters| {
                        cpu_time(iters, || {
                            let key = EphemeralPrivateKey::generate(alg, &rng).expect("key");
                            key.compute_public_key().expect("public")
                        })
                    })
                });
                group.bench_function(format!("{}/{curve}_keygen_agree", $name), |b| {
                    b.iter_custom(|iters| {
                        cpu_time(iters, || {
                            let key = EphemeralPrivateKey::generate(alg, &rng).expect("key");
                            std::hint::black_box(key.compute_public_key().expect("public"));
                            let peer = UnparsedPublicKey::new(alg, &peer_public);
                            $agree(key, &peer)
                        })
                    })
                });
            }
            let pkcs8 = signature::EcdsaKeyPair::generate_pkcs8(
                &signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                &rng,
            )
            .expect("p256 key");
            let p256 = $from_pkcs8(pkcs8.as_ref());
            let message = [7u8; 64];
            group.bench_function(format!("{}/ecdsa_p256_sign", $name), |b| {
                b.iter_custom(|iters| cpu_time(iters, || p256.sign(&rng, &message).expect("sign")))
            });
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).expect("ed25519 key");
            let ed25519 = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("ed25519 key");
            std::hint::black_box(ed25519.public_key());
            group.bench_function(format!("{}/ed25519_sign", $name), |b| {
                b.iter_custom(|iters| cpu_time(iters, || ed25519.sign(&message)))
            });
            // One record as `gateway::record` seals it: the AES-128-GCM key expanded for the
            // call, then a 256-byte stanza sealed in place.
            let mut record = vec![0u8; RECORD_BENCH_BYTES];
            group.bench_function(format!("{}/aes128gcm_expand_seal_256B", $name), |b| {
                b.iter_custom(|iters| {
                    let mut seq = 0u64;
                    cpu_time(iters, || {
                        use $lib::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
                        let key = LessSafeKey::new(
                            UnboundKey::new(&AES_128_GCM, &[9u8; 16]).expect("key"),
                        );
                        seq += 1;
                        let mut nonce = [0u8; 12];
                        nonce[4..].copy_from_slice(&seq.to_be_bytes());
                        key.seal_in_place_separate_tag(
                            Nonce::assume_unique_for_key(nonce),
                            Aad::from([23u8, 3, 3, 1, 17]),
                            &mut record,
                        )
                        .expect("seal")
                    })
                })
            });
        }};
    }
    primitives!(
        ring,
        "ring",
        |pkcs8: &[u8]| {
            ring::signature::EcdsaKeyPair::from_pkcs8(
                &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                pkcs8,
                &ring::rand::SystemRandom::new(),
            )
            .expect("p256 key")
        },
        |key, peer| {
            ring::agreement::agree_ephemeral(key, peer, |secret: &[u8]| secret[0]).expect("agree")
        }
    );
    primitives!(
        aws_lc_rs,
        "aws_lc",
        |pkcs8: &[u8]| {
            aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
                &aws_lc_rs::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
                pkcs8,
            )
            .expect("p256 key")
        },
        |key, peer| {
            aws_lc_rs::agreement::agree_ephemeral(key, peer, (), |secret: &[u8]| Ok(secret[0]))
                .expect("agree")
        }
    );
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

criterion_group!(benches, tls_handshakes, crypto_primitives, sasl_plain);
criterion_main!(benches);
