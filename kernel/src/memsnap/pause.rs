//! Starting a snapshot: the session is assembled from the reservation and
//! published, then the *pause*, the only stop of the world, interrupts off
//! on a stack outside the range: copy the eager set (the copy map's pages,
//! page tables, stacks, the kernel image, DMA targets), take the
//! verification reference if asked, and swap in the shadow. That swap is
//! the snapshot instant.
//!
//! The pause writes only eager pages (its stack, the kernel's statics, the
//! copy map) and engine memory, so every other page is as it was when the
//! pause began; it must never write the heap once the shadow is live (it
//! would fault on itself: [`PauseTimes::faults`] counts it).

use alloc::boxed::Box;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::Ordering;

use snapshot::memsnap::{PageIo, Snapshot};

use super::fault::with_dma_targets;
use super::reference::Verification;
use super::reserve::{reserve, Buffers, Reserved, Storage};
use super::session::{Session, LIVE, SESSION};
use super::shadow::ShadowPhysmap;
use super::store::disk::Shared;
use super::store::SnapshotStore;
use super::verify;
use super::{Options, StartError};
use crate::clock::now_ns;
use crate::memory::snapmem::{self, EngineStack};
use crate::memory::PAGE_SIZE;

/// What the pause took.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PauseTimes {
    /// The pause without the verification reference, ns.
    pub pause_ns: u64,
    /// The reference's hashing, ns.
    pub reference_ns: u64,
    /// Turning protection on, ns.
    pub protect_ns: u64,
    /// Faults taken in the pause: the engine's own writes to memory it had
    /// protected (nothing else runs).
    pub faults: u64,
}

/// Reserves, builds and publishes the session, then pauses. Returns the
/// pause's figures and, for a disk store, the state its writer shares.
pub(super) fn prepare_and_pause(
    opts: &Options,
) -> Result<(PauseTimes, Option<Arc<Shared>>), StartError> {
    let Reserved {
        index,
        storage,
        buffers,
    } = reserve(opts)?;
    let Buffers {
        table_frames,
        pt_buffer,
        map_words,
        reference,
        copies,
        latencies,
        samples,
        mut pause_stack,
    } = buffers;
    let shadow =
        ShadowPhysmap::build(&index, table_frames, pt_buffer).map_err(StartError::Shadow)?;
    let eager_map: Vec<u64> = if opts.map_outside {
        Vec::new()
    } else {
        map_words.frames().collect()
    };
    let (store, disk): (Box<dyn SnapshotStore>, _) = match storage {
        Storage::Ram(store) => (Box::new(store), None),
        Storage::Disk(store) => {
            let shared = store.shared();
            (Box::new(store), Some(shared))
        }
    };
    LIVE.reset();
    super::splits::reset();
    let session = Session {
        snap: Snapshot::new(index, map_words, &LIVE.counters),
        store,
        shadow,
        verify: reference.zip(copies).map(|(r, c)| Verification::new(r, c)),
        latencies,
        samples,
        // This function's frame stays live through the pause.
        registers: crate::arch::cpu::registers_here(),
    };
    assert!(
        session.store.slots() >= session.snap.index().len(),
        "storage smaller than the range"
    );
    if SESSION.publish(Box::new(session)).is_err() {
        panic!("a snapshot session was published while the phase was idle");
    }
    Ok((pause(&mut pause_stack, &eager_map), disk))
}

/// The pause, on `stack` (the caller's own stack is a page of the range),
/// with DMA registration held off so no registration slips past it, and
/// every other CPU parked with interrupts off: the instant is the same for
/// all, and each flushes its TLB (the shadow map) before it resumes.
fn pause(stack: &mut EngineStack, eager_map: &[u64]) -> PauseTimes {
    let _stopped = crate::arch::ipi::stop_others();
    with_dma_targets(|dma| {
        let mut times = PauseTimes::default();
        stack.run(|| {
            times = SESSION
                .with(|s| pause_on(s, eager_map, dma))
                .unwrap_or_default();
        });
        times
    })
}

/// The pause's work on the published session (interrupts off).
fn pause_on(s: &Session, eager_map: &[u64], dma: &[Range<u64>]) -> PauseTimes {
    let t0 = now_ns();
    let hash_ns = copy_eager_set(s, eager_map, dma);
    let t1 = now_ns();
    verify::reference_rest(s);
    let t2 = now_ns();
    // From here on writes through the physical map fault into the engine.
    LIVE.protecting.store(true, Ordering::Release);
    s.shadow.activate();
    LIVE.instant_ns.store(now_ns(), Ordering::Relaxed);
    s.sample();
    let t3 = now_ns();
    let counts = LIVE.stats();
    PauseTimes {
        pause_ns: (t1 - t0 - hash_ns) + (t3 - t2),
        reference_ns: hash_ns + (t2 - t1),
        protect_ns: t3 - t2,
        faults: counts.fault + counts.rewrites,
    }
}

/// Copies the eager set, taking each page's reference as it goes when
/// verifying; returns the time spent hashing.
fn copy_eager_set(s: &Session, eager_map: &[u64], dma: &[Range<u64>]) -> u64 {
    let mut hash_ns = 0;
    // The copy map's pages first, before any claim changes them.
    for &frame in eager_map {
        if let Some(slot) = s.snap.index().slot(frame) {
            hash_ns += verify::reference_frame(s, frame);
            s.copy_out(frame, slot);
        }
    }
    for &frame in eager_map {
        s.snap.mark_copied_eager(s, frame);
    }
    snapmem::walk_eager(|frame| {
        if !s.is_copied(frame) {
            hash_ns += verify::reference_frame(s, frame);
            s.snap.copy_eager(s, frame);
        }
    });
    // A device may write these at any moment, even now: there is no
    // independent reference for them, so the copy itself is the reference
    // (checked: copied exactly once).
    for range in dma {
        for frame in range.start / PAGE_SIZE..range.end.div_ceil(PAGE_SIZE) {
            if let Some(slot) = s.snap.index().slot(frame) {
                if !s.snap.is_copied(slot) {
                    s.snap.copy_eager(s, frame);
                    hash_ns += verify::reference_copy(s, slot);
                }
            }
        }
    }
    hash_ns
}
