//! Compact backup of a thin-provisioned qcow2 disk, and its restore.
//!
//! The backup follows the method step by step:
//!
//! 1. **Table 1** is the source's own L1/L2 tables, walked from the
//!    source a window at a time ([`source::Walk`]).
//! 2. **Table 2** maps each virtual cluster holding data to a cluster of a
//!    dense *copy area*, in virtual order, with unused entries dropped
//!    ([`run::CopyRuns`]). The copy area is sized to the data; it is a
//!    numbering, held a window at a time in memory, never written to a
//!    disk (until 2026-11-30 it was written to a scratch disk and, before
//!    that, read back from it: a disk crossing nothing needed).
//! 3. **Table 3** maps each copy cluster to the block of the medium that
//!    will hold it ([`tape::Layout::extent`]).
//! 4. **Copy**: each data cluster is read from the source (where table 1
//!    says) into a window of the copy area in memory (where table 2 says).
//! 5. **Stream**: header, table 1 (its data runs only), then the copy
//!    area's contents extent by extent (where table 3 says), from that
//!    window in memory, and a trailer go to the medium in one sequential
//!    pass, followed by a flush.
//!
//! [`restore`](fn@restore) reads the medium front to back, checks every checksum and
//! table, and writes a raw image or a fresh qcow2 image.
//!
//! Memory is bounded by design: no table is ever held whole, only
//! windows of it, so neither the virtual size nor the size of the tables
//! changes what a job needs. A backup needs [`engine::backup_memory`]
//! (a few MiB, plus two bits per host cluster of the source file while it
//! is checked); a restore [`engine::restore_memory`]. The kernel refuses
//! a job it cannot give that much before the job starts.
//!
//! The engine works on [`BlockDevice`](crate::devices::block::BlockDevice)s, so host tests run it on
//! in-memory disks and the kernel on virtio-blk disks. It must never write
//! to the source, and never write the medium anywhere but at the end of
//! what it has written so far.
//!
//! The subsystem's parts: [`qcow2`] decodes qcow2 headers and entries,
//! [`source`] walks and checks a source image, [`newimage`] lays out and
//! writes a new qcow2 image, [`tape`] is the medium's frame, [`table`]
//! its tables, [`engine`] and [`restore`](mod@restore) run the steps;
//! [`volume`] streams a raw volume whole (the mirror's backup).

pub mod ahead;
pub mod copy;
pub mod decode;
pub mod engine;
pub mod error;
mod io;
pub mod newimage;
pub mod pipe;
pub mod qcow2;
pub mod restore;
pub mod run;
pub mod source;
pub mod table;
pub mod tape;
pub mod volume;

pub use engine::{
    backup, backup_memory, backup_overlapped, guest_heap_bytes, mem_for_heap, restore_memory,
    BackupSummary, Error, InTurn, Overlap, Plan, Progress, Stage, KERNEL_HEAP_USE, KERNEL_JOB_USE,
};
pub use restore::{restore, Format, Front, RestoreSummary};
