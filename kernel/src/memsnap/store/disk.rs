//! Snapshot storage on a virtio-blk disk, as an ELF core file.
//!
//! The copiers (the pause, the write-fault handler, the background copier)
//! never touch the disk: `DiskStore`'s [`save`](super::SnapshotStore::save)
//! copies a page into a RAM [`StagingArea`] buffer and returns. A writer
//! thread takes the staged pages with the lowest slots, sorts them and
//! writes them with several requests in flight; the driver gathers slots
//! that follow each other on disk into large requests. The background
//! copier leaves a quarter of staging to write faults
//! ([`super::SnapshotStore::background_room`]).
//! Slot `s` lives at `data_start + 4096 * s`, because the core's loads are
//! the range's runs in slot order ([`snapshot::memsnap::elfcore::snapshot_loads`]).
//!
//! When staging has no room, whoever can wait does (see
//! [`crate::memsnap::on_write_fault`]); copiers that cannot (interrupts off, the
//! writer itself) take the staging reserve. If even that is gone, or the
//! disk fails, the store is *failed*: later saves do nothing, and the
//! session ends in [`snapshot::memsnap::Phase::Failed`].
//!
//! Durability, in order: [`INCOMPLETE_MAGIC`] at offset 0 and a flush
//! before the instant; the pages; a flush; the ELF header region; a flush.
//! A file is never an ELF file until everything in it is on the disk.
//!
//! Must never block or allocate in `save`: the fault path calls it.

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use snapshot::devices::block::{self, BlockDevice, BlockError, Op, SECTOR_SIZE};
use snapshot::memsnap::elfcore::{self, Layout, Load, Registers, INCOMPLETE_MAGIC};
use snapshot::memsnap::Stats;

use crate::clock::now_ns;
use crate::memory::snapmem::{StagingArea, Taken};
use crate::memory::PAGE_SIZE;
use crate::sync::IrqMutex;
use crate::thread::{self, JoinHandle};

/// Most pages the writer takes in one batch (4 MiB).
const MAX_BATCH: usize = 1024;
/// Fewest staged pages worth a batch while copying goes on (256 KiB).
const MIN_BATCH: usize = 64;
/// Requests in flight.
const DEPTH: usize = 16;
/// How long the writer naps when there is too little to write.
const NAP_NS: u64 = 1_000_000;
/// The background copier leaves `1 / FAULT_HEADROOM_DIVISOR` of staging
/// to write faults.
const FAULT_HEADROOM_DIVISOR: usize = 4;
/// Bytes kept for the metadata note, so the header's length is known
/// before the snapshot starts.
pub const META_ROOM: usize = 3072;

/// The key threads block on while staging has no room; the writer wakes
/// it whenever it frees buffers (and when the store fails).
pub fn room_key() -> usize {
    &ROOM_KEY as *const u8 as usize
}
static ROOM_KEY: u8 = 0;

/// What the writer did.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterStats {
    /// Page bytes written.
    pub bytes: u64,
    /// Time with writes in flight, ns.
    pub busy_ns: u64,
    /// Batches (`transfer` calls) of pages.
    pub batches: u64,
    /// Most buffers in use at once.
    pub peak_in_use: u64,
}

impl WriterStats {
    /// Write throughput while writes were in flight, MiB/s.
    pub fn mib_per_s(&self) -> u64 {
        (u128::from(self.bytes) * 1_000_000_000 / u128::from(self.busy_ns.max(1))) as u64 >> 20
    }
}

/// The state the writer thread shares with the store.
pub struct Shared {
    disk: Arc<dyn BlockDevice>,
    staging: StagingArea,
    slots: u64,
    loads: Vec<Load>,
    layout: Layout,
    /// Why, when a thread failed it (see also [`FAILED`], [`REASON`]).
    error: IrqMutex<Option<String>>,
    stop: AtomicBool,
    draining: AtomicBool,
    bytes: AtomicU64,
    busy_ns: AtomicU64,
    batches: AtomicU64,
}

// What the fault path writes lives in statics (the kernel image, copied at
// the instant and never protected), never in the heap, which the snapshot
// protects: one disk store exists at a time.
/// The store failed: saves do nothing from then on.
static FAILED: AtomicBool = AtomicBool::new(false);
/// Why, when the fault path failed it (it cannot allocate a message).
static REASON: AtomicU8 = AtomicU8::new(NO_REASON);
/// Most staging buffers in use at once.
static PEAK: AtomicU64 = AtomicU64::new(0);

