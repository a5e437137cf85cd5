//! The verification buffers a session owns when asked to verify: a
//! reference hash per slot, taken stop-the-world at the instant, and a
//! count of copies per slot, kept by the copy paths. Plain data in engine
//! memory; [`super::verify`] takes and checks the reference. Must never
//! allocate (the copy paths write it).

use core::sync::atomic::Ordering;

use crate::memory::snapmem::Buffer;

/// The reference hashes and copy counts, one per slot, in engine memory
/// (the fault path counts copies).
pub(super) struct Verification {
    reference: Buffer,
    copies: Buffer,
}

impl Verification {
    /// Over `reference` (a word per slot) and `copies` (a byte per slot).
    pub fn new(reference: Buffer, copies: Buffer) -> Self {
        Verification { reference, copies }
    }

    /// Counts a copy of `slot` (on the copy paths).
    pub fn note_copy(&self, slot: u64) {
        self.copies.bytes()[slot as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Records `slot`'s reference hash.
    pub fn record(&self, slot: u64, hash: u64) {
        self.reference.atomics()[slot as usize].store(hash, Ordering::Relaxed);
    }

    /// `slot`'s reference hash.
    pub fn expected(&self, slot: u64) -> u64 {
        self.reference.atomics()[slot as usize].load(Ordering::Relaxed)
    }

    /// The copy counts of the first `len` slots, summed up.
    pub fn copy_counts(&self, len: u64) -> CopyCounts {
        let mut counts = CopyCounts::default();
        for c in &self.copies.bytes()[..len as usize] {
            let n = u64::from(c.load(Ordering::Relaxed));
            counts.total += n;
            counts.never += u64::from(n == 0);
            counts.twice += u64::from(n > 1);
        }
        counts
    }
}

/// Copies counted page by page on the copy paths (by the store's side of
/// each copy, not by the engine's counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyCounts {
    /// Pages copied more than once.
    pub twice: u64,
    /// Pages not copied.
    pub never: u64,
    /// Copies in all.
    pub total: u64,
}

impl CopyCounts {
    /// Pages not copied exactly once.
    pub fn not_once(&self) -> u64 {
        self.twice + self.never
    }
}
