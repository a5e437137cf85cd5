//! A qcow2 image served as a block device, read-write, over its backing
//! chain.
//!
//! Reads look each cluster up and coalesce runs: data runs read the image
//! file, holes read the backing device (zeros without one), zero clusters
//! are zeros. A write to a data cluster goes in place; a write to a hole
//! or zero cluster allocates ([`Qcow2Disk::materialize`]): the rest of the
//! cluster is filled from what it read as before, then the L2 table
//! exists, the new cluster is counted in the cached refcount block, its
//! data are written, and the entry is published in the cached L2 table.
//! The metadata reach the disk lazily, as with QEMU's caches
//! ([`Qcow2Disk::write_back`]): refcounts written and the dirty L2 sectors
//! copied out, one flush (the refcounts and the data those entries point
//! at are durable), then the copies written; so no entry on disk ever
//! points at a cluster whose refcount or data is not durable. The flush
//! and the writes of the copies run without the tables' lock, so lookups
//! (reads of holes and zeros, which need no other disk) go on meanwhile;
//! entries published meanwhile wait for the next write-back.
//!
//! A crash therefore loses at most the writes since the last flush, leaks
//! at most the clusters allocated since the last write-back (see
//! [`super::refcount`] for refcount-table growth) and never corrupts.
//!
//! Locking: one lock over the tables and refcounts, held for lookups and
//! metadata updates, not while data moves. Two writers racing for the same
//! hole both allocate; the second to publish finds the entry changed,
//! frees its cluster and writes again over the winner's mapping.
//!
//! This module must never write to the backing device, nor write in place
//! to a cluster shared with another user (refcount above one).

use alloc::boxed::Box;
use alloc::format;
use alloc::string::ToString;
use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::refcount::Refcounts;
use super::tables::{Entry, Tables};
use super::{Geometry, Result};
use crate::backup::qcow2::{be64, buffer, host_of, invalid, Header, Qcow2Error, COPIED};
use crate::backup::source;
use crate::devices::block::{
    read_bytes, write_bytes, BlockDevice, BlockError, DiskInfo, ErrorKind, Op, Status, SECTOR_SIZE,
};
use crate::devices::extended::ZeroExtended;

mod reads;
mod writeback;

/// Most requests in flight when the split's batch data goes out.
pub const WRITE_DEPTH: usize = 8;

/// Incompatible feature bit of extended L2 entries (subclusters).
const INCOMPAT_EXTENDED_L2: u64 = 1 << 4;

#[derive(Debug)]
struct Meta {
    tables: Tables,
    rc: Option<Refcounts>,
    /// Write-backs started (copies taken).
    generation: u64,
}

/// A qcow2 image on the device `D`, served as a disk; see the module docs.
pub struct Qcow2Disk<D> {
    info: DiskInfo,
    file: D,
    backing: Option<Box<dyn BlockDevice>>,
    detached: AtomicBool,
    /// Largest request of newly allocated clusters (0: a whole run).
    write_chunk: AtomicU64,
    /// Such requests sent together, in flight at once.
    write_depth: AtomicU64,
    geo: Geometry,
    header: Header,
    meta: spin::Mutex<Meta>,
    /// Held by the write-back in progress: one at a time, in order.
    write_back: spin::Mutex<()>,
    /// Write-backs whose copies are on disk (shared with the tables).
    written: Arc<AtomicU64>,
    /// A write-back failed: what it held may not be on disk, so no later
    /// one may claim the image is up to date.
    failed: AtomicBool,
}

