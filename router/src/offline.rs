//! Offline queues (XEP-0160): messages kept on the recipient's home shard until a session of the
//! recipient has them, in the order received, each under a per-user sequence number.
//!
//! The router writes through `OfflineStore` in batches: everything one turn of the shard's event
//! loop stores or erases goes into one `Batch`, committed in one transaction (one fsync in the
//! durable mode: group commit). A message counts as handled for its sender only once the batch
//! that stored it is committed.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;

use crate::store::StoreError;

/// One stored message: its per-user sequence number, when it was stored (Unix milliseconds) and
/// the stanza's bytes as routed (with `from` stamped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub seq: u64,
    pub stored_unix_ms: u64,
    pub bytes: Bytes,
}

/// Writes collected during one turn, committed together.
#[derive(Debug, Default)]
pub struct Batch {
    /// (user, message) to insert.
    pub puts: Vec<(String, Stored)>,
    /// (user, seq) to erase.
    pub deletes: Vec<(String, u64)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
    pub fn len(&self) -> usize {
        self.puts.len() + self.deletes.len()
    }
}

/// What one user's queue holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: usize,
    pub bytes: usize,
    /// The sequence number the next stored message gets (one past the highest stored).
    pub next_seq: u64,
}

/// How much a user's queue may hold and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OfflineLimits {
    pub messages_max: usize,
    pub bytes_max: usize,
    /// Messages older than this are purged (and counted) instead of delivered.
    pub age_max: Duration,
}

impl Default for OfflineLimits {
    fn default() -> Self {
        OfflineLimits {
            messages_max: shared::limits::OFFLINE_MESSAGES_MAX_DEFAULT,
            bytes_max: shared::limits::OFFLINE_BYTES_MAX_DEFAULT,
            age_max: Duration::from_secs(shared::limits::OFFLINE_AGE_DAYS_MAX_DEFAULT * 86_400),
        }
    }
}

/// Storage of offline queues for one shard. Keys are users' local parts (normalised).
pub trait OfflineStore {
    /// What `user`'s queue holds now (committed writes only).
    fn usage(&self, user: &str) -> Result<Usage, StoreError>;
    /// Messages and bytes held in all queues (committed writes only); may scan everything, so
    /// it is called once, when the store is set.
    fn totals(&self) -> Result<(u64, u64), StoreError>;
    /// Up to `limit` messages of `user` with `seq >= from`, oldest first.
    fn load(&self, user: &str, from: u64, limit: usize) -> Result<Vec<Stored>, StoreError>;
    /// Applies a batch in one transaction; returns, per erased message, (user, its byte length)
    /// (erasing a message that is not there is not an error and is not returned).
    fn commit(&self, batch: &Batch) -> Result<Vec<(String, usize)>, StoreError>;
}

/// An in-memory `OfflineStore` for tests (and the router's default until one is set).
#[derive(Debug, Default)]
pub struct MemoryOfflineStore {
    queues: RefCell<BTreeMap<(String, u64), Stored>>,
    commits: RefCell<usize>,
    fail: RefCell<bool>,
}

impl MemoryOfflineStore {
    pub fn new() -> MemoryOfflineStore {
        MemoryOfflineStore::default()
    }
    /// How many batches were committed.
    pub fn commits(&self) -> usize {
        *self.commits.borrow()
    }
    /// Messages stored for `user`, oldest first.
    pub fn messages(&self, user: &str) -> Vec<Stored> {
        self.load(user, 0, usize::MAX).unwrap_or_default()
    }
    /// Makes every later commit fail (a full or broken disk).
    pub fn set_failing(&self, fail: bool) {
        *self.fail.borrow_mut() = fail;
    }
}

impl OfflineStore for MemoryOfflineStore {
    fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        let queues = self.queues.borrow();
        let mut usage = Usage::default();
        for ((_, seq), m) in queues.range((user.to_owned(), 0)..=(user.to_owned(), u64::MAX)) {
            usage.messages += 1;
            usage.bytes += m.bytes.len();
            usage.next_seq = seq + 1;
        }
        Ok(usage)
    }
    fn totals(&self) -> Result<(u64, u64), StoreError> {
        let queues = self.queues.borrow();
        let bytes = queues.values().map(|m| m.bytes.len() as u64).sum();
        Ok((queues.len() as u64, bytes))
    }
    fn load(&self, user: &str, from: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let queues = self.queues.borrow();
        Ok(queues
            .range((user.to_owned(), from)..=(user.to_owned(), u64::MAX))
            .take(limit)
            .map(|(_, m)| m.clone())
            .collect())
    }
    fn commit(&self, batch: &Batch) -> Result<Vec<(String, usize)>, StoreError> {
        if *self.fail.borrow() {
            return Err(StoreError::Backend("the test store is set to fail".into()));
        }
        *self.commits.borrow_mut() += 1;
        let mut queues = self.queues.borrow_mut();
        for (user, m) in &batch.puts {
            queues.insert((user.clone(), m.seq), m.clone());
        }
        let mut erased = Vec::new();
        for (user, seq) in &batch.deletes {
            if let Some(m) = queues.remove(&(user.clone(), *seq)) {
                erased.push((user.clone(), m.bytes.len()));
            }
        }
        Ok(erased)
    }
}

