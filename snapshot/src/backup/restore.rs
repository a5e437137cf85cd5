//! Restore: a medium read front to back onto a new raw or qcow2 image.
//! See the [subsystem docs](super).
//!
//! Memory is bounded by design ([`super::engine::restore_memory`]): the
//! tables are read through windows as streams of runs, never whole; the
//! data moves through one transfer window. This module must never write
//! to the medium, and writes the output only where the layout says.

use alloc::boxed::Box;
use alloc::format;
use alloc::vec;

use super::engine::{Progress, Stage};
use super::error::Error;
use super::io::{need, read_deep, window, write_deep};
use super::newimage::{L2Count, NewImage};
use super::run::{CopyRuns, Run, Runs};
use super::table::{same_mapping, V1Table1, V1Table2, V2Table1};
use super::tape::{
    checksum, Digest, ExtentHeader, Header, MediumError, Trailer, HEADER_BYTES, RECORD,
};
use crate::devices::block::{BlockDevice, Op};

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

/// Counts what passes through a stream of runs: clusters and the L2
/// tables they touch.
struct Counted<R> {
    inner: R,
    bits: u32,
    clusters: u64,
    l2: L2Count,
}

impl<R: Runs<Error>> Runs<Error> for Counted<R> {
    fn next_run(&mut self) -> Result<Option<Run>, Error> {
        let r = self.inner.next_run()?;
        if let Some(r) = &r {
            self.clusters += r.len;
            self.l2.add(self.bits, r);
        }
        Ok(r)
    }
}

/// The front of a medium, read and checked: its header, and its tables
/// checked (checksums, then contents) without being kept.
#[derive(Debug, Clone)]
pub struct Front {
    /// The header.
    pub header: Header,
    /// The header's checksum (the trailer repeats it).
    pub header_checksum: u64,
    /// L2 tables a qcow2 restore writes.
    pub l2_tables: u64,
}

impl Front {
    /// Reads and checks the front of `tape`, taking its length from the
    /// device (a whole number of sectors).
    pub fn read(tape: &dyn BlockDevice) -> Result<Front, Error> {
        Front::read_len(tape, tape.info().bytes())
    }

