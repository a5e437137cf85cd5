//! The backup and restore engine; see the [subsystem docs](super).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::newimage::NewImage;
use super::qcow2::Qcow2Error;
use super::run::{Run, Runs};
use super::source::{self, Image};
use super::table::{self, Encoder};
use super::tape::{
    self, checksum, Digest, ExtentHeader, Header, Layout, MediumError, Trailer, BLOCK, HEADER_BYTES,
};
use crate::devices::block::{BlockDevice, BlockError, Op};

/// Bytes moved per batch of requests, at most (less when memory is short).
/// 16 MiB windows measured no faster under QEMU than 4 MiB ones.
pub const WINDOW: u64 = 4 << 20;
/// Requests in flight per batch.
const DEPTH: usize = 32;

/// Why a backup or restore stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The source image cannot be read.
    Source(Qcow2Error),
    /// The source reads part of its data from a backing file, which the
    /// backup cannot see.
    Backing(String),
    /// A disk failed.
    Io(BlockError),
    /// A disk is too small: which, and how many bytes the job needs.
    TooSmall {
        /// The disk's name.
        disk: String,
        /// Bytes needed.
        need: u64,
        /// Bytes it has.
        have: u64,
    },
    /// The medium cannot be restored.
    Medium(MediumError),
    /// Not enough memory for the tables or a single transfer buffer.
    NoMemory(u64),
    /// The job needs more memory than the guest has free: refused
    /// before it starts.
    TooLittleMemory {
        /// What would run: `backup` or `restore`.
        job: &'static str,
        /// Bytes it needs at least.
        need: u64,
        /// Bytes free.
        have: u64,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Source(e) => write!(f, "source: {e}"),
            Error::Backing(name) => write!(
                f,
                "source: has a backing file ({name}); its unallocated clusters \
                 read from there, which this backup cannot see (flatten it first: \
                 qemu-img convert -O qcow2 SRC FLAT)"
            ),
            Error::Io(e) => write!(f, "{e}"),
            Error::TooSmall { disk, need, have } => write!(
                f,
                "disk \"{disk}\" too small: needs {need} bytes, has {have}"
            ),
            Error::Medium(e) => write!(f, "{e}"),
            Error::NoMemory(bytes) => write!(f, "out of memory for a {bytes}-byte buffer"),
            Error::TooLittleMemory { job, need, have } => write!(
                f,
                "the {job} needs {need} bytes of kernel memory ({} MiB), the guest has {have} \
                 ({} MiB) free; give it more memory (--mem)",
                need.div_ceil(1 << 20),
                have >> 20
            ),
        }
    }
}

impl Error {
    /// Whether the job refused its input (an image or medium it cannot
    /// take, a disk too small) rather than failed while running (a disk
    /// error, no memory).
    pub fn is_refusal(&self) -> bool {
        !matches!(
            self,
            Error::Io(_) | Error::NoMemory(_) | Error::Source(Qcow2Error::Io(_))
        )
    }
}

impl From<BlockError> for Error {
    fn from(e: BlockError) -> Self {
        Error::Io(e)
    }
}

impl From<Qcow2Error> for Error {
    fn from(e: Qcow2Error) -> Self {
        Error::Source(e)
    }
}

impl From<MediumError> for Error {
    fn from(e: MediumError) -> Self {
        Error::Medium(e)
    }
}

/// The stage a progress report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Source to copy area.
    Copy,
    /// Copy area to medium.
    Stream,
    /// Medium to output.
    Restore,
}

impl Stage {
    /// Its name in traces and progress lines.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Copy => "copy",
            Stage::Stream => "stream",
            Stage::Restore => "restore",
        }
    }
}

/// Progress: `(stage, bytes done, bytes in the stage)`.
pub type Progress<'a> = &'a mut dyn FnMut(Stage, u64, u64);

/// Everything a backup decides before it moves data: the source read and
/// checked, and the medium's layout. Tables 2 and 3 are not held: table 2
/// follows from table 1 as it is walked ([`super::run::CopyRuns`]), table 3
/// from the layout ([`Layout::extent`]).
#[derive(Debug, Clone)]
pub struct Plan {
    /// The source, read and checked; its tables stay on the device.
    pub image: Image,
    /// The medium's layout.
    pub layout: Layout,
    /// Runs of table 1 on the medium.
    pub table1_runs: u64,
    /// The checksum of table 1 as it goes on the medium.
    pub table1_checksum: u64,
}

