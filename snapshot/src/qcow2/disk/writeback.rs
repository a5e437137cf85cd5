//! The write paths of [`Qcow2Disk`] that order durability: the data of
//! newly allocated clusters in chunks, and the metadata write-back (see
//! the parent module's docs for the order and what a crash may leak).
//!
//! This module must never write an L2 entry before the flush that makes
//! the refcounts and data it points at durable.

use alloc::vec::Vec;
use core::sync::atomic::Ordering;

use super::{Meta, Qcow2Disk, WRITE_DEPTH};
use crate::backup::qcow2::Qcow2Error;
use crate::devices::block::{write_bytes, BlockDevice, Op, SECTOR_SIZE};
use crate::qcow2::{Entry, Result};

impl<D: BlockDevice> Qcow2Disk<D> {
    /// Writes the chunks of `data` that `items` name to `hosts`, joining
    /// clusters whose chunks and hosts both follow each other into runs
    /// (zero entries between them do not break a run: they have no host),
    /// each written in requests of the write chunk, sent the write depth
    /// at a time ([`Self::set_write_depth`]).
    pub(super) fn write_data(
        &self,
        items: &[(u64, Entry, Option<usize>)],
        hosts: &[u64],
        data: &[u8],
    ) -> Result<()> {
        let cs = self.geo.cs as usize;
        let runs: Vec<(usize, u64)> = items
            .iter()
            .zip(hosts)
            .filter_map(|(item, &h)| item.2.map(|k| (k, h)))
            .collect();
        let chunk = match self.write_chunk.load(Ordering::Relaxed) {
            0 => usize::MAX,
            n => (n as usize).next_multiple_of(cs),
        };
        let group = self.write_depth.load(Ordering::Relaxed).max(1) as usize;
        let depth = self.file.info().max_depth.clamp(1, WRITE_DEPTH);
        let mut k = 0;
        while k < runs.len() {
            let mut end = k + 1;
            while end < runs.len()
                && runs[end].0 == runs[k].0 + (end - k)
                && runs[end].1 == runs[k].1 + ((end - k) * cs) as u64
            {
                end += 1;
            }
            let run = &data[runs[k].0 * cs..(runs[k].0 + end - k) * cs];
            let first = runs[k].1 / SECTOR_SIZE as u64;
            let pieces: Vec<(u64, &[u8])> = run
                .chunks(chunk)
                .enumerate()
                .map(|(n, buf)| (first + (n * chunk / SECTOR_SIZE) as u64, buf))
                .collect();
            for group in pieces.chunks(group) {
                // Last piece first: the driver joins an op to the one
                // before it when it starts where that one ends, which
                // would make one request of the group again.
                let mut ops: Vec<Op<'_>> = group
                    .iter()
                    .rev()
                    .map(|&(sector, buf)| Op::Write { sector, buf })
                    .collect();
                self.file.transfer(&mut ops, depth)?;
            }
            k = end;
        }
        Ok(())
    }

    /// Keeps at least one cached L2 table evictable, writing the dirty
    /// ones back with the lock held when only one is left (after waiting
    /// for a write-back in flight, which needs no lock to finish).
    pub(super) fn bound_dirty(&self, m: &mut Meta) -> Result<()> {
        if m.tables.dirty() >= crate::qcow2::tables::CACHED_L2 - 1 {
            while self.written.load(Ordering::Acquire) < m.generation {
                core::hint::spin_loop();
            }
            self.write_back_locked(m)?;
        }
        Ok(())
    }

    /// Writes the cached refcounts and copies out the dirty L2 sectors
    /// (lock held), flushes (they and the data the new entries point at
    /// are durable), then writes the copies (durable with the next flush),
    /// the last two without the lock. A crash before the copies are
    /// written leaks the clusters allocated since the last write-back and
    /// corrupts nothing.
    pub fn write_back(&self) -> Result<()> {
        let _one = self.write_back.lock();
        self.check_failed()?;
        let (generation, taken) = {
            let mut m = self.meta.lock();
            if let Some(rc) = m.rc.as_mut() {
                rc.sync(&self.file)?;
            }
            m.generation += 1;
            let generation = m.generation;
            (generation, m.tables.take_dirty(generation))
        };
        let result = taken.and_then(|pending| {
            if !pending.is_empty() {
                self.file.flush()?;
                for (at, bytes) in &pending {
                    write_bytes(&self.file, *at, bytes)?;
                }
            }
            Ok(())
        });
        if result.is_err() {
            self.failed.store(true, Ordering::Release);
        }
        self.written.store(generation, Ordering::Release);
        result
    }

    fn check_failed(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            return Err(Qcow2Error::Invalid(
                "an earlier metadata write-back failed: the image on disk is behind".into(),
            ));
        }
        Ok(())
    }

    /// A write-back with the lock held throughout: no entry is published
    /// between the flush and the write of the tables.
    fn write_back_locked(&self, m: &mut Meta) -> Result<()> {
        self.check_failed()?;
        if let Some(rc) = m.rc.as_mut() {
            rc.sync(&self.file)?;
        }
        if m.tables.dirty() > 0 || m.tables.l1_dirty() {
            self.file.flush()?;
            m.tables.write_back(&self.file)?;
        }
        Ok(())
    }
}
