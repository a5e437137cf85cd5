//! A raw volume streamed whole to a medium, a window of extents at a time, in
//! volume order: what a backup of a split mirror writes (source kind
//! [`SourceKind::RawVolume`] in `docs/backup-medium.md`). The caller
//! fills each window's data, from wherever it has it (a disk, memory);
//! this module lays out the header, table 1 (one run), the extent headers
//! and the trailer, so that [`super::restore`] brings the volume back.
//!
//! Memory: the caller owns the one window buffer ([`VolumeStream::buffer`]),
//! at most [`WINDOW`] bytes plus an extent.
//! This module must never read the volume itself, and writes the medium
//! only sequentially, from its start.

use alloc::vec::Vec;

use super::engine::Streamer;
use super::error::Error;
use super::io::{need, write_deep, zeroed, WINDOW};
use super::run::Run;
use super::table::Encoder;
use super::tape::{self, checksum, Digest, Header, Layout, SourceKind, Trailer, HEADER_BYTES};
use crate::devices::block::BlockDevice;

/// A medium being written from a raw volume.
pub struct VolumeStream<'t> {
    s: Streamer<'t>,
    header_checksum: u64,
    next: u64,
    /// Extents per window.
    window_extents: u64,
}

impl core::fmt::Debug for VolumeStream<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VolumeStream")
            .field("tape", &self.s.tape.info().name)
            .field("layout", &self.s.layout)
            .field("written", &self.s.written)
            .field("next", &self.next)
            .finish()
    }
}

impl<'t> VolumeStream<'t> {
    /// The layout of a medium for a volume of `volume_bytes` in clusters
    /// of `1 << cluster_bits` bytes, with its table 1 as encoded (its
    /// bytes, runs and checksum).
    fn plan(volume_bytes: u64, cluster_bits: u32) -> (Layout, Vec<u8>, Encoder) {
        let clusters = volume_bytes.div_ceil(1 << cluster_bits);
        let mut enc = Encoder::default();
        let mut table = Vec::new();
        if clusters > 0 {
            let run = Run {
                from: 0,
                to: 0,
                len: clusters,
            };
            enc.push(&run, &mut |b| table.extend_from_slice(b));
        }
        enc.finish(&mut |b| table.extend_from_slice(b));
        let layout = Layout::new(cluster_bits, clusters, enc.bytes);
        (layout, table, enc)
    }

    /// Bytes of medium a volume of `volume_bytes` in clusters of
    /// `1 << cluster_bits` takes.
    pub fn medium_bytes(volume_bytes: u64, cluster_bits: u32) -> u64 {
        Self::plan(volume_bytes, cluster_bits).0.stream_bytes()
    }

    /// Checks the tape holds the whole stream, then writes the header and
    /// table 1. `cluster_bits` is the medium's cluster (a mirror block),
    /// 9 to 21.
    pub fn start(
        tape: &'t dyn BlockDevice,
        volume_bytes: u64,
        cluster_bits: u32,
    ) -> Result<Self, Error> {
        let (layout, table, enc) = Self::plan(volume_bytes, cluster_bits);
        need(tape, layout.stream_bytes())?;
        let header = Header {
            version: tape::VERSION,
            layout,
            table1_runs: enc.runs,
            virtual_size: volume_bytes,
            source_bytes: volume_bytes,
            source: SourceKind::RawVolume,
            table1_checksum: enc.checksum(),
            table2_checksum: checksum(&[]),
        };
        let mut front = header.encode();
        front.extend_from_slice(&table);
        front.resize(layout.data_offset() as usize, 0);
        write_deep(tape, 0, &front)?;
        let header_checksum = u64::from_le_bytes(front[4088..4096].try_into().expect("8 bytes"));
        debug_assert!(front.len() as u64 >= HEADER_BYTES);
        Ok(VolumeStream {
            s: Streamer {
                layout,
                tape,
                written: layout.data_offset(),
                digest: Digest::default(),
            },
            header_checksum,
            next: 0,
            window_extents: (WINDOW / layout.extent_stride()).max(1),
        })
    }

    /// The medium's layout.
    pub fn layout(&self) -> &Layout {
        &self.s.layout
    }

    /// Clusters per extent: how many the caller fills at a time.
    pub fn extent_clusters(&self) -> u64 {
        self.s.layout.extent_clusters()
    }

    /// Extents in a window: as many as fit in [`WINDOW`] bytes (at least
    /// one), or fewer as [`Self::limit_window`] set.
    pub fn window_extents(&self) -> u64 {
        self.window_extents
    }

    /// Makes the windows at most `extents` extents (at least one), for a
    /// caller with less memory than [`WINDOW`]. Before the first window.
    pub fn limit_window(&mut self, extents: u64) {
        self.window_extents = self.window_extents.min(extents).max(1);
    }