impl<D: BlockDevice> Qcow2Disk<D> {
    /// Opens the image on `file` (writable if the device is) over
    /// `backing`, which must be given exactly when the header names a
    /// backing file and be at least as large as the image. Checks the
    /// whole image first (tables, refcounts, overlaps) and refuses
    /// features it does not handle, by name.
    pub fn open(file: D, backing: Option<Box<dyn BlockDevice>>) -> Result<Self> {
        let header = source::read_header(&file)?;
        let writable = !file.info().read_only;
        refuse_features(&file, &header, writable)?;
        match (&header.backing_file, &backing) {
            (Some(name), None) => {
                return Err(invalid(format!("backing file \"{name}\" is not attached")))
            }
            (None, Some(_)) => return Err(invalid("a backing device for an image without one")),
            _ => {}
        }
        // A backing image smaller than this one reads as zeros past its
        // end, as QEMU reads it (an overlay grown by `qemu-img resize`).
        let backing = backing.map(|b| ZeroExtended::to(b, header.virtual_size));
        source::open(&file, &mut |_| {})?;
        let geo = Geometry::new(&header, file.info().bytes());
        let mut tables = Tables::open(&file, &geo, header.l1_size)?;
        tables.check_all(&file, &geo)?;
        let rc = if writable {
            clear_autoclear(&file)?;
            let (at, n) = (header.refcount_table_offset, header.refcount_table_clusters);
            Some(Refcounts::open(&file, &geo, at, u64::from(n))?)
        } else {
            None
        };
        let written = tables.written();
        let info = DiskInfo {
            name: file.info().name.clone(),
            sectors: header.virtual_size / SECTOR_SIZE as u64,
            block_size: geo.cs.min(4096) as u32,
            read_only: !writable,
            flush: true,
            max_depth: file.info().max_depth,
        };
        Ok(Qcow2Disk {
            info,
            file,
            backing,
            detached: AtomicBool::new(false),
            write_chunk: AtomicU64::new(0),
            write_depth: AtomicU64::new(1),
            geo,
            header,
            meta: spin::Mutex::new(Meta {
                tables,
                rc,
                generation: 0,
            }),
            write_back: spin::Mutex::new(()),
            written,
            failed: AtomicBool::new(false),
        })
    }

    /// Caps each transfer of newly allocated clusters at `bytes` (rounded
    /// up to a cluster; 0: a whole run at once), so that other requests
    /// to the image's disk wait for at most one such transfer.
    pub fn set_write_chunk(&self, bytes: u64) {
        self.write_chunk.store(bytes, Ordering::Relaxed);
    }

    /// Sends up to `requests` such chunks together, all in flight at once
    /// (1, the default, to [`WRITE_DEPTH`]): other requests to the image's
    /// disk then wait for at most that many chunks, written side by side.
    pub fn set_write_depth(&self, requests: usize) {
        let n = requests.clamp(1, WRITE_DEPTH);
        self.write_depth.store(n as u64, Ordering::Relaxed);
    }

