//! The scenarios (`idle`, `login`, `chat`, `reconnect`): their flags, the parent's side (spawn
//! workers, sample the server at the barriers, merge, report) and the worker's side (drive the
//! sessions through the phases).

mod chat;
pub mod offline;
mod parent;
mod worker;

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::client::{ClientConfig, Mechanism, TlsMode};
use crate::driver::DriverConfig;
use crate::tickets::TicketPool;

pub use parent::run;
pub use worker::worker_main;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Idle,
    Login,
    Chat,
    Reconnect,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Idle => "idle",
            Kind::Login => "login",
            Kind::Chat => "chat",
            Kind::Reconnect => "reconnect",
        }
    }
}

/// Flags every scenario takes (each uses the ones that concern it).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Opts {
    /// Server address, HOST:PORT; loopback only (127.0.0.0/8 or ::1).
    #[arg(long, default_value = "127.0.0.1:5222")]
    pub target: String,
    /// XMPP domain of the accounts.
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    /// Users are PREFIX<first>, PREFIX<first+1>, ...
    #[arg(long, default_value = "user")]
    pub user_prefix: String,
    /// Number of the first user (session i logs in as PREFIX<first + i>).
    #[arg(long, default_value_t = 1)]
    pub first: u64,
    /// Every user's password.
    #[arg(long, default_value = "pw")]
    #[serde(skip)]
    pub password: String,
    /// File of per-user passwords, one `NODE SECRET` a line (e.g. device keys from `gateway
    /// user add-device-key`); users not in it use --password.
    #[arg(long)]
    #[serde(skip)]
    pub password_file: Option<PathBuf>,
    /// none | starttls | direct (XEP-0368 direct TLS).
    #[arg(long, default_value = "starttls")]
    pub tls: String,
    /// Accept any server certificate (loopback benchmarks).
    #[arg(long)]
    pub insecure: bool,
    /// PEM file of CA certificates to trust (without --insecure).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// plain | scram-sha-1 | scram-sha-256.
    #[arg(long, default_value = "plain")]
    pub mechanism: String,
    /// Sessions (idle, login, reconnect) or users online (chat).
    #[arg(long, visible_alias = "users", default_value_t = 100)]
    pub sessions: u64,
    /// Seconds of sending (chat, and each sweep step).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Seconds to hold the sessions established (idle).
    #[arg(long, default_value_t = 10.0)]
    pub hold: f64,
    /// Messages per second in total (chat).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Message body size in bytes (chat, offline).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Messages stored for offline users (offline).
    #[arg(long, default_value_t = 10_000)]
    pub messages: u64,
    /// Connects per second in total [default: 2000 for idle and chat, unlimited for login].
    #[arg(long)]
    pub ramp: Option<f64>,
    /// Reconnects per second in total after the drop (reconnect) [default: unlimited].
    #[arg(long)]
    pub reconnect_ramp: Option<f64>,
    /// Driver threads per process [default: available parallelism / procs].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Worker processes (each holds at most the open-files hard limit minus 100 sessions).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Do not pin driver threads to CPUs.
    #[arg(long)]
    pub no_pin: bool,
    /// Source IPv4 addresses used round-robin: `A`, `A-B` (inclusive) or a comma list of those.
    #[arg(long)]
    pub source_ips: Option<String>,
    /// The server's PID, to report its RSS and CPU.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Free text naming the server under test.
    #[arg(long, default_value = "")]
    pub label: String,
    /// The server's shard count, if known: chat partners then sit on different home shards.
    #[arg(long)]
    pub server_shards: Option<usize>,
    /// Seconds a session may take from connect to established.
    #[arg(long, default_value_t = 30.0)]
    pub login_timeout: f64,
    /// A resource to bind (default: the server picks).
    #[arg(long)]
    pub resource: Option<String>,
    /// Every session enables XEP-0198 stream management: the server then stores each message to
    /// an online user until the recipient acknowledges it; senders ask for and count acks (chat).
    #[arg(long)]
    pub sm: bool,
    /// Log in with XEP-0388 SASL2 + XEP-0386 Bind 2 when the server offers them: credentials,
    /// bind (--resource is the tag), XEP-0198 enable and initial presence in one flight, no
    /// stream restart. Servers without them get the RFC 6120 login.
    #[arg(long)]
    pub sasl2: bool,
    /// --sasl2 with XEP-0509 (Initial Authentication Pipelining), direct TLS and plaintext: each
    /// worker first learns the server's config version (one probe connection reads the
    /// features), then every `<authenticate/>` carries it and goes right behind the stream
    /// header: the whole login is the TLS handshake and one flight each way. A refusal for a
    /// stale version is retried once on the same stream; a server without XEP-0509 gets
    /// --sasl2 logins.
    #[arg(long)]
    pub sasl2_pipelined: bool,
    /// --sasl2-pipelined starting from this cached XEP-0509 config version instead of probing
    /// the server's (a stale value exercises the refusal and the retry on the same stream).
    #[arg(long, requires = "sasl2_pipelined")]
    pub iap_config_version: Option<String>,
    /// Login with --tls direct: the TLS handshake only, no XMPP. A session counts as
    /// established when its handshake completes; the client then sends close_notify and waits
    /// for the server to close (whatever the server sends is read and dropped). A floor for
    /// what a login's TLS and TCP cost a server, and a way to hold TLS terminators that speak
    /// no XMPP (nginx's stream module) to the same storm: see scripts/tls-floor.sh.
    #[arg(long)]
    pub handshake_only: bool,
    /// Login over TLS (direct or STARTTLS): first a warm-up phase (every session logs in with a
    /// full handshake, keeps the TLS 1.3 ticket the server gives it, and closes), then the
    /// measured phase, in which each session resumes with a ticket (a reconnect storm of clients
    /// that were online before). The server's CPU and memory are read over the measured phase
    /// only; `counts.tls_resumed` says how many handshakes resumed.
    #[arg(long)]
    pub resume: bool,
    /// Chat: run steps at rising rates until p99 exceeds --p99-bound-ms or messages are lost.
    #[arg(long)]
    pub sweep: bool,
    /// Sweep: a step holds while its p99 latency stays at or under this many ms.
    #[arg(long, default_value_t = 10.0)]
    pub p99_bound_ms: f64,
    /// Sweep: the first step's rate (messages/s in total).
    #[arg(long, default_value_t = 500.0)]
    pub sweep_start: f64,
    /// Sweep: each step's rate is the previous one's times this.
    #[arg(long, default_value_t = 1.5)]
    pub sweep_factor: f64,
    /// Sweep: steps at most.
    #[arg(long, default_value_t = 12)]
    pub sweep_steps_max: usize,
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub worker_index: Option<u64>,
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub worker_count: Option<u64>,
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub start_at_unix_ms: Option<u64>,
}