const NO_REASON: u8 = 0;
const STAGING_EXHAUSTED: u8 = 1;

impl core::fmt::Debug for Shared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared")
            .field("disk", &self.disk.info().name)
            .field("slots", &self.slots)
            .field("failed", &FAILED)
            .finish_non_exhaustive()
    }
}

/// Why a disk cannot hold a snapshot.
#[derive(Debug)]
pub enum DiskError {
    /// The core file would not fit.
    TooSmall {
        /// The disk's name.
        disk: String,
        /// Bytes the core file needs.
        needed: u64,
        /// Bytes the disk has.
        capacity: u64,
    },
    /// The disk is read-only.
    ReadOnly(String),
    /// The disk failed while being prepared.
    Io(BlockError),
    /// The core's loads cannot be laid out.
    Layout(elfcore::LayoutError),
}

impl core::fmt::Display for DiskError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DiskError::TooSmall {
                disk,
                needed,
                capacity,
            } => write!(
                f,
                "disk {disk:?} is too small for the snapshot: the core file needs {needed} bytes ({} MiB), the disk has {capacity} ({} MiB)",
                needed.div_ceil(1 << 20),
                capacity >> 20
            ),
            DiskError::ReadOnly(disk) => write!(f, "disk {disk:?} is read-only"),
            DiskError::Io(e) => write!(f, "{e}"),
            DiskError::Layout(e) => write!(f, "{e}"),
        }
    }
}

/// The core file's bytes for `runs` (the range in slot order): its loads
/// and layout (with a metadata note of [`META_ROOM`] bytes).
pub fn plan(runs: &[(u64, u64)]) -> Result<(Vec<Load>, Layout), elfcore::LayoutError> {
    let image = crate::memory::kernel_image();
    let loads = elfcore::snapshot_loads(runs, crate::memory::PHYS_OFFSET, image);
    let placeholder = pad_meta(String::new());
    let (_, layout) = elfcore::header(&loads, &Registers::default(), &placeholder)?;
    Ok((loads, layout))
}

/// Checks that `disk` can hold a core file of `total` bytes.
pub fn check_capacity(disk: &dyn BlockDevice, total: u64) -> Result<(), DiskError> {
    let info = disk.info();
    let capacity = info.sectors * SECTOR_SIZE as u64;
    if info.read_only {
        return Err(DiskError::ReadOnly(info.name.clone()));
    }
    if capacity < total {
        return Err(DiskError::TooSmall {
            disk: info.name.clone(),
            needed: total,
            capacity,
        });
    }
    Ok(())
}

fn pad_meta(mut meta: String) -> String {
    while meta.len() < META_ROOM {
        meta.push('\n');
    }
    meta
}

/// The snapshot store on a disk; see the module docs.
#[derive(Debug)]
pub struct DiskStore {
    shared: Arc<Shared>,
    writer: Option<JoinHandle<()>>,
}

impl DiskStore {
    /// Prepares `disk` for a snapshot of `slots` pages laid out as
    /// `loads`/`layout`, staged through `staging`: checks its room, marks
    /// it incomplete, flushes, and starts the writer. Call before the
    /// instant; nothing on the disk changes if the check fails.
    pub fn prepare(
        disk: Arc<dyn BlockDevice>,
        (loads, layout): (Vec<Load>, Layout),
        slots: u64,
        staging: StagingArea,
    ) -> Result<Self, DiskError> {
        check_capacity(&*disk, layout.total)?;
        let mut first = alloc::vec![0u8; PAGE_SIZE as usize];
        first[..INCOMPLETE_MAGIC.len()].copy_from_slice(&INCOMPLETE_MAGIC);
        disk.write(0, &first).map_err(DiskError::Io)?;
        disk.flush().map_err(DiskError::Io)?;
        let shared = Arc::new(Shared {
            disk,
            staging,
            slots,
            loads,
            layout,
            error: IrqMutex::new(None),
            stop: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            bytes: AtomicU64::new(0),
            busy_ns: AtomicU64::new(0),
            batches: AtomicU64::new(0),
        });
        FAILED.store(false, Ordering::Release);
        REASON.store(NO_REASON, Ordering::Relaxed);
        PEAK.store(0, Ordering::Relaxed);
        let for_writer = shared.clone();
        let writer = thread::spawn("memsnap-writer", move || writer(&for_writer));
        Ok(DiskStore {
            shared,
            writer: Some(writer),
        })
    }