    /// The geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geo
    }

    /// The header as it was opened.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The device holding the image.
    pub fn file(&self) -> &D {
        &self.file
    }

    /// Gives the device holding the image back.
    pub fn into_file(self) -> D {
        self.file
    }

    /// Whether reads of holes still go to a backing device.
    pub fn has_backing(&self) -> bool {
        self.backing.is_some() && !self.detached.load(Ordering::Acquire)
    }

    /// What virtual cluster `vc` maps to now.
    pub fn entry(&self, vc: u64) -> Result<Entry> {
        self.meta.lock().tables.entry(&self.file, &self.geo, vc)
    }

    /// Reads what the chain below this image holds at `offset` (zeros
    /// without a backing device).
    pub fn read_below(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.backing {
            Some(b) if !self.detached.load(Ordering::Acquire) => read_bytes(b, offset, buf)?,
            _ => buf.fill(0),
        }
        Ok(())
    }

    /// Whether the chain below holds data anywhere in virtual cluster `vc`
    /// (false: it reads as zeros there, and need not be read).
    pub fn data_below(&self, vc: u64) -> Result<bool> {
        let g = &self.geo;
        match &self.backing {
            Some(b) if !self.detached.load(Ordering::Acquire) => {
                holds_data(b, vc * g.cs / 512, g.cluster_len(vc) / 512)
            }
            _ => Ok(false),
        }
    }

    /// The longest run from virtual `offset` (at most `len` bytes) whose
    /// clusters map alike: one hole run, one zero run, or data clusters
    /// consecutive in the file.
    fn run(&self, offset: u64, len: u64) -> Result<(Entry, u64)> {
        let g = &self.geo;
        let mut m = self.meta.lock();
        let vc = offset / g.cs;
        let first = m.tables.entry(&self.file, g, vc)?;
        let mut n = (g.cs - offset % g.cs).min(len);
        let mut k = 1;
        while n < len {
            let next = m.tables.entry(&self.file, g, vc + k)?;
            let alike = match (first, next) {
                (Entry::Hole, Entry::Hole) => true,
                (Entry::Zero | Entry::ZeroAlloc(_), Entry::Zero | Entry::ZeroAlloc(_)) => true,
                (Entry::Data(a) | Entry::Shared(a), Entry::Data(b) | Entry::Shared(b)) => {
                    b == a + k * g.cs
                }
                _ => false,
            };
            if !alike {
                break;
            }
            n = (n + g.cs).min(len);
            k += 1;
        }
        Ok((first, n))
    }

    /// Reads `buf` at virtual `offset` (both whole sectors, in range).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.in_range(offset, buf.len())?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (entry, n) = self.run(at, (buf.len() - done) as u64)?;
            let part = &mut buf[done..done + n as usize];
            match entry {
                Entry::Hole => self.read_below(at, part)?,
                Entry::Zero | Entry::ZeroAlloc(_) => part.fill(0),
                Entry::Data(h) | Entry::Shared(h) => {
                    read_bytes(&self.file, h + at % self.geo.cs, part)?
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Writes `data` at virtual `offset` (both whole sectors, in range).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.in_range(offset, data.len())?;
        let cs = self.geo.cs;
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let n = ((cs - at % cs) as usize).min(data.len() - done);
            self.write_in_cluster(at, &data[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Refuses `len` bytes at virtual `offset` unless they lie within the
    /// disk, as the device itself refuses such a request.
    fn in_range(&self, offset: u64, len: usize) -> Result<()> {
        let end = offset.checked_add(len as u64);
        if end.is_some_and(|end| end <= self.info.bytes()) {
            return Ok(());
        }
        let kind = ErrorKind::OutOfRange {
            capacity: self.info.sectors,
        };
        Err(BlockError::new(&self.info.name, Some(offset / SECTOR_SIZE as u64), kind).into())
    }

    /// Writes a piece of one cluster.
    pub fn write_in_cluster(&self, at: u64, data: &[u8]) -> Result<()> {
        let g = &self.geo;
        let (vc, within) = (at / g.cs, (at % g.cs) as usize);
        loop {
            let entry = self.entry(vc)?;
            match entry {
                Entry::Data(h) => return Ok(write_bytes(&self.file, h + within as u64, data)?),
                Entry::Shared(h) => return Err(shared(vc, g, h)),
                _ => {}
            }
            let len = g.cluster_len(vc) as usize;
            let mut buf = buffer(g.cs, "cluster buffer")?;
            if !(within == 0 && data.len() == len) && entry == Entry::Hole {
                self.read_below(vc * g.cs, &mut buf[..len])?;
            }
            buf[within..within + data.len()].copy_from_slice(data);
            if self.materialize(&[(vc, entry, Some(0))], &buf)? {
                return Ok(());
            }
        }
    }

    /// Makes whole virtual clusters read as zeros, or writes zeros into
    /// parts of clusters. `offset` and `len` are whole sectors, in range.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let g = &self.geo;
        let mut at = offset;
        while at < offset + len {
            let vc = at / g.cs;
            let n = (g.cs - at % g.cs).min(offset + len - at);
            if at.is_multiple_of(g.cs) && n == g.cluster_len(vc) {
                let entry = self.entry(vc)?;
                let zero = match entry {
                    Entry::Data(h) => Some(Entry::ZeroAlloc(h)),
                    Entry::Shared(h) => return Err(shared(vc, g, h)),
                    Entry::Hole => Some(Entry::Zero),
                    Entry::Zero | Entry::ZeroAlloc(_) => None,
                };
                if let Some(zero) = zero {
                    let mut m = self.meta.lock();
                    let Meta { tables, rc, .. } = &mut *m;
                    let rc = rc.as_mut().ok_or_else(read_only)?;
                    tables.ensure(&self.file, g, rc, vc / g.l2_entries)?;
                    tables.publish(&self.file, g, &[(vc, zero)])?;
                    self.bound_dirty(&mut m)?;
                }
            } else {
                let zeros = buffer(n, "zero buffer")?;
                self.write_in_cluster(at, &zeros)?;
            }
            at += n;
        }
        Ok(())
    }

    /// Gives virtual clusters of one L2 table, each last seen as `was` (a
    /// hole or zero), their content: `Some(k)` a cluster holding chunk `k`
    /// of `data` (chunks of a whole cluster each), `None` a zero entry. In
    /// order: the L2 table exists, the new clusters are counted (in the
    /// cache) and their data written, then the entries are published in
    /// the cached table, to be written after the next flush
    /// ([`Self::write_back`]). Returns false, with nothing published, if
    /// any entry changed meanwhile (a racing write): the caller looks
    /// again.
    pub fn materialize(&self, items: &[(u64, Entry, Option<usize>)], data: &[u8]) -> Result<bool> {
        let g = &self.geo;
        let Some(&(first, _, _)) = items.first() else {
            return Ok(true);
        };
        let mut hosts = Vec::new();
        hosts
            .try_reserve_exact(items.len())
            .map_err(|_| Qcow2Error::TooLarge("cluster batch".to_string()))?;
        {
            let mut m = self.meta.lock();
            let Meta { tables, rc, .. } = &mut *m;
            let rc = rc.as_mut().ok_or_else(read_only)?;
            tables.ensure(&self.file, g, rc, first / g.l2_entries)?;
            for &(_, was, chunk) in items {
                hosts.push(match (was, chunk) {
                    (_, None) => 0,
                    (Entry::ZeroAlloc(h), Some(_)) => h,
                    (_, Some(_)) => rc.alloc(&self.file, g)? * g.cs,
                });
            }
        }
        // The data need only be durable before the entries are written,
        // which waits for the next write-back's flush.
        self.write_data(items, &hosts, data)?;
        let mut m = self.meta.lock();
        let Meta { tables, rc, .. } = &mut *m;
        let mut entries = Vec::new();
        entries
            .try_reserve_exact(items.len())
            .map_err(|_| Qcow2Error::TooLarge("cluster batch".to_string()))?;
        for (&(vc, was, _), &h) in items.iter().zip(&hosts) {
            if tables.entry(&self.file, g, vc)? != was {
                let rc = rc.as_mut().ok_or_else(read_only)?;
                for (&(_, was, _), &h) in items.iter().zip(&hosts) {
                    if h != 0 && !matches!(was, Entry::ZeroAlloc(_)) {
                        rc.set_refcount(&self.file, g, h / g.cs, 0)?;
                    }
                }
                return Ok(false);
            }
            entries.push((vc, if h == 0 { Entry::Zero } else { Entry::Data(h) }));
        }
        tables.publish(&self.file, g, &entries)?;
        self.bound_dirty(&mut m)?;
        Ok(true)
    }

    /// Makes every completed write durable, metadata included: write-back,
    /// then flush.
    pub fn flush(&self) -> Result<()> {
        self.write_back()?;
        Ok(self.file.flush()?)
    }

    /// Ends the association with the backing file: flush, rewrite the
    /// header without the backing name and backing format, flush. From
    /// then on holes read as zeros.
    pub fn release_backing(&self) -> Result<()> {
        self.flush()?;
        let len = self.geo.cs.min(self.geo.file_len);
        let mut first = buffer(len, "header cluster")?;
        read_bytes(&self.file, 0, &mut first)?;
        super::create::set_backing(&mut first, None)?;
        write_bytes(&self.file, 0, &first)?;
        self.file.flush()?;
        self.detached.store(true, Ordering::Release);
        Ok(())
    }
}

/// Bytes of memory opening the image with `header` on a device of
/// `file_len` bytes needs at most: the checks of [`source::open`], the L1
/// table, the refcount table, the L2 cache, a refcount block and a cluster
/// buffer.
pub fn open_memory(header: &Header, file_len: u64) -> u64 {
    let cs = header.cluster_size();
    source::open_memory(header.cluster_bits, file_len)
        + l1_memory(header)
        + u64::from(header.refcount_table_clusters) * cs * 2
        + (super::tables::cached_l2(header.l1_size) as u64 + 2) * cs
}

/// Of [`open_memory`], the L1 table: read whole, then kept.
pub fn l1_memory(header: &Header) -> u64 {
    2 * u64::from(header.l1_size) * 8
}

/// Whether any of the `sectors` from `sector` of `d` hold data, by its
/// block status.
pub fn holds_data<D: BlockDevice + ?Sized>(d: &D, sector: u64, sectors: u64) -> Result<bool> {
    let mut at = sector;
    while at < sector + sectors {
        let (s, n) = d.status(at)?;
        if s == Status::Data {
            return Ok(true);
        }
        at += n.max(1);
    }
    Ok(false)
}

fn shared(vc: u64, g: &Geometry, h: u64) -> Qcow2Error {
    Qcow2Error::Unsupported(format!(
        "writing the cluster of virtual offset {:#x} (host {h:#x}), which is shared \
         (refcount above one: an internal snapshot)",
        vc * g.cs
    ))
}

fn read_only() -> Qcow2Error {
    Qcow2Error::Invalid("write to an image opened read-only".to_string())
}

/// Refuses what the writable path does not handle: extended L2 entries,
/// internal snapshots (shared clusters), L2 tables without the copied flag.
fn refuse_features<D: BlockDevice>(file: &D, h: &Header, writable: bool) -> Result<()> {
    let mut sector = [0u8; SECTOR_SIZE];
    read_bytes(file, 0, &mut sector)?;
    if be64(&sector, 72) & INCOMPAT_EXTENDED_L2 != 0 {
        return Err(Qcow2Error::Unsupported(
            "extended L2 entries (subclusters)".into(),
        ));
    }
    if writable && h.nb_snapshots > 0 {
        return Err(Qcow2Error::Unsupported(format!(
            "writing an image with {} internal snapshot(s)",
            h.nb_snapshots
        )));
    }
    if writable {
        let used = h.virtual_clusters().div_ceil(h.cluster_size() / 8);
        let mut raw = buffer(used * 8, "L1 table")?;
        read_bytes(file, h.l1_offset, &mut raw)?;
        for i in 0..used {
            let e = be64(&raw, (i * 8) as usize);
            if host_of(e) != 0 && e & COPIED == 0 {
                return Err(Qcow2Error::Unsupported(format!(
                    "writing through L2 table {i}, which is shared (no copied flag)"
                )));
            }
        }
    }
    Ok(())
}

/// Clears the autoclear feature bits on opening for writing, as QEMU does:
/// whatever they vouch for (bitmaps) is not kept up to date here.
fn clear_autoclear<D: BlockDevice>(file: &D) -> Result<()> {
    let mut sector = [0u8; SECTOR_SIZE];
    read_bytes(file, 0, &mut sector)?;
    if be64(&sector, 88) != 0 {
        sector[88..96].fill(0);
        write_bytes(file, 0, &sector)?;
        file.flush()?;
    }
    Ok(())
}

impl<D: BlockDevice> BlockDevice for Qcow2Disk<D> {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], _depth: usize) -> core::result::Result<(), BlockError> {
        if ops.len() > 1 && ops.iter().all(|op| matches!(op, Op::Read { .. })) {
            for op in ops.iter() {
                crate::devices::block::check(&self.info, op)?;
            }
            let first = ops[0].extent().map_or(0, |(sector, _)| sector);
            return self
                .read_ops(ops)
                .map_err(|e| super::block_error(&self.info.name, first, e));
        }
        super::serve(self, ops)
    }

    fn status(&self, sector: u64) -> core::result::Result<(Status, u64), BlockError> {
        self.status_at(sector)
            .map_err(|e| super::block_error(&self.info.name, sector, e))
    }
}

