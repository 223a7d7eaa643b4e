//! The router's view of storage on one shard: its own database for rosters. A shard writes only
//! its own database; any shard may read credentials from the others (see `conn`).

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use router::roster::RosterItem;
use router::{RosterStore, Store, StoreError};
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
