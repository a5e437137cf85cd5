//! The refcount table and blocks of a writable image: reading a cluster's
//! refcount, allocating free clusters, adding refcount blocks and growing
//! the refcount table, in the order that keeps a crash harmless.
//!
//! The ordering rules (QEMU's own):
//! - a new refcount block counts itself and is written and flushed before
//!   the refcount table entry that names it;
//! - when the table grows, the new table and its new blocks are written
//!   and flushed before the header points at them, and the old table is
//!   freed only after that;
//! - [`Refcounts::alloc`] sets refcounts in the cached block; the caller
//!   writes them ([`Refcounts::sync`]) and flushes before anything points
//!   at the clusters (the same flush may cover the clusters' contents).
//!
//! So a crash leaks at most what was counted and not yet pointed at: the
//! clusters of the allocation in progress, or during table growth the old
//! table, or the new table and its new blocks.
//!
//! Memory: the refcount table whole (at most 8 MiB, QEMU's own bound,
//! checked by the header parser) and one block. This module must never
//! lower a refcount that something still points at, and never point at a
//! block before it is durable.

use alloc::format;
use alloc::vec::Vec;

use super::{Geometry, Result};
use crate::backup::qcow2::{be64, buffer, invalid, placed, Qcow2Error, REFTABLE_RESERVED};
use crate::devices::block::{read_bytes, write_bytes, BlockDevice, SECTOR_SIZE};

