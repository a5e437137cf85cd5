//! Small utilities the subsystems share: a deterministic PRNG and fallible
//! allocation for buffers whose size comes from untrusted input.
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
