//! The medium's address tables, encoded and decoded as streams: nothing
//! here holds a table whole. A section of the medium is read through one
//! window of [`WINDOW`] bytes; runs are encoded one at a time.
//!
//! Version 3 stores table 1 as the runs of data clusters consecutive in
//! the virtual disk, two LEB128 numbers each (the gap in virtual clusters
//! since the end of the previous run, the run's length less one): at
//! most four bytes for a lone cluster with fewer than 2^21 clusters
//! before it, so under 1 % of the data even at 512-byte clusters. Where
//! each run lies in the source file is not recorded: a restore never
//! needs it, and recording it costs up to three bytes more a cluster
//! when the file's order is not the disk's.
//!
//! Version 2 (read only) recorded a run per stretch consecutive in both
//! the disk and the file, with a third number, the zigzag-encoded
//! distance in host clusters from the end of the previous run. Neither
//! stores table 2: it numbers table 1's data clusters in order
//! ([`super::run::CopyRuns`]).
//!
//! Version 1 (read only) stored the source's whole L1 and L2 tables as
//! table 1 and table 2 as 24-byte runs.
//!
//! Decoders check what they read (bounds, order, counts, checksums) and
//! return an error, never panic. This module must never write a device.

use alloc::format;
use alloc::vec::Vec;
use core::hash::Hasher;

use twox_hash::XxHash64;

use super::error::Error;
use super::qcow2::{self, Cluster};
use super::run::{Joiner, Run, Runs};
use super::tape::{Header, MediumError, SourceKind};
use crate::devices::block::{read_bytes, BlockDevice};

/// Bytes of a table section read at a time.
pub const WINDOW: u64 = 64 << 10;
/// Most bytes one record takes (version 3: two numbers of ten bytes).
pub const MAX_RECORD: usize = 20;

fn bad(table: &str, what: &str) -> Error {
    MediumError::Inconsistent(format!("table {table}: {what}")).into()
}

/// Appends `v` as LEB128 to `out` at `*at`.
fn put_leb(out: &mut [u8; MAX_RECORD], at: &mut usize, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        out[*at] = byte | if v != 0 { 0x80 } else { 0 };
        *at += 1;
        if v == 0 {
            return;
        }
    }
}

/// Version 3's table 1 encoder: joins the runs it is given where they
/// continue each other in the virtual disk, feeds each record's bytes to
/// a sink, and counts and checksums them, so a writer can size the
/// section in one pass and write it in another. The last record comes
/// out of [`Encoder::finish`].
#[derive(Debug, Default)]
pub struct Encoder {
    vc_end: u64,
    open: Option<Run>,
    /// Runs encoded.
    pub runs: u64,
    /// Bytes encoded.
    pub bytes: u64,
    hash: XxHash64,
}

impl Encoder {
    /// Adds `r` (data clusters `r.from ..` of the virtual disk; where
    /// they lie in the source is not recorded) and hands `sink` the
    /// record of the run before, if `r` does not continue it.
    pub fn push(&mut self, r: &Run, sink: &mut dyn FnMut(&[u8])) {
        match &mut self.open {
            Some(p) if p.end() == r.from => p.len += r.len,
            open => {
                if let Some(done) = open.replace(Run { to: 0, ..*r }) {
                    self.emit(&done, sink);
                }
            }
        }
    }

    /// Hands `sink` the record of the last run; the counts and the
    /// checksum are final after this.
    pub fn finish(&mut self, sink: &mut dyn FnMut(&[u8])) {
        if let Some(done) = self.open.take() {
            self.emit(&done, sink);
        }
    }

    fn emit(&mut self, r: &Run, sink: &mut dyn FnMut(&[u8])) {
        let mut rec = [0u8; MAX_RECORD];
        let mut n = 0;
        put_leb(&mut rec, &mut n, r.from - self.vc_end);
        put_leb(&mut rec, &mut n, r.len - 1);
        self.vc_end = r.end();
        self.runs += 1;
        self.bytes += n as u64;
        self.hash.write(&rec[..n]);
        sink(&rec[..n]);
    }

    /// The checksum of everything encoded (xxHash64, seed 0).
    pub fn checksum(&self) -> u64 {
        self.hash.finish()
    }
}

