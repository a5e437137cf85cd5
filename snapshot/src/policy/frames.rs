//! Physical frame allocator: one bit per 4 KiB frame of physical memory.
//!
//! The kernel carves the bitmap out of RAM at boot, marks the usable ranges of
//! the firmware memory map free and reserves what it already occupies (its
//! image, the bitmap itself). A set bit means "not available": allocated, or
//! not RAM at all. Allocation is first-fit from a moving hint, so successive
//! allocations are cheap, and contiguous runs can be asked for (DMA buffers,
//! snapshot storage).
//!
//! It must never hand out a frame twice, never hand out a frame outside the
//! ranges declared free, and never panic on a bad free: a double or foreign
//! free is an error value the caller reports. To tell "allocated" from "never
//! ours" (firmware, MMIO holes, the kernel image), a second bitmap records
//! which frames the allocator manages.

use core::fmt;

/// Bytes in one frame.
pub const FRAME_SIZE: u64 = 4096;

/// A free that the allocator refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The address is not frame-aligned.
    Unaligned(u64),
    /// The address lies beyond the memory the bitmap covers.
    OutOfRange(u64),
    /// The frame was not allocated (a double free).
    NotAllocated(u64),
    /// The frame is not memory this allocator manages (firmware, MMIO, the
    /// kernel image).
    NotManaged(u64),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::Unaligned(a) => write!(f, "frame address {a:#x} is not 4 KiB aligned"),
            FrameError::OutOfRange(a) => {
                write!(f, "frame address {a:#x} is beyond physical memory")
            }
            FrameError::NotAllocated(a) => write!(f, "frame {a:#x} was not allocated"),
            FrameError::NotManaged(a) => write!(f, "frame {a:#x} is not managed memory"),
        }
    }
}

/// The allocator's state. Frames are numbered from physical address 0.
#[derive(Debug)]
pub struct FrameBitmap<'a> {
    /// Bit set: not available (allocated, reserved, or not RAM).
    words: &'a mut [u64],
    /// Bit set: RAM the allocator manages (declared free, not reserved).
    managed_bits: &'a mut [u64],
    frames: u64,
    free: u64,
    /// Index of the first word that may have a clear bit.
    hint: usize,
    /// Frames of RAM the allocator manages.
    managed: u64,
}

impl<'a> FrameBitmap<'a> {
    /// Words of storage needed (both bitmaps) to cover physical memory up to
    /// `end` bytes.
    pub fn words_for(end: u64) -> usize {
        2 * end.div_ceil(FRAME_SIZE).div_ceil(64) as usize
    }

    /// Wraps `storage` (all of which is overwritten) to cover frames up to
    /// `storage.len() / 2 * 64`. Every frame starts unavailable.
    pub fn new(storage: &'a mut [u64]) -> Self {
        let half = storage.len() / 2;
        let (words, rest) = storage.split_at_mut(half);
        let managed_bits = &mut rest[..half];
        words.fill(u64::MAX);
        managed_bits.fill(0);
        let frames = half as u64 * 64;
        FrameBitmap {
            words,
            managed_bits,
            frames,
            free: 0,
            hint: 0,
            managed: 0,
        }
    }

    /// Declares RAM in `[start, end)` free; the range is shrunk inward to
    /// whole frames and clipped to the bitmap. Frames already free stay free.
    pub fn add_free_range(&mut self, start: u64, end: u64) {
        let first = start.div_ceil(FRAME_SIZE);
        let last = (end / FRAME_SIZE).min(self.frames);
        for frame in first..last {
            if !self.is_managed(frame) {
                self.clear(frame);
                self.set_managed(frame, true);
                self.free += 1;
                self.managed += 1;
            }
        }
        self.hint = 0;
    }

    /// Takes `[start, end)`, grown outward to whole frames, out of the
    /// allocator's hands for good: memory that is RAM but already in use (the
    /// kernel image, firmware data). Frames in it can never be freed.
    pub fn reserve_range(&mut self, start: u64, end: u64) {
        let first = start / FRAME_SIZE;
        let last = end.div_ceil(FRAME_SIZE).min(self.frames);
        for frame in first..last {
            if self.is_managed(frame) {
                if !self.test(frame) {
                    self.free -= 1;
                }
                self.set(frame);
                self.set_managed(frame, false);
                self.managed -= 1;
            }
        }
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free
    }

