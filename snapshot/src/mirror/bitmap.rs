//! One bitmap area in memory: the bits as the controller means them now
//! (`mem`), the bits as last written to the controller disk (`disk`), and
//! which sectors of the area are being written. The controller keeps two
//! areas (see [`super::layout`]) behind its lock; the write-intent
//! protocol that keeps `disk` a superset of what a crash must not forget
//! is in the controller, which does the I/O.
//!
//! Plain data: this module never locks, allocates after construction, or
//! touches a device.

use alloc::vec::Vec;

use super::layout::BLOCKS_PER_SECTOR;

/// Words of 64 bits in one bitmap sector.
pub const WORDS_PER_SECTOR: usize = (BLOCKS_PER_SECTOR / 64) as usize;

/// One bitmap area.
#[derive(Debug, Clone)]
pub struct Area {
    mem: Vec<u64>,
    disk: Vec<u64>,
    writing: Vec<bool>,
    count: u64,
    blocks: u64,
}

impl Area {
    /// An area of `blocks` bits, all clear, in `sectors` sectors.
    pub fn new(blocks: u64, sectors: u64) -> Self {
        let words = sectors as usize * WORDS_PER_SECTOR;
        Area {
            mem: alloc::vec![0; words],
            disk: alloc::vec![0; words],
            writing: alloc::vec![false; sectors as usize],
            count: 0,
            blocks,
        }
    }

    /// Bytes an area of `sectors` sectors takes in memory.
    pub fn memory_bytes(sectors: u64) -> u64 {
        sectors * (2 * 512 + 1)
    }

    /// Blocks covered.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Set bits in `mem`.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether `block`'s bit is set in `mem`.
    pub fn get(&self, block: u64) -> bool {
        self.mem[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Whether `block`'s bit is set on disk (as last written).
    pub fn on_disk(&self, block: u64) -> bool {
        self.disk[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Sets `block`'s bit in `mem`; returns whether it was clear.
    pub fn set(&mut self, block: u64) -> bool {
        let w = &mut self.mem[(block / 64) as usize];
        let bit = 1 << (block % 64);
        let was_clear = *w & bit == 0;
        *w |= bit;
        // A branch, not `count += u64::from(was_clear)`: rustc 1.95's MIR
        // optimiser miscompiled that form once `set` was inlined into a
        // `&&` chain (the second call's increment was lost, release only;
        // rust-lang/rust#158206, fixed in the pinned toolchain; see
        // docs/testing.md). The release test run guards the rest.
        if was_clear {
            self.count += 1;
        }
        was_clear
    }

    /// Clears `block`'s bit in `mem`; returns whether it was set.
    pub fn clear(&mut self, block: u64) -> bool {
        let w = &mut self.mem[(block / 64) as usize];
        let bit = 1 << (block % 64);
        let was_set = *w & bit != 0;
        *w &= !bit;
        // A branch for the reason given in `set`.
        if was_set {
            self.count -= 1;
        }
        was_set
    }

    /// Sets every block's bit in `mem`.
    pub fn set_all(&mut self) {
        for b in 0..self.blocks {
            self.set(b);
        }
    }

    /// Clears `mem` and `disk` (the caller zeroes the area on disk).
    pub fn zero(&mut self) {
        self.mem.fill(0);
        self.disk.fill(0);
        self.count = 0;
    }

    /// Loads `mem` and `disk` from the area's bytes as read from disk,
    /// ignoring bits past the last block.
    pub fn load(&mut self, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(8).enumerate().take(self.mem.len()) {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            let v = u64::from_le_bytes(w) & self.valid_mask(i);
            self.mem[i] = v;
            self.disk[i] = v;
        }
        self.count = self.mem.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// The bits of word `i` that name blocks of the volume.
    fn valid_mask(&self, i: usize) -> u64 {
        let first = i as u64 * 64;
        match self.blocks.saturating_sub(first) {
            0 => 0,
            n if n >= 64 => u64::MAX,
            n => (1 << n) - 1,
        }
    }

    /// The first block at or after `from` whose `mem` bit is set, scanning
    /// to the end (no wrap).
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.blocks {
            return None;
        }
        let mut i = (from / 64) as usize;
        let mut w = self.mem[i] & (u64::MAX << (from % 64));
        loop {
            if w != 0 {
                let b = i as u64 * 64 + u64::from(w.trailing_zeros());
                return (b < self.blocks).then_some(b);
            }
            i += 1;
            if i >= self.mem.len() {
                return None;
            }
            w = self.mem[i];
        }
    }

    /// Whether sector `s` of the area is being written.
    pub fn is_writing(&self, s: u64) -> bool {
        self.writing[s as usize]
    }

    /// Marks sector `s` as being written (or done).
    pub fn set_writing(&mut self, s: u64, on: bool) {
        self.writing[s as usize] = on;
    }

    /// Records that sector `s` durably holds `bytes` (written and
    /// flushed).
    pub fn wrote(&mut self, s: u64, bytes: &[u8]) {
        let at = s as usize * WORDS_PER_SECTOR;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            self.disk[at + i] = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
    }

    /// Records that `bytes` were written to sector `s` but not flushed:
    /// the disk holds the old sector or the new, so only bits in both
    /// are known to be there. `disk` never claims a bit a crash could
    /// lose.
    pub fn wrote_unflushed(&mut self, s: u64, bytes: &[u8]) {
        let at = s as usize * WORDS_PER_SECTOR;
        for (i, chunk) in bytes.chunks(8).enumerate() {
            self.disk[at + i] &= u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
    }

    /// Sector `s` as it should be written: each word of `mem` passed
    /// through `word(index, mem word)`.
    pub fn sector_bytes(&self, s: u64, mut word: impl FnMut(usize, u64) -> u64) -> [u8; 512] {
        let mut out = [0u8; 512];
        let at = s as usize * WORDS_PER_SECTOR;
        for (k, chunk) in out.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&word(at + k, self.mem[at + k]).to_le_bytes());
        }
        out
    }

    /// Whether sector `s` on disk holds bits that `want` (as from
    /// [`Self::sector_bytes`]) does not: a lazy clear is due.
    pub fn stale(&self, s: u64, want: &[u8; 512]) -> bool {
        let at = s as usize * WORDS_PER_SECTOR;
        want.chunks(8).enumerate().any(|(k, chunk)| {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            self.disk[at + k] & !w != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_count_scan_and_round_trip_through_sector_bytes() {
        let mut a = Area::new(5000, 2);
        assert!(a.set(3) && a.set(4999) && !a.set(3));
        assert_eq!(a.count(), 2);
        assert_eq!(a.next_set(0), Some(3));
        assert_eq!(a.next_set(4), Some(4999));
        assert_eq!(a.next_set(5000), None);
        let s1 = a.sector_bytes(1, |_, w| w);
        assert!(!a.stale(1, &s1));
        a.wrote(1, &s1);
        assert!(a.on_disk(4999) && !a.on_disk(3));
        assert!(a.clear(4999) && !a.clear(4999));
        assert!(a.stale(1, &a.sector_bytes(1, |_, w| w)));
        let mut b = Area::new(5000, 2);
        let mut bytes = a.sector_bytes(0, |_, w| w).to_vec();
        bytes.extend_from_slice(&[0xff; 512]);
        b.load(&bytes);
        assert_eq!(b.count(), 1 + (5000 - 4096), "bits past the end ignored");
        assert!(b.on_disk(3) && b.get(4999) && !b.get(4));
        b.zero();
        assert_eq!((b.count(), b.next_set(0)), (0, None));
    }
}
