//! The router's view of storage on one shard: its own database for rosters and offline queues.
//! A shard writes only its own database; any shard may read credentials from the others (see
//! `conn`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use hdrhistogram::Histogram;
use router::offline::{Batch, Stored, Usage};
use router::roster::RosterItem;
use router::store::Durability;
use router::{OfflineStore, RosterStore, Store, StoreError};
use shared::stats::LatencyHistogram;

pub struct ShardStore {
    stores: Arc<Vec<Store>>,
    shard: usize,
    /// Write latency, shared with the shard's statistics.
    write_latency: Rc<RefCell<LatencyHistogram>>,
}

impl ShardStore {
    pub fn new(
        stores: Arc<Vec<Store>>,
        shard: usize,
        write_latency: Rc<RefCell<LatencyHistogram>>,
    ) -> ShardStore {
        assert!(shard < stores.len());
        ShardStore {
            stores,
            shard,
            write_latency,
        }
    }
}

impl RosterStore for ShardStore {
    fn roster(&self, node: &str) -> Result<Vec<RosterItem>, StoreError> {
        self.stores[self.shard].roster(node)
    }
    fn set_roster(&self, node: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        let started = Instant::now();
        let result = self.stores[self.shard].set_roster(node, items);
        self.write_latency.borrow_mut().record_since(started);
        result
    }
}

/// Offline queues of one shard in its database, with the commit latency and batch size of each
/// group commit recorded.
pub struct ShardOffline {
    stores: Arc<Vec<Store>>,
    shard: usize,
    durability: Durability,
    pub stats: Rc<RefCell<CommitStats>>,
    /// Write latency, shared with the shard's statistics (with the roster writes).
    write_latency: Rc<RefCell<LatencyHistogram>>,
}

/// Group-commit measurements of one shard.
pub struct CommitStats {
    /// Microseconds per commit (write + fsync in the durable mode).
    pub latency_us: Histogram<u64>,
    /// Writes (inserts + erasures) per commit.
    pub batch_writes: Histogram<u64>,
}

impl Default for CommitStats {
    fn default() -> Self {
        CommitStats {
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid bounds"),
            batch_writes: Histogram::new_with_bounds(1, 1_000_000, 2).expect("valid bounds"),
        }
    }
}

impl CommitStats {
    /// One line for the log: commits, mean and p99 batch, p50/p99/max latency.
    pub fn summary(&self) -> String {
        let (l, b) = (&self.latency_us, &self.batch_writes);
        format!(
            "commits {} writes/commit mean {:.1} p99 {} latency_us p50 {} p99 {} max {}",
            l.len(),
            b.mean(),
            b.value_at_quantile(0.99),
            l.value_at_quantile(0.5),
            l.value_at_quantile(0.99),
            l.max()
        )
    }
}

impl ShardOffline {
    pub fn new(
        stores: Arc<Vec<Store>>,
        shard: usize,
        durability: Durability,
        write_latency: Rc<RefCell<LatencyHistogram>>,
    ) -> ShardOffline {
        assert!(shard < stores.len());
        ShardOffline {
            stores,
            shard,
            durability,
            stats: Rc::new(RefCell::new(CommitStats::default())),
            write_latency,
        }
    }
}

impl ShardOffline {
    /// What the shard's commit task needs to run commits on the executor's blocking thread.
    pub fn committer(&self) -> Committer {
        Committer {
            stores: self.stores.clone(),
            shard: self.shard,
            durability: self.durability,
            stats: self.stats.clone(),
            write_latency: self.write_latency.clone(),
            test_delay: commit_test_delay(),
        }
    }
}

/// Tests only: `GATEWAY_TEST_COMMIT_DELAY_MS` makes every commit run on the blocking thread
/// take at least that long, as on a stalling disk (`gateway/tests/rosters.rs`). Not a
/// configuration key: nothing but a test has a reason to slow commits down.
const COMMIT_TEST_DELAY_ENV: &str = "GATEWAY_TEST_COMMIT_DELAY_MS";

fn commit_test_delay() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var(COMMIT_TEST_DELAY_ENV).ok()?.parse().ok()?;
    tracing::warn!(
        ms,
        "{COMMIT_TEST_DELAY_ENV} is set: every commit is delayed (tests only)"
    );
    Some(std::time::Duration::from_millis(ms))
}

/// Runs one shard's offline commits off the reactor (glommio's blocking thread), so the shard
/// keeps routing during the fsync and the next batch fills meanwhile.
#[derive(Clone)]
pub struct Committer {
    stores: Arc<Vec<Store>>,
    shard: usize,
    durability: Durability,
    stats: Rc<RefCell<CommitStats>>,
    write_latency: Rc<RefCell<LatencyHistogram>>,
    test_delay: Option<std::time::Duration>,
}

impl Committer {
    /// Commits `ticket.batch` and `ticket.rosters` in one transaction and puts the store's
    /// answer in `ticket.result`.
    pub async fn run(&self, ticket: &mut router::CommitTicket) {
        let batch = std::mem::take(&mut ticket.batch);
        let rosters = std::mem::take(&mut ticket.rosters);
        let (stores, shard, durability) = (self.stores.clone(), self.shard, self.durability);
        let delay = self.test_delay;
        let (batch, rosters, result, micros) = glommio::executor()
            .spawn_blocking(move || {
                let started = Instant::now();
                if let Some(delay) = delay {
                    std::thread::sleep(delay);
                }
                let result = stores[shard].commit(&batch, &rosters, durability);
                (batch, rosters, result, started.elapsed().as_micros() as u64)
            })
            .await;
        self.write_latency
            .borrow_mut()
            .record(std::time::Duration::from_micros(micros));
        let mut stats = self.stats.borrow_mut();
        let _ = stats.latency_us.record(micros.max(1));
        let _ = stats
            .batch_writes
            .record((batch.len() + rosters.len()).max(1) as u64);
        ticket.batch = batch;
        ticket.rosters = rosters;
        ticket.result = Some(result);
    }
}

impl OfflineStore for ShardOffline {
    fn usage(&self, user: &str) -> Result<Usage, StoreError> {
        self.stores[self.shard].offline_usage(user)
    }
    fn totals(&self) -> Result<(u64, u64), StoreError> {
        self.stores[self.shard].offline_totals()
    }
    fn load(&self, user: &str, from: u64, limit: usize) -> Result<Vec<Stored>, StoreError> {
        self.stores[self.shard].offline_load(user, from, limit)
    }
    fn commit(&self, batch: &Batch) -> Result<Vec<(String, usize)>, StoreError> {
        // On the reactor: the shard waits for its fsync. One commit per turn bounds how often.
        let started = Instant::now();
        let result = self.stores[self.shard].offline_commit(batch, self.durability);
        self.write_latency.borrow_mut().record_since(started);
        let mut stats = self.stats.borrow_mut();
        let _ = stats
            .latency_us
            .record(started.elapsed().as_micros().max(1) as u64);
        let _ = stats.batch_writes.record(batch.len().max(1) as u64);
        result
    }
}
