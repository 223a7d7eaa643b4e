//! Where an idle authenticated session's bytes go outside the I/O driver (issue 4).
//!
//! Goal: a breakdown, by structure, of the user memory each idle session holds in the c2s machine
//! and the router, at the session count `bench idle` uses. Method: a counting global allocator
//! (live bytes, rounded to mimalloc's size classes, and live blocks); one shard's `Router` with
//! in-memory stores; N sessions logged in exactly as `bench idle` does (stream header, SASL
//! PLAIN, restart, bind with a generated resource, `<presence/>`), each through its own `C2s`
//! machine with a `Services` that calls the router like the gateway's driver. Heap is read after
//! each phase; the machines' inline size is `size_of::<C2s>()` (a slab of machines holds that
//! much per slot). Socket, TLS session and driver costs are not here: `scripts/bench-idle.sh`
//! measures the whole server.
//!
//!   cargo run --profile fastrel -p gateway --example session_bytes -- [--sessions N]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use gateway::c2s::{C2s, C2sConfig, Security, Services, SmState, Step};
use router::credentials::Credentials;
use router::{BindError, ConnId, MemoryRosterStore, Router};
use shared::stanza::Stanza;

/// Counts live heap: requested bytes, bytes rounded up to mimalloc's size classes, and blocks.
struct Counting;

static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_CLASS_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIVE_BLOCKS: AtomicUsize = AtomicUsize::new(0);

/// mimalloc's small size classes: multiples of 8 up to 64 bytes, then four classes per power
/// of two (80, 96, 112, 128, 160, ...) up to 128 KiB. What a block costs the gateway, which runs on mimalloc.
/// Past 128 KiB (hash tables of many sessions) mimalloc hands out whole pages.
fn size_class(size: usize) -> usize {
    let size = size.max(1);
    if size > 128 << 10 {
        return size.div_ceil(4096) * 4096;
    }
    if size <= 64 {
        return size.div_ceil(8) * 8;
    }
    let top_bit = usize::BITS - 1 - (size - 1).leading_zeros();
    let step = 1usize << (top_bit - 2);
    size.div_ceil(step) * step
}

