//! The connection I/O path against the real `gateway` binary, on both I/O engines (`uring`: one
//! io_uring per shard with provided receive buffers; `tasks`: a task per connection): input split
//! at every few bytes and a stanza written a byte at a time (TLS records and stanzas across the
//! server's reads), TLS records split across tiny provided buffers, a burst far larger than the
//! server's read buffers and than its whole buffer ring (nothing lost or reordered), a reader too
//! slow for what it is sent (bounded send queue, then its stream is closed with
//! `resource-constraint`), a handoff to the home shard with the client's next stanzas already
//! sent, TLS resumption, the segments that end a stream, its last bytes reaching a client whose
//! input was left unread (the close resets), and no descriptor left open by a close.

#[macro_use]
mod support;

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rustls::pki_types::ServerName;
use rustls::ClientConnection;
use support::*;

/// A raw client whose writes go out `chunk` bytes per `write` with a pause after each, so the
/// server sees its TLS records and stanzas split across many reads.
struct Raw {
    tcp: TcpStream,
    tls: Option<ClientConnection>,
    chunk: usize,
    pause: Duration,
    /// Plaintext received and not yet consumed by `expect`.
    text: String,
    pending: Vec<u8>,
    eof: bool,
    /// The server's TLS close_notify arrived.
    close_notify: bool,
}

impl Raw {
    fn connect(addr: SocketAddr, tls: bool, recv_buffer_bytes: Option<usize>) -> Raw {
        Raw::connect_with(addr, tls.then(|| tls_config(true)), recv_buffer_bytes)
    }

    /// Connects with this TLS client configuration (its session cache makes reconnects resume).
    fn connect_with(
        addr: SocketAddr,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
        recv_buffer_bytes: Option<usize>,
    ) -> Raw {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        if let Some(bytes) = recv_buffer_bytes {
            socket.set_recv_buffer_size(bytes).unwrap();
        }
        socket.connect_timeout(&addr.into(), IO_TIMEOUT).unwrap();
        let tcp: TcpStream = socket.into();
        tcp.set_nodelay(true).unwrap();
        tcp.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        tcp.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let tls = tls.map(|config| {
            let mut conn =
                ClientConnection::new(config, ServerName::try_from(DOMAIN).unwrap()).unwrap();
            // The burst goes to rustls in one write.
            conn.set_buffer_limit(None);
            conn
        });
        let mut c = Raw {
            tcp,
            tls,
            chunk: usize::MAX,
            pause: Duration::ZERO,
            text: String::new(),
            pending: Vec::new(),
            eof: false,
            close_notify: false,
        };
        c.flush_tls();
        c
    }

    fn write_wire(&mut self, bytes: &[u8]) {
        for piece in bytes.chunks(self.chunk.min(bytes.len().max(1))) {
            self.tcp.write_all(piece).expect("write");
            if !self.pause.is_zero() {
                std::thread::sleep(self.pause);
            }
        }
    }

    fn flush_tls(&mut self) {
        let mut wire = Vec::new();
        if let Some(tls) = self.tls.as_mut() {
            while tls.wants_write() {
                tls.write_tls(&mut wire).unwrap();
            }
        }
        if !wire.is_empty() {
            self.write_wire(&wire);
        }
    }

    fn send(&mut self, text: &str) {
        match self.tls.as_mut() {
            Some(tls) => {
                tls.writer().write_all(text.as_bytes()).unwrap();
                self.flush_tls();
            }
            None => self.write_wire(text.as_bytes()),
        }
    }