/// A section of the medium, read front to back through one window, its
/// checksum computed as it goes.
struct Section<'t> {
    tape: &'t dyn BlockDevice,
    at: u64,
    end: u64,
    buf: Vec<u8>,
    pos: usize,
    have: usize,
    hash: XxHash64,
}

impl<'t> Section<'t> {
    fn new(tape: &'t dyn BlockDevice, at: u64, len: u64) -> Result<Self, Error> {
        let n = len.min(WINDOW);
        Ok(Section {
            tape,
            at,
            end: at + len,
            buf: crate::support::try_filled(n, 0).ok_or(Error::NoMemory(n))?,
            pos: 0,
            have: 0,
            hash: XxHash64::default(),
        })
    }

    fn left(&self) -> u64 {
        self.end - self.at + (self.have - self.pos) as u64
    }

    fn byte(&mut self) -> Result<Option<u8>, Error> {
        if self.pos == self.have {
            if self.at == self.end {
                return Ok(None);
            }
            let n = (self.end - self.at).min(self.buf.len() as u64) as usize;
            read_bytes(self.tape, self.at, &mut self.buf[..n])?;
            self.hash.write(&self.buf[..n]);
            (self.at, self.pos, self.have) = (self.at + n as u64, 0, n);
        }
        self.pos += 1;
        Ok(Some(self.buf[self.pos - 1]))
    }

    fn u64(&mut self) -> Result<Option<u64>, Error> {
        let mut b = [0u8; 8];
        for x in &mut b {
            match self.byte()? {
                Some(v) => *x = v,
                None => return Ok(None),
            }
        }
        Ok(Some(u64::from_le_bytes(b)))
    }

    /// One LEB128 number of at most 64 bits.
    fn leb(&mut self) -> Result<Option<u64>, Error> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(b) = self.byte()? else {
                return Ok(None);
            };
            let part = u64::from(b & 0x7f);
            if shift == 63 && part > 1 {
                return Ok(None);
            }
            v |= part << shift;
            if b & 0x80 == 0 {
                return Ok(Some(v));
            }
        }
        Ok(None)
    }

    /// The checksum of the whole section (read to its end first).
    fn checksum(&mut self) -> Result<u64, Error> {
        while self.at < self.end {
            self.pos = self.have;
            self.byte()?;
        }
        Ok(self.hash.finish())
    }
}

/// Table 1 of versions 2 and 3 read back: runs of `(virtual cluster,
/// host cluster, length)`, each checked against the header. Version 3
/// records no host clusters: its runs have host cluster 0.
pub struct V2Table1<'t> {
    section: Section<'t>,
    vclusters: u64,
    host_clusters: u64,
    vc_end: u64,
    host_end: u64,
    runs_left: u64,
    clusters_left: u64,
    /// Host cluster 0 is a qcow2 image's header, never data; a raw
    /// volume's cluster 0 is data like any other.
    first_host: u64,
    /// Records carry host clusters (version 2).
    hosts: bool,
}

impl<'t> V2Table1<'t> {
    /// Table 1 of the medium `header` describes, on `tape`.
    pub fn new(tape: &'t dyn BlockDevice, header: &Header) -> Result<Self, Error> {
        let l = &header.layout;
        Ok(V2Table1 {
            section: Section::new(tape, l.table1_offset(), l.table1_bytes)?,
            vclusters: header.virtual_size.div_ceil(l.cluster_size()),
            host_clusters: header.source_bytes.div_ceil(l.cluster_size()),
            vc_end: 0,
            host_end: 0,
            runs_left: header.table1_runs,
            clusters_left: l.data_clusters,
            first_host: match header.source {
                SourceKind::Qcow2 => 1,
                SourceKind::RawVolume => 0,
            },
            hosts: header.version == 2,
        })
    }
}

