//! Writable qcow2 clones and the online clone split on virtio-blk disks:
//! the kernel's thin layer over [`snapshot::qcow2`].
//!
//! | scenario | disks | what |
//! |---|---|---|
//! | `clone` | `clone`, then `back1` ... `backN` (read-only) | opens a new clone over its chain, writable, and reports it ready |
//! | `clone-split` | the same | fills the clone's holes from the chain, with `workload=on` while a seeded workload reads and writes it, then releases the backing file |
//!
//! The host resolves the chain from the headers (as QEMU does) and
//! attaches it in order; the kernel checks it again (names, sizes,
//! formats, features) and refuses what it cannot serve before writing
//! anything. Progress goes out as `clone.progress done= total= pct=`
//! records (one per whole per cent reached), the result as `clone.split` (with the number
//! of workload requests, so the host can recompute what they wrote).
//!
//! This module must never write to a backing disk (the host attaches them
//! read-only as well).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::backup::source::read_header;
use snapshot::copyonce::{words_for, Counters, Pacer};
use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::{CmdLine, ParamError};
use snapshot::qcow2::chain::{self, Layer};
use snapshot::qcow2::disk::{l1_memory, open_memory};
use snapshot::qcow2::split::{Batch, Progress, Split, WRITE_BACK_BYTES};
use snapshot::qcow2::{workload, Entry, Qcow2Disk, Qcow2Error};

use crate::arch::qemu::ExitCode;
use crate::readahead::ReadAhead;
use crate::trace::job_failed;
use crate::virtio::VirtioBlk;
use crate::{clock, log, thread, virtio};

/// A clone on a virtio disk.
pub type CloneDisk = Qcow2Disk<Arc<VirtioBlk>>;

/// The split as the kernel runs it.
pub type KernelSplit = Split<'static, Arc<VirtioBlk>, Vec<AtomicU64>, Box<Counters>>;

/// Clusters the background split copies per batch (one read of the chain
/// per run of data, one transfer per run of new clusters).
pub const BATCH: u64 = 64;

/// Most bytes of one batch: larger clusters make smaller batches (64 of
/// 2 MiB would be 128 MiB, two of them held at once), at least one.
pub const BATCH_BYTES: u64 = 4 << 20;

/// The split's nominal burst: one batch usually takes longer, and the
/// rest follows what it took.
pub const BURST_NS: u64 = 10_000_000;

/// The split's share of the time while the workload is quiet, and while
/// it is busy, in percent (docs/results/clone-split.md: the trade-off).
pub const SHARE: u64 = 100;
/// See [`SHARE`].
pub const FLOOR: u64 = 50;
/// Workload requests per [`BURST_NS`] above which the split steps aside
/// to [`FLOOR`]: 10, that is 1,000 requests a second. A workload below
/// that (the benchmark's, one request a millisecond at most) counts as the
/// seed's "reduced activity" and gets the split at [`SHARE`]: each of its
/// requests waits for at most one of the split's transfers. 0: any request.
pub const BUSY_OPS: u64 = 10;

/// Largest write of the split's data: a workload request waits for at
/// most one. In one session (docs/results/clone-split.md) the workload
/// kept 0.20 of its rate with whole 4 MiB runs, 0.36 with 1 MiB and 0.55
/// with 256 KiB, for a split 8 % slower than with whole runs.
pub const WRITE_CHUNK: u64 = 256 << 10;

/// [`WRITE_CHUNK`]s the split sends together, in flight at once: a
/// workload request waits for at most these. Four: on a quiet host
/// (docs/results/clone-split.md, 2026-12-01, eighth and ninth sessions)
/// five boots with four split in 0.25-0.83 of `qemu-img rebase`'s time,
/// the workload keeping 0.88-1.01 of its rate, where one in flight took
/// 0.55-1.28 of it; in an earlier, loaded session four wrote no faster
/// and the workload kept 0.30 of its rate.
pub const WRITE_DEPTH: usize = 4;

