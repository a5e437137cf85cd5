//! qcow2 version 3 images: the header and the meaning of table entries.
//! Walking an image's tables is [`super::source`]; laying out a new image
//! (what a restore may write) is [`super::newimage`].
//!
//! The header's fields are checked before anything uses them: offsets lie
//! inside the file and are aligned, sizes are bounded, reserved bits are
//! clear. Compressed clusters (deflate or zstd, [`Compressed`]) and
//! extended L2 entries (subclusters, [`Cluster::Subclusters`]) are read;
//! features this reader does not handle (encryption, an external data
//! file, unknown incompatible features or compression types) and images
//! marked dirty or corrupt are refused with an error that names them. A hostile image gets an [`Qcow2Error`], never a panic,
//! an out-of-bounds access or an unbounded allocation.
//!
//! This module must never touch a device: it decodes bytes it is given.
//!
//! The format is QEMU's `docs/interop/qcow2.rst`; all integers in the file
//! are big-endian.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::devices::block::BlockError;

mod entry;

pub use entry::{host_of, l1_entry, l2_entry, l2_extended, Cluster, Compressed};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster with extended L2 entries: 32 subclusters of 512 bytes.
const MIN_EXTENDED_CLUSTER_BITS: u32 = 14;
/// Smallest and largest cluster sizes QEMU supports (512 B to 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's bounds on the L1 and refcount tables.
const MAX_L1_BYTES: u64 = 32 << 20;
const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Largest virtual size accepted (QEMU's own limit is 2^63 - 512 but L1
/// bounds make anything near it unreachable; 64 TiB covers real use).
pub const MAX_VIRTUAL_SIZE: u64 = 64 << 40;
/// Length of the version 3 header without optional fields.
pub(crate) const V3_HEADER_LEN: u32 = 104;
/// Longest backing file name QEMU writes.
const MAX_BACKING_NAME: u32 = 1023;

/// Bit 63 of L1 and L2 entries: the cluster's refcount is exactly one.
pub const COPIED: u64 = 1 << 63;
const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros.
pub const ZERO_FLAG: u64 = 1;
/// Bits 9-55: a host offset.
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const L1_RESERVED: u64 = 0x7f00_0000_0000_01fe;
const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
pub(crate) const REFTABLE_RESERVED: u64 = 0x1ff;

/// Incompatible feature bits.
const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_EXTERNAL_DATA: u64 = 1 << 2;
const INCOMPAT_COMPRESSION_TYPE: u64 = 1 << 3;
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_EXTERNAL_DATA: u32 = 0x4441_5441;
const EXT_CRYPTO: u32 = 0x0537_be77;

/// Why an image cannot be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Qcow2Error {
    /// The disk holding the image failed.
    Io(BlockError),
    /// Not a qcow2 image at all.
    NotQcow2,
    /// A qcow2 feature this reader does not handle, by name.
    Unsupported(String),
    /// A field that breaks the format: which, and how.
    Invalid(String),
    /// The image's tables would need more memory than there is.
    TooLarge(String),
    /// The guest has too little memory for the job, in words that give
    /// both figures and what to do.
    Memory(String),
}

impl fmt::Display for Qcow2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Qcow2Error::Io(e) => write!(f, "reading the image: {e}"),
            Qcow2Error::NotQcow2 => f.write_str("not a qcow2 image (bad magic)"),
            Qcow2Error::Unsupported(what) => write!(f, "unsupported qcow2 feature: {what}"),
            Qcow2Error::Invalid(what) => write!(f, "invalid qcow2 image: {what}"),
            Qcow2Error::TooLarge(what) => write!(f, "qcow2 image too large: {what}"),
            Qcow2Error::Memory(what) => f.write_str(what),
        }
    }
}

impl From<BlockError> for Qcow2Error {
    fn from(e: BlockError) -> Self {
        Qcow2Error::Io(e)
    }
}

pub(crate) fn invalid(what: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Invalid(what.into())
}

pub(crate) fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

pub(crate) fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// A zeroed buffer of `len` bytes, or an error instead of an abort when
/// memory is short.
pub(crate) fn buffer(len: u64, what: &str) -> Result<Vec<u8>, Qcow2Error> {
    crate::support::try_filled(len, 0)
        .ok_or_else(|| Qcow2Error::TooLarge(format!("{what}: {len} bytes")))
}

/// The image header, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits (0..=6).
    pub refcount_order: u32,
    /// Internal snapshots (their tables are checked for placement only).
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// The backing file's name, if the image has one.
    pub backing_file: Option<String>,
    /// The backing file's format, from the header extension.
    pub backing_format: Option<String>,
    /// Compatible feature bits (ignored by a reader).
    pub compatible_features: u64,
    /// Bytes of the header proper.
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression: Compression,
    /// L2 entries are 128 bits with subcluster bitmaps.
    pub extended_l2: bool,
}

