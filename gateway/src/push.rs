//! The push hook: when a message is stored for a user with no session, POST
//! `{"user":"node@domain","count":N}` to a configured URL, so a relay can wake the user's devices.
//! Never the message itself. Off the hot path: the router only queues a notification; one task
//! per shard sends them, one at a time, with a deadline per request and retries with backoff.
//! The queue is bounded and coalesces per user (the latest count wins); past the bound new
//! notifications are dropped and counted (the messages are stored regardless).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;
use hashbrown::HashMap;
use shared::limits::{PUSH_ATTEMPTS_MAX, PUSH_REQUEST_TIMEOUT_MS, PUSH_RETRY_BASE_MS};

/// Largest response head read from the push endpoint.
const RESPONSE_HEAD_BYTES_MAX: usize = 4 * 1024;

/// One shard's push hook.
pub struct Pusher {
    addr: SocketAddr,
    authority: String,
    path: String,
    domain: String,
    queue_max: usize,
    /// Users with a notification waiting, oldest first, and the count to send for each.
    queue: RefCell<VecDeque<String>>,
    counts: RefCell<HashMap<String, usize>>,
    waker: Cell<Option<Waker>>,
    pub stats: Cell<PushStats>,
}

/// Counters of one shard's push hook.
#[derive(Debug, Default, Clone, Copy)]
pub struct PushStats {
    pub sent: u64,
    pub failed_attempts: u64,
    /// Dropped after `PUSH_ATTEMPTS_MAX` failures.
    pub dropped_failed: u64,
    /// Dropped because the queue was full.
    pub dropped_full: u64,
}

impl Pusher {
    pub fn new(
        addr: SocketAddr,
        authority: String,
        path: String,
        domain: String,
        queue_max: usize,
    ) -> Pusher {
        Pusher {
            addr,
            authority,
            path,
            domain,
            queue_max,
            queue: RefCell::new(VecDeque::new()),
            counts: RefCell::new(HashMap::new()),
            waker: Cell::new(None),
            stats: Cell::new(PushStats::default()),
        }
    }

    /// Queues a notification for `node` (coalesced with one already waiting).
    pub fn enqueue(&self, node: &str, count: usize) {
        let mut counts = self.counts.borrow_mut();
        if let Some(c) = counts.get_mut(node) {
            *c = count;
            return;
        }
        if counts.len() >= self.queue_max {
            self.bump(|s| s.dropped_full += 1);
            tracing::debug!(node, "push queue full; notification dropped");
            return;
        }
        counts.insert(node.to_owned(), count);
        self.queue.borrow_mut().push_back(node.to_owned());
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    fn bump(&self, f: impl FnOnce(&mut PushStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// The next notification, waiting for one.
    async fn next(&self) -> (String, usize) {
        std::future::poll_fn(|cx| {
            let node = self.queue.borrow_mut().pop_front();
            match node {
                Some(node) => {
                    let count = self.counts.borrow_mut().remove(&node).unwrap_or(1);
                    Poll::Ready((node, count))
                }
                None => {
                    self.waker.set(Some(cx.waker().clone()));
                    Poll::Pending
                }
            }
        })
        .await
    }

    /// Sends notifications until the task is cancelled (when the shard stops).
    pub async fn run(self: Rc<Self>) {
        // Unbounded by design: the hook's event loop; each turn waits for a notification.
        loop {
            let (node, count) = self.next().await;
            let body = format!(
                "{{\"user\":\"{}\",\"count\":{count}}}",
                json_escape(&format!("{node}@{}", self.domain))
            );
            for attempt in 0..PUSH_ATTEMPTS_MAX {
                match self.post(&body).await {
                    Ok(()) => {
                        self.bump(|s| s.sent += 1);
                        break;
                    }
                    Err(e) => {
                        self.bump(|s| s.failed_attempts += 1);
                        if attempt + 1 == PUSH_ATTEMPTS_MAX {
                            self.bump(|s| s.dropped_failed += 1);
                            tracing::warn!(node, error = %e, "push hook failed; notification dropped");
                            break;
                        }
                        let delay = PUSH_RETRY_BASE_MS << attempt;
                        tracing::debug!(node, error = %e, delay, "push hook failed; retrying");
                        glommio::timer::sleep(Duration::from_millis(delay)).await;
                    }
                }
            }
        }
    }

    async fn post(&self, body: &str) -> Result<(), String> {
        let request = async {
            let mut stream = TcpStream::connect(self.addr)
                .await
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            let head = format!(
                "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\nConnection: close\r\n\r\n",
                self.path,
                self.authority,
                body.len()
            );
            stream
                .write_all(head.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            stream
                .write_all(body.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut response = Vec::new();
            let mut chunk = [0u8; 512];
            // Bounded by RESPONSE_HEAD_BYTES_MAX and the deadline.
            while !response.windows(2).any(|w| w == b"\r\n") {
                let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 || response.len() > RESPONSE_HEAD_BYTES_MAX {
                    break;
                }
                response.extend_from_slice(&chunk[..n]);
            }
            let line = String::from_utf8_lossy(&response);
            let status = line.split_whitespace().nth(1).unwrap_or_default();
            if status.starts_with('2') && status.len() == 3 {
                Ok(())
            } else {
                Err(format!(
                    "answered {:?}",
                    line.lines().next().unwrap_or_default()
                ))
            }
        };
        let deadline = async {
            glommio::timer::sleep(Duration::from_millis(PUSH_REQUEST_TIMEOUT_MS)).await;
            Err(format!("no answer within {PUSH_REQUEST_TIMEOUT_MS} ms"))
        };
        futures_lite::future::or(request, deadline).await
    }
}

fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}