/// The refcount of entry `k` of a block of `bits`-wide refcounts.
pub(super) fn get(block: &[u8], bits: u64, k: u64) -> u64 {
    let bit = k * bits;
    let at = (bit / 8) as usize;
    let mut v = 0u64;
    if bits >= 8 {
        for b in &block[at..at + (bits / 8) as usize] {
            v = (v << 8) | u64::from(*b);
        }
        v
    } else {
        // Sub-byte widths count from the least significant bit.
        u64::from(block[at] >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Sets entry `k` of a block of `bits`-wide refcounts to `v`.
pub(super) fn set(block: &mut [u8], bits: u64, k: u64, v: u64) {
    let bit = k * bits;
    let at = (bit / 8) as usize;
    if bits >= 8 {
        let n = (bits / 8) as usize;
        block[at..at + n].copy_from_slice(&v.to_be_bytes()[8 - n..]);
    } else {
        let mask = (((1u16 << bits) - 1) as u8) << (bit % 8);
        block[at] = (block[at] & !mask) | (((v as u8) << (bit % 8)) & mask);
    }
}

/// The refcount structures of a writable image.
#[derive(Debug)]
pub(super) struct Refcounts {
    table: Vec<u64>,
    table_offset: u64,
    block: Vec<u8>,
    loaded: Option<u64>,
    /// Dirty byte range of the cached block.
    dirty: Option<(usize, usize)>,
    /// No free cluster lies below this one.
    cursor: u64,
    /// Every cluster from here on has refcount 0.
    end: u64,
}

impl Refcounts {
    /// Reads the table and finds the end of the used clusters.
    pub(super) fn open(
        dev: &dyn BlockDevice,
        g: &Geometry,
        offset: u64,
        clusters: u64,
    ) -> Result<Self> {
        let entries = clusters * g.cs / 8;
        let mut raw = buffer(entries * 8, "refcount table")?;
        read_bytes(dev, offset, &mut raw)?;
        let mut table = Vec::new();
        table
            .try_reserve_exact(entries as usize)
            .map_err(|_| Qcow2Error::TooLarge(format!("refcount table: {} bytes", entries * 8)))?;
        for i in 0..entries {
            let e = be64(&raw, (i * 8) as usize);
            if e & REFTABLE_RESERVED != 0 {
                return Err(invalid(format!(
                    "refcount table entry {i} ({e:#x}) has reserved bits set"
                )));
            }
            if e != 0 {
                placed(&format!("refcount block {i}"), e, g.cs, g.cs, g.file_len)?;
            }
            table.push(e);
        }
        let mut rc = Refcounts {
            table,
            table_offset: offset,
            block: buffer(g.cs, "refcount block")?,
            loaded: None,
            dirty: None,
            cursor: 0,
            end: 0,
        };
        rc.end = rc.find_end(dev, g)?;
        Ok(rc)
    }

    /// One past the last cluster with a nonzero refcount.
    fn find_end(&mut self, dev: &dyn BlockDevice, g: &Geometry) -> Result<u64> {
        for b in (0..self.table.len() as u64).rev() {
            if !self.load(dev, g, b)? {
                continue;
            }
            if let Some(k) = (0..g.per_block)
                .rev()
                .find(|&k| get(&self.block, g.rc_bits, k) != 0)
            {
                return Ok(b * g.per_block + k + 1);
            }
        }
        Ok(0)
    }

    /// The refcount table's host offset and length in clusters.
    pub(super) fn table_place(&self, g: &Geometry) -> (u64, u64) {
        (
            self.table_offset,
            (self.table.len() as u64 * 8).div_ceil(g.cs),
        )
    }

    /// Loads block `b` into the cache (writing the dirty part of the one
    /// it replaces); false if the block does not exist.
    fn load(&mut self, dev: &dyn BlockDevice, g: &Geometry, b: u64) -> Result<bool> {
        if self.loaded == Some(b) {
            return Ok(true);
        }
        let offset = self.table.get(b as usize).copied().unwrap_or(0);
        if offset == 0 {
            return Ok(false);
        }
        self.sync(dev)?;
        self.loaded = None;
        read_bytes(dev, offset, &mut self.block)?;
        let _ = g;
        self.loaded = Some(b);
        Ok(true)
    }

    /// Writes the cached block's changed sectors (no flush).
    pub(super) fn sync(&mut self, dev: &dyn BlockDevice) -> Result<()> {
        if let (Some((lo, hi)), Some(b)) = (self.dirty.take(), self.loaded) {
            let (lo, hi) = (
                lo / SECTOR_SIZE * SECTOR_SIZE,
                hi.next_multiple_of(SECTOR_SIZE),
            );
            write_bytes(dev, self.table[b as usize] + lo as u64, &self.block[lo..hi])?;
        }
        Ok(())
    }

    fn mark(&mut self, g: &Geometry, k: u64) {
        let lo = (k * g.rc_bits / 8) as usize;
        let hi = lo + (g.rc_bits / 8).max(1) as usize;
        self.dirty = Some(match self.dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }

    /// Sets the refcount of cluster `c`, whose block exists, in the cache.
    pub(super) fn set_refcount(
        &mut self,
        dev: &dyn BlockDevice,
        g: &Geometry,
        c: u64,
        v: u64,
    ) -> Result<()> {
        let b = c / g.per_block;
        if !self.load(dev, g, b)? {
            return Err(invalid(format!(
                "host cluster {:#x} has no refcount block",
                c * g.cs
            )));
        }
        set(&mut self.block, g.rc_bits, c % g.per_block, v);
        self.mark(g, c % g.per_block);
        if v == 0 {
            self.cursor = self.cursor.min(c);
        } else {
            self.end = self.end.max(c + 1);
        }
        Ok(())
    }

    /// Allocates one free cluster with refcount 1 (in the cache: call
    /// [`Self::sync`] and flush before pointing at it). Adds refcount
    /// blocks and grows the table as needed; those are durable on return.
    pub(super) fn alloc(&mut self, dev: &dyn BlockDevice, g: &Geometry) -> Result<u64> {
        loop {
            let c = self.cursor;
            if c >= g.cap_clusters {
                return Err(Qcow2Error::TooLarge(format!(
                    "no free cluster left in the {}-byte image file (grow the file: \
                     qcow2 images grow as they are written)",
                    g.file_len
                )));
            }
            let b = c / g.per_block;
            if b >= self.table.len() as u64 {
                self.grow(dev, g, b)?;
                continue;
            }
            if !self.load(dev, g, b)? {
                self.new_block(dev, g, b, c)?;
                continue;
            }
            let last = ((b + 1) * g.per_block).min(g.cap_clusters);
            match (c..last).find(|&x| get(&self.block, g.rc_bits, x % g.per_block) == 0) {
                Some(x) => {
                    self.set_refcount(dev, g, x, 1)?;
                    self.cursor = x + 1;
                    return Ok(x);
                }
                None => self.cursor = last,
            }
        }
    }

    /// Adds refcount block `b` at cluster `c` (in its own range), counting
    /// itself; written and flushed before the table names it.
    fn new_block(&mut self, dev: &dyn BlockDevice, g: &Geometry, b: u64, c: u64) -> Result<()> {
        self.sync(dev)?;
        self.loaded = None;
        self.block.fill(0);
        set(&mut self.block, g.rc_bits, c % g.per_block, 1);
        write_bytes(dev, c * g.cs, &self.block)?;
        dev.flush()?;
        self.table[b as usize] = c * g.cs;
        self.write_table_entry(dev, b)?;
        dev.flush()?;
        self.loaded = Some(b);
        self.end = self.end.max(c + 1);
        self.cursor = self.cursor.max(c + 1);
        Ok(())
    }

    fn write_table_entry(&self, dev: &dyn BlockDevice, b: u64) -> Result<()> {
        let first = (b as usize * 8) / SECTOR_SIZE * SECTOR_SIZE / 8;
        let mut sector = [0u8; SECTOR_SIZE];
        for (k, w) in sector.as_chunks_mut::<8>().0.iter_mut().enumerate() {
            let v = self.table.get(first + k).copied().unwrap_or(0);
            w.copy_from_slice(&v.to_be_bytes());
        }
        write_bytes(dev, self.table_offset + first as u64 * 8, &sector)?;
        Ok(())
    }

    /// Grows the table to cover block `need`: new blocks and the new table
    /// go after every used cluster, count themselves, and are durable
    /// before the header switches to them; then the old table is freed.
    fn grow(&mut self, dev: &dyn BlockDevice, g: &Geometry, need: u64) -> Result<()> {
        self.sync(dev)?;
        self.loaded = None;
        let old_len = self.table.len() as u64;
        let entries = (need + 1).max(old_len * 2).next_multiple_of(g.cs / 8);
        let clusters = entries * 8 / g.cs;
        let start = self.end.max(self.cursor);
        // New blocks for the uncovered part of [start, start + k + clusters).
        let mut k = 0;
        let fresh = loop {
            let span = start..start + k + clusters;
            let fresh: Vec<u64> = (span.start / g.per_block..=(span.end - 1) / g.per_block)
                .filter(|&b| self.table.get(b as usize).is_none_or(|&e| e == 0))
                .collect();
            if fresh.len() as u64 == k {
                break fresh;
            }
            k = fresh.len() as u64;
        };
        let table_at = start + k;
        if table_at + clusters > g.cap_clusters {
            return Err(Qcow2Error::TooLarge(format!(
                "no room to grow the refcount table in the {}-byte image file",
                g.file_len
            )));
        }
        let mut table = self.table.clone();
        table.resize(entries as usize, 0);
        for (n, &b) in fresh.iter().enumerate() {
            table[b as usize] = (start + n as u64) * g.cs;
        }
        // Count every new cluster: in a new block (written whole below) or
        // in an existing one (a leak if the header never switches).
        let mut blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        for &b in &fresh {
            blocks.push((b, buffer(g.cs, "refcount block")?));
        }
        for c in start..table_at + clusters {
            let b = c / g.per_block;
            if let Some((_, blk)) = blocks.iter_mut().find(|(x, _)| *x == b) {
                set(blk, g.rc_bits, c % g.per_block, 1);
            } else {
                self.set_refcount(dev, g, c, 1)?;
            }
        }
        self.sync(dev)?;
        for (b, blk) in &blocks {
            write_bytes(dev, table[*b as usize], blk)?;
        }
        let mut raw = buffer(entries * 8, "refcount table")?;
        for (i, e) in table.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&e.to_be_bytes());
        }
        write_bytes(dev, table_at * g.cs, &raw)?;
        dev.flush()?;
        // Offsets 48 (table offset) and 56 (its clusters) share sector 0.
        let mut sector = [0u8; SECTOR_SIZE];
        read_bytes(dev, 0, &mut sector)?;
        sector[48..56].copy_from_slice(&(table_at * g.cs).to_be_bytes());
        sector[56..60].copy_from_slice(&(clusters as u32).to_be_bytes());
        write_bytes(dev, 0, &sector)?;
        dev.flush()?;
        let (old_at, old_clusters) = self.table_place(g);
        self.table = table;
        self.table_offset = table_at * g.cs;
        self.end = self.end.max(table_at + clusters);
        self.cursor = self.cursor.max(self.end);
        for c in old_at / g.cs..old_at / g.cs + old_clusters {
            self.set_refcount(dev, g, c, 0)?;
        }
        self.sync(dev)?;
        dev.flush()?;
        Ok(())
    }
}