    /// The state shared with the writer, for draining and verifying.
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }
}

impl Drop for DiskStore {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(writer) = self.writer.take() {
            writer.join();
        }
        // Nobody waits for room that will never come.
        thread::wake_all(room_key());
    }
}

impl super::SnapshotStore for DiskStore {
    fn save(&self, frame: u64, slot: u64) {
        let s = &self.shared;
        if FAILED.load(Ordering::Acquire) {
            return;
        }
        if !s.staging.stage(frame, slot) {
            REASON.store(STAGING_EXHAUSTED, Ordering::Relaxed);
            FAILED.store(true, Ordering::Release);
        }
        PEAK.fetch_max(s.staging.in_use() as u64, Ordering::Relaxed);
    }

    fn saved_frame(&self, _slot: u64) -> Option<u64> {
        None
    }

    fn fresh_hash(&self, slot: u64) -> u64 {
        self.shared.staging.staged_hash(slot).unwrap_or(0)
    }

    fn slot_hash(&self, _slot: u64) -> Option<u64> {
        None
    }

    fn slots(&self) -> u64 {
        self.shared.slots
    }

    fn room(&self) -> u64 {
        self.shared.staging.room() as u64
    }

    fn background_room(&self) -> u64 {
        let staging = &self.shared.staging;
        staging
            .room()
            .saturating_sub(staging.len() / FAULT_HEADROOM_DIVISOR) as u64
    }

    fn failed(&self) -> bool {
        FAILED.load(Ordering::Acquire)
    }
}

impl Shared {
    fn fail(&self, why: String) {
        {
            let mut error = self.error.lock();
            if error.is_none() {
                *error = Some(why);
            }
        }
        FAILED.store(true, Ordering::Release);
        thread::wake_all(room_key());
    }

    /// Why the store failed, if it did.
    pub fn error(&self) -> Option<String> {
        if !FAILED.load(Ordering::Acquire) {
            return None;
        }
        let written = self.error.lock().clone();
        Some(
            written.unwrap_or_else(|| match REASON.load(Ordering::Relaxed) {
                STAGING_EXHAUSTED => String::from(
                    "staging ran out: copiers that could not wait for the disk used up its reserve",
                ),
                _ => String::from("the snapshot store failed"),
            }),
        )
    }

    /// Staging pages.
    pub fn staging_pages(&self) -> u64 {
        self.staging.len() as u64
    }

    /// The disk sector where `slot`'s page goes.
    fn sector(&self, slot: u64) -> u64 {
        (self.layout.data_start + slot * PAGE_SIZE) / SECTOR_SIZE as u64
    }

    /// The core file's length.
    pub fn total(&self) -> u64 {
        self.layout.total
    }

    /// What the writer has done so far.
    pub fn stats(&self) -> WriterStats {
        WriterStats {
            bytes: self.bytes.load(Ordering::Relaxed),
            busy_ns: self.busy_ns.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            peak_in_use: PEAK.load(Ordering::Relaxed),
        }
    }

    /// Waits until every staged page is on the disk, flushes, then writes
    /// the header region (registers, metadata) and flushes again. After
    /// this returns `Ok` the disk holds a complete core file.
    pub fn complete(&self, regs: &Registers, meta: Meta<'_>) -> Result<(), String> {
        self.draining.store(true, Ordering::Release);
        thread::block_until(room_key(), || {
            FAILED.load(Ordering::Acquire) || self.staging.in_use() == 0
        });
        if let Some(e) = self.error() {
            return Err(e);
        }
        let io = |r: Result<(), BlockError>| r.map_err(|e| alloc::format!("{e}"));
        io(self.disk.flush())?;
        let meta = pad_meta(meta.render(self));
        if meta.len() > META_ROOM {
            return Err(alloc::format!(
                "snapshot metadata of {} bytes exceeds its {META_ROOM}-byte room",
                meta.len()
            ));
        }
        let (header, layout) =
            elfcore::header(&self.loads, regs, &meta).map_err(|e| alloc::format!("{e}"))?;
        assert_eq!(
            layout, self.layout,
            "the header changed size after the start"
        );
        io(block::write_bytes(&*self.disk, 0, &header))?;
        io(self.disk.flush())
    }

