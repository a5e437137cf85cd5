//! Live memory snapshots, page by page.
//!
//! [`start`] prepares everything while the workload runs (storage, the copy
//! map, the shadow physical map; see [`reserve`] and [`shadow`]), then
//! pauses with interrupts off only to copy the eager set and swap in the
//! shadow: the *instant* ([`pause`]). Afterwards each range frame is copied
//! once, by the first of:
//! - the write-fault handler ([`on_write_fault`]), on the first write;
//! - the frame allocator ([`before_reuse`]), before a free frame is handed
//!   out and possibly mapped where the shadow cannot protect it;
//! - the background copier thread ([`copier`]), at a share of the CPU.
//!
//! When every slot of the copy map is copied the snapshot is complete; the
//! copy stays in storage for [`restore`] until [`release`]. [`abort`] undoes
//! a snapshot at any point. The range is all RAM except the engine's own
//! reservation (storage, shadow tables, verification buffers).
//!
//! Storage is a separate part of RAM ([`store::ram`]) or a disk, where the
//! snapshot becomes an ELF core file ([`store::disk`], chosen with
//! [`Options::disk`]). One snapshot is one [`session::Session`], which the
//! copy paths reach through one published pointer; this module holds the
//! public API and the lifecycle. The copy paths never allocate or lock
//! (see [`fault`]); verification ([`verify`]) and reporting ([`report`])
//! stay off them.

mod copier;
mod fault;
mod pause;
mod reference;
mod report;
mod reserve;
mod session;
#[allow(unsafe_code)]
mod shadow;
pub mod splits;
pub mod store;
mod verify;

use alloc::string::String;
use core::sync::atomic::{AtomicBool, Ordering};

use snapshot::devices::block::BlockError;
use snapshot::memsnap::{transition, LifecycleError, Phase, Request};

pub use copier::CopierCpu;
pub use fault::{
    before_reuse, fault_held, hold_if_asked, hold_next_fault_at, note_fault_wait, on_write_fault,
    register_dma, release_held_fault, unregister_dma, window, WriteFault,
};
pub use report::{describe, emit_timeline, latencies, DiskReport, Report};
pub use reserve::reserve_ram_copy;
use session::{LIVE, SESSION};
use store::disk;

use crate::arch::ipi::Shootdown;
use crate::memory::{PAGE_SIZE, PHYS_OFFSET};
use crate::sync::IrqMutex;
use crate::thread::{self, JoinHandle};

