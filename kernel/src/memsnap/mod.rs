//! Live memory snapshots, page by page (the user's method).
//!
//! [`start`] prepares everything while the workload runs (storage, the copy
//! map, the shadow physical map; see [`crate::memory::snapmem`]), then pauses
//! with interrupts off only to copy the eager set and swap in the shadow: the
//! *instant*. Afterwards each range frame is copied once, by the first of:
//! - the write-fault handler ([`on_write_fault`]), on the first write;
//! - the frame allocator ([`before_reuse`]), before a free frame is handed
//!   out and possibly mapped where the shadow cannot protect it;
//! - the background copier thread, at a configurable share of the CPU.
//!
//! When every bit of the copy map is set the snapshot is complete; the copy
//! stays in storage for [`restore`] until [`release`]. [`abort`] undoes a
//! snapshot at any point. The range is all RAM except the engine's own
//! reservation (storage, shadow tables, verification buffers).
//!
//! Storage is a separate part of RAM ([`RamStore`]) or a disk, where the
//! snapshot becomes an ELF core file ([`disk::DiskStore`], chosen with
//! [`Options::disk`]).
//!
//! The fault path never allocates or takes a lock, and never waits inside
//! the handler: it reaches the session through [`Published`], copies
//! through the engine window and counts in statics. When a disk store's
//! staging is full, a thread that faulted with interrupts on is blocked
//! like any waiting thread ([`thread::block_faulting`]) and retries its
//! write when the disk writer has made room.

use alloc::string::String;
use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::memsnap::{
    transition, Counters, FaultOutcome, LifecycleError, PageIo, Phase, RangeIndex, Request,
    Snapshot, Stats,
};

pub mod disk;

use alloc::sync::Arc;

use snapshot::devices::block::{BlockDevice, BlockError};
use snapshot::memsnap::elfcore::Registers;

use crate::clock::now_ns;
use crate::memory::snapmem::{self, Buffer, EngineStack, FrameSet, RamStore, ShadowPhysmap};
use crate::memory::{paging, PAGE_SIZE, PHYS_OFFSET};
use crate::sync::{IrqMutex, IrqOff, Published};
use crate::thread::{self, JoinHandle};

/// How to take a snapshot.
#[derive(Debug, Clone)]
pub struct Options {
    /// Percent of the CPU the background copier may use (1..=100).
    pub copier_share_pct: u64,
    /// Keep the copy map outside the snapshotted memory (default: inside,
    /// where it is part of the eager set).
    pub map_outside: bool,
    /// Take an independent reference at the instant (a hash of every range
    /// page, stop-the-world) and count copies per page, to verify the
    /// result. Not part of the method: its time is reported apart.
    pub verify: bool,
    /// Record every write fault's handler time.
    pub latencies: bool,
    /// Only snapshot RAM below this physical address, plus the eager set
    /// (so the pause copies the same pages as a full snapshot would): the
    /// benchmark's same-run baseline for how the pause scales with the range.
    pub range_limit: Option<u64>,
    /// Store the snapshot on this virtio-blk disk (by its serial), as an
    /// ELF core file, instead of in RAM.
    pub disk: Option<String>,
    /// Staging pages for a disk store (default: sized from RAM and the
    /// eager set); never fewer than the eager set needs.
    pub staging_pages: Option<usize>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            copier_share_pct: 30,
            map_outside: false,
            verify: false,
            latencies: false,
            range_limit: None,
            disk: None,
            staging_pages: None,
        }
    }
}

/// Why a snapshot could not start. Nothing was changed.
#[derive(Debug)]
pub enum StartError {
    /// A snapshot is active or complete and not released.
    Busy(LifecycleError),
    /// Not enough free memory for the reservation.
    NoMemory {
        /// Bytes the reservation needs.
        needed: u64,
        /// Bytes free.
        free: u64,
    },
    /// The range is empty (e.g. `range_limit` below all RAM).
    EmptyRange,
    /// The shadow map could not be built.
    Shadow(&'static str),
    /// The disk named in [`Options::disk`] is missing or failed.
    NoDisk(BlockError),
    /// The disk cannot take the snapshot (too small, read-only, failing).
    Disk(disk::DiskError),
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::Busy(e) => write!(f, "{e}"),
            StartError::NoMemory { needed, free } => write!(
                f,
                "cannot reserve snapshot storage: needs {} MiB, {} MiB free",
                needed >> 20,
                free >> 20
            ),
            StartError::EmptyRange => write!(f, "the snapshot range holds no RAM"),
            StartError::Shadow(e) => write!(f, "cannot build the shadow map: {e}"),
            StartError::NoDisk(e) => write!(f, "{e}"),
            StartError::Disk(e) => write!(f, "{e}"),
        }
    }
}

/// What a snapshot did, for reports and benchmarks.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Frames in the range.
    pub pages: u64,
    /// Copies by cause.
    pub stats: Stats,
    /// The pause: eager copy and protection, interrupts off.
    pub pause_ns: u64,
    /// Time taken by the verification reference inside the same stop.
    pub reference_ns: u64,
    /// The part of the pause spent turning protection on (PDPT swap and
    /// TLB flush); the rest is the eager copy.
    pub protect_ns: u64,
    /// From the instant to the last copy.
    pub total_ns: u64,
    /// Time the copier spent copying.
    pub copier_busy_ns: u64,
    /// Range pages whose copy differs from the reference (verify only).
    pub mismatched: Option<u64>,
    /// Range pages not copied exactly once (verify only).
    pub not_copied_once: Option<u64>,
    /// The instant, in ns since boot.
    pub instant_ns: u64,
    /// Why the snapshot failed ([`Phase::Failed`]).
    pub error: Option<String>,
    /// What the disk store did, for snapshots to disk.
    pub disk: Option<DiskReport>,
    /// Times a faulting thread was blocked until the disk writer made room.
    pub fault_waits: u64,
    /// Times the background copier waited for room.
    pub copier_waits: u64,
}

/// A snapshot to disk's figures.
#[derive(Debug, Clone, Default)]
pub struct DiskReport {
    /// The core file's length.
    pub core_bytes: u64,
    /// The writer's figures.
    pub writer: disk::WriterStats,
    /// Completing the file: the last pages, flushes and the header, ns.
    pub complete_ns: u64,
    /// Staging pages.
    pub staging_pages: u64,
}

