//! The source's L2 tables in L1 order, read ahead several at a time: the
//! next [`L2_AHEAD`] bytes of tables the L1 table names go out as one
//! batch of requests in flight together, where one table at a time waited
//! for each request in turn (a 64 GiB image with 64 KiB clusters has 128
//! tables, walked three times by a backup).
//!
//! Every table is checked ([`placed`]) before it is read; a batch stops
//! short of a bad L1 entry, which is then reported when the walk reaches
//! it, after the tables before it, as when tables were read one by one.
//!
//! Memory is bounded by design: one window of the L1 table
//! ([`TABLE_WINDOW`]) and [`l2_window`] bytes of tables (at most
//! [`L2_AHEAD`], at least one table), whatever the virtual size.
//!
//! This module must never write to the image it reads.

use alloc::format;
use alloc::vec::Vec;

use super::qcow2::{buffer, l1_entry, placed, Header, Qcow2Error};
use super::source::{TableWindow, TABLE_WINDOW};
use crate::devices::block::{BlockDevice, Op};

/// Bytes of L2 tables read in one batch, at most (one table at least).
pub const L2_AHEAD: u64 = 1 << 20;

/// Requests in flight per batch, at most.
const DEPTH: usize = 32;

/// Bytes of tables [`L2Ahead`] holds for clusters of `1 << cluster_bits`.
pub fn l2_window(cluster_bits: u32) -> u64 {
    (L2_AHEAD >> cluster_bits).max(1) << cluster_bits
}

/// The L2 tables of an image in L1 order, a batch at a time.
pub(super) struct L2Ahead {
    l1: TableWindow,
    l1_used: u64,
    next_l1: u64,
    cs: u64,
    file_len: u64,
    /// Room for the batch's tables, one cluster each.
    buf: Vec<u8>,
    /// The batch: each table's L1 index and offset, in `buf`'s order.
    batch: Vec<(u64, u64)>,
    /// The batch's tables handed out so far.
    taken: usize,
}

impl L2Ahead {
    /// The tables of the image `header` describes, `file_len` bytes long.
    pub(super) fn new(header: &Header, file_len: u64) -> Result<Self, Qcow2Error> {
        let cs = header.cluster_size();
        let l1_used = header
            .virtual_clusters()
            .div_ceil(cs / header.l2_entry_bytes());
        let tables = (l2_window(header.cluster_bits) / cs).min(l1_used.max(1));
        Ok(L2Ahead {
            l1: TableWindow::new(header.l1_offset, l1_used, "L1 table window")?,
            l1_used,
            next_l1: 0,
            cs,
            file_len,
            buf: buffer(tables * cs, "L2 tables")?,
            batch: Vec::new(),
            taken: 0,
        })
    }

    /// Moves to the next table: its L1 index and offset ([`L2Ahead::table`]
    /// its contents); `None` when none is left.
    pub(super) fn advance<D: BlockDevice + ?Sized>(
        &mut self,
        dev: &D,
    ) -> Result<Option<(u64, u64)>, Qcow2Error> {
        if self.taken == self.batch.len() {
            self.refill(dev)?;
            if self.batch.is_empty() {
                return Ok(None);
            }
        }
        self.taken += 1;
        Ok(Some(self.batch[self.taken - 1]))
    }

    /// The contents of the table [`L2Ahead::advance`] moved to last.
    pub(super) fn table(&self) -> &[u8] {
        let (cs, k) = (self.cs as usize, self.taken.saturating_sub(1));
        &self.buf[k * cs..(k + 1) * cs]
    }

    /// Reads the next batch of tables: as many as `buf` holds, up to the
    /// first bad L1 entry (an error only if it comes first).
    fn refill<D: BlockDevice + ?Sized>(&mut self, dev: &D) -> Result<(), Qcow2Error> {
        let (cs, room) = (self.cs, self.buf.len() as u64 / self.cs);
        self.batch.clear();
        self.taken = 0;
        while (self.batch.len() as u64) < room && self.next_l1 < self.l1_used {
            let i = self.next_l1;
            let entry = self.l1.get(dev, i)?.unwrap_or(0);
            let checked = l1_entry(i, entry).and_then(|offset| match offset {
                0 => Ok(0),
                _ => {
                    placed(&format!("L2 table {i}"), offset, cs, cs, self.file_len).map(|()| offset)
                }
            });
            match checked {
                Ok(0) => {}
                Ok(offset) => self.batch.push((i, offset)),
                Err(e) if self.batch.is_empty() => return Err(e),
                Err(_) => break,
            }
            self.next_l1 += 1;
        }
        let mut ops: Vec<Op<'_>> = self
            .buf
            .chunks_mut(cs as usize)
            .zip(&self.batch)
            .map(|(buf, &(_, offset))| Op::Read {
                sector: offset / 512,
                buf,
            })
            .collect();
        if !ops.is_empty() {
            dev.transfer(&mut ops, dev.info().max_depth.clamp(1, DEPTH))?;
        }
        Ok(())
    }
}

/// Bytes [`L2Ahead`] needs: an L1 window and the tables' window.
pub(super) fn memory(cluster_bits: u32) -> u64 {
    TABLE_WINDOW + l2_window(cluster_bits)
}
