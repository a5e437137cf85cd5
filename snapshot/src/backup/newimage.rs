//! Laying out and writing a new qcow2 version 3 image: what a qcow2
//! restore produces, dense and clean by `qemu-img check`.
//!
//! The layout follows from three numbers (virtual size, data clusters, L2
//! tables), so it is known before any data is written. The metadata is
//! written from a stream of runs in one pass, through one window of
//! [`WINDOW`] bytes, one L1 window of as many and one L2 table (a
//! cluster): memory does not grow with the image ([`NewImage::memory`]).
//!
//! This module never reads a device; it must never write outside the
//! metadata area `[0, data_offset)` it describes.

use alloc::vec::Vec;

use super::qcow2::{buffer, Qcow2Error, COPIED, MAGIC, V3_HEADER_LEN};
use super::run::{Run, Runs, SliceRuns};

/// Bytes of metadata filled and written at a time.
pub const WINDOW: u64 = 64 << 10;

/// Where metadata goes: `out(offset, bytes)`.
pub type Sink<'a, E> = &'a mut dyn FnMut(u64, &[u8]) -> Result<(), E>;

/// Counts the L2 tables a stream of runs (ascending virtual clusters)
/// touches, for clusters of `1 << cluster_bits` bytes.
#[derive(Debug, Clone, Default)]
pub struct L2Count {
    last: Option<u64>,
    /// Tables so far.
    pub tables: u64,
}

impl L2Count {
    /// Counts the tables `r` touches that earlier runs did not.
    pub fn add(&mut self, cluster_bits: u32, r: &Run) {
        let per_l2 = (1u64 << cluster_bits) / 8;
        let (first, last) = (r.from / per_l2, (r.end() - 1) / per_l2);
        let new_first = match self.last {
            Some(l) if l >= first => l + 1,
            _ => first,
        };
        self.tables += (last + 1).saturating_sub(new_first);
        self.last = Some(last);
    }
}

/// Where a new qcow2 image's pieces go. Cluster 0 holds the header, then
/// come the refcount table, the refcount blocks, the L1 table, the L2
/// tables and the data clusters, all dense. Data cluster `i` (in the
/// order of the runs) lives at `data_offset + i * cluster`. Refcounts are
/// 16 bits wide and every cluster of the file counts one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewImage {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Clusters of the refcount table.
    pub reftable_clusters: u64,
    /// Refcount blocks.
    pub refblocks: u64,
    /// Clusters of the L1 table.
    pub l1_clusters: u64,
    /// Entries of the L1 table.
    pub l1_size: u64,
    /// L2 tables.
    pub l2_tables: u64,
    /// Data clusters.
    pub data_clusters: u64,
}

impl NewImage {
    /// The layout for an image of `virtual_size` with `data_clusters` of
    /// data spread over `l2_tables` L2 tables.
    pub fn new(cluster_bits: u32, virtual_size: u64, data_clusters: u64, l2_tables: u64) -> Self {
        let cs = 1u64 << cluster_bits;
        let l1_size = virtual_size.div_ceil(cs).div_ceil(cs / 8);
        let mut image = NewImage {
            cluster_bits,
            virtual_size,
            reftable_clusters: 1,
            refblocks: 1,
            // An empty disk has an empty L1 table and no cluster for it
            // (one would be a cluster nothing points at: a leak).
            l1_clusters: (l1_size * 8).div_ceil(cs),
            l1_size,
            l2_tables,
            data_clusters,
        };
        // The refcount structures count themselves: grow them until they
        // cover the whole file.
        let per_block = cs / 2;
        loop {
            let refblocks = image.clusters().div_ceil(per_block);
            let reftable_clusters = (refblocks * 8).div_ceil(cs);
            if (refblocks, reftable_clusters) == (image.refblocks, image.reftable_clusters) {
                return image;
            }
            image.refblocks = refblocks.max(image.refblocks);
            image.reftable_clusters = reftable_clusters.max(image.reftable_clusters);
        }
    }

