//! Compact backup of a thin-provisioned qcow2 disk, and its restore.
//!
//! The backup follows the method step by step:
//!
//! 1. **Table 1** is the source's own L1/L2 tables ([`qcow2::open`]).
//! 2. **Table 2** maps each virtual cluster holding data to a cluster of a
//!    dense *copy area* on a scratch disk, in virtual order, with unused
//!    entries dropped ([`table2`]). The copy area is sized to the data.
//! 3. **Table 3** maps each copy cluster to the block of the medium that
//!    will hold it ([`tape::Layout::table3`]).
//! 4. **Copy**: each data cluster is read from the source (where table 1
//!    says) and written to the copy area (where table 2 says).
//! 5. **Stream**: header, table 1, table 2, then the copy area extent by
//!    extent (where table 3 says) and a trailer go to the medium in one
//!    sequential pass, followed by a flush.
//!
//! [`restore`] reads the medium front to back, checks every checksum and
//! table, and writes a raw image or a fresh qcow2 image.
//!
//! The engine works on [`BlockDevice`](crate::devices::block::BlockDevice)s, so host tests run it on
//! in-memory disks and the kernel on virtio-blk disks. It must never write
//! to the source, and never write the medium anywhere but at the end of
//! what it has written so far.
//!
//! The subsystem's parts: [`qcow2`] reads (and, for restore, lays out) qcow2
//! images, [`tape`] is the medium format, [`engine`] runs the steps.

pub mod engine;
pub mod qcow2;
pub mod run;
pub mod tape;

pub use engine::{
    backup, restore, table2, BackupSummary, Error, Format, Front, Plan, Progress, RestoreSummary,
    Stage,
};
