//! The project's own minimal blocking XMPP test client and a harness that runs the real `gateway`
//! binary. Everything here has a deadline: sockets have read timeouts, the server's readiness and
//! exit are polled against a clock, and child processes are killed when their handle drops.
//!
//! The client is deliberately dumb: it writes raw XML and matches substrings in what it reads,
//! so tests can send exactly the bad input they mean to send.

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned};

/// SCRAM iterations for test accounts: low, so that logins are fast in debug builds.
pub const SCRAM_ITERATIONS: &str = "64";
/// How long any single expectation may wait for the server.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may take to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
pub const DOMAIN: &str = "localhost";
pub const SHARDS: usize = 2;

pub const NS_STREAMS: &str = "http://etherx.jabber.org/streams";
pub const NS_STREAM_ERRORS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
pub const NS_SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
pub const NS_TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
pub const NS_BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";

/// Every case runs on both I/O engines, as `uring::case` and `tasks::case` (each case a function
/// taking the engine's name); for test files that declare `#[macro_use] mod support;`.
#[allow(unused_macros)]
macro_rules! on_both_engines {
    ($($case:ident),* $(,)?) => {
        mod uring {
            $(#[test]
            fn $case() {
                super::$case("uring");
            })*
        }
        mod tasks {
            $(#[test]
            fn $case() {
                super::$case("tasks");
            })*
        }
    };
}

pub fn gateway_bin() -> &'static str {
    env!("CARGO_BIN_EXE_gateway")
}

/// The home shard of `node@localhost` with the tests' shard count (same function as the server).
pub fn home_shard(node: &str) -> usize {
    shared::shard::home_shard(&format!("{node}@{DOMAIN}"), SHARDS)
}

/// `count` user names `userN` whose home shard is `shard`, in order.
pub fn users_on_shard(shard: usize, count: usize) -> Vec<String> {
    (1..)
        .map(|i| format!("user{i}"))
        .filter(|n| home_shard(n) == shard)
        .take(count)
        .collect()
}

pub fn password_of(node: &str) -> String {
    format!("pw-{node}")
}

/// `N` distinct ports that were free a moment ago: all `N` are held at once while the OS picks
/// them (picking one at a time can hand out the same port twice, which made a server refuse to
/// start with "two listeners share one address"); the race with other processes is acceptable
/// for tests.
pub fn free_ports<const N: usize>() -> [u16; N] {
    let held: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| held[i].local_addr().expect("local addr").port())
}

static UNIQUE: AtomicU64 = AtomicU64::new(0);

/// A process-unique token for ids and message bodies.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        UNIQUE.fetch_add(1, Ordering::Relaxed)
    )
}

/// The result of a CLI command run to completion (or killed at its deadline).
#[derive(Debug)]
pub struct CmdOutput {
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs the gateway binary with `args`, stdin closed (or fed `stdin`), and kills it at `timeout`.
pub fn run_gateway(args: &[&str], stdin: Option<&str>, timeout: Duration) -> CmdOutput {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut cmd = Command::new(gateway_bin());
    cmd.args(args)
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().expect("spawn gateway");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        // The command may exit before reading; a broken pipe is not the test's concern.
        let _ = pipe.write_all(text.as_bytes());
    }
    let (status, timed_out) = wait_deadline(&mut child, timeout);
    CmdOutput {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
        timed_out,
    }
}

