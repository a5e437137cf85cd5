//! The backup medium's format: one stream, written front to back like a
//! tape, read back the same way. `docs/backup-medium.md` is the prose
//! version of this module; the two must agree.
//!
//! ```text
//! offset 0              header           4096 bytes
//! table1_offset         table 1          the source's L1 and L2 tables
//! table2_offset         table 2          runs: virtual cluster -> copy cluster
//! data_offset           extent 0         one block of extent header + data
//!                       extent 1 ...
//! stream_bytes - 512    trailer          512 bytes
//! ```
//!
//! Every section starts on a block boundary (zero padding between). From
//! version 4 the block is 4096 bytes when clusters are at least 4 KiB, so
//! that every write of the stream covers whole 4 KiB blocks of the host's
//! disk; it is 512 bytes for smaller clusters (a 4 KiB extent header a
//! MiB would take such a medium past 1.01 times its data) and in versions
//! 1 to 3, which are still read. An extent header is a 512-byte record at
//! the start of its block, the rest zeros; the trailer is a 512-byte
//! record after the last extent, the stream's end.
//! Integers are little-endian. Every piece carries an xxHash64 checksum
//! (seed 0): the header and trailer over their own first 504 or 4088
//! bytes, each table section over its bytes, each extent over its data
//! and, separately, over its header. The trailer repeats the header's
//! checksum and digests all extent checksums, so a stream whose trailer
//! verifies is whole.
//!
//! This module only encodes and decodes; it must never touch a device.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use twox_hash::XxHash64;

pub use super::run::Run;

/// The first eight bytes of a medium.
pub const MAGIC: [u8; 8] = *b"SNAPTAPE";
/// The first eight bytes of an extent header.
pub const EXTENT_MAGIC: [u8; 8] = *b"SNAPTEXT";
/// The first eight bytes of the trailer.
pub const TRAILER_MAGIC: [u8; 8] = *b"SNAPTEND";
/// The format this build writes.
pub const VERSION: u32 = 4;
/// The oldest format this build still reads.
pub const OLDEST_VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_BYTES: u64 = 4096;
/// The block of the format this build writes, for clusters of at least
/// 4 KiB: where sections start, and what an extent header takes.
/// Unaligned, the tape's 1 MiB writes each began mid-way through a 4 KiB
/// block of the host's disk, and took 1.15 to 1.19 s per GiB against 0.70
/// to 0.74 s aligned (`qemu-io`, `O_DIRECT`, all in flight;
/// docs/results/backup.md).
pub const BLOCK: u64 = 4096;
/// The block of versions 1 to 3, and of smaller clusters.
pub const OLD_BLOCK: u64 = 512;
/// Bytes of an extent header's record (the rest of its block is zeros),
/// and of the trailer.
pub const RECORD: u64 = 512;

/// The block of format `version` for clusters of `1 << cluster_bits`:
/// never larger than a cluster, so extents end on a block.
pub fn block_of(version: u32, cluster_bits: u32) -> u64 {
    if version >= 4 && 1u64 << cluster_bits >= BLOCK {
        BLOCK
    } else {
        OLD_BLOCK
    }
}
/// Data bytes per extent (the last extent may hold less).
pub const EXTENT_DATA_BYTES: u64 = 1 << 20;

/// The checksum used throughout.
pub fn checksum(bytes: &[u8]) -> u64 {
    XxHash64::oneshot(0, bytes)
}

/// Why a medium cannot be restored. Each variant names what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MediumError {
    /// The first bytes are not [`MAGIC`].
    NotAMedium,
    /// A version this build does not read.
    UnknownVersion(u32),
    /// A checksum does not match: which piece.
    BadChecksum(String),
    /// The stream stops before its trailer, or the trailer is not there.
    MissingTrailer(String),
    /// Fields that contradict each other or the tables.
    Inconsistent(String),
}

impl fmt::Display for MediumError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MediumError::NotAMedium => f.write_str("not a backup medium (bad magic)"),
            MediumError::UnknownVersion(v) => write!(
                f,
                "unknown medium version {v} (this build reads versions {OLDEST_VERSION} to {VERSION})"
            ),
            MediumError::BadChecksum(what) => write!(f, "bad checksum: {what}"),
            MediumError::MissingTrailer(why) => write!(f, "missing trailer: {why}"),
            MediumError::Inconsistent(what) => write!(f, "inconsistent medium: {what}"),
        }
    }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Where each part of a stream lies. Everything follows from five numbers,
