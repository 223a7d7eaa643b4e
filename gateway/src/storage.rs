//! The router's view of storage on one shard: its own database for rosters. A shard writes only
//! its own database; any shard may read credentials from the others (see `conn`).

use std::sync::Arc;

use router::roster::RosterItem;
use router::{RosterStore, Store, StoreError};

pub struct ShardStore {
    stores: Arc<Vec<Store>>,
    shard: usize,
}

impl ShardStore {
    pub fn new(stores: Arc<Vec<Store>>, shard: usize) -> ShardStore {
        assert!(shard < stores.len());
        ShardStore { stores, shard }
    }
}

impl RosterStore for ShardStore {
    fn roster(&self, node: &str) -> Result<Vec<RosterItem>, StoreError> {
        self.stores[self.shard].roster(node)
    }
    fn set_roster(&self, node: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        self.stores[self.shard].set_roster(node, items)
    }
}
