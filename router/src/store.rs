//! Embedded storage of accounts and rosters: one redb database per shard under the data dir,
//! each holding the users whose home is that shard.
//!
//! Layout under the data dir:
//!
//! ```text
//! store.lock             a tiny redb database held open (so exclusively locked) by the process
//!                        using the store; a second process gets `StoreError::InUse`
//! store/manifest         text: `shards = N` and `domain = D`
//! store/shard-<i>.redb   one database per shard, tables `accounts`, `rosters` and `offline`
//! ```
//!
//! A user `node` lives in shard `home_shard("node@domain", N)`, the same function routing uses.
//! When the data dir was last used with another shard count (or another domain), `open_all`
//! re-partitions: it builds a complete new `store.tmp/` (databases committed durably, manifest
//! written last and fsynced), then swaps directories (`store` → `store.old`, `store.tmp` →
//! `store`) and removes `store.old`. A crash at any point leaves either the old or the new
//! complete store, and the next `open_all` finishes or discards the interrupted swap.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use redb::{Database, ReadableTable, TableDefinition};
use shared::limits::DEVICE_KEYS_PER_ACCOUNT_MAX;
use shared::shard::home_shard;

use crate::credentials::Credentials;
use crate::offline::{Batch, Stored, Usage};
use crate::roster::RosterItem;

/// Local part → `Credentials::to_bytes`.
const ACCOUNTS: TableDefinition<&str, &[u8]> = TableDefinition::new("accounts");
/// Local part → JSON of `Vec<RosterItem>`.
const ROSTERS: TableDefinition<&str, &[u8]> = TableDefinition::new("rosters");
/// (local part, sequence number) → stored time (Unix ms, 8 bytes little-endian) + stanza bytes:
/// the user's offline queue, in order.
const OFFLINE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("offline");

const STORE_DIR: &str = "store";
const TMP_DIR: &str = "store.tmp";
const OLD_DIR: &str = "store.old";
const LOCK_FILE: &str = "store.lock";
const MANIFEST: &str = "manifest";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process (a running gateway) holds the database.
    #[error("the data dir {0} is in use by a running gateway; stop it first")]
    InUse(String),
    #[error("storage failed: {0}; check the disk and the data dir's permissions")]
    Backend(String),
    #[error("user {0} already exists")]
    UserExists(String),
    #[error("no such user: {0}")]
    NoSuchUser(String),
    #[error("{0} already has the most device keys an account may hold ({1})")]
    TooManyDeviceKeys(String, usize),
    /// What is on disk does not make sense (damaged file, missing shard, bad manifest).
    #[error("the store is damaged: {0}; restore the data dir from a backup")]
    Corrupt(String),
    /// `open_all` was asked for 0 shards.
    #[error("the shard count must be at least 1; fix the configuration")]
    NoShards,
}

