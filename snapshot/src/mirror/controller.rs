//! The controller's state, opening a pair (new or resumed), the workload's
//! requests and the write-intent protocol. The background work (pump,
//! copier, split, resync) is in [`super::work`].
//!
//! Locking: one spin lock over [`Inner`], held only for bookkeeping, never
//! across I/O. Waits (for the gate, for a bitmap sector another request
//! is writing, for a unit another copier holds) call the `relax` function
//! the owner passed (a thread yield in the kernel).

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::bitmap::Area;
use super::budget::try_vec;
use super::layout::{Geometry, Phase, Super, BLOCKS_PER_SECTOR};
use super::Error;
use crate::copyonce::{Access, Counters, Engine, UnitCopy};
use crate::devices::block::{check, BlockDevice, BlockError, Op, SECTOR_SIZE};

/// The three disks of a pair.
#[derive(Clone)]
pub struct Disks {
    /// The volume the workload uses.
    pub primary: Arc<dyn BlockDevice>,
    /// Its mirror.
    pub secondary: Arc<dyn BlockDevice>,
    /// The controller disk: superblock and bitmaps ([`super::layout`]).
    pub control: Arc<dyn BlockDevice>,
}

impl core::fmt::Debug for Disks {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = [&self.primary, &self.secondary, &self.control].map(|d| &d.info().name);
        f.debug_tuple("Disks").field(&names).finish()
    }
}

/// How to create a pair on a blank controller disk (ignored when it
/// resumes one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Bytes per block: a power of two from 512 B to 2 MiB.
    pub block_bytes: u64,
    /// The two volumes are known equal (both freshly zeroed, say): start
    /// in sync instead of marking every block.
    pub assume_clean: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            block_bytes: 64 << 10,
            assume_clean: false,
        }
    }
}

/// What [`Mirror::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// A new pair; this many blocks to copy for the initial sync.
    Created {
        /// Blocks marked.
        lagging: u64,
    },
    /// A paired volume; the secondary lags on this many blocks.
    Paired {
        /// Blocks marked.
        lagging: u64,
    },
    /// A pending split; this many blocks still to copy for its instant.
    Split {
        /// Blocks of the frozen bitmap not yet copied.
        pending: u64,
    },
}

/// Where the pair is, for progress and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The phase.
    pub phase: Phase,
    /// Paired: blocks the secondary lags on. Split: blocks written since.
    pub marked: u64,
    /// Split: blocks to copy for the instant, and how many are copied.
    pub pending: u64,
    /// Of `pending`, copied.
    pub copied: u64,
    /// Suspended or broken, with the reason.
    pub broken: Option<String>,
    /// Blocks the pump has copied since the mirror was opened.
    pub pumped: u64,
    /// Splits so far.
    pub splits: u64,
}

/// The controller's bookkeeping, behind the lock.
pub(super) struct Inner {
    /// The superblock as last written.
    pub(super) sb: Super,
    /// The two bitmap areas.
    pub(super) areas: [Area; 2],
    /// Split or resync in progress: new writes wait.
    pub(super) gate: bool,
    /// Writes between their entry and completion.
    pub(super) writes: u32,
    /// Blocks of those writes (a block per entry, repeated if written
    /// twice): the pump leaves them alone.
    pub(super) inflight: Vec<u64>,
    /// A pump batch runs: its blocks, still marked on disk.
    pub(super) pinned: Vec<u64>,
    /// A pump batch or backup window runs.
    pub(super) pump_busy: bool,
    pub(super) backup_busy: bool,
    /// A backup `via=memory` runs: it copies every block of the instant
    /// its windows hold itself, in its single pass over the volume, so
    /// the copier steps aside until it ends.
    pub(super) backup_copies: bool,
    /// Copier batches between their claim and their settling (at most
    /// [`super::copier::MAX_BATCHES`]).
    pub(super) copiers: u32,
    /// Sectors of area `d` holding blocks the copier or the pump has
    /// copied whose disk bits are not cleared yet, and how many blocks.
    pub(super) clears: Vec<u64>,
    pub(super) unclear: u64,
    /// Blocks the copier (split) or the pump (paired) has written to the
    /// secondary, whose copy no flush has made durable yet; their disk
    /// bits stay set meanwhile. Bounded: both flush once they reach
    /// [`super::copier::CLEAR_BYTES`].
    pub(super) unflushed: super::durable::Unflushed,
    /// Buffers of settled copier batches, for the next ones (at most
    /// [`super::copier::MAX_BATCHES`]; dropped when the copier runs out).
    pub(super) spare: Vec<Vec<u8>>,
    /// A superblock is being written.
    pub(super) super_busy: bool,
    /// Split: blocks of the frozen bitmap to copy.
    pub(super) pending: u64,
    /// Where the pump and the copier go on from.
    pub(super) cursor: u64,
}

