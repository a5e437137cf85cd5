//! The snapshot benchmark's baselines: stop-and-copy of the same range
//! into the same kind of storage, and the time of one 4 KiB page copy with
//! the snapshot's own copy routine, warm, cold, and spread over time. They
//! reserve memory the way a snapshot would but never start one.

use alloc::vec::Vec;

use crate::clock::now_ns;
use crate::memsnap::store::ram::RamStore;
use crate::memsnap::{self, Options, StartError};
use crate::sync::IrqOff;
use crate::thread;

/// The baseline the live snapshot is measured against: a stop-and-copy
/// snapshot of the same range into the same kind of storage, with the world
/// stopped (interrupts off) for the whole copy. Returns `(pages, pause_ns)`.
pub fn stop_and_copy(opts: &Options) -> Result<(u64, u64), StartError> {
    let copy = memsnap::reserve_ram_copy(opts)?;
    let store = copy.store();
    let irq = IrqOff::new();
    let t0 = now_ns();
    for (slot, frame) in copy.index().iter().enumerate() {
        store.save(frame, slot as u64);
    }
    let ns = now_ns() - t0;
    drop(irq);
    Ok((copy.index().len(), ns))
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
/// neither is likely in the host's caches (or the emulator's TLB). Reported
/// beside the warm figure to tell the copy's own spread from the handler's.
pub fn page_copy_cold_ns(rounds: usize) -> CopyTime {
    page_copy_cold_among(rounds, 0, false)
}

/// [`page_copy_cold_ns`], one copy every `gap_ns` as in
/// [`page_copy_paced_ns`], each source page read once (one word) just
/// before its copy, as the workload's read-modify-write reads the page its
/// write then faults on: a fault's own copy, under the conditions a write
/// fault meets; the unit its p99 is judged in.
pub fn page_copy_cold_paced_ns(rounds: usize, gap_ns: u64) -> CopyTime {
    page_copy_cold_among(rounds, gap_ns, gap_ns > 0)
}

/// Random frames of the range into random slots, one every `gap_ns`,
/// each source read once first if `touch`.
fn page_copy_cold_among(rounds: usize, gap_ns: u64, touch: bool) -> CopyTime {
    let Ok(copy) = memsnap::reserve_ram_copy(&Options::default()) else {
        return CopyTime::default();
    };
    let store = copy.store();
    let frames: Vec<u64> = copy.index().iter().collect();
    let slots = store.len();
    let mut rng = snapshot::support::rng::Rng::new(0x5eed);
    let times = (0..rounds)
        .map(|_| {
            let frame = frames[rng.below(frames.len() as u64) as usize];
            let slot = rng.below(slots);
            crate::clock::spin_for(gap_ns);
            if touch {
                let word = frame * crate::memory::PAGE_SIZE + 8 * rng.below(512);
                core::hint::black_box(crate::memory::read_phys_u64(word));
            }
            copy_times(store, core::iter::once((frame, slot)))[0]
        })
        .collect();
    CopyTime::of(times)
}

/// Like [`page_copy_ns`], one copy every `gap_ns` (spinning between them
/// with interrupts on, so the CPU's tick and its other threads come in
/// between as they do between faults): the one-copy baseline under the
/// conditions a write fault meets.
pub fn page_copy_paced_ns(rounds: usize, gap_ns: u64) -> CopyTime {
    let (Some(store), Some(source)) = (RamStore::alloc(64), RamStore::alloc(64)) else {
        return CopyTime::default();
    };
    // Touch every page once first, as `page_copy_spread_ns` does: 64 first
    // touches in 2,000 copies would decide the p99 this baseline gives.
    for slot in 0..64 {
        let _irq = IrqOff::new();
        store.save(source.frame(slot), slot);
    }
    let times = (0..rounds as u64)
        .map(|i| {
            crate::clock::spin_for(gap_ns);
            copy_times(&store, core::iter::once((source.frame(i * 7 % 64), i % 64)))[0]
        })
        .collect();
    CopyTime::of(times)
}

/// Copies pages the way the snapshot's copier does, for as long as
/// `go_on` says: batches of 16 with interrupts off, and on a CPU reserved
/// for it, with that CPU's tick stopped while it copies. The load a write
/// fault meets on the other CPUs, for baselines. The caller must run
/// pinned to a CPU of its own (the tick's pause starts and ends there).
pub fn copy_like_the_copier(go_on: impl Fn() -> bool) {
    let (Some(store), Some(source)) = (RamStore::alloc(256), RamStore::alloc(256)) else {
        return;
    };
    let _tick = crate::arch::apic::pause_tick();
    let mut slot = 0;
    while go_on() {
        let _irq = IrqOff::new();
        for _ in 0..16 {
            store.save(source.frame(slot), slot);
            slot = (slot + 1) % 256;
        }
    }
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
