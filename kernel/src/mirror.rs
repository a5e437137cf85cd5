//! The quick-split mirror on virtio-blk disks: the kernel's thin layer
//! over [`snapshot::mirror`], with the requesters as kernel threads.
//!
//! | disk (default name) | what |
//! |---|---|
//! | `primary` | the volume the workload thread (the first server) writes |
//! | `secondary` | its mirror, which the backup reads |
//! | `control` | the controller disk: superblock and bitmaps |
//! | `tape` | the backup medium, a raw volume stream |
//!
//! `mirror` opens the pair (resuming whatever the controller disk holds),
//! pumps it in sync, runs a seeded write workload (`workload=on`), splits,
//! backs the split instant up (`via=secondary|memory`) while a copier
//! thread copies and the workload keeps writing, then resyncs. With
//! `verify=on` the split takes per-block hashes of the primary
//! stop-the-world at the instant, and the tape is read back and compared
//! with them. `presync=off` splits without first pumping the pair in
//! sync, so what the pair still lags on (all of a first pairing) is the
//! split's differential data. Progress goes out as
//! `mirror.progress stage=pair|copy|backup done total`.
//!
//! Memory: the run sizes its batches and the backup's window from the
//! heap it finds free ([`Budget::fit`], recorded as `mirror.budget`), or
//! refuses before touching the pair; `batch=N` lowers the batch further.
//!
//! Hold points, for crash tests only: `hold=POINT:N` (POINT one of
//! `pair`, `copy`, `backup`, `resync`) makes the thread doing POINT stop
//! for good after its Nth step that leaves work to do, once it has
//! recorded `mirror.hold` and flushed the trace: a host that kills QEMU
//! on that record kills it while the operation is provably under way.
//! `resync` is the pump after the resync, `pair` the one before the split.
//!
//! This module must never write the primary except through the mirror.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use snapshot::backup::tape::{Header, HEADER_BYTES};
use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::CmdLine;
use snapshot::memsnap::page_hash;
use snapshot::mirror::{
    BackupJob, Budget, CopyBatch, Disks, Error, Mirror, Opened, Options, Phase, Refusal, Via,
    MAX_BATCH,
};
use snapshot::support::rng::Rng;

use crate::arch::qemu::ExitCode;
use crate::readahead::ReadAhead;
use crate::trace::job_failed;
use crate::trace::Progress;
use crate::{clock, log, thread, virtio};

/// Blocks a pump or copier step moves at most.
pub const BATCH: u64 = MAX_BATCH;

/// Where a run can be held ([module docs](self)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The pump before the split.
    Pair = 1,
    /// The copier.
    Copy = 2,
    /// The backup.
    Backup = 3,
    /// The pump after the resync.
    Resync = 4,
}

const POINTS: [(&str, Point); 4] = [
    ("pair", Point::Pair),
    ("copy", Point::Copy),
    ("backup", Point::Backup),
    ("resync", Point::Resync),
];

/// The hold point asked for (0: none), at which step, and steps seen.
static HOLD_POINT: AtomicUsize = AtomicUsize::new(0);
static HOLD_STEP: AtomicU64 = AtomicU64::new(0);
static HOLD_SEEN: AtomicU64 = AtomicU64::new(0);

/// Reads `hold=POINT:N`.
fn set_hold(cmd: &CmdLine<'_>) -> Result<(), Error> {
    let Some(text) = cmd.get("hold") else {
        return Ok(());
    };
    let parsed = text.split_once(':').and_then(|(name, n)| {
        let point = POINTS.iter().find(|(p, _)| *p == name)?.1;
        Some((point, n.parse::<u64>().ok().filter(|&n| n > 0)?))
    });
    let (point, step) =
        parsed.ok_or_else(|| input("hold= wants pair|copy|backup|resync:N (N from 1)".into()))?;
    HOLD_STEP.store(step, Ordering::Relaxed);
    HOLD_POINT.store(point as usize, Ordering::Relaxed);
    Ok(())
}

