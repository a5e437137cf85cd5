//! The copy log: a workload write's copy before write, made durable on the
//! controller disk instead of the secondary.
//!
//! While split, the first write to a block the secondary has not received
//! yet must save the block's instant before the primary changes, and make
//! durable that the block was written since the split (its bit in `W`).
//! Done directly, that is a write and a flush of the secondary, then a
//! write and a flush of the controller disk, one after the other; and the
//! secondary's flush also waits for whatever the copier has written to it
//! since its last flush. Through the log it is one write of a slot (a
//! header naming the block, then its bytes; [`super::layout`]) and one
//! flush, both on the controller disk: the slot says both things at once.
//!
//! A logged block counts as copied (its claim is finished) although the
//! secondary does not hold it yet; [`Mirror::apply_log`] writes the
//! logged blocks to the secondary, flushes it, makes their `W` bits
//! durable, and only then frees their slots. The copier applies the log
//! when half of it is used and when it has nothing else to claim; a
//! backup applies it before it reads a window from the secondary; a
//! reopened split replays every valid slot of the pending split
//! ([`Mirror::replay_log`]). When every slot is used, a write copies the
//! block to the secondary as without the log: the log never grows past
//! [`super::layout::LOG_BYTES`] of blocks, and nobody waits for a slot.
//!
//! This module must never free a slot before its block is durable on the
//! secondary and its `W` bit durable on the controller disk, never write
//! the secondary with anything but a block's instant, and never apply a
//! slot of another split.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::blockio::write_then_flush;
use super::controller::{CopyError, Mirror};
use super::layout::{Geometry, LogHeader, Phase};
use super::Error;
use crate::backup::tape::checksum;
use crate::devices::block::SECTOR_SIZE;

/// Bytes of logged blocks read back and written to the secondary at once
/// (one block at least).
const APPLY_BYTES: u64 = 256 << 10;

/// Blocks an apply moves at once.
fn apply_blocks(geo: &Geometry) -> u64 {
    (APPLY_BYTES / geo.block_bytes).max(1)
}

/// Bytes the log's buffers take at most: a slot a workload write fills
/// and the chunk an apply moves (an apply runs one at a time).
pub(super) fn memory_bytes(geo: &Geometry) -> u64 {
    SECTOR_SIZE as u64 + geo.block_bytes + apply_blocks(geo) * geo.block_bytes
}

/// A logged block: the block and its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Logged {
    pub(super) block: u64,
    pub(super) slot: u64,
}

