//! The live memory snapshot engine, without the hardware.
//!
//! A snapshot covers a *range*: a set of physical frames (all RAM except the
//! engine's own reservation). Each range frame has a dense *slot* number
//! ([`RangeIndex`]), and the slots are the units of a copy-once
//! [`Engine`](crate::copyonce::Engine), whose copy map says which are copied.
//! At the snapshot instant the kernel copies the eager set
//! ([`Snapshot::copy_eager`]) and write-protects the rest; afterwards a frame
//! is copied exactly once, by whichever comes first: the write-fault handler
//! ([`Snapshot::on_write_fault`]) or the background copier
//! ([`Snapshot::copy_background`]). Either one claims the frame's slot,
//! copies, and only then lifts the protection, so no write can land before
//! its copy.
//!
//! The hardware sits behind [`PageIo`]: copy a frame into a storage slot, and
//! make a frame writable again.
//!
//! Atomicity: the engine's three-state map makes a claim exclusive on any
//! number of CPUs (a second claimant finds the slot *copying* and waits).
//! The kernel runs each claim-copy-unprotect sequence with interrupts off on
//! its single CPU, so on it no claimant ever finds a slot *copying*; the
//! property tests model the interleavings of faults and the copier.
//!
//! Nothing here allocates after construction: the fault path calls it.
//!
//! Snapshots to disk add two parts: [`staging`], the bounded area that
//! decouples the fault path from the disk, and [`elfcore`], the core-file
//! layout the disk copy takes. [`reserve`] sizes what a snapshot sets aside.

pub mod elfcore;
pub mod reserve;
pub mod staging;

use alloc::vec;
use alloc::vec::Vec;
use core::convert::Infallible;
use core::fmt;
use core::sync::atomic::AtomicU64;

use crate::copyonce::{self, Access, Cause, Engine, UnitCopy};

/// Which frames belong to the snapshot, and the slot of each: its rank
/// among the range's frames.
///
/// Each entry pairs a word of membership bits with the number of included
/// frames before it, so a lookup touches one entry (the fault path does
/// one per fault).
#[derive(Debug, Clone)]
pub struct RangeIndex {
    /// `[membership bits, included frames before this word]`.
    words: Vec<[u64; 2]>,
    len: u64,
}

impl RangeIndex {
    /// An index over frames `0..frames`, none included.
    pub fn new(frames: u64) -> Self {
        RangeIndex {
            words: vec![[0, 0]; frames.div_ceil(64) as usize],
            len: 0,
        }
    }

    /// Includes frames `[first, end)`; call [`Self::seal`] when done.
    pub fn include(&mut self, first: u64, end: u64) {
        for frame in first..end.min(self.frames()) {
            self.words[(frame / 64) as usize][0] |= 1 << (frame % 64);
        }
    }

    /// Excludes one frame (the engine's own reservation).
    pub fn exclude(&mut self, frame: u64) {
        if frame < self.frames() {
            self.words[(frame / 64) as usize][0] &= !(1 << (frame % 64));
        }
    }

    /// Computes the slot numbers; the index is read-only afterwards.
    pub fn seal(&mut self) {
        let mut total = 0;
        for [bits, before] in &mut self.words {
            *before = total;
            total += u64::from(bits.count_ones());
        }
        self.len = total;
    }

    /// Frames the index can describe.
    pub fn frames(&self) -> u64 {
        self.words.len() as u64 * 64
    }

    /// Frames in the range.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `frame` is in the range.
    pub fn contains(&self, frame: u64) -> bool {
        frame < self.frames() && self.words[(frame / 64) as usize][0] & (1 << (frame % 64)) != 0
    }

    /// The slot of `frame`, if it is in the range. Constant time.
    pub fn slot(&self, frame: u64) -> Option<u64> {
        let [bits, before] = *self.words.get((frame / 64) as usize)?;
        let bit = 1u64 << (frame % 64);
        if bits & bit == 0 {
            return None;
        }
        Some(before + u64::from((bits & (bit - 1)).count_ones()))
    }

