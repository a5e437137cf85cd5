//! The background copier: a kernel thread that copies the range in address
//! order, first following the writes (the frames after the one a write
//! fault copied last), at a share of the CPU, in bursts of [`COPIER_BURST_NS`] paced by
//! the copy-once engine's [`Pacer`], and ends
//! the snapshot: complete (the disk's core file made durable, the copy
//! verified if asked) or failed (the store lost a copy).
//!
//! It takes from the store only the room the store gives the background
//! ([`super::store::SnapshotStore::background_room`]), waiting for the
//! disk writer otherwise, so the workload's faults keep theirs. It must
//! never copy with interrupts on (the copy paths rely on it).

use alloc::string::String;
use alloc::sync::Arc;
use core::sync::atomic::{AtomicBool, Ordering};

use snapshot::copyonce::{effective_share, Pacer};
use snapshot::memsnap::{transition, Request};

use super::report::DiskReport;
use super::session::{Session, LIVE, SESSION};
use super::store::disk::{self, Shared};
use super::{verify, ABORT, PHASE, REPORT};
use crate::clock::now_ns;
use crate::thread;

/// Pages copied per session visit (interrupts off meanwhile).
const COPIER_BATCH: u64 = 16;
/// Slots the copier copies after the frame a write fault copied last,
/// before it goes back to its sweep: 256 KiB.
const FOLLOW_REACH: u64 = 64;
/// One burst of copying, ns.
const COPIER_BURST_NS: u64 = 2_000_000;

/// Where the copier runs when there is more than one CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopierCpu {
    /// On the highest CPU, reserved: no other thread runs there until the
    /// copier ends, so the copy never waits behind the workload and the
    /// workload keeps the other CPUs (the default). The copier then takes
    /// all of that CPU unless a share was asked for.
    Own,
    /// Pinned to the highest CPU, not reserved: other threads use it while
    /// the copier sleeps between bursts (`copier_cpu=shared` on the
    /// command line), so the workload keeps every CPU.
    Shared,
}

/// Test hook: while set, the copier waits before each burst (see
/// [`super::park_copier`]).
static PARKED: AtomicBool = AtomicBool::new(false);

/// See [`PARKED`].
pub(super) fn park(parked: bool) {
    PARKED.store(parked, Ordering::Release);
}

/// Set by the copier once it is on its CPU (see [`wait_placed`]).
static PLACED: AtomicBool = AtomicBool::new(false);

/// Before spawning a copier: it is not placed yet.
pub(super) fn unplace() {
    PLACED.store(false, Ordering::Release);
}

/// Waits until the copier spawned last is on its CPU: from then until it
/// ends, a reserved CPU runs nothing else.
pub(super) fn wait_placed() {
    while !PLACED.load(Ordering::Acquire) {
        thread::yield_now();
    }
}

/// The boot's choice for [`CopierCpu::boot_default`]: shared if true.
static SHARED_BY_DEFAULT: AtomicBool = AtomicBool::new(false);

impl CopierCpu {
    /// What [`super::Options::default`] takes: [`CopierCpu::Own`] unless
    /// [`CopierCpu::set_boot_default`] said otherwise.
    pub fn boot_default() -> Self {
        if SHARED_BY_DEFAULT.load(Ordering::Relaxed) {
            CopierCpu::Shared
        } else {
            CopierCpu::Own
        }
    }

    /// Sets the default for the snapshots to come (from `copier_cpu=`).
    pub fn set_boot_default(cpu: CopierCpu) {
        SHARED_BY_DEFAULT.store(cpu == CopierCpu::Shared, Ordering::Relaxed);
    }
}

