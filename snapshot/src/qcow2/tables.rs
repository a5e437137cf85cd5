//! The L1 table and a small cache of L2 tables: what each virtual cluster
//! maps to, and publishing new mappings.
//!
//! The L1 table is held whole (at most 32 MiB, QEMU's bound, checked by
//! the header parser; allocated fallibly); L2 tables are cached
//! [`CACHED_L2`] at a time. A new L2 table is counted and written zeroed
//! at once, and named in the L1 table in memory; the L1 entry is written
//! with the next write-back's L2 entries, after the flush that makes the
//! count and the zeros durable (no flush of its own).
//!
//! Published entries are written back lazily, as QEMU's L2 cache does: a
//! publish changes the cached table and marks the sectors it touched
//! dirty; [`Tables::write_back`] writes every dirty range later, in one
//! go, after the caller has made the refcounts and the data those entries
//! point at durable (one flush for a whole batch of entries). Only clean
//! tables are evicted, so the caller keeps fewer than [`CACHED_L2`] dirty
//! ([`Tables::dirty`]).
//!
//! A write-back may also run without the caller's lock over the flush
//! ([`Tables::take_dirty`]): the dirty ranges are copied out and their
//! tables pinned until the copies are on disk (a pinned table is never
//! evicted, or reloading it would lose entries not yet written).
//!
//! This module must never write an entry pointing at a cluster whose
//! refcount and data are not yet durable: its callers order that, by
//! flushing before [`Tables::write_back`].

use alloc::format;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::refcount::Refcounts;
use super::{Geometry, Result};
use crate::backup::qcow2::{
    be64, buffer, host_of, invalid, l1_entry, l2_entry, placed, Qcow2Error, COPIED, ZERO_FLAG,
};
use crate::devices::block::{read_bytes, write_bytes, BlockDevice, SECTOR_SIZE};

/// L2 tables kept in memory (1 MiB of 64 KiB clusters: QEMU's default
/// L2 cache, which maps 8 GiB).
pub const CACHED_L2: usize = 16;

/// L2 tables cached at once for an image of `l1_size` tables: never more
/// than it has (an 8 MiB image of 2 MiB clusters has one table of 2 MiB,
/// not sixteen), so such an image never evicts one.
pub fn cached_l2(l1_size: u32) -> usize {
    CACHED_L2.min((l1_size as usize).max(1))
}

const COMPRESSED: u64 = 1 << 62;

/// What one virtual cluster maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// Unallocated: reads come from the backing chain (zeros without one).
    Hole,
    /// Reads as zeros, no host cluster.
    Zero,
    /// Reads as zeros; owns the host cluster at this offset.
    ZeroAlloc(u64),
    /// Data at this host offset, refcount one (writable in place).
    Data(u64),
    /// Data at this host offset shared with something else (refcount
    /// above one): readable, never written in place.
    Shared(u64),
}

impl Entry {
    /// Decodes the L2 entry of virtual cluster `vc`, checked.
    fn decode(raw: u64, vc: u64, g: &Geometry) -> Result<Entry> {
        if raw & COMPRESSED != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "compressed cluster at virtual offset {:#x}",
                vc * g.cs
            )));
        }
        l2_entry(raw, vc, g.cs, g.file_len)?;
        let host = host_of(raw);
        Ok(match (raw & ZERO_FLAG != 0, host, raw & COPIED != 0) {
            (true, 0, _) => Entry::Zero,
            (true, h, _) => Entry::ZeroAlloc(h),
            (false, 0, _) => Entry::Hole,
            (false, h, true) => Entry::Data(h),
            (false, h, false) => Entry::Shared(h),
        })
    }

    /// The raw L2 entry for this mapping.
    pub fn encode(self) -> u64 {
        match self {
            Entry::Hole => 0,
            Entry::Zero => ZERO_FLAG,
            Entry::ZeroAlloc(h) => h | ZERO_FLAG | COPIED,
            Entry::Data(h) => h | COPIED,
            Entry::Shared(h) => h,
        }
    }
}

/// A cached L2 table.
#[derive(Debug)]
struct Slot {
    /// Which table (`u64::MAX` while loading).
    table: u64,
    bytes: Vec<u8>,
    /// Byte range changed in memory and not yet written.
    dirty: Option<(usize, usize)>,
    /// The write-back whose copy of this table's changes may not be on
    /// disk yet (pinned while the write-backs done are fewer).
    pin: u64,
}