impl<D: BlockDevice> super::Serve for Qcow2Disk<D> {
    fn disk_info(&self) -> &DiskInfo {
        &self.info
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Qcow2Disk::read_at(self, offset, buf)
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        Qcow2Disk::write_at(self, offset, data)
    }
    fn flush(&self) -> Result<()> {
        Qcow2Disk::flush(self)
    }
}

impl<D: BlockDevice> Qcow2Disk<D> {
    /// The block status of virtual `sector`: this image's own mapping, or
    /// the chain's below a hole.
    pub fn status_at(&self, sector: u64) -> Result<(Status, u64)> {
        let g = &self.geo;
        let at = sector * 512;
        let left = (g.cs - at % g.cs) / 512;
        Ok(match self.entry(at / g.cs)? {
            Entry::Data(_) | Entry::Shared(_) => (Status::Data, left),
            Entry::Zero | Entry::ZeroAlloc(_) => (Status::Zero, left),
            Entry::Hole => match &self.backing {
                Some(b) if !self.detached.load(Ordering::Acquire) => {
                    let (s, n) = b.status(sector)?;
                    (s, n.min(left))
                }
                _ => (Status::Zero, left),
            },
        })
    }
}

impl<D> core::fmt::Debug for Qcow2Disk<D> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("info", &self.info)
            .field("geo", &self.geo)
            .finish_non_exhaustive()
    }
}
