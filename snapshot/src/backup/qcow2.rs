//! qcow2 version 3 images: reading one (the thin-provisioned disk a backup
//! starts from) and laying out a new one (what a restore may write).
//!
//! The reader takes the image's bytes through a [`BlockDevice`]: the
//! kernel sees the image file as a raw virtio-blk disk. Its L1/L2 tables
//! are the *first address table* of the backup method ([`Table1`]):
//! virtual cluster to host cluster, with unallocated entries unused.
//!
//! Every field read from the image is checked before it is used: offsets
//! lie inside the file and are aligned, sizes are bounded, reserved bits are
//! clear, and no two pieces of metadata or data claim the same host
//! cluster. Features this reader does not handle (compression, encryption,
//! an external data file, extended L2 entries, unknown incompatible
//! features) and images marked dirty or corrupt are refused with an error
//! that names them. A hostile image gets an [`Qcow2Error`], never a panic,
//! an out-of-bounds access or an unbounded allocation.
//!
//! This module must never write to the image it reads.
//!
//! The format is QEMU's `docs/interop/qcow2.rst`; all integers in the file
//! are big-endian.

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use crate::devices::block::{read_bytes, BlockDevice, BlockError};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
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
const V3_HEADER_LEN: u32 = 104;
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
const REFTABLE_RESERVED: u64 = 0x1ff;

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
}

impl fmt::Display for Qcow2Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Qcow2Error::Io(e) => write!(f, "reading the image: {e}"),
            Qcow2Error::NotQcow2 => f.write_str("not a qcow2 image (bad magic)"),
            Qcow2Error::Unsupported(what) => write!(f, "unsupported qcow2 feature: {what}"),
            Qcow2Error::Invalid(what) => write!(f, "invalid qcow2 image: {what}"),
            Qcow2Error::TooLarge(what) => write!(f, "qcow2 image too large: {what}"),
        }
    }
}

impl From<BlockError> for Qcow2Error {
    fn from(e: BlockError) -> Self {
        Qcow2Error::Io(e)
    }
}

fn invalid(what: impl Into<String>) -> Qcow2Error {
    Qcow2Error::Invalid(what.into())
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    (u64::from(be32(b, at)) << 32) | u64::from(be32(b, at + 4))
}

/// A zeroed buffer of `len` bytes, or an error instead of an abort when
/// memory is short.
fn buffer(len: u64, what: &str) -> Result<Vec<u8>, Qcow2Error> {
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
}

