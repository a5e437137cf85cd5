//! The live memory snapshot, without the hardware.
//!
//! A snapshot covers a *range*: a set of physical frames (all RAM except the
//! engine's own reservation). Each range frame has a dense *slot* number
//! ([`RangeIndex`]), and the slots are the units of a
//! [copy-once engine](crate::copyonce). At the snapshot instant the kernel
//! copies the eager set ([`Snapshot::copy_eager`]) and write-protects the
//! rest; afterwards a frame is copied exactly once, by whichever comes
//! first: the write-fault handler ([`Snapshot::on_write_fault`]) or the
//! background copier ([`Snapshot::copy_background`]). Either one claims the
//! frame's slot, copies, and only then lifts the protection, so no write can
//! land before its copy.
//!
//! The hardware sits behind [`PageIo`]: copy a frame into a storage slot,
//! make a frame writable again.
//!
//! Atomicity: the engine's claim is one atomic step and a slot being copied
//! is `Copying` until its copy is whole, so a fault on one CPU that meets a
//! copy in progress on another waits for it and never copies twice. On one
//! CPU the kernel holds a claim only with interrupts off, so a fault never
//! finds its own CPU's copy in progress. The property tests model the
//! interleavings of faults and copier steps; the engine's own tests and
//! loom models cover the concurrent claims.
//!
//! Nothing here allocates after construction: the fault path calls it.
//!
//! The parts: [`range`] (frames to slots), [`lifecycle`] (the phases),
//! [`reserve`] (what a snapshot sets aside, and whether it fits),
//! [`staging`] (the bounded area that decouples the fault path from a
//! disk), [`elfcore`] (the core-file layout a disk copy takes) and
//! [`soak`] (the randomised soak's runs and results).

pub mod elfcore;
pub mod lifecycle;
pub mod range;
pub mod reserve;
pub mod soak;
pub mod staging;

pub use crate::copyonce::{words_for, Counters};
pub use lifecycle::{transition, LifecycleError, Phase, Request};
pub use range::RangeIndex;

use core::cell::Cell;
use core::convert::Infallible;
use core::sync::atomic::AtomicU64;

use crate::copyonce::{Access, Cause, Engine, UnitCopy};

/// Pages copied by cause, as values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Copied at the instant.
    pub eager: u64,
    /// Copied on a write fault (or before the allocator reused the frame,
    /// or before a device wrote it).
    pub fault: u64,
    /// Copied in the background.
    pub background: u64,
    /// Faults on pages already copied (permission restored only).
    pub rewrites: u64,
    /// Faults that found the page being copied by another CPU and waited.
    pub waited: u64,
}

impl Stats {
    /// Pages copied in all.
    pub fn copied(&self) -> u64 {
        self.eager + self.fault + self.background
    }
}

impl From<crate::copyonce::Stats> for Stats {
    fn from(s: crate::copyonce::Stats) -> Self {
        Stats {
            eager: s[Cause::Eager],
            fault: s[Cause::Access],
            background: s[Cause::Background],
            rewrites: s[Cause::AlreadyCopied],
            waited: s[Cause::Waited],
        }
    }
}

/// The hardware side of copying.
pub trait PageIo {
    /// Copies frame `frame` into storage slot `slot`. Must not fault,
    /// allocate or block: it runs in the fault handler.
    fn copy_out(&self, frame: u64, slot: u64);
    /// Lets writes to `frame` through again (and drops stale TLB entries).
    fn unprotect(&self, frame: u64);
}

/// What the fault handler should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The frame was copied now; protection lifted.
    Copied,
    /// Already copied (by the copier, an earlier fault, or another CPU this
    /// fault waited for); protection lifted.
    AlreadyCopied,
    /// Not a frame of this snapshot: not ours to handle.
    NotInRange,
}

/// Copies one known frame into the slot the engine gives.
struct OneFrame<'a, P> {
    io: &'a P,
    frame: u64,
}

impl<P: PageIo> UnitCopy for OneFrame<'_, P> {
    type Error = Infallible;
    fn copy(&self, slot: u64) -> Result<(), Infallible> {
        self.io.copy_out(self.frame, slot);
        Ok(())
    }
}

/// Copies whichever slot the background copier claims, and lifts its
/// frame's protection before the slot is marked copied.
struct AnySlot<'a, P> {
    io: &'a P,
    index: &'a RangeIndex,
    /// The last slot copied and its frame: the copier claims slots in
    /// order, so the next frame is usually the next one in the range.
    last: Cell<Option<(u64, u64)>>,
}