    /// Frames of RAM this allocator manages (free or handed out).
    pub fn managed_frames(&self) -> u64 {
        self.managed
    }

    /// One past the last physical address the bitmap covers.
    pub fn end(&self) -> u64 {
        self.frames * FRAME_SIZE
    }

    /// Hands out one free frame and returns its physical address.
    pub fn alloc(&mut self) -> Option<u64> {
        let start = self.hint;
        for index in (start..self.words.len()).chain(0..start) {
            let word = self.words[index];
            if word != u64::MAX {
                let bit = word.trailing_ones() as u64;
                let frame = index as u64 * 64 + bit;
                self.set(frame);
                self.free -= 1;
                self.hint = index;
                return Some(frame * FRAME_SIZE);
            }
        }
        None
    }

    /// Hands out `count` physically contiguous frames whose first frame
    /// number is a multiple of `align` frames; returns the first address.
    pub fn alloc_contiguous(&mut self, count: u64, align: u64) -> Option<u64> {
        if count == 0 || align == 0 || count > self.free {
            return None;
        }
        let mut first = 0;
        while first + count <= self.frames {
            match (first..first + count).rev().find(|&f| self.test(f)) {
                // A used frame inside the window: restart just past it.
                Some(used) => first = (used + 1).next_multiple_of(align),
                None => {
                    for frame in first..first + count {
                        self.set(frame);
                    }
                    self.free -= count;
                    return Some(first * FRAME_SIZE);
                }
            }
        }
        None
    }

    /// Returns one frame. A frame that is not allocated is refused, so a
    /// double free is caught instead of corrupting the free count.
    pub fn free(&mut self, addr: u64) -> Result<(), FrameError> {
        let frame = self.frame_of(addr)?;
        if !self.is_managed(frame) {
            return Err(FrameError::NotManaged(addr));
        }
        if !self.test(frame) {
            return Err(FrameError::NotAllocated(addr));
        }
        self.clear(frame);
        self.free += 1;
        self.hint = self.hint.min((frame / 64) as usize);
        Ok(())
    }

    fn frame_of(&self, addr: u64) -> Result<u64, FrameError> {
        if !addr.is_multiple_of(FRAME_SIZE) {
            return Err(FrameError::Unaligned(addr));
        }
        let frame = addr / FRAME_SIZE;
        if frame >= self.frames {
            return Err(FrameError::OutOfRange(addr));
        }
        Ok(frame)
    }

