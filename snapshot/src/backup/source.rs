//! The source image's first address table (its L1 and L2 tables), walked
//! straight off the device a window at a time, and the checks that make
//! an image safe to back up ([`open`]).
//!
//! Memory is bounded by design: the walk holds one window of the L1
//! table ([`TABLE_WINDOW`] bytes) and up to 1 MiB of L2 tables read
//! ahead (at least one table, a cluster, at most 2 MiB; [`ahead`]),
//! whatever the virtual size or the number of tables. [`open`]
//! adds the refcount checks (one window of the refcount table, one
//! refcount block) and two maps of the file's host clusters, one bit
//! each, to catch two users of one cluster (compressed clusters may share
//! host clusters with each other, nothing else may): [`open_memory`] is the whole figure,
//! known from the header before anything else is allocated.
//!
//! This module must never write to the image it reads, and must never
//! hold a table whole.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::ahead::{self, L2Ahead};
use super::qcow2::{
    self, be32, be64, buffer, invalid, l2_entry, placed, Cluster, Compressed, Header, Qcow2Error,
    V3_HEADER_LEN,
};
use super::run::{Joiner, Run, Runs};
use crate::devices::block::{read_bytes, BlockDevice};

/// Bytes of the L1 and refcount tables read at a time.
pub const TABLE_WINDOW: u64 = 64 << 10;

/// Reads entries of an on-disk table of big-endian `u64`s a window at a
/// time, in ascending order.
pub(super) struct TableWindow {
    offset: u64,
    entries: u64,
    buf: Vec<u8>,
    first: u64,
    have: u64,
}

impl TableWindow {
    pub(super) fn new(offset: u64, entries: u64, what: &str) -> Result<TableWindow, Qcow2Error> {
        Ok(TableWindow {
            offset,
            entries,
            buf: buffer((entries * 8).min(TABLE_WINDOW), what)?,
            first: 0,
            have: 0,
        })
    }

    /// Entry `i` (`None` past the table's end).
    pub(super) fn get<D: BlockDevice + ?Sized>(
        &mut self,
        dev: &D,
        i: u64,
    ) -> Result<Option<u64>, Qcow2Error> {
        if i >= self.entries {
            return Ok(None);
        }
        if !(self.first..self.first + self.have).contains(&i) {
            let n = (self.buf.len() as u64 / 8).min(self.entries - i);
            read_bytes(dev, self.offset + i * 8, &mut self.buf[..(n * 8) as usize])?;
            (self.first, self.have) = (i, n);
        }
        Ok(Some(be64(&self.buf, ((i - self.first) * 8) as usize)))
    }
}

/// One piece of table 1 as the copy stage needs it: a run of clusters
/// that are read as they are, or one cluster that needs more than a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Data clusters consecutive in the virtual disk and the file (`to`
    /// is the host cluster).
    Run(Run),
    /// A compressed cluster: virtual cluster `vc`, its data in the file.
    Compressed {
        /// The virtual cluster.
        vc: u64,
        /// Where its compressed data lies.
        data: Compressed,
    },
    /// A cluster only some of whose subclusters are data.
    Subclusters {
        /// The virtual cluster.
        vc: u64,
        /// Its host cluster's offset.
        host: u64,
        /// Which subclusters are data (the rest read as zeros).
        data: u32,
    },
}

impl Piece {
    /// The piece as a run of table 1: a compressed cluster's host cluster
    /// is the one its data starts in.
    pub fn run(&self, cluster_bits: u32) -> Run {
        let one = |from, host: u64| Run {
            from,
            to: host >> cluster_bits,
            len: 1,
        };
        match *self {
            Piece::Run(r) => r,
            Piece::Compressed { vc, data } => one(vc, data.offset),
            Piece::Subclusters { vc, host, .. } => one(vc, host),
        }
    }
}

/// Table 1 of a source image, walked from its device: every mapped
/// virtual cluster in ascending order ([`Walk::next_cluster`]), the data
/// as [`Piece`]s ([`Walk::next_piece`]), or as runs of consecutive virtual
/// and host clusters ([`Runs`]; `to` is the host cluster, the host offset
/// over the cluster size).
pub struct Walk<'d, D: ?Sized> {
    dev: &'d D,
    cs: u64,
    extended: bool,
    per_l2: u64,
    vclusters: u64,
    file_len: u64,
    tables: L2Ahead,
    base: u64,
    next_j: u64,
    pending: Joiner,
    queued: Option<Piece>,
    claims: Option<Claims>,
}

