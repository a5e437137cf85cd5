//! qcow2 images as block devices: read-write, over a backing chain of any
//! depth, and the online clone split.
//!
//! - [`disk::Qcow2Disk`] serves a qcow2 image held on any
//!   [`BlockDevice`] as a [`BlockDevice`] itself: reads of holes go down
//!   the backing chain (another `BlockDevice`: a qcow2 image or a raw
//!   one, read-only), writes allocate clusters, L2 tables and refcount
//!   blocks, and grow the refcount table, in QEMU's update order so that a
//!   crash at any write leaves an image without corruption.
//! - [`chain`] opens an image and its backing chain through a resolver
//!   that turns the names in the headers into devices, refusing missing
//!   files, loops, short backing images and unsupported features.
//! - [`create`] makes a new, empty clone naming its base.
//! - [`split`] fills the clone's holes from the chain while a workload
//!   goes on, on the [copy-once engine](crate::copyonce), then releases
//!   the backing file.
//! - [`flat`] shows a chain as one self-contained qcow2 file, which the
//!   compact backup backs up as the guest sees it;
//! - [`check`] is the validator the tests run after every crash;
//! - [`workload`] is the seeded workload the split scenario runs.
//!
//! The format's decoding (header, entry bits) is shared with the backup's
//! reader ([`crate::backup::qcow2`]). This module must never write to a
//! backing image, and never publish a pointer to a cluster before its
//! refcount and data are durable.

pub mod chain;
pub mod check;
pub mod create;
pub mod disk;
pub mod flat;
mod refcount;
mod spare;
pub mod split;
mod tables;
pub mod workload;

#[cfg(test)]
mod tests;

pub use crate::backup::qcow2::Qcow2Error;
pub use disk::Qcow2Disk;
pub use tables::Entry;

/// Results of this module.
pub type Result<T> = core::result::Result<T, Qcow2Error>;

/// The numbers every part needs, fixed when the image is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per cluster.
    pub cs: u64,
    /// log2 of `cs`.
    pub cluster_bits: u32,
    /// Entries per L2 table.
    pub l2_entries: u64,
    /// Guest-visible bytes.
    pub virtual_size: u64,
    /// Virtual clusters (the last may be partial).
    pub vclusters: u64,
    /// Bits per refcount.
    pub rc_bits: u64,
    /// Refcounts per refcount block.
    pub per_block: u64,
    /// Bytes of the device holding the image.
    pub file_len: u64,
    /// Whole clusters that fit on that device: allocation stops there.
    pub cap_clusters: u64,
    /// Host offset of the L1 table.
    pub l1_offset: u64,
    /// Bytes of the L1 table.
    pub l1_bytes: u64,
}

impl Geometry {
    fn new(h: &crate::backup::qcow2::Header, file_len: u64) -> Self {
        let cs = h.cluster_size();
        let rc_bits = u64::from(h.refcount_bits());
        Geometry {
            cs,
            cluster_bits: h.cluster_bits,
            l2_entries: cs / 8,
            virtual_size: h.virtual_size,
            vclusters: h.virtual_clusters(),
            rc_bits,
            per_block: cs * 8 / rc_bits,
            file_len,
            cap_clusters: file_len / cs,
            l1_offset: h.l1_offset,
            l1_bytes: u64::from(h.l1_size) * 8,
        }
    }

    /// Bytes of virtual cluster `vc` (the last one may be short).
    pub fn cluster_len(&self, vc: u64) -> u64 {
        self.cs.min(self.virtual_size - vc * self.cs)
    }
}

/// A virtual disk's requests: reads and writes at byte offsets, flushes.
pub(crate) trait Serve {
    /// The disk.
    fn disk_info(&self) -> &crate::devices::block::DiskInfo;
    /// Reads `buf` at `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes `data` at `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> Result<()>;
}

/// Runs a batch on a [`Serve`]: every op checked first, then each in
/// turn; an image error becomes a block error naming the disk and sector.
pub(crate) fn serve(
    disk: &dyn Serve,
    ops: &mut [crate::devices::block::Op<'_>],
) -> core::result::Result<(), crate::devices::block::BlockError> {
    use crate::devices::block::{check, Op};
    for op in ops.iter() {
        check(disk.disk_info(), op)?;
    }
    for op in ops.iter_mut() {
        let (sector, result) = match op {
            Op::Read { sector, buf } => (*sector, disk.read_at(*sector * 512, buf)),
            Op::Write { sector, buf } => (*sector, disk.write_at(*sector * 512, buf)),
            Op::Flush => (0, disk.flush()),
        };
        result.map_err(|e| block_error(&disk.disk_info().name, sector, e))?;
    }
    Ok(())
}

/// An image error as a block error on disk `name` at `sector` (a device
/// error stays the device's own).
pub(crate) fn block_error(
    name: &str,
    sector: u64,
    e: Qcow2Error,
) -> crate::devices::block::BlockError {
    use crate::devices::block::{BlockError, ErrorKind};
    match e {
        Qcow2Error::Io(e) => e,
        other => BlockError::new(
            name,
            Some(sector),
            ErrorKind::Image(alloc::string::ToString::to_string(&other)),
        ),
    }
}
