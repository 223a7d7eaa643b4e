//! `bench offline`: store and forward. One sender streams `--messages` messages round-robin to
//! `--users` recipients who are offline, with XEP-0198 acks (the server acks a message once it is
//! stored durably, or in its `memory` mode once written); then each recipient logs in, sends
//! initial presence and drains its queue, acknowledging as it goes.
//!
//! Measured: messages stored per second (to the sender's last ack), the ack latency per batch
//! (`latency_us`: from a batch's `<r/>` to the `<a/>` covering it), and the drain rate at login
//! (messages received per second from initial presence to the last one). Blocking sockets on one
//! thread; `--tls none`, `starttls` or `direct` (rustls over the blocking socket).

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;

use super::{loopback_target, tls_config, Opts};
use crate::client::TlsMode;
use crate::report::{Latency, Report, Target};

/// Messages written before asking for an ack.
const BATCH_MESSAGES: u64 = 200;
/// Batches in flight (written, not yet acked) at most.
const BATCHES_IN_FLIGHT_MAX: u64 = 4;
/// How long any one wait for the server may take.
const WAIT: Duration = Duration::from_secs(30);
/// Messages a draining recipient receives between two of its acks.
const DRAIN_ACK_EVERY: u64 = 500;

pub fn run(opts: Opts) -> Result<i32> {
    let mode = opts.tls_mode()?;
    super::refuse_login_only_flags(&opts)?;
    let tls = tls_config(&opts, mode, None)?.map(|config| (mode, config));
    let addr = loopback_target(&opts.target)?;
    let recipients: Vec<String> = (1..=opts.sessions.max(1))
        .map(|i| format!("{}{}", opts.user_prefix, opts.first + i))
        .collect();
    let sender = format!("{}{}", opts.user_prefix, opts.first);
    let total = opts.messages;
    let body = "x".repeat(opts.size);

    // Store phase.
    let mut s = Session::login(addr, &opts, tls.as_ref(), &sender).context("sender login")?;
    let mut ack_latency = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut pending: std::collections::VecDeque<(u64, Instant)> = Default::default();
    let mut acked = 0u64;
    let mut sent = 0u64;
    let started = Instant::now();
    let deadline = started + WAIT * 10;
    while acked < total {
        if Instant::now() > deadline {
            bail!("store phase: only {acked} of {total} messages acked in time");
        }
        if sent < total && (pending.len() as u64) < BATCHES_IN_FLIGHT_MAX {
            let n = BATCH_MESSAGES.min(total - sent);
            let mut out = String::new();
            for i in sent..sent + n {
                let to = &recipients[(i % recipients.len() as u64) as usize];
                out.push_str(&format!(
                    "<message to='{to}@{}' id='o{i}' type='chat'><body>{body}</body></message>",
                    opts.domain
                ));
            }
            out.push_str("<r xmlns='urn:xmpp:sm:3'/>");
            s.write(&out)?;
            sent += n;
            pending.push_back((sent, Instant::now()));
            continue;
        }
        let h = s
            .read_ack()
            .with_context(|| format!("store phase: waiting for an ack, {acked} of {sent} acked"))?;
        acked = acked.max(h);
        while pending.front().is_some_and(|(upto, _)| *upto <= acked) {
            let (_, at) = pending.pop_front().expect("checked");
            ack_latency.record(at.elapsed().as_micros().max(1) as u64)?;
        }
    }
    let store_seconds = started.elapsed().as_secs_f64();
    drop(s);

    // Drain phase: one recipient at a time.
    let mut delivered = 0u64;
    let mut duplicated = 0u64;
    let mut drain_seconds = 0.0;
    for (k, r) in recipients.iter().enumerate() {
        let want = (0..total)
            .filter(|i| (i % recipients.len() as u64) as usize == k)
            .count() as u64;
        let mut c = Session::login(addr, &opts, tls.as_ref(), r)?;
        let t = Instant::now();
        c.write("<presence/>")?;
        let mut seen = HashSet::new();
        let mut handled = 0u64;
        let mut last_ack = 0u64;
        while (seen.len() as u64) < want {
            let (id, stanzas) = c.read_message().with_context(|| {
                format!("drain of {r}: {} of {want} messages received", seen.len())
            })?;
            handled += stanzas;
            if let Some(id) = id {
                if !seen.insert(id) {
                    duplicated += 1;
                }
            }
            if handled - last_ack >= DRAIN_ACK_EVERY {
                last_ack = handled;
                c.write(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>"))?;
            }
        }
        drain_seconds += t.elapsed().as_secs_f64();
        c.write(&format!("<a xmlns='urn:xmpp:sm:3' h='{handled}'/>"))?;
        c.close();
        delivered += seen.len() as u64;
    }

    let mut params = match serde_json::to_value(&opts)? {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    params.retain(|_, v| !v.is_null());
    let mut report = Report::new(
        "offline",
        Target {
            address: addr.to_string(),
            domain: opts.domain.clone(),
            tls: opts.tls.to_ascii_lowercase(),
            label: opts.label.clone(),
        },
        params,
    );
    report.counts.established = 1 + recipients.len() as u64;
    report.counts.sent = total;
    report.counts.delivered = delivered;
    report.counts.lost = total.saturating_sub(delivered);
    report.counts.duplicated = duplicated;
    report.rates.sent_msgs_per_second = total as f64 / store_seconds.max(1e-9);
    report.rates.delivered_msgs_per_second = delivered as f64 / drain_seconds.max(1e-9);
    report.latency_us = Latency {
        samples: ack_latency.len(),
        p50: ack_latency.value_at_quantile(0.5),
        p90: ack_latency.value_at_quantile(0.9),
        p99: ack_latency.value_at_quantile(0.99),
        p999: ack_latency.value_at_quantile(0.999),
        max: ack_latency.max(),
    };
    let shards = opts.server_shards.unwrap_or(1).max(1);
    report.notes.push(format!(
        "stored {total} messages in {store_seconds:.2} s: {:.0} msg/s, {:.0} msg/s per shard ({shards} shards); \
         drained {delivered} at login in {drain_seconds:.2} s: {:.0} msg/s; latency_us = ack latency per batch of {BATCH_MESSAGES}",
        report.rates.sent_msgs_per_second,
        report.rates.sent_msgs_per_second / shards as f64,
        report.rates.delivered_msgs_per_second,
    ));
    report.passed = report.counts.lost == 0 && duplicated == 0;
    print!("{}", report.summary_text());
    if let Some(path) = &opts.json {
        report.write_json(path)?;
    }
    Ok(if report.passed { 0 } else { 1 })
}

/// A blocking byte stream: the socket, or TLS over it.
trait Io: Read + Write {}
impl<T: Read + Write> Io for T {}

type TlsSetup = (TlsMode, Arc<rustls::ClientConfig>);

/// One blocking session with XEP-0198 on.
struct Session {
    io: Box<dyn Io>,
    buf: String,
}

impl Session {
    fn login(
        addr: std::net::SocketAddr,
        opts: &Opts,
        tls: Option<&TlsSetup>,
        node: &str,
    ) -> Result<Session> {
        let tcp = TcpStream::connect_timeout(&addr, WAIT).context("connect")?;
        tcp.set_read_timeout(Some(WAIT))?;
        tcp.set_nodelay(true)?;
        let wrap = |tcp: TcpStream, config: &Arc<rustls::ClientConfig>| -> Result<Box<dyn Io>> {
            let name = rustls::pki_types::ServerName::try_from(opts.domain.clone())
                .with_context(|| format!("--domain {} is not a TLS server name", opts.domain))?;
            let conn = rustls::ClientConnection::new(config.clone(), name).context("TLS")?;
            Ok(Box::new(rustls::StreamOwned::new(conn, tcp)))
        };
        let (io, starttls): (Box<dyn Io>, _) = match tls {
            Some((TlsMode::Direct, config)) => (wrap(tcp, config)?, None),
            Some((_, config)) => (Box::new(tcp.try_clone()?), Some((tcp, config))),
            None => (Box::new(tcp), None),
        };
        let mut s = Session {
            io,
            buf: String::new(),
        };
        let header = format!(
            "<?xml version='1.0'?><stream:stream to='{}' version='1.0' xmlns='jabber:client' \
             xmlns:stream='http://etherx.jabber.org/streams'>",
            opts.domain
        );
        s.write(&header)?;
        s.until("</stream:features>")?;
        if let Some((tcp, config)) = starttls {
            s.write("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")?;
            let answer = s.until_any(&["<proceed", "<failure"])?;
            if answer.contains("<failure") {
                bail!("STARTTLS refused for {node}: {answer}");
            }
            s.buf.clear();
            s.io = wrap(tcp, config)?;
            s.write(&header)?;
            s.until("</stream:features>")?;
        }
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("\0{node}\0{}", opts.password));
        s.write(&format!(
            "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{auth}</auth>"
        ))?;
        let answer = s.until_any(&["<success", "<failure"])?;
        if answer.contains("<failure") {
            bail!("login of {node} refused: {answer}");
        }
        s.buf.clear();
        s.write(&header)?;
        s.until("</stream:features>")?;
        s.write(
            "<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>\
             <enable xmlns='urn:xmpp:sm:3'/>",
        )?;
        s.until("</iq>")?;
        let enabled = s.until_any(&["<enabled", "<failed"])?;
        if enabled.contains("<failed") {
            bail!("the server refused XEP-0198 for {node}");
        }
        Ok(s)
    }

    fn write(&mut self, text: &str) -> Result<()> {
        self.io.write_all(text.as_bytes()).context("write")?;
        self.io.flush().context("write")
    }

    /// Reads until `needle`; consumes through it and returns what was consumed.
    fn until(&mut self, needle: &str) -> Result<String> {
        self.until_any(&[needle])
    }

    fn until_any(&mut self, needles: &[&str]) -> Result<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some((end, needle)) = needles
                .iter()
                .filter_map(|n| self.buf.find(n).map(|i| (i + n.len(), n)))
                .min()
            {
                // Through the end of the tag that matched.
                let end = match needle.ends_with('>') {
                    true => end,
                    false => self.buf[end..].find('>').map_or(end, |j| end + j + 1),
                };
                return Ok(self.buf.drain(..end).collect());
            }
            if Instant::now() > deadline {
                bail!("no {needles:?} from the server within {WAIT:?}");
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 64 * 1024];
        let n = self.io.read(&mut chunk).context("read")?;
        if n == 0 {
            bail!("the server closed the connection");
        }
        self.buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        Ok(())
    }

    /// The `h` of the next `<a/>`.
    fn read_ack(&mut self) -> Result<u64> {
        let text = self.until("<a xmlns='urn:xmpp:sm:3'")?;
        if text.contains("type='error'") {
            bail!("the server refused a message: {text}");
        }
        let at = text.rfind(" h='").context("h in <a/>")? + 4;
        let end = text[at..].find('\'').context("h end")?;
        Ok(text[at..at + end].parse()?)
    }

    /// The next message's id (if it is one of ours) and the stanzas consumed with it.
    fn read_message(&mut self) -> Result<(Option<String>, u64)> {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(start) = self.buf.find("<message") {
                if let Some(j) = self.buf[start..].find("</message>") {
                    let end = start + j + "</message>".len();
                    let text: String = self.buf.drain(..end).collect();
                    let stanzas = 1 + text[..start].matches("<presence").count() as u64;
                    let msg = &text[start..];
                    let id = msg.find(" id='o").map(|i| {
                        let rest = &msg[i + 5..];
                        rest[..rest.find('\'').unwrap_or(0)].to_owned()
                    });
                    return Ok((id, stanzas));
                }
            }
            if Instant::now() > deadline {
                bail!("drain stalled: no message within {WAIT:?}");
            }
            self.fill()?;
        }
    }

    fn close(mut self) {
        let _ = self.write("</stream:stream>");
    }
}