/// so the writer knows the whole layout (and the stream's length) before
/// it writes the first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Clusters of data in the stream.
    pub data_clusters: u64,
    /// Bytes of the table 1 section (unpadded).
    pub table1_bytes: u64,
    /// Runs in table 2.
    pub table2_runs: u64,
    /// The format's block ([`block_of`]).
    pub block: u64,
}

impl Layout {
    /// The layout of a medium this build writes ([`VERSION`]: no table 2
    /// section, the version's block for the cluster size).
    pub fn new(cluster_bits: u32, data_clusters: u64, table1_bytes: u64) -> Self {
        Layout {
            cluster_bits,
            data_clusters,
            table1_bytes,
            table2_runs: 0,
            block: block_of(VERSION, cluster_bits),
        }
    }
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Clusters per extent.
    pub fn extent_clusters(&self) -> u64 {
        (EXTENT_DATA_BYTES >> self.cluster_bits).max(1)
    }
    /// Extents in the stream.
    pub fn extents(&self) -> u64 {
        self.data_clusters.div_ceil(self.extent_clusters())
    }
    /// Where table 1 starts.
    pub fn table1_offset(&self) -> u64 {
        HEADER_BYTES
    }
    /// Where table 2 starts.
    pub fn table2_offset(&self) -> u64 {
        self.table1_offset() + self.pad(self.table1_bytes)
    }
    /// Bytes of the table 2 section (unpadded).
    pub fn table2_bytes(&self) -> u64 {
        self.table2_runs * 24
    }
    /// Where the first extent starts.
    pub fn data_offset(&self) -> u64 {
        self.table2_offset() + self.pad(self.table2_bytes())
    }
    /// `len` bytes padded to a whole block.
    pub fn pad(&self, len: u64) -> u64 {
        len.next_multiple_of(self.block)
    }
    /// Bytes a full extent takes, header included.
    pub fn extent_stride(&self) -> u64 {
        self.block + self.extent_clusters() * self.cluster_size()
    }
    /// Extent `k`: its first copy cluster, its clusters, and the offset of
    /// its header.
    pub fn extent(&self, k: u64) -> (u64, u64, u64) {
        let first = k * self.extent_clusters();
        let len = self
            .extent_clusters()
            .min(self.data_clusters.saturating_sub(first));
        (first, len, self.data_offset() + k * self.extent_stride())
    }
    /// Where the trailer starts: right after the last extent's data,
    /// which ends on a block, since a block is never larger than a
    /// cluster ([`block_of`]).
    pub fn trailer_offset(&self) -> u64 {
        let k = self.extents();
        if k == 0 {
            return self.data_offset();
        }
        let (_, len, at) = self.extent(k - 1);
        at + self.block + len * self.cluster_size()
    }
    /// The stream's length in bytes.
    pub fn stream_bytes(&self) -> u64 {
        self.trailer_offset() + RECORD
    }
    /// Table 3: copy cluster to medium block (of [`Layout::block`] bytes),
    /// one run per extent.
    pub fn table3(&self) -> Vec<Run> {
        (0..self.extents())
            .map(|k| {
                let (first, len, at) = self.extent(k);
                Run {
                    from: first,
                    to: (at + self.block) / self.block,
                    len,
                }
            })
            .collect()
    }
}

/// What a medium holds: a qcow2 image's data (table 1's host clusters
/// are clusters of the image file, cluster 0 being its header), or a raw
/// volume (every cluster of the volume, table 1 mapping each to itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    /// A qcow2 image (0 on the medium; what media without the field hold).
    Qcow2,
    /// A raw volume, streamed whole (1 on the medium).
    RawVolume,
}

impl SourceKind {
    fn code(self) -> u32 {
        match self {
            SourceKind::Qcow2 => 0,
            SourceKind::RawVolume => 1,
        }
    }
}

/// The header: the layout and what the stream describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The format: [`VERSION`], or an older one being read.
    pub version: u32,
    /// The stream's layout.
    pub layout: Layout,
    /// Runs in table 1 (version 2; 0 in version 1, whose table 1 is the
    /// source's whole L1 and L2 tables).
    pub table1_runs: u64,
    /// The source's virtual size in bytes.
    pub virtual_size: u64,
    /// The source file's length in bytes (table 1's offsets lie below it).
    pub source_bytes: u64,
    /// What the source was.
    pub source: SourceKind,
    /// Checksum of the table 1 section.
    pub table1_checksum: u64,
    /// Checksum of the table 2 section.
    pub table2_checksum: u64,
}

