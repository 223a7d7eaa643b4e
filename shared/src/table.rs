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

/// The same for std's and hashbrown's maps (std's wraps hashbrown; they share no trait).
macro_rules! shrink_if_sparse_for {
    ($($map:ident)::+) => {
        impl<K: Eq + Hash, V, S: BuildHasher> ShrinkIfSparse for $($map)::+<K, V, S> {
            fn shrink_if_sparse(&mut self) -> bool {
                if !sparse(self.len(), self.capacity()) {
                    return false;
                }
                self.shrink_to(self.len() * 2);
                true
            }
        }
    };
}

shrink_if_sparse_for!(std::collections::HashMap);
shrink_if_sparse_for!(hashbrown::HashMap);

#[cfg(test)]
mod tests {
    use super::*;

    /// The two map types the tests drain, keyed by `u64`.
    trait U64Map: ShrinkIfSparse {
        fn remove_key(&mut self, k: u64);
        fn entries(&self) -> usize;
        fn buckets(&self) -> usize;
    }

    macro_rules! u64_map_for {
        ($($map:ident)::+) => {
            impl<V> U64Map for $($map)::+<u64, V> {
                fn remove_key(&mut self, k: u64) {
                    self.remove(&k);
                }
                fn entries(&self) -> usize {
                    self.len()
                }
                fn buckets(&self) -> usize {
                    self.capacity()
                }
            }
        };
    }

    u64_map_for!(std::collections::HashMap);
    u64_map_for!(hashbrown::HashMap);

    /// Removes keys `0..n` one by one, checking after each that the table is not sparse.
    fn drain_and_shrink(map: &mut impl U64Map, n: u64) {
        let peak = map.buckets();
        assert!(peak >= n as usize);
        let mut shrinks = 0;
        for k in 0..n {
            map.remove_key(k);
            if map.shrink_if_sparse() {
                shrinks += 1;
                assert!(map.buckets() >= map.entries(), "holds what it has");
            }
            assert!(
                !sparse(map.entries(), map.buckets()),
                "never more than {TABLE_SPARSE_FACTOR}x sparse after a check: {} of {}",
                map.entries(),
                map.buckets()
            );
        }
        assert_eq!(map.entries(), 0);
        assert!(
            map.buckets() < TABLE_SHRINK_CAPACITY_MIN_ENTRIES,
            "an emptied table keeps {} of its {peak} buckets",
            map.buckets()
        );
        // Each shrink at least halves the table: logarithmically many rehashes.
        assert!(shrinks <= 16, "{shrinks} shrinks");
    }

    #[test]
    fn an_emptied_std_map_gives_its_buckets_back() {
        let mut m: std::collections::HashMap<u64, [u8; 40]> =
            (0..20_000).map(|k| (k, [0; 40])).collect();
        drain_and_shrink(&mut m, 20_000);
    }

    #[test]
    fn an_emptied_hashbrown_map_gives_its_buckets_back() {
        let mut m: hashbrown::HashMap<u64, u64> = (0..20_000).map(|k| (k, k)).collect();
        drain_and_shrink(&mut m, 20_000);
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