/// Lets a test keep a handle on the store it gave the router.
impl<T: OfflineStore + ?Sized> OfflineStore for std::rc::Rc<T> {
    fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        (**self).usage(user)
    }
    fn totals(&self) -> Result<(u64, u64), StoreError> {
        (**self).totals()
    }
    fn load(&self, user: &str, from: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        (**self).load(user, from, limit)
    }
    fn commit(&self, batch: &Batch) -> Result<Vec<(String, usize)>, StoreError> {
        (**self).commit(batch)
    }
}

/// XEP-0203 `<delay/>` for a message stored at `stored_unix_ms` by `domain`, inserted before the
/// closing tag of `bytes` (a `<message>` element). A self-closing `<message/>` is opened up.
pub fn with_delay(bytes: &[u8], domain: &str, stored_unix_ms: u64) -> Option<Bytes> {
    let text = std::str::from_utf8(bytes).ok()?;
    let delay = format!(
        "<delay xmlns='urn:xmpp:delay' from='{}' stamp='{}'/>",
        crate::build::esc(domain),
        stamp(stored_unix_ms)
    );
    let trimmed = text.trim_end();
    let out = if let Some(head) = trimmed.strip_suffix("/>") {
        if head.contains('>') {
            // `/>` closes a child, not the message: not a message element we understand.
            return None;
        }
        format!("{head}>{delay}</message>")
    } else {
        let at = trimmed.rfind("</")?;
        format!("{}{delay}{}", &trimmed[..at], &trimmed[at..])
    };
    Some(Bytes::from(out))
}

/// XEP-0082 date-time in UTC with milliseconds, e.g. `2026-11-26T17:01:52.123Z`.
pub fn stamp(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_xep_0082() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.789.
        assert_eq!(stamp(951_827_696_789), "2000-02-29T12:34:56.789Z");
        assert_eq!(stamp(1_795_712_512_000), "2026-11-26T17:01:52.000Z");
    }

    #[test]
    fn delay_goes_before_the_closing_tag() {
        let out = with_delay(b"<message to='a@x'><body>hi</body></message>", "x", 0).unwrap();
        assert_eq!(
            &out[..],
            &b"<message to='a@x'><body>hi</body><delay xmlns='urn:xmpp:delay' from='x' stamp='1970-01-01T00:00:00.000Z'/></message>"[..]
        );
        let out = with_delay(b"<message to='a@x'/>", "x", 0).unwrap();
        assert!(out.starts_with(b"<message to='a@x'><delay"), "{out:?}");
        assert!(out.ends_with(b"/></message>"));
    }

    #[test]
    fn memory_store_keeps_order_and_usage() {
        let s = MemoryOfflineStore::new();
        let m = |seq: u64, body: &str| Stored {
            seq,
            stored_unix_ms: 1,
            bytes: Bytes::from(body.to_owned()),
        };
        let mut b = Batch::default();
        b.puts.push(("bob".into(), m(0, "aa")));
        b.puts.push(("bob".into(), m(1, "bbb")));
        b.puts.push(("carol".into(), m(0, "c")));
        s.commit(&b).unwrap();
        assert_eq!(
            s.usage("bob").unwrap(),
            Usage {
                messages: 2,
                bytes: 5,
                next_seq: 2
            }
        );
        assert_eq!(s.load("bob", 1, 10).unwrap(), vec![m(1, "bbb")]);
        let erased = s
            .commit(&Batch {
                puts: vec![],
                deletes: vec![("bob".into(), 0), ("bob".into(), 7)],
            })
            .unwrap();
        assert_eq!(erased, vec![("bob".to_owned(), 2)]);
        assert_eq!(s.messages("bob"), vec![m(1, "bbb")]);
    }
}