impl<'d, D: BlockDevice + ?Sized> Walk<'d, D> {
    /// A walk over the tables of the image `header` describes, `file_len`
    /// bytes long, on `dev`.
    pub fn new(dev: &'d D, header: &Header, file_len: u64) -> Result<Self, Qcow2Error> {
        let cs = header.cluster_size();
        let per_l2 = cs / header.l2_entry_bytes();
        Ok(Walk {
            dev,
            cs,
            extended: header.extended_l2,
            per_l2,
            vclusters: header.virtual_clusters(),
            file_len,
            tables: L2Ahead::new(header, file_len)?,
            base: 0,
            next_j: per_l2,
            pending: Joiner::default(),
            queued: None,
            claims: None,
        })
    }

    /// Moves to the next L2 table; `false` when none is left.
    fn next_table(&mut self) -> Result<bool, Qcow2Error> {
        let Some((i, offset)) = self.tables.advance(self.dev)? else {
            return Ok(false);
        };
        if let Some(claims) = &mut self.claims {
            claims.claim(&|| format!("L2 table {i} at {offset:#x}"), offset, self.cs)?;
        }
        (self.base, self.next_j) = (i * self.per_l2, 0);
        Ok(true)
    }

    /// The next mapped virtual cluster and what it holds.
    pub fn next_cluster(&mut self) -> Result<Option<(u64, Cluster)>, Qcow2Error> {
        loop {
            if self.next_j == self.per_l2 && !self.next_table()? {
                return Ok(None);
            }
            // Unallocated entries (all zeros) are most of a sparse
            // image's tables: skipped a word at a time.
            let j = first_nonzero(self.tables.table(), self.next_j, self.per_l2);
            if j == self.per_l2 {
                self.next_j = j;
                continue;
            }
            let vc = self.base + j;
            self.next_j = j + 1;
            if vc >= self.vclusters {
                self.next_j = self.per_l2;
                continue;
            }
            let (cs, file_len, l2) = (self.cs, self.file_len, self.tables.table());
            let cluster = if self.extended {
                let at = (j * 16) as usize;
                let (entry, bitmap) = (be64(l2, at), be64(l2, at + 8));
                qcow2::l2_extended(entry, bitmap, vc, cs, file_len)?
            } else {
                l2_entry(be64(l2, (j * 8) as usize), vc, cs, file_len)?
            };
            if let Some(claims) = &mut self.claims {
                let what = || format!("the cluster for virtual offset {:#x}", vc * cs);
                match cluster {
                    // Data, or a preallocated zero cluster, which still
                    // owns its host cluster.
                    Some(Cluster::Data(host) | Cluster::Subclusters { host, .. }) => {
                        claims.claim(&what, host, cs.min(file_len - host))?
                    }
                    Some(Cluster::Compressed(c)) => {
                        let len = c.bytes.min(file_len.saturating_sub(c.offset));
                        claims.share(&what, c.offset, len)?
                    }
                    Some(Cluster::Zero) | None => {}
                }
            }
            if let Some(c) = cluster {
                return Ok(Some((vc, c)));
            }
        }
    }

    /// The next piece of the data: runs of plain data clusters as long as
    /// they go, compressed and partly allocated clusters one at a time.
    pub fn next_piece(&mut self) -> Result<Option<Piece>, Qcow2Error> {
        if let Some(p) = self.queued.take() {
            return Ok(Some(p));
        }
        let bits = self.cs.trailing_zeros();
        while let Some((vc, c)) = self.next_cluster()? {
            let single = match c {
                Cluster::Zero => continue,
                Cluster::Data(host) => {
                    let r = Run {
                        from: vc,
                        to: host >> bits,
                        len: 1,
                    };
                    match self.pending.add(r) {
                        Some(done) => return Ok(Some(Piece::Run(done))),
                        None => continue,
                    }
                }
                Cluster::Compressed(data) => Piece::Compressed { vc, data },
                Cluster::Subclusters { host, data } => Piece::Subclusters { vc, host, data },
            };
            return Ok(Some(match self.pending.finish() {
                Some(done) => {
                    self.queued = Some(single);
                    Piece::Run(done)
                }
                None => single,
            }));
        }
        Ok(self.pending.finish().map(Piece::Run))
    }
}

impl<D: BlockDevice + ?Sized> Runs<Qcow2Error> for Walk<'_, D> {
    fn next_run(&mut self) -> Result<Option<Run>, Qcow2Error> {
        let bits = self.cs.trailing_zeros();
        Ok(self.next_piece()?.map(|p| p.run(bits)))
    }
}

/// The first of the `entries` entries of `table` from entry `from` on
/// that is not all zero bytes; `entries` if none is.
fn first_nonzero(table: &[u8], from: u64, entries: u64) -> u64 {
    let size = table.len() as u64 / entries;
    let word = |at: usize| u64::from_ne_bytes(table[at..at + 8].try_into().expect("8 bytes"));
    let mut at = (from * size) as usize;
    // Eight words at a time while they are all zeros, then one by one.
    while at + 64 <= table.len() && (0..8).fold(0, |acc, k| acc | word(at + 8 * k)) == 0 {
        at += 64;
    }
    while at < table.len() && word(at) == 0 {
        at += 8;
    }
    (at as u64 / size).min(entries)
}

