//! What the engine counts, by cause, and the background copier's cursor.
//!
//! [`Counters`] is plain atomics with a `const` constructor, so its owner can
//! put it wherever the copy paths may write without faulting (a kernel
//! static). It must never be the authority on *which* units are copied:
//! that is the copy map. The one exception is the total of finished copies,
//! which the engine bumps in the same step as each finish, so completion can
//! be read in constant time.

use core::ops::Index;
use core::sync::atomic::{AtomicU64, Ordering};

/// Why a unit was copied, or what an access found. New causes go at the
/// end, with [`Cause::ALL`] and [`Cause::COUNT`] grown to match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    /// Copied at the instant.
    Eager,
    /// Copied by an access that must not see newer data (a write fault, a
    /// write to the primary, a read of a backup stream).
    Access,
    /// Copied by the background copier.
    Background,
    /// An access found the unit already copied.
    AlreadyCopied,
    /// An access waited for another copier to finish the unit.
    Waited,
    /// A copy failed and its claim was given back.
    Abandoned,
}

impl Cause {
    /// How many causes there are.
    pub const COUNT: usize = 6;
    /// Every cause, in index order.
    pub const ALL: [Cause; Cause::COUNT] = [
        Cause::Eager,
        Cause::Access,
        Cause::Background,
        Cause::AlreadyCopied,
        Cause::Waited,
        Cause::Abandoned,
    ];

    /// Whether this cause is a completed copy (rather than an event).
    pub const fn is_copy(self) -> bool {
        matches!(self, Cause::Eager | Cause::Access | Cause::Background)
    }
}

/// The engine's counters: finished copies in all, events by cause, and
/// where the background copier goes on from.
#[derive(Debug, Default)]
pub struct Counters {
    copied: AtomicU64,
    by_cause: [AtomicU64; Cause::COUNT],
    cursor: AtomicU64,
}

impl Counters {
    /// All zero.
    pub const fn new() -> Self {
        Counters {
            copied: AtomicU64::new(0),
            by_cause: [const { AtomicU64::new(0) }; Cause::COUNT],
            cursor: AtomicU64::new(0),
        }
    }

    /// Zeroes everything, the cursor included.
    pub fn reset(&self) {
        for c in self.by_cause.iter().chain([&self.copied, &self.cursor]) {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// Counts one event of `cause`. Copies are counted by the engine's
    /// finish; this is for events a caller of the low-level protocol
    /// observes itself (an access that found the unit copied).
    pub fn note(&self, cause: Cause) {
        self.by_cause[cause as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a finished copy. Release: whoever reads the total with
    /// [`Self::copied`] and sees this copy also sees the copied data.
    pub(super) fn note_copy(&self, cause: Cause) {
        debug_assert!(cause.is_copy(), "{cause:?} is not a copy");
        self.note(cause);
        self.copied.fetch_add(1, Ordering::Release);
    }

    /// Finished copies in all. Acquire, pairing with each finish's count.
    pub fn copied(&self) -> u64 {
        self.copied.load(Ordering::Acquire)
    }

    /// Events of `cause` so far.
    pub fn get(&self, cause: Cause) -> u64 {
        self.by_cause[cause as usize].load(Ordering::Relaxed)
    }

    /// A plain copy of the counts by cause.
    pub fn read(&self) -> Stats {
        Stats {
            by_cause: Cause::ALL.map(|c| self.get(c)),
        }
    }

    /// The background copier's next unit to look at (a hint: any value is
    /// safe, because the copy map decides).
    pub(super) fn cursor(&self) -> &AtomicU64 {
        &self.cursor
    }
}

/// Counts by cause, as values; index it with a [`Cause`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    by_cause: [u64; Cause::COUNT],
}

impl Stats {
    /// Copies by every cause that copies.
    pub fn copied(&self) -> u64 {
        Cause::ALL
            .iter()
            .filter(|c| c.is_copy())
            .map(|&c| self[c])
            .sum()
    }
}

impl Index<Cause> for Stats {
    type Output = u64;
    fn index(&self, cause: Cause) -> &u64 {
        &self.by_cause[cause as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_index_their_own_slot() {
        for (i, cause) in Cause::ALL.iter().enumerate() {
            assert_eq!(*cause as usize, i, "ALL is in index order");
        }
        let counters = Counters::new();
        counters.note_copy(Cause::Background);
        counters.note_copy(Cause::Background);
        counters.note(Cause::Waited);
        let stats = counters.read();
        assert_eq!(stats[Cause::Background], 2);
        assert_eq!(stats[Cause::Waited], 1);
        assert_eq!(stats[Cause::Eager], 0);
        assert_eq!(stats.copied(), 2, "a wait is not a copy");
        assert_eq!(counters.copied(), 2);
        counters.reset();
        assert_eq!(counters.read(), Stats::default());
        assert_eq!(counters.copied(), 0);
    }
}
