//! Where snapshot pages go: a separate part of RAM ([`ram::RamStore`]) or a
//! disk, as an ELF core file ([`disk::DiskStore`]).
//!
//! Everything a store does on the copy paths runs with interrupts off,
//! `save` in the write-fault handler: an implementation must never block,
//! allocate or fault there.

pub mod disk;
pub mod ram;

/// A snapshot store; see the module docs.
pub trait SnapshotStore: Send + Sync {
    /// Copies range frame `frame` into `slot`. On failure the store marks
    /// itself [`Self::failed`].
    fn save(&self, frame: u64, slot: u64);
    /// The engine frame holding `slot`'s copy, if the copy is in RAM (so
    /// restore can copy it back).
    fn saved_frame(&self, slot: u64) -> Option<u64>;
    /// The hash of a copy saved in this same interrupts-off stretch (see
    /// [`snapshot::memsnap::page_hash`]).
    fn fresh_hash(&self, slot: u64) -> u64;
    /// The hash of `slot`'s copy at any time, if it is in memory.
    fn slot_hash(&self, slot: u64) -> Option<u64>;
    /// Slots it holds.
    fn slots(&self) -> u64;
    /// Pages `save` can take now without drawing on a reserve kept for
    /// copiers that cannot wait.
    fn room(&self) -> u64 {
        u64::MAX
    }
    /// Of [`Self::room`], what the background copier may take: the rest is
    /// kept for write faults, so that a copier running ahead of a slow store
    /// does not make the workload wait.
    fn background_room(&self) -> u64 {
        self.room()
    }
    /// Whether a copy was lost: the snapshot cannot complete.
    fn failed(&self) -> bool {
        false
    }
}