/// How a bitmap sector is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SectorWrite {
    /// Write intent: written and flushed before the write it covers.
    Intent,
    /// A lazy clear: written (not flushed) only if the disk holds bits
    /// no longer needed.
    Lazy,
    /// Written whatever it holds, not flushed (a whole area).
    Always,
}

/// Why a block copy failed: which side, or no memory for its buffers.
pub(super) enum CopyError {
    Primary(BlockError),
    Secondary(BlockError),
    NoMemory(u64),
}

/// The controller of a mirrored pair. See the [module docs](super).
pub struct Mirror {
    pub(super) disks: Disks,
    pub(super) geo: Geometry,
    pub(super) inner: spin::Mutex<Inner>,
    /// The copy-once engine over the blocks, for the current split.
    pub(super) engine: Engine<Arc<[AtomicU64]>, Arc<Counters>>,
    pub(super) relax: fn(),
    pub(super) pumped: AtomicU64,
}

impl core::fmt::Debug for Mirror {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Mirror")
            .field("disks", &self.disks)
            .field("geometry", &self.geo)
            .finish()
    }
}

/// Bytes of memory a pair of `geo` needs for its bitmaps and copy map.
pub fn memory_bytes(geo: &Geometry) -> u64 {
    2 * Area::memory_bytes(geo.area_sectors()) + crate::copyonce::words_for(geo.blocks()) as u64 * 8
}

impl Mirror {
    /// The sizes.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The disks.
    pub fn disks(&self) -> &Disks {
        &self.disks
    }

    /// Where the pair is.
    pub fn status(&self) -> Status {
        let g = self.inner.lock();
        let split = g.sb.phase == Phase::Split;
        Status {
            phase: g.sb.phase,
            marked: g.areas[if split { 1 - g.sb.d } else { g.sb.d }].count(),
            pending: if split { g.pending } else { 0 },
            copied: if split { self.engine.completed() } else { 0 },
            broken: g.sb.broken.clone(),
            pumped: self.pumped.load(Ordering::Relaxed),
            splits: g.sb.splits,
        }
    }

    /// The engine's counts by cause for the current split.
    pub fn copy_stats(&self) -> crate::copyonce::Stats {
        self.engine.stats()
    }

