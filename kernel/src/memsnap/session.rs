//! One snapshot as one object: the [`Session`] owns the range and its copy
//! map, the store, the shadow map, the verification and measurement
//! buffers. The copy paths (the pause, the write-fault handler, the frame
//! allocator's hook, the copier) reach it through one published pointer,
//! [`SESSION`], with interrupts off.
//!
//! The session itself is in the heap, which the shadow makes read-only
//! through the physical map: nothing may write it after the pause. What the
//! copy paths write lives in memory they can write without faulting: the
//! session's buffers (engine memory, written through the engine window) and
//! [`LIVE`], a static. Must never allocate, lock or wait on the copy paths.

use alloc::boxed::Box;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::memsnap::elfcore::Registers;
use snapshot::memsnap::reserve::{LATENCY_CAPACITY, SAMPLE_CAPACITY, SAMPLE_WORDS};
use snapshot::memsnap::{Counters, PageIo, Snapshot, Stats};

use super::reference::Verification;
use super::shadow::ShadowPhysmap;
use super::store::SnapshotStore;
use crate::clock::now_ns;
use crate::memory::snapmem::Buffer;
use crate::sync::Published;

/// The snapshot in progress (or complete, until released).
pub(super) static SESSION: Published<Session> = Published::new();

/// What the copy paths write while the shadow is live, in one static: the
/// kernel image holds it, and the snapshot never protects the image (it is
/// written through its own identity mapping, and copied at the instant), so
/// the fault handler and the pause write it without faulting or locking.
/// Reset by [`Live::reset`] before each pause.
pub(super) struct Live {
    /// The copy-once engine's counters (the [`Snapshot`]'s).
    pub counters: Counters,
    /// The shadow is live: writes through the physical map may be ours.
    pub protecting: AtomicBool,
    /// When protection went on (ns since boot): the snapshot instant.
    pub instant_ns: AtomicU64,
    /// Fault latencies recorded (some may not fit the buffer).
    pub latency_count: AtomicU64,
    /// Progress samples recorded.
    pub sample_count: AtomicU64,
    /// Times a faulting thread was blocked for room in the store.
    pub fault_waits: AtomicU64,
    /// Times the copier waited for room.
    pub copier_waits: AtomicU64,
    /// Threads (one bit per thread slot) parked by a write fault, and when each
    /// first faulted (TSC): for the fault latencies.
    pub waiting: AtomicU64,
    /// See `waiting`.
    pub wait_start: [AtomicU64; 64],
    /// The CPU (index + 1) running a background batch, 0 between batches:
    /// copies made there are the copier's (interrupts are off for the
    /// batch, so nothing else copies on that CPU meanwhile).
    pub batch_cpu: AtomicU64,
    /// TSC cycles the copier spent in the store's copy of a page: the
    /// rest of its busy time is per-page overhead (claim, frame lookup,
    /// unprotect, counting) and per-batch overhead. Only the copies in
    /// the splits' sample are timed: see `copier_timed_pages`.
    pub copier_copy_cycles: AtomicU64,
    /// The copier's page copies timed into `copier_copy_cycles`.
    pub copier_timed_pages: AtomicU64,
    /// The frame (plus one; 0 for none) a write fault copied last, for the
    /// copier to copy the frames after it before they are written too.
    pub last_fault: AtomicU64,
}

/// See [`Live`].
pub(super) static LIVE: Live = Live {
    counters: Counters::new(),
    protecting: AtomicBool::new(false),
    instant_ns: AtomicU64::new(0),
    latency_count: AtomicU64::new(0),
    sample_count: AtomicU64::new(0),
    fault_waits: AtomicU64::new(0),
    copier_waits: AtomicU64::new(0),
    waiting: AtomicU64::new(0),
    wait_start: [const { AtomicU64::new(0) }; 64],
    batch_cpu: AtomicU64::new(0),
    copier_copy_cycles: AtomicU64::new(0),
    copier_timed_pages: AtomicU64::new(0),
    last_fault: AtomicU64::new(0),
};

impl Live {
    /// Pages copied so far, by cause.
    pub fn stats(&self) -> Stats {
        self.counters.read().into()
    }