    /// Extents in a full window of a medium for a volume of
    /// `volume_bytes` in clusters of `1 << cluster_bits`.
    pub fn max_window_extents(volume_bytes: u64, cluster_bits: u32) -> u64 {
        let layout = Self::plan(volume_bytes, cluster_bits).0;
        (WINDOW / layout.extent_stride()).max(1)
    }

    /// Clusters per extent of a medium in clusters of `1 << cluster_bits`.
    pub fn medium_extent_clusters(cluster_bits: u32) -> u64 {
        Layout::new(cluster_bits, 0, 0).extent_clusters()
    }

    /// The next extent to write as `(first cluster, clusters)`, or `None`
    /// once all are written.
    pub fn next_extent(&self) -> Option<(u64, u64)> {
        (self.next < self.s.layout.extents()).then(|| {
            let (first, len, _) = self.s.layout.extent(self.next);
            (first, len)
        })
    }

    /// The clusters of the next window, [`Self::window_extents`] extents
    /// (fewer at the end), as `(first cluster, clusters)`, or `None` once
    /// all are written.
    pub fn next_window(&self) -> Option<(u64, u64)> {
        let (first, _) = self.next_extent()?;
        let last = (self.next + self.window_extents()).min(self.s.layout.extents()) - 1;
        let (at, len, _) = self.s.layout.extent(last);
        Some((first, at + len - first))
    }

    /// A buffer for one window: each extent as on the medium, a block of
    /// the layout for its header, then the data of a full extent.
    pub fn buffer(&self) -> Result<Vec<u8>, Error> {
        zeroed(self.window_extents() * self.s.layout.extent_stride())
    }

    /// Where the data of the window's cluster `c` (counted from the
    /// window's first) starts in the [`Self::buffer`].
    pub fn offset_in_window(&self, c: u64) -> usize {
        let l = &self.s.layout;
        let e = self.extent_clusters();
        ((c / e) * l.extent_stride() + l.block + (c % e) * l.cluster_size()) as usize
    }

    /// Writes the next window ([`Self::next_window`]), whose data the
    /// caller put in `buf` at [`Self::offset_in_window`], in one batch;
    /// returns the bytes of data streamed so far.
    pub fn put(&mut self, buf: &mut [u8]) -> Result<u64, Error> {
        assert!(self.next_extent().is_some(), "an extent left to write");
        let n = self
            .window_extents()
            .min(self.s.layout.extents() - self.next);
        let done = self.s.window(buf, self.next, n)?;
        self.next += n;
        Ok(done)
    }

    /// Writes the trailer after the last extent and flushes the tape;
    /// returns the stream's length.
    pub fn finish(&mut self) -> Result<u64, Error> {
        assert!(self.next_extent().is_none(), "extents left to write");
        let l = &self.s.layout;
        debug_assert_eq!(self.s.written, l.trailer_offset());
        let trailer = Trailer {
            extents: l.extents(),
            data_clusters: l.data_clusters,
            stream_bytes: l.stream_bytes(),
            header_checksum: self.header_checksum,
            digest: self.s.digest.value(),
        };
        self.s.tape.write(self.s.written / 512, &trailer.encode())?;
        self.s.tape.flush()?;
        Ok(l.stream_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{restore, Format};
    use crate::devices::block::{fill_pattern, MemDisk};

    /// A volume streamed through `VolumeStream` and restored by the
    /// ordinary restore is the volume, for sizes that end inside a cluster
    /// and sizes smaller than one.
    #[test]
    fn a_streamed_volume_restores_to_itself() {
        for (sectors, bits) in [(3000u64, 16u32), (7, 12), (4096, 20), (1, 9), (0, 16)] {
            let mut volume = alloc::vec![0u8; sectors as usize * 512];
            fill_pattern(sectors, 0, &mut volume);
            let bytes = sectors * 512;
            let tape = MemDisk::new("tape", VolumeStream::medium_bytes(bytes, bits) / 512);
            let mut s = VolumeStream::start(&tape, bytes, bits).unwrap();
            let cs = 1u64 << bits;
            let mut buf = s.buffer().unwrap();
            while let Some((first, len)) = s.next_window() {
                buf.fill(0);
                for c in first..first + len {
                    let from = (c * cs).min(bytes) as usize;
                    let to = ((c + 1) * cs).min(bytes) as usize;
                    let at = s.offset_in_window(c - first);
                    buf[at..at + to - from].copy_from_slice(&volume[from..to]);
                }
                s.put(&mut buf).unwrap();
            }
            let len = s.finish().unwrap();
            assert_eq!(len, tape.info().bytes());
            let out = MemDisk::new("out", sectors);
            let done = restore(&tape, &out, Format::Raw, &mut |_, _, _| {}).unwrap();
            assert_eq!(done.virtual_bytes, bytes);
            assert_eq!(
                out.contents(),
                volume,
                "{sectors} sectors, cluster bits {bits}"
            );
        }
    }
}