impl Header {
    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Virtual clusters (the last may be partial).
    pub fn virtual_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    /// Parses and checks the first cluster of an image `file_len` bytes
    /// long. `first` holds at least `min(file_len, cluster size)` bytes
    /// once the cluster size is known; [`open`] reads it in two steps.
    fn parse(first: &[u8], file_len: u64) -> Result<Header, Qcow2Error> {
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
            (INCOMPAT_COMPRESSION_TYPE, "compression (a non-zlib compression type)"),
            (INCOMPAT_EXTENDED_L2, "extended L2 entries (subclusters)"),
        ] {
            if incompat & bit != 0 {
                return Err(Qcow2Error::Unsupported(what.into()));
            }
        }
        if incompat != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "unknown incompatible features {incompat:#x}"
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
        if header_length > 104 && first[104] != 0 {
            return Err(Qcow2Error::Unsupported(format!(
                "compression type {}",
                first[104]
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
        let entries_per_l2 = cs / 8;
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

/// Checks that `[offset, offset + len)` is cluster aligned and inside a
/// file of `file_len` bytes.
fn placed(what: &str, offset: u64, len: u64, cs: u64, file_len: u64) -> Result<(), Qcow2Error> {
    let end = offset.checked_add(len);
    if !offset.is_multiple_of(cs) || offset == 0 || end.is_none_or(|end| end > file_len) {
        return Err(invalid(format!(
            "{what} at {offset:#x} (+{len:#x}) is not cluster aligned inside the {file_len:#x}-byte file"
        )));
    }
    Ok(())
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

/// What one virtual cluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cluster {
    /// Data at this host offset.
    Data(u64),
    /// Reads as zeros (the zero flag; a preallocated zero cluster too).
    Zero,
}

/// One L2 table of [`Table1`]: the entries of L1 index `l1_index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L2Table {
    /// Which L1 entry points at it.
    pub l1_index: u32,
    /// Its entries, as qcow2 defines them (host-order integers).
    pub entries: Vec<u64>,
}

/// The first address table: an image's L1 table and the L2 tables it
/// points at, as found in the image. Entries past the virtual size are
/// kept but never mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table1 {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The L1 entries.
    pub l1: Vec<u64>,
    /// The L2 tables, in L1 order.
    pub l2: Vec<L2Table>,
    /// For each L1 index, its position in `l2` (u32::MAX: none).
    index: Vec<u32>,
}

impl Table1 {
    /// Builds a table from its parts, checking every entry: reserved bits
    /// clear, no compressed clusters, data offsets cluster aligned and
    /// below `file_len`, one L2 table for each L1 entry that points at
    /// one, and every table a whole cluster.
    pub fn new(
        cluster_bits: u32,
        virtual_size: u64,
        l1: Vec<u64>,
        l2: Vec<L2Table>,
        file_len: u64,
    ) -> Result<Table1, Qcow2Error> {
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits)
            || virtual_size > MAX_VIRTUAL_SIZE
        {
            return Err(invalid("cluster_bits or virtual size out of range"));
        }
        let cs = 1u64 << cluster_bits;
        let per_l2 = cs / 8;
        let vclusters = virtual_size.div_ceil(cs);
        let needed = vclusters.div_ceil(per_l2);
        if (l1.len() as u64) < needed || l1.len() as u64 > MAX_L1_BYTES / 8 {
            return Err(invalid(format!(
                "L1 table of {} entries for {needed} needed",
                l1.len()
            )));
        }
        let mut index = vec![u32::MAX; l1.len()];
        for (pos, table) in l2.iter().enumerate() {
            let i = table.l1_index as usize;
            if i >= l1.len() || index[i] != u32::MAX || table.entries.len() as u64 != per_l2 {
                return Err(invalid(format!(
                    "L2 table for L1 index {i}: unknown, repeated or not a whole cluster"
                )));
            }
            index[i] = pos as u32;
        }
        for (i, &entry) in l1.iter().enumerate() {
            if entry & L1_RESERVED != 0 {
                return Err(invalid(format!(
                    "L1 entry {i} ({entry:#x}) has reserved bits set"
                )));
            }
            let present = entry & OFFSET_MASK != 0;
            if (i as u64) < needed && present != (index[i] != u32::MAX) {
                return Err(invalid(format!("L1 entry {i} and its L2 table disagree")));
            }
        }
        for table in &l2 {
            let first = u64::from(table.l1_index) * per_l2;
            for (j, &entry) in table.entries.iter().enumerate() {
                let vc = first + j as u64;
                if vc >= vclusters {
                    break;
                }
                let at = vc * cs;
                if entry & COMPRESSED != 0 {
                    return Err(Qcow2Error::Unsupported(format!(
                        "compressed cluster at virtual offset {at:#x}"
                    )));
                }
                if entry & L2_RESERVED != 0 {
                    return Err(invalid(format!(
                        "L2 entry for virtual offset {at:#x} ({entry:#x}) has reserved bits set"
                    )));
                }
                let host = entry & OFFSET_MASK;
                if host != 0 && (!host.is_multiple_of(cs) || host >= file_len) {
                    return Err(invalid(format!(
                        "cluster for virtual offset {at:#x} at host offset {host:#x}: \
                         not cluster aligned inside the {file_len:#x}-byte file"
                    )));
                }
            }
        }
        Ok(Table1 {
            cluster_bits,
            virtual_size,
            l1,
            l2,
            index,
        })
    }

    /// Bytes per cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Virtual clusters (the last may be partial).
    pub fn virtual_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster_size())
    }

    fn decode(entry: u64) -> Option<Cluster> {
        if entry & ZERO_FLAG != 0 {
            Some(Cluster::Zero)
        } else if entry & OFFSET_MASK != 0 {
            Some(Cluster::Data(entry & OFFSET_MASK))
        } else {
            None
        }
    }

    /// What virtual cluster `vc` holds; `None`: unallocated (reads zeros,
    /// or the backing file's data).
    pub fn lookup(&self, vc: u64) -> Option<Cluster> {
        if vc >= self.virtual_clusters() {
            return None;
        }
        let per_l2 = self.cluster_size() / 8;
        let pos = *self.index.get((vc / per_l2) as usize)?;
        let table = self.l2.get(pos as usize)?;
        Self::decode(table.entries[(vc % per_l2) as usize])
    }

