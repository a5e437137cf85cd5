//! A bounded set of page buffers between the snapshot's copiers (the
//! write-fault handler, the background copier) and a writer that drains
//! them to a disk, so a live snapshot can be written to disk while it runs.
//!
//! Each buffer has one state word, changed only by compare-and-swap, so
//! any interleaving of claims (from a fault handler that interrupts the
//! writer, or from another CPU) and drains is safe. Free buffers are also
//! on a lock-free stack (a head word with an ABA tag, one link word per
//! buffer), so a claim takes constant time however the writer frees them:
//!
//! ```text
//! Free --claim--> Filling --publish(slot)--> Staged(slot) --take--> Writing --release--> Free
//! ```
//!
//! A *reserve* of buffers is kept for copiers that cannot wait (a fault
//! taken with interrupts off, which cannot block for the writer): ordinary
//! claims stop when only the reserve is left, reserve claims may use it.
//!
//! Nothing here blocks or takes a lock, and nothing the copiers call
//! (claim, publish) allocates: the fault path calls them. The writer's
//! [`Staging::take`] appends to a vector the caller sizes. Every word
//! written here is in the caller's storage `W` (in the kernel, engine
//! memory outside the snapshot range, which never faults).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

const FREE: u64 = 0;
const FILLING: u64 = 1;
const WRITING: u64 = 2;
/// `Staged(slot)` is `slot + STAGED`.
const STAGED: u64 = 3;

/// Who is claiming a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimant {
    /// Can wait for the writer: leaves the reserve alone.
    MayWait,
    /// Cannot wait (interrupts off): may use the reserve.
    MustNotWait,
}

/// The buffers' states; the buffers themselves are the caller's (buffer
/// `i` is page `i` of its staging memory). `W` holds the words: a free
/// count, the free stack's head, one state per buffer, one free-stack link
/// per buffer.
#[derive(Debug)]
pub struct Staging<W> {
    words: W,
    buffers: usize,
    reserve: usize,
}

const FREE_WORD: usize = 0;
/// The free stack's top buffer (low 32 bits, [`NIL`] when empty) and a tag
/// (high 32 bits) bumped by every change, so a stale compare-and-swap fails.
const HEAD_WORD: usize = 1;
const FIRST_STATE: usize = 2;
const NIL: u64 = u32::MAX as u64;

impl<W: AsRef<[AtomicU64]>> Staging<W> {
    /// Words of storage for `buffers` buffers.
    pub fn words_for(buffers: usize) -> usize {
        FIRST_STATE + 2 * buffers
    }

    /// `buffers` buffers, `reserve` of them kept for [`Claimant::MustNotWait`],
    /// with their states in `words` (at least [`Self::words_for`]), all free.
    pub fn new(words: W, buffers: usize, reserve: usize) -> Self {
        assert!(reserve < buffers, "the reserve must leave ordinary buffers");
        assert!(
            words.as_ref().len() >= Self::words_for(buffers),
            "staging state storage too small"
        );
        assert!((buffers as u64) < NIL, "too many buffers");
        let w = words.as_ref();
        for state in &w[FIRST_STATE..FIRST_STATE + buffers] {
            state.store(FREE, Ordering::Relaxed);
        }
        // Buffer i links to i + 1: claims start in address order.
        for (i, link) in w[FIRST_STATE + buffers..FIRST_STATE + 2 * buffers]
            .iter()
            .enumerate()
        {
            let next = if i + 1 < buffers { i as u64 + 1 } else { NIL };
            link.store(next, Ordering::Relaxed);
        }
        w[HEAD_WORD].store(if buffers > 0 { 0 } else { NIL }, Ordering::Relaxed);
        w[FREE_WORD].store(buffers as u64, Ordering::Release);
        Staging {
            words,
            buffers,
            reserve,
        }
    }

    fn states(&self) -> &[AtomicU64] {
        &self.words.as_ref()[FIRST_STATE..FIRST_STATE + self.buffers]
    }

    fn free_word(&self) -> &AtomicU64 {
        &self.words.as_ref()[FREE_WORD]
    }

    fn link(&self, buffer: usize) -> &AtomicU64 {
        &self.words.as_ref()[FIRST_STATE + self.buffers + buffer]
    }

    /// Pops the free stack; the caller has counted a free buffer, which
    /// is on the stack (pushes come before the count goes up).
    fn pop_free(&self) -> usize {
        let head = &self.words.as_ref()[HEAD_WORD];
        let mut h = head.load(Ordering::Acquire);
        loop {
            let top = h & NIL;
            assert_ne!(top, NIL, "a counted free buffer is not on the stack");
            let next = self.link(top as usize).load(Ordering::Acquire);
            let new = ((h >> 32).wrapping_add(1) << 32) | next;
            match head.compare_exchange_weak(h, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return top as usize,
                Err(now) => h = now,
            }
        }
    }

