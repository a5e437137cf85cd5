//! A backing chain seen as one self-contained qcow2 file, so the compact
//! backup (which reads one image's own tables) backs up what the guest
//! sees, and a restore gives the flattened image.
//!
//! [`FlatView`] is a read-only [`BlockDevice`] holding a qcow2 image that
//! exists nowhere: its metadata is laid out by
//! [`NewImage`](crate::backup::newimage::NewImage) for the clusters the
//! chain holds data in (the top layer that maps a cluster decides: data,
//! or zeros; a raw layer holds data everywhere), dense after it; a read
//! of its data area reads the merged view of the chain at the matching
//! virtual offset.
//!
//! Memory: the metadata and the runs are held, refused above
//! [`MAX_METADATA`] with the figure. This module must never write.

use alloc::format;
use alloc::vec::Vec;

use super::disk::holds_data;
use super::Result;
use crate::backup::newimage::NewImage;
use crate::backup::qcow2::Qcow2Error;
use crate::backup::run::{Joiner, Run};
use crate::devices::block::{check, BlockDevice, BlockError, DiskInfo, ErrorKind, Op, SECTOR_SIZE};

/// Most bytes of metadata (and runs) a view holds.
pub const MAX_METADATA: u64 = 64 << 20;

/// The chain on `D` as one qcow2 file; see the module docs.
pub struct FlatView<D> {
    info: DiskInfo,
    merged: D,
    meta: Vec<u8>,
    /// Data runs: virtual cluster `from` onwards is data cluster `to`
    /// onwards, for `len` clusters.
    runs: Vec<Run>,
    cluster_bits: u32,
}

impl<D: BlockDevice> FlatView<D> {
    /// The view of `merged` (what the guest reads, with its block status)
    /// as a qcow2 image of clusters of `1 << cluster_bits` bytes.
    pub fn new(merged: D, cluster_bits: u32) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let size = merged.info().bytes();
        let vclusters = size.div_ceil(cs);
        let mut runs = Vec::new();
        let mut join = Joiner::default();
        let mut index = 0;
        for vc in 0..vclusters {
            if holds_data(&merged, vc * cs / 512, cs.min(size - vc * cs) / 512)? {
                let r = Run {
                    from: vc,
                    to: index,
                    len: 1,
                };
                index += 1;
                runs.extend(join.add(r));
                if runs.len() as u64 * 24 > MAX_METADATA {
                    return Err(too_large(runs.len() as u64 * 24));
                }
            }
        }
        runs.extend(join.finish());
        let layout = NewImage::from_runs(cluster_bits, size, &runs);
        if layout.data_offset() > MAX_METADATA {
            return Err(too_large(layout.data_offset()));
        }
        let meta = layout.metadata(&runs);
        let info = DiskInfo {
            name: merged.info().name.clone(),
            sectors: layout.file_bytes() / SECTOR_SIZE as u64,
            block_size: merged.info().block_size,
            read_only: true,
            flush: false,
            max_depth: merged.info().max_depth,
        };
        Ok(FlatView {
            info,
            merged,
            meta,
            runs,
            cluster_bits,
        })
    }

    /// Bytes of data clusters the view holds.
    pub fn data_bytes(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum::<u64>() << self.cluster_bits
    }

    /// Reads `buf` at byte `at` of the view.
    fn read_at(&self, at: u64, buf: &mut [u8]) -> core::result::Result<(), BlockError> {
        let cs = 1u64 << self.cluster_bits;
        let data_offset = self.meta.len() as u64;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = at + done as u64;
            let part = &mut buf[done..];
            if pos < data_offset {
                let n = part.len().min((data_offset - pos) as usize);
                part[..n].copy_from_slice(&self.meta[pos as usize..pos as usize + n]);
                done += n;
                continue;
            }
            let index = (pos - data_offset) / cs;
            let within = (pos - data_offset) % cs;
            let r = self.runs[self.runs.partition_point(|r| r.to + r.len <= index)];
            let vc = r.from + (index - r.to);
            let n = part
                .len()
                .min(((r.to + r.len - index) * cs - within) as usize);
            let vpos = vc * cs + within;
            // The last cluster may pass the virtual end: zeros there.
            let real = (n as u64).min(self.merged.info().bytes().saturating_sub(vpos)) as usize;
            if real > 0 {
                self.merged.read(vpos / 512, &mut part[..real])?;
            }
            part[real..n].fill(0);
            done += n;
        }
        Ok(())
    }
}

fn too_large(bytes: u64) -> Qcow2Error {
    Qcow2Error::TooLarge(format!(
        "a flat view of the chain needs {bytes} bytes of metadata (at most {MAX_METADATA})"
    ))
}

impl<D: BlockDevice> BlockDevice for FlatView<D> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], _depth: usize) -> core::result::Result<(), BlockError> {
        for op in ops.iter() {
            check(&self.info, op)?;
        }
        for op in ops.iter_mut() {
            match op {
                Op::Read { sector, buf } => self.read_at(*sector * 512, buf)?,
                Op::Write { sector, .. } => {
                    return Err(BlockError::new(
                        &self.info.name,
                        Some(*sector),
                        ErrorKind::ReadOnly,
                    ))
                }
                Op::Flush => {}
            }
        }
        Ok(())
    }
}

impl<D> core::fmt::Debug for FlatView<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("FlatView")
            .field("info", &self.info)
            .field("runs", &self.runs.len())
            .finish_non_exhaustive()
    }
}
