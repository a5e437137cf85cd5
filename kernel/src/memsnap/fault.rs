//! The paths that copy a range frame before someone writes it: the
//! write-fault handler, the frame allocator's hook (a frame handed out may
//! be mapped where the shadow cannot protect it) and DMA registration (a
//! device writes behind the MMU's back).
//!
//! The fault path never allocates, takes a lock, or waits inside the
//! handler (but for a test hook, [`hold_if_asked`], which holds one fault
//! only when a test armed it): it reaches the session through [`SESSION`],
//! copies through the engine window and counts in [`LIVE`]. When a disk
//! store's staging is full, a thread that faulted with interrupts on is
//! blocked like any waiting thread ([`thread::block_faulting`]) and
//! retries its write when the disk writer has made room.

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::memsnap::FaultOutcome;

use super::session::{LIVE, SESSION};
use super::store::disk;
use crate::memory::{paging, PAGE_SIZE, PHYS_OFFSET};
use crate::sync::IrqMutex;
use crate::thread;

/// Registered DMA targets. A static because registrations outlive
/// snapshots: a range registered before a snapshot is copied at its instant.
static DMA: IrqMutex<Vec<Range<u64>>> = IrqMutex::new(Vec::new());

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
        LIVE.protecting.load(Ordering::Acquire)
    };
    if protecting {
        for frame in range.start / PAGE_SIZE..range.end.div_ceil(PAGE_SIZE) {
            // Only frames not yet copied matter: the device's writes bypass
            // the protection anyway. Waits for the disk writer if staging
            // is full, like a fault.
            thread::block_until(disk::room_key(), || {
                SESSION
                    .with(|s| {
                        // See `on_write_fault`: none after a teardown.
                        if !LIVE.protecting.load(Ordering::SeqCst) || s.is_copied(frame) {
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

/// Runs `f` on the registered DMA targets with registration held off (the
/// pause: no registration slips past it).
pub(super) fn with_dma_targets<R>(f: impl FnOnce(&[Range<u64>]) -> R) -> R {
    f(&DMA.lock())
}

/// The virtual window whose writes the snapshot protects, while it does.
pub fn window() -> Option<(u64, u64)> {
    LIVE.protecting
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
/// `may_wait` says the faulting thread could be blocked; `entry` is the
/// TSC at the exception handler's entry (for [`super::splits`]).
pub fn on_write_fault(offset: u64, may_wait: bool, entry: u64) -> WriteFault {
    let mut start = crate::arch::cpu::rdtsc();
    let at_entry = super::splits::at_entry();
    let frame = offset / PAGE_SIZE;
    let outcome = SESSION.with(|s| {
        // A fault that read the window before a teardown lifted the
        // protection copies nothing now: the teardown's grace period
        // (`Published::quiesce`) either sees this reader or this load sees
        // the protection off (both SeqCst), so no copy starts after the
        // teardown's check. The page is writable again; the handler
        // retries the write.
        if !LIVE.protecting.load(Ordering::SeqCst) {
            return Some(FaultOutcome::NotInRange);
        }
        if may_wait && s.must_wait(frame) {
            return None;
        }
        // A retry after waiting for room: the latency runs from the first
        // fault, so the wait counts.
        let waited = s.latencies.is_some() && LIVE.waiting.load(Ordering::Relaxed) != 0;
        let mut retried = false;
        if let Some(slot) = waited.then(thread::current_slot).flatten() {
            let bit = 1u64 << (slot % 64);
            if LIVE.waiting.fetch_and(!bit, Ordering::Relaxed) & bit != 0 {
                start = LIVE.wait_start[slot % 64].load(Ordering::Relaxed);
                retried = true;
            }
        }
        let outcome = s.snap.on_write_fault(s, frame);
        if outcome == FaultOutcome::Copied {
            LIVE.last_fault.store(frame + 1, Ordering::Relaxed);
        }
        if s.latencies.is_some() && (outcome == FaultOutcome::Copied || retried) {
            let end = crate::arch::cpu::rdtsc();
            s.note_latency(crate::clock::cycles_to_ns(end - start));
            if !retried {
                let cpu = crate::arch::percpu::index();
                super::splits::fault_copied(cpu, at_entry, entry, start, end);
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
    LIVE.fault_waits.fetch_add(1, Ordering::Relaxed);
    LIVE.wait_start[slot % 64].store(since, Ordering::Relaxed);
    LIVE.waiting.fetch_or(1 << (slot % 64), Ordering::Relaxed);
}

/// Called by the frame allocator for each frame it hands out: a frame of an
/// active snapshot is copied before its new owner writes it, because the
/// owner may map it where the shadow cannot protect it.
pub fn before_reuse(phys: u64) {
    if LIVE.protecting.load(Ordering::Acquire) {
        SESSION.with(|s| {
            // See `on_write_fault`: no copy starts after a teardown.
            if LIVE.protecting.load(Ordering::SeqCst) {
                s.snap.on_write_fault(s, phys / PAGE_SIZE);
            }
        });
    }
}

/// Test hook: the next page fault at virtual page [`HELD_PAGE`] waits in
/// the handler, before it is classified, until [`release_held_fault`]
/// (at most [`HOLD_MAX_NS`]): the window a busy host opens at random
/// between a fault and its handling, held open so a test can run a
/// snapshot's teardown inside it. 0: off.
static HELD_PAGE: AtomicU64 = AtomicU64::new(0);
/// A fault waits in [`hold_if_asked`].
static HOLDING: AtomicBool = AtomicBool::new(false);
/// See [`release_held_fault`].
static RELEASED: AtomicBool = AtomicBool::new(false);
/// Longest hold, ns.
const HOLD_MAX_NS: u64 = 5_000_000_000;

/// Test hook: holds the next page fault at virtual address `virt`'s page
/// (see [`HELD_PAGE`]).
pub fn hold_next_fault_at(virt: u64) {
    RELEASED.store(false, Ordering::Relaxed);
    HOLDING.store(false, Ordering::Relaxed);
    HELD_PAGE.store(virt & !(PAGE_SIZE - 1), Ordering::Release);
}

/// Whether the fault [`hold_next_fault_at`] asked for is being held now.
pub fn fault_held() -> bool {
    HOLDING.load(Ordering::Acquire)
}

/// Lets the held fault go on to its handling.
pub fn release_held_fault() {
    RELEASED.store(true, Ordering::Release);
}

/// For the page-fault handler, first thing (interrupts off): holds this
/// fault if a test asked for it (see [`HELD_PAGE`]); one atomic load
/// otherwise.
pub fn hold_if_asked(addr: u64) {
    let page = HELD_PAGE.load(Ordering::Acquire);
    if page == 0 || addr & !(PAGE_SIZE - 1) != page {
        return;
    }
    // One fault is held, whichever CPU disarms the hook first.
    if HELD_PAGE
        .compare_exchange(page, 0, Ordering::AcqRel, Ordering::Relaxed)
        .is_err()
    {
        return;
    }
    HOLDING.store(true, Ordering::Release);
    let until = crate::clock::now_ns() + HOLD_MAX_NS;
    while !RELEASED.load(Ordering::Acquire) && crate::clock::now_ns() < until {
        core::hint::spin_loop();
    }
    HOLDING.store(false, Ordering::Release);
}