    /// The frame of `slot` (the inverse of [`Self::slot`]), if the range
    /// has that many frames. Logarithmic: a binary search over the words.
    pub fn frame(&self, slot: u64) -> Option<u64> {
        if slot >= self.len {
            return None;
        }
        // The last word with fewer frames before it than `slot + 1`.
        let word = self.words.partition_point(|&[_, before]| before <= slot) - 1;
        let [mut bits, before] = self.words[word];
        for _ in before..slot {
            bits &= bits - 1;
        }
        Some(word as u64 * 64 + u64::from(bits.trailing_zeros()))
    }

    /// The first range frame at or after `frame`.
    pub fn next_from(&self, frame: u64) -> Option<u64> {
        let mut word = (frame / 64) as usize;
        let mut bits = self.words.get(word)?[0] & (u64::MAX << (frame % 64));
        loop {
            if bits != 0 {
                return Some(word as u64 * 64 + u64::from(bits.trailing_zeros()));
            }
            word += 1;
            bits = self.words.get(word)?[0];
        }
    }

    /// The range as maximal runs of consecutive frames, `(first frame,
    /// frames)`, in slot order: run `k` holds the slots from the sum of
    /// the earlier runs' lengths on.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for frame in self.iter() {
            match runs.last_mut() {
                Some((first, len)) if *first + *len == frame => *len += 1,
                _ => runs.push((frame, 1)),
            }
        }
        runs
    }

    /// The range's frames in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let mut next = self.next_from(0);
        core::iter::from_fn(move || {
            let frame = next?;
            next = self.next_from(frame + 1);
            Some(frame)
        })
    }
}

pub use crate::copyonce::Counters;

/// Pages copied by cause, as values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Copied at the instant.
    pub eager: u64,
    /// Copied on a write fault.
    pub fault: u64,
    /// Copied in the background.
    pub background: u64,
    /// Faults on already-copied pages.
    pub rewrites: u64,
}

impl Stats {
    /// Pages copied in all.
    pub fn copied(&self) -> u64 {
        self.eager + self.fault + self.background
    }
}

impl From<copyonce::Stats> for Stats {
    fn from(s: copyonce::Stats) -> Self {
        Stats {
            eager: s[Cause::Eager],
            fault: s[Cause::Access],
            background: s[Cause::Background],
            rewrites: s[Cause::AlreadyCopied] + s[Cause::Waited],
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
    /// Already copied (by the copier or an earlier fault); protection lifted.
    AlreadyCopied,
    /// Not a frame of this snapshot: not ours to handle.
    NotInRange,
}

/// A snapshot in progress: the range, and the copy-once engine over its
/// slots (the copy map and the counters).
///
/// Only the map and the counters change after construction, both through
/// atomics, and both live wherever their owner put them: the fault path
/// writes nothing else.
#[derive(Debug)]
pub struct Snapshot<W> {
    index: RangeIndex,
    engine: Engine<W, &'static Counters>,
}

/// One frame's copy, for the engine: its slot's unit is `frame`.
struct FrameCopy<'a, P> {
    io: &'a P,
    frame: u64,
}

impl<P: PageIo> UnitCopy for FrameCopy<'_, P> {
    type Error = Infallible;
    fn copy(&self, slot: u64) -> Result<(), Infallible> {
        self.io.copy_out(self.frame, slot);
        self.io.unprotect(self.frame);
        Ok(())
    }
}

/// The background copier's copies: each slot's frame from the index.
struct SlotCopy<'a, P> {
    io: &'a P,
    index: &'a RangeIndex,
}

impl<P: PageIo> UnitCopy for SlotCopy<'_, P> {
    type Error = Infallible;
    fn copy(&self, slot: u64) -> Result<(), Infallible> {
        let frame = self.index.frame(slot).expect("engine units are slots");
        self.io.copy_out(frame, slot);
        self.io.unprotect(frame);
        Ok(())
    }
}

/// On one CPU with interrupts off no copy is ever in progress when a fault
/// claims; on several, the claimant spins until the other copier is done.
fn relax() {
    core::hint::spin_loop();
}

impl<W: AsRef<[AtomicU64]>> Snapshot<W> {
    /// Copy-map words needed for `slots` slots.
    pub fn words_for(slots: u64) -> usize {
        copyonce::words_for(slots)
    }

