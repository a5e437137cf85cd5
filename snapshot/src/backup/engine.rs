//! The backup and restore engine; see the [subsystem docs](super).

use super::ahead;
use super::copy::{copy_memory, Copier};
pub use super::error::Error;
use super::io::{changed, need, ring, write_deep};
use super::newimage::NewImage;
use super::pipe;
pub use super::pipe::{InTurn, Overlap};
use super::qcow2;
use super::run::Runs;
use super::source::{self, Image};
use super::table::{self, Encoder};
use super::tape::{self, checksum, Digest, Header, Layout, Trailer, BLOCK, HEADER_BYTES};
use crate::devices::block::BlockDevice;

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
        let layout = Layout::new(image.header.cluster_bits, image.data_clusters, enc.bytes);
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
    /// ring all [`pipe::RING`] transfer windows of [`WINDOW`] each.
    pub fn memory_bytes_at_most(&self) -> u64 {
        let h = &self.image.header;
        let stride = BLOCK + h.cluster_size().max(tape::EXTENT_DATA_BYTES);
        let ring = pipe::RING as u64 * WINDOW.max(stride);
        self.memory_bytes() + ring.saturating_sub(2 * stride)
    }
}

/// Bytes of kernel memory a backup of a source of `file_len` bytes with
/// clusters of `1 << cluster_bits` needs at least, whatever its virtual
/// size or tables: the check of the source ([`source::open_memory`]: two
/// bits per host cluster, two clusters, two table windows, the L2 tables
/// read ahead), or, later, the walk ([`ahead::memory`]: an L1 window and
/// up to 1 MiB of L2 tables read ahead), two transfer units (the copy's and the
/// stream's, each an extent and its header's block)
/// and a decoder of compressed clusters ([`copy_memory`]), plus
/// [`SLACK`]. Transfers use up to [`WINDOW`] each when memory allows.
pub fn backup_memory(header: &qcow2::Header, file_len: u64) -> u64 {
    let cs = header.cluster_size();
    let stride = BLOCK + cs.max(tape::EXTENT_DATA_BYTES);
    let running = 2 * stride + beside_ring(header);
    (source::open_memory(header.cluster_bits, file_len) + SLACK).max(running)
}

/// What a running backup needs besides its ring of transfer buffers: the
/// walk's windows and read-ahead, the decoder, and [`SLACK`].
fn beside_ring(header: &qcow2::Header) -> u64 {
    ahead::memory(header.cluster_bits) + copy_memory(header) + SLACK
}

/// Bytes of kernel memory a restore of a medium with clusters of
/// `1 << cluster_bits` needs at least: two table windows, one extent (1
/// MiB, or one cluster, and its header's block) and, for a qcow2 output,
/// the metadata writer's windows and one L2 table, plus [`SLACK`].
pub fn restore_memory(cluster_bits: u32) -> u64 {
    let cs = 1u64 << cluster_bits;
    let stride = BLOCK + cs.max(tape::EXTENT_DATA_BYTES);
    2 * table::WINDOW + stride.max(NewImage::memory(cluster_bits)) + SLACK
}

/// Small allocations besides the buffers (request lists, messages), and
/// the padding the kernel heap may leave before each block of 64 KiB or
/// more, which it places on a page: at most 4 KiB each, and a job holds
/// far fewer than the 64 such blocks this covers.
pub const SLACK: u64 = 256 << 10;

/// The kernel heap of a guest with `ram` bytes of memory: a sixteenth,
/// between 4 and 64 MiB, in whole pages. The host sizes jobs against it.
pub fn guest_heap_bytes(ram: u64) -> u64 {
    (ram / 16).clamp(4 << 20, 64 << 20) & !4095
}

/// Heap the kernel takes for itself around a backup or restore, at most:
/// what it holds before the job starts (drivers, trace buffers: 2.6 MB
/// measured with two disks of four queues each) and [`KERNEL_JOB_USE`].
/// What the host sizes jobs against and what a memory refusal's
/// suggested `--mem` allows for.
pub const KERNEL_HEAP_USE: u64 = 3 << 20;

/// Heap the kernel's side of a running job takes beyond what the job
/// counts itself (the driver's request lists, the pipeline's job threads): the
/// kernel starts a job only with this much free besides the job's need.
pub const KERNEL_JOB_USE: u64 = 384 << 10;

/// A `--mem` (in bytes, a multiple of 64 MiB) whose kernel heap holds
/// `heap` bytes, with room for what the firmware and the kernel image keep
/// of the RAM; `None` beyond the largest heap (64 MiB, from 1 GiB up).
pub fn mem_for_heap(heap: u64) -> Option<u64> {
    (heap <= 64 << 20).then(|| (heap * 16 + (32 << 20)).next_multiple_of(64 << 20))
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
    let padded = plan.layout.pad(fill as u64) as usize;
    buf[fill..padded].fill(0);
    write_deep(tape, written / 512, &buf[..padded])?;
    Ok(written + padded as u64)
}