impl Plan {
    /// Reads and checks the source, sizing table 1 as the medium will hold
    /// it.
    pub fn new<S: BlockDevice + ?Sized>(source: &S) -> Result<Plan, Error> {
        let mut enc = Encoder::default();
        let image =
            source::open(source, &mut |r| enc.push(r, &mut |_| {})).map_err(Error::Source)?;
        if let Some(name) = &image.header.backing_file {
            return Err(Error::Backing(name.clone()));
        }
        let layout = Layout {
            cluster_bits: image.header.cluster_bits,
            data_clusters: image.data_clusters,
            table1_bytes: enc.bytes,
            table2_runs: 0,
        };
        Ok(Plan {
            image,
            layout,
            table1_runs: enc.runs,
            table1_checksum: enc.checksum(),
        })
    }

    /// Bytes of the copy area.
    pub fn copy_bytes(&self) -> u64 {
        self.layout.data_clusters * self.layout.cluster_size()
    }

    /// Bytes of memory the backup needs at least: see [`backup_memory`].
    pub fn memory_bytes(&self) -> u64 {
        backup_memory(self.layout.cluster_bits, self.image.file_len)
    }
}

/// Bytes of kernel memory a backup of a source of `file_len` bytes with
/// clusters of `1 << cluster_bits` needs at least, whatever its virtual
/// size or tables: the check of the source ([`source::open_memory`]: one
/// bit per host cluster, three clusters, two table windows), or, later,
/// one L2 table, a table window and one transfer unit (an extent: 1 MiB
/// and 512 bytes, or one cluster and 512), plus [`SLACK`]. Transfers use
/// up to [`WINDOW`] when memory allows.
pub fn backup_memory(cluster_bits: u32, file_len: u64) -> u64 {
    let cs = 1u64 << cluster_bits;
    let stride = BLOCK + cs.max(tape::EXTENT_DATA_BYTES);
    source::open_memory(cluster_bits, file_len).max(cs + source::TABLE_WINDOW + stride) + SLACK
}

/// Bytes of kernel memory a restore of a medium with clusters of
/// `1 << cluster_bits` needs at least: two table windows, one extent (1
/// MiB and 512 bytes, or one cluster and 512) and, for a qcow2 output,
/// the metadata writer's windows and one L2 table, plus [`SLACK`].
pub fn restore_memory(cluster_bits: u32) -> u64 {
    let cs = 1u64 << cluster_bits;
    let stride = BLOCK + cs.max(tape::EXTENT_DATA_BYTES);
    2 * table::WINDOW + stride.max(NewImage::memory(cluster_bits)) + SLACK
}

/// Small allocations besides the buffers (request lists, messages).
pub const SLACK: u64 = 256 << 10;

/// The kernel heap of a guest with `ram` bytes of memory: a sixteenth,
/// between 4 and 64 MiB, in whole pages. The host sizes jobs against it.
pub fn guest_heap_bytes(ram: u64) -> u64 {
    (ram / 16).clamp(4 << 20, 64 << 20) & !4095
}

/// What a finished backup did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupSummary {
    /// The source's virtual size.
    pub virtual_bytes: u64,
    /// Bytes of data clusters copied.
    pub data_bytes: u64,
    /// Bytes written to the medium: the stream's length.
    pub medium_bytes: u64,
    /// Runs in table 1 on the medium.
    pub table1_runs: u64,
    /// Extents on the medium.
    pub extents: u64,
}

pub(super) fn need(disk: &dyn BlockDevice, bytes: u64) -> Result<(), Error> {
    let have = disk.info().bytes();
    if have < bytes {
        return Err(Error::TooSmall {
            disk: disk.info().name.clone(),
            need: bytes,
            have,
        });
    }
    Ok(())
}

pub(super) fn depth(d: &dyn BlockDevice) -> usize {
    d.info().max_depth.clamp(1, DEPTH)
}

/// A zeroed buffer of `len` bytes, or [`Error::NoMemory`].
pub(super) fn zeroed(len: u64) -> Result<Vec<u8>, Error> {
    crate::support::try_filled(len, 0).ok_or(Error::NoMemory(len))
}

