//! Batched reads of [`Qcow2Disk`]: several virtual ranges looked up at
//! once and their data clusters read from the image file in one transfer,
//! several requests in flight, instead of one request after another. The
//! split reads a batch's runs from the chain this way.
//!
//! This module must never write: it only reads the image file and the
//! chain below.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::{Qcow2Disk, WRITE_DEPTH};
use crate::backup::qcow2::Qcow2Error;
use crate::devices::block::{BlockDevice, Op, SECTOR_SIZE};
use crate::qcow2::{Entry, Result};

impl<D: BlockDevice> Qcow2Disk<D> {
    /// Serves `ops`, all reads (whole sectors, checked by the caller): each
    /// is cut into runs as [`Self::read_at`] does; holes read the chain
    /// below and zeros are filled at once, and the data runs of all of them
    /// go to the image file in one transfer, up to the file's depth (at
    /// most [`WRITE_DEPTH`]) in flight.
    pub(super) fn read_ops(&self, ops: &mut [Op<'_>]) -> Result<()> {
        let cs = self.geo.cs;
        let mut file_ops: Vec<Op<'_>> = Vec::new();
        for op in ops.iter_mut() {
            let Op::Read { sector, buf } = op else {
                return Err(Qcow2Error::Invalid("read_ops: not a read".into()));
            };
            let mut at = *sector * SECTOR_SIZE as u64;
            let mut rest: &mut [u8] = buf;
            while !rest.is_empty() {
                let (entry, n) = self.run(at, rest.len() as u64)?;
                let (part, tail) = core::mem::take(&mut rest).split_at_mut(n as usize);
                match entry {
                    Entry::Hole => self.read_below(at, part)?,
                    Entry::Zero | Entry::ZeroAlloc(_) => part.fill(0),
                    Entry::Data(h) | Entry::Shared(h) => {
                        file_ops
                            .try_reserve(1)
                            .map_err(|_| Qcow2Error::TooLarge("read batch".into()))?;
                        file_ops.push(Op::Read {
                            sector: (h + at % cs) / SECTOR_SIZE as u64,
                            buf: part,
                        });
                    }
                }
                at += n;
                rest = tail;
            }
        }
        if !file_ops.is_empty() {
            let depth = self.file.info().max_depth.clamp(1, WRITE_DEPTH);
            self.file.transfer(&mut file_ops, depth)?;
        }
        Ok(())
    }

    /// Reads what the chain below holds at each of `ops` (reads of whole
    /// sectors, in range) in one transfer to the device below, several in
    /// flight; zeros without a backing device.
    pub fn read_below_ops(&self, ops: &mut [Op<'_>]) -> Result<()> {
        match &self.backing {
            Some(b) if !self.detached.load(Ordering::Acquire) => {
                let depth = b.info().max_depth.clamp(1, WRITE_DEPTH);
                b.transfer(ops, depth)?;
            }
            _ => {
                for op in ops.iter_mut() {
                    if let Op::Read { buf, .. } = op {
                        buf.fill(0);
                    }
                }
            }
        }
        Ok(())
    }
}