/// A step of `point` has brought it to `done` of `total`: if that is the
/// hold point's step and work remains, records `mirror.hold` and stops
/// this thread for good.
fn hold(point: Point, done: u64, total: u64) {
    if HOLD_POINT.load(Ordering::Relaxed) != point as usize || done >= total {
        return;
    }
    if HOLD_SEEN.fetch_add(1, Ordering::Relaxed) + 1 != HOLD_STEP.load(Ordering::Relaxed) {
        return;
    }
    log!("mirror: holding at {point:?}, {done} of {total} done");
    crate::trace!(
        "mirror.hold",
        point = point as u64,
        done = done,
        total = total
    );
    crate::trace::flush();
    loop {
        thread::sleep_ns(1_000_000_000);
    }
}

/// Heap bytes free now.
fn heap_free() -> u64 {
    let (used, total) = crate::memory::heap::stats();
    total.saturating_sub(used) as u64
}

/// The transfer sizes for a run of `m`: what `free` heap bytes (measured
/// before the pair was opened: the peak counts its bitmaps) hold, the
/// batch lowered to `batch=` if given. Refused if even the smallest do
/// not fit.
fn budget(m: &Mirror, free: u64, cmd: &CmdLine<'_>) -> Result<Budget, Error> {
    let mut budget = Budget::fit(&m.geometry(), free)?;
    if let Some(n) = cmd.get("batch").and_then(|n| n.parse::<u64>().ok()) {
        budget.batch = budget.batch.min(n.max(1));
    }
    log!("mirror: {free} bytes of heap free; {budget:?}");
    crate::trace!(
        "mirror.budget",
        heap_free = free,
        batch = budget.batch,
        window_extents = budget.window_extents,
        peak_bytes = budget.peak_bytes(&m.geometry())
    );
    Ok(budget)
}

/// Opens the pair on the disks the command line names.
pub fn open(cmd: &CmdLine<'_>, opts: Options) -> Result<(Arc<Mirror>, Opened), Error> {
    let name = |key: &'static str| cmd.get(key).unwrap_or(key);
    let disk = |key| virtio::disk(name(key)).map_err(|e| input(alloc::format!("{e}")));
    let disks = Disks {
        primary: disk("primary")?,
        secondary: disk("secondary")?,
        control: disk("control")?,
    };
    let (m, opened) = Mirror::open(disks, opts, thread::yield_now)?;
    Ok((Arc::new(m), opened))
}

/// The mirror's progress records, `mirror.progress stage= done= total=`.
pub fn progress() -> Progress {
    Progress::new("mirror.progress")
}

/// Pumps until the secondary is in sync, `batch` blocks a step; returns
/// the blocks copied. `point` names it for [`hold`].
pub fn pump_all(
    m: &Mirror,
    progress: &mut Progress,
    batch: u64,
    point: Point,
) -> Result<u64, Error> {
    let total = m.status().marked;
    let mut done = 0;
    progress.report("pair", 0, total);
    loop {
        let n = m.pump(batch)?;
        if n == 0 && m.status().marked == 0 {
            progress.report("pair", total, total);
            return Ok(done);
        }
        done += n;
        progress.report("pair", done.min(total), total);
        if n > 0 {
            hold(point, done, total);
        }
        if n == 0 {
            thread::yield_now();
        }
    }
}

/// A seeded workload writing `ops` 4 KiB writes (the whole volume if it
/// is smaller; forever if `None`, until `stop`) at random places of the
/// primary; returns write latencies in ns if `record`.
pub fn workload(
    m: &Mirror,
    seed: u64,
    ops: Option<u64>,
    stop: &AtomicBool,
    record: bool,
) -> Result<Vec<u64>, Error> {
    let mut rng = Rng::new(seed);
    let volume_bytes = m.geometry().volume_bytes;
    let sectors = volume_bytes / 512;
    let mut buf = alloc::vec![0u8; 4096.min(volume_bytes) as usize];
    let mut lat = Vec::new();
    let mut i = 0;
    while ops.is_none_or(|n| i < n) && !stop.load(Ordering::Relaxed) {
        let at = rng.below(sectors.saturating_sub(8).max(1)) & !7;
        snapshot::devices::block::fill_pattern(seed.wrapping_add(i), at, &mut buf);
        let t0 = clock::now_ns();
        m.write(at, &buf)?;
        if record && lat.len() < 1 << 20 {
            lat.push(clock::now_ns() - t0);
        }
        i += 1;
    }
    Ok(lat)
}

