//! The backup and restore engine; see the [subsystem docs](super).

use alloc::vec::Vec;

use super::copy::{copy_memory, Copier};
pub use super::error::Error;
use super::io::{changed, depth, need, windows, write_deep};
use super::newimage::NewImage;
use super::qcow2;
use super::run::Runs;
use super::source::{self, Image};
use super::table::{self, Encoder};
use super::tape::{
    self, checksum, Digest, ExtentHeader, Header, Layout, Trailer, BLOCK, HEADER_BYTES,
};
use crate::devices::block::{BlockDevice, BlockError, Op};

pub use super::io::WINDOW;

/// The stage a progress report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Source to memory (the copy, step 4).
    Copy,
    /// Memory to medium (step 5).
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
        enc.finish(&mut |_| {});
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

    /// Bytes of data to copy: the copy area table 2 numbers.
    pub fn copy_bytes(&self) -> u64 {
        self.layout.data_clusters * self.layout.cluster_size()
    }

    /// Bytes of memory the backup needs at least: see [`backup_memory`].
    pub fn memory_bytes(&self) -> u64 {
        backup_memory(&self.image.header, self.image.file_len)
    }

    /// Bytes of memory the backup takes at most, when memory allows its
    /// transfer windows their full [`WINDOW`] each.
    pub fn memory_bytes_at_most(&self) -> u64 {
        let h = &self.image.header;
        let stride = BLOCK + h.cluster_size().max(tape::EXTENT_DATA_BYTES);
        self.memory_bytes() + 2 * WINDOW.saturating_sub(stride)
    }
}

/// Bytes of kernel memory a backup of a source of `file_len` bytes with
/// clusters of `1 << cluster_bits` needs at least, whatever its virtual
/// size or tables: the check of the source ([`source::open_memory`]: two
/// bits per host cluster, three clusters, two table windows), or, later,
/// one L2 table, a table window, two transfer units (the copy's and the
/// stream's, each an extent: 1 MiB and 512 bytes, or one cluster and 512)
/// and a decoder of compressed clusters ([`copy_memory`]), plus
/// [`SLACK`]. Transfers use up to [`WINDOW`] each when memory allows.
pub fn backup_memory(header: &qcow2::Header, file_len: u64) -> u64 {
    let cs = header.cluster_size();
    let stride = BLOCK + cs.max(tape::EXTENT_DATA_BYTES);
    let running = cs + source::TABLE_WINDOW + 2 * stride + copy_memory(header);
    source::open_memory(header.cluster_bits, file_len).max(running) + SLACK
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

/// Runs two jobs and returns when both are done: at the same time where
/// the platform can (the kernel runs one on a second thread), else one
/// after the other ([`InTurn`]).
pub trait Overlap: Sync {
    /// Runs `a` and `b`.
    fn both(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send));
}

/// Runs the two jobs one after the other.
#[derive(Debug, Clone, Copy, Default)]
pub struct InTurn;

impl Overlap for InTurn {
    fn both(&self, a: &mut (dyn FnMut() + Send), b: &mut (dyn FnMut() + Send)) {
        a();
        b();
    }
}

/// Backs `source` up to `tape`, the copy and the stream in turn:
/// [`backup_overlapped`] with [`InTurn`].
pub fn backup(
    source: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    progress: Progress<'_>,
) -> Result<BackupSummary, Error> {
    backup_overlapped(source, tape, &InTurn, progress)
}