/// How to take a snapshot.
#[derive(Debug, Clone)]
pub struct Options {
    /// Percent of the CPU the background copier may use (1..=100). `None`:
    /// all of it when the copier has a CPU of its own (a share below 100
    /// would only leave that CPU idle, since nothing else may run there),
    /// else [`snapshot::copyonce::SHARED_CPU_SHARE_PCT`].
    pub copier_share_pct: Option<u64>,
    /// Whether the copier reserves a CPU of its own (with more than one).
    pub copier_cpu: CopierCpu,
    /// Keep the copy map outside the snapshotted memory (default: inside,
    /// where it is part of the eager set).
    pub map_outside: bool,
    /// Take an independent reference at the instant (a hash of every range
    /// page, stop-the-world) and count copies per page, to verify the
    /// result. Not part of the method: its time is reported apart.
    pub verify: bool,
    /// Record every write fault's handler time.
    pub latencies: bool,
    /// Only snapshot RAM below this physical address: the benchmark's
    /// same-run baseline for how the pause scales with the range. Eager
    /// frames above it (page tables, stacks, heap placed high) are left
    /// out with the rest of that RAM, so the pause copies only the eager
    /// frames below it, not the whole eager set of a full snapshot.
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
            copier_share_pct: None,
            copier_cpu: CopierCpu::boot_default(),
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

// The lifecycle. These are written while the shadow is live (after the
// pause, by the copier), so like the copy paths' state they live in
// statics, which the snapshot never protects, and not in the session.
/// Where the snapshot is in its life; threads wait on its address.
static PHASE: IrqMutex<Phase> = IrqMutex::new(Phase::Idle);
/// A start is in progress (a second one is refused).
static STARTING: AtomicBool = AtomicBool::new(false);
/// The copier must stop.
static ABORT: AtomicBool = AtomicBool::new(false);
/// The copier thread.
static COPIER: IrqMutex<Option<JoinHandle<()>>> = IrqMutex::new(None);
/// The last snapshot's figures.
static REPORT: IrqMutex<Option<Report>> = IrqMutex::new(None);
/// The other CPUs, held idle while a session lives, if asked (see
/// [`run_on_all_cpus`]).
static HELD: IrqMutex<Option<thread::OthersHeld>> = IrqMutex::new(None);
/// Sessions let threads run on every CPU (see [`run_on_all_cpus`]).
static ON_ALL_CPUS: AtomicBool = AtomicBool::new(true);

/// Whether the next sessions let threads run on every CPU (`true`, the
/// default) or hold all but the boot CPU idle (`false`; `memsnap_cpus=boot`
/// on the command line), for comparison. Either way the pause stops every
/// CPU. On all CPUs the copy paths race each other for real: the copy-once
/// engine claims each frame for one copier, and a CPU that meets a copy in
/// progress spins until it is done, then retries its write.
pub fn run_on_all_cpus(on: bool) {
    ON_ALL_CPUS.store(on, Ordering::Release);
}

/// Test hook: whoever copies a frame of physical `range` holds its claim
/// for `ns` first, so that a test can write the frame from another CPU
/// meanwhile. `0..0` turns it off.
pub fn slow_copies(range: core::ops::Range<u64>, ns: u64) {
    session::SLOW_NS.store(ns, Ordering::Relaxed);
    session::SLOW_FIRST.store(range.start / PAGE_SIZE, Ordering::Relaxed);
    session::SLOW_END.store(range.end.div_ceil(PAGE_SIZE), Ordering::Relaxed);
}

/// Test hook: while `parked`, the background copier copies nothing (it
/// checks before each burst), so a test finds the pages it needs not yet
/// copied wherever the heap put them. Unpark before waiting for the end.
pub fn park_copier(parked: bool) {
    copier::park(parked);
}

/// Whether the frame at physical `phys` needs no copy any more (copied, or
/// outside the range); `true` without a snapshot.
pub fn is_copied(phys: u64) -> bool {
    SESSION
        .with(|s| s.is_copied(phys / PAGE_SIZE))
        .unwrap_or(true)
}

/// Whether the frame at physical `phys` is being copied right now (its
/// claim is held): what a test waits for before it writes the frame.
pub fn is_being_copied(phys: u64) -> bool {
    SESSION
        .with(|s| {
            s.snap
                .index()
                .slot(phys / PAGE_SIZE)
                .is_some_and(|slot| s.snap.is_copying(slot))
        })
        .unwrap_or(false)
}

/// Refuses a start while a snapshot is active, complete or failed.
fn check_idle() -> Result<(), StartError> {
    transition(*PHASE.lock(), Request::Start)
        .map(|_| ())
        .map_err(StartError::Busy)
}

/// Takes a live snapshot: returns once the instant has passed and the copier
/// runs on its CPU ([`Options::copier_cpu`]). See [`wait`], [`abort`], [`release`], [`restore`].
pub fn start(opts: &Options) -> Result<Report, StartError> {
    if STARTING.swap(true, Ordering::AcqRel) {
        return Err(StartError::Busy(LifecycleError {
            phase: Phase::Active,
            request: Request::Start,
        }));
    }
    // If asked (for comparison), the session runs on the boot CPU alone,
    // the others idle, from here until it ends.
    let held = (!ON_ALL_CPUS.load(Ordering::Acquire)).then(thread::hold_others);
    let result = check_idle().and_then(|()| {
        ABORT.store(false, Ordering::Relaxed);
        pause::prepare_and_pause(opts)
    });
    STARTING.store(false, Ordering::Release);
    let (times, disk) = result?;
    *HELD.lock() = held;
    // The world runs again.
    *PHASE.lock() = Phase::Active;
    let stats = LIVE.stats();
    let pages = SESSION.with(|s| s.snap.index().len()).unwrap_or(0);
    let report = Report {
        pages,
        stats,
        pause_ns: times.pause_ns,
        protect_ns: times.protect_ns,
        reference_ns: times.reference_ns,
        pause_faults: times.faults,
        instant_ns: LIVE.instant_ns.load(Ordering::Relaxed),
        ..Report::default()
    };
    *REPORT.lock() = Some(report.clone());
    crate::trace!(
        "memsnap.start",
        pages = pages,
        eager = stats.eager,
        pause_ns = times.pause_ns,
        reference_ns = times.reference_ns,
        instant_ns = report.instant_ns
    );
    let (share, cpu) = (opts.copier_share_pct, opts.copier_cpu);
    copier::unplace();
    *COPIER.lock() = Some(thread::spawn("memsnap-copier", move || {
        copier::copier(share, cpu, disk);
    }));
    copier::wait_placed();
    // With the share the copier took.
    Ok(REPORT.lock().clone().unwrap_or(report))
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
    teardown(true);
    Ok(())
}

/// Drops a completed snapshot and frees its storage.
pub fn release() -> Result<(), LifecycleError> {
    transition(*PHASE.lock(), Request::Release)?;
    teardown(false);
    Ok(())
}

/// Odd while a teardown runs: a fault handler that saw it change (or odd)
/// around its walk of the page tables may have read a shadow table being
/// freed, and retries rather than trust the walk ([`teardown_seq`]).
static TEARDOWN_SEQ: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// [`TEARDOWN_SEQ`], for the page-fault handler: read before and after its
/// walk of the live tables, when it would otherwise stop the machine.
pub fn teardown_seq() -> u64 {
    TEARDOWN_SEQ.load(Ordering::SeqCst)
}

/// Stops the copier, lifts the protection and frees the session; an
/// abort first checks the copies made so far (when verifying) into the
/// report.
fn teardown(check: bool) {
    TEARDOWN_SEQ.fetch_add(1, Ordering::SeqCst);
    ABORT.store(true, Ordering::Release);
    let copier = COPIER.lock().take();
    if let Some(copier) = copier {
        copier.join();
    }
    // Protection off first (writes go through the original map again), then
    // the fault path stops claiming writes, then the session is freed: its
    // heap memory is writable again by then.
    SESSION.with(|s| s.shadow.deactivate());
    // No CPU may keep a read-only entry of the shadow (it would fault with
    // no session to explain it) nor walk its tables once they are freed.
    Shootdown::new().flush_everywhere();
    LIVE.protecting.store(false, Ordering::SeqCst);
    // A write fault (or DMA registration) that claimed a frame before the
    // protection went off may still be copying it, from the memory that
    // writes reach again: the check below must see its copy finished, and
    // no new one starts (see `fault::on_write_fault`).
    SESSION.quiesce();
    if check {
        let partial = verify::check_partial();
        if let Some(r) = REPORT.lock().as_mut() {
            r.partial = partial;
        }
    }
    drop(SESSION.take());
    if let Some(r) = REPORT.lock().as_mut() {
        // How far an aborted snapshot got, every copy finished.
        r.stats = LIVE.stats();
    }
    TEARDOWN_SEQ.fetch_add(1, Ordering::SeqCst);
    let held = HELD.lock().take();
    drop(held);
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
    if SESSION.with(|s| s.store.saved_frame(0).is_none()) == Some(true) {
        return Err(RestoreError::OnDisk);
    }
    let first = (virt - PHYS_OFFSET) / PAGE_SIZE;
    let end = (virt - PHYS_OFFSET + len).div_ceil(PAGE_SIZE);
    let mut restored = 0;
    for frame in first..end {
        let copied = SESSION.with(|s| {
            let saved = s
                .snap
                .index()
                .slot(frame)
                .and_then(|slot| s.store.saved_frame(slot));
            saved.is_some_and(|saved| s.shadow.roll_back(frame, saved))
        });
        restored += u64::from(copied == Some(true));
    }
    // Clearing a dirty bit removes nothing from the entry, but a CPU that
    // wrote the page before keeps a cached entry marked dirty and writes
    // through it without marking the entry again: the next restore would
    // miss those writes. Once per restore, not per page.
    Shootdown::new().flush_everywhere();
    crate::trace!("memsnap.restore", pages = end - first, restored = restored);
    Ok(restored)
}