macro_rules! backend_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> StoreError {
                StoreError::Backend(e.to_string())
            }
        }
    )*};
}
backend_from!(
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// An I/O error with what was being done and where.
fn io_err(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Backend(format!("{what} {}: {e}", path.display()))
}

/// The shard holding user `node` of `domain` among `shards`: `home_shard("node@domain")`, the
/// same partition routing uses.
///
/// # Panics
/// If `shards` is 0.
pub fn home_shard_of(node: &str, domain: &str, shards: usize) -> usize {
    home_shard(&format!("{node}@{domain}"), shards)
}

/// One shard's store. Keys are bare JIDs' local parts (lowercase, normalised by the caller).
///
/// `Send + Sync`: share the result of `open_all` as `Arc<[Store]>` across shard threads.
pub struct Store {
    db: Database,
    shard: usize,
    /// The data dir's lock, shared by all shards' stores; released when the last is dropped.
    _lock: Arc<Database>,
}

impl Store {
    /// Opens (creating if needed) every shard's database under `data_dir` for `shards` shards.
    /// If the data dir was last used with another shard count, users are moved to their new home
    /// shard first (re-partition on start).
    ///
    /// Users are partitioned by `home_shard("node@domain", shards)`, so `domain` must be the
    /// server's domain as routing sees it; a change of domain also re-partitions. Element `i` of
    /// the result is shard `i`'s store. Fails with `InUse` while another process (or another
    /// `open_all` in this process) holds the data dir.
    pub fn open_all(
        data_dir: &Path,
        shards: usize,
        domain: &str,
    ) -> Result<Vec<Store>, StoreError> {
        Self::open_all_with_cache(
            data_dir,
            shards,
            domain,
            shared::limits::STORE_CACHE_BYTES_DEFAULT,
        )
    }

    /// `open_all` with each shard's database caching at most `cache_bytes` of its pages in
    /// memory (config key `store_cache_bytes`); what is not cached is read again from the file
    /// (the OS page cache) when needed.
    pub fn open_all_with_cache(
        data_dir: &Path,
        shards: usize,
        domain: &str,
        cache_bytes: usize,
    ) -> Result<Vec<Store>, StoreError> {
        if shards == 0 {
            return Err(StoreError::NoShards);
        }
        fs::create_dir_all(data_dir).map_err(|e| io_err("creating", data_dir, e))?;
        let lock = Arc::new(open_db(
            &data_dir.join(LOCK_FILE),
            data_dir,
            true,
            SMALL_CACHE_BYTES,
        )?);
        recover(data_dir)?;

        let store_dir = data_dir.join(STORE_DIR);
        match read_manifest(&store_dir)? {
            Some(m) if m.shards == shards && m.domain.as_deref().is_none_or(|d| d == domain) => {}
            Some(m) => {
                tracing::info!(
                    from_shards = m.shards,
                    to_shards = shards,
                    domain,
                    "re-partitioning the store"
                );
                repartition(data_dir, m.shards, shards, domain)?;
            }
            None => {
                if store_dir.exists() {
                    // Only ever created by renaming a complete store.tmp, which has a manifest.
                    let empty = fs::read_dir(&store_dir)
                        .map_err(|e| io_err("reading", &store_dir, e))?
                        .next()
                        .is_none();
                    if !empty {
                        return Err(StoreError::Corrupt(format!(
                            "{} has no manifest",
                            store_dir.display()
                        )));
                    }
                    fs::remove_dir(&store_dir).map_err(|e| io_err("removing", &store_dir, e))?;
                }
                repartition(data_dir, 0, shards, domain)?;
            }
        }

        (0..shards)
            .map(|shard| {
                let path = shard_path(&store_dir, shard);
                if !path.exists() {
                    return Err(StoreError::Corrupt(format!(
                        "{} is missing",
                        path.display()
                    )));
                }
                let db = open_db(&path, data_dir, false, cache_bytes)?;
                ensure_tables(&db)?;
                Ok(Store {
                    db,
                    shard,
                    _lock: Arc::clone(&lock),
                })
            })
            .collect()
    }

    /// The shard count the data dir was last used with, from its manifest; `None` when it has no
    /// store yet. Reads only; takes no lock.
    pub fn shards_on_disk(data_dir: &Path) -> Result<Option<usize>, StoreError> {
        let store_dir = data_dir.join(STORE_DIR);
        if store_dir.exists() {
            return Ok(read_manifest(&store_dir)?.map(|m| m.shards));
        }
        // An interrupted swap: the complete store.tmp is what the next open_all will use.
        Ok(read_manifest(&data_dir.join(TMP_DIR))?.map(|m| m.shards))
    }

    /// This store's shard index.
    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn credentials(&self, user: &str) -> Result<Option<Credentials>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ACCOUNTS)?;
        let Some(value) = table.get(user)? else {
            return Ok(None);
        };
        Credentials::from_bytes(value.value())
            .map(Some)
            .ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "the credentials of {user} in shard {} cannot be decoded",
                    self.shard
                ))
            })
    }

    pub fn add_user(&self, user: &str, credentials: &Credentials) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ACCOUNTS)?;
            if table.get(user)?.is_some() {
                drop(table);
                txn.abort()?;
                return Err(StoreError::UserExists(user.to_owned()));
            }
            table.insert(user, credentials.to_bytes().as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Adds many users in one transaction (for `user bulk-add`); existing ones are overwritten.
    pub fn add_users(&self, users: &[(String, Credentials)]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ACCOUNTS)?;
            for (user, credentials) in users {
                table.insert(user.as_str(), credentials.to_bytes().as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Deletes the account and its roster.
    /// Stores `hash` (see `credentials::device_key_hash`) as a new device key of `user`; returns
    /// how many device keys the account now holds.
    pub fn add_device_key(&self, user: &str, hash: [u8; 32]) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let count = {
            let mut table = txn.open_table(ACCOUNTS)?;
            let stored = table
                .get(user)?
                .map(|value| Credentials::from_bytes(value.value()));
            let Some(current) = stored else {
                drop(table);
                txn.abort()?;
                return Err(StoreError::NoSuchUser(user.to_owned()));
            };
            let Some(mut creds) = current else {
                return Err(StoreError::Corrupt(format!(
                    "the credentials of {user} in shard {} cannot be decoded",
                    self.shard
                )));
            };
            if creds.device_keys.len() >= DEVICE_KEYS_PER_ACCOUNT_MAX {
                drop(table);
                txn.abort()?;
                return Err(StoreError::TooManyDeviceKeys(
                    user.to_owned(),
                    DEVICE_KEYS_PER_ACCOUNT_MAX,
                ));
            }
            creds.device_keys.push(hash);
            table.insert(user, creds.to_bytes().as_slice())?;
            creds.device_keys.len()
        };
        txn.commit()?;
        Ok(count)
    }

    pub fn delete_user(&self, user: &str) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut accounts = txn.open_table(ACCOUNTS)?;
            if accounts.remove(user)?.is_none() {
                drop(accounts);
                txn.abort()?;
                return Err(StoreError::NoSuchUser(user.to_owned()));
            }
            let mut rosters = txn.open_table(ROSTERS)?;
            rosters.remove(user)?;
        }
        txn.commit()?;
        Ok(())
    }

    /// The local parts of this shard's users, sorted (bytewise).
    pub fn users(&self) -> Result<Vec<String>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ACCOUNTS)?;
        table
            .iter()?
            .map(|entry| Ok(entry?.0.value().to_owned()))
            .collect()
    }

    /// The user's roster; empty when none was ever written.
    pub fn roster(&self, user: &str) -> Result<Vec<RosterItem>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(ROSTERS)?;
        let Some(value) = table.get(user)? else {
            return Ok(Vec::new());
        };
        serde_json::from_slice(value.value()).map_err(|e| {
            StoreError::Corrupt(format!(
                "the roster of {user} in shard {} cannot be decoded: {e}",
                self.shard
            ))
        })
    }

    /// Writes the user's whole roster (rosters are small and written rarely).
    pub fn set_roster(&self, user: &str, items: &[RosterItem]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(ROSTERS)?;
            put_roster(&mut table, user, items)?;
        }
        txn.commit()?;
        Ok(())
    }
}