impl<P: PageIo> AnySlot<'_, P> {
    /// The frame of `slot`: one step from the last one when the copier
    /// goes on in order, a search of the index otherwise.
    fn frame(&self, slot: u64) -> u64 {
        let next = match self.last.get() {
            Some((last, frame)) if last + 1 == slot => self.index.next_from(frame + 1),
            _ => self.index.frame(slot),
        };
        let frame = next.expect("the engine's units are the range's slots");
        self.last.set(Some((slot, frame)));
        frame
    }
}

impl<P: PageIo> UnitCopy for AnySlot<'_, P> {
    type Error = Infallible;
    fn copy(&self, slot: u64) -> Result<(), Infallible> {
        let frame = self.frame(slot);
        self.io.copy_out(frame, slot);
        self.io.unprotect(frame);
        Ok(())
    }
}

/// A snapshot in progress: the range and the copy-once engine over its
/// slots, whose map words `W` and counters live wherever their owner put
/// them: the fault path writes nothing else.
#[derive(Debug)]
pub struct Snapshot<W> {
    index: RangeIndex,
    engine: Engine<W, &'static Counters>,
}

impl<W: AsRef<[AtomicU64]>> Snapshot<W> {
    /// A snapshot of `index`'s range, nothing copied yet: `words` holds at
    /// least [`words_for`]`(index.len())` words, which it clears.
    pub fn new(index: RangeIndex, words: W, counters: &'static Counters) -> Self {
        let engine = Engine::new(words, index.len(), counters);
        Snapshot { index, engine }
    }

    /// The range.
    pub fn index(&self) -> &RangeIndex {
        &self.index
    }

    /// Whether `slot` has been copied.
    pub fn is_copied(&self, slot: u64) -> bool {
        self.engine.is_copied(slot)
    }

    /// Whether someone holds the claim on `slot` and is copying it now.
    pub fn is_copying(&self, slot: u64) -> bool {
        self.engine.state(slot) == crate::copyonce::State::Copying
    }

    /// Slots copied, counted in the copy map.
    pub fn copied_count(&self) -> u64 {
        self.engine.count()
    }

    /// Copies a frame of the eager set at the instant. Frames outside the
    /// range, or listed twice, are skipped; returns whether it copied.
    pub fn copy_eager(&self, io: &impl PageIo, frame: u64) -> bool {
        let Some(slot) = self.index.slot(frame) else {
            return false;
        };
        let Ok(copied) = self.engine.copy_eager(&OneFrame { io, frame }, slot);
        if copied {
            io.unprotect(frame);
        }
        copied
    }

    /// Marks an eager frame the caller has already copied with
    /// [`PageIo::copy_out`] before the first claim: the copy map's own pages,
    /// whose contents the claims themselves change. Returns whether it marked.
    pub fn mark_copied_eager(&self, io: &impl PageIo, frame: u64) -> bool {
        let Some(slot) = self.index.slot(frame) else {
            return false;
        };
        let marked = self.engine.mark_copied(slot);
        if marked {
            io.unprotect(frame);
        }
        marked
    }

    /// A write hit a protected frame: copy it first unless already copied
    /// (waiting, spinning, for another CPU's copy in progress), then lift
    /// the protection.
    pub fn on_write_fault(&self, io: &impl PageIo, frame: u64) -> FaultOutcome {
        let Some(slot) = self.index.slot(frame) else {
            return FaultOutcome::NotInRange;
        };
        let access =
            self.engine
                .copy_on_access(&OneFrame { io, frame }, slot, core::hint::spin_loop);
        io.unprotect(frame);
        match access {
            Access::Copied => FaultOutcome::Copied,
            Access::AlreadyCopied | Access::WaitedForOther => FaultOutcome::AlreadyCopied,
            Access::Failed(never) => match never {},
        }
    }

    /// Copies up to `max` uncopied frames, in address order from where the
    /// last call stopped; returns how many it copied (0 once none is left
    /// for it).
    pub fn copy_background(&self, io: &impl PageIo, max: u64) -> u64 {
        let io = AnySlot {
            io,
            index: &self.index,
            last: Cell::new(None),
        };
        let Ok(copied) = self.engine.copy_background(&io, max);
        copied
    }

    /// Copies up to `max` uncopied frames among the `reach` slots from
    /// `slot`, for a copier that follows the writes: the slots after one a
    /// write fault copied are likely written next (see
    /// [`crate::copyonce::Engine::copy_ahead`]). Returns how many it copied
    /// and the slot after the last one it looked at.
    pub fn copy_ahead(&self, io: &impl PageIo, slot: u64, reach: u64, max: u64) -> (u64, u64) {
        let io = AnySlot {
            io,
            index: &self.index,
            last: Cell::new(None),
        };
        let Ok(done) = self.engine.copy_ahead(&io, slot, reach, max);
        done
    }

    /// Whether every frame of the range has been copied.
    pub fn is_complete(&self) -> bool {
        self.engine.is_complete()
    }