static COUNTERS: Counters = Counters::new();
static SESSION: Published<Session> = Published::new();
static PHASE: IrqMutex<Phase> = IrqMutex::new(Phase::Idle);
static STARTING: AtomicBool = AtomicBool::new(false);
/// The shadow is live: writes through the physical map may be ours.
static PROTECTING: AtomicBool = AtomicBool::new(false);
static ABORT: AtomicBool = AtomicBool::new(false);
static COPIER: IrqMutex<Option<JoinHandle<()>>> = IrqMutex::new(None);
static REPORT: IrqMutex<Option<Report>> = IrqMutex::new(None);
static DMA: IrqMutex<Vec<Range<u64>>> = IrqMutex::new(Vec::new());
static LATENCY_COUNT: AtomicU64 = AtomicU64::new(0);
static FAULT_WAITS: AtomicU64 = AtomicU64::new(0);
static COPIER_WAITS: AtomicU64 = AtomicU64::new(0);
/// Threads (one bit per slot) parked by a write fault, and when each
/// first faulted (TSC): for the fault latencies.
static WAITING: AtomicU64 = AtomicU64::new(0);
static WAIT_START: [AtomicU64; 64] = [const { AtomicU64::new(0) }; 64];
static SAMPLE_COUNT: AtomicU64 = AtomicU64::new(0);
/// When protection went on (ns since boot): the snapshot instant.
static INSTANT_NS: AtomicU64 = AtomicU64::new(0);
/// The registers at the instant (for the core file).
static REGISTERS: IrqMutex<Registers> = IrqMutex::new(Registers([0; 27]));

const LATENCY_CAPACITY: u64 = 1 << 17;
const SAMPLE_CAPACITY: u64 = 8192;
const SAMPLE_WORDS: u64 = 4;
const COPIER_BATCH: u64 = 16;
const COPIER_BURST_NS: u64 = 2_000_000;
const PAUSE_STACK: u64 = 64 * 1024;

/// Where snapshot pages go: a separate part of RAM ([`RamStore`]) or a
/// disk ([`disk::DiskStore`]). Everything here runs with interrupts off,
/// `save` in the write-fault handler: an implementation must not block,
/// allocate or fault.
pub trait SnapshotStore: Send + Sync {
    /// Copies range frame `frame` into `slot`. On failure the store marks
    /// itself [`Self::failed`].
    fn save(&self, frame: u64, slot: u64);
    /// Copies `slot` back over range frame `frame` (restore); false if this
    /// store cannot (its copy is not in memory).
    fn load(&self, slot: u64, frame: u64) -> bool;
    /// The hash of a copy saved in this same interrupts-off stretch (see
    /// [`snapshot::memsnap::page_hash`]).
    fn fresh_hash(&self, slot: u64) -> u64;
    /// The hash of `slot`'s copy at any time, if it is in memory.
    fn slot_hash(&self, slot: u64) -> Option<u64>;
    /// Slots it holds.
    fn slots(&self) -> u64;
    /// Pages `save` can take now without drawing on a reserve kept for
    /// copiers that cannot wait.
    fn room(&self) -> u64 {
        u64::MAX
    }
    /// Of [`Self::room`], what the background copier may take: the rest is
    /// kept for write faults, so that a copier running ahead of a slow store
    /// does not make the workload wait.
    fn background_room(&self) -> u64 {
        self.room()
    }
    /// Whether a copy was lost: the snapshot cannot complete.
    fn failed(&self) -> bool {
        false
    }
}

impl SnapshotStore for RamStore {
    fn save(&self, frame: u64, slot: u64) {
        RamStore::save(self, frame, slot);
    }
    fn load(&self, slot: u64, frame: u64) -> bool {
        RamStore::load(self, slot, frame);
        true
    }
    fn fresh_hash(&self, slot: u64) -> u64 {
        self.hash(slot)
    }
    fn slot_hash(&self, slot: u64) -> Option<u64> {
        Some(self.hash(slot))
    }
    fn slots(&self) -> u64 {
        self.len()
    }
}

struct Session {
    snap: Snapshot<Buffer>,
    store: alloc::boxed::Box<dyn SnapshotStore>,
    shadow: ShadowPhysmap,
    reference: Option<Buffer>,
    copies: Option<Buffer>,
    latencies: Option<Buffer>,
    samples: Buffer,
}