impl Runs<Error> for V2Table1<'_> {
    fn next_run(&mut self) -> Result<Option<Run>, Error> {
        if self.runs_left == 0 {
            if self.section.left() != 0 || self.clusters_left != 0 {
                return Err(bad(
                    "1",
                    "its runs do not account for its bytes and clusters",
                ));
            }
            return Ok(None);
        }
        let short = || bad("1", "a run is cut short or malformed");
        let gap = self.section.leb()?.ok_or_else(short)?;
        let len = self.section.leb()?.ok_or_else(short)?.wrapping_add(1);
        let from = self.vc_end.checked_add(gap);
        let to = if self.hosts {
            let zig = self.section.leb()?.ok_or_else(short)?;
            let delta = (zig >> 1) as i64 ^ -((zig & 1) as i64);
            self.host_end.checked_add_signed(delta)
        } else {
            Some(0)
        };
        let r = match (from, to) {
            (Some(from), Some(to)) if len != 0 => Run { from, to, len },
            _ => return Err(bad("1", "a run overflows")),
        };
        let vc_ok = r
            .from
            .checked_add(r.len)
            .is_some_and(|e| e <= self.vclusters);
        let host_ok = !self.hosts
            || r.to
                .checked_add(r.len)
                .is_some_and(|e| e <= self.host_clusters)
                && r.to >= self.first_host;
        if !vc_ok || !host_ok || r.len > self.clusters_left {
            return Err(bad(
                "1",
                &format!("run {r:?} lies outside the disk or the source"),
            ));
        }
        (self.vc_end, self.host_end) = (r.end(), r.to + r.len);
        self.runs_left -= 1;
        self.clusters_left -= r.len;
        Ok(Some(r))
    }
}

impl V2Table1<'_> {
    /// Reads the rest of the section and returns its checksum.
    pub fn checksum(&mut self) -> Result<u64, Error> {
        self.section.checksum()
    }
}

/// Version 1's table 1 read back: the source's L1 entries (checked and
/// skipped), then each L2 table with its L1 index; yields runs of data
/// clusters like [`V2Table1`].
pub struct V1Table1<'t> {
    section: Section<'t>,
    cs: u64,
    vclusters: u64,
    source_bytes: u64,
    tables_left: u64,
    next_index: u64,
    base: u64,
    j: u64,
    pending: Joiner,
}

impl<'t> V1Table1<'t> {
    /// Table 1 of the version 1 medium `header` describes, on `tape`.
    pub fn new(tape: &'t dyn BlockDevice, header: &Header) -> Result<Self, Error> {
        let l = &header.layout;
        let cs = l.cluster_size();
        let vclusters = header.virtual_size.div_ceil(cs);
        let mut section = Section::new(tape, l.table1_offset(), l.table1_bytes)?;
        let too_short = || bad("1", "too short");
        let (l1_len, l2_len) = (
            section.u64()?.ok_or_else(too_short)?,
            section.u64()?.ok_or_else(too_short)?,
        );
        let want = l1_len
            .checked_mul(8)
            .and_then(|l1| l2_len.checked_mul(8 + cs)?.checked_add(l1.checked_add(16)?));
        if want != Some(l.table1_bytes) || l1_len < vclusters.div_ceil(cs / 8) {
            return Err(bad("1", "its counts do not match its length"));
        }
        for i in 0..l1_len {
            let entry = section.u64()?.ok_or_else(too_short)?;
            qcow2::l1_entry(i, entry).map_err(|e| bad("1", &format!("{e}")))?;
        }
        Ok(V1Table1 {
            section,
            cs,
            vclusters,
            source_bytes: header.source_bytes,
            tables_left: l2_len,
            next_index: 0,
            base: 0,
            j: cs / 8,
            pending: Joiner::default(),
        })
    }

    /// The next data cluster: `(virtual cluster, host offset)`.
    fn next_data(&mut self) -> Result<Option<(u64, u64)>, Error> {
        let per_l2 = self.cs / 8;
        loop {
            if self.j == per_l2 {
                if self.tables_left == 0 {
                    return Ok(None);
                }
                let i = self.section.u64()?.ok_or_else(|| bad("1", "too short"))?;
                if i < self.next_index || i >= u64::from(u32::MAX) {
                    return Err(bad("1", "L2 tables out of order or out of range"));
                }
                (self.next_index, self.base, self.j) = (i + 1, i * per_l2, 0);
                self.tables_left -= 1;
            }
            let entry = self.section.u64()?.ok_or_else(|| bad("1", "too short"))?;
            let vc = self.base + self.j;
            self.j += 1;
            if vc >= self.vclusters {
                continue;
            }
            match qcow2::l2_entry(entry, vc, self.cs, self.source_bytes) {
                Ok(Some(Cluster::Data(host))) => return Ok(Some((vc, host))),
                // Version 1 writers refused compressed images.
                Ok(Some(Cluster::Compressed(_) | Cluster::Subclusters { .. })) => {
                    return Err(bad("1", "a compressed cluster"))
                }
                Ok(_) => {}
                Err(e) => return Err(bad("1", &format!("{e}"))),
            }
        }
    }