/// Whether the copier reads its next batch from the primary while it
/// writes the current one to the secondary (on by default; `pipeline=off`
/// on the command line runs the halves in turn, to compare).
pub static PIPELINED: AtomicBool = AtomicBool::new(true);

/// Stack of the thread that reads the copier's next batch.
const READ_STACK: u64 = 64 * 1024;

/// What the copier's reader thread hands over: a batch read, none to be
/// had now, or the read's error.
type Ahead = ReadAhead<Result<Option<CopyBatch>, Error>>;

/// Runs the copier, `batch` blocks a step, until the instant is wholly
/// on the secondary or `stop`, reporting `stage=copy` progress (blocks of
/// the instant on the secondary, whoever copied them); returns the blocks
/// it copied. With [`PIPELINED`], a reader thread that lives as long as
/// the copier reads each next batch from the primary while this thread
/// writes the current one to the secondary.
pub fn copier(m: &Mirror, stop: &AtomicBool, batch: u64) -> Result<u64, Error> {
    if !PIPELINED.load(Ordering::Relaxed) {
        return copy_loop(m, stop, &mut || m.copy_read(batch));
    }
    let ahead = Ahead::default();
    let mut copied = Ok(0);
    let ran = crate::scoped::both(
        "mirror-copy-read",
        READ_STACK,
        &mut || ahead.serve(|| m.copy_read(batch)),
        &mut || {
            let mut asked = false;
            copied = copy_loop(m, stop, &mut || ahead.next_batch(&mut asked));
            ahead.stop();
        },
    );
    if !ran {
        return copy_loop(m, stop, &mut || m.copy_read(batch));
    }
    // A batch read ahead that the loop did not take is written, never
    // dropped: its blocks are claimed.
    let last = match ahead.leftover() {
        Some(Ok(Some(b))) => m.copy_write(b),
        Some(Err(e)) => Err(e),
        _ => Ok(0),
    };
    Ok(copied? + last?)
}

/// The copier's loop: takes each next batch from `next` (read from the
/// primary) and writes it to the secondary, until the instant is wholly
/// on the secondary or `stop`; returns the blocks it wrote.
fn copy_loop(
    m: &Mirror,
    stop: &AtomicBool,
    next: &mut dyn FnMut() -> Result<Option<CopyBatch>, Error>,
) -> Result<u64, Error> {
    let mut copied = 0;
    let mut progress = progress();
    while !m.copy_complete() && !stop.load(Ordering::Relaxed) {
        let Some(current) = next()? else {
            // Nothing to claim: the rest is held by others, or a backup
            // `via=memory` copies it. Sleep rather than spin, so that the
            // CPU goes to them.
            thread::sleep_ns(1_000_000);
            continue;
        };
        let n = m.copy_write(current)?;
        copied += n;
        let status = m.status();
        progress.report("copy", status.copied, status.pending);
        if n > 0 {
            hold(Point::Copy, status.copied, status.pending);
        }
    }
    Ok(copied)
}

/// Backs the split instant up to `tape` within `budget`; returns the
/// summary.
pub fn backup(
    m: &Mirror,
    tape: &dyn BlockDevice,
    via: Via,
    budget: Budget,
    progress: &mut Progress,
) -> Result<snapshot::mirror::BackupSummary, Error> {
    let mut job = BackupJob::start_sized(m, tape, via, budget)?;
    while let Some((done, total)) = job.step()? {
        progress.report("backup", done, total);
        hold(Point::Backup, done, total);
    }
    job.finish()
}

