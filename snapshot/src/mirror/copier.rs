//! The background copier of a split: claims blocks of the instant nobody
//! has copied, reads them from the primary, writes them to the secondary,
//! and counts them copied; the secondary is flushed once per
//! [`CLEAR_BYTES`], not per batch.
//!
//! A batch runs in two halves, [`Mirror::copy_read`] and
//! [`Mirror::copy_write`], so that a caller with two threads can read the
//! next batch from the primary while the current one goes to the
//! secondary; at most [`MAX_BATCHES`] batches are out at once, which
//! bounds the memory to that many batches' buffers. [`Mirror::copy`] runs
//! both halves in turn.
//!
//! The copied blocks' bits in the frozen area are cleared on the
//! controller disk lazily and in bulk, as Linux md's bitmap daemon clears
//! its bits: once [`CLEAR_BYTES`] have been copied since the last clear,
//! and when the copier finds nothing left to claim. A crash then makes the
//! resumed split copy at most that much again (the disk bits stay a
//! superset of what is still to copy, which is all that safety needs), and
//! no controller-disk write sits between one batch and the next.
//!
//! Nor does a flush of the secondary: a batch's blocks are counted copied
//! once written, and listed as unflushed. Their copy is made durable by
//! one flush before the next clear, before a resync, and before a
//! workload write changes one of them on the primary (the controller's
//! copy before write checks the list). A crash before that flush loses
//! only copies whose disk bits are still set, so the resumed split copies
//! them again from a primary that has not changed them.
//!
//! A settled batch's buffer is kept for the next one (at most
//! [`MAX_BATCHES`] of them, dropped when the copier runs out): allocating
//! and zeroing megabytes per batch is not free under emulation.
//!
//! This module must never clear a block's disk bit, nor let the primary's
//! block change, before the secondary has flushed its copy; and never hold
//! more than [`MAX_BATCHES`] batches.

use alloc::vec::Vec;

use super::controller::{Inner, Mirror, SectorWrite};
use super::layout::{Phase, BLOCKS_PER_SECTOR};
use super::work::scan;
use super::Error;
use crate::copyonce::{Cause, Claim, Token};

/// Copier batches out at once, between [`Mirror::copy_read`] and
/// [`Mirror::copy_write`].
pub const MAX_BATCHES: u32 = 2;

/// Bytes copied between two lazy clears of the frozen area's disk bits.
pub const CLEAR_BYTES: u64 = 64 << 20;

/// Blocks copied between two lazy clears at most, whatever the block
/// size: the unflushed list holds them, and at 512-byte blocks
/// [`CLEAR_BYTES`] would be 131,072 entries, more than the run's slack
/// allowance of memory; 4,096 take some 100 KiB.
pub const MAX_UNFLUSHED: u64 = 4096;

/// A copier batch read from the primary, to be written to the secondary
/// by [`Mirror::copy_write`]. Holds its blocks' claims: it must be handed
/// to `copy_write` (dropping it leaves the blocks claimed for ever).
#[must_use = "hand the batch to Mirror::copy_write, or its blocks stay claimed"]
#[derive(Debug)]
pub struct CopyBatch {
    tokens: Vec<Token>,
    buf: Vec<u8>,
}

impl CopyBatch {
    /// Blocks in the batch.
    pub fn blocks(&self) -> u64 {
        self.tokens.len() as u64
    }
}

impl Mirror {
    /// Split: copies up to `max` blocks of the instant nobody has copied
    /// to the secondary, in one batch. Returns how many it copied: 0 once
    /// none is left for it (or not split).
    pub fn copy(&self, max: u64) -> Result<u64, Error> {
        match self.copy_read(max)? {
            Some(batch) => self.copy_write(batch),
            None => Ok(0),
        }
    }