/// The compression type of an image's compressed clusters (header byte
/// 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (type 0, the default).
    Deflate,
    /// A zstd frame (type 1).
    Zstd,
}

/// Reads the compression type: byte 104 when the header has it, which
/// must agree with the incompatible bit 3 (set for any type but deflate).
fn compression(first: &[u8], header_length: u32, incompat: u64) -> Result<Compression, Qcow2Error> {
    let kind = if header_length > V3_HEADER_LEN {
        first[V3_HEADER_LEN as usize]
    } else {
        0
    };
    let bit = incompat & INCOMPAT_COMPRESSION_TYPE != 0;
    match (kind, bit) {
        (0, false) => Ok(Compression::Deflate),
        (1, true) => Ok(Compression::Zstd),
        (0 | 1, _) => Err(invalid(format!(
            "compression type {kind} with the compression type bit {}",
            if bit { "set" } else { "clear" }
        ))),
        _ => Err(Qcow2Error::Unsupported(format!("compression type {kind}"))),
    }
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bytes of one L2 entry: 8, or 16 with extended L2 entries.
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// Virtual clusters (the last may be partial).
    pub fn virtual_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    /// Parses and checks the first cluster of an image `file_len` bytes
    /// long. `first` holds at least `min(file_len, cluster size)` bytes
    /// once the cluster size is known; [`super::source::read_header`] reads
    /// it in two steps.
    pub(crate) fn parse(first: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
        if first.len() < 72 || be32(first, 0) != MAGIC {
            return Err(Qcow2Error::NotQcow2);
        }
        let version = be32(first, 4);
        if version != 3 {
            return Err(Qcow2Error::Unsupported(format!(
                "version {version} (only version 3 is read; convert with \
                 qemu-img amend -o compat=v3)"
            )));
        }
        if first.len() < V3_HEADER_LEN as usize {
            return Err(invalid("file shorter than a version 3 header"));
        }
        let cluster_bits = be32(first, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cluster_size = 1u64 << cluster_bits;
        let crypt = be32(first, 32);
        if crypt != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "encryption (crypt_method {crypt})"
            )));
        }
        let incompat = be64(first, 72);
        for (bit, what) in [
            (INCOMPAT_DIRTY, "dirty bit set (the image was not closed cleanly; qemu-img check -r all repairs it)"),
            (INCOMPAT_CORRUPT, "corrupt bit set (qemu-img check -r all may repair it)"),
            (INCOMPAT_EXTERNAL_DATA, "external data file"),
        ] {
            if incompat & bit != 0 {
                return Err(Qcow2Error::Unsupported(what.into()));
            }
        }
        let known = INCOMPAT_COMPRESSION_TYPE | INCOMPAT_EXTENDED_L2;
        if incompat & !known != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "unknown incompatible features {:#x}",
                incompat & !known
            )));
        }
        let refcount_order = be32(first, 96);
        if refcount_order > 6 {
            return Err(invalid(format!("refcount_order {refcount_order} above 6")));
        }
        let header_length = be32(first, 100);
        if header_length < V3_HEADER_LEN
            || !header_length.is_multiple_of(8)
            || u64::from(header_length) > cluster_size.min(first.len() as u64)
        {
            return Err(invalid(format!(
                "header_length {header_length} (want a multiple of 8, at least {V3_HEADER_LEN}, within the first cluster)"
            )));
        }
        let compression = compression(first, header_length, incompat)?;
        let extended_l2 = incompat & INCOMPAT_EXTENDED_L2 != 0;
        if extended_l2 && cluster_bits < MIN_EXTENDED_CLUSTER_BITS {
            return Err(invalid(format!(
                "extended L2 entries with {cluster_size}-byte clusters (subclusters \
                 need clusters of at least {} bytes)",
                1u64 << MIN_EXTENDED_CLUSTER_BITS
            )));
        }
        let virtual_size = be64(first, 24);
        if virtual_size > MAX_VIRTUAL_SIZE || !virtual_size.is_multiple_of(512) {
            return Err(invalid(format!(
                "virtual size {virtual_size} (want a multiple of 512, at most {MAX_VIRTUAL_SIZE})"
            )));
        }
        let header = Header {
            cluster_bits,
            virtual_size,
            l1_size: be32(first, 36),
            l1_offset: be64(first, 40),
            refcount_table_offset: be64(first, 48),
            refcount_table_clusters: be32(first, 56),
            refcount_order,
            nb_snapshots: be32(first, 60),
            snapshots_offset: be64(first, 64),
            backing_file: None,
            backing_format: None,
            compatible_features: be64(first, 80),
            header_length,
            compression,
            extended_l2,
        };
        let header = Header {
            backing_file: backing_name(first, file_len, cluster_size)?,
            backing_format: extensions(first, header_length as usize)?,
            ..header
        };
        header.check_tables(file_len)?;
        Ok(header)
    }

    /// Checks the L1, refcount and snapshot tables' placement and size.
    fn check_tables(&self, file_len: u64) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size();
        let entries_per_l2 = cs / self.l2_entry_bytes();
        let needed = self.virtual_clusters().div_ceil(entries_per_l2);
        let l1_bytes = u64::from(self.l1_size) * 8;
        if u64::from(self.l1_size) < needed || l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!(
                "l1_size {} (the virtual size needs {needed}; at most {})",
                self.l1_size,
                MAX_L1_BYTES / 8
            )));
        }
        if self.l1_size > 0 {
            placed("L1 table", self.l1_offset, l1_bytes, cs, file_len)?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "refcount_table_clusters {} (want 1 to {} bytes' worth)",
                self.refcount_table_clusters, MAX_REFTABLE_BYTES
            )));
        }
        placed(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > 0 {
            // Each snapshot entry is at least 40 bytes; the table must fit.
            placed(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                cs,
                file_len,
            )?;
        }
        Ok(())
    }

    /// Width of a refcount in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
}

