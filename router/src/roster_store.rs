//! The storage the router needs for rosters, as a trait so the router can be tested (and driven
//! by other crates' tests) with an in-memory store.

use std::cell::RefCell;
use std::collections::HashMap;

use crate::roster::RosterItem;
use crate::store::{Store, StoreError};

/// Roster persistence for one shard. Keys are users' local parts (normalised, lowercase).
pub trait RosterStore {
    /// The user's whole roster (empty if none stored).
    fn roster(&self, node: &str) -> Result<Vec<RosterItem>, StoreError>;
    /// Replaces the user's whole roster.
    fn set_roster(&self, node: &str, items: &[RosterItem]) -> Result<(), StoreError>;
}

impl RosterStore for Store {
    fn roster(&self, node: &str) -> Result<Vec<RosterItem>, StoreError> {
        Store::roster(self, node)
    }
    fn set_roster(&self, node: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        Store::set_roster(self, node, items)
    }
}

/// An in-memory `RosterStore` for tests.
#[derive(Debug, Default)]
pub struct MemoryRosterStore {
    rosters: RefCell<HashMap<String, Vec<RosterItem>>>,
    writes: RefCell<usize>,
}

impl MemoryRosterStore {
    pub fn new() -> MemoryRosterStore {
        MemoryRosterStore::default()
    }
    /// How many `set_roster` calls were made.
    pub fn writes(&self) -> usize {
        *self.writes.borrow()
    }
}

impl RosterStore for MemoryRosterStore {
    fn roster(&self, node: &str) -> Result<Vec<RosterItem>, StoreError> {
        Ok(self.rosters.borrow().get(node).cloned().unwrap_or_default())
    }
    fn set_roster(&self, node: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        *self.writes.borrow_mut() += 1;
        self.rosters
            .borrow_mut()
            .insert(node.to_string(), items.to_vec());
        Ok(())
    }
}

/// Lets a test keep a handle on the store it gave the router (`Box::new(Rc::clone(&store))`).
impl<T: RosterStore + ?Sized> RosterStore for std::rc::Rc<T> {
    fn roster(&self, node: &str) -> Result<Vec<RosterItem>, StoreError> {
        (**self).roster(node)
    }
    fn set_roster(&self, node: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        (**self).set_roster(node, items)
    }
}