/// Refuses an image whose tables and cluster buffers would not fit the
/// free heap, saying it is the guest's memory that is short and what
/// `--mem` would do.
fn fits(what: &str, need: u64) -> Result<(), Qcow2Error> {
    let (used, total) = crate::memory::heap::stats();
    let have = (total - used) as u64;
    if need > have {
        let fix = match snapshot::backup::mem_for_heap(used as u64 + need) {
            Some(mem) => format!("give it more memory (--mem {}M)", mem >> 20),
            None => "more than any --mem gives the kernel (its heap is 64 MiB at most)".into(),
        };
        return Err(Qcow2Error::Memory(format!(
            "{what} (tables and cluster buffers) needs {need} bytes of kernel \
             memory ({} MiB), the guest has {have} ({} MiB) free; {fix}",
            need.div_ceil(1 << 20),
            have >> 20
        )));
    }
    Ok(())
}

/// Opens the clone on disk `name` over `back1`, `back2` ...; the error
/// says whether it is a refusal (bad input) and why.
pub fn open(name: &str) -> Result<CloneDisk, (bool, String)> {
    let refusal = |e: Qcow2Error| (!matches!(e, Qcow2Error::Io(_)), e.to_string());
    let top = virtio::disk(name).map_err(|e| (true, e.to_string()))?;
    let h = read_header(&*top).map_err(refusal)?;
    // Every layer's L1 table is read and kept at once, the clone's own
    // buffers on top: judged together before any is read, so that the
    // advice covers the whole chain the host attached (a lower layer's
    // other needs are judged as it is opened, below).
    let mut need = open_memory(&h, top.info().bytes());
    // The attached layers' headers (none for a raw layer), read once.
    let mut headers = Vec::new();
    while let Ok(dev) = virtio::disk(&format!("back{}", headers.len() + 1)) {
        let h = read_header(&*dev).ok();
        need += h.as_ref().map_or(0, l1_memory);
        headers.push(h.map(|h| (h, dev.info().bytes())));
    }
    fits(
        &format!("disk \"{name}\" over {} backing layer(s)", headers.len()),
        need,
    )
    .map_err(refusal)?;
    let mut depth = 0usize;
    let mut resolve = |backing: &str, parent: &str| -> snapshot::qcow2::Result<Layer> {
        depth += 1;
        let id = format!("back{depth}");
        let dev = virtio::disk(&id).map_err(|e| {
            Qcow2Error::Invalid(format!(
                "backing file \"{backing}\" of {parent} is not attached: {e}"
            ))
        })?;
        if let Some(Some((h, bytes))) = headers.get(depth - 1) {
            fits(&format!("disk \"{id}\""), open_memory(h, *bytes))?;
        }
        Ok(Layer {
            dev: Box::new(dev),
            id,
        })
    };
    chain::open(top, name, &mut resolve).map_err(refusal)
}

/// `clone`: opens the new clone writable over its chain and reports it.
pub fn clone_scenario(cmd: &CmdLine<'_>) -> ExitCode {
    let clone = match open(cmd.get("clone").unwrap_or("clone")) {
        Ok(c) => c,
        Err((refused, why)) => return job_failed("clone", refused, &why),
    };
    let g = clone.geometry();
    let holes = (0..g.vclusters)
        .filter(|&vc| clone.entry(vc) == Ok(Entry::Hole))
        .count();
    log!(
        "clone: {} bytes in {}-byte clusters, {holes} of {} clusters read from the backing chain",
        g.virtual_size,
        g.cs,
        g.vclusters
    );
    crate::trace!(
        "clone.ready",
        virtual_bytes = g.virtual_size,
        cluster_bytes = g.cs,
        holes = holes as u64
    );
    crate::trace::flush();
    ExitCode::Success
}

/// How a split runs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// The background split's share of the time while the workload is
    /// quiet, in percent.
    pub share: u64,
    /// The share it backs off to, no lower, while the workload is busy.
    pub floor: u64,
    /// Workload requests per [`BURST_NS`] above which it steps aside (0:
    /// any request).
    pub busy_ops: u64,
    /// The seeded workload and its pause between requests, if any.
    pub workload: Option<(u64, u64)>,
    /// How long the workload runs alone before the split starts.
    pub before_ns: u64,
    /// Clusters per background batch.
    pub batch: u64,
    /// Bytes copied between two write-backs of the metadata.
    pub write_back_bytes: u64,
    /// Largest write of the split's data (0: a batch's run at once).
    pub write_chunk: u64,
    /// Such writes sent together, in flight at once.
    pub write_depth: usize,
    /// Metadata write-backs on a thread of their own (their flush
    /// overlapping the next batches' writes), not between batches.
    pub write_back_thread: bool,
}

