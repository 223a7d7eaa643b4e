//! Embedded storage of accounts and rosters: one redb database per shard under the data dir,
//! each holding the users whose home is that shard.

use std::path::Path;

use crate::credentials::Credentials;
use crate::roster::RosterItem;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running gateway) holds the database.
    #[error("the data dir {0} is in use by a running gateway; stop it first")]
    InUse(String),
    #[error("storage: {0}")]
    Backend(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
}

/// One shard's store. Keys are bare JIDs' local parts (lowercase, normalised by the caller).
pub struct Store {}

impl Store {
    /// Opens (creating if needed) every shard's database under `data_dir` for `shards` shards.
    /// If the data dir was last used with another shard count, users are moved to their new home
    /// shard first (re-partition on start).
    pub fn open_all(data_dir: &Path, shards: usize) -> Result<Vec<Store>, StoreError> {
        let _ = (data_dir, shards);
        todo!()
    }
    pub fn credentials(&self, user: &str) -> Result<Option<Credentials>, StoreError> {
        let _ = user;
        todo!()
    }
    pub fn add_user(&self, user: &str, credentials: &Credentials) -> Result<(), StoreError> {
        let _ = (user, credentials);
        todo!()
    }
    /// Adds many users in one transaction (for `user bulk-add`); existing ones are overwritten.
    pub fn add_users(&self, users: &[(String, Credentials)]) -> Result<(), StoreError> {
        let _ = users;
        todo!()
    }
    pub fn delete_user(&self, user: &str) -> Result<(), StoreError> {
        let _ = user;
        todo!()
    }
    pub fn users(&self) -> Result<Vec<String>, StoreError> {
        todo!()
    }
    pub fn roster(&self, user: &str) -> Result<Vec<RosterItem>, StoreError> {
        let _ = user;
        todo!()
    }
    /// Writes the user's whole roster (rosters are small and written rarely).
    pub fn set_roster(&self, user: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        let _ = (user, items);
        todo!()
    }
}