fn count(size: usize, sign: isize) {
    let class = size_class(size);
    if sign > 0 {
        LIVE_BYTES.fetch_add(size, Ordering::Relaxed);
        LIVE_CLASS_BYTES.fetch_add(class, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_add(1, Ordering::Relaxed);
    } else {
        LIVE_BYTES.fetch_sub(size, Ordering::Relaxed);
        LIVE_CLASS_BYTES.fetch_sub(class, Ordering::Relaxed);
        LIVE_BLOCKS.fetch_sub(1, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded to `System` with the caller's arguments unchanged; the
// counters have no effect on the memory handed out.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract, which `System` shares.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout.size(), -1);
        // SAFETY: `ptr` came from `System` with this layout (every allocation goes through us).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size(), 1);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout.size(), -1);
        count(new_size, 1);
        // SAFETY: as for `dealloc`; `new_size` is the caller's, checked by its contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy)]
struct Heap {
    bytes: usize,
    class_bytes: usize,
    blocks: usize,
}

fn heap() -> Heap {
    Heap {
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        class_bytes: LIVE_CLASS_BYTES.load(Ordering::Relaxed),
        blocks: LIVE_BLOCKS.load(Ordering::Relaxed),
    }
}

/// The bytes session `i` sends in one login phase.
type Input<'a> = Box<dyn Fn(usize) -> Vec<u8> + 'a>;

const DOMAIN: &str = "localhost";
const PASSWORD: &str = "pw";
/// Low: the figure is about memory, and PLAIN checks the password against these credentials.
const PBKDF2_ITERATIONS: u32 = 16;

/// The router as the gateway's driver presents it to one connection's machine.
struct RouterServices<'a> {
    router: &'a mut Router,
    credentials: &'a Credentials,
    conn: ConnId,
}

impl Services for RouterServices<'_> {
    fn credentials(&mut self, _node: &str) -> Option<Credentials> {
        Some(self.credentials.clone())
    }
    fn bind(&mut self, node: &str, resource: Option<&str>) -> Result<String, BindError> {
        let bound = self.router.bind(node, resource, self.conn);
        drain(self.router);
        bound.map(|b| b.full_jid)
    }
    fn stanza(&mut self, stanza: Stanza) {
        self.router.set_clock(1);
        self.router.handle_stanza(self.conn, stanza);
        drain(self.router);
    }
    fn sm_enabled(&mut self) {
        self.router.handle_sm_enabled(self.conn);
    }
    fn received(&mut self) -> u64 {
        self.router.received(self.conn)
    }
    fn settled(&mut self) -> u64 {
        self.router.settled(self.conn)
    }
    fn acked(&mut self, seqs: &[u64]) {
        self.router.handle_acked(self.conn, seqs);
    }
    fn resume(&mut self, _node: &str, _previd: &str) -> Option<(SmState, String)> {
        None
    }
}

/// Executes nothing: an idle bench session receives nothing the router queues (its own
/// presence reflected), and the driver writes and forgets it.
fn drain(router: &mut Router) {
    router.commit();
    while router.poll_action().is_some() {}
}

fn header() -> String {
    format!(
        "<?xml version='1.0'?><stream:stream to='{DOMAIN}' version='1.0' xmlns='jabber:client' \
         xmlns:stream='http://etherx.jabber.org/streams'>"
    )
}

fn main() -> Result<()> {
    let mut sessions = 19_000usize;
    let mut sm = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--sessions" => {
                sessions = args
                    .next()
                    .context("--sessions takes a number")?
                    .parse()
                    .context("--sessions takes a number")?;
            }
            "--sm" => sm = true,
            other => bail!("unknown argument {other}; usage: session_bytes [--sessions N] [--sm]"),
        }
    }
    let n = sessions.max(1);
    let per = |before: Heap, after: Heap| {
        let d = |a: usize, b: usize| (b as f64 - a as f64) / n as f64;
        (
            d(before.bytes, after.bytes),
            d(before.class_bytes, after.class_bytes),
            d(before.blocks, after.blocks),
        )
    };
    println!("sessions: {n} (one shard, in-memory stores), XEP-0198: {sm}");
    println!(
        "size_of C2s (inline, one slab slot): {} B",
        std::mem::size_of::<C2s>()
    );
    println!(
        "{:<44} {:>10} {:>14} {:>8}",
        "heap held per session, after", "requested", "mimalloc class", "blocks"
    );
    let row = |label: &str, before: Heap, after: Heap| {
        let (b, c, k) = per(before, after);
        println!("{label:<44} {b:>10.1} {c:>14.1} {k:>8.2}");
    };

    // Router alone, driven the way the gateway's driver does after the machine's callbacks.
    {
        let mut router = Router::new(0, 1, DOMAIN.into(), Box::new(MemoryRosterStore::new()));
        let base = heap();
        for i in 0..n {
            let node = format!("user{i}");
            router.bind(&node, None, i as ConnId).ok().context("bind")?;
            drain(&mut router);
        }
        let bound = heap();
        row("router: bind (generated resource)", base, bound);
        for i in 0..n {
            let full = router.full_jid(i as ConnId).context("bound")?.to_owned();
            let presence = router::build::from_bytes(Bytes::from_static(b"<presence/>"))
                .context("presence")?
                .with_from(&full);
            router.set_clock(1);
            router.handle_stanza(i as ConnId, presence);
            drain(&mut router);
        }
        let available = heap();
        row("router: + initial <presence/>", bound, available);
        row("router: total", base, available);
        for i in 0..n {
            router.handle_disconnect(i as ConnId);
            drain(&mut router);
        }
        row("router: left after all disconnect", base, heap());
    }

    // The whole login through the c2s machine.
    let config = Arc::new(C2sConfig {
        domain: DOMAIN.into(),
        starttls_offered: false,
        allow_plaintext: true,
        scram_iterations: PBKDF2_ITERATIONS,
        stanza_bytes_max: shared::limits::STANZA_BYTES_MAX,
        unauthenticated_timeout: Duration::from_secs(60),
        sm_resume_timeout: Duration::from_secs(300),
        random: gateway::c2s::fill_random,
    });
    let credentials = Credentials::derive(PASSWORD, PBKDF2_ITERATIONS);
    let mut router = Router::new(0, 1, DOMAIN.into(), Box::new(MemoryRosterStore::new()));
    let now = Instant::now();
    let mut out = Vec::with_capacity(4096);
    let base = heap();
    let mut machines: Vec<C2s> = Vec::with_capacity(n);
    let slab = heap();
    for _ in 0..n {
        machines.push(C2s::new(config.clone(), Security::Plain, now));
    }
    let created = heap();
    row("c2s: new", slab, created);
    let mut feed = |machines: &mut Vec<C2s>, router: &mut Router, i: usize, bytes: &[u8]| {
        out.clear();
        let mut services = RouterServices {
            router,
            credentials: &credentials,
            conn: i as ConnId,
        };
        machines[i].handle_bytes(bytes, &mut services, &mut out, now)
    };
    let header = header();
    let mut phases: Vec<(&str, Input)> = vec![
        (
            "c2s: + stream header, features",
            Box::new(|_| header.clone().into_bytes()),
        ),
        (
            "c2s: + SASL PLAIN success",
            Box::new(|i| {
                use base64::Engine;
                let payload = format!("\0user{i}\0{PASSWORD}");
                let b64 = base64::engine::general_purpose::STANDARD.encode(payload);
                format!(
                    "<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{b64}</auth>"
                )
                .into_bytes()
            }),
        ),
        (
            "c2s+router: + restart, bind",
            Box::new(|_| {
                format!(
                    "{header}<iq type='set' id='bind_1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>"
                )
                .into_bytes()
            }),
        ),
        (
            "c2s+router: + <presence/>",
            Box::new(|_| b"<presence/>".to_vec()),
        ),
    ];
    if sm {
        phases.push((
            "c2s+router: + XEP-0198 enable (resume)",
            Box::new(|_| b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>".to_vec()),
        ));
    }
    let mut before = created;
    for (label, bytes) in &phases {
        for i in 0..n {
            let step = feed(&mut machines, &mut router, i, &bytes(i));
            if step == Step::Close {
                bail!(
                    "session {i} closed at '{label}': {}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
        let after = heap();
        row(label, before, after);
        before = after;
    }
    if let Some(i) = (0..n).find(|&i| !machines[i].is_established()) {
        bail!("session {i} is not established");
    }
    let held = heap();
    row("total: c2s heap + router", slab, held);
    // Drops the machines in place: the slab's allocation stays, so what goes is their heap.
    machines.clear();
    let dropped = heap();
    row("  of which the c2s machines' heap", dropped, held);
    row("  of which the router", slab, dropped);
    println!(
        "idle session outside the driver: {} B inline + {:.0} B heap (mimalloc classes)",
        std::mem::size_of::<C2s>(),
        per(slab, held).1
    );
    drop(machines);
    row("left after all machines dropped", base, heap());
    Ok(())
}