/// A transfer buffer for up to [`WINDOW`] bytes in whole `unit`s, and no
/// more than `wanted` units: as many as fit, halving when memory is short;
/// `(buffer, units)`.
pub(super) fn window(unit: u64, wanted: u64) -> Result<(Vec<u8>, u64), Error> {
    let mut units = (WINDOW / unit).clamp(1, wanted.max(1));
    loop {
        match zeroed(units * unit) {
            Ok(buf) => return Ok((buf, units)),
            Err(e) if units == 1 => return Err(e),
            Err(_) => units /= 2,
        }
    }
}

/// Writes `buf` at `sector` with the device's pieces of it in flight
/// together (a plain `write` sends them one at a time).
pub(super) fn write_deep(d: &dyn BlockDevice, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
    d.transfer(&mut [Op::Write { sector, buf }], depth(d))
}

/// Reads into `buf` from `sector`, the pieces in flight together.
pub(super) fn read_deep(
    d: &dyn BlockDevice,
    sector: u64,
    buf: &mut [u8],
) -> Result<(), BlockError> {
    d.transfer(&mut [Op::Read { sector, buf }], depth(d))
}

/// Backs `source` up to `tape` through the copy area on `scratch`.
/// Nothing is written before the sizes of both disks are checked.
pub fn backup(
    source: &dyn BlockDevice,
    scratch: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    progress: Progress<'_>,
) -> Result<BackupSummary, Error> {
    let plan = Plan::new(source)?;
    need(scratch, plan.copy_bytes())?;
    need(tape, plan.layout.stream_bytes())?;
    copy(&plan, source, scratch, progress)?;
    stream(&plan, source, scratch, tape, progress)?;
    Ok(BackupSummary {
        virtual_bytes: plan.image.header.virtual_size,
        data_bytes: plan.copy_bytes(),
        medium_bytes: plan.layout.stream_bytes(),
        table1_runs: plan.table1_runs,
        extents: plan.layout.extents(),
    })
}

/// The walk found other tables than the plan did: the image changed.
fn changed() -> Error {
    Error::Source(Qcow2Error::Invalid(
        "the image changed while it was read".into(),
    ))
}

/// Step 4: source clusters (table 1) into the copy area (table 2), a
/// window at a time; contiguous host clusters share one read. Table 1 is
/// walked again from the source.
fn copy(
    plan: &Plan,
    source: &dyn BlockDevice,
    scratch: &dyn BlockDevice,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let cs = plan.layout.cluster_size();
    let file_len = plan.image.file_len;
    let data = plan.layout.data_clusters;
    let (mut buf, per_window) = window(cs, data)?;
    let mut walk = plan.image.walk(source).map_err(Error::Source)?;
    let mut rest: Option<Run> = None; // what the last window left of a run
    let mut done = 0;
    while done < data {
        let n = per_window.min(data - done);
        // Runs of contiguous host clusters: (host cluster, count).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut filled = 0;
        while filled < n {
            let r = match rest.take() {
                Some(r) => r,
                None => walk
                    .next_run()
                    .map_err(Error::Source)?
                    .ok_or_else(changed)?,
            };
            let take = r.len.min(n - filled);
            runs.push((r.to, take));
            if take < r.len {
                rest = Some(Run {
                    from: r.from + take,
                    to: r.to + take,
                    len: r.len - take,
                });
            }
            filled += take;
        }
        let window = &mut buf[..(n * cs) as usize];
        let mut ops = Vec::with_capacity(runs.len());
        let mut left: &mut [u8] = window;
        for &(host, k) in &runs {
            let (piece, tail) = left.split_at_mut((k * cs) as usize);
            left = tail;
            // A last cluster that the file ends inside reads as zeros
            // past the end.
            let len = (k * cs).min(file_len - host * cs) as usize;
            piece[len..].fill(0);
            ops.push(Op::Read {
                sector: host * cs / 512,
                buf: &mut piece[..len],
            });
        }
        source.transfer(&mut ops, depth(source))?;
        drop(ops);
        write_deep(scratch, done * cs / 512, &buf[..(n * cs) as usize])?;
        done += n;
        progress(Stage::Copy, done * cs, plan.copy_bytes());
    }
    Ok(())
}