/// Per-block hashes of the primary, read directly: the stop-the-world
/// reference of a verify run.
pub fn reference(m: &Mirror) -> Result<Vec<u64>, Error> {
    let geo = m.geometry();
    let mut buf = filled(geo.block_bytes, 0u8)?;
    let mut out = filled(geo.blocks(), 0u64)?;
    out.clear();
    for b in 0..geo.blocks() {
        let (sector, len) = geo.extent(b);
        buf.fill(0);
        m.disks()
            .primary
            .read(sector, &mut buf[..len])
            .map_err(Error::Io)?;
        out.push(hash(&buf)?);
    }
    Ok(out)
}

/// A vector of `len` copies of `value`, or [`Error::NoMemory`].
fn filled<T: Clone>(len: u64, value: T) -> Result<Vec<T>, Error> {
    let bytes = len.saturating_mul(core::mem::size_of::<T>() as u64);
    snapshot::support::try_filled(len, value).ok_or(Error::NoMemory(bytes))
}

fn hash(bytes: &[u8]) -> Result<u64, Error> {
    let mut words = filled(bytes.len() as u64 / 8, 0u64)?;
    for (w, c) in words.iter_mut().zip(bytes.chunks(8)) {
        *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    Ok(page_hash(&words))
}

/// Reads the tape back, extent by extent as its header lays them out,
/// and counts the blocks whose hash differs from `reference`.
pub fn mismatched(tape: &dyn BlockDevice, reference: &[u64]) -> Result<u64, Error> {
    let mut head = alloc::vec![0u8; HEADER_BYTES as usize];
    tape.read(0, &mut head).map_err(Error::Io)?;
    let header = Header::decode(&head).map_err(|e| Error::Medium(alloc::format!("{e}")))?;
    let l = header.layout;
    let cs = l.cluster_size() as usize;
    let mut bad = 0;
    let mut buf = filled(cs as u64 * l.extent_clusters(), 0u8)?;
    for k in 0..l.extents() {
        let (first, len, at) = l.extent(k);
        let data = &mut buf[..cs * len as usize];
        tape.read((at + l.block) / 512, data).map_err(Error::Io)?;
        for (i, block) in data.chunks(cs).enumerate() {
            let b = first as usize + i;
            bad += u64::from(reference.get(b) != Some(&hash(block)?));
        }
    }
    Ok(bad + (reference.len() as u64).saturating_sub(l.data_clusters))
}

/// `mirror`: the whole cycle; see the module docs.
pub fn mirror_scenario(cmd: &CmdLine<'_>) -> ExitCode {
    match run(cmd) {
        Ok(()) => ExitCode::Success,
        Err(e) => job_failed("mirror", e.is_refusal(), &e),
    }
}

fn word<'a>(cmd: &CmdLine<'a>, key: &str, default: &'a str) -> &'a str {
    cmd.get(key).unwrap_or(default)
}

fn run(cmd: &CmdLine<'_>) -> Result<(), Error> {
    let bad = input;
    let via = Via::parse(word(cmd, "via", "secondary"))
        .ok_or_else(|| bad("via= wants secondary or memory".into()))?;
    let param = |e: snapshot::interface::cmdline::ParamError<'_>| bad(alloc::format!("{e}"));
    let workload_on = cmd.switch("workload", true).map_err(param)?;
    let verify = cmd.switch("verify", true).map_err(param)?;
    let presync = cmd.switch("presync", true).map_err(param)?;
    let seed = cmd.u64("seed").map_err(param)?.unwrap_or(1);
    set_hold(cmd)?;
    let tape = virtio::disk(word(cmd, "tape", "tape")).map_err(|e| bad(alloc::format!("{e}")))?;
    let free = heap_free();
    crate::memory::heap::reset_peak();
    let (m, opened) = open(cmd, Options::default())?;
    let budget = budget(&m, free, cmd)?;
    let batch = budget.batch;
    // A split the secondary broke cannot give its instant any more (the
    // workload went on writing the primary without copying first): the
    // pair resyncs below and splits again, at a new instant.
    let broken = m.status().broken;
    let pending_split = matches!(opened, Opened::Split { .. }) && broken.is_none();
    log!("mirror: opened {opened:?}; {:?}", m.geometry());
    if let (Opened::Split { .. }, Some(why)) = (&opened, &broken) {
        log!("mirror: the pending split was broken ({why}); resyncing, then splitting again");
    }
    crate::trace!("mirror.opened", resumed_split = u64::from(pending_split));
    let mut progress = progress();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writer = None;
    let mut reference_hashes = None;
    if !pending_split {
        if broken.is_some() {
            m.resync()?;
        }
        if presync {
            pump_all(&m, &mut progress, batch, Point::Pair)?;
        }
        if workload_on {
            workload(&m, seed, Some(256), &stop, false)?;
            let (m2, stop2) = (m.clone(), stop.clone());
            writer = Some(thread::spawn("mirror-workload", move || {
                workload(&m2, seed + 1, None, &stop2, false)
            }));
        }
        let mut hashes = Ok(Vec::new());
        let t0 = clock::now_ns();
        let ack = m.split_with(&mut || {
            if verify {
                hashes = reference(&m);
            }
        })?;
        let ack_ns = clock::now_ns() - t0;
        reference_hashes = verify.then_some(hashes?);
        log!("mirror: split acknowledged, {} blocks to copy", ack.pending);
        crate::trace!("mirror.split", pending = ack.pending, ack_ns = ack_ns);
    } else if verify {
        log!("mirror: resuming a pending split; no reference of its instant (verify skipped)");
    }
    let (m2, stop2) = (m.clone(), stop.clone());
    let copier_thread = thread::spawn("mirror-copier", move || copier(&m2, &stop2, batch));
    let t0 = clock::now_ns();
    let summary = backup(&m, &*tape, via, budget, &mut progress);
    let backup_ns = clock::now_ns() - t0;
    let copied = copier_thread.join();
    stop.store(true, Ordering::Relaxed);
    let written = writer.map(|w| w.join()).transpose()?;
    let (summary, copied) = (summary?, copied?);
    let bad_blocks = match &reference_hashes {
        Some(r) => mismatched(&*tape, r)?,
        None => 0,
    };
    // The backup record goes out before the resync starts: a crash test
    // keys on it.
    crate::trace!(
        "mirror.backup",
        medium_bytes = summary.medium_bytes,
        on_demand = summary.on_demand,
        copier_blocks = copied,
        mismatched_blocks = bad_blocks,
        verified = u64::from(reference_hashes.is_some()),
        backup_ns = backup_ns
    );
    crate::trace::flush();
    let marked = m.resync()?;
    pump_all(&m, &mut progress, batch, Point::Resync)?;
    let status = m.status();
    log!(
        "mirror: backup via {} of {} bytes in {} ms ({} blocks on demand, {} by the copier); resync copied {} blocks; {} mismatched blocks",
        via.name(), summary.volume_bytes, backup_ns / 1_000_000, summary.on_demand, copied, marked, bad_blocks
    );
    let _ = written;
    crate::trace!(
        "mirror.done",
        medium_bytes = summary.medium_bytes,
        resync_bytes = marked * m.geometry().block_bytes,
        heap_peak = crate::memory::heap::peak() as u64,
        in_sync = u64::from(status.marked == 0 && status.phase == Phase::Paired)
    );
    crate::trace::flush();
    if bad_blocks > 0 {
        return Err(Error::Medium(alloc::format!(
            "{bad_blocks} blocks differ from the split instant"
        )));
    }
    Ok(())
}

/// A refusal of bad input.
fn input(why: alloc::string::String) -> Error {
    Error::Refused(Refusal::Input(why))
}