/// Backs `source` up to `tape`, each window's copy from the source
/// overlapped by `overlap` with the stream of the window before. Nothing
/// is written before the tape's size is checked.
pub fn backup_overlapped(
    source: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    overlap: &dyn Overlap,
    progress: Progress<'_>,
) -> Result<BackupSummary, Error> {
    let plan = Plan::new(source)?;
    need(tape, plan.layout.stream_bytes())?;
    pump(&plan, source, tape, overlap, progress)?;
    Ok(BackupSummary {
        virtual_bytes: plan.image.header.virtual_size,
        data_bytes: plan.copy_bytes(),
        medium_bytes: plan.layout.stream_bytes(),
        table1_runs: plan.table1_runs,
        extents: plan.layout.extents(),
    })
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
    let mut failed = None;
    // Each record into `buf`, a full `buf` to the tape.
    let mut put = |rec: &[u8]| {
        let fits = rec.len().min(buf.len() - fill);
        buf[fill..fill + fits].copy_from_slice(&rec[..fits]);
        fill += fits;
        if fill == buf.len() {
            if let Err(e) = write_deep(tape, written / 512, buf) {
                failed.get_or_insert(e);
            }
            written += buf.len() as u64;
            buf[..rec.len() - fits].copy_from_slice(&rec[fits..]);
            fill = rec.len() - fits;
        }
    };
    while let Some(r) = walk.next_run().map_err(Error::Source)? {
        enc.push(&r, &mut put);
    }
    enc.finish(&mut put);
    if let Some(e) = failed {
        return Err(e.into());
    }
    if enc.bytes != plan.layout.table1_bytes || enc.checksum() != plan.table1_checksum {
        return Err(changed());
    }
    let padded = (fill as u64).next_multiple_of(BLOCK) as usize;
    buf[fill..padded].fill(0);
    write_deep(tape, written / 512, &buf[..padded])?;
    Ok(written + padded as u64)
}

/// Steps 4 and 5 overlapped: the header and table 1 go to the medium,
/// then each window of data clusters is read from the source into memory,
/// laid out as its extents go on the medium (step 4: the copy area is
/// that memory, numbered by table 2), while the window before it goes
/// from memory to the medium, each extent where table 3 places it (step
/// 5); then the trailer and a flush. Two window buffers: the one being
/// filled and the one being streamed.
fn pump(
    plan: &Plan,
    source: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    overlap: &dyn Overlap,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let layout = &plan.layout;
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
    let stride = BLOCK + layout.extent_clusters() * layout.cluster_size();
    let ([mut filling, mut streaming], per) = windows([stride, stride], layout.extents())?;
    let mut stream = Streamer {
        layout: *layout,
        tape,
        written: write_table1(plan, source, tape, &mut filling)?,
        digest: Digest::default(),
    };
    debug_assert_eq!(stream.written, layout.data_offset());
    let mut copier = Copier::new(source, &plan.image.header, plan.image.file_len)?;
    let windows = layout.extents().div_ceil(per);
    let total = plan.copy_bytes();
    for w in 0..=windows {
        let (mut copied, mut streamed) = (Ok(0), Ok(0));
        overlap.both(
            &mut || {
                if w < windows {
                    copied = fill_window(&mut copier, &mut filling, layout, w * per, per);
                }
            },
            &mut || {
                if w > 0 {
                    streamed = stream.window(&mut streaming, (w - 1) * per, per);
                }
            },
        );
        let (copied, streamed) = (copied?, streamed?);
        if w < windows {
            progress(Stage::Copy, copied, total);
        }
        if w > 0 {
            progress(Stage::Stream, streamed, total);
        }
        core::mem::swap(&mut filling, &mut streaming);
    }
    debug_assert_eq!(stream.written, layout.trailer_offset());
    let trailer = Trailer {
        extents: layout.extents(),
        data_clusters: layout.data_clusters,
        stream_bytes: layout.stream_bytes(),
        header_checksum: u64::from_le_bytes(header[4088..].try_into().expect("8 bytes")),
        digest: stream.digest.value(),
    };
    tape.write(stream.written / 512, &trailer.encode())?;
    tape.flush()?;
    if total == 0 {
        progress(Stage::Copy, 0, 0);
        progress(Stage::Stream, 0, 0);
    }
    Ok(())
}