    /// Reads from the primary.
    pub fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), Error> {
        self.disks.primary.read(sector, buf).map_err(Error::Io)
    }

    /// Writes `buf` to the primary at `sector`: intent marked durably
    /// first, and, while split, each block's instant copied to the
    /// secondary before the primary changes.
    pub fn write(&self, sector: u64, buf: &[u8]) -> Result<(), Error> {
        check(self.disks.primary.info(), &Op::Write { sector, buf }).map_err(Error::Io)?;
        if buf.is_empty() {
            return Ok(());
        }
        let bs = self.geo.block_bytes;
        let first = sector * SECTOR_SIZE as u64 / bs;
        let last = (sector * SECTOR_SIZE as u64 + buf.len() as u64 - 1) / bs;
        let (phase, d) = self.enter(first..=last);
        let r = self.write_entered(phase, d, first..=last, sector, buf);
        self.leave(first..=last);
        r
    }

    fn write_entered(
        &self,
        phase: Phase,
        d: usize,
        blocks: core::ops::RangeInclusive<u64>,
        sector: u64,
        buf: &[u8],
    ) -> Result<(), Error> {
        let mark_area = match phase {
            Phase::Paired => d,
            Phase::Split => 1 - d,
        };
        for b in blocks {
            if phase == Phase::Split {
                self.copy_before_write(d, b)?;
            }
            self.mark(mark_area, b)?;
        }
        self.disks.primary.write(sector, buf).map_err(Error::Io)
    }

    /// Split: block `b`'s instant goes to the secondary before the
    /// primary changes, unless it is there already. A secondary failure
    /// breaks the split (durably) and lets the write go on.
    fn copy_before_write(&self, d: usize, b: u64) -> Result<(), Error> {
        {
            let g = self.inner.lock();
            if g.sb.broken.is_some() {
                return Ok(());
            }
            if !g.areas[d].get(b) {
                // Pumped before the split but not flushed yet: its disk
                // bit is still set, so its copy must be durable before
                // the primary changes, as for a copier's block.
                let pumped = g.unflushed.contains(b);
                drop(g);
                return if pumped {
                    self.durable_before_write()
                } else {
                    Ok(())
                };
            }
        }
        let io = Blocks { mirror: self };
        match self.engine.copy_on_access(&io, b, self.relax) {
            Access::Failed(CopyError::Primary(e)) => Err(Error::Io(e)),
            Access::Failed(CopyError::NoMemory(n)) => Err(Error::NoMemory(n)),
            Access::Failed(CopyError::Secondary(e)) => {
                self.suspend(&e)?;
                Ok(())
            }
            // Copied by a copier batch not flushed yet: its copy must be
            // durable before the primary's block changes, or a crash
            // would resume the split from the newer primary.
            _ if self.inner.lock().unflushed.contains(b) => self.durable_before_write(),
            _ => Ok(()),
        }
    }

    /// Waits at the gate, then counts a write in flight on `blocks`;
    /// returns the phase and the `d` area then.
    fn enter(&self, blocks: core::ops::RangeInclusive<u64>) -> (Phase, usize) {
        loop {
            let mut g = self.inner.lock();
            if !g.gate {
                g.writes += 1;
                g.inflight.extend(blocks);
                return (g.sb.phase, g.sb.d);
            }
            drop(g);
            (self.relax)();
        }
    }

    fn leave(&self, blocks: core::ops::RangeInclusive<u64>) {
        let mut g = self.inner.lock();
        g.writes -= 1;
        for b in blocks {
            if let Some(i) = g.inflight.iter().position(|&x| x == b) {
                g.inflight.swap_remove(i);
            }
        }
    }

    /// Makes `block`'s bit in area `k` durable (write intent): set in
    /// memory, and on disk by a completed write that nobody is about to
    /// overwrite, before returning.
    pub(super) fn mark(&self, k: usize, block: u64) -> Result<(), Error> {
        let s = block / BLOCKS_PER_SECTOR;
        let mut g = self.inner.lock();
        g.areas[k].set(block);
        loop {
            if g.areas[k].is_writing(s) {
                drop(g);
                (self.relax)();
                g = self.inner.lock();
                continue;
            }
            if g.areas[k].on_disk(block) {
                return Ok(());
            }
            drop(g);
            self.write_bitmap_sector(k, s, SectorWrite::Intent)?;
            g = self.inner.lock();
        }
    }

    /// Writes sector `s` of area `k` as the bits now require, as `how`
    /// says; skips it if another request is writing it. On a failed write
    /// the sector's disk bits are taken as unknown (none set).
    pub(super) fn write_bitmap_sector(
        &self,
        k: usize,
        s: u64,
        how: SectorWrite,
    ) -> Result<(), Error> {
        let flush = how == SectorWrite::Intent;
        let bytes = {
            let mut g = self.inner.lock();
            if g.areas[k].is_writing(s) {
                return Ok(());
            }
            let bytes = self.sector_content(&g, k, s);
            if how == SectorWrite::Lazy && !g.areas[k].stale(s, &bytes) {
                return Ok(());
            }
            g.areas[k].set_writing(s, true);
            bytes
        };
        let sector = self.geo.area_at(k) + s;
        let r = write_then_flush(&*self.disks.control, sector, &bytes, flush);
        let mut g = self.inner.lock();
        g.areas[k].set_writing(s, false);
        match r {
            Ok(()) if flush => {
                g.areas[k].wrote(s, &bytes);
                Ok(())
            }
            Ok(()) => {
                g.areas[k].wrote_unflushed(s, &bytes);
                Ok(())
            }
            Err(e) => {
                g.areas[k].wrote(s, &[0; 512]);
                Err(Error::Io(e))
            }
        }
    }

    /// What sector `s` of area `k` must hold on disk: its bits, plus the
    /// pump's blocks in flight or not yet flushed on the secondary
    /// (paired, `d`), less the blocks already
    /// copied (split, `F`).
    fn sector_content(&self, g: &Inner, k: usize, s: u64) -> [u8; 512] {
        let paired = g.sb.phase == Phase::Paired;
        g.areas[k].sector_bytes(s, |i, mut w| {
            if k == g.sb.d && paired {
                let word = i as u64 * 64..(i as u64 + 1) * 64;
                for b in g.pinned.iter().copied().chain(g.unflushed.in_range(word)) {
                    if (b / 64) as usize == i {
                        w |= 1 << (b % 64);
                    }
                }
            } else if k == g.sb.d && w != 0 {
                let mut bits = w;
                while bits != 0 {
                    let b = i as u64 * 64 + u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    if self.engine.is_copied(b) && !g.unflushed.contains(b) {
                        w &= !(1 << (b % 64));
                    }
                }
            }
            w
        })
    }

    /// Writes the whole of area `k` as its bits now require, then
    /// flushes. Only while nothing else changes the bits (opening, or
    /// with the gate closed and the copiers idle).
    pub(super) fn write_area(&self, k: usize) -> Result<(), Error> {
        for s in 0..self.geo.area_sectors() {
            self.write_bitmap_sector(k, s, SectorWrite::Always)?;
        }
        self.disks.control.flush().map_err(Error::Io)?;
        let mut g = self.inner.lock();
        for s in 0..self.geo.area_sectors() {
            let bytes = self.sector_content(&g, k, s);
            g.areas[k].wrote(s, &bytes);
        }
        Ok(())
    }

    /// Writes the next superblock, as `change` makes it, and flushes.
    pub(super) fn write_super(&self, change: impl FnOnce(&mut Super)) -> Result<(), Error> {
        let mut g = self.inner.lock();
        while g.super_busy {
            drop(g);
            (self.relax)();
            g = self.inner.lock();
        }
        let mut next = g.sb.clone();
        change(&mut next);
        next.seq += 1;
        g.super_busy = true;
        drop(g);
        let bytes = next.encode();
        let r = write_then_flush(&*self.disks.control, next.slot_sector(), &bytes, true);
        let mut g = self.inner.lock();
        g.super_busy = false;
        r.map_err(Error::Io)?;
        g.sb = next;
        Ok(())
    }

    /// The error a failed block copy makes: a primary failure fails the
    /// request; a secondary failure suspends the pair (or breaks the
    /// split) first.
    pub(super) fn copy_failed(&self, e: CopyError) -> Error {
        match e {
            CopyError::Primary(e) => Error::Io(e),
            CopyError::NoMemory(n) => Error::NoMemory(n),
            CopyError::Secondary(e) => match self.suspend(&e) {
                Ok(()) => Error::Suspended(alloc::format!("{e}")),
                Err(other) => other,
            },
        }
    }

    /// A secondary failure: suspends the pair, or breaks the split, with
    /// a reason naming disk and sector, durably before anything goes on.
    pub(super) fn suspend(&self, e: &BlockError) -> Result<(), Error> {
        if self.inner.lock().sb.broken.is_some() {
            return Ok(());
        }
        let why: String = alloc::format!("{e}");
        self.write_super(|sb| {
            sb.broken.get_or_insert(why);
        })
    }

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
    pub(super) fn read_blocks(
        &self,
        blocks: &[u64],
        mut buf: Vec<u8>,
    ) -> Result<Vec<u8>, CopyError> {
        let bs = self.geo.block_bytes as usize;
        let bytes = bs * blocks.len();
        buf.try_reserve_exact(bytes.saturating_sub(buf.len()))
            .map_err(|_| CopyError::NoMemory(bytes as u64))?;
        buf.resize(bytes, 0);
        let mut ops: Vec<Op<'_>> = try_vec(blocks.len())?;
        for (piece, &b) in buf.chunks_mut(bs).zip(blocks) {
            let (sector, len) = self.geo.extent(b);
            ops.push(Op::Read {
                sector,
                buf: &mut piece[..len],
            });
        }
        let depth = self.disks.primary.info().max_depth.clamp(1, 32);
        self.disks
            .primary
            .transfer(&mut ops, depth)
            .map_err(CopyError::Primary)?;
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
fn write_then_flush(
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
        self.mirror.copy_blocks(&[unit])
    }
}
