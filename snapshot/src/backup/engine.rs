//! The backup and restore engine; see the [subsystem docs](super).

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

use super::qcow2::{self, Cluster, NewImage, Qcow2Error, Table1};
use super::tape::{
    self, checksum, Digest, ExtentHeader, Header, Layout, MediumError, Run, Trailer, BLOCK,
    HEADER_BYTES,
};
use crate::devices::block::{BlockDevice, BlockError, Op};

/// Bytes moved per batch of requests, at most (less when memory is short).
/// 16 MiB windows measured no faster under QEMU than 4 MiB ones.
const WINDOW: u64 = 4 << 20;
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

/// Builds table 2 from table 1: every virtual cluster holding data gets
/// the next copy cluster, in virtual order; zero and unallocated clusters
/// get none. Consecutive virtual clusters form one run.
pub fn table2(t1: &Table1) -> Vec<Run> {
    let mut runs: Vec<Run> = Vec::new();
    let mut copy = 0;
    for (vc, c) in t1.clusters() {
        if let Cluster::Data(_) = c {
            match runs.last_mut() {
                Some(r) if r.from + r.len == vc => r.len += 1,
                _ => runs.push(Run {
                    from: vc,
                    to: copy,
                    len: 1,
                }),
            }
            copy += 1;
        }
    }
    runs
}

/// Everything a backup decides before it moves data.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The source, read and checked.
    pub image: qcow2::Image,
    /// Table 2.
    pub table2: Vec<Run>,
    /// The medium's layout (table 3 follows from it).
    pub layout: Layout,
    /// Table 3.
    pub table3: Vec<Run>,
}

impl Plan {
    /// Reads the source and builds tables 2 and 3.
    pub fn new<S: BlockDevice + ?Sized>(source: &S) -> Result<Plan, Error> {
        let image = qcow2::open(source).map_err(Error::Source)?;
        if let Some(name) = &image.header.backing_file {
            return Err(Error::Backing(name.clone()));
        }
        let table2 = table2(&image.table1);
        let layout = Layout {
            cluster_bits: image.header.cluster_bits,
            data_clusters: table2.iter().map(|r| r.len).sum(),
            table1_bytes: tape::table1_bytes(&image.table1),
            table2_runs: table2.len() as u64,
        };
        Ok(Plan {
            table3: layout.table3(),
            image,
            table2,
            layout,
        })
    }

    /// Bytes of the copy area.
    pub fn copy_bytes(&self) -> u64 {
        self.layout.data_clusters * self.layout.cluster_size()
    }
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
    /// Runs in table 2.
    pub table2_runs: u64,
    /// Extents on the medium.
    pub extents: u64,
}

