//! Small utilities the subsystems share: a deterministic PRNG, fallible
//! allocation for buffers whose size comes from untrusted input, and a
//! zero test for data.
//!
//! Nothing here may know about a subsystem.

pub mod rng;

/// `len` copies of `value`, or `None` instead of an abort when memory is
/// short (or `len` does not fit in memory at all): for buffers whose size
/// comes from a disk image or medium.
pub fn try_filled<T: Clone>(len: u64, value: T) -> Option<alloc::vec::Vec<T>> {
    let len = usize::try_from(len).ok()?;
    let mut v = alloc::vec::Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, value);
    Some(v)
}

/// Whether every byte of `bytes` is zero. It ORs 4 KiB at a time as
/// words and stops at the first block that is not zero: under the
/// emulator a byte loop (`iter().all(..)`) took 15 to 20 times as long
/// (231 to 337 ms for 64 MiB, against 11 to 18 ms), and a split runs it
/// on every cluster it copies.
pub fn is_zero(bytes: &[u8]) -> bool {
    let (blocks, rest) = bytes.as_chunks::<4096>();
    blocks.iter().all(|block| {
        let (words, _) = block.as_chunks::<8>();
        words.iter().fold(0, |acc, w| acc | u64::from_ne_bytes(*w)) == 0
    }) && rest.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::is_zero;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn is_zero_agrees_with_a_byte_loop(len in 0usize..9000, at in 0usize..9000, v in 1u8..) {
            let mut bytes = alloc::vec![0u8; len];
            prop_assert!(is_zero(&bytes));
            if at < len {
                bytes[at] = v;
            }
            prop_assert_eq!(is_zero(&bytes), bytes.iter().all(|&b| b == 0));
        }
    }
}