/// The data of the `n` extents from extent `k` (fewer at the end) in
/// `buf`, laid out as on the medium (a header block before each), with
/// each extent's index and first copy cluster.
fn extents_in<'b>(
    layout: &Layout,
    buf: &'b mut [u8],
    k: u64,
    n: u64,
) -> Vec<(u64, u64, &'b mut [u8], &'b mut [u8])> {
    let cs = layout.cluster_size();
    let n = n.min(layout.extents() - k);
    let mut pieces = Vec::with_capacity(n as usize);
    let mut rest = buf;
    for i in k..k + n {
        let (first, len, _) = layout.extent(i);
        let (head, tail) = rest.split_at_mut(BLOCK as usize);
        let (data, tail) = tail.split_at_mut((len * cs) as usize);
        rest = tail;
        pieces.push((i, first, head, data));
    }
    pieces
}

/// Step 4 for the `n` extents from extent `k` (fewer at the end): their
/// clusters from the source into `buf`, laid out as on the medium;
/// returns the copy area's bytes filled so far.
fn fill_window(
    copier: &mut Copier<'_>,
    buf: &mut [u8],
    layout: &Layout,
    k: u64,
    n: u64,
) -> Result<u64, Error> {
    let mut data: Vec<&mut [u8]> = extents_in(layout, buf, k, n)
        .into_iter()
        .map(|(_, _, _, data)| data)
        .collect();
    copier.fill(&mut data)?;
    let (first, clusters, _) = layout.extent(k + data.len() as u64 - 1);
    Ok((first + clusters) * layout.cluster_size())
}

/// Step 5's state: the medium written up to `written` and the extents'
/// checksums so far (a raw volume's stream writes through it too).
pub(super) struct Streamer<'a> {
    pub(super) layout: Layout,
    pub(super) tape: &'a dyn BlockDevice,
    pub(super) written: u64,
    pub(super) digest: Digest,
}

impl Streamer<'_> {
    /// Step 5 for the `n` extents from extent `k` (fewer at the end),
    /// which [`fill_window`] left in `buf`: each extent's header filled
    /// in, then headers and data to the medium in one batch; returns the
    /// copy area's bytes streamed so far.
    pub(super) fn window(&mut self, buf: &mut [u8], k: u64, n: u64) -> Result<u64, Error> {
        let layout = &self.layout;
        let cs = layout.cluster_size();
        let (mut heads, mut data) = (Vec::new(), Vec::new());
        for (i, first, head, d) in extents_in(layout, buf, k, n) {
            heads.push((i, first, head));
            data.push(&*d);
        }
        let mut len = 0;
        for ((i, first, head), d) in heads.iter_mut().zip(&data) {
            let sum = checksum(d);
            self.digest.add(sum);
            ExtentHeader {
                index: *i,
                first: *first,
                clusters: d.len() as u64 / cs,
                data_at: self.written + len + BLOCK,
                data_checksum: sum,
            }
            .encode_into(head);
            len += BLOCK + d.len() as u64;
        }
        let pieces = heads
            .iter()
            .zip(&data)
            .flat_map(|((_, _, h), d)| [&**h, *d]);
        write_runs(self.tape, self.written / 512, pieces)?;
        self.written += len;
        let (first, clusters, _) = layout.extent(k + data.len() as u64 - 1);
        Ok((first + clusters) * cs)
    }
}

/// Writes `pieces` one after the other on `d` from `sector` on, in one
/// batch (the device gathers pieces that continue each other into one
/// request).
fn write_runs<'b>(
    d: &dyn BlockDevice,
    sector: u64,
    pieces: impl Iterator<Item = &'b [u8]>,
) -> Result<(), BlockError> {
    let mut at = sector;
    let mut ops: Vec<Op<'_>> = Vec::new();
    for buf in pieces {
        ops.push(Op::Write { sector: at, buf });
        at += buf.len() as u64 / 512;
    }
    d.transfer(&mut ops, depth(d))
}