fn need(disk: &dyn BlockDevice, bytes: u64) -> Result<(), Error> {
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

fn depth(d: &dyn BlockDevice) -> usize {
    d.info().max_depth.clamp(1, DEPTH)
}

/// A zeroed buffer of `len` bytes, or [`Error::NoMemory`].
fn zeroed(len: u64) -> Result<Vec<u8>, Error> {
    crate::support::try_filled(len, 0).ok_or(Error::NoMemory(len))
}

/// A transfer buffer for up to [`WINDOW`] bytes in whole `unit`s, and no
/// more than `wanted` units: as many as fit, halving when memory is short;
/// `(buffer, units)`.
fn window(unit: u64, wanted: u64) -> Result<(Vec<u8>, u64), Error> {
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
fn write_deep(d: &dyn BlockDevice, sector: u64, buf: &[u8]) -> Result<(), BlockError> {
    d.transfer(&mut [Op::Write { sector, buf }], depth(d))
}

/// Reads into `buf` from `sector`, the pieces in flight together.
fn read_deep(d: &dyn BlockDevice, sector: u64, buf: &mut [u8]) -> Result<(), BlockError> {
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
    stream(&plan, scratch, tape, progress)?;
    Ok(BackupSummary {
        virtual_bytes: plan.image.header.virtual_size,
        data_bytes: plan.copy_bytes(),
        medium_bytes: plan.layout.stream_bytes(),
        table2_runs: plan.table2.len() as u64,
        extents: plan.layout.extents(),
    })
}

/// Step 4: source clusters (table 1) into the copy area (table 2), a
/// window at a time; contiguous host clusters share one read.
fn copy(
    plan: &Plan,
    source: &dyn BlockDevice,
    scratch: &dyn BlockDevice,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let cs = plan.layout.cluster_size();
    let file_len = plan.image.file_len;
    let (mut buf, per_window) = window(cs, plan.layout.data_clusters)?;
    let total = plan.copy_bytes();
    // (copy cluster, host offset) in copy order.
    let mut clusters = plan.table2.iter().flat_map(|r| {
        (0..r.len).map(move |i| {
            let host = match plan.image.table1.lookup(r.from + i) {
                Some(Cluster::Data(host)) => host,
                // table2() only lists data clusters.
                _ => unreachable!("table 2 names a cluster without data"),
            };
            (r.to + i, host)
        })
    });
    let mut done = 0;
    while done < plan.layout.data_clusters {
        let n = per_window.min(plan.layout.data_clusters - done);
        let window = &mut buf[..(n * cs) as usize];
        // Runs of contiguous host clusters: (host, count), in copy order.
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for i in 0..n {
            let (c, host) = clusters
                .next()
                .expect("table 2 holds data_clusters entries");
            debug_assert_eq!(c, done + i);
            match runs.last_mut() {
                Some((h, k)) if *h + *k * cs == host => *k += 1,
                _ => runs.push((host, 1)),
            }
        }
        let mut ops = Vec::with_capacity(runs.len());
        let mut rest: &mut [u8] = window;
        for &(host, k) in &runs {
            let (piece, tail) = rest.split_at_mut((k * cs) as usize);
            rest = tail;
            // A last cluster that the file ends inside reads as zeros
            // past the end.
            let len = (k * cs).min(file_len - host) as usize;
            piece[len..].fill(0);
            ops.push(Op::Read {
                sector: host / 512,
                buf: &mut piece[..len],
            });
        }
        source.transfer(&mut ops, depth(source))?;
        drop(ops);
        write_deep(scratch, done * cs / 512, window)?;
        done += n;
        progress(Stage::Copy, done * cs, total);
    }
    Ok(())
}

/// Step 5: header and tables, then the copy area extent by extent as
/// table 3 places it, then the trailer; all sequential, then a flush.
fn stream(
    plan: &Plan,
    scratch: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    progress: Progress<'_>,
) -> Result<(), Error> {
    let layout = &plan.layout;
    let cs = layout.cluster_size();
    // Header, table 1 and table 2, encoded in place: the tables of a
    // large image are megabytes, and are not copied twice.
    let mut front = zeroed(layout.data_offset())?;
    let (head, tables) = front.split_at_mut(HEADER_BYTES as usize);
    let (t1, rest) = tables.split_at_mut(layout.table1_bytes as usize);
    tape::encode_table1(&plan.image.table1, t1);
    let t2_at = (layout.table2_offset() - layout.table1_offset() - layout.table1_bytes) as usize;
    let t2 = &mut rest[t2_at..t2_at + layout.table2_bytes() as usize];
    tape::encode_runs(&plan.table2, t2);
    let header = Header {
        layout: *layout,
        virtual_size: plan.image.header.virtual_size,
        source_bytes: plan.image.file_len,
        table1_checksum: checksum(t1),
        table2_checksum: checksum(t2),
    }
    .encode();
    head.copy_from_slice(&header);
    let mut written = 0u64;
    for piece in front.chunks(WINDOW as usize) {
        write_deep(tape, written / 512, piece)?;
        written += piece.len() as u64;
    }
    drop(front);

    let stride = BLOCK + layout.extent_clusters() * cs;
    let (mut buf, extents_per_window) = window(stride, layout.extents())?;
    let mut digest = Digest::default();
    let total = plan.copy_bytes();
    let mut k = 0;
    while k < plan.table3.len() {
        let runs = &plan.table3[k..(k + extents_per_window as usize).min(plan.table3.len())];
        // Lay the window out as it goes on the medium: header, data, ...
        let mut pieces = Vec::with_capacity(runs.len());
        let mut rest: &mut [u8] = &mut buf;
        for r in runs {
            let (head, tail) = rest.split_at_mut(BLOCK as usize);
            let (data, tail) = tail.split_at_mut((r.len * cs) as usize);
            rest = tail;
            pieces.push((r, head, data));
        }
        let mut ops: Vec<Op<'_>> = pieces
            .iter_mut()
            .map(|(r, _, data)| Op::Read {
                sector: r.from * cs / 512,
                buf: data,
            })
            .collect();
        scratch.transfer(&mut ops, depth(scratch))?;
        drop(ops);
        let mut len = 0;
        for (i, (r, head, data)) in pieces.iter_mut().enumerate() {
            let sum = checksum(data);
            digest.add(sum);
            debug_assert_eq!(r.to * BLOCK, written + len + BLOCK);
            ExtentHeader {
                index: (k + i) as u64,
                first: r.from,
                clusters: r.len,
                data_at: r.to * BLOCK,
                data_checksum: sum,
            }
            .encode_into(head);
            len += BLOCK + data.len() as u64;
        }
        write_deep(tape, written / 512, &buf[..len as usize])?;
        written += len;
        k += runs.len();
        progress(
            Stage::Stream,
            plan.table3[k - 1].from * cs + plan.table3[k - 1].len * cs,
            total,
        );
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

/// The output format of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A raw image of the virtual size.
    Raw,
    /// A new qcow2 version 3 image.
    Qcow2,
}

impl Format {
    /// Parses `raw` or `qcow2`.
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "raw" => Some(Format::Raw),
            "qcow2" => Some(Format::Qcow2),
            _ => None,
        }
    }

    /// Its name, as [`Format::parse`] reads it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What a finished restore did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The restored disk's virtual size.
    pub virtual_bytes: u64,
    /// Bytes of data restored.
    pub data_bytes: u64,
    /// Bytes of the output that matter: the qcow2 file's length, or the
    /// virtual size for raw.
    pub out_bytes: u64,
}

/// The front of a medium, read and checked: header and tables.
#[derive(Debug, Clone)]
pub struct Front {
    /// The header.
    pub header: Header,
    /// The header's checksum (the trailer repeats it).
    pub header_checksum: u64,
    /// Table 1.
    pub table1: Table1,
    /// Table 2.
    pub table2: Vec<Run>,
}

impl Front {
    /// Reads and checks the header and both tables of `tape`. A medium
    /// shorter than the stream its header describes has lost its trailer.
    pub fn read(tape: &dyn BlockDevice) -> Result<Front, Error> {
        let len = tape.info().bytes();
        if len < HEADER_BYTES {
            return Err(MediumError::MissingTrailer(format!(
                "the medium is {len} bytes, shorter than a header"
            ))
            .into());
        }
        let mut head = vec![0u8; HEADER_BYTES as usize];
        tape.read(0, &mut head)?;
        let header = Header::decode(&head)?;
        let l = &header.layout;
        if len < l.stream_bytes() {
            return Err(MediumError::MissingTrailer(format!(
                "the medium ends at byte {len}, the stream at {}",
                l.stream_bytes()
            ))
            .into());
        }
        let mut tables = zeroed(l.data_offset() - l.table1_offset())?;
        read_deep(tape, l.table1_offset() / 512, &mut tables)?;
        let t1 = &tables[..l.table1_bytes as usize];
        let t2_at = (l.table2_offset() - l.table1_offset()) as usize;
        let t2 = &tables[t2_at..t2_at + l.table2_bytes() as usize];
        if checksum(t1) != header.table1_checksum {
            return Err(MediumError::BadChecksum("table 1".into()).into());
        }
        if checksum(t2) != header.table2_checksum {
            return Err(MediumError::BadChecksum("table 2".into()).into());
        }
        let table1 = tape::decode_table1(t1, &header)?;
        let table2 = tape::decode_table2(t2, &header, &table1)?;
        Ok(Front {
            header,
            header_checksum: u64::from_le_bytes(head[4088..].try_into().expect("8 bytes")),
            table1,
            table2,
        })
    }

    /// Bytes the output disk needs for `format`.
    pub fn out_bytes(&self, format: Format) -> u64 {
        match format {
            Format::Raw => self.header.virtual_size,
            Format::Qcow2 => NewImage::new(
                self.header.layout.cluster_bits,
                self.header.virtual_size,
                &self.table2,
            )
            .file_bytes(),
        }
    }
}

/// Restores `tape` onto `out`, which must read as zeros (a new image):
/// raw writes only the data clusters at their virtual offsets; qcow2
/// writes the data, then the metadata (so an interrupted restore has no
/// valid qcow2 header), then flushes.
pub fn restore(
    tape: &dyn BlockDevice,
    out: &dyn BlockDevice,
    format: Format,
    progress: Progress<'_>,
) -> Result<RestoreSummary, Error> {
    let front = Front::read(tape)?;
    let l = front.header.layout;
    let cs = l.cluster_size();
    let virtual_size = front.header.virtual_size;
    let out_bytes = front.out_bytes(format);
    need(out, out_bytes)?;
    let image = NewImage::new(l.cluster_bits, virtual_size, &front.table2);

    let stride = BLOCK + l.extent_clusters() * cs;
    let (mut buf, extents_per_window) = window(stride, l.extents())?;
    let mut digest = Digest::default();
    let total = l.data_clusters * cs;
    let mut run = 0; // table 2 position for the raw format
    let mut k = 0;
    while k < l.extents() {
        let n = extents_per_window.min(l.extents() - k);
        let (_, _, at) = l.extent(k);
        let end = if k + n == l.extents() {
            l.trailer_offset()
        } else {
            l.extent(k + n).2
        };
        let window = &mut buf[..(end - at) as usize];
        read_deep(tape, at / 512, window)?;
        let mut ops = Vec::new();
        let mut rest: &[u8] = window;
        for i in k..k + n {
            let head = ExtentHeader::decode(&rest[..BLOCK as usize], &l, i)?;
            let (data, tail) = rest[BLOCK as usize..].split_at((head.clusters * cs) as usize);
            rest = tail;
            let sum = checksum(data);
            if sum != head.data_checksum {
                return Err(MediumError::BadChecksum(format!(
                    "extent {i} (copy clusters {}..{})",
                    head.first,
                    head.first + head.clusters
                ))
                .into());
            }
            digest.add(sum);
            match format {
                Format::Qcow2 => ops.push(Op::Write {
                    sector: (image.data_offset() + head.first * cs) / 512,
                    buf: data,
                }),
                Format::Raw => {
                    // Split the extent where table 2's runs split.
                    let mut copy = head.first;
                    let mut data = data;
                    while !data.is_empty() {
                        while front.table2[run].to + front.table2[run].len <= copy {
                            run += 1;
                        }
                        let r = front.table2[run];
                        let take = (r.to + r.len - copy).min(data.len() as u64 / cs);
                        let vc = r.from + (copy - r.to);
                        let (piece, tail) = data.split_at((take * cs) as usize);
                        // The last cluster may reach past the virtual size.
                        let len = (take * cs).min(virtual_size - vc * cs) as usize;
                        ops.push(Op::Write {
                            sector: vc * cs / 512,
                            buf: &piece[..len],
                        });
                        data = tail;
                        copy += take;
                    }
                }
            }
        }
        out.transfer(&mut ops, depth(out))?;
        k += n;
        let (first, len, _) = l.extent(k - 1);
        progress(Stage::Restore, (first + len) * cs, total);
    }
    let mut trailer = vec![0u8; BLOCK as usize];
    tape.read(l.trailer_offset() / 512, &mut trailer)?;
    Trailer::check(
        &trailer,
        &Trailer {
            extents: l.extents(),
            data_clusters: l.data_clusters,
            stream_bytes: l.stream_bytes(),
            header_checksum: front.header_checksum,
            digest: digest.value(),
        },
    )?;
    if format == Format::Qcow2 {
        let meta = image.metadata(&front.table2);
        let mut at = 0u64;
        for piece in meta.chunks(WINDOW as usize) {
            write_deep(out, at / 512, piece)?;
            at += piece.len() as u64;
        }
    }
    out.flush()?;
    if total == 0 {
        progress(Stage::Restore, 0, 0);
    }
    Ok(RestoreSummary {
        virtual_bytes: virtual_size,
        data_bytes: total,
        out_bytes,
    })
}