/// What a workload did, by phase (0 before the split, 1 during).
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Requests completed, in order: requests `0..ops` of the seed.
    pub ops: u64,
    /// Latencies by phase, in ns.
    pub latencies: [Vec<u64>; 2],
    /// The first error, if one ended it.
    pub error: Option<String>,
}

/// A split's outcome.
#[derive(Debug)]
pub struct SplitRun {
    /// Where it ended.
    pub progress: Progress,
    /// ns from the split's start to the backing file's release.
    pub split_ns: u64,
    /// ns the workload ran alone before.
    pub before_ns: u64,
    /// The workload's account.
    pub load: Option<LoadResult>,
    /// Where the split's time went.
    pub times: SplitTimes,
}

/// Where a split's time went, in ns: resting for the pacer, waiting for
/// the reader's next batch, committing batches (writes and write-backs).
#[derive(Debug, Default, Clone, Copy)]
pub struct SplitTimes {
    /// Rests the pacer asked for.
    pub rest_ns: u64,
    /// Waiting for the read-ahead's next batch.
    pub wait_read_ns: u64,
    /// Everything else inside bursts: committing batches.
    pub commit_ns: u64,
}

static PHASE: AtomicU64 = AtomicU64::new(0);

/// Runs the seeded workload on `split` until `stop`.
fn workload_loop(split: &KernelSplit, seed: u64, pause_ns: u64, stop: &AtomicBool) -> LoadResult {
    let sectors = split.disk().geometry().virtual_size / 512;
    let mut r = LoadResult::default();
    if sectors == 0 {
        // An empty disk takes no request: the workload has nothing to do.
        return r;
    }
    for l in &mut r.latencies {
        l.reserve(1 << 18);
    }
    let mut buf = alloc::vec![0u8; (workload::MAX_SECTORS * 512) as usize];
    while !stop.load(Ordering::Relaxed) {
        let req = workload::request(seed, r.ops, sectors);
        let b = &mut buf[..(req.sectors * 512) as usize];
        let t = clock::now_ns();
        let done = if req.write {
            workload::fill(seed, r.ops, &req, b);
            split.write_at(req.sector * 512, b)
        } else {
            split.read_at(req.sector * 512, b)
        };
        if let Err(e) = done {
            r.error = Some(e.to_string());
            break;
        }
        let phase = PHASE.load(Ordering::Relaxed) as usize;
        r.latencies[phase.min(1)].push(clock::now_ns() - t);
        r.ops += 1;
        if pause_ns > 0 {
            thread::sleep_ns(pause_ns);
        }
    }
    r
}

/// The split of `clone` as `opts` asks, with its copy map, leaked (the
/// threads of a run share it); refused up front if the copy map and two
/// batches would not fit the heap.
fn new_split(
    clone: &'static CloneDisk,
    opts: &Options,
) -> Result<&'static KernelSplit, (bool, String)> {
    let (units, cs) = (clone.geometry().vclusters, clone.geometry().cs);
    let batch = opts.batch.min(BATCH_BYTES / cs).max(1);
    // The copy map and two batches (one read ahead): refused up front.
    fits("the split", words_for(units) as u64 * 8 + 2 * batch * cs)
        .map_err(|e| (true, e.to_string()))?;
    let mut words = Vec::new();
    words.try_reserve_exact(words_for(units)).map_err(|_| {
        (
            true,
            format!("no memory for the copy map of {units} clusters"),
        )
    })?;
    words.extend((0..words_for(units)).map(|_| AtomicU64::new(0)));
    let failed = |e: Qcow2Error| (!matches!(e, Qcow2Error::Io(_)), e.to_string());
    Ok(Box::leak(Box::new(
        Split::new(
            clone,
            words,
            Box::new(Counters::new()),
            batch,
            thread::yield_now,
        )
        .map_err(failed)?
        .with_write_back(opts.write_back_bytes)
        .with_deferred_write_back(opts.write_back_thread),
    )))
}