    /// Reads slots `first..first + hashes.len()` back from the disk and
    /// hashes each (verification, after [`Self::complete`]).
    pub fn read_hashes(&self, first: u64, hashes: &mut [u64]) -> Result<(), BlockError> {
        let mut buf = alloc::vec![0u8; hashes.len() * PAGE_SIZE as usize];
        self.disk.read(self.sector(first), &mut buf)?;
        let mut words = [0u64; 512];
        for (hash, page) in hashes.iter_mut().zip(buf.chunks(PAGE_SIZE as usize)) {
            for (w, b) in words.iter_mut().zip(page.as_chunks::<8>().0) {
                *w = u64::from_le_bytes(*b);
            }
            *hash = snapshot::memsnap::page_hash(&words);
        }
        Ok(())
    }
}

/// What the metadata note says besides the layout.
#[derive(Debug, Clone, Copy)]
pub struct Meta<'a> {
    /// The instant, ns since boot.
    pub instant_ns: u64,
    /// From the instant to the last copy, ns.
    pub total_ns: u64,
    /// Pages by cause.
    pub stats: Stats,
    /// The wall-clock time of the instant (RTC), if known.
    pub wall: Option<&'a str>,
}

impl Meta<'_> {
    fn render(&self, s: &Shared) -> String {
        let mut out = String::new();
        let st = self.stats;
        let _ = write!(
            out,
            "format=snapkern-core-1\nwall={}\ninstant_ns={}\ncopy_ns={}\npages={}\neager={}\nfault={}\nbackground={}\nrewrites={}\nloads={}\n",
            self.wall.unwrap_or("unknown"),
            self.instant_ns,
            self.total_ns,
            s.slots,
            st.eager,
            st.fault,
            st.background,
            st.rewrites,
            s.loads.len()
        );
        // The physical ranges, as far as the room allows (readelf lists all).
        let mut ranges = String::from("ranges=");
        for load in s.loads.iter().filter(|l| l.alias_of.is_none()) {
            let item = alloc::format!("{:#x}-{:#x},", load.paddr, load.paddr + load.len);
            if out.len() + ranges.len() + item.len() + 16 > META_ROOM {
                ranges.push_str("...");
                break;
            }
            ranges.push_str(&item);
        }
        out.push_str(ranges.trim_end_matches(','));
        out.push('\n');
        out
    }
}

/// The writer thread: drains staging to the disk until stopped.
fn writer(s: &Shared) {
    thread::forbid_fault_waits();
    let mut taken: Vec<Taken> = Vec::with_capacity(MAX_BATCH);
    let mut scratch: Vec<(usize, u64)> = Vec::with_capacity(s.staging.len());
    loop {
        if FAILED.load(Ordering::Acquire) {
            return;
        }
        let in_use = s.staging.in_use();
        let stopping = s.stop.load(Ordering::Acquire);
        if stopping && in_use == 0 {
            return;
        }
        let urgent = stopping || s.draining.load(Ordering::Acquire) || s.staging.room() == 0;
        if in_use < MIN_BATCH && !urgent {
            thread::sleep_ns(NAP_NS);
            continue;
        }
        taken.clear();
        s.staging.take(MAX_BATCH, &mut taken, &mut scratch);
        if taken.is_empty() {
            thread::sleep_ns(NAP_NS);
            continue;
        }
        let mut ops: Vec<Op<'_>> = taken
            .iter()
            .map(|t| Op::Write {
                sector: s.sector(t.slot),
                buf: s.staging.page(t),
            })
            .collect();
        let t0 = now_ns();
        let result = s.disk.transfer(&mut ops, DEPTH);
        s.busy_ns.fetch_add(now_ns() - t0, Ordering::Relaxed);
        drop(ops);
        let pages = taken.len() as u64;
        // Highest slot first: free buffers are a stack, so the next claims
        // (the copier's, in slot order) get these back in ascending order,
        // and consecutive slots stay back to back in memory, which lets
        // the driver give a run of them one descriptor.
        while let Some(t) = taken.pop() {
            s.staging.release(t);
        }
        match result {
            Ok(()) => {
                s.bytes.fetch_add(pages * PAGE_SIZE, Ordering::Relaxed);
                s.batches.fetch_add(1, Ordering::Relaxed);
                thread::wake_all(room_key());
            }
            Err(e) => {
                crate::log!("memsnap: disk write failed: {e}");
                s.fail(alloc::format!("{e}"));
                return;
            }
        }
    }
}