    /// The layout for data at the virtual clusters of `runs` (in memory).
    pub fn from_runs(cluster_bits: u32, virtual_size: u64, runs: &[Run]) -> Self {
        let mut count = L2Count::default();
        runs.iter().for_each(|r| count.add(cluster_bits, r));
        let data = runs.iter().map(|r| r.len).sum();
        NewImage::new(cluster_bits, virtual_size, data, count.tables)
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Clusters in the file.
    pub fn clusters(&self) -> u64 {
        self.data_offset() / self.cluster_size() + self.data_clusters
    }

    /// The file's length.
    pub fn file_bytes(&self) -> u64 {
        self.clusters() * self.cluster_size()
    }

    fn reftable_offset(&self) -> u64 {
        self.cluster_size()
    }

    fn refblocks_offset(&self) -> u64 {
        self.reftable_offset() + self.reftable_clusters * self.cluster_size()
    }

    fn l1_offset(&self) -> u64 {
        self.refblocks_offset() + self.refblocks * self.cluster_size()
    }

    fn l2_offset(&self) -> u64 {
        self.l1_offset() + self.l1_clusters * self.cluster_size()
    }

    /// Where the data clusters start; everything before is metadata.
    pub fn data_offset(&self) -> u64 {
        self.l2_offset() + self.l2_tables * self.cluster_size()
    }

    /// Bytes of memory [`NewImage::write_metadata`] needs at most.
    pub fn memory(cluster_bits: u32) -> u64 {
        2 * WINDOW + (1 << cluster_bits)
    }

    /// Writes the metadata, the bytes of `[0, data_offset)`, through
    /// `out(offset, bytes)`, for data at the virtual clusters of `runs`
    /// (ascending, as many clusters as [`NewImage::new`] was told; `to` is
    /// ignored: data cluster `i` is the `i`th the runs name).
    pub fn write_metadata<E: From<Qcow2Error>>(
        &self,
        runs: &mut dyn Runs<E>,
        out: Sink<'_, E>,
    ) -> Result<(), E> {
        let cs = self.cluster_size();
        let mut buf = buffer(WINDOW.min(self.data_offset()), "metadata window")?;
        let rc_end = self.refblocks_offset() + 2 * self.clusters();
        let fill = |at: u64, b: &mut [u8]| {
            for (k, w) in b.as_chunks_mut::<8>().0.iter_mut().enumerate() {
                let o = at + 8 * k as u64;
                let mut v = 0u64;
                if o < V3_HEADER_LEN as u64 {
                    v = self.header_word(o);
                } else if (self.reftable_offset()..self.refblocks_offset()).contains(&o) {
                    let i = (o - self.reftable_offset()) / 8;
                    v = if i < self.refblocks {
                        self.refblocks_offset() + i * cs
                    } else {
                        0
                    };
                } else if (self.refblocks_offset()..self.l1_offset()).contains(&o) {
                    // Four 16-bit refcounts of 1 while clusters remain.
                    for q in 0..4 {
                        if o + 2 * q < rc_end {
                            v |= 1 << (48 - 16 * q);
                        }
                    }
                }
                w.copy_from_slice(&v.to_be_bytes());
            }
        };
        let mut at = 0;
        while at < self.l1_offset() {
            let n = (buf.len() as u64).min(self.l1_offset() - at) as usize;
            fill(at, &mut buf[..n]);
            out(at, &buf[..n])?;
            at += n as u64;
        }
        drop(buf);
        self.write_tables(runs, out)
    }

    /// The big-endian word at byte `o` (a multiple of 8) of the header.
    fn header_word(&self, o: u64) -> u64 {
        let hi_lo = |hi: u32, lo: u32| (u64::from(hi) << 32) | u64::from(lo);
        match o {
            0 => hi_lo(MAGIC, 3),
            16 => hi_lo(0, self.cluster_bits),
            24 => self.virtual_size,
            32 => hi_lo(0, self.l1_size as u32),
            40 => self.l1_offset(),
            48 => self.reftable_offset(),
            56 => hi_lo(self.reftable_clusters as u32, 0),
            96 => hi_lo(4, V3_HEADER_LEN),
            // The header extensions that follow are all zero: the end.
            _ => 0,
        }
    }

    /// The L1 table (a window at a time) and the L2 tables (one at a
    /// time), in one pass over the runs.
    fn write_tables<E: From<Qcow2Error>>(
        &self,
        runs: &mut dyn Runs<E>,
        out: Sink<'_, E>,
    ) -> Result<(), E> {
        let cs = self.cluster_size();
        let per_l2 = cs / 8;
        let l1_bytes = self.l1_clusters * cs;
        let mut l1 = buffer(WINDOW.min(l1_bytes).max(8), "L1 window")?;
        let per_window = l1.len() as u64 / 8;
        let mut l1_first = 0u64; // first L1 index in the window
        let mut l2 = buffer(cs, "L2 table")?;
        let mut table: Option<u64> = None; // L1 index of the table in `l2`
        let mut tables = 0u64;
        let mut copy = 0u64;
        // Finishes the table in `l2`: writes it, points its L1 entry at it.
        let mut finish = |i: u64, l1: &mut [u8], l2: &mut [u8], l1_first: &mut u64| {
            let l2_at = self.l2_offset() + tables * cs;
            out(l2_at, l2)?;
            l2.fill(0);
            tables += 1;
            while i >= *l1_first + per_window {
                out(self.l1_offset() + *l1_first * 8, l1)?;
                l1.fill(0);
                *l1_first += per_window;
            }
            let e = ((i - *l1_first) * 8) as usize;
            l1[e..e + 8].copy_from_slice(&(COPIED | l2_at).to_be_bytes());
            Ok::<(), E>(())
        };
        while let Some(r) = runs.next_run()? {
            for vc in r.from..r.end() {
                let i = vc / per_l2;
                if table.is_some_and(|t| t != i) {
                    finish(table.expect("some"), &mut l1, &mut l2, &mut l1_first)?;
                }
                table = Some(i);
                let e = ((vc % per_l2) * 8) as usize;
                let host = self.data_offset() + copy * cs;
                l2[e..e + 8].copy_from_slice(&(COPIED | host).to_be_bytes());
                copy += 1;
            }
        }
        if let Some(i) = table {
            finish(i, &mut l1, &mut l2, &mut l1_first)?;
        }
        while l1_first * 8 < l1_bytes {
            let n = (l1.len() as u64).min(l1_bytes - l1_first * 8) as usize;
            out(self.l1_offset() + l1_first * 8, &l1[..n])?;
            l1.fill(0);
            l1_first += per_window;
        }
        Ok(())
    }

    /// The metadata as bytes, for data at the virtual clusters of `runs`
    /// (tests and small images: it is as large as the metadata).
    pub fn metadata(&self, runs: &[Run]) -> Vec<u8> {
        let mut b = alloc::vec![0u8; self.data_offset() as usize];
        let mut put = |at: u64, bytes: &[u8]| {
            b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
            Ok::<(), Qcow2Error>(())
        };
        self.write_metadata(&mut SliceRuns(runs), &mut put)
            .expect("a layout of this size fits in memory");
        b
    }
}