/// Splits `clone`, with the workload `opts` asks for; `report` sees the
/// progress after each burst.
pub fn run_split(
    clone: &'static CloneDisk,
    opts: &Options,
    report: &mut dyn FnMut(&Progress),
) -> Result<SplitRun, (bool, String)> {
    let failed = |e: Qcow2Error| (!matches!(e, Qcow2Error::Io(_)), e.to_string());
    let split = new_split(clone, opts)?;
    clone.set_write_chunk(opts.write_chunk);
    clone.set_write_depth(opts.write_depth);
    PHASE.store(0, Ordering::Relaxed);
    let stop = Arc::new(AtomicBool::new(false));
    let load = opts.workload.map(|(seed, pause)| {
        let stop = stop.clone();
        thread::spawn("clone-load", move || {
            workload_loop(split, seed, pause, &stop)
        })
    });
    let t0 = clock::now_ns();
    if load.is_some() {
        thread::sleep_ns(opts.before_ns);
    }
    let before_ns = clock::now_ns() - t0;
    PHASE.store(1, Ordering::Relaxed);
    let start = clock::now_ns();
    let mut pacer = Pacer::new(opts.share, BURST_NS).with_floor(opts.floor);
    let (mut rest_ns, mut wait_read_ns) = (0u64, 0u64);
    let mut rest = |ns: u64| {
        let t = clock::now_ns();
        if ns > 0 {
            thread::sleep_ns(ns)
        } else {
            thread::yield_now()
        }
        rest_ns += clock::now_ns() - t;
    };
    let ahead: &'static ReadAhead<Result<Option<Batch>, Qcow2Error>> = Box::leak(Box::default());
    let reader = thread::spawn("clone-read", move || ahead.serve(|| split.prepare()));
    let mut asked = false;
    let mut write_backs = opts.write_back_thread.then(|| WriteBacks::start(clone));
    let result = split.run_from(
        &mut || {
            if let Some(w) = write_backs.as_mut() {
                w.poll(split)?;
            }
            let t = clock::now_ns();
            let batch = ahead.next_batch(&mut asked);
            wait_read_ns += clock::now_ns() - t;
            batch
        },
        &mut pacer,
        opts.busy_ops,
        &mut clock::now_ns,
        &mut rest,
        report,
    );
    let split_ns = clock::now_ns() - start;
    let times = SplitTimes {
        rest_ns,
        wait_read_ns,
        commit_ns: split_ns.saturating_sub(rest_ns + wait_read_ns),
    };
    ahead.stop();
    reader.join();
    let written = write_backs.map_or(Ok(()), WriteBacks::stop);
    if let Some(Ok(Some(batch))) = ahead.leftover() {
        split.abandon(batch);
    }
    stop.store(true, Ordering::Relaxed);
    let load = load.map(|h| h.join());
    let progress = result.and_then(|p| written.map(|()| p)).map_err(failed)?;
    // The workload's last writes, after the release, are durable too.
    clone.flush().map_err(failed)?;
    if let Some(e) = load.as_ref().and_then(|l| l.error.clone()) {
        return Err((false, format!("the workload failed: {e}")));
    }
    Ok(SplitRun {
        progress,
        split_ns,
        before_ns,
        load,
        times,
    })
}

/// The split's metadata write-backs on a thread of their own, one at a
/// time, so that each one's flush overlaps the next batches' writes
/// instead of stopping them.
struct WriteBacks {
    job: &'static ReadAhead<Result<(), Qcow2Error>>,
    thread: thread::JoinHandle<()>,
    running: bool,
}

impl WriteBacks {
    fn start(clone: &'static CloneDisk) -> Self {
        let job: &'static ReadAhead<Result<(), Qcow2Error>> = Box::leak(Box::default());
        let thread = thread::spawn("clone-wb", move || job.serve(|| clone.write_back()));
        WriteBacks {
            job,
            thread,
            running: false,
        }
    }

