//! The unflushed list: copies the copier (split) or the pump (paired)
//! has written to the secondary without a flush, and the flushes that
//! make them durable. Their disk bits stay set until then, so a crash
//! only makes them be copied again.
//!
//! This module must never forget a block as unflushed unless a flush of
//! the secondary began after the block's write had completed.

use alloc::vec::Vec;

use super::budget::try_vec;
use super::controller::{CopyError, Mirror};
use super::Error;

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
        self.inner.lock().unflushed.extend(blocks.iter().copied());
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
    /// blocks one of their own.
    pub(super) fn flushing(
        &self,
        flush: impl FnOnce() -> Result<(), CopyError>,
    ) -> Result<(), CopyError> {
        let taken: Vec<u64> = {
            let g = self.inner.lock();
            let mut taken = try_vec(g.unflushed.len())?;
            taken.extend(g.unflushed.iter().copied());
            taken
        };
        flush()?;
        if !taken.is_empty() {
            let mut g = self.inner.lock();
            for b in taken {
                g.unflushed.remove(&b);
            }
        }
        Ok(())
    }
}