    /// Split: claims up to `max` blocks of the instant nobody has copied
    /// and reads them from the primary. `None` when none is left for it,
    /// when not split, while [`MAX_BATCHES`] batches are out, or while a
    /// backup `via=memory` runs.
    pub fn copy_read(&self, max: u64) -> Result<Option<CopyBatch>, Error> {
        let (tokens, spare) = {
            let mut g = self.inner.lock();
            // A backup `via=memory` copies what its pass meets: the
            // copier steps aside rather than contend for the secondary.
            if g.sb.phase != Phase::Split || g.gate || g.copiers >= MAX_BATCHES || g.backup_copies {
                return Ok(None);
            }
            if let Some(why) = &g.sb.broken {
                return Err(Error::Suspended(why.clone()));
            }
            let tokens = self.claim_next(&mut g, max);
            if tokens.is_empty() {
                // The last clear waits for the last batch out: a reader
                // ahead of it must not flush while it is being written.
                if g.copiers > 0 {
                    return Ok(None);
                }
                g.spare.clear();
            } else {
                g.copiers += 1;
            }
            let spare = g.spare.pop().unwrap_or_default();
            (tokens, spare)
        };
        if tokens.is_empty() {
            self.clear_due(true)?;
            return Ok(None);
        }
        let blocks: Vec<u64> = tokens.iter().map(Token::unit).collect();
        let r = match self.buffer(spare, blocks.len()) {
            Ok(buf) => self
                .read_blocks(&blocks, buf)
                .map_err(|e| self.copy_failed(e)),
            Err(e) => Err(e),
        };
        match r {
            Ok(buf) => Ok(Some(CopyBatch { tokens, buf })),
            Err(e) => {
                self.settle(tokens, false, Cause::Background);
                self.inner.lock().copiers -= 1;
                Err(e)
            }
        }
    }

    /// `spare` with room for `blocks` blocks, or the refusal to allocate
    /// it: a batch size too large for the heap is an error, not an abort.
    fn buffer(&self, mut spare: Vec<u8>, blocks: usize) -> Result<Vec<u8>, Error> {
        let bytes = self.geo.block_bytes as usize * blocks;
        spare
            .try_reserve_exact(bytes.saturating_sub(spare.len()))
            .map_err(|_| Error::NoMemory(bytes as u64))?;
        Ok(spare)
    }

    /// Writes a batch from [`Self::copy_read`] to the secondary (no
    /// flush; see the module docs) and counts its blocks copied; returns
    /// how many.
    pub fn copy_write(&self, batch: CopyBatch) -> Result<u64, Error> {
        let CopyBatch { tokens, buf } = batch;
        let blocks: Vec<u64> = tokens.iter().map(Token::unit).collect();
        let r = self.put_secondary(&blocks, &buf, false);
        if r.is_ok() {
            self.copied_unflushed(&blocks);
        }
        self.settle(tokens, r.is_ok(), Cause::Background);
        {
            let mut g = self.inner.lock();
            g.copiers -= 1;
            if r.is_ok() {
                note_clears(&mut g, &blocks);
            }
            if g.spare.len() < MAX_BATCHES as usize {
                g.spare.push(buf);
            }
        }
        match r {
            Ok(()) => {
                self.clear_due(false)?;
                Ok(blocks.len() as u64)
            }
            Err(e) => Err(self.copy_failed(e)),
        }
    }

    /// Rewrites (without a flush) the frozen area's sectors holding bits
    /// of copied blocks, if [`CLEAR_BYTES`] were copied since the last
    /// time, or `now`.
    pub(super) fn clear_due(&self, now: bool) -> Result<(), Error> {
        let (k, sectors) = {
            let mut g = self.inner.lock();
            let every = (CLEAR_BYTES / self.geo.block_bytes).clamp(1, MAX_UNFLUSHED);
            if g.clears.is_empty() || (!now && g.unclear < every) {
                return Ok(());
            }
            g.unclear = 0;
            (g.sb.d, core::mem::take(&mut g.clears))
        };
        // The copies must be durable before their bits leave the disk.
        if let Err(e) = self.make_durable() {
            self.inner.lock().clears.extend(sectors);
            return Err(self.copy_failed(e));
        }
        for s in sectors {
            self.write_bitmap_sector(k, s, SectorWrite::Lazy)?;
        }
        Ok(())
    }

    /// Claims up to `max` blocks of the frozen bitmap from the cursor on,
    /// wrapping once; blocks copied or being copied are skipped.
    fn claim_next(&self, g: &mut Inner, max: u64) -> Vec<Token> {
        let d = g.sb.d;
        let mut tokens = Vec::new();
        g.cursor = scan(&g.areas[d], g.cursor, |b| {
            if let Claim::Won(t) = self.engine.claim(b) {
                tokens.push(t);
            }
            (tokens.len() as u64) < max
        });
        tokens
    }
}

/// Records the bitmap sectors of `blocks`, just copied, as due a clear.
pub(super) fn note_clears(g: &mut Inner, blocks: &[u64]) {
    g.unclear += blocks.len() as u64;
    for &b in blocks {
        let s = b / BLOCKS_PER_SECTOR;
        if !g.clears.contains(&s) {
            g.clears.push(s);
        }
    }
}