    /// Between batches: the error of the write-back that finished, if it
    /// failed; starts the next one if it is due and none is running. If
    /// the next is due while one still runs, waits for that one: what a
    /// crash may leak stays two intervals.
    fn poll(&mut self, split: &KernelSplit) -> Result<(), Qcow2Error> {
        if self.running {
            let finished = if split.write_back_due() {
                let mut asked = true;
                self.job.next(&mut asked, |_| false)
            } else {
                self.job.try_take()
            };
            match finished {
                Some(done) => {
                    self.running = false;
                    done?;
                }
                None => return Ok(()),
            }
        }
        if split.take_write_back_due() {
            self.job.start();
            self.running = true;
        }
        Ok(())
    }

    /// Waits for the write-back in flight; its result.
    fn stop(self) -> Result<(), Qcow2Error> {
        self.job.stop();
        self.thread.join();
        self.job.leftover().unwrap_or(Ok(()))
    }
}

/// Emits `clone.progress` when the whole per cent done changes.
fn progress_reporter() -> impl FnMut(&Progress) {
    let mut last = None;
    move |p: &Progress| {
        // Whole per cents, at most one record per per cent.
        let pct = (p.done() * 100).checked_div(p.units).unwrap_or(100);
        if last.is_none_or(|l| pct > l) {
            crate::trace!(
                "clone.progress",
                done = p.done(),
                total = p.units,
                pct = pct
            );
            crate::trace::flush();
            last = Some(pct);
        }
    }
}

/// The split's options from the kernel words, each a number where one is
/// asked for and `workload` on or off.
fn split_options<'a>(cmd: &CmdLine<'a>) -> Result<Options, ParamError<'a>> {
    let num = |key: &'a str, default: u64| Ok(cmd.u64(key)?.unwrap_or(default));
    let workload = if cmd.switch("workload", false)? {
        Some((num("seed", workload::SEED)?, num("pause_us", 200)? * 1000))
    } else {
        None
    };
    Ok(Options {
        share: num("share", SHARE)?,
        floor: num("floor", FLOOR)?,
        busy_ops: num("busy", BUSY_OPS)?,
        workload,
        before_ns: num("before_ms", 200)? * 1_000_000,
        batch: num("batch", BATCH)?,
        write_back_bytes: num("wb_mib", WRITE_BACK_BYTES >> 20)? << 20,
        write_chunk: num("chunk_kib", WRITE_CHUNK >> 10)? << 10,
        write_depth: num("depth", WRITE_DEPTH as u64)? as usize,
        write_back_thread: num("wb_thread", 1)? != 0,
    })
}

/// `clone-split`: the split of the clone on `clone=`, with the seeded
/// workload when `workload=on`.
pub fn split_scenario(cmd: &CmdLine<'_>) -> ExitCode {
    // Every word checked before the clone is opened: a bad one changes
    // nothing.
    let opts = match split_options(cmd) {
        Ok(opts) => opts,
        Err(e) => return job_failed("clone-split", true, &e),
    };
    let clone: &'static CloneDisk = match open(cmd.get("clone").unwrap_or("clone")) {
        Ok(c) => Box::leak(Box::new(c)),
        Err((refused, why)) => return job_failed("clone-split", refused, &why),
    };
    let run = match run_split(clone, &opts, &mut progress_reporter()) {
        Ok(run) => run,
        Err((refused, why)) => return job_failed("clone-split", refused, &why),
    };
    let p = run.progress;
    let ops = run.load.as_ref().map_or(0, |l| l.ops);
    log!(
        "clone-split: {} clusters: {} already filled, {} copied ({} bytes), {} left holes over zeros, {} filled by the workload first; {} ms; {ops} workload requests",
        p.units, p.already, p.copied, p.copied_bytes, p.zeroed, p.by_workload, run.split_ns / 1_000_000
    );
    crate::trace!(
        "clone.split",
        copied = p.copied,
        zeroed = p.zeroed,
        by_workload = p.by_workload,
        copied_bytes = p.copied_bytes,
        split_ns = run.split_ns,
        workload_ops = ops
    );
    crate::trace::flush();
    ExitCode::Success
}