/// A qcow2 image, read and checked; its tables stay on the device.
#[derive(Debug, Clone)]
pub struct Image {
    /// Its header.
    pub header: Header,
    /// The file's length as the reader saw it.
    pub file_len: u64,
    /// Virtual clusters holding data.
    pub data_clusters: u64,
    /// Runs of table 1 (data clusters consecutive in both the virtual
    /// disk and the file).
    pub runs: u64,
}

impl Image {
    /// Walks its table 1 again, on the device it was opened from.
    pub fn walk<'d, D: BlockDevice + ?Sized>(&self, dev: &'d D) -> Result<Walk<'d, D>, Qcow2Error> {
        Walk::new(dev, &self.header, self.file_len)
    }
}

/// Bytes of memory [`open`] needs at most for an image of `file_len`
/// bytes with clusters of `1 << cluster_bits`: the host cluster map, the
/// walk's L1 window and L2 tables ([`ahead::memory`]), one refcount block
/// and a window of its table, the first cluster.
pub fn open_memory(cluster_bits: u32, file_len: u64) -> u64 {
    let cs = 1u64 << cluster_bits;
    claims_bytes(file_len, cluster_bits) + 2 * cs + TABLE_WINDOW + ahead::memory(cluster_bits)
}

/// Reads the header of the image on `dev` (its whole capacity is the file).
pub fn read_header<D: BlockDevice + ?Sized>(dev: &D) -> Result<Header, Qcow2Error> {
    let file_len = dev.info().bytes();
    if file_len < u64::from(V3_HEADER_LEN) {
        return Err(Qcow2Error::NotQcow2);
    }
    let mut first = alloc::vec![0u8; V3_HEADER_LEN as usize];
    read_bytes(dev, 0, &mut first)?;
    if be32(&first, 0) != qcow2::MAGIC {
        return Err(Qcow2Error::NotQcow2);
    }
    let cluster_bits = be32(&first, 20);
    if (qcow2::MIN_CLUSTER_BITS..=qcow2::MAX_CLUSTER_BITS).contains(&cluster_bits) {
        first = buffer((1u64 << cluster_bits).min(file_len), "header cluster")?;
        read_bytes(dev, 0, &mut first)?;
    }
    Header::parse(&first, file_len)
}

/// Reads the image on `dev` and checks it: header, L1 and L2 tables,
/// refcount structures. `on_run` sees each run of table 1 as the walk
/// finds it (so a caller can size and checksum what it derives from the
/// table without a second walk).
pub fn open<D: BlockDevice + ?Sized>(
    dev: &D,
    on_run: &mut dyn FnMut(&Run),
) -> Result<Image, Qcow2Error> {
    let file_len = dev.info().bytes();
    let header = read_header(dev)?;
    let cs = header.cluster_size();
    let mut claims = Claims::new(file_len, header.cluster_bits)?;
    claims.claim(&|| "the header".into(), 0, 1)?;
    let pieces = [
        (
            "the refcount table",
            header.refcount_table_offset,
            u64::from(header.refcount_table_clusters) * cs,
        ),
        (
            "the L1 table",
            header.l1_offset,
            u64::from(header.l1_size) * 8,
        ),
        (
            "the snapshot table",
            header.snapshots_offset,
            u64::from(header.nb_snapshots) * 40,
        ),
    ];
    for (what, offset, len) in pieces {
        if len > 0 {
            claims.claim(&|| String::from(what), offset, len)?;
        }
    }
    let mut walk = Walk::new(dev, &header, file_len)?;
    walk.claims = Some(claims);
    let (mut data_clusters, mut runs) = (0, 0);
    while let Some(r) = walk.next_run()? {
        on_run(&r);
        data_clusters += r.len;
        runs += 1;
    }
    let mut claims = walk.claims.take().expect("set above");
    drop(walk);
    check_refcounts(dev, &header, &mut claims, file_len)?;
    Ok(Image {
        header,
        file_len,
        data_clusters,
        runs,
    })
}

/// Bytes of the two maps of [`Claims`].
fn claims_bytes(file_len: u64, cluster_bits: u32) -> u64 {
    file_len.div_ceil(1 << cluster_bits).div_ceil(64) * 16
}

/// Host clusters the image uses, to catch two users of one cluster:
/// `own` marks clusters with one user (metadata, data), `shared` those
/// holding compressed data, which several compressed clusters may share
/// but nothing else may use.
struct Claims {
    own: Vec<u64>,
    shared: Vec<u64>,
    cluster_bits: u32,
}

