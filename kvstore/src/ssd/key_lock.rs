//! Per-key exclusion for the SSD tier's mutations.
//!
//! Writes, removals and the drop of a corrupt entry of one key run one at a
//! time; different keys never wait for each other. Readers do not take the
//! lock on their fast path.

use std::collections::HashSet;

use parking_lot::{Condvar, Mutex};
use tandem_proto::BlockKey;

/// The set of keys with a mutation in progress.
#[derive(Debug, Default)]
pub(crate) struct KeyLocks {
    held: Mutex<HashSet<u64>>,
    released: Condvar,
}

impl KeyLocks {
    /// Waits until no one holds `key`, then holds it until the guard drops.
    pub fn lock(&self, key: BlockKey) -> KeyGuard<'_> {
        let mut held = self.held.lock();
        while held.contains(&key.0) {
            self.released.wait(&mut held);
        }
        held.insert(key.0);
        KeyGuard { locks: self, key }
    }
}

/// Holds one key of a [`KeyLocks`]; releases it on drop.
#[derive(Debug)]
pub(crate) struct KeyGuard<'a> {
    locks: &'a KeyLocks,
    key: BlockKey,
}

impl Drop for KeyGuard<'_> {
    fn drop(&mut self) {
        self.locks.held.lock().remove(&self.key.0);
        // Waiters on other keys recheck and sleep again; mutations are rare
        // next to the disk I/O they wrap, so this herd is small.
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn one_holder_per_key_and_different_keys_do_not_block() {
        let locks = KeyLocks::default();
        let inside = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let _guard = locks.lock(BlockKey(7));
                        assert_eq!(inside.fetch_add(1, Ordering::SeqCst), 0);
                        // Another key is free while key 7 is held.
                        drop(locks.lock(BlockKey(8)));
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            }
        });
        assert!(locks.held.lock().is_empty());
    }
}
