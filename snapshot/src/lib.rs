//! Hardware-independent logic of the snapshot kernel.
//!
//! Everything here is plain `no_std` Rust with no `unsafe`, so it builds and is
//! tested on the host (`cargo test -p snapshot`) as well as linked into the
//! kernel. The kernel supplies the hardware behind small interfaces: physical
//! memory, page tables, interrupts and devices.
//!
//! This crate must never touch hardware, assume it runs in ring 0, or allocate
//! on a path the kernel calls from an interrupt or fault handler.
//!
//! The crate is grouped by subsystem:
//! - [`memsnap`]: the live memory snapshot (range index, lifecycle, staging
//!   for snapshots to disk, ELF core files);
//! - [`copyonce`]: the copy-once engine the live snapshot and the split
//!   techniques share (copy each unit exactly once after an instant, by an
//!   access or a background copier, and pace that copier);
//! - [`mirror`]: the quick-split mirror (a mirrored pair's controller:
//!   durable differential bitmap, split, copy before write, backup of the
//!   split instant, resync);
//! - [`devices`]: the block-device interface, PCI decoding, virtio and the
//!   virtio-blk driver (with a fake device for tests);
//! - [`backup`]: the qcow2 reader, the backup medium and the backup/restore
//!   engine;
//! - [`qcow2`]: qcow2 images as read-write block devices over a backing
//!   chain, clone creation and the online clone split;
//! - [`policy`]: the pure decisions behind the kernel's mechanisms (frame
//!   allocation, scheduling, page-fault classification);
//! - [`interface`]: what the host tool and the kernel share (command line,
//!   trace format, sizes);
//! - [`support`]: small utilities (a PRNG, fallible allocation).
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;

#[cfg(test)]
extern crate std;

pub mod backup;
pub mod copyonce;
pub mod devices;
pub mod interface;
pub mod memsnap;
pub mod mirror;
pub mod policy;
pub mod qcow2;
pub mod support;