/// Changed sectors of one L2 table copied out for a write-back: the
/// table's host offset plus the range's start, and the bytes.
pub(super) type Pending = Vec<(u64, Vec<u8>)>;

/// The L1 table and the L2 cache.
#[derive(Debug)]
pub(super) struct Tables {
    l1: Vec<u64>,
    cache: Vec<Slot>,
    victim: usize,
    /// Write-backs whose copies are on disk (see [`Self::take_dirty`]).
    written: Arc<AtomicU64>,
    /// L1 entries changed in memory and not yet written (a range).
    l1_dirty: Option<(usize, usize)>,
    /// Host offset of the L1 table.
    l1_offset: u64,
}

impl Tables {
    /// Reads and checks the L1 table.
    pub(super) fn open(dev: &dyn BlockDevice, g: &Geometry, l1_size: u32) -> Result<Self> {
        let used = g.vclusters.div_ceil(g.l2_entries);
        let mut raw = buffer(u64::from(l1_size) * 8, "L1 table")?;
        read_bytes(dev, g.l1_offset, &mut raw)?;
        let mut l1 = Vec::new();
        l1.try_reserve_exact(used as usize)
            .map_err(|_| Qcow2Error::TooLarge(format!("L1 table: {} bytes", used * 8)))?;
        for i in 0..used {
            let e = be64(&raw, (i * 8) as usize);
            let at = l1_entry(i, e)?;
            if at != 0 {
                placed(&format!("L2 table {i}"), at, g.cs, g.cs, g.file_len)?;
            }
            l1.push(e);
        }
        Ok(Tables {
            l1,
            cache: Vec::new(),
            victim: 0,
            written: Arc::new(AtomicU64::new(0)),
            l1_dirty: None,
            l1_offset: g.l1_offset,
        })
    }

    /// Decodes every entry of every L2 table, so that what the device
    /// cannot serve (a compressed cluster) is refused when the image is
    /// opened, not on the read that meets it.
    pub(super) fn check_all(&mut self, dev: &dyn BlockDevice, g: &Geometry) -> Result<()> {
        for i in 0..self.l1.len() as u64 {
            if host_of(self.l1[i as usize]) == 0 {
                continue;
            }
            let last = ((i + 1) * g.l2_entries).min(g.vclusters);
            for vc in i * g.l2_entries..last {
                self.entry(dev, g, vc)?;
            }
        }
        Ok(())
    }

    /// The cache slot holding L2 table `i`, loading it; `None` if the
    /// table does not exist.
    fn slot(&mut self, dev: &dyn BlockDevice, g: &Geometry, i: u64) -> Result<Option<usize>> {
        let at = host_of(self.l1[i as usize]);
        if at == 0 {
            return Ok(None);
        }
        if let Some(s) = self.cache.iter().position(|c| c.table == i) {
            return Ok(Some(s));
        }
        let s = if self.cache.len() < cached_l2(self.l1.len() as u32) {
            self.cache.push(Slot {
                table: i,
                bytes: buffer(g.cs, "L2 table")?,
                dirty: None,
                pin: 0,
            });
            self.cache.len() - 1
        } else {
            // Round robin over the clean slots: a dirty or pinned one
            // waits for its write-back.
            let n = self.cache.len();
            let s = (1..=n)
                .map(|k| (self.victim + k) % n)
                .find(|&s| self.evictable(s))
                .ok_or_else(|| invalid("every cached L2 table awaits its write-back"))?;
            self.victim = s;
            s
        };
        self.cache[s].table = u64::MAX;
        read_bytes(dev, at, &mut self.cache[s].bytes)?;
        self.cache[s].table = i;
        Ok(Some(s))
    }

    /// What virtual cluster `vc` maps to.
    pub(super) fn entry(&mut self, dev: &dyn BlockDevice, g: &Geometry, vc: u64) -> Result<Entry> {
        let (i, j) = (vc / g.l2_entries, vc % g.l2_entries);
        match self.slot(dev, g, i)? {
            None => Ok(Entry::Hole),
            Some(s) => Entry::decode(be64(&self.cache[s].bytes, (j * 8) as usize), vc, g),
        }
    }