    /// Every L2 entry inside the virtual size, as `(virtual cluster,
    /// entry)`, in ascending order.
    fn entries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let per_l2 = self.cluster_size() / 8;
        let limit = self.virtual_clusters();
        self.l2.iter().flat_map(move |t| {
            let first = u64::from(t.l1_index) * per_l2;
            t.entries
                .iter()
                .enumerate()
                .map(move |(j, &e)| (first + j as u64, e))
                .take_while(move |&(vc, _)| vc < limit)
        })
    }

    /// Every mapped virtual cluster in ascending order, with what it holds.
    pub fn clusters(&self) -> impl Iterator<Item = (u64, Cluster)> + '_ {
        self.entries()
            .filter_map(|(vc, e)| Some((vc, Self::decode(e)?)))
    }

    /// Virtual clusters that hold data.
    pub fn data_clusters(&self) -> u64 {
        self.clusters()
            .filter(|(_, c)| matches!(c, Cluster::Data(_)))
            .count() as u64
    }
}

/// A qcow2 image, read and checked.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its header.
    pub header: Header,
    /// Its first address table.
    pub table1: Table1,
    /// The file's length as the reader saw it.
    pub file_len: u64,
}

/// Host clusters the image uses, to catch two users of one cluster.
struct Claims {
    bits: Vec<u64>,
    cluster_bits: u32,
}

impl Claims {
    fn new(file_len: u64, cluster_bits: u32) -> Result<Claims, Qcow2Error> {
        let clusters = file_len.div_ceil(1 << cluster_bits);
        let bits = crate::support::try_filled(clusters.div_ceil(64), 0u64)
            .ok_or_else(|| Qcow2Error::TooLarge(format!("cluster map of {clusters} clusters")))?;
        Ok(Claims { bits, cluster_bits })
    }

    /// Claims the clusters of `[offset, offset + len)` for `what`.
    fn claim(
        &mut self,
        what: &dyn Fn() -> String,
        offset: u64,
        len: u64,
    ) -> Result<(), Qcow2Error> {
        let first = offset >> self.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.cluster_bits;
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, c % 64);
            let word = self
                .bits
                .get_mut(w)
                .ok_or_else(|| invalid(format!("{} lies outside the file", what())))?;
            if *word & (1 << b) != 0 {
                return Err(invalid(format!(
                    "{} overlaps other metadata or data at host cluster {:#x}",
                    what(),
                    c << self.cluster_bits
                )));
            }
            *word |= 1 << b;
        }
        Ok(())
    }
}

/// Reads the image on `dev` (its whole capacity is the file) and checks
/// it: header, L1 and L2 tables, refcount structures.
pub fn open<D: BlockDevice + ?Sized>(dev: &D) -> Result<Image, Qcow2Error> {
    let file_len = dev.info().bytes();
    if file_len < V3_HEADER_LEN as u64 {
        return Err(Qcow2Error::NotQcow2);
    }
    let mut first = vec![0u8; V3_HEADER_LEN as usize];
    read_bytes(dev, 0, &mut first)?;
    if be32(&first, 0) != MAGIC {
        return Err(Qcow2Error::NotQcow2);
    }
    let cluster_bits = be32(&first, 20);
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        first = buffer((1u64 << cluster_bits).min(file_len), "header cluster")?;
        read_bytes(dev, 0, &mut first)?;
    }
    let header = Header::parse(&first, file_len)?;
    let cs = header.cluster_size();
    let mut claims = Claims::new(file_len, header.cluster_bits)?;
    claims.claim(&|| "the header".into(), 0, 1)?;
    claims.claim(
        &|| "the refcount table".into(),
        header.refcount_table_offset,
        u64::from(header.refcount_table_clusters) * cs,
    )?;
    if header.l1_size > 0 {
        claims.claim(
            &|| "the L1 table".into(),
            header.l1_offset,
            u64::from(header.l1_size) * 8,
        )?;
    }
    if header.nb_snapshots > 0 {
        claims.claim(
            &|| "the snapshot table".into(),
            header.snapshots_offset,
            u64::from(header.nb_snapshots) * 40,
        )?;
    }

    let mut raw = buffer(u64::from(header.l1_size) * 8, "L1 table")?;
    read_bytes(dev, header.l1_offset, &mut raw)?;
    let l1: Vec<u64> = raw.chunks_exact(8).map(|b| be64(b, 0)).collect();
    let per_l2 = cs / 8;
    let needed = header.virtual_clusters().div_ceil(per_l2);
    let mut l2 = Vec::new();
    let mut table = buffer(cs, "L2 table")?;
    for (i, &entry) in l1.iter().enumerate().take(needed as usize) {
        let offset = entry & OFFSET_MASK;
        if entry & L1_RESERVED != 0 {
            return Err(invalid(format!(
                "L1 entry {i} ({entry:#x}) has reserved bits set"
            )));
        }
        if offset == 0 {
            continue;
        }
        placed(&format!("L2 table {i}"), offset, cs, cs, file_len)?;
        claims.claim(&|| format!("L2 table {i} at {offset:#x}"), offset, cs)?;
        read_bytes(dev, offset, &mut table)?;
        l2.push(L2Table {
            l1_index: i as u32,
            entries: table.chunks_exact(8).map(|b| be64(b, 0)).collect(),
        });
    }
    // Entries past the virtual size must not point at tables the walk
    // above skipped; a reader ignores them, so they are dropped.
    let table1 = Table1::new(
        header.cluster_bits,
        header.virtual_size,
        l1.iter()
            .enumerate()
            .map(|(i, &e)| if (i as u64) < needed { e } else { 0 })
            .collect(),
        l2,
        file_len,
    )?;
    for (vc, entry) in table1.entries() {
        // Data, or a preallocated zero cluster, which still owns its host
        // cluster.
        let host = entry & OFFSET_MASK;
        if host != 0 {
            claims.claim(
                &|| format!("the cluster for virtual offset {:#x}", vc * cs),
                host,
                cs.min(file_len - host),
            )?;
        }
    }
    check_refcounts(dev, &header, &mut claims, file_len)?;
    Ok(Image {
        header,
        table1,
        file_len,
    })
}