impl Header {
    /// The header's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let l = &self.layout;
        debug_assert_eq!(
            l.block,
            block_of(self.version, l.cluster_bits),
            "a layout whose block its version does not give"
        );
        let mut b = alloc::vec![0u8; HEADER_BYTES as usize];
        b[..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, self.version);
        put32(&mut b, 12, HEADER_BYTES as u32);
        put32(&mut b, 16, l.cluster_bits);
        put32(&mut b, 20, l.extent_clusters() as u32);
        put64(&mut b, 24, self.virtual_size);
        put64(&mut b, 32, l.data_clusters);
        put64(&mut b, 40, l.table1_offset());
        put64(&mut b, 48, l.table1_bytes);
        put64(&mut b, 56, self.table1_checksum);
        put64(&mut b, 64, l.table2_offset());
        put64(&mut b, 72, l.table2_runs);
        put64(&mut b, 80, self.table2_checksum);
        put64(&mut b, 88, l.data_offset());
        put64(&mut b, 96, l.extents());
        put64(&mut b, 104, l.stream_bytes());
        put64(&mut b, 112, self.source_bytes);
        put64(&mut b, 120, self.table1_runs);
        put32(&mut b, 128, self.source.code());
        let sum = checksum(&b[..4088]);
        put64(&mut b, 4088, sum);
        b
    }

    /// Reads a header, checking magic, version, checksum and that the
    /// recorded offsets are the ones the layout implies.
    pub fn decode(b: &[u8]) -> Result<Header, MediumError> {
        if b.len() < HEADER_BYTES as usize || b[..8] != MAGIC {
            return Err(MediumError::NotAMedium);
        }
        let version = le32(b, 8);
        if !(OLDEST_VERSION..=VERSION).contains(&version) {
            return Err(MediumError::UnknownVersion(version));
        }
        if checksum(&b[..4088]) != le64(b, 4088) {
            return Err(MediumError::BadChecksum("header".into()));
        }
        let cluster_bits = le32(b, 16);
        if !(crate::backup::qcow2::MIN_CLUSTER_BITS..=crate::backup::qcow2::MAX_CLUSTER_BITS)
            .contains(&cluster_bits)
        {
            return Err(MediumError::Inconsistent(format!(
                "cluster_bits {cluster_bits}"
            )));
        }
        let source = match le32(b, 128) {
            0 => SourceKind::Qcow2,
            1 if version >= 2 => SourceKind::RawVolume,
            other => {
                return Err(MediumError::Inconsistent(format!(
                    "source kind {other} (0 is a qcow2 image, 1 a raw volume)"
                )))
            }
        };
        let header = Header {
            version,
            source,
            table1_runs: if version == 1 { 0 } else { le64(b, 120) },
            layout: Layout {
                cluster_bits,
                data_clusters: le64(b, 32),
                table1_bytes: le64(b, 48),
                table2_runs: le64(b, 72),
                block: block_of(version, cluster_bits),
            },
            virtual_size: le64(b, 24),
            source_bytes: le64(b, 112),
            table1_checksum: le64(b, 56),
            table2_checksum: le64(b, 80),
        };
        let l = &header.layout;
        // Bound everything before doing arithmetic on it: no field may
        // describe more than 2^56 bytes.
        let limit = 1u64 << 56;
        if header.virtual_size > crate::backup::qcow2::MAX_VIRTUAL_SIZE
            || l.data_clusters > header.virtual_size.div_ceil(l.cluster_size())
            || l.table1_bytes > limit
            || l.table2_runs > l.data_clusters
            || header.table1_runs > l.data_clusters
            || (version >= 2 && l.table2_runs != 0)
        {
            return Err(MediumError::Inconsistent(
                "sizes in the header are out of range".into(),
            ));
        }
        let expect = [
            (
                20,
                u64::from(le32(b, 20)),
                l.extent_clusters(),
                "extent size",
            ),
            (40, le64(b, 40), l.table1_offset(), "table 1 offset"),
            (64, le64(b, 64), l.table2_offset(), "table 2 offset"),
            (88, le64(b, 88), l.data_offset(), "data offset"),
            (96, le64(b, 96), l.extents(), "extent count"),
            (104, le64(b, 104), l.stream_bytes(), "stream length"),
        ];
        for (_, found, want, what) in expect {
            if found != want {
                return Err(MediumError::Inconsistent(format!(
                    "{what} is {found}, the layout gives {want}"
                )));
            }
        }
        Ok(header)
    }
}