    fn test(&self, frame: u64) -> bool {
        self.words[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    fn set(&mut self, frame: u64) {
        self.words[(frame / 64) as usize] |= 1 << (frame % 64);
    }

    fn clear(&mut self, frame: u64) {
        self.words[(frame / 64) as usize] &= !(1 << (frame % 64));
    }

    fn is_managed(&self, frame: u64) -> bool {
        self.managed_bits[(frame / 64) as usize] & (1 << (frame % 64)) != 0
    }

    fn set_managed(&mut self, frame: u64, managed: bool) {
        let word = &mut self.managed_bits[(frame / 64) as usize];
        if managed {
            *word |= 1 << (frame % 64);
        } else {
            *word &= !(1 << (frame % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;
    use std::vec;
    use std::vec::Vec;

    const MIB: u64 = 1 << 20;

    #[test]
    fn hands_out_only_declared_ram() {
        let mut words = vec![0; FrameBitmap::words_for(4 * MIB)];
        let mut bitmap = FrameBitmap::new(&mut words);
        bitmap.add_free_range(MIB + 100, 2 * MIB); // inward: starts at MIB + 4K
        let reserved = MIB + 2 * FRAME_SIZE..MIB + 4 * FRAME_SIZE + 1; // outward: 3 frames
        bitmap.reserve_range(reserved.start, reserved.end);
        assert_eq!(bitmap.managed_frames(), 255 - 3);
        let got: Vec<u64> = core::iter::from_fn(|| bitmap.alloc()).collect();
        assert_eq!(got.len() as u64, 255 - 3);
        assert!(got.iter().all(|a| (MIB + FRAME_SIZE..2 * MIB).contains(a)));
        assert!(got
            .iter()
            .all(|&a| a + FRAME_SIZE <= reserved.start || a >= MIB + 5 * FRAME_SIZE));
        assert_eq!(bitmap.free_frames(), 0);
        assert_eq!(bitmap.free(MIB), Err(FrameError::NotManaged(MIB)));
        assert_eq!(
            bitmap.free(reserved.start),
            Err(FrameError::NotManaged(reserved.start))
        );
    }

    #[test]
    fn refuses_double_and_foreign_frees() {
        let mut words = vec![0; 2];
        let mut bitmap = FrameBitmap::new(&mut words);
        bitmap.add_free_range(0, 64 * FRAME_SIZE);
        let a = bitmap.alloc().unwrap();
        assert_eq!(bitmap.free(a), Ok(()));
        assert_eq!(bitmap.free(a), Err(FrameError::NotAllocated(a)));
        assert_eq!(bitmap.free(a + 1), Err(FrameError::Unaligned(a + 1)));
        let beyond = 64 * FRAME_SIZE;
        assert_eq!(bitmap.free(beyond), Err(FrameError::OutOfRange(beyond)));
        assert_eq!(bitmap.free_frames(), 64);
    }

    #[test]
    fn contiguous_runs_respect_alignment_and_holes() {
        let mut words = vec![0; 8];
        let mut bitmap = FrameBitmap::new(&mut words);
        bitmap.add_free_range(0, 256 * FRAME_SIZE);
        bitmap.reserve_range(3 * FRAME_SIZE, 4 * FRAME_SIZE);
        let run = bitmap.alloc_contiguous(8, 8).unwrap();
        assert_eq!(run, 8 * FRAME_SIZE);
        assert!(bitmap.alloc_contiguous(300, 1).is_none());
        for frame in 0..8 {
            assert_eq!(bitmap.free(run + frame * FRAME_SIZE), Ok(()));
        }
        assert_eq!(bitmap.free_frames(), 255);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Alloc,
        AllocRun(u64, u64),
        Free(usize),
        FreeBogus(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Alloc),
            1 => (1u64..20, prop_oneof![Just(1u64), Just(8), Just(16)])
                .prop_map(|(n, a)| Op::AllocRun(n, a)),
            3 => any::<usize>().prop_map(Op::Free),
            1 => (0u64..600).prop_map(|f| Op::FreeBogus(f * FRAME_SIZE)),
        ]
    }

    proptest! {
        /// Against a model set of handed-out frames: nothing is handed out
        /// twice, nothing outside the declared RAM, and the counts agree.
        #[test]
        fn never_hands_out_a_frame_twice(
            holes in proptest::collection::vec((0u64..512, 1u64..16), 0..6),
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let mut words = vec![0; FrameBitmap::words_for(512 * FRAME_SIZE)];
            let mut bitmap = FrameBitmap::new(&mut words);
            bitmap.add_free_range(16 * FRAME_SIZE, 500 * FRAME_SIZE);
            let mut ram: BTreeSet<u64> = (16..500).collect();
            for (start, len) in holes {
                bitmap.reserve_range(start * FRAME_SIZE, (start + len) * FRAME_SIZE);
                for f in start..start + len { ram.remove(&f); }
            }
            let mut held: Vec<u64> = Vec::new();
            let mut held_set = BTreeSet::new();
            for op in ops {
                match op {
                    Op::Alloc => match bitmap.alloc() {
                        Some(a) => {
                            prop_assert!(ram.contains(&(a / FRAME_SIZE)), "not RAM: {a:#x}");
                            prop_assert!(held_set.insert(a), "handed out twice: {a:#x}");
                            held.push(a);
                        }
                        None => prop_assert_eq!(held_set.len(), ram.len()),
                    },
                    Op::AllocRun(n, align) => {
                        if let Some(a) = bitmap.alloc_contiguous(n, align) {
                            prop_assert_eq!((a / FRAME_SIZE) % align, 0);
                            for f in 0..n {
                                let addr = a + f * FRAME_SIZE;
                                prop_assert!(ram.contains(&(addr / FRAME_SIZE)));
                                prop_assert!(held_set.insert(addr), "run overlaps: {addr:#x}");
                                held.push(addr);
                            }
                        }
                    }
                    Op::Free(i) if !held.is_empty() => {
                        let a = held.swap_remove(i % held.len());
                        held_set.remove(&a);
                        prop_assert_eq!(bitmap.free(a), Ok(()));
                    }
                    Op::Free(_) => {}
                    Op::FreeBogus(a) => {
                        if !held_set.contains(&a) {
                            prop_assert!(bitmap.free(a).is_err());
                        }
                    }
                }
                prop_assert_eq!(bitmap.free_frames(), (ram.len() - held_set.len()) as u64);
            }
        }
    }
}