/// The copier thread, at `share_pct` percent of the CPU (see
/// [`effective_share`]), placed as `cpu` says. A reservation ends with the
/// thread.
pub(super) fn copier(share_pct: Option<u64>, cpu: CopierCpu, disk: Option<Arc<Shared>>) {
    // Not while the session holds the other CPUs idle: then the copier
    // runs on the boot CPU with everyone else (see `memsnap_cpus=boot`).
    let own_cpu = crate::thread::take_own_cpu(cpu == CopierCpu::Own);
    let share_pct = effective_share(share_pct, own_cpu.is_some() && cpu == CopierCpu::Own);
    if let Some(r) = REPORT.lock().as_mut() {
        r.copier_share_pct = share_pct;
    }
    crate::trace!(
        "memsnap.copier_cpu",
        cpu = own_cpu.map_or(0, |c| c as u64),
        share = share_pct
    );
    PLACED.store(true, Ordering::Release);
    // Alone on a reserved CPU, nothing needs the tick while copying.
    let tickless = own_cpu.is_some() && cpu == CopierCpu::Own;
    let mut pacer = Pacer::new(share_pct, COPIER_BURST_NS);
    let (mut busy_ns, mut follow) = (0, None);
    loop {
        if ABORT.load(Ordering::Acquire) {
            return;
        }
        if SESSION.with(|s| s.store.failed()).unwrap_or(false) {
            fail(disk.as_ref());
            return;
        }
        if PARKED.load(Ordering::Acquire) {
            thread::sleep_ns(1_000_000);
            continue;
        }
        let (started, mut pages) = (now_ns(), 0);
        let done = burst(&mut pacer, &mut follow, &mut busy_ns, &mut pages, tickless);
        SESSION.with(Session::sample);
        crate::trace!("memsnap.burst", ns = now_ns() - started, pages = pages);
        if done && SESSION.with(|s| s.snap.is_complete()).unwrap_or(false) {
            finish(busy_ns, disk.as_ref());
            return;
        }
        let rest_ns = pacer.end_burst();
        if rest_ns > 0 {
            thread::sleep_ns(rest_ns);
        }
    }
}

/// One burst, adding the pages it copied to `pages`; true once a pass
/// found nothing left to copy. With `tickless` (the copier alone on a CPU
/// it reserved) that CPU's tick stops while it copies: nothing else may
/// run there, and under the emulator every tick stalls both vCPUs (see
/// [`crate::arch::apic::pause_tick`]). The tick runs whenever the copier
/// waits.
fn burst(
    pacer: &mut Pacer,
    follow: &mut Option<Follow>,
    busy_ns: &mut u64,
    pages: &mut u64,
    tickless: bool,
) -> bool {
    let mut tick = tickless.then(crate::arch::apic::pause_tick);
    pacer.start_burst(now_ns());
    while pacer.keep_working(now_ns()) {
        let t = now_ns();
        // At most what the store takes without its reserve and the faults'
        // headroom; `None` when it takes nothing now (a disk's staging is
        // as full as the copier may make it).
        let copied = SESSION
            .with(|s| match s.store.background_room().min(COPIER_BATCH) {
                0 if !s.store.failed() => None,
                room => {
                    // Interrupts are off: this CPU stays the batch's.
                    let cpu = crate::arch::percpu::index() as u64 + 1;
                    LIVE.batch_cpu.store(cpu, Ordering::Relaxed);
                    let copied = copy_batch(s, follow, room.max(1));
                    LIVE.batch_cpu.store(0, Ordering::Relaxed);
                    Some(copied)
                }
            })
            .unwrap_or(Some(0));
        *busy_ns += now_ns() - t;
        match copied {
            Some(0) => return true,
            Some(n) => *pages += n,
            None => {
                drop(tick.take());
                LIVE.copier_waits.fetch_add(1, Ordering::Relaxed);
                thread::block_until(disk::room_key(), || {
                    SESSION
                        .with(|s| s.store.background_room() > 0 || s.store.failed())
                        .unwrap_or(true)
                });
                tick = tickless.then(crate::arch::apic::pause_tick);
            }
        }
    }
    false
}

/// Where the copier follows the writes: the next slot, and the reach left.
type Follow = (u64, u64);