    /// Clears the per-snapshot figures (the counters are reset with the
    /// [`Snapshot`]).
    pub fn reset(&self) {
        for c in [
            &self.latency_count,
            &self.sample_count,
            &self.fault_waits,
            &self.copier_waits,
            &self.waiting,
            &self.batch_cpu,
            &self.copier_copy_cycles,
            &self.copier_timed_pages,
            &self.last_fault,
        ] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// One snapshot; see the module docs.
pub(super) struct Session {
    /// The range and the copy-once engine over its slots (its copy map
    /// in engine memory, its counters in [`LIVE`]).
    pub snap: Snapshot<Buffer>,
    /// Where copies go.
    pub store: Box<dyn SnapshotStore>,
    /// The range's write protection.
    pub shadow: ShadowPhysmap,
    /// The reference and copy counts (with [`super::Options::verify`]).
    pub verify: Option<Verification>,
    /// Fault latencies, ns (with [`super::Options::latencies`]).
    pub latencies: Option<Buffer>,
    /// The copier's progress samples: [`SAMPLE_WORDS`] words each.
    pub samples: Buffer,
    /// The CPU state the core file records: the starting thread just before
    /// the pause, on a stack the snapshot holds.
    pub registers: Registers,
}

/// Test hook: frames in `[SLOW_FIRST, SLOW_END)` are held this long (ns)
/// by whoever copies them, claim held, before the copy: long enough for
/// another CPU to write the frame meanwhile. Empty outside tests.
pub(super) static SLOW_FIRST: AtomicU64 = AtomicU64::new(0);
/// See [`SLOW_FIRST`].
pub(super) static SLOW_END: AtomicU64 = AtomicU64::new(0);
/// See [`SLOW_FIRST`].
pub(super) static SLOW_NS: AtomicU64 = AtomicU64::new(0);

/// Holds a frame the [`SLOW_FIRST`] test hook names.
fn slow_copy(frame: u64) {
    if (SLOW_FIRST.load(Ordering::Relaxed)..SLOW_END.load(Ordering::Relaxed)).contains(&frame) {
        let until = now_ns() + SLOW_NS.load(Ordering::Relaxed);
        while now_ns() < until {
            core::hint::spin_loop();
        }
    }
}

impl PageIo for Session {
    fn copy_out(&self, frame: u64, slot: u64) {
        debug_assert!(!x86_64::instructions::interrupts::are_enabled());
        slow_copy(frame);
        let cpu = crate::arch::percpu::index();
        let save = || self.store.save(frame, slot);
        if !LIVE.protecting.load(Ordering::Relaxed) {
            // The pause's eager copies take the kernel image, which holds
            // the splits, and must find it as the reference hashed it.
            save();
        } else if LIVE.batch_cpu.load(Ordering::Relaxed) == cpu as u64 + 1 {
            // The copier's: a sample of its copies is timed, for its busy
            // time's copy part and the splits' copier histogram.
            if let Some(cycles) = super::splits::copier_copy(save) {
                LIVE.copier_copy_cycles.fetch_add(cycles, Ordering::Relaxed);
                LIVE.copier_timed_pages.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            // A fault's (or the allocator hook's): one step of its split.
            super::splits::copy_begins(cpu, crate::arch::cpu::rdtsc());
            save();
            super::splits::copy_ends(cpu, crate::arch::cpu::rdtsc());
        }
        if let Some(v) = &self.verify {
            v.note_copy(slot);
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
    pub fn must_wait(&self, frame: u64) -> bool {
        self.store.room() == 0 && !self.store.failed() && !self.is_copied(frame)
    }

    /// Whether `frame` needs no copy: outside the range, or copied.
    pub fn is_copied(&self, frame: u64) -> bool {
        self.snap
            .index()
            .slot(frame)
            .is_none_or(|slot| self.snap.is_copied(slot))
    }

    /// Records one progress sample: time since the instant, pages by cause.
    pub fn sample(&self) {
        let i = LIVE.sample_count.fetch_add(1, Ordering::Relaxed);
        if i < SAMPLE_CAPACITY {
            let s = self.snap.stats();
            let t = now_ns().saturating_sub(LIVE.instant_ns.load(Ordering::Relaxed));
            let words =
                &self.samples.atomics()[(i * SAMPLE_WORDS) as usize..][..SAMPLE_WORDS as usize];
            for (w, v) in words.iter().zip([t, s.eager, s.fault, s.background]) {
                w.store(v, Ordering::Relaxed);
            }
        }
    }

    /// Records one fault's latency, ns, if latencies are kept.
    pub fn note_latency(&self, ns: u64) {
        if let Some(lat) = &self.latencies {
            let i = LIVE.latency_count.fetch_add(1, Ordering::Relaxed);
            if i < LATENCY_CAPACITY {
                lat.atomics()[i as usize].store(ns, Ordering::Relaxed);
            }
        }
    }
}