/// Steps 4 and 5 overlapped: the header and table 1 go to the medium,
/// then each window of data clusters is read from the source into memory,
/// laid out as its extents go on the medium (step 4: the copy area is
/// that memory, numbered by table 2), while the window before it goes
/// from memory to the medium, each extent where table 3 places it (step
/// 5), through [`pipe`]'s ring of window buffers; then the trailer and a
/// flush.
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
    let spare = beside_ring(&plan.image.header);
    let (mut bufs, per) = ring(layout.extent_stride(), layout.extents(), spare)?;
    let written = write_table1(plan, source, tape, &mut bufs[0])?;
    debug_assert_eq!(written, layout.data_offset());
    let mut copier = Copier::new(source, &plan.image.header, plan.image.file_len)?;
    let mut digest = Digest::default();
    pipe::run(
        (&mut copier, layout, &mut digest),
        tape,
        (bufs, per),
        overlap,
        &mut *progress,
    )?;
    let trailer = Trailer {
        extents: layout.extents(),
        data_clusters: layout.data_clusters,
        stream_bytes: layout.stream_bytes(),
        header_checksum: u64::from_le_bytes(header[4088..].try_into().expect("8 bytes")),
        digest: digest.value(),
    };
    tape.write(layout.trailer_offset() / 512, &trailer.encode())?;
    tape.flush()?;
    if layout.data_clusters == 0 {
        progress(Stage::Copy, 0, 0);
        progress(Stage::Stream, 0, 0);
    }
    Ok(())
}

/// Step 5's state for a raw volume's stream, which fills its windows
/// itself: the medium written up to `written` and the extents' checksums
/// so far.
pub(super) struct Streamer<'a> {
    pub(super) layout: Layout,
    pub(super) tape: &'a dyn BlockDevice,
    pub(super) written: u64,
    pub(super) digest: Digest,
}

impl Streamer<'_> {
    /// Step 5 for the `n` extents from extent `k` (fewer at the end),
    /// laid out in `buf` as on the medium: each extent's header filled
    /// in, then the window to the medium in one request; returns the copy
    /// area's bytes streamed so far.
    pub(super) fn window(&mut self, buf: &mut [u8], k: u64, n: u64) -> Result<u64, Error> {
        let layout = &self.layout;
        pipe::seal(buf, layout, k, n, &mut self.digest);
        let (at, len) = pipe::window_span(layout, k, n);
        debug_assert_eq!(at, self.written);
        self.tape.write(at / 512, &buf[..len as usize])?;
        self.written = at + len;
        let last = (k + n).min(layout.extents()) - 1;
        let (first, clusters, _) = layout.extent(last);
        Ok((first + clusters) * layout.cluster_size())
    }
}

#[cfg(test)]
mod tests {
    use super::{guest_heap_bytes, mem_for_heap};
    use crate::backup::Error;
    use alloc::string::ToString;

    #[test]
    fn mem_for_heap_gives_that_heap_with_room_to_spare() {
        for heap in (0..=64u64 << 20).step_by(333_333).chain([64 << 20]) {
            let mem = mem_for_heap(heap).unwrap();
            assert_eq!(mem % (64 << 20), 0);
            // Even with 16 MiB of the RAM kept by firmware and kernel.
            assert!(guest_heap_bytes(mem - (16 << 20)) >= heap, "{heap}: {mem}");
        }
        assert_eq!(mem_for_heap((64 << 20) + 1), None);
    }

    #[test]
    fn a_memory_refusal_names_a_mem_that_holds_the_job() {
        for need in [1u64, 3 << 20, 17 << 20, 59 << 20] {
            let e = Error::TooLittleMemory {
                job: "backup",
                need,
                have: 0,
            }
            .to_string();
            let mib: u64 = e
                .split("--mem ")
                .nth(1)
                .and_then(|t| t.strip_suffix("M)"))
                .unwrap_or_else(|| panic!("no figure in {e:?}"))
                .parse()
                .unwrap();
            // Even if the kernel keeps 2 MiB of its heap and the firmware
            // 16 MiB of the RAM.
            let heap = guest_heap_bytes((mib << 20) - (16 << 20));
            assert!(heap >= need + (2 << 20), "{need}: {e}");
        }
        let e = Error::TooLittleMemory {
            job: "restore",
            need: 63 << 20,
            have: 0,
        };
        assert!(
            e.to_string().ends_with("(its heap is 64 MiB at most)"),
            "{e}"
        );
    }
}