/// Reads the refcount table and blocks: each block is placed and claimed,
/// and every cluster the image uses has a refcount of at least one.
fn check_refcounts<D: BlockDevice + ?Sized>(
    dev: &D,
    header: &Header,
    claims: &mut Claims,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    let cs = header.cluster_size();
    let mut raw = buffer(
        u64::from(header.refcount_table_clusters) * cs,
        "refcount table",
    )?;
    read_bytes(dev, header.refcount_table_offset, &mut raw)?;
    let table: Vec<u64> = raw.chunks_exact(8).map(|b| be64(b, 0)).collect();
    let bits = u64::from(header.refcount_bits());
    let per_block = cs * 8 / bits;
    let file_clusters = file_len.div_ceil(cs);
    // Blocks needed to describe the file; the rest must be absent or
    // describe clusters past its end.
    let mut blocks = Vec::new();
    for (i, &entry) in table.iter().enumerate() {
        if entry & REFTABLE_RESERVED != 0 {
            return Err(invalid(format!(
                "refcount table entry {i} ({entry:#x}) has reserved bits set"
            )));
        }
        if entry == 0 {
            continue;
        }
        placed(&format!("refcount block {i}"), entry, cs, cs, file_len)?;
        claims.claim(&|| format!("refcount block {i} at {entry:#x}"), entry, cs)?;
        blocks.push((i as u64, entry));
    }
    // Every used cluster needs a nonzero refcount.
    let used = &claims.bits;
    let mut block = buffer(cs, "refcount block")?;
    let refcount = |block: &[u8], k: u64| -> u64 {
        let bit = k * bits;
        match bits {
            64 => be64(block, (bit / 8) as usize),
            32 => u64::from(be32(block, (bit / 8) as usize)),
            16 => {
                let at = (bit / 8) as usize;
                u64::from(u16::from_be_bytes([block[at], block[at + 1]]))
            }
            8 => u64::from(block[(bit / 8) as usize]),
            // Sub-byte widths count from the least significant bit.
            _ => u64::from(block[(bit / 8) as usize] >> (bit % 8)) & ((1 << bits) - 1),
        }
    };
    let mut loaded = u64::MAX;
    for c in 0..file_clusters {
        if used[(c / 64) as usize] & (1 << (c % 64)) == 0 {
            continue;
        }
        let b = c / per_block;
        if b != loaded {
            match blocks.iter().find(|(i, _)| *i == b) {
                Some(&(_, offset)) => read_bytes(dev, offset, &mut block)?,
                None => {
                    return Err(invalid(format!(
                        "host cluster {:#x} is in use but has no refcount block",
                        c * cs
                    )))
                }
            }
            loaded = b;
        }
        if refcount(&block, c % per_block) == 0 {
            return Err(invalid(format!(
                "host cluster {:#x} is in use but its refcount is 0",
                c * cs
            )));
        }
    }
    Ok(())
}