impl Opts {
    pub fn tls_mode(&self) -> Result<TlsMode> {
        self.tls.parse::<TlsMode>().map_err(anyhow::Error::msg)
    }

    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            (cores / self.procs.max(1)).max(1)
        })
    }

    /// Sessions worker `k` of `n` owns.
    pub fn local_sessions(&self, k: u64, n: u64) -> u64 {
        if self.sessions > k {
            (self.sessions - k).div_ceil(n)
        } else {
            0
        }
    }

    /// The connect rate of the first phase.
    pub fn ramp_for(&self, kind: Kind) -> Option<f64> {
        match kind {
            Kind::Login => self.ramp,
            _ => Some(self.ramp.unwrap_or(2000.0)),
        }
        .filter(|r| r.is_finite() && *r > 0.0)
    }

    /// Seconds a connect phase at `rate` may take before its sessions time out.
    pub fn phase_budget(&self, rate: Option<f64>) -> Duration {
        let ramp = rate.map(|r| self.sessions as f64 / r).unwrap_or(0.0);
        Duration::from_secs_f64(ramp + self.login_timeout + 5.0)
    }
}

/// Resolves `--target` and refuses anything but loopback.
pub fn loopback_target(target: &str) -> Result<SocketAddr> {
    let addrs: Vec<SocketAddr> = target
        .to_socket_addrs()
        .with_context(|| format!("--target {target}: expected HOST:PORT"))?
        .collect();
    let Some(first) = addrs.first().copied() else {
        bail!("--target {target} resolves to nothing")
    };
    for a in &addrs {
        if !a.ip().is_loopback() {
            bail!(
                "--target {target} resolves to {}, which is not loopback: bench only drives servers on \
                 this machine (127.0.0.0/8 or ::1)",
                a.ip()
            );
        }
    }
    Ok(first)
}

/// Parses `A`, `A-B` (inclusive IPv4 range) or a comma list of those.
pub fn parse_source_ips(text: &str) -> Result<Vec<IpAddr>> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if let Some((a, b)) = item.split_once('-') {
            let a: std::net::Ipv4Addr = a
                .trim()
                .parse()
                .with_context(|| format!("--source-ips: bad address {a:?}"))?;
            let b: std::net::Ipv4Addr = b
                .trim()
                .parse()
                .with_context(|| format!("--source-ips: bad address {b:?}"))?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a {
                bail!("--source-ips: range {item} runs backwards");
            }
            if b - a > 1 << 24 {
                bail!("--source-ips: range {item} is too large");
            }
            out.extend((a..=b).map(|v| IpAddr::V4(v.into())));
        } else {
            out.push(
                item.parse()
                    .with_context(|| format!("--source-ips: bad address {item:?}"))?,
            );
        }
    }
    if out.is_empty() {
        bail!("--source-ips: no address given");
    }
    Ok(out)
}

