//! Hardware-independent logic of the snapshot kernel.
//!
//! Everything here is plain `no_std` Rust with no `unsafe`, so it builds and is
//! tested on the host (`cargo test -p snapshot`) as well as linked into the
//! kernel. The kernel supplies the hardware behind small interfaces: physical
//! memory, page tables, interrupts and devices.
//!
//! This crate must never touch hardware, assume it runs in ring 0, or allocate
//! on a path the kernel calls from an interrupt or fault handler.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod backup;
pub mod block;
pub mod cmdline;
pub mod copyonce;
pub mod elfcore;
pub mod fault;
pub mod frames;
pub mod memsnap;
pub mod pci;
pub mod qcow2;
pub mod rng;
pub mod sched;
pub mod staging;
pub mod tape;
pub mod trace;
pub mod units;
pub mod virtio;

/// `len` copies of `value`, or `None` instead of an abort when memory is
/// short (or `len` does not fit in memory at all): for buffers whose size
/// comes from a disk image or medium.
pub(crate) fn try_filled<T: Clone>(len: u64, value: T) -> Option<alloc::vec::Vec<T>> {
    let len = usize::try_from(len).ok()?;
    let mut v = alloc::vec::Vec::new();
    v.try_reserve_exact(len).ok()?;
    v.resize(len, value);
    Some(v)
}