/// Where a new qcow2 image's pieces go: what a restore writes. Cluster 0
/// holds the header, then come the refcount table, the refcount blocks,
/// the L1 table, the L2 tables and the data clusters, all dense. Data
/// cluster `i` (in the order given) lives at `data_offset + i * cluster`.
/// Refcounts are 16 bits wide and every cluster of the file counts one.
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
    /// L1 indices that get an L2 table, ascending.
    pub l2_tables: Vec<u64>,
    /// Data clusters.
    pub data_clusters: u64,
}

impl NewImage {
    /// The layout for an image of `virtual_size` whose data clusters sit at
    /// the virtual clusters of `runs` (ascending; `to` is ignored: data is
    /// placed in the runs' order).
    pub fn new(cluster_bits: u32, virtual_size: u64, runs: &[super::run::Run]) -> NewImage {
        let cs = 1u64 << cluster_bits;
        let per_l2 = cs / 8;
        let l1_size = virtual_size.div_ceil(cs).div_ceil(per_l2);
        let mut l2_tables: Vec<u64> = Vec::new();
        let mut data_clusters = 0;
        for r in runs {
            for i in r.from / per_l2..=(r.from + r.len - 1) / per_l2 {
                if l2_tables.last() != Some(&i) {
                    l2_tables.push(i);
                }
            }
            data_clusters += r.len;
        }
        let mut image = NewImage {
            cluster_bits,
            virtual_size,
            reftable_clusters: 1,
            refblocks: 1,
            l1_clusters: (l1_size * 8).div_ceil(cs).max(1),
            l1_size,
            l2_tables,
            data_clusters,
        };
        // The refcount structures count themselves: grow them until they
        // cover the whole file.
        let per_block = cs / 2;
        loop {
            let total = image.clusters();
            let refblocks = total.div_ceil(per_block);
            let reftable_clusters = (refblocks * 8).div_ceil(cs);
            if (refblocks, reftable_clusters) == (image.refblocks, image.reftable_clusters) {
                return image;
            }
            image.refblocks = refblocks.max(image.refblocks);
            image.reftable_clusters = reftable_clusters.max(image.reftable_clusters);
        }
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
        self.l2_offset() + self.l2_tables.len() as u64 * self.cluster_size()
    }

    /// The metadata: the bytes of `[0, data_offset)`, for data at the
    /// virtual clusters of `runs` (the same runs [`NewImage::new`] got).
    pub fn metadata(&self, runs: &[super::run::Run]) -> Vec<u8> {
        let cs = self.cluster_size();
        let per_l2 = cs / 8;
        let mut b = vec![0u8; self.data_offset() as usize];
        let put32 = |b: &mut [u8], at: u64, v: u32| {
            b[at as usize..at as usize + 4].copy_from_slice(&v.to_be_bytes())
        };
        let put64 = |b: &mut [u8], at: u64, v: u64| {
            b[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes())
        };
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.virtual_size);
        put32(&mut b, 36, self.l1_size as u32);
        put64(&mut b, 40, self.l1_offset());
        put64(&mut b, 48, self.reftable_offset());
        put32(&mut b, 56, self.reftable_clusters as u32);
        put32(&mut b, 96, 4);
        put32(&mut b, 100, V3_HEADER_LEN);
        // The header extensions that follow are all zero: the end marker.
        for i in 0..self.refblocks {
            put64(
                &mut b,
                self.reftable_offset() + 8 * i,
                self.refblocks_offset() + i * cs,
            );
        }
        for c in 0..self.clusters() {
            put_u16(&mut b, self.refblocks_offset() + 2 * c, 1);
        }
        for (k, &i) in self.l2_tables.iter().enumerate() {
            let l2 = self.l2_offset() + k as u64 * cs;
            put64(&mut b, self.l1_offset() + 8 * i, COPIED | l2);
        }
        let mut table = 0;
        let mut copy = 0;
        for r in runs {
            for vc in r.from..r.from + r.len {
                while self.l2_tables[table] != vc / per_l2 {
                    table += 1;
                }
                let entry = self.l2_offset() + table as u64 * cs + 8 * (vc % per_l2);
                put64(&mut b, entry, COPIED | (self.data_offset() + copy * cs));
                copy += 1;
            }
        }
        b
    }
}

fn put_u16(b: &mut [u8], at: u64, v: u16) {
    b[at as usize..at as usize + 2].copy_from_slice(&v.to_be_bytes());
}
