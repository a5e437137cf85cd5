//! A virtio-blk disk's sums since boot: where its batches' time went, by
//! kind, and the time callers waited for a queue; traced once at the end
//! of the run. Must never trace per small batch (on the serial console a
//! record costs more than the I/O).

use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::devices::block::Op;
use snapshot::devices::virtio::blk::Stats;

use super::disks;
use crate::trace::Word;

/// Where a disk's time went, summed over its batches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Batches run.
    pub batches: u64,
    /// Requests sent to the device.
    pub requests: u64,
    /// Data bytes moved.
    pub bytes: u64,
    /// Time inside batches.
    pub busy_ns: u64,
    /// Of which waiting for the device (the rest is the driver's own work).
    pub wait_ns: u64,
    /// Of the driver's own work, time in notification writes.
    pub notify_ns: u64,
}

/// A disk's sums since boot, added to after every batch and traced once
/// at the end of the run ([`trace_totals`]).
#[derive(Debug, Default)]
pub(super) struct Totals {
    pub(super) batches: AtomicU64,
    pub(super) requests: AtomicU64,
    pub(super) bytes: AtomicU64,
    pub(super) busy_ns: AtomicU64,
    pub(super) wait_ns: AtomicU64,
    pub(super) notifies: AtomicU64,
    pub(super) waits: AtomicU64,
    pub(super) failed: AtomicU64,
    pub(super) max_in_flight: AtomicU64,
    /// Batches by kind (holding a flush; else writing; else reading):
    /// how many, their bytes, and the ns each held its queue (batches on
    /// different queues overlap, so these sums may pass the run's time).
    pub(super) kinds: [[AtomicU64; 3]; 3],
    /// ns callers slept waiting for a free queue.
    pub(super) lock_wait_ns: AtomicU64,
}

/// The kind of a batch, for [`Totals::kinds`]: 0 reads only, 1 writes
/// (no flush), 2 holds a flush.
pub(super) fn kind_of(ops: &[Op<'_>]) -> usize {
    if ops.iter().any(|o| matches!(o, Op::Flush)) {
        2
    } else if ops.iter().any(|o| matches!(o, Op::Write { .. })) {
        1
    } else {
        0
    }
}

impl Totals {
    pub(super) fn add(&self, stats: &Stats, busy_ns: u64, wait_ns: u64, ok: bool) {
        for (total, add) in [
            (&self.batches, 1),
            (&self.requests, stats.requests),
            (&self.bytes, stats.bytes),
            (&self.busy_ns, busy_ns),
            (&self.wait_ns, wait_ns),
            (&self.notifies, stats.notifies),
            (&self.waits, stats.waits),
            (&self.failed, u64::from(!ok)),
        ] {
            total.fetch_add(add, Ordering::Relaxed);
        }
        self.max_in_flight
            .fetch_max(u64::from(stats.max_in_flight), Ordering::Relaxed);
    }
}

/// Batches moving at least this many bytes are traced one by one
/// (`blk.batch`); smaller ones only in the disk's sums.
pub(super) const TRACED_BATCH_BYTES: u64 = 1 << 20;

/// Traces every used disk's sums since boot (`blk.disk`,
/// `blk.disk_time`, which the host tool's block-layer report reads, and
/// `blk.disk_kinds`, `blk.disk_flush`: batches, bytes and time holding
/// a queue by kind, flushes, time waiting for a free queue). Called
/// once, as the run ends.
pub fn trace_totals() {
    for disk in disks() {
        let t = &disk.totals;
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        if load(&t.batches) == 0 {
            continue;
        }
        crate::trace!(
            "blk.disk",
            disk = Word(disk.name),
            batches = load(&t.batches),
            requests = load(&t.requests),
            bytes = load(&t.bytes),
            max_inflight = load(&t.max_in_flight),
            failed = load(&t.failed),
        );
        crate::trace!(
            "blk.disk_time",
            disk = Word(disk.name),
            busy_ns = load(&t.busy_ns),
            wait_ns = load(&t.wait_ns),
            notifies = load(&t.notifies),
            waits = load(&t.waits),
        );
        let [r, w, f] = &t.kinds;
        crate::trace!(
            "blk.disk_kinds",
            disk = Word(disk.name),
            reads = load(&r[0]),
            read_bytes = load(&r[1]),
            read_ns = load(&r[2]),
            writes = load(&w[0]),
            write_bytes = load(&w[1]),
        );
        crate::trace!(
            "blk.disk_flush",
            disk = Word(disk.name),
            write_ns = load(&w[2]),
            flushes = load(&f[0]),
            flush_ns = load(&f[2]),
            lock_wait_ns = load(&t.lock_wait_ns),
        );
    }
}