/// Writes `user`'s whole roster into the open rosters table (an empty roster: no entry).
fn put_roster(
    table: &mut redb::Table<&str, &[u8]>,
    user: &str,
    items: &[RosterItem],
) -> Result<(), StoreError> {
    if items.is_empty() {
        table.remove(user)?;
    } else {
        let json = serde_json::to_vec(items)
            .map_err(|e| StoreError::Backend(format!("encoding the roster of {user}: {e}")))?;
        table.insert(user, json.as_slice())?;
    }
    Ok(())
}

/// Whether a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Written and fsynced before the commit returns (the default).
    Durable,
    /// Written without fsync: a crash of the host may lose it (benchmarks only).
    Memory,
}

impl Store {
    /// Messages and bytes held in all offline queues of this shard: a scan of the whole table,
    /// for the statistics' starting point (once per start).
    pub fn offline_totals(&self) -> Result<(u64, u64), StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OFFLINE)?;
        let (mut messages, mut bytes) = (0u64, 0u64);
        for entry in table.iter()? {
            let (_, value) = entry?;
            messages += 1;
            bytes += value.value().len().saturating_sub(8) as u64;
        }
        Ok((messages, bytes))
    }

    /// What `user`'s offline queue holds.
    pub fn offline_usage(&self, user: &str) -> Result<Usage, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OFFLINE)?;
        let mut usage = Usage::default();
        for entry in table.range((user, 0u64)..=(user, u64::MAX))? {
            let (key, value) = entry?;
            usage.messages += 1;
            usage.bytes += value.value().len().saturating_sub(8);
            usage.next_seq = key.value().1 + 1;
        }
        Ok(usage)
    }

    /// Up to `limit` offline messages of `user` with `seq >= from`, oldest first.
    pub fn offline_load(
        &self,
        user: &str,
        from: u64,
        limit: usize,
    ) -> Result<Vec<Stored>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OFFLINE)?;
        let mut out = Vec::new();
        for entry in table.range((user, from)..=(user, u64::MAX))?.take(limit) {
            let (key, value) = entry?;
            let value = value.value();
            let Some((stamp, bytes)) = value.split_first_chunk::<8>() else {
                return Err(StoreError::Corrupt(format!(
                    "an offline message of {user} in shard {} is truncated",
                    self.shard
                )));
            };
            out.push(Stored {
                seq: key.value().1,
                stored_unix_ms: u64::from_le_bytes(*stamp),
                bytes: bytes::Bytes::copy_from_slice(bytes),
            });
        }
        Ok(out)
    }

    /// Applies a batch of offline-queue writes in one transaction (one fsync when `Durable`).
    /// Returns (user, bytes) of each message erased.
    pub fn offline_commit(
        &self,
        batch: &Batch,
        durability: Durability,
    ) -> Result<Vec<(String, usize)>, StoreError> {
        self.commit(batch, &[], durability)
    }

    /// Applies a batch of offline-queue writes and whole rosters (by user) in one transaction
    /// (one fsync when `Durable`): the shard's group commit. Returns (user, bytes) of each
    /// message erased.
    pub fn commit(
        &self,
        batch: &Batch,
        rosters: &[(String, Vec<RosterItem>)],
        durability: Durability,
    ) -> Result<Vec<(String, usize)>, StoreError> {
        let mut txn = self.db.begin_write()?;
        if durability == Durability::Memory {
            txn.set_durability(redb::Durability::None);
        }
        let mut erased = Vec::new();
        {
            let mut table = txn.open_table(OFFLINE)?;
            let mut value = Vec::new();
            for (user, m) in &batch.puts {
                value.clear();
                value.extend_from_slice(&m.stored_unix_ms.to_le_bytes());
                value.extend_from_slice(&m.bytes);
                table.insert((user.as_str(), m.seq), value.as_slice())?;
            }
            for (user, seq) in &batch.deletes {
                if let Some(old) = table.remove((user.as_str(), *seq))? {
                    erased.push((user.clone(), old.value().len().saturating_sub(8)));
                }
            }
        }
        if !rosters.is_empty() {
            let mut table = txn.open_table(ROSTERS)?;
            for (user, items) in rosters {
                put_roster(&mut table, user, items)?;
            }
        }
        txn.commit()?;
        Ok(erased)
    }
}