/// One batch of up to `room` copies: first the slots after the frame a
/// write fault copied last (a workload that wrote one page is likely to
/// write the next ones: copying them now spares it those faults, as
/// post-copy migration pre-pages around a fault), then the sweep in
/// address order. Returns the pages copied; 0 once none is left.
fn copy_batch(s: &Session, follow: &mut Option<Follow>, room: u64) -> u64 {
    if let Some(frame) = LIVE.last_fault.swap(0, Ordering::Relaxed).checked_sub(1) {
        if let Some(slot) = s.snap.index().slot(frame) {
            *follow = Some((slot + 1, FOLLOW_REACH));
        }
    }
    let mut copied = 0;
    if let Some((slot, reach)) = follow.take() {
        let (n, next) = s.snap.copy_ahead(s, slot, reach, room);
        // Short of `room` only once it looked at its whole reach.
        let left = reach - (next - slot);
        *follow = (n == room && left > 0).then_some((next, left));
        copied = n;
    }
    if copied < room {
        copied += s.snap.copy_background(s, room - copied);
    }
    copied
}

/// Ends a snapshot whose store failed: the phase becomes `Failed` and the
/// report says why. Protection stays until [`super::abort`]; writes still
/// get through (the fault path copies nothing into a failed store).
fn fail(disk: Option<&Arc<Shared>>) {
    let why = disk
        .and_then(|d| d.error())
        .unwrap_or_else(|| String::from("the snapshot store failed"));
    crate::log!("memsnap: snapshot failed: {why}");
    crate::trace!("memsnap.failed");
    if let Some(r) = REPORT.lock().as_mut() {
        r.stats = LIVE.stats();
        r.error = Some(why);
    }
    let mut phase = PHASE.lock();
    *phase = transition(*phase, Request::Fail).unwrap_or(*phase);
    drop(phase);
    thread::wake_all(&PHASE as *const _ as usize);
}

/// Makes a disk snapshot durable: drains staging, flushes, writes the
/// core file's header. Returns the time it took.
fn complete_on_disk(d: &Shared, total_ns: u64) -> Result<u64, String> {
    let t = now_ns();
    let wall = crate::arch::rtc::wall_clock();
    let meta = disk::Meta {
        instant_ns: LIVE.instant_ns.load(Ordering::Relaxed),
        total_ns,
        stats: LIVE.stats(),
        wall: wall.as_deref(),
    };
    let regs = SESSION.with(|s| s.registers).unwrap_or_default();
    d.complete(&regs, meta)?;
    Ok(now_ns() - t)
}

/// Ends a snapshot whose every page is copied: completes the disk's file,
/// verifies, fills in the report, and moves the phase to `Complete`.
fn finish(copier_busy_ns: u64, disk: Option<&Arc<Shared>>) {
    let end = now_ns();
    let total_ns = end - LIVE.instant_ns.load(Ordering::Relaxed);
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
    let mismatched = verify::count_mismatches(disk);
    let copies = verify::copy_counts();
    let mut report = REPORT.lock();
    if let Some(r) = report.as_mut() {
        r.stats = LIVE.stats();
        r.total_ns = end - r.instant_ns;
        r.copier_busy_ns = copier_busy_ns;
        r.copier_copy_ns = copier_copy_ns(r.stats.background);
        r.mismatched = mismatched;
        r.not_copied_once = copies.map(|c| c.not_once());
        r.copies = copies;
        r.disk = disk_report;
        r.fault_waits = LIVE.fault_waits.load(Ordering::Relaxed);
        r.copier_waits = LIVE.copier_waits.load(Ordering::Relaxed);
    }
    drop(report);
    {
        let mut phase = PHASE.lock();
        *phase = transition(*phase, Request::Finish).unwrap_or(*phase);
    }
    thread::wake_all(&PHASE as *const _ as usize);
}

/// The copier's time in its `pages` page copies, estimated from the timed
/// sample of them (see `splits::COPIER_SAMPLE`).
fn copier_copy_ns(pages: u64) -> u64 {
    let timed = LIVE.copier_timed_pages.load(Ordering::Relaxed);
    let ns = crate::clock::cycles_to_ns(LIVE.copier_copy_cycles.load(Ordering::Relaxed));
    if timed == 0 {
        return 0;
    }
    (u128::from(ns) * u128::from(pages) / u128::from(timed)) as u64
}
