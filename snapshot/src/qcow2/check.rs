//! The validator: what `qemu-img check` would call corruption, computed
//! independently of the writer's own bookkeeping.
//!
//! It counts every reference to every host cluster (header, refcount
//! table and blocks, L1 table, L2 tables, data and preallocated zero
//! clusters) and compares with the stored refcounts: a refcount below the
//! references is a corruption, above them a leak. It also checks the
//! copied flag (set exactly when the refcount is one), as QEMU does.
//!
//! Memory: four bytes per host cluster of the file, allocated fallibly;
//! for tests and host tools, not for the kernel's hot paths. It must never
//! write.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use super::refcount;
use super::Result;
use crate::backup::qcow2::{be64, buffer, host_of, Qcow2Error, COPIED, ZERO_FLAG};
use crate::backup::source::read_header;
use crate::devices::block::{read_bytes, BlockDevice};

/// What the validator found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Corruptions, in words (empty for a sound image).
    pub corruptions: Vec<String>,
    /// Clusters whose refcount exceeds their references.
    pub leaks: u64,
    /// Data and zero-allocated clusters referenced by L2 entries.
    pub data_clusters: u64,
    /// Where the last cluster in use (referenced or counted) ends: what
    /// the file can be cut to.
    pub end: u64,
}

/// Checks the image on `dev`.
pub fn check(dev: &dyn BlockDevice) -> Result<Report> {
    let h = read_header(dev)?;
    let cs = h.cluster_size();
    let file_len = dev.info().bytes();
    let clusters = file_len.div_ceil(cs);
    let mut refs: Vec<u32> = crate::support::try_filled(clusters, 0u32)
        .ok_or_else(|| Qcow2Error::TooLarge(format!("{clusters} cluster counts")))?;
    let mut report = Report::default();
    let mut add = |report: &mut Report, at: u64, len: u64, what: &str| {
        for c in at / cs..(at + len).div_ceil(cs) {
            match refs.get_mut(c as usize) {
                Some(r) => *r += 1,
                None => report
                    .corruptions
                    .push(format!("{what} at {at:#x} past the file")),
            }
        }
    };
    add(&mut report, 0, 1, "header");
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    add(
        &mut report,
        h.refcount_table_offset,
        rt_len,
        "refcount table",
    );
    let mut reftable = buffer(rt_len, "refcount table")?;
    read_bytes(dev, h.refcount_table_offset, &mut reftable)?;
    for b in 0..rt_len / 8 {
        let e = be64(&reftable, (b * 8) as usize);
        if e != 0 {
            add(&mut report, e, cs, "refcount block");
        }
    }
    let l1_len = u64::from(h.l1_size) * 8;
    add(&mut report, h.l1_offset, l1_len, "L1 table");
    let mut l1 = buffer(l1_len, "L1 table")?;
    read_bytes(dev, h.l1_offset, &mut l1)?;
    let mut l2 = buffer(cs, "L2 table")?;
    let mut flagged: Vec<(u64, bool, String)> = Vec::new();
    for i in 0..u64::from(h.l1_size) {
        let e = be64(&l1, (i * 8) as usize);
        let t = host_of(e);
        if t == 0 {
            continue;
        }
        add(&mut report, t, cs, "L2 table");
        flagged.push((t, e & COPIED != 0, format!("L2 table {i}")));
        read_bytes(dev, t, &mut l2)?;
        for j in 0..cs / 8 {
            let e = be64(&l2, (j * 8) as usize);
            let host = host_of(e);
            if host == 0 {
                continue;
            }
            report.data_clusters += 1;
            add(&mut report, host, cs, "data cluster");
            let zero = if e & ZERO_FLAG != 0 { " (zero)" } else { "" };
            let what = format!(
                "data cluster of virtual offset {:#x}{zero}",
                (i * cs / 8 + j) * cs
            );
            flagged.push((host, e & COPIED != 0, what));
        }
    }
    let bits = u64::from(h.refcount_bits());
    let per_block = cs * 8 / bits;
    let mut block = buffer(cs, "refcount block")?;
    let mut loaded = None;
    let mut rc_of = |c: u64| -> Result<u64> {
        let b = c / per_block;
        let at = if b < rt_len / 8 {
            be64(&reftable, (b * 8) as usize)
        } else {
            0
        };
        if at == 0 {
            return Ok(0);
        }
        if loaded != Some(b) {
            read_bytes(dev, at, &mut block)?;
            loaded = Some(b);
        }
        Ok(refcount::get(&block, bits, c % per_block))
    };
    for c in 0..clusters {
        let (r, n) = (rc_of(c)?, u64::from(refs[c as usize]));
        if r < n {
            report.corruptions.push(format!(
                "host cluster {:#x}: refcount {r}, {n} reference(s)",
                c * cs
            ));
        } else if r > n {
            report.leaks += 1;
        }
        if r > 0 || n > 0 {
            report.end = (c + 1) * cs;
        }
    }
    for (host, copied, what) in flagged {
        let one = rc_of(host / cs)? == 1;
        if copied != one {
            report.corruptions.push(format!(
                "{what} at {host:#x}: copied flag {copied} but refcount one is {one}"
            ));
        }
    }
    Ok(report)
}
