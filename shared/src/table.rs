//! Hash tables keyed by session give memory back after a storm. A hash map never shrinks by
//! itself: once a shard held 10,000 sessions, each table keyed by session keeps buckets for them
//! (tens of bytes each, all pages touched) after they close. `shrink_if_sparse` after a removal
//! keeps a table at most `TABLE_SPARSE_FACTOR` times larger than what it holds.

use std::hash::{BuildHasher, Hash};

/// Tables with fewer buckets than this are left alone: a few KiB, not worth a rehash.
pub const TABLE_SHRINK_CAPACITY_MIN_ENTRIES: usize = 1024;
/// A table shrinks once its capacity is this many times its length, to twice its length: a
/// rehash of `len` entries after at least `len` removals, so O(1) amortised per removal, and
/// growing back needs 3.5x as many entries again (hysteresis against shrinking and growing in
/// turn).
pub const TABLE_SPARSE_FACTOR: usize = 4;

/// Shrinks a hash map that became sparse (see the module docs).
pub trait ShrinkIfSparse {
    /// Shrinks to twice the length when the capacity is at least `TABLE_SPARSE_FACTOR` times
    /// the length and at least `TABLE_SHRINK_CAPACITY_MIN_ENTRIES`. True when it shrank.
    fn shrink_if_sparse(&mut self) -> bool;
}

fn sparse(len: usize, capacity: usize) -> bool {
    capacity >= TABLE_SHRINK_CAPACITY_MIN_ENTRIES
        && len.saturating_mul(TABLE_SPARSE_FACTOR) <= capacity
}

impl<K: Eq + Hash, V, S: BuildHasher> ShrinkIfSparse for std::collections::HashMap<K, V, S> {
    fn shrink_if_sparse(&mut self) -> bool {
        if !sparse(self.len(), self.capacity()) {
            return false;
        }
        self.shrink_to(self.len() * 2);
        true
    }
}

impl<K: Eq + Hash, V, S: BuildHasher> ShrinkIfSparse for hashbrown::HashMap<K, V, S> {
    fn shrink_if_sparse(&mut self) -> bool {
        if !sparse(self.len(), self.capacity()) {
            return false;
        }
        self.shrink_to(self.len() * 2);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_and_shrink<M: ShrinkIfSparse>(
        map: &mut M,
        remove: impl Fn(&mut M, u64),
        len: impl Fn(&M) -> usize,
        capacity: impl Fn(&M) -> usize,
        n: u64,
    ) {
        let peak = capacity(map);
        assert!(peak >= n as usize);
        let mut shrinks = 0;
        for k in 0..n {
            remove(map, k);
            if map.shrink_if_sparse() {
                shrinks += 1;
                assert!(capacity(map) >= len(map), "holds what it has");
            }
            assert!(
                !sparse(len(map), capacity(map)),
                "never more than {TABLE_SPARSE_FACTOR}x sparse after a check: {} of {}",
                len(map),
                capacity(map)
            );
        }
        assert_eq!(len(map), 0);
        assert!(
            capacity(map) < TABLE_SHRINK_CAPACITY_MIN_ENTRIES,
            "an emptied table keeps {} of its {peak} buckets",
            capacity(map)
        );
        // Each shrink at least halves the table: logarithmically many rehashes.
        assert!(shrinks <= 16, "{shrinks} shrinks");
    }

    #[test]
    fn an_emptied_std_map_gives_its_buckets_back() {
        let n = 20_000u64;
        let mut m: std::collections::HashMap<u64, [u8; 40]> =
            (0..n).map(|k| (k, [0; 40])).collect();
        drain_and_shrink(
            &mut m,
            |m, k| {
                m.remove(&k);
            },
            |m| m.len(),
            |m| m.capacity(),
            n,
        );
    }

    #[test]
    fn an_emptied_hashbrown_map_gives_its_buckets_back() {
        let n = 20_000u64;
        let mut m: hashbrown::HashMap<u64, u64> = (0..n).map(|k| (k, k)).collect();
        drain_and_shrink(
            &mut m,
            |m, k| {
                m.remove(&k);
            },
            |m| m.len(),
            |m| m.capacity(),
            n,
        );
    }

    #[test]
    fn small_or_dense_tables_are_left_alone() {
        let mut small: hashbrown::HashMap<u64, u64> = (0..500).map(|k| (k, k)).collect();
        for k in 0..499 {
            small.remove(&k);
        }
        assert!(!small.shrink_if_sparse(), "under the minimum capacity");
        let mut dense: hashbrown::HashMap<u64, u64> = (0..4000).map(|k| (k, k)).collect();
        for k in 0..1000 {
            dense.remove(&k);
        }
        assert!(!dense.shrink_if_sparse(), "3,000 of ~4,500 is not sparse");
    }
}