/// Checks that `[offset, offset + len)` is cluster aligned, not the
/// header, and inside a file of `file_len` bytes; the error says which.
pub(crate) fn placed(
    what: &str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    if !offset.is_multiple_of(cs) {
        return Err(invalid(format!(
            "{what} at {offset:#x} is not aligned to the {cs}-byte cluster"
        )));
    }
    if offset == 0 {
        return Err(invalid(format!("{what} at 0 overlaps the header")));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(format!(
            "{what} at {offset:#x} (+{len:#x}) lies past the end of the file \
             ({file_len:#x} bytes, counted in whole 512-byte sectors)"
        ))),
    }
}

/// Whether `[offset, offset + len)` is as [`placed`] wants it.
pub(crate) fn fits(offset: u64, len: u64, cs: u64, file_len: u64) -> bool {
    offset != 0
        && offset.is_multiple_of(cs)
        && offset.checked_add(len).is_some_and(|end| end <= file_len)
}

/// The backing file name, which must lie inside the first cluster.
fn backing_name(first: &[u8], file_len: u64, cs: u64) -> Result<Option<String>, Qcow2Error> {
    let offset = be64(first, 8);
    let size = be32(first, 16);
    if offset == 0 {
        return Ok(None);
    }
    let end = offset.checked_add(u64::from(size));
    if size == 0
        || size > MAX_BACKING_NAME
        || end.is_none_or(|end| end > cs.min(file_len) || end > first.len() as u64)
    {
        return Err(invalid(format!(
            "backing file name at {offset:#x} ({size} bytes) outside the header cluster"
        )));
    }
    let bytes = &first[offset as usize..offset as usize + size as usize];
    let name =
        core::str::from_utf8(bytes).map_err(|_| invalid("backing file name is not UTF-8"))?;
    Ok(Some(name.into()))
}

/// Walks the header extensions; returns the backing format if named.
fn extensions(first: &[u8], start: usize) -> Result<Option<String>, Qcow2Error> {
    let mut at = start;
    let mut format_name = None;
    loop {
        if at + 8 > first.len() {
            return Err(invalid("header extensions run past the first cluster"));
        }
        let kind = be32(first, at);
        let len = be32(first, at + 4) as usize;
        let data = at + 8;
        let next = data + len.next_multiple_of(8);
        if kind == EXT_END {
            return Ok(format_name);
        }
        if len > first.len() || next > first.len() {
            return Err(invalid(format!(
                "header extension {kind:#x} of {len} bytes runs past the first cluster"
            )));
        }
        match kind {
            EXT_BACKING_FORMAT => {
                let name = core::str::from_utf8(&first[data..data + len])
                    .map_err(|_| invalid("backing format name is not UTF-8"))?;
                format_name = Some(name.into());
            }
            EXT_EXTERNAL_DATA => return Err(Qcow2Error::Unsupported("external data file".into())),
            EXT_CRYPTO => return Err(Qcow2Error::Unsupported("encryption".into())),
            // Feature names, bitmaps (autoclear) and unknown extensions
            // do not change how the data is read.
            _ => {}
        }
        at = next;
    }
}