    /// Reads what is there (waiting up to the socket's read timeout); false at end of stream.
    fn read_some(&mut self) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        let n = match self.tcp.read(&mut buf) {
            Ok(0) => {
                self.eof = true;
                return false;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return true
            }
            Err(_) => {
                self.eof = true;
                return false;
            }
        };
        match self.tls.as_mut() {
            None => self.pending.extend_from_slice(&buf[..n]),
            Some(tls) => {
                let wire = buf[..n].to_vec();
                let mut input = &wire[..];
                // Bounded: each pass hands rustls some input and takes all its plaintext.
                while !input.is_empty() {
                    tls.read_tls(&mut input).unwrap();
                    tls.process_new_packets().expect("TLS from the server");
                    loop {
                        match tls.reader().read(&mut buf) {
                            Ok(0) => {
                                self.eof = true;
                                self.close_notify = true;
                                break;
                            }
                            Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                            Err(_) => break,
                        }
                    }
                }
                self.flush_tls();
            }
        }
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        self.text
            .push_str(std::str::from_utf8(&self.pending[..valid]).unwrap());
        self.pending.drain(..valid);
        !self.eof
    }

    /// Reads until `needle` arrives; returns the text up to and including it and consumes it.
    fn expect(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + IO_TIMEOUT;
        // Where the search resumes: text before it was searched already.
        let mut from = 0;
        loop {
            if let Some(i) = self.text[from..].find(needle) {
                let rest = self.text.split_off(from + i + needle.len());
                return std::mem::replace(&mut self.text, rest);
            }
            from = self.text.len().saturating_sub(needle.len());
            while !self.text.is_char_boundary(from) {
                from -= 1;
            }
            assert!(
                Instant::now() < deadline && !self.eof,
                "no {needle:?} (eof: {}); got {:?}",
                self.eof,
                &self.text[self.text.len().saturating_sub(400)..]
            );
            self.read_some();
        }
    }

    fn login(&mut self, node: &str) {
        self.send(&Client::stream_header(DOMAIN));
        self.expect("</stream:features>");
        let creds = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{node}\0{}", password_of(node)));
        self.send(&format!(
            "<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{creds}</auth>"
        ));
        self.expect("<success");
        self.send(&Client::stream_header(DOMAIN));
        self.expect("</stream:features>");
        self.send(&format!(
            "<iq type='set' id='b1'><bind xmlns='{NS_BIND}'><resource>r</resource></bind></iq>"
        ));
        self.expect("</iq>");
        self.send("<presence/>");
    }
}

/// Messages in the burst, and the bytes of each body: the burst (~2 MiB) is hundreds of times
/// the server's per-connection read (256 bytes) and its per-shard read buffer (4 KiB), and many
/// times what one connection may read per turn (256 KiB).
const BURST_MESSAGES: usize = 3000;
const BURST_BODY_BYTES: usize = 700;