    /// The counts by cause.
    pub fn stats(&self) -> Stats {
        self.engine.stats().into()
    }
}

/// A page hash for verification against an independent reference: 64-bit
/// multiply-xor over the words (not cryptographic; it detects corruption).
pub fn page_hash(words: &[u64]) -> u64 {
    let mut hash = 0x9e37_79b9_7f4a_7c15u64;
    for (i, w) in words.iter().enumerate() {
        hash = (hash ^ w.wrapping_add(i as u64)).wrapping_mul(0xff51_afd7_ed55_8ccd);
        hash ^= hash >> 29;
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::cell::RefCell;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::vec;
    use std::vec::Vec;

    /// Simulated machine: memory pages hold a version number; storage and
    /// protection are tracked per frame.
    struct Machine {
        memory: RefCell<Vec<u64>>,
        storage: RefCell<Vec<Option<u64>>>,
        writable: RefCell<Vec<bool>>,
        copies: RefCell<Vec<u32>>,
    }

    impl PageIo for Machine {
        fn copy_out(&self, frame: u64, slot: u64) {
            let value = self.memory.borrow()[frame as usize];
            self.storage.borrow_mut()[slot as usize] = Some(value);
            self.copies.borrow_mut()[slot as usize] += 1;
        }
        fn unprotect(&self, frame: u64) {
            self.writable.borrow_mut()[frame as usize] = true;
        }
    }

    #[derive(Debug, Clone)]
    enum Step {
        Write(u16),
        Copier(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => any::<u16>().prop_map(Step::Write),
            1 => (1u8..20).prop_map(Step::Copier),
        ]
    }

    proptest! {
        /// Any interleaving of workload writes (which fault on protected
        /// frames) with background-copier steps ends with storage equal to
        /// memory at the instant, every range frame copied exactly once, and
        /// the counts by cause adding up to the range.
        #[test]
        fn snapshot_equals_memory_at_the_instant(
            frames in 1u64..300,
            holes in proptest::collection::btree_set(0u64..300, 0..40),
            eager in proptest::collection::btree_set(0u64..300, 0..20),
            steps in proptest::collection::vec(step(), 0..600),
        ) {
            let mut index = RangeIndex::new(frames);
            index.include(0, frames);
            for &h in &holes { index.exclude(h); }
            index.seal();
            let n = index.len();
            let machine = Machine {
                memory: RefCell::new((0..frames).map(|f| f * 1000).collect()),
                storage: RefCell::new(vec![None; n as usize]),
                writable: RefCell::new((0..frames).map(|f| !index.contains(f)).collect()),
                copies: RefCell::new(vec![0; n as usize]),
            };
            let at_instant = machine.memory.borrow().clone();
            let words: Vec<AtomicU64> =
                (0..words_for(n)).map(|_| AtomicU64::new(u64::MAX)).collect();
            let counters: &'static Counters = std::boxed::Box::leak(std::boxed::Box::new(Counters::new()));
            let snap = Snapshot::new(index.clone(), words, counters);
            for &e in eager.iter().filter(|&&e| e < frames) {
                snap.copy_eager(&machine, e);
            }
            let mut version = 1;
            for step in steps.iter().cloned().chain(core::iter::once(Step::Copier(u8::MAX))) {
                match step {
                    Step::Write(f) => {
                        let frame = u64::from(f) % frames;
                        if !machine.writable.borrow()[frame as usize] {
                            prop_assert_ne!(snap.on_write_fault(&machine, frame), FaultOutcome::NotInRange);
                        }
                        prop_assert!(machine.writable.borrow()[frame as usize]);
                        machine.memory.borrow_mut()[frame as usize] = at_instant[frame as usize] + version;
                        version += 1;
                    }
                    Step::Copier(budget) => {
                        let budget = if budget == u8::MAX { u64::MAX } else { u64::from(budget) };
                        snap.copy_background(&machine, budget);
                    }
                }
            }
            prop_assert!(snap.is_complete());
            let stats = snap.stats();
            prop_assert_eq!(stats.copied(), n, "counts by cause add up to the range");
            prop_assert_eq!(snap.copied_count(), n);
            prop_assert!(machine.copies.borrow().iter().all(|&c| c == 1), "a frame copied twice or never");
            for (slot, frame) in index.iter().enumerate() {
                prop_assert_eq!(machine.storage.borrow()[slot], Some(at_instant[frame as usize]));
            }
            let eager_in_range: BTreeSet<u64> = eager.iter().copied().filter(|e| index.contains(*e)).collect();
            prop_assert_eq!(stats.eager, eager_in_range.len() as u64);
            prop_assert!(machine.writable.borrow().iter().all(|&w| w), "protection left behind");
        }
    }
}