impl PageIo for Session {
    fn copy_out(&self, frame: u64, slot: u64) {
        debug_assert!(!x86_64::instructions::interrupts::are_enabled());
        self.store.save(frame, slot);
        if let Some(copies) = &self.copies {
            copies.bytes()[slot as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn unprotect(&self, frame: u64) {
        self.shadow.set_writable(frame);
    }
}

impl Session {
    /// Whether copying `frame` now would draw on the store's reserve: it is
    /// a range frame not yet copied, the store has no room and has not
    /// failed (a failed store takes nothing, so no one waits for it).
    fn must_wait(&self, frame: u64) -> bool {
        self.store.room() == 0
            && !self.store.failed()
            && self
                .snap
                .index()
                .slot(frame)
                .is_some_and(|slot| !self.snap.is_copied(slot))
    }

    fn sample(&self) {
        let i = SAMPLE_COUNT.fetch_add(1, Ordering::Relaxed);
        if i < SAMPLE_CAPACITY {
            let s = self.snap.stats();
            let t = now_ns().saturating_sub(INSTANT_NS.load(Ordering::Relaxed));
            let words =
                &self.samples.atomics()[(i * SAMPLE_WORDS) as usize..][..SAMPLE_WORDS as usize];
            for (w, v) in words.iter().zip([t, s.eager, s.fault, s.background]) {
                w.store(v, Ordering::Relaxed);
            }
        }
    }
}

/// Registers physical `[start, end)` as a DMA target: devices write it
/// behind the MMU's back. Registered before a snapshot's instant, it is
/// copied at the instant; registered during a snapshot, its frames are
/// copied now, before the caller lets a device write them.
pub fn register_dma(range: Range<u64>) {
    // The pause holds this lock, so either the pause sees the range or
    // the range sees the snapshot protecting.
    let protecting = {
        let mut dma = DMA.lock();
        dma.push(range.clone());
        PROTECTING.load(Ordering::Acquire)
    };
    if protecting {
        for frame in range.start / PAGE_SIZE..range.end.div_ceil(PAGE_SIZE) {
            // Only frames not yet copied matter: the device's writes bypass
            // the protection anyway. Waits for the disk writer if staging
            // is full, like a fault.
            thread::block_until(disk::room_key(), || {
                SESSION
                    .with(|s| {
                        let copied = s
                            .snap
                            .index()
                            .slot(frame)
                            .is_none_or(|slot| s.snap.is_copied(slot));
                        if copied {
                            return true;
                        }
                        if s.must_wait(frame) {
                            return false;
                        }
                        s.snap.on_write_fault(s, frame);
                        true
                    })
                    .unwrap_or(true)
            });
        }
    }
}

/// Forgets a DMA registration made with [`register_dma`].
pub fn unregister_dma(range: Range<u64>) {
    let mut dma = DMA.lock();
    if let Some(i) = dma.iter().position(|r| *r == range) {
        dma.swap_remove(i);
    }
}

/// The virtual window whose writes the snapshot protects, while it does.
pub fn window() -> Option<(u64, u64)> {
    PROTECTING
        .load(Ordering::Acquire)
        .then(|| (PHYS_OFFSET, PHYS_OFFSET + paging::physmap_end()))
}

/// What the fault handler should do with a write to the snapshot window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// Copied (or already copied) and writable again: resume the write.
    Handled,
    /// Not the snapshot's frame.
    NotOurs,
    /// Staging has no room: block the thread on this key (see
    /// [`thread::block_faulting`]) and let it retry the write, or, if it
    /// cannot wait, call [`on_write_fault`] again with `may_wait` false.
    Wait(usize),
}

/// The write-fault path (interrupts are off): copy the frame at `offset` in
/// the physical map unless already copied, then let the write through.
/// `may_wait` says the faulting thread could be blocked.
pub fn on_write_fault(offset: u64, may_wait: bool) -> WriteFault {
    let mut start = crate::arch::cpu::rdtsc();
    let frame = offset / PAGE_SIZE;
    let outcome = SESSION.with(|s| {
        if may_wait && s.must_wait(frame) {
            return None;
        }
        // A retry after waiting for room: the latency runs from the first
        // fault, so the wait counts.
        let waited = s.latencies.is_some() && WAITING.load(Ordering::Relaxed) != 0;
        let mut retried = false;
        if let Some(slot) = waited.then(thread::current_slot).flatten() {
            let bit = 1u64 << (slot % 64);
            if WAITING.fetch_and(!bit, Ordering::Relaxed) & bit != 0 {
                start = WAIT_START[slot % 64].load(Ordering::Relaxed);
                retried = true;
            }
        }
        let outcome = s.snap.on_write_fault(s, frame);
        if let (Some(lat), FaultOutcome::Copied, _) | (Some(lat), _, true) =
            (&s.latencies, outcome, retried)
        {
            let i = LATENCY_COUNT.fetch_add(1, Ordering::Relaxed);
            if i < LATENCY_CAPACITY {
                let ns = crate::clock::cycles_to_ns(crate::arch::cpu::rdtsc() - start);
                lat.atomics()[i as usize].store(ns, Ordering::Relaxed);
            }
        }
        Some(outcome)
    });
    match outcome {
        Some(None) => WriteFault::Wait(disk::room_key()),
        Some(Some(FaultOutcome::Copied | FaultOutcome::AlreadyCopied)) => WriteFault::Handled,
        Some(Some(FaultOutcome::NotInRange)) | None => WriteFault::NotOurs,
    }
}

/// Counts a write fault that blocked thread `slot` for room, from time
/// `since` (TSC): called by the fault path once the thread is parked, so
/// its retry can record the whole latency.
pub fn note_fault_wait(slot: usize, since: u64) {
    FAULT_WAITS.fetch_add(1, Ordering::Relaxed);
    WAIT_START[slot % 64].store(since, Ordering::Relaxed);
    WAITING.fetch_or(1 << (slot % 64), Ordering::Relaxed);
}

/// Called by the frame allocator for each frame it hands out: a frame of an
/// active snapshot is copied before its new owner writes it, because the
/// owner may map it where the shadow cannot protect it.
pub fn before_reuse(phys: u64) {
    if PROTECTING.load(Ordering::Acquire) {
        SESSION.with(|s| s.snap.on_write_fault(s, phys / PAGE_SIZE));
    }
}

fn ram_frames(limit: u64) -> impl Iterator<Item = Range<u64>> {
    crate::boot_info::usable_ram().filter_map(move |r| {
        let start = r.start.div_ceil(PAGE_SIZE);
        let end = r.end.min(limit) / PAGE_SIZE;
        (start < end).then_some(start..end)
    })
}

/// Takes a live snapshot: returns once the instant has passed and the copier
/// runs. See [`wait`], [`abort`], [`release`], [`restore`].
pub fn start(opts: &Options) -> Result<Report, StartError> {
    if STARTING.swap(true, Ordering::AcqRel) {
        return Err(StartError::Busy(LifecycleError {
            phase: Phase::Active,
            request: Request::Start,
        }));
    }
    let result = prepare_and_pause(opts);
    STARTING.store(false, Ordering::Release);
    result
}

/// Everything a snapshot needs, allocated before the pause.
struct Reserved {
    index: RangeIndex,
    storage: Storage,
    table_frames: FrameSet,
    pt_buffer: Buffer,
    map_words: Buffer,
    reference: Option<Buffer>,
    copies: Option<Buffer>,
    latencies: Option<Buffer>,
    samples: Buffer,
    pause_stack: EngineStack,
}

/// Where the reservation puts the snapshot.
enum Storage {
    /// One RAM frame per range frame.
    Ram(RamStore),
    /// A disk, prepared for the core file, and its staging area.
    Disk(disk::DiskStore),
}

/// Staging pages a copier that cannot wait may still use when the rest is
/// full: faults with interrupts off, the writer's own faults, frames the
/// allocator hands out.
const STAGING_RESERVE: usize = 256;

/// Staging pages for a range of `universe` frames whose eager set is about
/// `eager` frames, with `free` frames free: all of the eager set must fit,
/// since the pause copies it with the writer stopped. By default a
/// sixteenth of the range, 8 MiB to 128 MiB, and at most an eighth of the
/// free frames. Early in a snapshot the workload's faults alone can
/// outrun the disk, whose requests are then single scattered pages; at
/// 2 GiB a 32 MiB area left faults parked for the writer (27..84 of about
/// 47 600 per run) where 128 MiB, peaking at 43..74 MiB, left none.
fn staging_pages(universe: u64, eager: u64, free: u64, asked: Option<usize>) -> usize {
    let base = asked.map_or_else(
        || (universe / 16).clamp(2048, 32768).min(free / 8).max(2048),
        |n| n as u64,
    );
    base.max(eager + eager / 4 + STAGING_RESERVE as u64 + 512) as usize
}

/// Sizes and allocates the reservation and builds the range: all RAM below
/// the limit except the reservation. RAM storage gets one frame per range
/// frame; since the range is what the reservation leaves, storage is about
/// half of the RAM that remains after the other buffers. Disk storage needs
/// only its staging area in RAM, and the disk is checked for room before
/// anything on it changes.
fn reserve(opts: &Options) -> Result<Reserved, StartError> {
    let limit = opts
        .range_limit
        .unwrap_or(u64::MAX)
        .min(paging::physmap_end());
    let frames = limit.div_ceil(PAGE_SIZE);
    let universe: u64 = ram_frames(limit).map(|r| r.end - r.start).sum();
    if universe == 0 {
        return Err(StartError::EmptyRange);
    }
    let target: Option<Arc<dyn BlockDevice>> = match &opts.disk {
        Some(name) => {
            let d: Arc<dyn BlockDevice> = crate::virtio::disk(name).map_err(StartError::NoDisk)?;
            // A first check against the whole universe, before allocating.
            let (_, layout) = disk::plan(&[(0, universe)])
                .map_err(|e| StartError::Disk(disk::DiskError::Layout(e)))?;
            let reservation_slack = universe / 4 * PAGE_SIZE;
            disk::check_capacity(&*d, layout.total.saturating_sub(reservation_slack))
                .map_err(StartError::Disk)?;
            Some(d)
        }
        None => None,
    };
    let is_ram = |f: u64| ram_frames(limit).any(|r| r.contains(&f));
    let pages = |bytes: u64| bytes.div_ceil(PAGE_SIZE);
    let tables = ShadowPhysmap::pds_needed(frames) + pages(ShadowPhysmap::pt_bytes(frames));
    let map_pages = pages(snapshot::memsnap::words_for(universe) as u64 * 8);
    let verify_pages = if opts.verify {
        pages(universe * 8) + pages(universe)
    } else {
        0
    };
    let latency_pages = if opts.latencies {
        pages(LATENCY_CAPACITY * 8)
    } else {
        0
    };
    let (free, _) = crate::memory::frames::stats();
    let staging = target.as_ref().map(|_| {
        let mut eager = 0;
        snapmem::walk_eager(|_| eager += 1);
        staging_pages(universe, eager, free, opts.staging_pages)
    });
    let sample_pages = pages(SAMPLE_CAPACITY * SAMPLE_WORDS * 8) + pages(PAUSE_STACK);
    let outside = tables
        + verify_pages
        + latency_pages
        + sample_pages
        + staging.unwrap_or(0) as u64
        + if opts.map_outside { map_pages } else { 0 };
    let storage = match staging {
        Some(_) => 0,
        None => universe.saturating_sub(outside).div_ceil(2),
    };
    let needed = storage + outside + map_pages;
    // Keep some frames for the kernel to go on working during the snapshot.
    let no_memory = || StartError::NoMemory {
        needed: (needed + 1024) * PAGE_SIZE,
        free: free * PAGE_SIZE,
    };
    if free < needed + 1024 {
        return Err(no_memory());
    }
    let table_frames = FrameSet::alloc(ShadowPhysmap::pds_needed(frames)).ok_or_else(no_memory)?;
    let buffer = |bytes: u64| Buffer::alloc(bytes).ok_or_else(no_memory);
    let pt_buffer = buffer(ShadowPhysmap::pt_bytes(frames))?;
    let map_words = buffer(map_pages * PAGE_SIZE)?;
    let reference = opts.verify.then(|| buffer(universe * 8)).transpose()?;
    let copies = opts.verify.then(|| buffer(universe)).transpose()?;
    let latencies = opts
        .latencies
        .then(|| buffer(LATENCY_CAPACITY * 8))
        .transpose()?;
    let samples = buffer(SAMPLE_CAPACITY * SAMPLE_WORDS * 8)?;
    let pause_stack = EngineStack::alloc(PAUSE_STACK).ok_or_else(no_memory)?;
    let staging_area = staging
        .map(|n| snapmem::StagingArea::alloc(n, STAGING_RESERVE).ok_or_else(no_memory))
        .transpose()?;

    // RAM storage last: every frame of the other buffers that fell inside
    // the range has made the range smaller, and so does each storage frame.
    let others = [
        Some(&samples),
        Some(&pt_buffer),
        Some(&map_words),
        reference.as_ref(),
        copies.as_ref(),
        latencies.as_ref(),
    ];
    let mut reserved_in_range = others
        .into_iter()
        .flatten()
        .flat_map(Buffer::frames)
        .chain(pause_stack.frames())
        .chain(table_frames.frames())
        .chain(staging_area.iter().flat_map(|a| a.frames()))
        .filter(|&f| is_ram(f))
        .count() as u64;
    if !opts.map_outside {
        reserved_in_range -= map_words.frames().filter(|&f| is_ram(f)).count() as u64;
    }
    let ram_store = match staging_area {
        Some(_) => None,
        None => Some(
            RamStore::alloc_for_range(universe - reserved_in_range, is_ram)
                .ok_or_else(no_memory)?,
        ),
    };
    let mut index = RangeIndex::new(frames);
    for r in ram_frames(limit) {
        index.include(r.start, r.end);
    }
    if opts.range_limit.is_some() {
        snapmem::walk_eager(|f| {
            if f < frames && ram_frames(u64::MAX).any(|r| r.contains(&f)) {
                index.include(f, f + 1);
            }
        });
    }
    let store_frames: alloc::boxed::Box<dyn Iterator<Item = u64>> =
        match (&ram_store, &staging_area) {
            (Some(store), _) => store.frames(),
            (None, Some(area)) => alloc::boxed::Box::new(area.frames()),
            (None, None) => alloc::boxed::Box::new(core::iter::empty()),
        };
    let reserved = store_frames.chain(table_frames.frames());
    let buffers = [
        Some(&samples),
        Some(&pt_buffer),
        reference.as_ref(),
        copies.as_ref(),
        latencies.as_ref(),
    ];
    let buffer_frames = buffers
        .into_iter()
        .flatten()
        .flat_map(Buffer::frames)
        .chain(pause_stack.frames());
    let map_frames = opts
        .map_outside
        .then(|| map_words.frames())
        .into_iter()
        .flatten();
    for frame in reserved.chain(buffer_frames).chain(map_frames) {
        index.exclude(frame);
    }
    index.seal();
    if index.is_empty() {
        return Err(StartError::EmptyRange);
    }
    let storage = match (ram_store, staging_area, target) {
        (Some(store), _, _) => Storage::Ram(store),
        (None, Some(area), Some(target)) => {
            let plan = disk::plan(&index.runs())
                .map_err(|e| StartError::Disk(disk::DiskError::Layout(e)))?;
            Storage::Disk(
                disk::DiskStore::prepare(target, plan, index.len(), area)
                    .map_err(StartError::Disk)?,
            )
        }
        _ => unreachable!("a reservation has RAM storage or a disk with staging"),
    };
    Ok(Reserved {
        index,
        storage,
        table_frames,
        pt_buffer,
        map_words,
        reference,
        copies,
        latencies,
        samples,
        pause_stack,
    })
}

fn prepare_and_pause(opts: &Options) -> Result<Report, StartError> {
    transition(*PHASE.lock(), Request::Start).map_err(StartError::Busy)?;
    let Reserved {
        index,
        storage,
        table_frames,
        pt_buffer,
        map_words,
        reference,
        copies,
        latencies,
        samples,
        mut pause_stack,
    } = reserve(opts)?;
    let shadow =
        ShadowPhysmap::build(&index, table_frames, pt_buffer).map_err(StartError::Shadow)?;
    let eager_map: Vec<u64> = if opts.map_outside {
        Vec::new()
    } else {
        map_words.frames().collect()
    };
    let (store, disk): (alloc::boxed::Box<dyn SnapshotStore>, _) = match storage {
        Storage::Ram(store) => (alloc::boxed::Box::new(store), None),
        Storage::Disk(store) => {
            let shared = store.shared();
            (alloc::boxed::Box::new(store), Some(shared))
        }
    };
    let session = Session {
        snap: Snapshot::new(index, map_words, &COUNTERS),
        store,
        shadow,
        reference,
        copies,
        latencies,
        samples,
    };
    assert!(
        session.store.slots() >= session.snap.index().len(),
        "storage smaller than the range"
    );
    LATENCY_COUNT.store(0, Ordering::Relaxed);
    FAULT_WAITS.store(0, Ordering::Relaxed);
    WAITING.store(0, Ordering::Relaxed);
    COPIER_WAITS.store(0, Ordering::Relaxed);
    SAMPLE_COUNT.store(0, Ordering::Relaxed);
    ABORT.store(false, Ordering::Relaxed);
    if SESSION.publish(alloc::boxed::Box::new(session)).is_err() {
        panic!("a snapshot session was published while the phase was idle");
    }

    // The pause: the world stops here (one CPU, interrupts off). The pause
    // itself writes only eager pages (its stack, the engine's statics, the
    // copy map), so every other page is as it was when the pause began.
    //
    // With `verify`, the independent reference is taken in the same stop:
    // each eager page is hashed as it is copied (the moment it is
    // snapshotted), every other page after the eager phase, just before
    // protection goes on. Hashing time is reported apart from the pause.
    // Held through the pause: no DMA registration slips past it.
    let dma = DMA.lock();
    let mut times = (0, 0, 0);
    // The CPU state the core file records: this thread just before the
    // pause, on a stack the snapshot holds (unlike the pause stack).
    *REGISTERS.lock() = crate::arch::cpu::registers_here();
    // Off the caller's stack, which is itself a page of the range.
    pause_stack.run(|| {
        let t0 = now_ns();
        let (t1, hash_ns) = SESSION
            .with(|s| {
                let mut hash_ns = 0;
                let mut reference = |frame: u64| {
                    if let (Some(reference), Some(slot)) =
                        (&s.reference, s.snap.index().slot(frame))
                    {
                        let t = now_ns();
                        let hash = snapmem::hash_frame(frame * PAGE_SIZE);
                        reference.atomics()[slot as usize].store(hash, Ordering::Relaxed);
                        hash_ns += now_ns() - t;
                    }
                };
                // The copy map's pages first, before any claim changes them.
                for &frame in &eager_map {
                    if let Some(slot) = s.snap.index().slot(frame) {
                        reference(frame);
                        s.copy_out(frame, slot);
                    }
                }
                for &frame in &eager_map {
                    s.snap.mark_copied_eager(s, frame);
                }
                let mut eager = |frame: u64| {
                    if s.snap
                        .index()
                        .slot(frame)
                        .is_some_and(|slot| !s.snap.is_copied(slot))
                    {
                        reference(frame);
                        s.snap.copy_eager(s, frame);
                    }
                };
                snapmem::walk_eager(&mut eager);
                // A device may write these at any moment, even now: there
                // is no independent reference for them, so the copy itself
                // is the reference (checked: copied exactly once).
                for range in dma.iter() {
                    for frame in range.start / PAGE_SIZE..range.end.div_ceil(PAGE_SIZE) {
                        let Some(slot) = s.snap.index().slot(frame) else {
                            continue;
                        };
                        if !s.snap.is_copied(slot) {
                            s.snap.copy_eager(s, frame);
                            if let Some(reference) = &s.reference {
                                let t = now_ns();
                                let hash = s.store.fresh_hash(slot);
                                reference.atomics()[slot as usize].store(hash, Ordering::Relaxed);
                                hash_ns += now_ns() - t;
                            }
                        }
                    }
                }
                (now_ns(), hash_ns)
            })
            .unwrap_or((t0, 0));
        SESSION.with(|s| {
            if let Some(reference) = &s.reference {
                for (slot, frame) in s.snap.index().iter().enumerate() {
                    if !s.snap.is_copied(slot as u64) {
                        let hash = snapmem::hash_frame(frame * PAGE_SIZE);
                        reference.atomics()[slot].store(hash, Ordering::Relaxed);
                    }
                }
            }
        });
        let t2 = now_ns();
        SESSION.with(|s| {
            // From here on writes through the physical map fault into the engine.
            PROTECTING.store(true, Ordering::Release);
            s.shadow.activate();
            INSTANT_NS.store(now_ns(), Ordering::Relaxed);
            s.sample();
        });
        let t3 = now_ns();
        times = (
            (t1 - t0 - hash_ns) + (t3 - t2),
            hash_ns + (t2 - t1),
            t3 - t2,
        );
    });
    drop(dma);
    // The world runs again.
    let (pause_ns, reference_ns, protect_ns) = times;

    *PHASE.lock() = Phase::Active;
    let stats = Stats::from(COUNTERS.read());
    let pages = SESSION.with(|s| s.snap.index().len()).unwrap_or(0);
    let report = Report {
        pages,
        stats,
        pause_ns,
        protect_ns,
        reference_ns,
        instant_ns: INSTANT_NS.load(Ordering::Relaxed),
        ..Report::default()
    };
    *REPORT.lock() = Some(report.clone());
    crate::trace!(
        "memsnap.start",
        pages = pages,
        eager = stats.eager,
        pause_ns = pause_ns,
        reference_ns = reference_ns,
        instant_ns = report.instant_ns
    );
    let share = opts.copier_share_pct.clamp(1, 100);
    *COPIER.lock() = Some(thread::spawn("memsnap-copier", move || {
        copier(share, disk);
    }));
    Ok(report)
}

fn copier(share_pct: u64, disk: Option<Arc<disk::Shared>>) {
    let rest_ns = COPIER_BURST_NS * (100 - share_pct) / share_pct;
    let mut busy_ns = 0;
    loop {
        if ABORT.load(Ordering::Acquire) {
            return;
        }
        if SESSION.with(|s| s.store.failed()).unwrap_or(false) {
            fail(disk.as_ref());
            return;
        }
        let burst_start = now_ns();
        let (mut done, mut pages) = (false, 0);
        while now_ns() - burst_start < COPIER_BURST_NS {
            let t = now_ns();
            // At most what the store takes without its reserve and the
            // faults' headroom; `None` when it takes nothing now (a disk's
            // staging is as full as the copier may make it).
            let copied = SESSION
                .with(|s| match s.store.background_room().min(COPIER_BATCH) {
                    0 if !s.store.failed() => None,
                    room => Some(s.snap.copy_background(s, room.max(1))),
                })
                .unwrap_or(Some(0));
            busy_ns += now_ns() - t;
            match copied {
                Some(0) => {
                    done = true;
                    break;
                }
                Some(n) => pages += n,
                None => {
                    COPIER_WAITS.fetch_add(1, Ordering::Relaxed);
                    thread::block_until(disk::room_key(), || {
                        SESSION
                            .with(|s| s.store.background_room() > 0 || s.store.failed())
                            .unwrap_or(true)
                    });
                }
            }
        }
        SESSION.with(Session::sample);
        crate::trace!("memsnap.burst", ns = now_ns() - burst_start, pages = pages);
        if done && SESSION.with(|s| s.snap.is_complete()).unwrap_or(false) {
            finish(busy_ns, disk.as_ref());
            return;
        }
        if rest_ns > 0 {
            thread::sleep_ns(rest_ns);
        }
    }
}

/// Ends a snapshot whose store failed: the phase becomes `Failed` and the
/// report says why. Protection stays until [`abort`]; writes still get
/// through (the fault path copies nothing into a failed store).
fn fail(disk: Option<&Arc<disk::Shared>>) {
    let why = disk
        .and_then(|d| d.error())
        .unwrap_or_else(|| String::from("the snapshot store failed"));
    crate::log!("memsnap: snapshot failed: {why}");
    crate::trace!("memsnap.failed");
    if let Some(r) = REPORT.lock().as_mut() {
        r.stats = Stats::from(COUNTERS.read());
        r.error = Some(why);
    }
    let mut phase = PHASE.lock();
    *phase = transition(*phase, Request::Fail).unwrap_or(*phase);
    drop(phase);
    thread::wake_all(&PHASE as *const _ as usize);
}

/// Makes a disk snapshot durable: drains staging, flushes, writes the
/// core file's header. Returns the time it took.
fn complete_on_disk(d: &disk::Shared, total_ns: u64) -> Result<u64, String> {
    let t = now_ns();
    let wall = crate::arch::rtc::wall_clock();
    let meta = disk::Meta {
        instant_ns: INSTANT_NS.load(Ordering::Relaxed),
        total_ns,
        stats: Stats::from(COUNTERS.read()),
        wall: wall.as_deref(),
    };
    let regs = *REGISTERS.lock();
    d.complete(&regs, meta)?;
    Ok(now_ns() - t)
}

/// Compares every slot's copy with the reference taken at the instant;
/// returns the mismatches, or `None` without verification.
fn count_mismatches(disk: Option<&Arc<disk::Shared>>) -> Option<u64> {
    let len = SESSION.with(|s| s.reference.is_some().then(|| s.snap.index().len()))??;
    let mut mismatched = 0;
    let mut check = |slot: u64, hash: u64| {
        let expected = SESSION
            .with(|s| {
                let reference = s.reference.as_ref().expect("checked above");
                reference.atomics()[slot as usize].load(Ordering::Relaxed)
            })
            .unwrap_or(hash);
        if hash != expected {
            if mismatched < 8 {
                let frame = SESSION
                    .with(|s| s.snap.index().iter().nth(slot as usize))
                    .flatten()
                    .unwrap_or(0);
                crate::log!("mismatch: frame {:#x} (slot {slot})", frame * PAGE_SIZE);
            }
            mismatched += 1;
        }
    };
    match disk {
        Some(d) => {
            const CHUNK: u64 = 256;
            let mut hashes = alloc::vec![0u64; CHUNK as usize];
            let mut first = 0;
            while first < len {
                let n = CHUNK.min(len - first) as usize;
                if let Err(e) = d.read_hashes(first, &mut hashes[..n]) {
                    crate::log!("memsnap: cannot read the copy back: {e}");
                    return Some(len - first + mismatched);
                }
                for (i, &hash) in hashes[..n].iter().enumerate() {
                    check(first + i as u64, hash);
                }
                first += n as u64;
            }
        }
        None => {
            for slot in 0..len {
                let hash = SESSION
                    .with(|s| s.store.slot_hash(slot))
                    .flatten()
                    .unwrap_or(0);
                check(slot, hash);
            }
        }
    }
    Some(mismatched)
}

fn finish(copier_busy_ns: u64, disk: Option<&Arc<disk::Shared>>) {
    let end = now_ns();
    let total_ns = end - INSTANT_NS.load(Ordering::Relaxed);
    let mut disk_report = None;
    if let Some(d) = disk {
        match complete_on_disk(d, total_ns) {
            Ok(complete_ns) => {
                disk_report = Some(DiskReport {
                    core_bytes: d.total(),
                    writer: d.stats(),
                    complete_ns,
                    staging_pages: d.staging_pages(),
                });
                crate::trace!(
                    "memsnap.core",
                    bytes = d.total(),
                    written = d.stats().bytes,
                    complete_ns = complete_ns
                );
            }
            Err(_) => {
                fail(disk);
                return;
            }
        }
    }
    let mismatched = count_mismatches(disk);
    let not_copied_once = SESSION
        .with(|s| {
            s.copies.as_ref().map(|copies| {
                let len = s.snap.index().len() as usize;
                copies.bytes()[..len]
                    .iter()
                    .filter(|c| c.load(Ordering::Relaxed) != 1)
                    .count() as u64
            })
        })
        .flatten();
    let mut report = REPORT.lock();
    if let Some(r) = report.as_mut() {
        r.stats = Stats::from(COUNTERS.read());
        r.total_ns = end - r.instant_ns;
        r.copier_busy_ns = copier_busy_ns;
        r.mismatched = mismatched;
        r.not_copied_once = not_copied_once;
        r.disk = disk_report;
        r.fault_waits = FAULT_WAITS.load(Ordering::Relaxed);
        r.copier_waits = COPIER_WAITS.load(Ordering::Relaxed);
    }
    drop(report);
    {
        let mut phase = PHASE.lock();
        *phase = transition(*phase, Request::Finish).unwrap_or(*phase);
    }
    thread::wake_all(&PHASE as *const _ as usize);
}

/// The current phase.
pub fn phase() -> Phase {
    *PHASE.lock()
}

/// Waits until the snapshot is complete (or gone) and returns its report.
pub fn wait() -> Option<Report> {
    thread::block_until(&PHASE as *const _ as usize, || {
        *PHASE.lock() != Phase::Active
    });
    REPORT.lock().clone()
}

/// Stops a snapshot in progress (or drops a complete one): the copier
/// stops, every permission is restored, all storage is freed.
pub fn abort() -> Result<(), LifecycleError> {
    transition(*PHASE.lock(), Request::Abort)?;
    teardown();
    Ok(())
}

/// Drops a completed snapshot and frees its storage.
pub fn release() -> Result<(), LifecycleError> {
    transition(*PHASE.lock(), Request::Release)?;
    teardown();
    Ok(())
}

fn teardown() {
    ABORT.store(true, Ordering::Release);
    let copier = COPIER.lock().take();
    if let Some(copier) = copier {
        copier.join();
    }
    // Protection off first (writes go through the original map again), then
    // the fault path stops claiming writes, then the session is freed: its
    // heap memory is writable again by then.
    SESSION.with(|s| s.shadow.deactivate());
    PROTECTING.store(false, Ordering::Release);
    drop(SESSION.take());
    *PHASE.lock() = Phase::Idle;
    thread::wake_all(&PHASE as *const _ as usize);
}

/// Why a restore was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreError {
    /// Restore needs a complete snapshot.
    NotComplete(Phase),
    /// The snapshot is on a disk, not in memory (restore from a core file
    /// is not supported).
    OnDisk,
}

/// Rolls the physical-map range `[virt, virt + len)` back to the snapshot,
/// copying back only pages written since the instant (the CPU's dirty bits
/// in the shadow map). The caller must keep everything else off that
/// memory meanwhile. Returns how many pages were copied back.
pub fn restore(virt: u64, len: u64) -> Result<u64, RestoreError> {
    let phase = phase();
    if phase != Phase::Complete {
        return Err(RestoreError::NotComplete(phase));
    }
    if SESSION.with(|s| s.store.slot_hash(0).is_none()) == Some(true) {
        return Err(RestoreError::OnDisk);
    }
    let first = (virt - PHYS_OFFSET) / PAGE_SIZE;
    let end = (virt - PHYS_OFFSET + len).div_ceil(PAGE_SIZE);
    let mut restored = 0;
    for frame in first..end {
        let copied = SESSION.with(|s| match s.snap.index().slot(frame) {
            Some(slot) if s.shadow.take_dirty(frame) => s.store.load(slot, frame),
            _ => false,
        });
        restored += u64::from(copied == Some(true));
    }
    crate::trace!("memsnap.restore", pages = end - first, restored = restored);
    Ok(restored)
}

/// Fault latencies recorded by the last snapshot (ns), sorted.
pub fn latencies() -> Vec<u64> {
    let n = LATENCY_COUNT.load(Ordering::Relaxed).min(LATENCY_CAPACITY) as usize;
    let mut out: Vec<u64> = SESSION
        .with(|s| {
            s.latencies.as_ref().map(|l| {
                l.atomics()[..n]
                    .iter()
                    .map(|a| a.load(Ordering::Relaxed))
                    .collect()
            })
        })
        .flatten()
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// Emits the copier's progress samples as `memsnap.progress` trace records
/// (time since the instant, cumulative pages by cause): the timeline.
pub fn emit_timeline() {
    let n = SAMPLE_COUNT.load(Ordering::Relaxed).min(SAMPLE_CAPACITY);
    let samples: Vec<[u64; 4]> = SESSION
        .with(|s| {
            (0..n)
                .map(|i| {
                    let w = &s.samples.atomics()[(i * SAMPLE_WORDS) as usize..];
                    [0, 1, 2, 3].map(|k| w[k].load(Ordering::Relaxed))
                })
                .collect()
        })
        .unwrap_or_default();
    for [t, eager, fault, background] in samples {
        crate::trace!(
            "memsnap.progress",
            t_us = t / 1000,
            eager = eager,
            fault = fault,
            background = background
        );
    }
    crate::trace::flush();
}

/// One line describing a report, for logs.
pub fn describe(r: &Report) -> String {
    alloc::format!(
        "{} pages: {} eager, {} on fault, {} in background ({} rewrites); pause {} us, total {} ms{}",
        r.pages,
        r.stats.eager,
        r.stats.fault,
        r.stats.background,
        r.stats.rewrites,
        r.pause_ns / 1000,
        r.total_ns / 1_000_000,
        match (r.mismatched, r.not_copied_once) {
            (Some(m), Some(n)) => alloc::format!("; verified: {m} mismatched pages, {n} not copied exactly once"),
            _ => String::new(),
        }
    ) + &match &r.disk {
        Some(d) => alloc::format!(
            "; core file {} MiB, disk writes {} MiB/s while busy, completed in {} ms",
            d.core_bytes >> 20,
            d.writer.mib_per_s(),
            d.complete_ns / 1_000_000
        ),
        None => String::new(),
    }
}

/// The baseline the live snapshot is measured against: a stop-and-copy
/// snapshot of the same range into the same kind of storage, with the world
/// stopped (interrupts off) for the whole copy. Returns `(pages, pause_ns)`.
pub fn stop_and_copy(opts: &Options) -> Result<(u64, u64), StartError> {
    transition(*PHASE.lock(), Request::Start).map_err(StartError::Busy)?;
    let reserved = reserve(&Options {
        disk: None,
        ..opts.clone()
    })?;
    let Storage::Ram(store) = &reserved.storage else {
        unreachable!("reserved without a disk")
    };
    let irq = IrqOff::new();
    let t0 = now_ns();
    for (slot, frame) in reserved.index.iter().enumerate() {
        store.save(frame, slot as u64);
    }
    let ns = now_ns() - t0;
    drop(irq);
    Ok((reserved.index.len(), ns))
}

/// The time of one 4 KiB page copy with the snapshot's copy routine
/// (median of `rounds`), the unit the fault latency is judged in. Like a
/// fault, each copy moves a different page into a different slot.
pub fn page_copy_ns(rounds: usize) -> CopyTime {
    page_copy_spread_ns(rounds, 1, 0)
}

/// Like [`page_copy_ns`], with the copies in `bursts` bursts `gap_ns`
/// apart, so the sample spans as long as a snapshot does and meets what
/// happens meanwhile (the host's own I/O, for one).
pub fn page_copy_spread_ns(rounds: usize, bursts: usize, gap_ns: u64) -> CopyTime {
    let Some(store) = RamStore::alloc(rounds as u64) else {
        return CopyTime::default();
    };
    let Some(source) = RamStore::alloc(rounds as u64) else {
        return CopyTime::default();
    };
    // Touch every page once first, so no copy pays the emulator's first touch.
    for slot in 0..rounds as u64 {
        let _irq = IrqOff::new();
        store.save(source.frame(slot), slot);
    }
    let per_burst = rounds.div_ceil(bursts.max(1));
    let mut times = Vec::with_capacity(rounds);
    for first in (0..rounds).step_by(per_burst) {
        let burst = first as u64..(first + per_burst).min(rounds) as u64;
        times.extend(copy_times(
            &store,
            burst.map(|slot| (source.frame((slot * 7) % rounds as u64), slot)),
        ));
        if gap_ns > 0 {
            thread::sleep_ns(gap_ns);
        }
    }
    CopyTime::of(times)
}
/// Like [`page_copy_ns`], but the way a write fault meets its pages: random
/// source frames across all of RAM's range and random storage slots, so
/// neither is likely in the host's caches. Reported beside the warm figure
/// to tell the copy's own spread from the handler's.
pub fn page_copy_cold_ns(rounds: usize) -> CopyTime {
    let opts = Options::default();
    let Ok(reserved) = reserve(&opts) else {
        return CopyTime::default();
    };
    let Storage::Ram(store) = &reserved.storage else {
        return CopyTime::default();
    };
    let frames: Vec<u64> = reserved.index.iter().collect();
    let slots = store.len();
    let mut rng = snapshot::support::rng::Rng::new(0x5eed);
    let pairs: Vec<(u64, u64)> = (0..rounds)
        .map(|_| {
            (
                frames[rng.below(frames.len() as u64) as usize],
                rng.below(slots),
            )
        })
        .collect();
    CopyTime::of(copy_times(store, pairs.into_iter()))
}

/// The time of each `store.save(frame, slot)` over `pairs`, ns.
fn copy_times(store: &RamStore, pairs: impl Iterator<Item = (u64, u64)>) -> Vec<u64> {
    pairs
        .map(|(frame, slot)| {
            let _irq = IrqOff::new();
            let t = crate::arch::cpu::rdtsc();
            store.save(frame, slot);
            crate::clock::cycles_to_ns(crate::arch::cpu::rdtsc() - t)
        })
        .collect()
}

/// The time one 4 KiB page copy takes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CopyTime {
    /// Median, ns.
    pub p50: u64,
    /// 99th percentile, ns: the copy's own spread.
    pub p99: u64,
}

impl CopyTime {
    fn of(mut times: Vec<u64>) -> Self {
        times.sort_unstable();
        let at = |p: usize| times.get(times.len() * p / 100).copied().unwrap_or(0);
        CopyTime {
            p50: at(50),
            p99: at(99),
        }
    }
}