/// A certificate verifier that accepts any certificate (`--insecure`), still checking handshake
/// signatures so the TLS cost stays realistic.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub(super) fn tls_config(
    opts: &Opts,
    mode: TlsMode,
    tickets: Option<&Arc<TicketPool>>,
) -> Result<Option<Arc<rustls::ClientConfig>>> {
    if mode == TlsMode::None {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let mut config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth()
    } else if let Some(path) = &opts.ca_file {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(path)
            .with_context(|| format!("reading --ca-file {}", path.display()))?
        {
            roots.add(cert.with_context(|| format!("parsing --ca-file {}", path.display()))?)?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    } else {
        bail!(
            "--tls {} needs --insecure (accept any certificate) or --ca-file PEM",
            opts.tls
        );
    };
    if let Some(pool) = tickets {
        // Sessions of a worker share one ClientConfig: the pool holds a ticket for each.
        config.resumption = rustls::client::Resumption::store(pool.clone());
    }
    Ok(Some(Arc::new(config)))
}

/// Refuses the flags that only `bench login` reads, for the other scenarios.
pub(super) fn refuse_login_only_flags(opts: &Opts) -> Result<()> {
    if opts.resume || opts.handshake_only {
        bail!("--resume and --handshake-only are for `bench login`");
    }
    Ok(())
}

/// The driver's configuration for worker `k` of `n`; validates every flag.
pub fn driver_config(opts: &Opts, k: u64, n: u64) -> Result<DriverConfig> {
    let target = loopback_target(&opts.target)?;
    let tls = opts.tls_mode()?;
    let mechanism: Mechanism = opts.mechanism.parse().map_err(anyhow::Error::msg)?;
    let sources = match &opts.source_ips {
        Some(s) => parse_source_ips(s)?,
        None => Vec::new(),
    };
    if opts.procs == 0 {
        bail!("--procs must be at least 1");
    }
    if let Some(path) = &opts.password_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--password-file {}: cannot read it", path.display()))?;
        let mut passwords = std::collections::HashMap::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let Some((node, secret)) = line.trim().split_once(' ') else {
                bail!(
                    "--password-file {} line {}: expected `NODE SECRET`",
                    path.display(),
                    i + 1
                );
            };
            passwords.insert(node.to_owned(), secret.trim().to_owned());
        }
        // A second call in the same process (several drivers) finds them already set.
        crate::client::set_passwords(passwords);
    }
    if opts.resume && tls == TlsMode::None {
        bail!("--resume needs TLS (--tls direct or starttls): it resumes TLS sessions");
    }
    if opts.handshake_only && tls != TlsMode::Direct {
        bail!("--handshake-only needs --tls direct (it stops after the TLS handshake)");
    }
    let tickets = opts
        .resume
        .then(|| Arc::new(TicketPool::new(opts.sessions as usize)));
    let server_name = rustls::pki_types::ServerName::try_from(opts.domain.clone())
        .with_context(|| format!("--domain {} is not a valid TLS server name", opts.domain))?;
    Ok(DriverConfig {
        client: Arc::new(ClientConfig {
            domain: opts.domain.clone(),
            tls,
            mechanism,
            password: opts.password.clone(),
            resource: opts.resource.clone(),
            send_presence: true,
            sm: opts.sm,
            sasl2: opts.sasl2 || opts.sasl2_pipelined,
            sasl2_pipelined: opts.sasl2_pipelined,
            iap: Arc::default(),
        }),
        tls: tls_config(opts, tls, tickets.as_ref())?,
        tickets,
        server_name,
        target,
        sources,
        user_prefix: opts.user_prefix.clone(),
        first: opts.first,
        worker_index: k,
        worker_count: n,
        local_sessions: opts.local_sessions(k, n),
        threads: opts.threads(),
        pin: !opts.no_pin,
        login_timeout: Duration::from_secs_f64(opts.login_timeout),
        handshake_only: opts.handshake_only,
    })
}

/// Raises RLIMIT_NOFILE and fails fast when one process cannot hold its share of sessions.
pub fn check_open_files(opts: &Opts) -> Result<()> {
    let (soft, hard) = crate::driver::sys::raise_nofile().context("reading RLIMIT_NOFILE")?;
    let per_proc = opts.local_sessions(0, opts.procs.max(1) as u64);
    if per_proc + 100 > soft {
        let per = hard.saturating_sub(100).max(1);
        bail!(
            "{per_proc} sessions per process exceed the open-files limit (soft {soft}, hard {hard}): \
             use --procs {} (each process holds at most {per} sessions) or raise `ulimit -n` (and \
             fs.nr_open)",
            opts.sessions.div_ceil(per)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges_parse() {
        let v = parse_source_ips("127.0.0.2-127.0.1.250").unwrap();
        assert_eq!(v.len(), 254 + 250 + 1);
        assert_eq!(v[0], "127.0.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(*v.last().unwrap(), "127.0.1.250".parse::<IpAddr>().unwrap());
        assert_eq!(parse_source_ips("127.0.0.1, 127.0.0.3").unwrap().len(), 2);
        assert!(parse_source_ips("127.0.0.9-127.0.0.1").is_err());
    }

    #[test]
    fn only_loopback_targets() {
        assert!(loopback_target("127.0.0.1:5222").is_ok());
        assert!(loopback_target("127.3.2.1:5222").is_ok());
        assert!(loopback_target("[::1]:5222").is_ok());
        assert!(loopback_target("10.0.0.1:5222").is_err());
        assert!(loopback_target("8.8.8.8:5222").is_err());
    }
}
