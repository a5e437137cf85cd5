//! The copy map's encoding: two bits per unit, 32 units per atomic word.
//!
//! Bit `2k` of a word is *claimed* and bit `2k + 1` is *copied*, for the
//! word's unit `k`. The three states are `00` not copied, `01` copying and
//! `11` copied; `10` never occurs. Keeping both bits of a unit in one word
//! means every transition is a single read-modify-write (`fetch_or` or
//! `fetch_and`), never a compare-and-swap loop, and the claim tells in the
//! same instruction whether it won, lost to a copy in progress, or came
//! after the copy.
//!
//! This module only encodes; it never orders memory by itself (the engine
//! picks each operation's ordering) and never allocates.

use core::sync::atomic::{AtomicU64, Ordering};

/// Units per word.
pub const UNITS_PER_WORD: u64 = 32;

/// Every unit's *claimed* bit.
pub(super) const CLAIMED_BITS: u64 = 0x5555_5555_5555_5555;
/// Every unit's *copied* bit.
pub(super) const COPIED_BITS: u64 = 0xaaaa_aaaa_aaaa_aaaa;

/// A 64-bit atomic word as the engine uses it. Implemented for
/// [`core::sync::atomic::AtomicU64`]; a model checker's atomic (for example
/// loom's) implements it in tests, so the same engine code is checked.
pub trait AtomicWord {
    /// Loads the value.
    fn load(&self, order: Ordering) -> u64;
    /// Stores `value`.
    fn store(&self, value: u64, order: Ordering);
    /// Sets `bits`, returning the previous value.
    fn fetch_or(&self, bits: u64, order: Ordering) -> u64;
    /// Keeps only `bits`, returning the previous value.
    fn fetch_and(&self, bits: u64, order: Ordering) -> u64;
}

impl AtomicWord for AtomicU64 {
    fn load(&self, order: Ordering) -> u64 {
        AtomicU64::load(self, order)
    }
    fn store(&self, value: u64, order: Ordering) {
        AtomicU64::store(self, value, order);
    }
    fn fetch_or(&self, bits: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_or(self, bits, order)
    }
    fn fetch_and(&self, bits: u64, order: Ordering) -> u64 {
        AtomicU64::fetch_and(self, bits, order)
    }
}

/// Where a unit is in the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nobody has copied it (or the last attempt was abandoned).
    NotCopied,
    /// Claimed: one copier is copying it now.
    Copying,
    /// Copied; the copy is complete and will not change.
    Copied,
}

impl State {
    /// The state of the unit whose bits sit at `shift` in `word`.
    pub(super) fn decode(word: u64, shift: u32) -> State {
        match (word >> shift) & 0b11 {
            0b00 => State::NotCopied,
            0b01 => State::Copying,
            _ => State::Copied,
        }
    }
}

/// Words needed for a map of `units` units.
pub const fn words_for(units: u64) -> usize {
    units.div_ceil(UNITS_PER_WORD) as usize
}

/// The word index and bit shift of `unit`.
pub(super) fn locate(unit: u64) -> (usize, u32) {
    (
        (unit / UNITS_PER_WORD) as usize,
        (2 * (unit % UNITS_PER_WORD)) as u32,
    )
}

/// The first unit in `[from, end)` whose claimed bit is clear in `word`,
/// where `from` and `end - 1` lie in the word `word` was loaded from.
pub(super) fn first_unclaimed(word: u64, from: u64, end: u64) -> Option<u64> {
    let base = from - from % UNITS_PER_WORD;
    let low = 2 * (from - base);
    let high = 2 * (end - base);
    let mut window = CLAIMED_BITS & (u64::MAX << low);
    if high < 64 {
        window &= (1 << high) - 1;
    }
    let free = !word & window;
    (free != 0).then(|| base + u64::from(free.trailing_zeros()) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_decode_from_their_bits() {
        let word = 0b11_01_00 << 2;
        assert_eq!(State::decode(word, 0), State::NotCopied);
        assert_eq!(State::decode(word, 2), State::NotCopied);
        assert_eq!(State::decode(word, 4), State::Copying);
        assert_eq!(State::decode(word, 6), State::Copied);
        assert_eq!(locate(33), (1, 2));
        assert_eq!(words_for(0), 0);
        assert_eq!(words_for(32), 1);
        assert_eq!(words_for(33), 2);
    }

    #[test]
    fn first_unclaimed_honours_both_ends() {
        // Units 0 and 1 claimed; 2 free; 3 copied; the rest free.
        let word = 0b11_00_01_01;
        assert_eq!(first_unclaimed(word, 0, 32), Some(2));
        assert_eq!(first_unclaimed(word, 3, 32), Some(4));
        assert_eq!(first_unclaimed(word, 0, 2), None);
        assert_eq!(
            first_unclaimed(word, 64, 66),
            None,
            "word 2's units 64 and 65"
        );
        assert_eq!(first_unclaimed(0b01, 64, 66), Some(65));
        assert_eq!(first_unclaimed(u64::MAX, 0, 32), None);
        assert_eq!(first_unclaimed(CLAIMED_BITS >> 2, 0, 32), Some(31));
        assert_eq!(first_unclaimed(CLAIMED_BITS >> 2, 0, 31), None);
    }
}