    /// Reads and checks the header and tables of `tape`, a medium of
    /// `len` bytes (the true length, when the caller knows it better than
    /// the device). A medium shorter than the stream its header describes
    /// has lost its trailer.
    pub fn read_len(tape: &dyn BlockDevice, len: u64) -> Result<Front, Error> {
        if len < HEADER_BYTES {
            return Err(MediumError::MissingTrailer(format!(
                "the medium is {len} bytes, shorter than its {HEADER_BYTES}-byte header"
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
        let header_checksum = u64::from_le_bytes(head[4088..].try_into().expect("8 bytes"));
        let mut front = Front {
            header,
            header_checksum,
            l2_tables: 0,
        };
        front.check_tables(tape)?;
        Ok(front)
    }

    /// Checksums first (a flipped bit is named as such), then contents:
    /// table 2 must be table 1's data clusters numbered in order.
    fn check_tables(&mut self, tape: &dyn BlockDevice) -> Result<(), Error> {
        let h = &self.header;
        let v1 = h.version == 1;
        let sum1 = if v1 {
            V1Table1::new(tape, h).and_then(|mut t| t.checksum())
        } else {
            V2Table1::new(tape, h).and_then(|mut t| t.checksum())
        };
        // A version 1 table 1 too short for its own counts is a bad one.
        if !matches!(sum1, Ok(s) if s == h.table1_checksum) {
            return Err(MediumError::BadChecksum("table 1".into()).into());
        }
        let sum2 = if v1 {
            V1Table2::new(tape, h)?.checksum()?
        } else {
            checksum(&[])
        };
        if sum2 != h.table2_checksum {
            return Err(MediumError::BadChecksum("table 2".into()).into());
        }
        let mut mapping = Counted {
            inner: self.mapping(tape)?,
            bits: h.layout.cluster_bits,
            clusters: 0,
            l2: L2Count::default(),
        };
        if v1 {
            let mut t1 = CopyRuns::new(V1Table1::new(tape, h)?);
            same_mapping(&mut t1, &mut mapping)?;
        } else {
            while mapping.next_run()?.is_some() {}
        }
        if mapping.clusters != h.layout.data_clusters {
            return Err(MediumError::Inconsistent(format!(
                "table 2: {} copy clusters, the header says {}",
                mapping.clusters, h.layout.data_clusters
            ))
            .into());
        }
        self.l2_tables = mapping.l2.tables;
        Ok(())
    }

    /// Table 2 read from `tape` as a stream: `(virtual cluster, copy
    /// cluster, length)` runs, ascending.
    pub fn mapping<'t>(
        &self,
        tape: &'t dyn BlockDevice,
    ) -> Result<Box<dyn Runs<Error> + 't>, Error> {
        Ok(if self.header.version == 1 {
            Box::new(V1Table2::new(tape, &self.header)?)
        } else {
            Box::new(CopyRuns::new(V2Table1::new(tape, &self.header)?))
        })
    }

    /// The layout of the qcow2 image a restore writes.
    pub fn new_image(&self) -> NewImage {
        let h = &self.header;
        NewImage::new(
            h.layout.cluster_bits,
            h.virtual_size,
            h.layout.data_clusters,
            self.l2_tables,
        )
    }

    /// Bytes the output disk needs for `format`.
    pub fn out_bytes(&self, format: Format) -> u64 {
        match format {
            Format::Raw => self.header.virtual_size,
            Format::Qcow2 => self.new_image().file_bytes(),
        }
    }
}

/// Where the raw restore of one extent's data goes: writes for `data`
/// (copy clusters from `copy` on) at the virtual clusters table 2 gives,
/// `cur` being table 2's current run.
fn raw_writes<'b>(
    mapping: &mut dyn Runs<Error>,
    cur: &mut Option<Run>,
    mut copy: u64,
    mut data: &'b [u8],
    cs: u64,
    virtual_size: u64,
    ops: &mut alloc::vec::Vec<Op<'b>>,
) -> Result<(), Error> {
    while !data.is_empty() {
        while cur.is_none_or(|r| r.to + r.len <= copy) {
            *cur = Some(mapping.next_run()?.ok_or_else(|| {
                MediumError::Inconsistent(format!("table 2 has no run for copy cluster {copy}"))
            })?);
        }
        let r = cur.expect("set above");
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
    Ok(())
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
    let image = front.new_image();
    let mut mapping = front.mapping(tape)?;
    let mut cur = None;
    let (mut buf, extents_per_window) = window(l.extent_stride(), l.extents())?;
    let mut digest = Digest::default();
    let total = l.data_clusters * cs;
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
        let mut ops = vec![];
        let mut rest: &[u8] = window;
        for i in k..k + n {
            let head = ExtentHeader::decode(&rest[..l.block as usize], &l, i)?;
            let (data, tail) = rest[l.block as usize..].split_at((head.clusters * cs) as usize);
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
                Format::Raw => raw_writes(
                    &mut *mapping,
                    &mut cur,
                    head.first,
                    data,
                    cs,
                    virtual_size,
                    &mut ops,
                )?,
            }
        }
        out.transfer(&mut ops, super::io::depth(out))?;
        k += n;
        let (first, len, _) = l.extent(k - 1);
        progress(Stage::Restore, (first + len) * cs, total);
    }
    drop(buf);
    let mut trailer = vec![0u8; RECORD as usize];
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
        let mut runs = front.mapping(tape)?;
        image.write_metadata(&mut *runs, &mut |at, bytes| {
            write_deep(out, at / 512, bytes).map_err(Error::from)
        })?;
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