    fn push_free(&self, buffer: usize) {
        let head = &self.words.as_ref()[HEAD_WORD];
        let mut h = head.load(Ordering::Acquire);
        loop {
            self.link(buffer).store(h & NIL, Ordering::Release);
            let new = ((h >> 32).wrapping_add(1) << 32) | buffer as u64;
            match head.compare_exchange_weak(h, new, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return,
                Err(now) => h = now,
            }
        }
    }

    /// Buffers in all.
    pub fn len(&self) -> usize {
        self.buffers
    }

    /// The storage holding the states.
    pub fn storage(&self) -> &W {
        &self.words
    }

    /// Whether there are no buffers (never: `new` needs more than the reserve).
    pub fn is_empty(&self) -> bool {
        self.buffers == 0
    }

    /// Buffers kept for [`Claimant::MustNotWait`].
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    /// Buffers free now.
    pub fn free(&self) -> usize {
        self.free_word().load(Ordering::Acquire) as usize
    }

    /// Takes a free buffer for filling, or `None` if none is left for `who`.
    pub fn claim(&self, who: Claimant) -> Option<usize> {
        let floor = match who {
            Claimant::MayWait => self.reserve,
            Claimant::MustNotWait => 0,
        };
        // Count first, so concurrent claims never take more than is free.
        self.free_word()
            .try_update(Ordering::AcqRel, Ordering::Acquire, |f| {
                (f > floor as u64).then(|| f - 1)
            })
            .ok()?;
        let buffer = self.pop_free();
        let previous = self.states()[buffer].swap(FILLING, Ordering::AcqRel);
        assert_eq!(previous, FREE, "the free stack held a buffer in use");
        Some(buffer)
    }

    /// Marks a filled buffer as holding `slot`'s page, ready for the writer.
    pub fn publish(&self, buffer: usize, slot: u64) {
        let previous = self.states()[buffer].swap(slot + STAGED, Ordering::AcqRel);
        assert_eq!(
            previous, FILLING,
            "published a buffer that was not being filled"
        );
    }

    /// Moves the (up to) `max` staged buffers with the lowest slots to
    /// writing and appends them as (buffer, slot) to `out`, in no
    /// particular order. The lowest slots, not the first buffers: copiers
    /// stage runs of consecutive slots that a disk takes in one request,
    /// and buffers are reused in whatever order they were freed. `out`
    /// briefly holds every staged buffer: with room for [`Self::len`] more
    /// entries it does not allocate.
    pub fn take(&self, max: usize, out: &mut Vec<(usize, u64)>) {
        let first = out.len();
        out.extend(self.states().iter().enumerate().filter_map(|(i, state)| {
            let s = state.load(Ordering::Acquire);
            (s >= STAGED).then(|| (i, s - STAGED))
        }));
        let candidates = &mut out[first..];
        if candidates.len() > max {
            candidates.select_nth_unstable_by_key(max, |&(_, slot)| slot);
            out.truncate(first + max);
        }
        // Only the writer moves a buffer out of `Staged`, so these succeed;
        // the check keeps a second taker from ever sharing a buffer.
        let mut kept = first;
        for k in first..out.len() {
            let (i, slot) = out[k];
            if self.states()[i]
                .compare_exchange(slot + STAGED, WRITING, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                out[kept] = (i, slot);
                kept += 1;
            }
        }
        out.truncate(kept);
    }

    /// The buffer staged with `slot`'s page, if one is (a linear scan: for
    /// the few lookups made while the writer cannot run).
    pub fn find(&self, slot: u64) -> Option<usize> {
        self.states()
            .iter()
            .position(|s| s.load(Ordering::Acquire) == slot + STAGED)
    }

    /// Frees a buffer the writer has written.
    pub fn release(&self, buffer: usize) {
        let previous = self.states()[buffer].swap(FREE, Ordering::AcqRel);
        assert_eq!(
            previous, WRITING,
            "released a buffer that was not being written"
        );
        self.push_free(buffer);
        self.free_word().fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::collections::BTreeSet;
    use alloc::vec;
    use proptest::prelude::*;

    fn staging(buffers: usize, reserve: usize) -> Staging<Vec<AtomicU64>> {
        let words = (0..Staging::<Vec<AtomicU64>>::words_for(buffers))
            .map(|_| AtomicU64::new(7))
            .collect();
        Staging::new(words, buffers, reserve)
    }

    #[test]
    fn the_reserve_is_only_for_those_who_cannot_wait() {
        let s = staging(4, 2);
        let a = s.claim(Claimant::MayWait).unwrap();
        let b = s.claim(Claimant::MayWait).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.claim(Claimant::MayWait), None, "only the reserve is left");
        let c = s.claim(Claimant::MustNotWait).unwrap();
        let d = s.claim(Claimant::MustNotWait).unwrap();
        assert_eq!(s.claim(Claimant::MustNotWait), None);
        for (buf, slot) in [(a, 10), (b, 11), (c, 12), (d, 13)] {
            s.publish(buf, slot);
        }
        assert_eq!(s.find(12), Some(c));
        assert_eq!(s.find(14), None);
        let mut out = vec![];
        s.take(3, &mut out);
        assert_eq!(out.len(), 3);
        s.take(10, &mut out);
        let slots: BTreeSet<u64> = out.iter().map(|&(_, slot)| slot).collect();
        assert_eq!(slots, BTreeSet::from([10, 11, 12, 13]));
        assert_eq!(s.claim(Claimant::MustNotWait), None, "written is not free");
        for &(buf, _) in &out {
            s.release(buf);
        }
        assert_eq!(s.free(), 4, "nothing is staged, filled or written");
    }