    /// Reads the rest of the section and returns its checksum.
    pub fn checksum(&mut self) -> Result<u64, Error> {
        self.section.checksum()
    }
}

impl Runs<Error> for V1Table1<'_> {
    fn next_run(&mut self) -> Result<Option<Run>, Error> {
        let bits = self.cs.trailing_zeros();
        while let Some((vc, host)) = self.next_data()? {
            let r = Run {
                from: vc,
                to: host >> bits,
                len: 1,
            };
            if let Some(done) = self.pending.add(r) {
                return Ok(Some(done));
            }
        }
        Ok(self.pending.finish())
    }
}

/// Version 1's table 2 read back: 24-byte runs `(virtual cluster, copy
/// cluster, length)`, ascending, copy clusters without gaps.
pub struct V1Table2<'t> {
    section: Section<'t>,
    vclusters: u64,
    vc_end: u64,
    next_copy: u64,
    runs_left: u64,
}

impl<'t> V1Table2<'t> {
    /// Table 2 of the version 1 medium `header` describes, on `tape`.
    pub fn new(tape: &'t dyn BlockDevice, header: &Header) -> Result<Self, Error> {
        let l = &header.layout;
        Ok(V1Table2 {
            section: Section::new(tape, l.table2_offset(), l.table2_bytes())?,
            vclusters: header.virtual_size.div_ceil(l.cluster_size()),
            vc_end: 0,
            next_copy: 0,
            runs_left: l.table2_runs,
        })
    }

    /// Reads the rest of the section and returns its checksum.
    pub fn checksum(&mut self) -> Result<u64, Error> {
        self.section.checksum()
    }
}

impl Runs<Error> for V1Table2<'_> {
    fn next_run(&mut self) -> Result<Option<Run>, Error> {
        if self.runs_left == 0 {
            return Ok(None);
        }
        let mut f = [0u64; 3];
        for v in &mut f {
            *v = self
                .section
                .u64()?
                .ok_or_else(|| bad("2", "wrong length"))?;
        }
        let r = Run {
            from: f[0],
            to: f[1],
            len: f[2],
        };
        let end = r.from.checked_add(r.len);
        if r.len == 0 || r.from < self.vc_end || r.to != self.next_copy {
            return Err(bad(
                "2",
                &format!("run {r:?} is empty, out of order or leaves a gap"),
            ));
        }
        if end.is_none_or(|e| e > self.vclusters) {
            return Err(bad("2", &format!("run {r:?} ends past the virtual size")));
        }
        (self.vc_end, self.next_copy) = (r.end(), self.next_copy + r.len);
        self.runs_left -= 1;
        Ok(Some(r))
    }
}

/// Checks that two streams of `(virtual, copy)` runs map the same
/// clusters the same way, however each splits its runs.
pub fn same_mapping(a: &mut dyn Runs<Error>, b: &mut dyn Runs<Error>) -> Result<(), Error> {
    let (mut x, mut y) = (a.next_run()?, b.next_run()?);
    loop {
        match (&mut x, &mut y) {
            (None, None) => return Ok(()),
            (Some(p), Some(q)) if p.from == q.from && p.to == q.to => {
                let n = p.len.min(q.len);
                for r in [&mut *p, &mut *q] {
                    (r.from, r.to, r.len) = (r.from + n, r.to + n, r.len - n);
                }
                if p.len == 0 {
                    x = a.next_run()?;
                }
                if y.as_ref().is_some_and(|q| q.len == 0) {
                    y = b.next_run()?;
                }
            }
            (p, q) => {
                return Err(bad(
                    "2",
                    &format!("it maps {q:?} where table 1's data gives {p:?}"),
                ))
            }
        }
    }
}

impl core::fmt::Debug for V2Table1<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("V2Table1").finish_non_exhaustive()
    }
}

impl core::fmt::Debug for V1Table1<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("V1Table1").finish_non_exhaustive()
    }
}

impl core::fmt::Debug for V1Table2<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("V1Table2").finish_non_exhaustive()
    }
}