/// The page cache of the databases opened only briefly: the data dir's lock and the ones a
/// re-partition reads and writes once.
const SMALL_CACHE_BYTES: usize = shared::limits::STORE_CACHE_BYTES_MIN;

/// Opens (`create`: or creates) a redb database caching at most `cache_bytes` of its pages,
/// mapping "locked by someone else" to `InUse`.
fn open_db(
    path: &Path,
    data_dir: &Path,
    create: bool,
    cache_bytes: usize,
) -> Result<Database, StoreError> {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(cache_bytes);
    let result = if create {
        builder.create(path)
    } else {
        builder.open(path)
    };
    result.map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => {
            StoreError::InUse(data_dir.display().to_string())
        }
        e => StoreError::Backend(format!("opening {}: {e}", path.display())),
    })
}

/// Creates both tables if absent, so that read transactions always find them.
fn ensure_tables(db: &Database) -> Result<(), StoreError> {
    let txn = db.begin_write()?;
    txn.open_table(ACCOUNTS)?;
    txn.open_table(ROSTERS)?;
    txn.open_table(OFFLINE)?;
    txn.commit()?;
    Ok(())
}

fn shard_path(dir: &Path, shard: usize) -> PathBuf {
    dir.join(format!("shard-{shard}.redb"))
}

struct Manifest {
    shards: usize,
    /// Absent from manifests written by hand; then any domain is taken to match.
    domain: Option<String>,
}

/// Reads `dir/manifest`; `None` when the file does not exist.
fn read_manifest(dir: &Path) -> Result<Option<Manifest>, StoreError> {
    let path = dir.join(MANIFEST);
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("reading", &path, e)),
    };
    let bad = |what: &str| StoreError::Corrupt(format!("{}: {what}", path.display()));
    let mut shards = None;
    let mut domain = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(bad(&format!("unreadable line {line:?}")));
        };
        match key.trim() {
            "shards" => match value.trim().parse::<usize>() {
                Ok(n) if n > 0 => shards = Some(n),
                _ => return Err(bad(&format!("bad shard count {:?}", value.trim()))),
            },
            "domain" => domain = Some(value.trim().to_owned()),
            // Unknown keys are left for newer versions.
            _ => {}
        }
    }
    let shards = shards.ok_or_else(|| bad("no `shards = N` line"))?;
    Ok(Some(Manifest { shards, domain }))
}

/// Writes `dir/manifest` durably (temp file, fsync, rename, fsync of the directory).
fn write_manifest(dir: &Path, shards: usize, domain: &str) -> Result<(), StoreError> {
    let tmp = dir.join("manifest.tmp");
    let path = dir.join(MANIFEST);
    let text = format!(
        "# Written by the gateway; the store re-partitions itself when these change.\n\
         shards = {shards}\ndomain = {domain}\n"
    );
    let mut file = fs::File::create(&tmp).map_err(|e| io_err("creating", &tmp, e))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("writing", &tmp, e))?;
    fs::rename(&tmp, &path).map_err(|e| io_err("renaming", &tmp, e))?;
    sync_dir(dir)
}

/// Makes renames and creations within `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("syncing", dir, e))
}

fn remove_dir_if_exists(dir: &Path) -> Result<(), StoreError> {
    match fs::remove_dir_all(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", dir, e)),
        _ => Ok(()),
    }
}

