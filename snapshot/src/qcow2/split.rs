//! The online clone split: every hole of a clone gets its own copy of the
//! backing chain's data while a workload goes on reading and writing the
//! clone, then the clone lets go of its backing file.
//!
//! Built on the [copy-once engine](crate::copyonce): the units are the
//! clone's virtual clusters. At the start every cluster that is not a hole
//! (data, or zero) is marked copied, so a split resumed after a crash
//! never copies a cluster twice. Then a cluster becomes copied by
//! whichever comes first:
//!
//! - a workload write ([`Split::write_at`], or the [`BlockDevice`] this
//!   type is): it claims the cluster, writes (a partial write fills the
//!   rest from the chain first) and finishes: the split never overwrites
//!   newer data;
//! - the background split ([`Split::step`], or [`Split::prepare`] and
//!   [`Split::commit`] on two threads): it claims up to `batch` holes of
//!   one L2 table with data below and reads that data from the chain,
//!   then gives each a new cluster holding it and publishes the entries in
//!   the cached tables ([`Qcow2Disk::materialize`]). Where the chain reads
//!   as zeros (nothing allocated below, by its block status, or data that
//!   is all zeros) the hole stays a hole: it reads zeros through the chain
//!   now and on its own once the chain is released, so it needs no entry
//!   and no L2 table (a 4 TiB clone of a nearly empty base stays small);
//!   every
//!   [`WRITE_BACK_BYTES`] copied it writes the metadata back (one flush,
//!   then the L2 entries: [`Qcow2Disk::write_back`], whose flush runs
//!   without the tables' lock), or leaves that to another thread
//!   ([`Split::with_deferred_write_back`]), so that the flush overlaps
//!   the next batches' writes.
//!
//! Reads need no claim: a hole and its copy read the same.
//! [`Split::run`] paces the background work with a [`Pacer`] and steps
//! aside when the workload was busy during a burst (above a request rate). When every cluster
//! is copied, [`Split::finish`] flushes, clears the backing file name and
//! backing format in the header, and flushes again.
//!
//! A crash leaks at most what was copied since the last write-back and
//! one batch (counted, data maybe written, entries not yet on disk),
//! twice the write-back interval with deferred write-backs, and
//! corrupts nothing; the clone reads the same before and after. This module must never write to a cluster that
//! is not a hole without holding its claim, nor copy a unit it has not won.

use core::sync::atomic::{AtomicU64, Ordering};

use alloc::vec::Vec;

use super::spare::Spare;
use super::{Entry, Qcow2Disk, Result};
use crate::backup::qcow2::Qcow2Error;
use crate::copyonce::{Cause, Claim, Counters, Engine, Pacer, Token};
use crate::devices::block::{BlockDevice, BlockError, DiskInfo, Op, SECTOR_SIZE};

/// Most clusters one batch looks at: a hole with nothing below costs the
/// chain's block status (no read of its data, no write), and stays a hole.
pub const SCAN_PER_BATCH: u64 = 1 << 16;

/// Bytes the split copies between two write-backs of the metadata
/// (one flush each) unless told otherwise: what a crash can leak.
pub const WRITE_BACK_BYTES: u64 = 64 << 20;

/// A batch of claimed holes and their data read from the chain, between
/// [`Split::prepare`] and [`Split::commit`].
#[derive(Debug)]
pub struct Batch {
    claimed: Vec<Token>,
    data: Vec<u8>,
    /// Holes with nothing below, settled while claiming (left holes).
    settled: u64,
}

/// Where a split stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// Virtual clusters in all.
    pub units: u64,
    /// Clusters that were not holes when this run started.
    pub already: u64,
    /// Holes the background split filled with a copy.
    pub copied: u64,
    /// Holes the background split left holes because the chain reads
    /// zeros there (nothing allocated below, or data that is all zeros):
    /// they read zeros through the chain and, once it is released, on
    /// their own, so they need no entry and no L2 table.
    pub zeroed: u64,
    /// Holes the workload's writes filled first.
    pub by_workload: u64,
    /// Bytes copied from the chain.
    pub copied_bytes: u64,
    /// Whether the backing file is released.
    pub released: bool,
}