impl Claims {
    fn new(file_len: u64, cluster_bits: u32) -> Result<Claims, Qcow2Error> {
        let words = claims_bytes(file_len, cluster_bits) / 16;
        let map = || {
            crate::support::try_filled(words, 0u64).ok_or_else(|| {
                Qcow2Error::TooLarge(format!(
                    "a map of the file's host clusters needs {} bytes",
                    words * 16
                ))
            })
        };
        Ok(Claims {
            own: map()?,
            shared: map()?,
            cluster_bits,
        })
    }

    fn used(&self, c: u64) -> bool {
        let (w, b) = ((c / 64) as usize, 1 << (c % 64));
        (self.own[w] | self.shared[w]) & b != 0
    }

    /// Claims the clusters of `[offset, offset + len)` for `what` alone.
    fn claim(
        &mut self,
        what: &dyn Fn() -> String,
        offset: u64,
        len: u64,
    ) -> Result<(), Qcow2Error> {
        self.mark(what, offset, len, false)
    }

    /// Claims the clusters of `[offset, offset + len)` for compressed data.
    fn share(
        &mut self,
        what: &dyn Fn() -> String,
        offset: u64,
        len: u64,
    ) -> Result<(), Qcow2Error> {
        self.mark(what, offset, len, true)
    }

    fn mark(
        &mut self,
        what: &dyn Fn() -> String,
        offset: u64,
        len: u64,
        shared: bool,
    ) -> Result<(), Qcow2Error> {
        let first = offset >> self.cluster_bits;
        let last = (offset + len.max(1) - 1) >> self.cluster_bits;
        for c in first..=last {
            let (w, b) = ((c / 64) as usize, 1u64 << (c % 64));
            let (Some(own), Some(sh)) = (self.own.get_mut(w), self.shared.get_mut(w)) else {
                return Err(invalid(format!("{} lies outside the file", what())));
            };
            if *own & b != 0 || (!shared && *sh & b != 0) {
                return Err(invalid(format!(
                    "{} overlaps other metadata or data at host cluster {:#x}",
                    what(),
                    c << self.cluster_bits
                )));
            }
            *if shared { sh } else { own } |= b;
        }
        Ok(())
    }
}

/// The refcount of entry `k` of a refcount block `bits` wide.
fn refcount(block: &[u8], bits: u64, k: u64) -> u64 {
    let bit = k * bits;
    let at = (bit / 8) as usize;
    match bits {
        64 => be64(block, at),
        32 => u64::from(be32(block, at)),
        16 => u64::from(u16::from_be_bytes([block[at], block[at + 1]])),
        8 => u64::from(block[at]),
        // Sub-byte widths count from the least significant bit.
        _ => u64::from(block[at] >> (bit % 8)) & ((1 << bits) - 1),
    }
}

/// Reads the refcount table (a window at a time) and blocks: each block is
/// placed and claimed, and every cluster the image uses has a refcount of
/// at least one.
fn check_refcounts<D: BlockDevice + ?Sized>(
    dev: &D,
    header: &Header,
    claims: &mut Claims,
    file_len: u64,
) -> Result<(), Qcow2Error> {
    let cs = header.cluster_size();
    let entries = u64::from(header.refcount_table_clusters) * cs / 8;
    let mut table = TableWindow::new(header.refcount_table_offset, entries, "refcount table")?;
    for i in 0..entries {
        let entry = table.get(dev, i)?.unwrap_or(0);
        if entry & qcow2::REFTABLE_RESERVED != 0 {
            return Err(invalid(format!(
                "refcount table entry {i} ({entry:#x}) has reserved bits set"
            )));
        }
        if entry != 0 {
            placed(&format!("refcount block {i}"), entry, cs, cs, file_len)?;
            claims.claim(&|| format!("refcount block {i} at {entry:#x}"), entry, cs)?;
        }
    }
    let bits = u64::from(header.refcount_bits());
    let per_block = cs * 8 / bits;
    let mut block = buffer(cs, "refcount block")?;
    let mut loaded = u64::MAX;
    for c in (0..file_len.div_ceil(cs)).filter(|&c| claims.used(c)) {
        let b = c / per_block;
        if b != loaded {
            match table.get(dev, b)? {
                Some(offset) if offset != 0 => read_bytes(dev, offset, &mut block)?,
                _ => {
                    return Err(invalid(format!(
                        "host cluster {:#x} is in use but has no refcount block",
                        c * cs
                    )))
                }
            }
            loaded = b;
        }
        if refcount(&block, bits, c % per_block) == 0 {
            return Err(invalid(format!(
                "host cluster {:#x} is in use but its refcount is 0",
                c * cs
            )));
        }
    }
    Ok(())
}

impl<D: ?Sized> core::fmt::Debug for Walk<'_, D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Walk")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}