    #[test]
    fn the_writer_takes_the_lowest_slots_whatever_the_buffers() {
        let s = staging(6, 1);
        // Buffers filled in an order unrelated to their slots, as after
        // the writer has freed them in its own order.
        for slot in [40, 3, 41, 7, 5] {
            let buf = s.claim(Claimant::MayWait).unwrap();
            s.publish(buf, slot);
        }
        let mut out = vec![];
        s.take(3, &mut out);
        let mut slots: Vec<u64> = out.iter().map(|&(_, slot)| slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, [3, 5, 7]);
        s.take(3, &mut out);
        assert_eq!(out.len(), 5, "the rest, once");
        assert_eq!(s.find(40), None, "taken buffers are no longer staged");
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A copier claims and fills a buffer for the next slot.
        Copy(bool),
        /// A copier claims, and is interrupted before publishing.
        Start(bool),
        /// An interrupted copier publishes.
        Finish,
        /// The writer takes up to n buffers.
        Take(usize),
        /// The writer releases what it took.
        Release,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            any::<bool>().prop_map(Step::Copy),
            any::<bool>().prop_map(Step::Start),
            Just(Step::Finish),
            (1usize..6).prop_map(Step::Take),
            Just(Step::Release),
        ]
    }

    proptest! {
        /// Random interleavings of copiers (some interrupted between claim
        /// and publish, as a fault handler interrupts a copier) and the
        /// writer: every published slot reaches the writer exactly once, no
        /// buffer is held twice, the free count is exact, and ordinary
        /// claims never dig into the reserve.
        #[test]
        fn every_slot_reaches_the_writer_once(
            buffers in 2usize..12,
            reserve in 0usize..2,
            steps in prop::collection::vec(step(), 1..200),
        ) {
            let s = staging(buffers, reserve.min(buffers - 1));
            let reserve = reserve.min(buffers - 1);
            let mut next_slot = 0u64;
            let mut filling: Vec<(usize, u64)> = vec![];
            let mut taken: Vec<(usize, u64)> = vec![];
            let mut published = BTreeSet::new();
            let mut written = BTreeSet::new();
            let mut held = BTreeSet::new();
            for st in steps {
                match st {
                    Step::Copy(wait) | Step::Start(wait) => {
                        let who = if wait { Claimant::MayWait } else { Claimant::MustNotWait };
                        let free_before = s.free();
                        match s.claim(who) {
                            Some(buf) => {
                                prop_assert!(held.insert(buf), "buffer {} handed out twice", buf);
                                if who == Claimant::MayWait {
                                    prop_assert!(free_before > reserve);
                                }
                                if matches!(st, Step::Copy(_)) {
                                    s.publish(buf, next_slot);
                                    published.insert(next_slot);
                                } else {
                                    filling.push((buf, next_slot));
                                }
                                next_slot += 1;
                            }
                            None => {
                                let floor = if wait { reserve } else { 0 };
                                prop_assert!(free_before <= floor);
                            }
                        }
                    }
                    Step::Finish => {
                        if let Some((buf, slot)) = filling.pop() {
                            s.publish(buf, slot);
                            published.insert(slot);
                        }
                    }
                    Step::Take(n) => {
                        let before = taken.len();
                        s.take(n, &mut taken);
                        prop_assert!(taken.len() - before <= n);
                        for &(_, slot) in &taken[before..] {
                            prop_assert!(published.contains(&slot));
                            prop_assert!(written.insert(slot), "slot {} taken twice", slot);
                        }
                    }
                    Step::Release => {
                        for (buf, _) in taken.drain(..) {
                            s.release(buf);
                            held.remove(&buf);
                        }
                    }
                }
                prop_assert_eq!(s.free(), buffers - held.len());
            }
            // Drain everything: all published slots arrive.
            for (buf, slot) in filling.drain(..) {
                s.publish(buf, slot);
                published.insert(slot);
            }
            s.take(usize::MAX, &mut taken);
            for &(_, slot) in &taken {
                written.insert(slot);
            }
            prop_assert_eq!(written, published);
        }
    }
}
