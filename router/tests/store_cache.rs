//! `store_cache_bytes` reaches redb: reading a store's data back grows this process's resident
//! memory by about the data's size with a large cache (redb keeps every page it read), and by
//! little more than the cache with a small one. Its own test binary, so that no other test's
//! allocations move the resident-memory readings.

use std::time::{SystemTime, UNIX_EPOCH};

use router::offline::{Batch, Stored};
use router::store::{Durability, Store};

const DOMAIN: &str = "localhost";
/// Users whose queues are filled and read back, and what each holds.
const USERS: usize = 40;
const MESSAGES_PER_USER: usize = 200;
const MESSAGE_BYTES: usize = 2048;
/// 16 MiB of messages in all.
const DATA_BYTES: usize = USERS * MESSAGES_PER_USER * MESSAGE_BYTES;

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kib: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// Reads every stored message back (dropping each batch) and returns how much resident memory
/// grew while the store stayed open.
fn read_back_growth(dir: &std::path::Path, cache_bytes: usize) -> usize {
    let stores = Store::open_all_with_cache(dir, 1, DOMAIN, cache_bytes).unwrap();
    let before = rss_bytes();
    let mut read = 0;
    for u in 0..USERS {
        let user = format!("user{u}");
        for m in stores[0].offline_load(&user, 0, MESSAGES_PER_USER).unwrap() {
            read += m.bytes.len();
        }
    }
    assert_eq!(read, DATA_BYTES);
    let grown = rss_bytes().saturating_sub(before);
    drop(stores);
    grown
}

#[test]
fn the_page_cache_is_as_large_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    {
        let stores = Store::open_all_with_cache(dir.path(), 1, DOMAIN, 1 << 20).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        for u in 0..USERS {
            let mut batch = Batch::default();
            for seq in 0..MESSAGES_PER_USER as u64 {
                batch.puts.push((
                    format!("user{u}"),
                    Stored {
                        seq,
                        stored_unix_ms: now,
                        bytes: bytes::Bytes::from(vec![b'x'; MESSAGE_BYTES]),
                    },
                ));
            }
            stores[0]
                .offline_commit(&batch, Durability::Memory)
                .unwrap();
        }
    }
    // Small first: memory its reads freed can only make the large cache's growth look smaller.
    let small = read_back_growth(dir.path(), 1 << 20);
    let large = read_back_growth(dir.path(), 256 << 20);
    eprintln!("resident growth reading {DATA_BYTES} bytes back: 1 MiB cache {small}, 256 MiB cache {large}");
    assert!(
        large >= small + DATA_BYTES / 2,
        "a 256 MiB cache grew {large} bytes, a 1 MiB cache {small}: the size does not reach redb"
    );
}