    /// Makes sure L2 table `i` exists: allocates and counts a new one (in
    /// the cached refcounts), writes it zeroed and names it in the L1
    /// table in memory. The L1 entry reaches the disk with the next
    /// write-back, after its flush: the count and the zeros first.
    pub(super) fn ensure(
        &mut self,
        dev: &dyn BlockDevice,
        g: &Geometry,
        rc: &mut Refcounts,
        i: u64,
    ) -> Result<()> {
        if host_of(self.l1[i as usize]) != 0 {
            return Ok(());
        }
        let c = rc.alloc(dev, g)?;
        let zero = buffer(g.cs, "L2 table")?;
        write_bytes(dev, c * g.cs, &zero)?;
        self.l1[i as usize] = (c * g.cs) | COPIED;
        let (lo, hi) = self.l1_dirty.unwrap_or((usize::MAX, 0));
        self.l1_dirty = Some((lo.min(i as usize), hi.max(i as usize + 1)));
        Ok(())
    }

    /// Whether L1 entries changed in memory wait for a write-back.
    pub(super) fn l1_dirty(&self) -> bool {
        self.l1_dirty.is_some()
    }

    /// Sets the entries of virtual clusters in one L2 table, which exists,
    /// in the cache, marking them dirty: [`Self::write_back`] writes them.
    pub(super) fn publish(
        &mut self,
        dev: &dyn BlockDevice,
        g: &Geometry,
        entries: &[(u64, Entry)],
    ) -> Result<()> {
        let Some(&(first_vc, _)) = entries.first() else {
            return Ok(());
        };
        let i = first_vc / g.l2_entries;
        let s = self
            .slot(dev, g, i)?
            .ok_or_else(|| invalid(format!("L2 table {i} missing when publishing")))?;
        let slot = &mut self.cache[s];
        let (mut lo, mut hi) = slot.dirty.unwrap_or((usize::MAX, 0));
        for &(vc, e) in entries {
            debug_assert_eq!(vc / g.l2_entries, i, "one table per publish");
            let at = ((vc % g.l2_entries) * 8) as usize;
            slot.bytes[at..at + 8].copy_from_slice(&e.encode().to_be_bytes());
            (lo, hi) = (lo.min(at), hi.max(at + 8));
        }
        slot.dirty = Some((lo, hi));
        Ok(())
    }

    fn evictable(&self, s: usize) -> bool {
        let c = &self.cache[s];
        c.dirty.is_none() && c.pin <= self.written.load(Ordering::Acquire)
    }

    /// Cached tables that cannot be evicted: entries not yet written, or
    /// a write-back's copy not yet on disk.
    pub(super) fn dirty(&self) -> usize {
        (0..self.cache.len())
            .filter(|&s| !self.evictable(s))
            .count()
    }

    /// The count of write-backs done, which the one that took copies
    /// with [`Self::take_dirty`] raises once they are on disk (without
    /// the caller's lock over the tables).
    pub(super) fn written(&self) -> Arc<AtomicU64> {
        self.written.clone()
    }

    /// Copies out the changed sectors of every dirty table for write-back
    /// number `generation` (one more than [`Self::written`] holds), marks
    /// them clean and pins them until that count reaches `generation`.
    pub(super) fn take_dirty(&mut self, generation: u64) -> Result<Pending> {
        let mut pending = Vec::new();
        for slot in &mut self.cache {
            let Some((lo, hi)) = slot.dirty else {
                continue;
            };
            let (lo, hi) = (
                lo / SECTOR_SIZE * SECTOR_SIZE,
                hi.next_multiple_of(SECTOR_SIZE),
            );
            let mut copy = Vec::new();
            copy.try_reserve_exact(hi - lo)
                .map_err(|_| Qcow2Error::TooLarge("L2 write-back copy".into()))?;
            copy.extend_from_slice(&slot.bytes[lo..hi]);
            pending.push((host_of(self.l1[slot.table as usize]) + lo as u64, copy));
            slot.dirty = None;
            slot.pin = slot.pin.max(generation);
        }
        if let Some((lo, hi)) = self.l1_dirty {
            let mut copy = Vec::new();
            copy.try_reserve_exact((hi - lo) * 8)
                .map_err(|_| Qcow2Error::TooLarge("L1 write-back copy".into()))?;
            for e in &self.l1[lo..hi] {
                copy.extend_from_slice(&e.to_be_bytes());
            }
            pending.push((self.l1_offset + lo as u64 * 8, copy));
            self.l1_dirty = None;
        }
        Ok(pending)
    }

    /// Writes the changed sectors of every dirty table (no flush). The
    /// caller has made durable whatever the new entries point at.
    pub(super) fn write_back(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        // Generation 0 pins nothing.
        for (at, bytes) in self.take_dirty(0)? {
            write_bytes(dev, at, &bytes)?;
        }
        Ok(())
    }
}