    /// A snapshot of `index`'s range over the copy-map `words` (at least
    /// [`Self::words_for`] of them), nothing copied yet.
    pub fn new(index: RangeIndex, words: W, counters: &'static Counters) -> Self {
        let engine = Engine::new(words, index.len(), counters);
        Snapshot { index, engine }
    }

    /// The range.
    pub fn index(&self) -> &RangeIndex {
        &self.index
    }

    /// The engine over the range's slots.
    pub fn engine(&self) -> &Engine<W, &'static Counters> {
        &self.engine
    }

    /// Whether `slot`'s frame has been copied.
    pub fn is_copied(&self, slot: u64) -> bool {
        self.engine.is_copied(slot)
    }

    /// Copies a frame of the eager set at the instant. Frames outside the
    /// range, or listed twice, are skipped; returns whether it copied.
    pub fn copy_eager(&self, io: &impl PageIo, frame: u64) -> bool {
        let Some(slot) = self.index.slot(frame) else {
            return false;
        };
        let Ok(copied) = self.engine.copy_eager(&FrameCopy { io, frame }, slot);
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

    /// A write hit a protected frame: copy it first unless already copied,
    /// then lift the protection.
    pub fn on_write_fault(&self, io: &impl PageIo, frame: u64) -> FaultOutcome {
        let Some(slot) = self.index.slot(frame) else {
            return FaultOutcome::NotInRange;
        };
        match self
            .engine
            .copy_on_access(&FrameCopy { io, frame }, slot, relax)
        {
            Access::Copied => FaultOutcome::Copied,
            Access::AlreadyCopied | Access::WaitedForOther => {
                io.unprotect(frame);
                FaultOutcome::AlreadyCopied
            }
            Access::Failed(never) => match never {},
        }
    }

    /// Copies up to `max` uncopied frames, in address order from where the
    /// last call stopped; returns how many it copied (0 once complete).
    pub fn copy_background(&self, io: &impl PageIo, max: u64) -> u64 {
        let copy = SlotCopy {
            io,
            index: &self.index,
        };
        let Ok(copied) = self.engine.copy_background(&copy, max);
        copied
    }

    /// Whether every frame of the range has been copied.
    pub fn is_complete(&self) -> bool {
        self.engine.is_complete()
    }

    /// The counters' values.
    pub fn stats(&self) -> Stats {
        self.engine.stats().into()
    }
}

/// Where a snapshot is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No snapshot.
    Idle,
    /// Started: protection on, copier running.
    Active,
    /// Every page copied; the copy can be read and restored from.
    Complete,
    /// The storage failed (a disk I/O error, staging exhausted where no
    /// one could wait): the copy is unusable. Protection stays until the
    /// snapshot is aborted, and writes still get through meanwhile.
    Failed,
}

/// A lifecycle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Take a snapshot now.
    Start,
    /// Every page is copied.
    Finish,
    /// Stop and forget the snapshot, restoring permissions.
    Abort,
    /// Forget a completed snapshot.
    Release,
    /// The storage failed.
    Fail,
}

/// A refused lifecycle request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifecycleError {
    /// The phase it was asked in.
    pub phase: Phase,
    /// What was asked.
    pub request: Request,
}

impl fmt::Display for LifecycleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.phase, self.request) {
            (Phase::Active | Phase::Complete | Phase::Failed, Request::Start) => {
                write!(
                    f,
                    "a snapshot is already {:?}; abort or release it first",
                    self.phase
                )
            }
            (phase, request) => write!(f, "cannot {request:?} a snapshot that is {phase:?}"),
        }
    }
}