/// Waits for `child` until `timeout`; past it, kills it. Returns (status, timed_out).
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> (Option<ExitStatus>, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (Some(status), false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let status = child.wait().ok();
            return (status, true);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Adds `node` with `password_of(node)` to the data dir `data_dir` (server must be stopped).
pub fn add_user(data_dir: &Path, node: &str) {
    let dir = data_dir.to_str().unwrap();
    let pw = password_of(node);
    let out = run_gateway(
        &[
            "--data-dir",
            dir,
            "--scram-iterations",
            SCRAM_ITERATIONS,
            "user",
            "add",
            node,
            "--password",
            &pw,
        ],
        None,
        Duration::from_secs(60),
    );
    assert!(out.success(), "`gateway user add {node}` failed: {out:?}");
}

/// How to start a server.
pub struct ServerBuilder {
    users: Vec<String>,
    args: Vec<String>,
    allow_plaintext: bool,
    envs: Vec<(String, String)>,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerBuilder {
    pub fn new() -> Self {
        ServerBuilder {
            users: Vec::new(),
            args: Vec::new(),
            allow_plaintext: false,
            envs: Vec::new(),
        }
    }
    pub fn user(mut self, node: &str) -> Self {
        self.users.push(node.to_owned());
        self
    }
    pub fn users<S: AsRef<str>>(mut self, nodes: &[S]) -> Self {
        self.users
            .extend(nodes.iter().map(|s| s.as_ref().to_owned()));
        self
    }
    /// Extra `serve` flags, e.g. `["--stanza-bytes-max", "4096"]`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.to_owned());
        self
    }
    pub fn allow_plaintext(mut self) -> Self {
        self.allow_plaintext = true;
        self
    }
    /// An environment variable for the server process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }
    /// One shard with plaintext allowed, every store commit delayed by `delay_ms` (the
    /// `GATEWAY_TEST_COMMIT_DELAY_MS` hook: a stalling disk), so what waits for a commit can be
    /// watched from clients of that shard.
    pub fn one_shard_slow_commits(self, delay_ms: u64) -> Self {
        self.allow_plaintext()
            .arg("--shards")
            .arg("1")
            .env("GATEWAY_TEST_COMMIT_DELAY_MS", &delay_ms.to_string())
    }
    pub fn start(self) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let data_dir = dir.path().join("data");
        std::fs::create_dir_all(&data_dir).unwrap();
        for u in &self.users {
            add_user(&data_dir, u);
        }
        let [c2s, tls, admin] = free_ports();
        let mut server = Server {
            child: None,
            dir,
            data_dir,
            c2s: SocketAddr::from(([127, 0, 0, 1], c2s)),
            tls: SocketAddr::from(([127, 0, 0, 1], tls)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            extra: self.args,
            allow_plaintext: self.allow_plaintext,
            envs: self.envs,
        };
        server.spawn();
        server
    }
}

/// A running `gateway serve` with its own temp data dir and ports; killed when dropped.
pub struct Server {
    child: Option<Child>,
    dir: tempfile::TempDir,
    pub data_dir: PathBuf,
    pub c2s: SocketAddr,
    pub tls: SocketAddr,
    pub admin: SocketAddr,
    extra: Vec<String>,
    allow_plaintext: bool,
    envs: Vec<(String, String)>,
}

impl Server {
    fn stderr_path(&self) -> PathBuf {
        self.dir.path().join("server.stderr")
    }

    /// The server's stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.stderr_path()).unwrap_or_default()
    }

    fn spawn(&mut self) {
        // Extra args may set their own shard count (a restart with another `--shards`).
        let shards = match self.extra.iter().position(|a| a == "--shards") {
            Some(_) => Vec::new(),
            None => vec!["--shards".to_owned(), SHARDS.to_string()],
        };
        let mut args: Vec<String> =
            vec!["--data-dir".into(), self.data_dir.to_str().unwrap().into()];
        args.extend(shards);
        args.extend([
            "--scram-iterations".into(),
            SCRAM_ITERATIONS.into(),
            "--log-level".into(),
            "info".into(),
            "serve".into(),
            "--no-pin".into(),
            "--c2s-addr".into(),
            self.c2s.to_string(),
            "--tls-addr".into(),
            self.tls.to_string(),
            "--admin-addr".into(),
            self.admin.to_string(),
        ]);
        if self.allow_plaintext {
            args.push("--allow-plaintext".into());
        }
        args.extend(self.extra.iter().cloned());
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.stderr_path())
            .unwrap();
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.stdout"))
            .unwrap();
        let child = Command::new(gateway_bin())
            .args(&args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn gateway serve");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Polls `GET /health` until it answers 200 `ready`; panics with the log past the deadline or
    /// if the process exits.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "gateway exited before it was ready: {status}\n--- log ---\n{}",
                    self.log()
                );
            }
            if let Some((code, body)) = http_get(self.admin, "/health") {
                if code == 200 && body.contains("ready") {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "gateway not ready within {READY_TIMEOUT:?}\n--- log ---\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the server.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        let rc = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits for the process to exit; returns its status and how long it took, or panics at
    /// `timeout` (after killing it).
    pub fn wait_exit(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let start = Instant::now();
        let mut child = self.child.take().expect("running");
        let (status, timed_out) = wait_deadline(&mut child, timeout);
        assert!(
            !timed_out,
            "gateway did not exit within {timeout:?}\n--- log ---\n{}",
            self.log()
        );
        (status.unwrap(), start.elapsed())
    }

    /// SIGTERM, then wait; asserts exit code 0.
    pub fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let (status, _) = self.wait_exit(Duration::from_secs(30));
        assert!(
            status.success(),
            "gateway exited with {status}\n--- log ---\n{}",
            self.log()
        );
    }

    /// Replaces the extra `serve` flags used by the next `restart`.
    pub fn set_args(&mut self, args: &[&str]) {
        self.extra = args.iter().map(|a| a.to_string()).collect();
    }

    /// SIGKILL, then wait for the process to be gone (a crash: nothing is flushed).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.wait_exit(Duration::from_secs(30));
    }

    /// Starts the server again on the same data dir and ports.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop first");
        self.spawn();
    }

    /// A client on the STARTTLS port, logged in as `node` with resource `resource`.
    pub fn login(&self, node: &str, resource: &str) -> Client {
        self.authenticate_and_bind(Client::connect_starttls(self.c2s), node, resource)
    }

    /// A client on the STARTTLS port without TLS (the server must allow plaintext), logged in:
    /// its socket (`Client::tcp`) can be written from another thread.
    pub fn login_plaintext(&self, node: &str, resource: &str) -> Client {
        let mut c = Client::connect(self.c2s);
        c.open_stream();
        c.read_features();
        self.authenticate_and_bind(c, node, resource)
    }

    /// A client on the direct-TLS port, logged in.
    pub fn login_direct_tls(&self, node: &str, resource: &str) -> Client {
        let mut c = Client::connect_direct_tls(self.tls);
        c.open_stream();
        c.read_features();
        self.authenticate_and_bind(c, node, resource)
    }

    /// SASL PLAIN as `node` on a stream whose features were read, then a bind.
    fn authenticate_and_bind(&self, mut c: Client, node: &str, resource: &str) -> Client {
        c.auth_plain(node, &password_of(node))
            .unwrap_or_else(|e| panic!("login {node}: {e}\n--- log ---\n{}", self.log()));
        c.bind(resource);
        c
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- gateway log ---\n{}", self.log());
        }
    }
}

