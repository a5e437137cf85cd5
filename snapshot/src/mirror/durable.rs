//! The unflushed list: copies the copier (split) or the pump (paired)
//! has written to the secondary without a flush, and the flushes that
//! make them durable. Their disk bits stay set until then, so a crash
//! only makes them be copied again.
//!
//! This module must never forget a block as unflushed unless a flush of
//! the secondary began after the block's write had completed.

use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::ops::Range;

use super::controller::{CopyError, Mirror};
use super::Error;

/// Blocks written to the secondary without a flush: those listed since
/// the last flush began, and those each flush still running took when it
/// began. A block written again while a flush runs is listed anew, and
/// that flush's end does not forget it.
#[derive(Debug, Default)]
pub(super) struct Unflushed {
    listed: BTreeSet<u64>,
    /// What each running flush took, by its ticket.
    taken: Vec<(u64, BTreeSet<u64>)>,
    tickets: u64,
}

impl Unflushed {
    /// Lists `blocks`, just written.
    pub(super) fn list(&mut self, blocks: &[u64]) {
        self.listed.extend(blocks.iter().copied());
    }

    /// Whether `b` may not be durable on the secondary yet.
    pub(super) fn contains(&self, b: u64) -> bool {
        self.listed.contains(&b) || self.taken.iter().any(|(_, t)| t.contains(&b))
    }

    /// The blocks in `range` that may not be durable yet (a block may come
    /// twice).
    pub(super) fn in_range(&self, range: Range<u64>) -> impl Iterator<Item = u64> + '_ {
        let taken = self.taken.iter().flat_map({
            let range = range.clone();
            move |(_, t)| t.range(range.clone())
        });
        self.listed.range(range).chain(taken).copied()
    }

    /// How many entries are held (a block listed again during a flush
    /// counts twice).
    pub(super) fn len(&self) -> usize {
        self.listed.len() + self.taken.iter().map(|(_, t)| t.len()).sum::<usize>()
    }

    /// Nothing is held.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (the pair starts over).
    pub(super) fn clear(&mut self) {
        self.listed.clear();
        self.taken.clear();
    }

    /// A flush begins: it takes every block listed so far; its ticket.
    fn begin(&mut self) -> u64 {
        self.tickets += 1;
        let took = core::mem::take(&mut self.listed);
        self.taken.push((self.tickets, took));
        self.tickets
    }

    /// The flush of `ticket` ended: what it took is durable if it
    /// succeeded, else listed again.
    fn end(&mut self, ticket: u64, durable: bool) {
        if let Some(i) = self.taken.iter().position(|(t, _)| *t == ticket) {
            let (_, took) = self.taken.swap_remove(i);
            if !durable {
                self.listed.extend(took);
            }
        }
    }
}

impl Mirror {
    /// Flushes the secondary before a write changes an unflushed block on
    /// the primary; a secondary failure breaks the split and lets the
    /// write go on.
    pub(super) fn durable_before_write(&self) -> Result<(), Error> {
        match self.make_durable() {
            Err(CopyError::Secondary(e)) | Err(CopyError::Primary(e)) => {
                self.suspend(&e)?;
                Ok(())
            }
            Err(CopyError::NoMemory(n)) => Err(Error::NoMemory(n)),
            Ok(()) => Ok(()),
        }
    }

    /// Lists `blocks`, just written to the secondary without a flush, as
    /// unflushed. Call before counting them copied: a writer that finds a
    /// block copied then finds it listed too, and flushes first.
    pub(super) fn copied_unflushed(&self, blocks: &[u64]) {
        self.inner.lock().unflushed.list(blocks);
    }

    /// Blocks listed by [`Self::copied_unflushed`] not flushed since.
    pub(super) fn unflushed_blocks(&self) -> u64 {
        self.inner.lock().unflushed.len() as u64
    }

    /// Flushes the secondary, making every copy written before it
    /// durable, and forgets those blocks as unflushed.
    pub(super) fn make_durable(&self) -> Result<(), CopyError> {
        if self.inner.lock().unflushed.is_empty() {
            return Ok(());
        }
        self.flushing(|| self.disks.secondary.flush().map_err(CopyError::Secondary))
    }

    /// Runs `flush`, requests to the secondary that end in a flush, then
    /// forgets as unflushed every block listed before it began (their
    /// writes had completed, so its flush made them durable): any flush
    /// of the secondary, a copy before write's say, spares the copier's
    /// blocks one of their own. A block listed again meanwhile stays.
    pub(super) fn flushing(
        &self,
        flush: impl FnOnce() -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        let ticket = self.inner.lock().unflushed.begin();
        let result = flush();
        self.inner.lock().unflushed.end(ticket, result.is_ok());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::Unflushed;
    use alloc::vec::Vec;

    #[test]
    fn a_block_listed_again_during_a_flush_outlives_it() {
        let mut u = Unflushed::default();
        u.list(&[3, 7]);
        let first = u.begin();
        u.list(&[7]);
        let second = u.begin();
        u.list(&[9]);
        u.end(first, true);
        assert!(!u.contains(3));
        assert!(u.contains(7), "written again after the first flush began");
        u.end(second, false);
        assert!(u.contains(7), "the second flush failed");
        assert_eq!(u.in_range(0..64).collect::<Vec<_>>(), [7, 9]);
        u.clear();
        assert!(u.is_empty());
    }
}