impl Progress {
    /// Clusters settled (not holes any more).
    pub fn done(&self) -> u64 {
        self.already + self.copied + self.zeroed + self.by_workload
    }
}

/// A split in progress over a clone; see the module docs.
pub struct Split<'a, D, W, C> {
    disk: &'a Qcow2Disk<D>,
    engine: Engine<W, C>,
    batch: u64,
    cursor: AtomicU64,
    already: u64,
    zeroed: AtomicU64,
    copied_bytes: AtomicU64,
    workload_ops: AtomicU64,
    /// Clusters copied since the last write-back, and how many trigger one.
    unwritten: AtomicU64,
    write_back_every: u64,
    /// Commits leave the write-backs to another thread
    /// ([`Self::take_write_back_due`]).
    deferred: bool,
    relax: fn(),
    /// Batch buffers given back by commits, for the next batches.
    spare: Spare,
}

impl<'a, D, W, C> Split<'a, D, W, C>
where
    D: BlockDevice,
    W: AsRef<[AtomicU64]>,
    C: core::ops::Deref<Target = Counters>,
{
    /// A split of `disk` whose copy map lives in `words` (at least
    /// [`crate::copyonce::words_for`] of the virtual clusters) and counts
    /// in `counters`, copying up to `batch` clusters at a time (1 or more);
    /// `relax` runs while a write waits for the background copy of its
    /// cluster. Marks every cluster that is not a hole copied.
    pub fn new(
        disk: &'a Qcow2Disk<D>,
        words: W,
        counters: C,
        batch: u64,
        relax: fn(),
    ) -> Result<Self> {
        let units = disk.geometry().vclusters;
        let engine = Engine::new(words, units, counters);
        for vc in 0..units {
            if disk.entry(vc)? != Entry::Hole {
                engine.mark_copied(vc);
            }
        }
        let already = engine.count();
        Ok(Split {
            disk,
            engine,
            batch: batch.max(1),
            cursor: AtomicU64::new(0),
            already,
            zeroed: AtomicU64::new(0),
            copied_bytes: AtomicU64::new(0),
            workload_ops: AtomicU64::new(0),
            unwritten: AtomicU64::new(0),
            write_back_every: (WRITE_BACK_BYTES / disk.geometry().cs).max(1),
            deferred: false,
            relax,
            spare: Spare::default(),
        })
    }

    /// The same split, writing its metadata back (one flush) after every
    /// `bytes` copied (at least one cluster): a crash leaks at most that
    /// and one batch of the split's clusters.
    pub fn with_write_back(mut self, bytes: u64) -> Self {
        self.write_back_every = (bytes / self.disk.geometry().cs).max(1);
        self
    }

    /// With `deferred`, the same split whose commits do not write the
    /// metadata back themselves: another thread asks
    /// [`Self::take_write_back_due`] and runs [`Qcow2Disk::write_back`] (its
    /// flush then overlaps the next batches' writes). A crash leaks at most
    /// twice the write-back interval and one batch: what the write-back in
    /// flight covers, and what was copied since it started.
    pub fn with_deferred_write_back(mut self, deferred: bool) -> Self {
        self.deferred = deferred;
        self
    }

    /// Whether enough was copied since the last write-back for another.
    pub fn write_back_due(&self) -> bool {
        self.unwritten.load(Ordering::Relaxed) >= self.write_back_every
    }

    /// [`Self::write_back_due`]; if so, counts from zero again (the
    /// caller then writes back).
    pub fn take_write_back_due(&self) -> bool {
        let due = self.write_back_due();
        if due {
            self.unwritten.store(0, Ordering::Relaxed);
        }
        due
    }

    /// The clone.
    pub fn disk(&self) -> &Qcow2Disk<D> {
        self.disk
    }

    /// Where the split stands.
    pub fn progress(&self) -> Progress {
        let s = self.engine.stats();
        let zeroed = self.zeroed.load(Ordering::Relaxed);
        Progress {
            units: self.engine.units(),
            already: self.already,
            copied: s[Cause::Background] - zeroed,
            zeroed,
            by_workload: s[Cause::Access],
            copied_bytes: self.copied_bytes.load(Ordering::Relaxed),
            released: !self.disk.has_backing(),
        }
    }

    /// Whether every cluster is settled.
    pub fn is_complete(&self) -> bool {
        self.engine.is_complete()
    }

    /// Workload requests served so far (the pacer's sign of activity).
    pub fn workload_ops(&self) -> u64 {
        self.workload_ops.load(Ordering::Relaxed)
    }

    /// Runs `f` on cluster `vc` holding its claim if it is not copied yet
    /// (finishing it as the workload's), or straight away if it is.
    fn with_claim(&self, vc: u64, f: impl Fn() -> Result<()>) -> Result<()> {
        loop {
            match self.engine.claim(vc) {
                Claim::Won(token) => {
                    return match f() {
                        Ok(()) => {
                            self.engine.finish(token, Cause::Access);
                            Ok(())
                        }
                        Err(e) => {
                            self.engine.abandon(token);
                            Err(e)
                        }
                    }
                }
                Claim::Copied => return f(),
                Claim::Busy => {
                    self.engine.wait(vc, self.relax);
                }
            }
        }
    }

    /// A workload write: each cluster it touches is claimed first.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.workload_ops.fetch_add(1, Ordering::Relaxed);
        let cs = self.disk.geometry().cs;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let n = ((cs - at % cs) as usize).min(data.len() - done);
            let piece = &data[done..done + n];
            self.with_claim(at / cs, || self.disk.write_in_cluster(at, piece))?;
            done += n;
        }
        Ok(())
    }

    /// A workload read (no claim: a hole and its copy read the same).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.workload_ops.fetch_add(1, Ordering::Relaxed);
        self.disk.read_at(offset, buf)
    }

    /// Claims unclaimed holes from the cursor on (wrapping once), until
    /// `batch` of them with data below are claimed, all in one L2 table, or
    /// [`SCAN_PER_BATCH`] clusters were looked at. A hole with nothing
    /// below (by the chain's block status) is settled at once and stays a
    /// hole: it reads zeros through the chain now and without it after the
    /// release, and it needs no L2 table. Returns the holes claimed with
    /// data below.
    fn claim_batch(&self) -> Result<(Vec<Token>, u64, u64)> {
        let g = self.disk.geometry();
        let n = self.engine.units();
        let mut claimed = Vec::new();
        let start = self.cursor.load(Ordering::Relaxed) % n.max(1);
        let (mut scanned, mut settled) = (0, 0);
        let mut table = None;
        let mut result = Ok(());
        while scanned < n.min(SCAN_PER_BATCH) && (claimed.len() as u64) < self.batch {
            let vc = (start + scanned) % n;
            if table.is_some_and(|t| t != vc / g.l2_entries) {
                break;
            }
            scanned += 1;
            if self.engine.state(vc) != crate::copyonce::State::NotCopied {
                continue;
            }
            if let Claim::Won(t) = self.engine.claim(vc) {
                match self.disk.data_below(vc) {
                    Ok(true) => {
                        table = Some(vc / g.l2_entries);
                        claimed.push(t);
                    }
                    Ok(false) => {
                        settled += 1;
                        self.zeroed.fetch_add(1, Ordering::Relaxed);
                        self.engine.finish(t, Cause::Background);
                    }
                    Err(e) => {
                        self.engine.abandon(t);
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        self.cursor
            .store((start + scanned) % n.max(1), Ordering::Relaxed);
        if let Err(e) = result {
            for t in claimed {
                self.engine.abandon(t);
            }
            return Err(e);
        }
        Ok((claimed, settled, scanned))
    }

    /// One background batch; returns the clusters it settled (0: nothing
    /// left to claim).
    pub fn step(&self) -> Result<u64> {
        match self.prepare()? {
            Some(batch) => self.commit(batch),
            None => Ok(0),
        }
    }

    /// The first half of a batch: claims holes and reads their data from
    /// the chain (runs of consecutive clusters in one read); `None` when
    /// nothing is left to claim. Another thread may prepare the next batch
    /// while this one is committed: the chain and the clone are different
    /// disks. Hand the batch to [`Self::commit`] or [`Self::abandon`].
    pub fn prepare(&self) -> Result<Option<Batch>> {
        let units = self.engine.units();
        let mut scanned = 0;
        let (claimed, settled) = loop {
            let (claimed, settled, n) = self.claim_batch()?;
            scanned += n;
            if !claimed.is_empty() || settled > 0 {
                break (claimed, settled);
            }
            if n == 0 || scanned >= units {
                return Ok(None);
            }
        };
        match self.read_batch(&claimed) {
            Ok(data) => Ok(Some(Batch {
                claimed,
                data,
                settled,
            })),
            Err(e) => {
                self.abandon(Batch {
                    claimed,
                    data: Vec::new(),
                    settled,
                });
                Err(e)
            }
        }
    }

    /// Gives up a prepared batch: its holes go back to the split.
    pub fn abandon(&self, batch: Batch) {
        for t in batch.claimed {
            self.engine.abandon(t);
        }
        self.spare.give_back(batch.data);
    }

    /// The second half of a batch: gives each hole whose data is not all
    /// zeros a new cluster holding it and leaves the others holes, then
    /// finishes the claims;
    /// writes the metadata back when enough was copied since the last
    /// time. Returns the clusters settled.
    pub fn commit(&self, batch: Batch) -> Result<u64> {
        match self.fill(&batch.claimed, &batch.data) {
            Ok(zeroed) => {
                let n = batch.claimed.len() as u64 + batch.settled;
                self.zeroed.fetch_add(zeroed, Ordering::Relaxed);
                for t in batch.claimed {
                    self.engine.finish(t, Cause::Background);
                }
                self.spare.give_back(batch.data);
                if !self.deferred && self.take_write_back_due() {
                    self.disk.write_back()?;
                }
                Ok(n)
            }
            Err(e) => {
                self.abandon(batch);
                Err(e)
            }
        }
    }

    /// Reads the claimed holes (all with data below) from the chain, one
    /// cluster after another in the buffer: one read per run of
    /// consecutive clusters, all of them sent together (several in flight).
    fn read_batch(&self, claimed: &[Token]) -> Result<Vec<u8>> {
        let g = self.disk.geometry();
        let cs = g.cs as usize;
        let with_data: Vec<u64> = claimed.iter().map(Token::unit).collect();
        let mut data = self.spare.take(g.cs * with_data.len() as u64)?;
        let mut ops = Vec::new();
        let mut rest: &mut [u8] = &mut data;
        let mut k = 0;
        while k < with_data.len() {
            let mut end = k + 1;
            while end < with_data.len() && with_data[end] == with_data[k] + (end - k) as u64 {
                end += 1;
            }
            let (first, last) = (with_data[k], with_data[end - 1]);
            let len = (last * g.cs + g.cluster_len(last) - first * g.cs) as usize;
            let (run, tail) = core::mem::take(&mut rest).split_at_mut((end - k) * cs);
            // A short last cluster (the disk's end): the rest of its slot
            // is not read, and a kept buffer holds an earlier batch there.
            run[len..].fill(0);
            ops.push(Op::Read {
                sector: first * g.cs / SECTOR_SIZE as u64,
                buf: &mut run[..len],
            });
            rest = tail;
            k = end;
        }
        self.disk.read_below_ops(&mut ops)?;
        drop(ops);
        Ok(data)
    }

    /// Publishes the batch read into `data`: a new cluster for each hole
    /// whose data is not all zeros; the others stay holes (no entry, no L2
    /// table: they read zeros with the chain and without it). Returns how
    /// many stay holes.
    fn fill(&self, claimed: &[Token], data: &[u8]) -> Result<u64> {
        let g = self.disk.geometry();
        let mut items = Vec::new();
        for (k, (t, c)) in claimed.iter().zip(data.chunks(g.cs as usize)).enumerate() {
            if !crate::support::is_zero(c) {
                items.push((t.unit(), Entry::Hole, Some(k)));
            }
        }
        if !items.is_empty() && !self.disk.materialize(&items, data)? {
            return Err(Qcow2Error::Invalid(
                "a claimed hole changed under the split (a write bypassed the claims)".into(),
            ));
        }
        let copied = items.len() as u64;
        self.copied_bytes
            .fetch_add(copied * g.cs, Ordering::Relaxed);
        self.unwritten.fetch_add(copied, Ordering::Relaxed);
        Ok(claimed.len() as u64 - copied)
    }

    /// Releases the backing file once every cluster is settled: flush,
    /// clear the name and format, flush. Returns whether it did (false:
    /// holes are left).
    pub fn finish(&self) -> Result<bool> {
        if !self.is_complete() {
            return Ok(false);
        }
        if self.disk.has_backing() {
            self.disk.release_backing()?;
        }
        Ok(true)
    }

    /// Runs the split to the end, paced: bursts while `pacer` allows, rests
    /// in proportion to each burst's measured length through `rest(ns)`,
    /// stepping aside when the workload was busy during a burst: more than
    /// `busy_ops` requests per nominal burst of the pacer's, over the time
    /// the burst has run (at least one nominal burst); 0 counts any
    /// request.
    /// `now()` reads a monotonic clock in ns; `report` sees the progress
    /// after each burst.
    pub fn run(
        &self,
        pacer: &mut Pacer,
        busy_ops: u64,
        now: &mut dyn FnMut() -> u64,
        rest: &mut dyn FnMut(u64),
        report: &mut dyn FnMut(&Progress),
    ) -> Result<Progress> {
        let mut next = || self.prepare();
        self.run_from(&mut next, pacer, busy_ops, now, rest, report)
    }

    /// [`Self::run`] committing the batches `next` prepares (on another
    /// thread, say, reading ahead while this one writes); `next` gives
    /// `None` once nothing is left to claim.
    pub fn run_from(
        &self,
        next: &mut dyn FnMut() -> Result<Option<Batch>>,
        pacer: &mut Pacer,
        busy_ops: u64,
        now: &mut dyn FnMut() -> u64,
        rest: &mut dyn FnMut(u64),
        report: &mut dyn FnMut(&Progress),
    ) -> Result<Progress> {
        let nominal = pacer.burst_ns();
        loop {
            let start = now();
            pacer.start_burst(start);
            let seen = self.workload_ops();
            let mut idle = false;
            while pacer.keep_working(now()) {
                let Some(batch) = next()? else {
                    idle = true;
                    break;
                };
                self.commit(batch)?;
                let ran = now().saturating_sub(start).max(nominal);
                let ops = u128::from(self.workload_ops() - seen);
                if ops * u128::from(nominal) > u128::from(busy_ops) * u128::from(ran) {
                    pacer.foreground();
                }
            }
            report(&self.progress());
            if idle && self.is_complete() {
                self.finish()?;
                let p = self.progress();
                report(&p);
                return Ok(p);
            }
            // The rest follows the burst as it was: one batch may take
            // longer than the pacer's nominal burst.
            let ns = pacer.end_burst_at(now());
            rest(ns);
        }
    }
}

impl<D, W, C> BlockDevice for Split<'_, D, W, C>
where
    D: BlockDevice,
    W: AsRef<[AtomicU64]> + Send + Sync,
    C: core::ops::Deref<Target = Counters> + Send + Sync,
{
    fn info(&self) -> &DiskInfo {
        self.disk.info()
    }

    fn transfer(&self, ops: &mut [Op<'_>], _depth: usize) -> core::result::Result<(), BlockError> {
        super::serve(self, ops)
    }
}

impl<D, W, C> super::Serve for Split<'_, D, W, C>
where
    D: BlockDevice,
    W: AsRef<[AtomicU64]>,
    C: core::ops::Deref<Target = Counters>,
{
    fn disk_info(&self) -> &DiskInfo {
        self.disk.info()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Split::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        Split::write_at(self, offset, data)
    }
    fn flush(&self) -> Result<()> {
        self.disk.flush()
    }
}

impl<D, W, C> core::fmt::Debug for Split<'_, D, W, C> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Split")
            .field("batch", &self.batch)
            .finish_non_exhaustive()
    }
}