/// Finishes or discards a re-partition interrupted by a crash. Called with the data dir locked.
///
/// `store.tmp` is complete exactly when it has a manifest (written last); `store` is renamed to
/// `store.old` only once `store.tmp` is complete.
fn recover(data_dir: &Path) -> Result<(), StoreError> {
    let store = data_dir.join(STORE_DIR);
    let tmp = data_dir.join(TMP_DIR);
    let old = data_dir.join(OLD_DIR);
    if !store.exists() {
        if tmp.exists() && read_manifest(&tmp)?.is_some() {
            tracing::warn!("finishing an interrupted re-partition of the store");
            fs::rename(&tmp, &store).map_err(|e| io_err("renaming", &tmp, e))?;
            sync_dir(data_dir)?;
        } else if old.exists() {
            tracing::warn!("rolling back an interrupted re-partition of the store");
            fs::rename(&old, &store).map_err(|e| io_err("renaming", &old, e))?;
            sync_dir(data_dir)?;
        }
    }
    // Whatever is left is either an incomplete new store or an already replaced old one.
    remove_dir_if_exists(&tmp)?;
    remove_dir_if_exists(&old)
}

/// Builds a complete `store.tmp` for `new_shards` shards holding every account and roster of
/// the current `store` (of `old_shards` shards; 0 when there is none), then swaps it in.
fn repartition(
    data_dir: &Path,
    old_shards: usize,
    new_shards: usize,
    domain: &str,
) -> Result<(), StoreError> {
    let store_dir = data_dir.join(STORE_DIR);
    let tmp_dir = data_dir.join(TMP_DIR);
    let old_dir = data_dir.join(OLD_DIR);

    let old_dbs = (0..old_shards)
        .map(|i| {
            let path = shard_path(&store_dir, i);
            if !path.exists() {
                return Err(StoreError::Corrupt(format!(
                    "{} is missing",
                    path.display()
                )));
            }
            open_db(&path, data_dir, false, SMALL_CACHE_BYTES)
        })
        .collect::<Result<Vec<_>, _>>()?;

    remove_dir_if_exists(&tmp_dir)?;
    fs::create_dir_all(&tmp_dir).map_err(|e| io_err("creating", &tmp_dir, e))?;
    let new_dbs = (0..new_shards)
        .map(|i| open_db(&shard_path(&tmp_dir, i), data_dir, true, SMALL_CACHE_BYTES))
        .collect::<Result<Vec<_>, _>>()?;

    let mut moved = (0u64, 0u64, 0u64);
    {
        let txns = new_dbs
            .iter()
            .map(|db| db.begin_write().map_err(StoreError::from))
            .collect::<Result<Vec<_>, _>>()?;
        {
            let mut accounts = txns
                .iter()
                .map(|t| t.open_table(ACCOUNTS))
                .collect::<Result<Vec<_>, _>>()?;
            let mut rosters = txns
                .iter()
                .map(|t| t.open_table(ROSTERS))
                .collect::<Result<Vec<_>, _>>()?;
            for (i, old) in old_dbs.iter().enumerate() {
                let txn = old.begin_read()?;
                for (def, new, count) in [
                    (ACCOUNTS, &mut accounts, &mut moved.0),
                    (ROSTERS, &mut rosters, &mut moved.1),
                ] {
                    let table = match txn.open_table(def) {
                        Ok(table) => table,
                        Err(redb::TableError::TableDoesNotExist(_)) => continue,
                        Err(e) => return Err(e.into()),
                    };
                    for entry in table.iter()? {
                        let (key, value) = entry?;
                        let user = key.value();
                        let home = home_shard_of(user, domain, new_shards);
                        if new[home].insert(user, value.value())?.is_some() {
                            tracing::warn!(user, old_shard = i, "user found in two old shards");
                        }
                        *count += 1;
                    }
                }
            }
        }
        // Offline queues, keyed by (user, seq): each user's queue moves whole, in order.
        {
            let mut offline = txns
                .iter()
                .map(|t| t.open_table(OFFLINE))
                .collect::<Result<Vec<_>, _>>()?;
            for old in &old_dbs {
                let txn = old.begin_read()?;
                let table = match txn.open_table(OFFLINE) {
                    Ok(table) => table,
                    Err(redb::TableError::TableDoesNotExist(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                for entry in table.iter()? {
                    let (key, value) = entry?;
                    let (user, seq) = key.value();
                    let home = home_shard_of(user, domain, new_shards);
                    offline[home].insert((user, seq), value.value())?;
                    moved.2 += 1;
                }
            }
        }
        // Durability::Immediate (the default): each commit is on disk when it returns.
        for txn in txns {
            txn.commit()?;
        }
    }
    drop(new_dbs);
    drop(old_dbs);
    write_manifest(&tmp_dir, new_shards, domain)?;
    sync_dir(&tmp_dir)?;

    // The swap. A crash between the two renames is finished by `recover`.
    if store_dir.exists() {
        fs::rename(&store_dir, &old_dir).map_err(|e| io_err("renaming", &store_dir, e))?;
    }
    fs::rename(&tmp_dir, &store_dir).map_err(|e| io_err("renaming", &tmp_dir, e))?;
    sync_dir(data_dir)?;
    remove_dir_if_exists(&old_dir)?;
    if old_shards > 0 {
        tracing::info!(
            accounts = moved.0,
            rosters = moved.1,
            offline_messages = moved.2,
            from_shards = old_shards,
            to_shards = new_shards,
            "re-partitioned the store"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::roster::Subscription;

    const DOMAIN: &str = "localhost";

    fn creds(password: &str) -> Credentials {
        Credentials::derive(password, 1)
    }

    #[test]
    fn device_keys_are_added_bounded_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = &Store::open_all(dir.path(), 1, DOMAIN).unwrap()[0];
        let key = crate::credentials::new_device_key();
        let hash = crate::credentials::device_key_hash(&key);
        assert!(matches!(
            s.add_device_key("nobody", hash),
            Err(StoreError::NoSuchUser(_))
        ));
        s.add_user("alice", &creds("pw")).unwrap();
        assert_eq!(s.add_device_key("alice", hash).unwrap(), 1);
        let got = s.credentials("alice").unwrap().unwrap();
        assert!(got.verify_plain(&key));
        assert!(got.verify_plain("pw"));
        for n in 2..=DEVICE_KEYS_PER_ACCOUNT_MAX {
            assert_eq!(s.add_device_key("alice", [n as u8; 32]).unwrap(), n);
        }
        assert!(matches!(
            s.add_device_key("alice", [0; 32]),
            Err(StoreError::TooManyDeviceKeys(
                _,
                DEVICE_KEYS_PER_ACCOUNT_MAX
            ))
        ));
        assert!(s.credentials("alice").unwrap().unwrap().verify_plain(&key));
    }

    fn item(jid: &str) -> RosterItem {
        RosterItem {
            jid: jid.to_owned(),
            name: Some("A friend".to_owned()),
            subscription: Subscription::Both,
            ask_out: false,
            pending_in: true,
            groups: vec!["Friends".to_owned(), "Work".to_owned()],
        }
    }

    /// The shard `user` should be in.
    fn home(stores: &[Store], user: &str) -> usize {
        home_shard_of(user, DOMAIN, stores.len())
    }

    fn store_for<'a>(stores: &'a [Store], user: &str) -> &'a Store {
        &stores[home(stores, user)]
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
        check::<Arc<[Store]>>();
    }

    #[test]
    fn add_get_delete_list() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
        let s = &stores[0];
        assert_eq!(s.shard(), 0);
        assert!(s.users().unwrap().is_empty());
        assert_eq!(s.credentials("alice").unwrap(), None);

        let c = creds("secret");
        s.add_user("bob", &creds("x")).unwrap();
        s.add_user("alice", &c).unwrap();
        assert!(matches!(
            s.add_user("alice", &creds("other")),
            Err(StoreError::UserExists(u)) if u == "alice"
        ));
        let got = s.credentials("alice").unwrap().unwrap();
        assert_eq!(got, c);
        assert!(got.verify_plain("secret"));
        assert_eq!(s.users().unwrap(), ["alice", "bob"]);

        s.set_roster("alice", &[item("bob@localhost")]).unwrap();
        s.delete_user("alice").unwrap();
        assert_eq!(s.credentials("alice").unwrap(), None);
        assert!(s.roster("alice").unwrap().is_empty(), "roster deleted too");
        assert!(matches!(
            s.delete_user("alice"),
            Err(StoreError::NoSuchUser(u)) if u == "alice"
        ));
        assert_eq!(s.users().unwrap(), ["bob"]);
    }

    #[test]
    fn add_users_in_bulk_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
        let s = &stores[0];
        s.add_user("u1", &creds("old")).unwrap();
        let users: Vec<_> = (0..100).map(|i| (format!("u{i}"), creds("new"))).collect();
        s.add_users(&users).unwrap();
        assert_eq!(s.users().unwrap().len(), 100);
        assert!(s.credentials("u1").unwrap().unwrap().verify_plain("new"));
    }

    #[test]
    fn roster_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
        let s = &stores[0];
        assert!(s.roster("alice").unwrap().is_empty());
        let items = vec![
            item("bob@localhost"),
            RosterItem {
                jid: "carol@example.org".to_owned(),
                name: None,
                subscription: Subscription::None,
                ask_out: true,
                pending_in: false,
                groups: vec![],
            },
        ];
        s.set_roster("alice", &items).unwrap();
        assert_eq!(s.roster("alice").unwrap(), items);
        s.set_roster("alice", &items[1..]).unwrap();
        assert_eq!(s.roster("alice").unwrap(), &items[1..]);
        s.set_roster("alice", &[]).unwrap();
        assert!(s.roster("alice").unwrap().is_empty());
    }

    #[test]
    fn reopen_keeps_data() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Store::shards_on_disk(dir.path()).unwrap(), None);
        {
            let stores = Store::open_all(dir.path(), 2, DOMAIN).unwrap();
            assert_eq!(stores.len(), 2);
            assert_eq!(stores[1].shard(), 1);
            store_for(&stores, "alice")
                .add_user("alice", &creds("pw"))
                .unwrap();
            store_for(&stores, "alice")
                .set_roster("alice", &[item("bob@localhost")])
                .unwrap();
        }
        assert_eq!(Store::shards_on_disk(dir.path()).unwrap(), Some(2));
        let manifest = fs::read_to_string(dir.path().join("store/manifest")).unwrap();
        assert!(manifest.contains("shards = 2"), "{manifest}");
        let stores = Store::open_all(dir.path(), 2, DOMAIN).unwrap();
        let s = store_for(&stores, "alice");
        assert!(s.credentials("alice").unwrap().unwrap().verify_plain("pw"));
        assert_eq!(s.roster("alice").unwrap(), [item("bob@localhost")]);
    }

    /// Asserts every user is in exactly the shard `home_shard` names, with its password and
    /// roster, and nothing else is stored.
    fn check_layout(stores: &[Store], users: &[String]) {
        let total: usize = stores.iter().map(|s| s.users().unwrap().len()).sum();
        assert_eq!(total, users.len());
        for user in users {
            for s in stores {
                let here = s.credentials(user).unwrap();
                if s.shard() == home(stores, user) {
                    assert!(here.unwrap().verify_plain(&format!("pw-{user}")), "{user}");
                    assert_eq!(s.roster(user).unwrap(), [item(&format!("{user}-friend@x"))]);
                } else {
                    assert_eq!(here, None, "{user} also in shard {}", s.shard());
                    assert!(s.roster(user).unwrap().is_empty());
                }
            }
        }
    }

    #[test]
    fn repartition_keeps_every_user_and_roster() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = (0..60).map(|i| format!("user{i}")).collect();
        {
            let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
            for u in &users {
                stores[0].add_user(u, &creds(&format!("pw-{u}"))).unwrap();
                stores[0]
                    .set_roster(u, &[item(&format!("{u}-friend@x"))])
                    .unwrap();
            }
        }
        {
            let stores = Store::open_all(dir.path(), 3, DOMAIN).unwrap();
            assert_eq!(stores.len(), 3);
            check_layout(&stores, &users);
            assert!(
                stores.iter().all(|s| !s.users().unwrap().is_empty()),
                "60 users spread over all 3 shards"
            );
        }
        assert_eq!(Store::shards_on_disk(dir.path()).unwrap(), Some(3));
        assert!(!dir.path().join(TMP_DIR).exists());
        assert!(!dir.path().join(OLD_DIR).exists());
        {
            let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
            check_layout(&stores, &users);
        }
        assert_eq!(Store::shards_on_disk(dir.path()).unwrap(), Some(1));
        assert!(!shard_path(&dir.path().join(STORE_DIR), 1).exists());
    }

    #[test]
    fn domain_change_repartitions() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = (0..30).map(|i| format!("user{i}")).collect();
        {
            let stores = Store::open_all(dir.path(), 3, "other.example").unwrap();
            for u in &users {
                let s = &stores[home_shard_of(u, "other.example", 3)];
                s.add_user(u, &creds(&format!("pw-{u}"))).unwrap();
                s.set_roster(u, &[item(&format!("{u}-friend@x"))]).unwrap();
            }
        }
        let stores = Store::open_all(dir.path(), 3, DOMAIN).unwrap();
        check_layout(&stores, &users);
    }

    #[test]
    fn offline_queues_survive_reopen_and_repartition() {
        let dir = tempfile::tempdir().unwrap();
        let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
        let msg = |seq: u64| Stored {
            seq,
            stored_unix_ms: 1000 + seq,
            bytes: bytes::Bytes::from(format!("<message id='{seq}'/>")),
        };
        {
            let stores = Store::open_all(dir.path(), 2, DOMAIN).unwrap();
            for u in &users {
                let mut batch = Batch::default();
                for seq in 0..3 {
                    batch.puts.push((u.clone(), msg(seq)));
                }
                let durability = if u == "u0" {
                    Durability::Memory
                } else {
                    Durability::Durable
                };
                store_for(&stores, u)
                    .offline_commit(&batch, durability)
                    .unwrap();
            }
            let s = store_for(&stores, "u1");
            let erased = s
                .offline_commit(
                    &Batch {
                        puts: vec![],
                        deletes: vec![("u1".into(), 0), ("u1".into(), 9)],
                    },
                    Durability::Durable,
                )
                .unwrap();
            assert_eq!(erased, vec![("u1".to_owned(), msg(0).bytes.len())]);
        }
        for shards in [3, 1] {
            let stores = Store::open_all(dir.path(), shards, DOMAIN).unwrap();
            for u in &users {
                let s = store_for(&stores, u);
                let got = s.offline_load(u, 0, 100).unwrap();
                let want: Vec<_> = if u == "u1" {
                    (1..3).map(msg).collect()
                } else {
                    (0..3).map(msg).collect()
                };
                assert_eq!(got, want, "{u} with {shards} shards");
                let usage = s.offline_usage(u).unwrap();
                assert_eq!((usage.messages, usage.next_seq), (want.len(), 3));
                assert_eq!(s.offline_load(u, 2, 1).unwrap(), vec![msg(2)]);
            }
        }
    }

    #[test]
    fn second_open_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let stores = Store::open_all(dir.path(), 2, DOMAIN).unwrap();
        // redb locks with flock(2), which conflicts between two opens even in one process.
        let err = Store::open_all(dir.path(), 2, DOMAIN)
            .err()
            .expect("in use");
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        assert!(err.to_string().contains("stop it first"), "{err}");
        // Nor may a re-partition start under a running gateway.
        let err = Store::open_all(dir.path(), 3, DOMAIN)
            .err()
            .expect("in use");
        assert!(matches!(err, StoreError::InUse(_)), "{err}");
        drop(stores);
        assert_eq!(Store::open_all(dir.path(), 2, DOMAIN).unwrap().len(), 2);
    }

    #[test]
    fn zero_shards_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Store::open_all(dir.path(), 0, DOMAIN),
            Err(StoreError::NoShards)
        ));
    }

    #[test]
    fn recovers_from_a_crash_between_the_renames() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = Store::open_all(dir.path(), 2, DOMAIN).unwrap();
            store_for(&stores, "alice")
                .add_user("alice", &creds("pw"))
                .unwrap();
        }
        // The new store is complete in store.tmp, store was renamed to store.old, then a crash.
        fs::rename(dir.path().join(STORE_DIR), dir.path().join(TMP_DIR)).unwrap();
        fs::create_dir(dir.path().join(OLD_DIR)).unwrap();
        fs::write(dir.path().join(OLD_DIR).join("junk"), b"x").unwrap();
        assert_eq!(Store::shards_on_disk(dir.path()).unwrap(), Some(2));
        let stores = Store::open_all(dir.path(), 2, DOMAIN).unwrap();
        assert!(store_for(&stores, "alice")
            .credentials("alice")
            .unwrap()
            .is_some());
        assert!(!dir.path().join(TMP_DIR).exists());
        assert!(!dir.path().join(OLD_DIR).exists());
    }

    #[test]
    fn discards_an_incomplete_repartition() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
            stores[0].add_user("alice", &creds("pw")).unwrap();
        }
        // A crash while store.tmp was being built: no manifest there yet.
        fs::create_dir(dir.path().join(TMP_DIR)).unwrap();
        fs::write(dir.path().join(TMP_DIR).join("shard-0.redb"), b"partial").unwrap();
        let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
        assert_eq!(stores[0].users().unwrap(), ["alice"]);
        assert!(!dir.path().join(TMP_DIR).exists());
    }

    #[test]
    fn damaged_data_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        {
            let stores = Store::open_all(dir.path(), 1, DOMAIN).unwrap();
            let txn = stores[0].db.begin_write().unwrap();
            {
                let mut t = txn.open_table(ACCOUNTS).unwrap();
                t.insert("alice", b"garbage".as_slice()).unwrap();
                let mut t = txn.open_table(ROSTERS).unwrap();
                t.insert("alice", b"{not json".as_slice()).unwrap();
            }
            txn.commit().unwrap();
            assert!(matches!(
                stores[0].credentials("alice"),
                Err(StoreError::Corrupt(_))
            ));
            assert!(matches!(
                stores[0].roster("alice"),
                Err(StoreError::Corrupt(_))
            ));
        }
        fs::write(dir.path().join("store/manifest"), "shards = many\n").unwrap();
        assert!(matches!(
            Store::shards_on_disk(dir.path()),
            Err(StoreError::Corrupt(_))
        ));
        assert!(matches!(
            Store::open_all(dir.path(), 1, DOMAIN),
            Err(StoreError::Corrupt(_))
        ));
        fs::write(dir.path().join("store/manifest"), "shards = 2\n").unwrap();
        let err = Store::open_all(dir.path(), 2, DOMAIN)
            .err()
            .expect("shard-1 missing");
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }
}
