//! The controller's block transfers: copies from primary to secondary,
//! reads of whole-block pieces, writes to the secondary, and the
//! copy-once engine's single-block copy (copy before write: to the copy
//! log when a slot is free, else to the secondary). Bookkeeping
//! (which block is copied, which bit is durable) is the callers'.
//!
//! This module must never write the primary, and never write the
//! secondary with anything but blocks it was handed.

use alloc::vec::Vec;

use super::budget::try_vec;
use super::controller::{CopyError, Mirror};
use crate::copyonce::UnitCopy;
use crate::devices::block::{BlockDevice, BlockError, Op};

impl Mirror {
    /// Copies `blocks` from primary to secondary through one buffer, then
    /// flushes the secondary.
    pub(super) fn copy_blocks(&self, blocks: &[u64]) -> Result<(), CopyError> {
        let buf = self.read_blocks(blocks, Vec::new())?;
        self.put_secondary(blocks, &buf, true)
    }

    /// Reads `blocks` from the primary into one buffer, whole-block pieces
    /// in order: `buf`, resized (a buffer used before is not zeroed again:
    /// the reads overwrite every byte that is written on). A buffer the
    /// heap cannot hold is [`CopyError::NoMemory`].
    pub(super) fn read_blocks(&self, blocks: &[u64], buf: Vec<u8>) -> Result<Vec<u8>, CopyError> {
        let places = blocks.iter().map(|&b| self.geo.extent(b));
        self.read_pieces(&*self.disks.primary, places, buf, CopyError::Primary)
    }

    /// Reads each `(sector, bytes)` of `places` from `disk` into its
    /// whole-block piece of `buf`, resized, in order (the reads overwrite
    /// every byte that is used); a failure is `side`'s.
    pub(super) fn read_pieces(
        &self,
        disk: &dyn BlockDevice,
        places: impl ExactSizeIterator<Item = (u64, usize)>,
        mut buf: Vec<u8>,
        side: fn(BlockError) -> CopyError,
    ) -> Result<Vec<u8>, CopyError> {
        let bs = self.geo.block_bytes as usize;
        let bytes = bs * places.len();
        buf.try_reserve_exact(bytes.saturating_sub(buf.len()))
            .map_err(|_| CopyError::NoMemory(bytes as u64))?;
        buf.resize(bytes, 0);
        let mut ops: Vec<Op<'_>> = try_vec(places.len())?;
        for (piece, (sector, len)) in buf.chunks_mut(bs).zip(places) {
            ops.push(Op::Read {
                sector,
                buf: &mut piece[..len],
            });
        }
        let depth = disk.info().max_depth.clamp(1, 32);
        disk.transfer(&mut ops, depth).map_err(side)?;
        drop(ops);
        Ok(buf)
    }

    /// Writes `blocks` (whole-block pieces of `buf`, in order) to the
    /// secondary and, if `flush`, flushes it.
    pub(super) fn put_secondary(
        &self,
        blocks: &[u64],
        buf: &[u8],
        flush: bool,
    ) -> Result<(), CopyError> {
        let bs = self.geo.block_bytes as usize;
        self.write_pieces(blocks.iter().copied().zip(buf.chunks(bs)), flush)
    }

    /// Writes each `(block, data)` to the secondary and, if `flush`,
    /// flushes it in the same batch.
    pub(super) fn write_pieces<'b>(
        &self,
        pieces: impl ExactSizeIterator<Item = (u64, &'b [u8])>,
        flush: bool,
    ) -> Result<(), CopyError> {
        let mut ops: Vec<Op<'_>> = try_vec(pieces.len() + 1)?;
        ops.extend(pieces.map(|(b, piece)| {
            let (sector, len) = self.geo.extent(b);
            Op::Write {
                sector,
                buf: &piece[..len],
            }
        }));
        // One batch: the flush goes out once the writes have completed.
        if flush {
            ops.push(Op::Flush);
        }
        let depth = self.disks.secondary.info().max_depth.clamp(1, 32);
        let mut run = || {
            self.disks
                .secondary
                .transfer(&mut ops, depth)
                .map_err(CopyError::Secondary)
        };
        if flush {
            self.flushing(run)
        } else {
            run()
        }
    }
}

/// Writes `bytes` at `sector` of `disk` and, if `flush`, flushes it, in
/// one batch (one turn of the disk's lock and one completion wait fewer
/// than two calls; the flush goes out once the write has completed).
pub(super) fn write_then_flush(
    disk: &dyn BlockDevice,
    sector: u64,
    bytes: &[u8],
    flush: bool,
) -> Result<(), BlockError> {
    let mut ops = [Op::Write { sector, buf: bytes }, Op::Flush];
    let n = if flush { 2 } else { 1 };
    disk.transfer(&mut ops[..n], 1)
}

/// Copies single blocks for the engine (copy before write).
pub(super) struct Blocks<'m> {
    pub(super) mirror: &'m Mirror,
}

impl UnitCopy for Blocks<'_> {
    type Error = CopyError;
    fn copy(&self, unit: u64) -> Result<(), CopyError> {
        if self.mirror.log_block(unit)? {
            return Ok(());
        }
        self.mirror.copy_blocks(&[unit])
    }
}