/// The lifecycle's transition function.
pub fn transition(phase: Phase, request: Request) -> Result<Phase, LifecycleError> {
    match (phase, request) {
        (Phase::Idle, Request::Start) => Ok(Phase::Active),
        (Phase::Active, Request::Finish) => Ok(Phase::Complete),
        (Phase::Active, Request::Fail) => Ok(Phase::Failed),
        (Phase::Active | Phase::Complete | Phase::Failed, Request::Abort) => Ok(Phase::Idle),
        (Phase::Complete, Request::Release) => Ok(Phase::Idle),
        (phase, request) => Err(LifecycleError { phase, request }),
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
    use std::vec::Vec;

    #[test]
    fn slots_are_dense_ranks() {
        let mut index = RangeIndex::new(200);
        index.include(10, 150);
        index.exclude(64);
        index.exclude(70);
        index.seal();
        assert_eq!(index.len(), 138);
        assert_eq!(index.slot(9), None);
        assert_eq!(index.slot(10), Some(0));
        assert_eq!(index.slot(63), Some(53));
        assert_eq!(index.slot(64), None);
        assert_eq!(index.slot(65), Some(54));
        assert_eq!(index.slot(149), Some(137));
        let frames: Vec<u64> = index.iter().collect();
        assert_eq!(frames.len(), 138);
        assert!(frames
            .iter()
            .enumerate()
            .all(|(i, &f)| index.slot(f) == Some(i as u64)));
        assert_eq!(index.runs(), [(10, 54), (65, 5), (71, 79)]);
        let mut slot = 0;
        for (first, len) in index.runs() {
            assert_eq!(index.slot(first), Some(slot), "runs follow slot order");
            slot += len;
        }
        assert_eq!(slot, index.len());
    }

    #[test]
    fn lifecycle_refuses_what_makes_no_sense() {
        use Phase::*;
        use Request::*;
        assert_eq!(transition(Idle, Start), Ok(Active));
        assert_eq!(transition(Active, Start).unwrap_err().phase, Active);
        assert_eq!(transition(Complete, Start).unwrap_err().request, Start);
        assert_eq!(transition(Active, Finish), Ok(Complete));
        assert_eq!(transition(Active, Abort), Ok(Idle));
        assert_eq!(transition(Complete, Abort), Ok(Idle));
        assert_eq!(transition(Complete, Release), Ok(Idle));
        assert!(transition(Idle, Abort).is_err());
        assert!(transition(Active, Release).is_err());
        assert!(transition(Idle, Finish).is_err());
        assert_eq!(transition(Active, Fail), Ok(Failed));
        assert_eq!(transition(Failed, Start).unwrap_err().phase, Failed);
        assert!(
            transition(Failed, Release).is_err(),
            "a failed copy is not a snapshot"
        );
        assert!(transition(Failed, Finish).is_err());
        assert_eq!(transition(Failed, Abort), Ok(Idle));
        assert!(transition(Complete, Fail).is_err());
    }

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
                (0..Snapshot::<Vec<AtomicU64>>::words_for(n)).map(|_| AtomicU64::new(u64::MAX)).collect();
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
            prop_assert_eq!(snap.engine().count(), n);
            prop_assert!(machine.copies.borrow().iter().all(|&c| c == 1), "a frame copied twice or never");
            for (slot, frame) in index.iter().enumerate() {
                prop_assert_eq!(machine.storage.borrow()[slot], Some(at_instant[frame as usize]));
            }
            let eager_in_range: BTreeSet<u64> = eager.iter().copied().filter(|e| index.contains(*e)).collect();
            prop_assert_eq!(stats.eager, eager_in_range.len() as u64);
            prop_assert!(machine.writable.borrow().iter().all(|&w| w), "protection left behind");
        }

        #[test]
        fn next_from_and_slot_agree_with_a_model(
            frames in 1u64..500,
            holes in proptest::collection::btree_set(0u64..500, 0..100),
        ) {
            let mut index = RangeIndex::new(frames);
            index.include(0, frames);
            for &h in &holes { index.exclude(h); }
            index.seal();
            let model: Vec<u64> = (0..frames).filter(|f| !holes.contains(f)).collect();
            prop_assert_eq!(index.len(), model.len() as u64);
            prop_assert_eq!(index.iter().collect::<Vec<_>>(), model.clone());
            for (slot, &frame) in model.iter().enumerate() {
                prop_assert_eq!(index.slot(frame), Some(slot as u64));
                prop_assert_eq!(index.frame(slot as u64), Some(frame));
            }
            prop_assert_eq!(index.frame(model.len() as u64), None);
        }
    }
}