/// Writes table 1 to the tape from `HEADER_BYTES` on, walking the source
/// again and encoding it through `buf` (a whole number of sectors);
/// returns where the section, padded, ends. The encoding must be the one
/// the plan checksummed.
fn write_table1(
    plan: &Plan,
    source: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    buf: &mut [u8],
) -> Result<u64, Error> {
    let mut walk = plan.image.walk(source).map_err(Error::Source)?;
    let mut enc = Encoder::default();
    let (mut written, mut fill) = (HEADER_BYTES, 0usize);
    let mut rec = [0u8; table::MAX_RECORD];
    while let Some(r) = walk.next_run().map_err(Error::Source)? {
        let mut n = 0;
        enc.push(&r, &mut |b| {
            rec[..b.len()].copy_from_slice(b);
            n = b.len();
        });
        let fits = n.min(buf.len() - fill);
        buf[fill..fill + fits].copy_from_slice(&rec[..fits]);
        fill += fits;
        if fill == buf.len() {
            write_deep(tape, written / 512, buf)?;
            written += buf.len() as u64;
            buf[..n - fits].copy_from_slice(&rec[fits..n]);
            fill = n - fits;
        }
    }
    if enc.bytes != plan.layout.table1_bytes || enc.checksum() != plan.table1_checksum {
        return Err(changed());
    }
    let padded = (fill as u64).next_multiple_of(BLOCK) as usize;
    buf[fill..padded].fill(0);
    write_deep(tape, written / 512, &buf[..padded])?;
    Ok(written + padded as u64)
}

/// Step 5: header and table 1, then the copy area extent by extent as
/// table 3 places it, then the trailer; all sequential, then a flush.
fn stream(
    plan: &Plan,
    source: &dyn BlockDevice,
    scratch: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let layout = &plan.layout;
    let cs = layout.cluster_size();
    let header = Header {
        version: tape::VERSION,
        layout: *layout,
        table1_runs: plan.table1_runs,
        virtual_size: plan.image.header.virtual_size,
        source_bytes: plan.image.file_len,
        source: tape::SourceKind::Qcow2,
        table1_checksum: plan.table1_checksum,
        table2_checksum: checksum(&[]),
    }
    .encode();
    write_deep(tape, 0, &header)?;
    let stride = BLOCK + layout.extent_clusters() * cs;
    let (mut buf, extents_per_window) = window(stride, layout.extents())?;
    let mut written = write_table1(plan, source, tape, &mut buf)?;
    debug_assert_eq!(written, layout.data_offset());
    let mut digest = Digest::default();
    let total = plan.copy_bytes();
    let mut k = 0;
    while k < layout.extents() {
        let n = extents_per_window.min(layout.extents() - k);
        // Lay the window out as it goes on the medium: header, data, ...
        let mut pieces = Vec::with_capacity(n as usize);
        let mut rest: &mut [u8] = &mut buf;
        for i in k..k + n {
            let (first, len, _) = layout.extent(i);
            let (head, tail) = rest.split_at_mut(BLOCK as usize);
            let (data, tail) = tail.split_at_mut((len * cs) as usize);
            rest = tail;
            pieces.push((i, first, head, data));
        }
        let mut ops: Vec<Op<'_>> = pieces
            .iter_mut()
            .map(|(_, first, _, data)| Op::Read {
                sector: *first * cs / 512,
                buf: data,
            })
            .collect();
        scratch.transfer(&mut ops, depth(scratch))?;
        drop(ops);
        let mut len = 0;
        for (i, first, head, data) in pieces.iter_mut() {
            let sum = checksum(data);
            digest.add(sum);
            ExtentHeader {
                index: *i,
                first: *first,
                clusters: data.len() as u64 / cs,
                data_at: written + len + BLOCK,
                data_checksum: sum,
            }
            .encode_into(head);
            len += BLOCK + data.len() as u64;
        }
        write_deep(tape, written / 512, &buf[..len as usize])?;
        written += len;
        k += n;
        let (first, clusters, _) = layout.extent(k - 1);
        progress(Stage::Stream, (first + clusters) * cs, total);
    }
    debug_assert_eq!(written, layout.trailer_offset());
    let trailer = Trailer {
        extents: layout.extents(),
        data_clusters: layout.data_clusters,
        stream_bytes: layout.stream_bytes(),
        header_checksum: u64::from_le_bytes(header[4088..].try_into().expect("8 bytes")),
        digest: digest.value(),
    };
    tape.write(written / 512, &trailer.encode())?;
    tape.flush()?;
    if total == 0 {
        progress(Stage::Stream, 0, 0);
    }
    Ok(())
}