/// Sum of a `/metrics` counter's samples whose line contains `label`.
pub fn metric(server: &Server, name: &str, label: &str) -> f64 {
    let metrics = http_get(server.admin, "/metrics").unwrap().1;
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.0 GET; `None` if the connection fails.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

/// Accepts any server certificate (the server's is self-signed) but still checks signatures.
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

pub fn tls_config(alpn: bool) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    if alpn {
        config.alpn_protocols = vec![b"xmpp-client".to_vec()];
    }
    Arc::new(config)
}

fn tls_wrap(tcp: TcpStream, alpn: bool) -> StreamOwned<ClientConnection, TcpStream> {
    let name = ServerName::try_from(DOMAIN).unwrap();
    let conn = ClientConnection::new(tls_config(alpn), name).expect("tls client");
    let mut stream = StreamOwned::new(conn, tcp);
    // Drive the handshake now, so a handshake failure shows up here and not at the first read.
    let deadline = Instant::now() + IO_TIMEOUT;
    while stream.conn.is_handshaking() {
        match stream.conn.complete_io(&mut stream.sock) {
            Ok(_) => {}
            Err(e) if is_timeout(&e) && Instant::now() < deadline => {}
            Err(e) => panic!("TLS handshake failed: {e}"),
        }
    }
    stream
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

enum Transport {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Transport {
    fn tcp(&self) -> &TcpStream {
        match self {
            Transport::Plain(s) => s,
            Transport::Tls(s) => &s.sock,
        }
    }
}

/// One blocking client connection. Received text accumulates in a buffer; `expect*` methods
/// consume it up to what they matched.
pub struct Client {
    transport: Option<Transport>,
    buf: String,
    /// Undecoded bytes (a UTF-8 sequence split across reads).
    pending: Vec<u8>,
    closed: bool,
    pub jid: Option<String>,
}

impl Client {
    fn from_tcp(tcp: TcpStream) -> Client {
        // Short socket timeouts; the real deadline is enforced by the read loop.
        tcp.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        tcp.set_nodelay(true).unwrap();
        Client {
            transport: Some(Transport::Plain(tcp)),
            buf: String::new(),
            pending: Vec::new(),
            closed: false,
            jid: None,
        }
    }

    /// A TCP connection, nothing sent.
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_tcp(TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect"))
    }

    /// A direct-TLS connection (XEP-0368), handshake done, nothing sent.
    pub fn connect_direct_tls(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        let Some(Transport::Plain(tcp)) = c.transport.take() else {
            unreachable!()
        };
        c.transport = Some(Transport::Tls(Box::new(tls_wrap(tcp, true))));
        c
    }

    /// Connects to the c2s port, negotiates STARTTLS and opens the stream again over TLS; the
    /// post-TLS features have been read.
    pub fn connect_starttls(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr);
        c.open_stream();
        let features = c.read_features();
        assert!(
            features.contains("<starttls"),
            "no <starttls/> offered: {features}"
        );
        c.starttls();
        c.open_stream();
        c.read_features();
        c
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Some(Transport::Tls(_)))
    }

    /// Sends `<starttls/>`, expects `<proceed/>`, runs the handshake.
    pub fn starttls(&mut self) {
        self.send(&format!("<starttls xmlns='{NS_TLS}'/>"));
        self.expect("<proceed");
        self.expect(">");
        self.buf.clear();
        let Some(Transport::Plain(tcp)) = self.transport.take() else {
            panic!("already TLS")
        };
        self.transport = Some(Transport::Tls(Box::new(tls_wrap(tcp, false))));
    }

    pub fn stream_header(to: &str) -> String {
        format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='{NS_STREAMS}' to='{to}' version='1.0'>"
        )
    }

    pub fn open_stream(&mut self) {
        self.send(&Client::stream_header(DOMAIN));
    }

    /// Reads up to the end of `<stream:features>` and returns it.
    pub fn read_features(&mut self) -> String {
        let got = self.try_read_until(IO_TIMEOUT, |s| {
            if let Some(i) = s.find("</stream:features>") {
                return Some(i + "</stream:features>".len());
            }
            s.find("<stream:features/>")
                .map(|i| i + "<stream:features/>".len())
        });
        match got {
            Ok(text) => text,
            Err(e) => panic!("no stream features: {e}"),
        }
    }

    /// The SASL mechanisms offered in a features block.
    pub fn mechanisms(features: &str) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = features;
        while let Some(i) = rest.find("<mechanism>") {
            rest = &rest[i + "<mechanism>".len()..];
            if let Some(j) = rest.find("</mechanism>") {
                out.push(rest[..j].trim().to_owned());
                rest = &rest[j..];
            }
        }
        out
    }

    /// SASL PLAIN; on `<success/>` restarts the stream and reads the features. `Err` carries the
    /// server's answer on failure.
    pub fn auth_plain(&mut self, node: &str, password: &str) -> Result<(), String> {
        let creds =
            base64::engine::general_purpose::STANDARD.encode(format!("\0{node}\0{password}"));
        self.send(&format!(
            "<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{creds}</auth>"
        ));
        let answer = self.try_read_until(IO_TIMEOUT, |s| {
            for end in [
                "<success/>",
                "</success>",
                "</failure>",
                "<failure/>",
                "</stream:error>",
                "</stream:stream>",
            ] {
                if let Some(i) = s.find(end) {
                    // A success element may also be written `<success xmlns='...'/>`.
                    return Some(i + end.len());
                }
            }
            if let Some(i) = s.find("<success") {
                if let Some(j) = s[i..].find("/>") {
                    return Some(i + j + 2);
                }
            }
            None
        })?;
        if answer.contains("<success") {
            self.buf.clear();
            self.open_stream();
            self.read_features();
            Ok(())
        } else {
            Err(answer)
        }
    }

    /// Binds `resource`; stores and returns the full JID.
    pub fn bind(&mut self, resource: &str) -> String {
        let id = unique("bind");
        self.send(&format!(
            "<iq type='set' id='{id}'><bind xmlns='{NS_BIND}'><resource>{resource}</resource></bind></iq>"
        ));
        let iq = self.expect_stanza("iq", &id);
        assert!(is_type(&iq, "result"), "bind failed: {iq}");
        let start = iq.find("<jid>").expect("jid in bind result") + 5;
        let end = iq.find("</jid>").expect("jid end");
        let jid = iq[start..end].to_owned();
        self.jid = Some(jid.clone());
        jid
    }

    pub fn send(&mut self, text: &str) {
        self.try_send(text.as_bytes())
            .unwrap_or_else(|e| panic!("send failed: {e}"));
    }

    pub fn try_send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self.transport.as_mut().expect("connected") {
            Transport::Plain(s) => {
                s.write_all(bytes)?;
                s.flush()
            }
            Transport::Tls(s) => {
                s.write_all(bytes)?;
                s.flush()
            }
        }
    }

    /// One read into the buffer. Ok(false) on timeout, Ok(true) on data; EOF sets `closed`.
    fn fill(&mut self) -> io::Result<bool> {
        if self.closed {
            return Ok(false);
        }
        let mut chunk = [0u8; 16 * 1024];
        let r = match self.transport.as_mut().expect("connected") {
            Transport::Plain(s) => s.read(&mut chunk),
            Transport::Tls(s) => s.read(&mut chunk),
        };
        match r {
            Ok(0) => {
                self.closed = true;
                Ok(false)
            }
            Ok(n) => {
                self.pending.extend_from_slice(&chunk[..n]);
                match std::str::from_utf8(&self.pending) {
                    Ok(s) => {
                        self.buf.push_str(s);
                        self.pending.clear();
                    }
                    Err(e) if e.error_len().is_none() => {
                        let valid = e.valid_up_to();
                        self.buf
                            .push_str(std::str::from_utf8(&self.pending[..valid]).unwrap());
                        self.pending.drain(..valid);
                    }
                    Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
                Ok(true)
            }
            Err(e) if is_timeout(&e) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(false),
            // A reset or a TLS close without close_notify: the stream is over.
            Err(_) => {
                self.closed = true;
                Ok(false)
            }
        }
    }

    /// Reads until `matcher` finds an end offset in the unconsumed text; consumes and returns the
    /// text up to it. `Err` (with everything received) at the deadline or at EOF without a match.
    pub fn try_read_until(
        &mut self,
        timeout: Duration,
        matcher: impl Fn(&str) -> Option<usize>,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = matcher(&self.buf) {
                let taken: String = self.buf.drain(..end).collect();
                return Ok(taken);
            }
            if self.closed {
                return Err(format!("connection closed; received: {:?}", self.buf));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "timed out after {timeout:?}; received: {:?}",
                    self.buf
                ));
            }
            if let Err(e) = self.fill() {
                return Err(format!("read error {e}; received: {:?}", self.buf));
            }
        }
    }

    /// Reads messages until `n` whose id starts with `prefix` have arrived, or none came for
    /// `IO_TIMEOUT`; returns what follows `prefix` in their ids, in arrival order (repeats
    /// included), so a test can compare it with the sequence it expects.
    pub fn message_ids(&mut self, prefix: &str, n: usize) -> Vec<String> {
        let needle = format!(" id='{prefix}");
        let mut ids = Vec::new();
        while ids.len() < n {
            let Ok(text) = self.try_read_until(IO_TIMEOUT, |s| {
                let i = s.find("<message")?;
                let j = s[i..].find("</message>")?;
                Some(i + j + "</message>".len())
            }) else {
                break;
            };
            let msg = &text[text.rfind("<message").unwrap()..];
            if let Some(i) = msg.find(&needle) {
                let rest = &msg[i + needle.len()..];
                ids.push(rest[..rest.find('\'').unwrap()].to_owned());
            }
        }
        ids
    }

    /// Waits for `needle`; consumes and returns the text through it.
    pub fn expect(&mut self, needle: &str) -> String {
        self.try_expect(needle, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("expected {needle:?}: {e}"))
    }

    pub fn try_expect(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.try_read_until(timeout, |s| s.find(needle).map(|i| i + needle.len()))
    }

    /// Waits for the `<name>` element carrying `marker` (an id or a unique body) and returns it
    /// whole; text before it is dropped.
    pub fn expect_stanza(&mut self, name: &str, marker: &str) -> String {
        self.try_expect_stanza(name, marker, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("expected <{name}> with {marker:?}: {e}"))
    }

    pub fn try_expect_stanza(
        &mut self,
        name: &str,
        marker: &str,
        timeout: Duration,
    ) -> Result<String, String> {
        let open = format!("<{name}");
        let close = format!("</{name}>");
        let text = self.try_read_until(timeout, |s| {
            let at = s.find(marker)?;
            let start = s[..at].rfind(&open)?;
            let tag_end = start + s[start..].find('>')?;
            if s[..tag_end].ends_with('/') && tag_end > at {
                return Some(tag_end + 1);
            }
            s[start..].find(&close).map(|j| start + j + close.len())
        })?;
        // The element is the last `<name` that precedes the marker (as in the matcher).
        let at = text.find(marker).unwrap_or(0);
        let start = text[..at].rfind(&open).unwrap_or(0);
        Ok(text[start..].to_owned())
    }

    /// Expects a stream error with `condition`, then `</stream:stream>` and the connection's
    /// close. Returns everything read.
    pub fn expect_stream_error(&mut self, condition: &str) -> String {
        let needle = format!("<{condition}");
        let mut text = self
            .try_read_until(IO_TIMEOUT, |s| {
                let i = s.find("<stream:error")?;
                let j = s[i..].find("</stream:error>")?;
                Some(i + j + "</stream:error>".len())
            })
            .unwrap_or_else(|e| panic!("expected stream error <{condition}/>: {e}"));
        let err = &text[text.find("<stream:error").unwrap()..];
        assert!(err.contains(&needle), "expected <{condition}/>, got {err}");
        assert!(
            err.contains(NS_STREAM_ERRORS),
            "condition not in the streams namespace: {err}"
        );
        text.push_str(&self.expect_close());
        text
    }

    /// Expects `</stream:stream>` and then EOF within the timeout. Returns what was read.
    pub fn expect_close(&mut self) -> String {
        let text = self.expect("</stream:stream>");
        self.expect_eof();
        text
    }

    /// Expects the server to close the connection (EOF or reset) within the timeout.
    pub fn expect_eof(&mut self) {
        let deadline = Instant::now() + IO_TIMEOUT;
        while !self.closed {
            assert!(
                Instant::now() < deadline,
                "server did not close the connection; received: {:?}",
                self.buf
            );
            let _ = self.fill();
        }
    }

    /// Whether the server has closed the connection (reads what is pending first).
    pub fn is_closed(&mut self) -> bool {
        let _ = self.fill();
        self.closed
    }

    /// Proves the session works: a ping to the server is answered and a message to the
    /// session's own full JID comes back.
    pub fn assert_alive(&mut self) {
        let id = unique("ping");
        self.send(&format!(
            "<iq type='get' id='{id}' to='{DOMAIN}'><ping xmlns='urn:xmpp:ping'/></iq>"
        ));
        let iq = self.expect_stanza("iq", &id);
        assert!(
            is_type(&iq, "result"),
            "ping not answered with a result: {iq}"
        );
        let jid = self.jid.clone().expect("bound");
        let body = unique("self");
        self.send(&format!(
            "<message to='{jid}' type='chat' id='{body}'><body>{body}</body></message>"
        ));
        let msg = self.expect_stanza("message", &format!("<body>{body}</body>"));
        assert!(!is_type(&msg, "error"), "message to self bounced: {msg}");
    }

    /// The raw TCP socket (e.g. to shut down its write half).
    pub fn tcp(&self) -> &TcpStream {
        self.transport.as_ref().expect("connected").tcp()
    }
}

/// Whether the element's start tag has `type='t'` (either quote style).
pub fn is_type(element: &str, t: &str) -> bool {
    let tag = &element[..element.find('>').unwrap_or(element.len())];
    tag.contains(&format!("type='{t}'")) || tag.contains(&format!("type=\"{t}\""))
}
