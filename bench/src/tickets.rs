//! `login --resume`: a client session store that keeps every TLS 1.3 ticket a worker's sessions
//! are given, up to a bound, so that each session of the measured phase can resume one. rustls's
//! own in-memory cache keeps at most eight tickets per server name: enough for one client, not
//! for thousands of sessions that all connect to `localhost`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::ServerName;
use rustls::NamedGroup;

/// Tickets kept per worker process at most (beyond it the oldest is dropped): a bound on the
/// store's memory (a ticket and its secrets are a few hundred bytes).
pub const TICKETS_PER_PROCESS_MAX: usize = 200_000;

/// Every TLS 1.3 ticket received (up to `capacity`), each handed out once. A lock taken twice per
/// handshake by the client's driver threads: the client, not the server under test.
#[derive(Debug)]
pub struct TicketPool {
    capacity: usize,
    /// Off during the warm-up: tickets are kept but none handed out, so that every session of
    /// the warm-up does a full handshake and leaves one ticket for the measured phase.
    lending: AtomicBool,
    inner: Mutex<Pool>,
}

#[derive(Debug, Default)]
struct Pool {
    kx_hints: HashMap<ServerName<'static>, NamedGroup>,
    tls12: HashMap<ServerName<'static>, Tls12ClientSessionValue>,
    tickets: HashMap<ServerName<'static>, VecDeque<Tls13ClientSessionValue>>,
    count: usize,
}

impl TicketPool {
    /// A pool holding at most `capacity` tickets (and at most [`TICKETS_PER_PROCESS_MAX`]).
    pub fn new(capacity: usize) -> TicketPool {
        TicketPool {
            capacity: capacity.clamp(1, TICKETS_PER_PROCESS_MAX),
            lending: AtomicBool::new(false),
            inner: Mutex::new(Pool::default()),
        }
    }

    /// From now on, handshakes take the tickets kept (each once).
    pub fn start_lending(&self) {
        self.lending.store(true, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // A panic while holding the lock leaves a consistent pool: every method is one step.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: NamedGroup) {
        self.lock().kx_hints.insert(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<NamedGroup> {
        self.lock().kx_hints.get(server_name).copied()
    }

    fn set_tls12_session(&self, server_name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.lock().tls12.insert(server_name, value);
    }

    fn tls12_session(&self, server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.lock().tls12.get(server_name).cloned()
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.lock().tls12.remove(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: Tls13ClientSessionValue,
    ) {
        let mut pool = self.lock();
        if pool.count >= self.capacity {
            // Full: the oldest ticket of this server goes (one target per run in practice).
            match pool
                .tickets
                .get_mut(&server_name)
                .and_then(|q| q.pop_front())
            {
                Some(_) => pool.count -= 1,
                None => return,
            }
        }
        pool.tickets
            .entry(server_name)
            .or_default()
            .push_back(value);
        pool.count += 1;
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if !self.lending.load(Ordering::SeqCst) {
            return None;
        }
        let mut pool = self.lock();
        let ticket = pool.tickets.get_mut(server_name)?.pop_front()?;
        pool.count -= 1;
        Some(ticket)
    }
}