/// `a` logs in with every write split into 3-byte pieces (TLS records, the handshake and stanzas
/// all cross the server's reads), then sends `b` one burst in a single write; `b` must receive
/// every message, in order.
/// Returns the server, still running, for its counters.
fn split_input_and_burst(engine: &str, tls: bool, args: &[&str], messages: usize) -> Server {
    let [a_node, b_node] = ["user1", "user2"];
    let mut builder = on_engine(engine, args).users(&[a_node, b_node]);
    if !tls {
        builder = builder.allow_plaintext();
    }
    let server = builder.start();
    let addr = if tls { server.tls } else { server.c2s };
    let mut a = Raw::connect(addr, tls, None);
    a.chunk = 3;
    a.pause = Duration::from_millis(1);
    a.login(a_node);
    let mut b = Raw::connect(addr, tls, None);
    b.login(b_node);
    // `b` is present once its own presence comes back to it.
    b.expect("<presence");

    a.chunk = usize::MAX;
    a.pause = Duration::ZERO;
    let filler = "x".repeat(BURST_BODY_BYTES);
    let mut burst = String::new();
    for i in 0..messages {
        burst.push_str(&format!(
            "<message to='{b_node}@{DOMAIN}' type='chat' id='m{i}'><body>{i} {filler}</body></message>"
        ));
    }
    let sender = std::thread::spawn(move || {
        a.send(&burst);
        a
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..messages {
        assert!(Instant::now() < deadline, "burst not through in 60 s");
        let got = b.expect("</message>");
        assert!(
            got.contains(&format!("id='m{i}'"))
                && got.contains(&format!("<body>{i} {filler}</body>")),
            "message {i} missing or out of order; got {:?}",
            &got[..got.len().min(300)]
        );
        assert!(!got.contains("type='error'"), "message {i} bounced: {got}");
    }
    let mut a = sender.join().unwrap();
    // Both sessions are still fine.
    a.send(&format!(
        "<message to='{b_node}@{DOMAIN}' type='chat' id='last'><body>end</body></message>"
    ));
    b.expect("id='last'");
    server
}

fn tls_records_split_across_reads_and_a_burst_arrive_whole_and_in_order(engine: &str) {
    split_input_and_burst(engine, true, &[], BURST_MESSAGES);
}

fn plaintext_split_across_reads_and_a_burst_arrive_whole_and_in_order(engine: &str) {
    split_input_and_burst(engine, false, &[], BURST_MESSAGES);
}

/// On the uring engine, the burst of `split_input_and_burst` run with `args` found the ring
/// empty: the path where connections wait for buffers was taken.
fn assert_ran_dry(engine: &str, server: &Server) {
    if engine == "uring" {
        let shortages = metric(server, "gateway_recv_buffer_shortages_total", "");
        assert!(shortages > 0.0, "the burst never found the ring empty");
    }
}

/// TLS records (up to 16 KiB) land in provided buffers of 256 bytes: every record spans many.
fn tls_records_split_across_tiny_buffers_arrive_whole(engine: &str) {
    split_input_and_burst(
        engine,
        true,
        &["--uring-recv-buffer-bytes", "256"],
        BURST_MESSAGES / 4,
    );
}

/// A burst of more than 1 MB through one session, with a ring of 4 buffers of 512 bytes: the
/// ring runs dry again and again; the connection waits for buffers, nothing is lost or reordered.
fn a_burst_larger_than_the_buffer_ring_waits_for_buffers(engine: &str) {
    let args = [
        "--uring-recv-buffers",
        "4",
        "--uring-recv-buffer-bytes",
        "512",
    ];
    for tls in [false, true] {
        let server = split_input_and_burst(engine, tls, &args, BURST_MESSAGES / 2);
        assert_ran_dry(engine, &server);
    }
}

/// The burst tests with a whole buffer per read (`uring_recv_buffer_fill = "whole"`, what
/// kernels before 6.12 get): TLS records across buffers of 256 bytes, and a ring of 4 run dry.
#[test]
fn uring_whole_buffers_split_records_and_a_dry_ring() {
    let fill = ["--uring-recv-buffer-fill", "whole"];
    let tiny = [&fill[..], &["--uring-recv-buffer-bytes", "256"]].concat();
    split_input_and_burst("uring", true, &tiny, BURST_MESSAGES / 4);
    let dry = [
        &fill[..],
        &[
            "--uring-recv-buffers",
            "4",
            "--uring-recv-buffer-bytes",
            "512",
        ],
    ]
    .concat();
    for tls in [false, true] {
        let server = split_input_and_burst("uring", tls, &dry, BURST_MESSAGES / 2);
        assert_ran_dry("uring", &server);
    }
}

/// Connections opened at once whose first reads (a TLS ClientHello each, ~250 bytes) all arrive
/// while the shard is busy, four times as many as its ring has buffers. Filled incrementally,
/// the ring's 64 KiB hold them all: no read finds it empty. A buffer per read, it runs dry and
/// connections wait for buffers (the count shows it). Either way every handshake is answered.
#[test]
fn uring_first_reads_of_many_connections_share_the_buffers() {
    for (fill, runs_dry) in [("incremental", false), ("whole", true)] {
        let args = [
            "--shards",
            "1",
            "--uring-recv-buffer-fill",
            fill,
            "--uring-recv-buffers",
            &BURST_RING_BUFFERS.to_string(),
        ];
        let server = on_engine("uring", &args).start();
        // Hellos made and sockets connected first, then all written in one tight loop.
        let mut clients: Vec<(TcpStream, Vec<u8>)> = (0..BURST_CONNECTIONS)
            .map(|_| {
                let mut tls =
                    ClientConnection::new(tls_config(true), ServerName::try_from(DOMAIN).unwrap())
                        .unwrap();
                let mut hello = Vec::new();
                while tls.wants_write() {
                    tls.write_tls(&mut hello).unwrap();
                }
                let tcp = TcpStream::connect_timeout(&server.tls, IO_TIMEOUT).unwrap();
                tcp.set_nodelay(true).unwrap();
                tcp.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                (tcp, hello)
            })
            .collect();
        for (tcp, hello) in &mut clients {
            tcp.write_all(hello).unwrap();
        }
        for (i, (tcp, _)) in clients.iter_mut().enumerate() {
            let mut record_type = [0u8; 1];
            tcp.read_exact(&mut record_type)
                .unwrap_or_else(|e| panic!("{fill}: connection {i} got no answer: {e}"));
            assert_eq!(
                record_type[0], 0x16,
                "{fill}: connection {i}: not a handshake"
            );
        }
        let shortages = metric(&server, "gateway_recv_buffer_shortages_total", "");
        if runs_dry {
            assert!(
                shortages > 0.0,
                "{fill}: {BURST_CONNECTIONS} reads on {BURST_RING_BUFFERS} buffers never ran dry"
            );
        } else {
            assert_eq!(shortages, 0.0, "{fill}: reads found the ring empty");
        }
    }
}

/// Connections and buffers of `uring_first_reads_of_many_connections_share_the_buffers`.
const BURST_CONNECTIONS: usize = 64;
const BURST_RING_BUFFERS: usize = 16;

/// A stanza written one byte per write (and so per server read), plaintext and through TLS.
fn a_stanza_written_a_byte_at_a_time_arrives(engine: &str) {
    for tls in [false, true] {
        let [a_node, b_node] = ["user1", "user2"];
        let mut builder = on_engine(engine, &[]).users(&[a_node, b_node]);
        if !tls {
            builder = builder.allow_plaintext();
        }
        let server = builder.start();
        let addr = if tls { server.tls } else { server.c2s };
        let mut a = Raw::connect(addr, tls, None);
        a.login(a_node);
        let mut b = Raw::connect(addr, tls, None);
        b.login(b_node);
        b.expect("<presence");
        a.chunk = 1;
        a.pause = Duration::from_millis(1);
        a.send(&format!(
            "<message to='{b_node}@{DOMAIN}' type='chat' id='slow'><body>one byte at a time</body></message>"
        ));
        let got = b.expect("</message>");
        assert!(
            got.contains("id='slow'") && got.contains("<body>one byte at a time</body>"),
            "tls {tls}: {got}"
        );
    }
}

/// Clients that send their next stanzas (stream restart, bind, presence, a ping; one write) the
/// moment `<success/>` arrives, while the server is handing the connection to its user's home
/// shard: bytes the old shard read meanwhile travel with the handoff, the rest wait in the
/// socket for the new shard, and the session goes on there. Users on both home shards,
/// connections landing on either shard: some are handed off (checked on `/metrics`). Clients
/// that pipeline all of it in the same write as `<auth/>` (before `<success/>`, as XEP-0305
/// allows) lose nothing either: the stream restart keeps the bytes not yet handled.
fn a_handoff_carries_the_bytes_sent_right_after_auth(engine: &str) {
    let mut nodes = users_on_shard(0, 4);
    nodes.extend(users_on_shard(1, 4));
    let builder = on_engine(engine, &[]).users(&nodes).allow_plaintext();
    let server = builder.start();
    for (tls, early) in [(false, false), (true, false), (false, true), (true, true)] {
        for node in &nodes {
            let addr = if tls { server.tls } else { server.c2s };
            let mut c = Raw::connect(addr, tls, None);
            c.send(&Client::stream_header(DOMAIN));
            c.expect("</stream:features>");
            let creds = base64::engine::general_purpose::STANDARD
                .encode(format!("\0{node}\0{}", password_of(node)));
            let auth = format!("<auth xmlns='{NS_SASL}' mechanism='PLAIN'>{creds}</auth>");
            let next = format!(
                "{}<iq type='set' id='b1'><bind xmlns='{NS_BIND}'><resource>r</resource></bind></iq>\
                 <presence/><iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>",
                Client::stream_header(DOMAIN)
            );
            if early {
                c.send(&format!("{auth}{next}"));
                c.expect("<success");
            } else {
                c.send(&auth);
                c.expect("<success");
                c.send(&next);
            }
            let bound = c.expect("</iq>");
            assert!(
                bound.contains(&format!("<jid>{node}@{DOMAIN}/r</jid>")),
                "{node} tls {tls} early {early}: {bound}"
            );
            let pong = c.expect("id='p1'");
            assert!(!pong.contains("type='error'"), "{pong}");
        }
    }
    let handed = metric(&server, "gateway_handoffs_total", "direction=\"in\"");
    assert!(handed > 0.0, "no connection was handed off");
}

/// Bytes of each message body sent to the slow reader, and the most messages sent (a bound:
/// the reader's send queue holds 1,024 stanzas, the kernel a few MiB more).
const SLOW_BODY_BYTES: usize = 16 * 1024;
const SLOW_MESSAGES_MAX: usize = 4000;

fn a_reader_that_falls_behind_is_closed_with_resource_constraint(engine: &str) {
    let [slow_node, writer_node] = ["user1", "user2"];
    let server = on_engine(engine, &[])
        .users(&[slow_node, writer_node])
        .allow_plaintext()
        .start();
    // The kernel's receive window stays at its default while the reader does not read.
    let mut slow = Raw::connect(server.c2s, false, None);
    slow.login(slow_node);
    let mut writer = Raw::connect(server.c2s, false, None);
    writer.login(writer_node);
    writer.expect("<presence");

    let mut send_side = writer.tcp.try_clone().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_sender = stop.clone();
    let filler = "y".repeat(SLOW_BODY_BYTES);
    let sender = std::thread::spawn(move || {
        let mut sent = 0;
        while sent < SLOW_MESSAGES_MAX && !stop_sender.load(std::sync::atomic::Ordering::Relaxed) {
            let m = format!(
                "<message to='{slow_node}@{DOMAIN}' type='chat' id='s{sent}'><body>{sent} {filler}</body></message>"
            );
            if send_side.write_all(m.as_bytes()).is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    // The writer learns that its messages no longer fit: they bounce with resource-constraint.
    let bounced = writer.expect("<resource-constraint");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent = sender.join().unwrap();
    assert!(bounced.contains("type='error'"), "{bounced:.300}");

    // The slow reader, reading at last, gets what was queued, in order, then the stream error,
    // then the end of the connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !slow.eof && Instant::now() < deadline {
        slow.read_some();
    }
    assert!(slow.eof, "slow reader's connection not closed");
    let text = std::mem::take(&mut slow.text);
    let error = format!("<resource-constraint xmlns='{NS_STREAM_ERRORS}'/>");
    let at = text.find(&error).unwrap_or_else(|| {
        panic!(
            "no stream error; tail {:?}",
            &text[text.len().saturating_sub(300)..]
        )
    });
    assert!(
        text[..at].ends_with("<stream:error>"),
        "{:?}",
        &text[at.saturating_sub(200)..]
    );
    let received = text[..at].matches("</message>").count();
    assert!(
        received < sent,
        "received {received} of {sent}: nothing was cut off"
    );
    let mut at = 0;
    for i in 0..received {
        let id = format!("id='s{i}'");
        let found = text[at..].find(&id);
        assert!(
            found.is_some(),
            "message {i} of {received} missing or out of order"
        );
        at += found.unwrap() + id.len();
    }
}

fn a_reconnect_resumes_the_tls_session_with_a_ticket(engine: &str) {
    let node = "user1";
    let server = on_engine(engine, &[]).user(node).start();
    // One client configuration, so one session cache, for both connections.
    let config = tls_config(true);
    let mut first = Raw::connect_with(server.tls, Some(config.clone()), None);
    first.login(node);
    first.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>");
    first.expect("id='p1'");
    let kind = first.tls.as_ref().unwrap().handshake_kind();
    assert_eq!(kind, Some(rustls::HandshakeKind::Full), "first connection");
    drop(first);

    let mut second = Raw::connect_with(server.tls, Some(config), None);
    second.login(node);
    let kind = second.tls.as_ref().unwrap().handshake_kind();
    assert_eq!(
        kind,
        Some(rustls::HandshakeKind::Resumed),
        "the reconnect did a full handshake: no ticket was used"
    );
}

/// Segments with data that `tcp` has received so far (the kernel's count, `TCP_INFO`).
fn data_segments_in(tcp: &TcpStream) -> u32 {
    tcp_info(tcp).tcpi_data_segs_in
}

/// Segments of any kind (data, pure ACKs, a bare FIN) that `tcp` has received so far.
fn segments_in(tcp: &TcpStream) -> u32 {
    tcp_info(tcp).tcpi_segs_in
}

fn tcp_info(tcp: &TcpStream) -> libc::tcp_info {
    use std::os::fd::AsRawFd;
    // SAFETY: zeroed is a valid tcp_info (plain integers).
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes and `len` holds the buffer's size.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info
}

/// Logs `node` in over direct TLS, lets the login's own traffic settle, then ends the stream
/// from the client and reads to the end of it: the segments the client received from its
/// `</stream:stream>` on, as (data segments, all segments: pure ACKs and a bare FIN included).
fn segments_ending_a_stream(tls: SocketAddr, node: &str) -> (u32, u32) {
    let mut c = Raw::connect(tls, true, None);
    c.login(node);
    c.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>");
    c.expect("id='p1'");
    // Whatever else the login brought (its own presence) is in by now: ping answers in order.
    while c.read_some() && !c.text.is_empty() {
        c.text.clear();
    }
    let before = (data_segments_in(&c.tcp), segments_in(&c.tcp));
    c.send("</stream:stream>");
    c.expect("</stream:stream>");
    let deadline = Instant::now() + IO_TIMEOUT;
    while c.read_some() {
        assert!(Instant::now() < deadline, "the server did not close");
    }
    assert!(c.close_notify, "the server closed without close_notify");
    (
        data_segments_in(&c.tcp) - before.0,
        segments_in(&c.tcp) - before.1,
    )
}

/// When the client ends its stream, the server's `</stream:stream>` and its TLS close_notify
/// leave in one send: one data segment, not one each (a login storm pays for every segment).
fn the_last_bytes_and_close_notify_leave_in_one_segment(engine: &str) {
    let node = "user1";
    let server = on_engine(engine, &[]).user(node).start();
    let (segments, _) = segments_ending_a_stream(server.tls, node);
    assert_eq!(
        segments, 1,
        "</stream:stream> and close_notify came in {segments} data segments"
    );
}

/// The server ends a stream with one segment: `</stream:stream>` and close_notify carry the FIN
/// (the last send holds its tail with MSG_MORE and the socket's shutdown sends it with the FIN),
/// where a plain send and close take two (the data, then a bare FIN). Method: the client's count
/// of all the segments it received from its `</stream:stream>` to the end of the stream. The
/// server's ACK of that `</stream:stream>` rides on its answer unless the delayed-ACK timer (40
/// ms at least) fires first, which a loaded machine can cause: the best of a few connections
/// counts.
fn the_fin_leaves_with_the_last_bytes(engine: &str) {
    let node = "user1";
    let server = on_engine(engine, &[]).user(node).start();
    let mut counts = Vec::new();
    for _ in 0..FIN_TRIES {
        let (_, segments) = segments_ending_a_stream(server.tls, node);
        counts.push(segments);
        if segments == 1 {
            return;
        }
    }
    panic!(
        "the end of the stream came in {counts:?} segments per connection (one each expected: \
         the last bytes with the FIN)"
    );
}

/// A stream the server ends (a stanza that is not well-formed) while more of the client's input
/// waits unread in the socket: closing such a socket resets the connection (the kernel answers
/// unread input with a RST), so the server's last bytes, held with MSG_MORE, must leave before
/// the close. The client gets the stream error, `</stream:stream>` and close_notify, then the
/// reset (after the FIN a read shows it as the end of the stream; the socket's state tells:
/// closed, where a FIN alone leaves it waiting for our own close). The uring engine, its ring
/// four 512-byte buffers, leaves most of the input unread and must show the reset; the tasks
/// engine may read it all before it closes.
fn the_last_bytes_reach_a_client_whose_input_was_left_unread(engine: &str) {
    let node = "user1";
    let args = [
        "--uring-recv-buffers",
        "4",
        "--uring-recv-buffer-bytes",
        "512",
    ];
    let server = on_engine(engine, &args).user(node).start();
    let mut c = Raw::connect(server.tls, true, None);
    c.login(node);
    c.expect("<presence");
    let body = "x".repeat(UNREAD_INPUT_BYTES);
    c.send(&format!(
        "<message><</message><message to='{node}@{DOMAIN}'><body>{body}</body></message>"
    ));
    let got = c.expect("</stream:stream>");
    assert!(got.contains("<not-well-formed"), "{got}");
    let deadline = Instant::now() + IO_TIMEOUT;
    while c.read_some() {
        assert!(Instant::now() < deadline, "the server did not close");
    }
    assert!(c.close_notify, "close_notify did not arrive");
    if engine == "uring" {
        let deadline = Instant::now() + IO_TIMEOUT;
        while u32::from(tcp_info(&c.tcp).tcpi_state) != TCP_STATE_CLOSE {
            assert!(
                Instant::now() < deadline,
                "no reset (state {}): the server read all of the input, so this proves nothing",
                tcp_info(&c.tcp).tcpi_state
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// `TCP_CLOSE` of the kernel's TCP states (`tcpi_state`).
const TCP_STATE_CLOSE: u32 = 7;

/// Bytes the client of `the_last_bytes_reach_a_client_whose_input_was_left_unread` sends after
/// the stanza that ends its stream (they fit in the sockets' buffers: the write never blocks).
const UNREAD_INPUT_BYTES: usize = 32 * 1024;

/// Connections `the_fin_leaves_with_the_last_bytes` tries before it fails.
const FIN_TRIES: usize = 3;

/// Connections closed by either side leave no descriptor open in the server (the uring engine
/// closes sockets through its ring, the task engine with `close(2)`). Method: after a first
/// login and close (whatever the server opens once is open by then), the entries of
/// `/proc/<pid>/fd`; then connections that end their stream (the server closes first, with its
/// last bytes held for the FIN) alternate with connections the client just drops (the server
/// sees the end of input); the count must come back to where it was.
fn closed_connections_leave_no_descriptor_open(engine: &str) {
    let node = "user1";
    let server = on_engine(engine, &[]).user(node).start();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .expect("the server's /proc/<pid>/fd")
            .count()
    };
    let end_stream = |c: &mut Raw| {
        c.send("</stream:stream>");
        let deadline = Instant::now() + IO_TIMEOUT;
        while c.read_some() {
            assert!(Instant::now() < deadline, "the server did not close");
        }
    };
    let mut first = Raw::connect(server.tls, true, None);
    first.login(node);
    end_stream(&mut first);
    // The client sees the FIN (shutdown) a moment before the server's close of that socket
    // leaves the ring: the baseline is the count once it holds still (it was taken one early
    // on a loaded machine, and the check then found one descriptor fewer than the baseline).
    let settle_deadline = Instant::now() + IO_TIMEOUT;
    let mut baseline = fds();
    let mut still = 0;
    while still < 3 && Instant::now() < settle_deadline {
        std::thread::sleep(Duration::from_millis(30));
        let now = fds();
        still = if now == baseline { still + 1 } else { 0 };
        baseline = now;
    }
    for i in 0..CLOSE_CYCLES {
        let mut c = Raw::connect(server.tls, true, None);
        c.login(node);
        c.send("<iq type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>");
        c.expect("id='p1'");
        if i % 2 == 0 {
            end_stream(&mut c);
        }
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut now_open = fds();
    while now_open > baseline && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        now_open = fds();
    }
    assert_eq!(
        now_open, baseline,
        "the server has {now_open} descriptors open after {CLOSE_CYCLES} closed connections, \
         {baseline} before"
    );
}

/// Connections `closed_connections_leave_no_descriptor_open` opens and closes.
const CLOSE_CYCLES: usize = 10;

/// A server builder on I/O engine `engine` with extra `serve` flags.
fn on_engine(engine: &str, args: &[&str]) -> ServerBuilder {
    let mut builder = ServerBuilder::new().arg("--io-engine").arg(engine);
    for a in args {
        builder = builder.arg(a);
    }
    builder
}

on_both_engines!(
    tls_records_split_across_reads_and_a_burst_arrive_whole_and_in_order,
    plaintext_split_across_reads_and_a_burst_arrive_whole_and_in_order,
    tls_records_split_across_tiny_buffers_arrive_whole,
    a_burst_larger_than_the_buffer_ring_waits_for_buffers,
    a_stanza_written_a_byte_at_a_time_arrives,
    a_handoff_carries_the_bytes_sent_right_after_auth,
    a_reader_that_falls_behind_is_closed_with_resource_constraint,
    a_reconnect_resumes_the_tls_session_with_a_ticket,
    the_last_bytes_and_close_notify_leave_in_one_segment,
    closed_connections_leave_no_descriptor_open,
    the_fin_leaves_with_the_last_bytes,
    the_last_bytes_reach_a_client_whose_input_was_left_unread,
);
