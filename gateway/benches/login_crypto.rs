//! The CPU floor of a direct-TLS login on the server (issue 4): what the server spends on the
//! TLS handshake and on SASL PLAIN's password check, with no network and no XMPP around them.
//!
//! Each handshake runs in memory between our server session (`gateway::tls::TlsSession` with the
//! gateway's own `ServerConfig`) and a stock rustls client; only the thread CPU time spent inside
//! the server's calls is counted (so other load on a shared box does not inflate it), so the
//! figures are server CPU per login. `1 / (handshake + PLAIN check)` is
//! the most logins per server CPU-second any I/O path can reach on this CPU.
//!
//! Handshakes run on each `CryptoLibrary` (ring, aws-lc-rs, and the mix the gateway runs) with
//! the gateway's own configuration otherwise, plus variants it does not run (no ticket, the other
//! ticketer or signer, aws-lc-rs's P-256 group, the post-quantum hybrid);
//! `crypto_primitives` times the handshake's public-key operations (and one record seal) alone
//! in both libraries.
//!
//!   cargo bench -p gateway --bench login_crypto --profile fastrel
//!   cargo bench -p gateway --bench login_crypto --profile fastrel -- paired
//!
//! The second interleaves all handshake kinds and prints medians and ratios to ring: on a shared,
//! noisy box that is the comparison to trust (criterion's separate runs drift by 10-20%).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, Criterion};
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

/// One kind of handshake: its server and client, and whether the client resumes.
struct Case {
    /// `library/kind`.
    name: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    resumed: bool,
}

/// Every handshake kind on both libraries, plus variants the gateway does not run (aws-lc's own
/// P-256 key exchange, the post-quantum hybrid). The certificates live in `dirs`.
fn cases(dirs: &mut Vec<tempfile::TempDir>) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut case = |name: String, server: &Arc<ServerConfig>, client: &Arc<ClientConfig>| {
        let resumed = name.contains("resumed");
        cases.push(Case {
            name,
            server: server.clone(),
            client: client.clone(),
            resumed,
        })
    };
    for (library, name) in [
        (CryptoLibrary::Ring, "ring"),
        (CryptoLibrary::AwsLc, "aws_lc"),
        (CryptoLibrary::Mixed, "mixed"),
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

        case(
            format!("{name}/full_x25519_ecdsa_p256_default"),
            &ecdsa,
            &x25519,
        );
        case(
            format!("{name}/full_x25519_ecdsa_p256_no_ticket"),
            &no_ticket,
            &x25519,
        );
        case(format!("{name}/full_p256_ecdsa_p256"), &ecdsa, &p256);
        if library == CryptoLibrary::AwsLc {
            // Tickets from ring's ticketer.
            let config = Config {
                data_dir: ecdsa_dir.path().to_path_buf(),
                ..Config::default()
            };
            let aws_lc_tickets = server_config_with(
                &config,
                library.login_cheap_provider(),
                CryptoLibrary::Ring.ticketer().expect("ticketer"),
            )
            .expect("server config");
            case(
                format!("{name}/full_x25519_ecdsa_p256_ring_ticketer"),
                &aws_lc_tickets,
                &x25519,
            );
            // P-256 key exchange on aws-lc's own group, which the gateway does not use.
            let aws_lc_p256 = server(ecdsa_dir.path(), None, library, |p| {
                p.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::SECP256R1]
            });
            case(
                format!("{name}/full_p256_ecdsa_p256_aws_lc_kx"),
                &aws_lc_p256,
                &p256,
            );
        }
        if library == CryptoLibrary::Mixed {
            // Signing with ring's keys instead of aws-lc-rs's.
            let ring_sign = server(ecdsa_dir.path(), None, library, |p| {
                p.key_provider = rustls::crypto::ring::default_provider().key_provider
            });
            case(
                format!("{name}/full_x25519_ecdsa_p256_ring_sign"),
                &ring_sign,
                &x25519,
            );
            case(
                format!("{name}/full_p256_ecdsa_p256_ring_sign"),
                &ring_sign,
                &p256,
            );
        }
        case(format!("{name}/full_x25519_ed25519"), &ed25519, &x25519_ed);
        case(format!("{name}/resumed_x25519"), &ecdsa, &resuming);
        dirs.extend([ecdsa_dir, ed25519_dir]);
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
    case(
        "aws_lc/full_x25519mlkem768_ecdsa_p256".to_string(),
        &pq,
        &pq_client,
    );
    dirs.push(pq_dir);
    cases
}

fn tls_handshakes(c: &mut Criterion) {
    let mut group = c.benchmark_group("server_tls13_handshake");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(4));
    let mut dirs = Vec::new();
    for case in cases(&mut dirs) {
        group.bench_function(&case.name, |b| {
            b.iter_custom(|iters| server_time(iters, &case.server, &case.client, case.resumed))
        });
    }
    group.finish();
}

/// Rounds of `paired`: each runs a block of handshakes of every case.
const PAIRED_ROUNDS: usize = 200;
/// Handshakes per case and round; the first `PAIRED_WARMUP` of a block are not counted (the
/// caches then still hold the previous case's library, which a server running one never sees).
const PAIRED_BLOCK: usize = 8;
const PAIRED_WARMUP: usize = 2;
/// Any non-zero xorshift seed: the same order every run.
const PAIRED_SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// Every case's handshakes interleaved in short blocks (so load from other processes on a shared
/// box falls on all alike), then each case's median server CPU per handshake and its ratio to
/// ring's same kind. Run with `-- paired`.
fn paired() {
    let mut dirs = Vec::new();
    let cases = cases(&mut dirs);
    let samples = PAIRED_ROUNDS * (PAIRED_BLOCK - PAIRED_WARMUP);
    let mut spent: Vec<Vec<Duration>> = vec![Vec::with_capacity(samples); cases.len()];
    // The cases' order is shuffled every round (Fisher-Yates on a xorshift), so that no case
    // always follows the same one.
    let mut order: Vec<usize> = (0..cases.len()).collect();
    let mut state = PAIRED_SEED;
    for _ in 0..PAIRED_ROUNDS {
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        for &c in &order {
            let case = &cases[c];
            for i in 0..PAIRED_BLOCK {
                let time = server_time(1, &case.server, &case.client, case.resumed);
                if i >= PAIRED_WARMUP {
                    spent[c].push(time);
                }
            }
        }
    }
    let median = |d: &mut Vec<Duration>| {
        d.sort_unstable();
        d[d.len() / 2]
    };
    let medians: Vec<Duration> = spent.iter_mut().map(median).collect();
    println!(
        "server CPU per TLS 1.3 handshake, median of {samples} ({PAIRED_ROUNDS} interleaved \
         rounds of {PAIRED_BLOCK} in shuffled order, {PAIRED_WARMUP} uncounted):"
    );
    for (case, m) in cases.iter().zip(&medians) {
        let kind = case.name.split_once('/').map_or("", |(_, kind)| kind);
        let ring = cases
            .iter()
            .zip(&medians)
            .find(|(c, _)| c.name == format!("ring/{kind}"))
            .map(|(_, m)| *m);
        let ratio = ring.map_or(String::new(), |r| {
            format!("{:.2}x ring", m.as_secs_f64() / r.as_secs_f64())
        });
        println!(
            "  {:<45} {:>7.1} us  {ratio}",
            case.name,
            m.as_secs_f64() * 1e6
        );
    }
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

fn main() {
    if std::env::args().any(|arg| arg == "paired") {
        paired();
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