impl Mirror {
    /// Copy before write through the log: reads block `b` from the primary
    /// and writes it with its header to a free slot, then flushes the
    /// controller disk. `Ok(false)` if no slot is free (the caller copies
    /// to the secondary instead). A failing controller disk fails the
    /// write, as for its intent bit (reported as [`CopyError::Primary`]).
    pub(super) fn log_block(&self, b: u64) -> Result<bool, CopyError> {
        let (slot, split) = {
            let mut g = self.inner.lock();
            let all = self.geo.log_slots();
            let free = !g.log_used & (u64::MAX >> (64 - all));
            if g.sb.phase != Phase::Split || free == 0 {
                return Ok(false);
            }
            let slot = u64::from(free.trailing_zeros());
            g.log_used |= 1 << slot;
            (slot, g.sb.splits)
        };
        let r = self.write_slot(b, slot, split);
        let mut g = self.inner.lock();
        match r {
            Ok(()) => {
                g.log.push(Logged { block: b, slot });
                self.logged.fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(e) => {
                g.log_used &= !(1 << slot);
                Err(e)
            }
        }
    }

    fn write_slot(&self, b: u64, slot: u64, split: u64) -> Result<(), CopyError> {
        let (sector, len) = self.geo.extent(b);
        let mut buf = Vec::new();
        buf.try_reserve_exact(SECTOR_SIZE + len)
            .map_err(|_| CopyError::NoMemory((SECTOR_SIZE + len) as u64))?;
        buf.resize(SECTOR_SIZE + len, 0);
        self.disks
            .primary
            .read(sector, &mut buf[SECTOR_SIZE..])
            .map_err(CopyError::Primary)?;
        let header = LogHeader {
            split,
            block: b,
            len: len as u64,
            sum: checksum(&buf[SECTOR_SIZE..]),
        };
        buf[..SECTOR_SIZE].copy_from_slice(&header.encode());
        let at = self.geo.log_slot_at(slot);
        write_then_flush(&*self.disks.control, at, &buf, true).map_err(CopyError::Primary)
    }

    /// Writes the logged blocks to the secondary and frees their slots
    /// (see the module docs): all of them if `all` (every block logged
    /// before the call is on the secondary when it returns), else only
    /// once half the slots are used. Does nothing while not split or
    /// while a split or resync runs.
    pub(super) fn apply_log(&self, all: bool) -> Result<(), Error> {
        let due = if all { 1 } else { self.geo.log_slots() / 2 };
        let (entries, w, broken) = loop {
            let mut g = self.inner.lock();
            if g.log_busy && all {
                drop(g);
                (self.relax)();
                continue;
            }
            if g.log_busy || g.gate || g.sb.phase != Phase::Split || (g.log.len() as u64) < due {
                return Ok(());
            }
            g.log_busy = true;
            break (g.log.clone(), 1 - g.sb.d, g.sb.broken.is_some());
        };
        let r = self.apply_entries(&entries, w, broken);
        let mut g = self.inner.lock();
        g.log_busy = false;
        if r.is_ok() {
            g.log.retain(|l| !entries.contains(l));
            for l in &entries {
                g.log_used &= !(1 << l.slot);
            }
        }
        r
    }

    /// The blocks of `entries` to the secondary (unless the split is
    /// broken, when a resync copies them anyway) and flushed, then their
    /// bits in area `w` durable.
    fn apply_entries(&self, entries: &[Logged], w: usize, broken: bool) -> Result<(), Error> {
        if !broken {
            match self.log_to_secondary(entries) {
                Ok(()) => {}
                Err(CopyError::Secondary(e)) => self.suspend(&e)?,
                Err(e) => return Err(self.copy_failed(e)),
            }
        }
        for l in entries {
            self.mark_durable(w, l.block)?;
        }
        Ok(())
    }

    /// Reads the logged blocks back from the controller disk, a chunk at
    /// a time, writes them to the secondary, then flushes it.
    fn log_to_secondary(&self, entries: &[Logged]) -> Result<(), CopyError> {
        let bs = self.geo.block_bytes as usize;
        let per = apply_blocks(&self.geo) as usize;
        let mut buf: Vec<u8> = Vec::new();
        for chunk in entries.chunks(per) {
            let places = chunk.iter().map(|l| {
                let (_, len) = self.geo.extent(l.block);
                (self.geo.log_slot_at(l.slot) + 1, len)
            });
            let control = &*self.disks.control;
            buf = self.read_pieces(control, places, buf, CopyError::Primary)?;
            self.write_pieces(chunk.iter().map(|l| l.block).zip(buf.chunks(bs)), false)?;
        }
        self.flushing(|| self.disks.secondary.flush().map_err(CopyError::Secondary))
    }

    /// Reopening a pending split: every valid slot of this split goes to
    /// the secondary (unless the split is broken) and its block's bit to
    /// area `W`, then both are made durable. Slots are all free after.
    pub(super) fn replay_log(&self) -> Result<(), Error> {
        let (split, w, mut broken) = {
            let g = self.inner.lock();
            (g.sb.splits, 1 - g.sb.d, g.sb.broken.is_some())
        };
        let mut head = [0u8; SECTOR_SIZE];
        let bytes = self.geo.block_bytes;
        let mut data = crate::support::try_filled(bytes, 0u8).ok_or(Error::NoMemory(bytes))?;
        let mut found = false;
        for slot in 0..self.geo.log_slots() {
            let at = self.geo.log_slot_at(slot);
            self.disks.control.read(at, &mut head).map_err(Error::Io)?;
            let Some(h) = LogHeader::decode(&head) else {
                continue;
            };
            if h.split != split || h.block >= self.geo.blocks() {
                continue;
            }
            let (sector, len) = self.geo.extent(h.block);
            if h.len != len as u64 {
                continue;
            }
            let data = &mut data[..len];
            self.disks.control.read(at + 1, data).map_err(Error::Io)?;
            if checksum(data) != h.sum {
                continue;
            }
            if !broken {
                if let Err(e) = self.disks.secondary.write(sector, data) {
                    self.suspend(&e)?;
                    broken = true;
                }
            }
            self.inner.lock().areas[w].set(h.block);
            found = true;
        }
        if !found {
            return Ok(());
        }
        if !broken {
            if let Err(e) = self.disks.secondary.flush() {
                self.suspend(&e)?;
            }
        }
        self.write_area(w)
    }
}
