//! Which physical frames a snapshot covers, and the dense slot of each.
//!
//! The copy-once engine numbers its units densely; the range index is the
//! bridge from frames (what a fault or the allocator names) to slots (what
//! the engine and the storage use) and back. It is built before the
//! instant and read-only afterwards, so the fault path only reads it; it
//! must never allocate after [`RangeIndex::seal`].

use alloc::vec;
use alloc::vec::Vec;

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

    /// The frame of `slot`, if the range has that many frames: the
    /// inverse of [`Self::slot`], by binary search over the words.
    pub fn frame(&self, slot: u64) -> Option<u64> {
        if slot >= self.len {
            return None;
        }
        // The last word with at most `slot` included frames before it.
        let word = self.words.partition_point(|&[_, before]| before <= slot) - 1;
        let [mut bits, before] = self.words[word];
        for _ in 0..slot - before {
            bits &= bits - 1;
        }
        Some(word as u64 * 64 + u64::from(bits.trailing_zeros()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
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