/// An extent header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExtentHeader {
    /// Its position in the stream, from 0.
    pub index: u64,
    /// Its first copy cluster.
    pub first: u64,
    /// Clusters it holds.
    pub clusters: u64,
    /// Medium offset of its data.
    pub data_at: u64,
    /// Checksum of its data.
    pub data_checksum: u64,
}

impl ExtentHeader {
    /// Writes the header into `b` (its block, at least [`RECORD`] bytes),
    /// zeros after the record.
    pub fn encode_into(&self, b: &mut [u8]) {
        b.fill(0);
        b[..8].copy_from_slice(&EXTENT_MAGIC);
        put64(b, 8, self.index);
        put64(b, 16, self.first);
        put64(b, 24, self.clusters);
        put64(b, 32, self.data_at);
        put64(b, 40, self.data_checksum);
        let sum = checksum(&b[..504]);
        put64(b, 504, sum);
    }

    /// Reads extent `want`'s header and checks it is the one the layout
    /// puts there.
    pub fn decode(b: &[u8], layout: &Layout, want: u64) -> Result<ExtentHeader, MediumError> {
        if b[..8] != EXTENT_MAGIC || checksum(&b[..504]) != le64(b, 504) {
            return Err(MediumError::BadChecksum(format!("extent {want} header")));
        }
        let (first, clusters, at) = layout.extent(want);
        let h = ExtentHeader {
            index: le64(b, 8),
            first: le64(b, 16),
            clusters: le64(b, 24),
            data_at: le64(b, 32),
            data_checksum: le64(b, 40),
        };
        if (h.index, h.first, h.clusters, h.data_at) != (want, first, clusters, at + layout.block) {
            return Err(MediumError::Inconsistent(format!(
                "extent {want} header says {h:?}"
            )));
        }
        Ok(h)
    }
}

/// The trailer: the mark that a stream is whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    /// Extents written.
    pub extents: u64,
    /// Clusters of data written.
    pub data_clusters: u64,
    /// The stream's length.
    pub stream_bytes: u64,
    /// The header's checksum.
    pub header_checksum: u64,
    /// Checksum over every extent's data checksum, in order.
    pub digest: u64,
}

impl Trailer {
    /// The trailer's 512 bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = alloc::vec![0u8; RECORD as usize];
        b[..8].copy_from_slice(&TRAILER_MAGIC);
        put32(&mut b, 8, VERSION);
        put64(&mut b, 16, self.extents);
        put64(&mut b, 24, self.data_clusters);
        put64(&mut b, 32, self.stream_bytes);
        put64(&mut b, 40, self.header_checksum);
        put64(&mut b, 48, self.digest);
        let sum = checksum(&b[..504]);
        put64(&mut b, 504, sum);
        b
    }

    /// Checks the trailer at the end of a stream against what was read.
    pub fn check(b: &[u8], expect: &Trailer) -> Result<(), MediumError> {
        if b.len() < RECORD as usize || b[..8] != TRAILER_MAGIC {
            return Err(MediumError::MissingTrailer(format!(
                "no trailer at byte {}",
                expect.stream_bytes - RECORD
            )));
        }
        if checksum(&b[..504]) != le64(b, 504) {
            return Err(MediumError::BadChecksum("trailer".into()));
        }
        let found = Trailer {
            extents: le64(b, 16),
            data_clusters: le64(b, 24),
            stream_bytes: le64(b, 32),
            header_checksum: le64(b, 40),
            digest: le64(b, 48),
        };
        if found != *expect {
            return Err(MediumError::Inconsistent(format!(
                "the trailer says {found:?}, the stream {expect:?}"
            )));
        }
        Ok(())
    }
}

/// A running digest of extent checksums.
#[derive(Debug, Default)]
pub struct Digest(XxHash64);

impl Digest {
    /// Adds one extent's checksum.
    pub fn add(&mut self, sum: u64) {
        use core::hash::Hasher;
        self.0.write(&sum.to_le_bytes());
    }
    /// The digest so far.
    pub fn value(&self) -> u64 {
        use core::hash::Hasher;
        self.0.finish()
    }
}
