//! The qcow2 reader against real images: what it maps agrees with
//! `qemu-img map`, and what it cannot read it refuses by name.

mod common;

use common::clusters;
use common::{image, qemu_map, READABLE};
use snapshot::backup::qcow2::{Cluster, Qcow2Error};
use snapshot::backup::source::{self, Image};
use snapshot::backup::{Error, Plan};
use snapshot::devices::block::MemDisk;

fn open(bytes: &[u8]) -> Result<Image, Qcow2Error> {
    source::open(&MemDisk::from_bytes("img", bytes), &mut |_| {})
}

fn error(bytes: &[u8]) -> String {
    format!("{}", open(bytes).expect_err("the reader accepted it"))
}

/// A change to an image's bytes.
type Patch = Box<dyn Fn(&mut Vec<u8>)>;

fn put_be32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

/// Every cluster the reader calls data is data at the same host offset in
/// QEMU's map, and every byte QEMU maps as data the reader maps too.
#[test]
fn mapping_agrees_with_qemu_img_map() {
    for name in READABLE {
        let bytes = image(&format!("{name}.qcow2"));
        let img = open(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let cs = img.header.cluster_size();
        let mut from_qemu = Vec::new();
        for e in qemu_map(name) {
            if let Some(host) = e.host {
                for i in 0..e.len.div_ceil(cs) {
                    from_qemu.push((e.start / cs + i, host + i * cs));
                }
            }
        }
        let ours: Vec<(u64, u64)> = clusters(&bytes)
            .into_iter()
            .filter_map(|(vc, c)| match c {
                Cluster::Data(host) => Some((vc, host)),
                _ => None,
            })
            .collect();
        assert_eq!(ours, from_qemu, "{name}");
        assert_eq!(img.data_clusters, ours.len() as u64);
    }
}

#[test]
fn header_fields_are_read() {
    let bytes = image("scattered.qcow2");
    let img = open(&bytes).unwrap();
    assert_eq!(img.header.virtual_size, 32 << 20);
    assert_eq!(img.header.cluster_size(), 4096);
    assert_eq!(img.header.refcount_bits(), 16);
    assert_eq!(img.header.backing_file, None);
    // The 64 KiB write at 12M was a zero write: mapped, but as zeros.
    let mapped = clusters(&bytes);
    let lookup = |vc: u64| mapped.iter().find(|c| c.0 == vc).map(|c| c.1);
    assert_eq!(lookup((12 << 20) / 4096), Some(Cluster::Zero));
    assert!(matches!(lookup(0), Some(Cluster::Data(_))));
    let tiny = open(&image("tiny.qcow2")).unwrap();
    assert_eq!(
        (tiny.header.cluster_size(), tiny.header.refcount_bits()),
        (512, 1)
    );
    assert_eq!(
        open(&image("wide.qcow2")).unwrap().header.refcount_bits(),
        64
    );
}

#[test]
fn backing_files_are_read_and_refused_for_backup() {
    let bytes = image("backed.qcow2");
    let img = open(&bytes).unwrap();
    assert_eq!(img.header.backing_file.as_deref(), Some("empty.qcow2"));
    assert_eq!(img.header.backing_format.as_deref(), Some("qcow2"));
    let err = Plan::new(&MemDisk::from_bytes("src", &bytes)).unwrap_err();
    assert!(matches!(err, Error::Backing(_)));
    assert!(
        format!("{err}").contains("backing file (empty.qcow2)"),
        "{err}"
    );
}

#[test]
fn unsupported_features_are_named() {
    let err = error(&image("extdata.qcow2"));
    assert_eq!(err, "unsupported qcow2 feature: external data file");
    let base = image("empty.qcow2");
    let cases: [(&str, Patch); 7] = [
        ("encryption", Box::new(|b| put_be32(b, 32, 2))),
        ("dirty bit", Box::new(|b| put_be64(b, 72, 1))),
        ("corrupt bit", Box::new(|b| put_be64(b, 72, 2))),
        (
            "unknown incompatible features 0x40",
            Box::new(|b| put_be64(b, 72, 0x40)),
        ),
        ("version 2", Box::new(|b| put_be32(b, 4, 2))),
        (
            "compression type 1 with the compression type bit clear",
            Box::new(|b| b[104] = 1),
        ),
        ("compression type 2", Box::new(|b| b[104] = 2)),
    ];
    for (says, patch) in cases {
        let mut b = base.clone();
        patch(&mut b);
        let err = error(&b);
        assert!(err.contains(says), "{says}: {err}");
    }
    assert_eq!(error(b"not an image at all, just some text........................................................................................"),
        "not a qcow2 image (bad magic)");
    assert_eq!(error(b"short"), "not a qcow2 image (bad magic)");
}

/// Hostile values in each field the reader follows get an error that
/// names the field, never a panic.
/// An offset that is aligned but lies past the end of the file is called
/// that, with the figures; a misaligned one is called misaligned.
#[test]
fn offsets_past_the_end_and_misaligned_ones_are_told_apart() {
    let base = image("scattered.qcow2");
    let l1 = open(&base).unwrap().header.l1_offset as usize;
    let len = base.len() as u64;
    let mut b = base.clone();
    put_be64(&mut b, l1, (1 << 63) | (len + 0x10000));
    let err = error(&b);
    assert_eq!(
        err,
        format!(
            "invalid qcow2 image: L2 table 0 at {:#x} (+0x1000) lies past the end of the file \
             ({len:#x} bytes, counted in whole 512-byte sectors)",
            len + 0x10000
        )
    );
    let mut b = base.clone();
    put_be64(&mut b, l1, (1 << 63) | 0x1200);
    assert_eq!(
        error(&b),
        "invalid qcow2 image: L2 table 0 at 0x1200 is not aligned to the 4096-byte cluster"
    );
}

#[test]
fn hostile_fields_are_refused_by_name() {
    let base = image("scattered.qcow2");
    let h = open(&base).unwrap().header;
    let l1 = h.l1_offset as usize;
    let first_l2 = be64(&base, l1) & 0x00ff_ffff_ffff_fe00;
    let cases: Vec<(&str, Patch)> = vec![
        ("cluster_bits 30", Box::new(|b| put_be32(b, 20, 30))),
        ("cluster_bits 8", Box::new(|b| put_be32(b, 20, 8))),
        ("l1_size 0", Box::new(|b| put_be32(b, 36, 0))),
        ("L1 table at 0x1001", Box::new(|b| put_be64(b, 40, 0x1001))),
        ("L1 table at 0x", Box::new(|b| put_be64(b, 40, 1 << 50))),
        (
            "refcount table at 0x",
            Box::new(|b| put_be64(b, 48, 0x7777_0000)),
        ),
        (
            "refcount_table_clusters 0",
            Box::new(|b| put_be32(b, 56, 0)),
        ),
        ("refcount_order 7", Box::new(|b| put_be32(b, 96, 7))),
        ("header_length 12", Box::new(|b| put_be32(b, 100, 12))),
        ("virtual size", Box::new(|b| put_be64(b, 24, u64::MAX))),
        ("virtual size", Box::new(|b| put_be64(b, 24, 1000))),
        // The L1 table grows to cover more than it has entries for.
        (
            "l1_size 16 (the virtual size needs 32768",
            Box::new(|b| put_be64(b, 24, 64 << 30)),
        ),
        (
            "backing file name",
            Box::new(|b| {
                put_be64(b, 8, 4000);
                put_be32(b, 16, 500);
            }),
        ),
        (
            "L1 entry 0",
            Box::new(move |b| put_be64(b, l1, first_l2 | 2)),
        ),
        (
            "L2 table 0",
            Box::new(move |b| put_be64(b, l1, 0x1234_5000_0000)),
        ),
        // An L2 table on top of the header.
        (
            "overlaps",
            Box::new(move |b| {
                let rt = be64(b, 48);
                put_be64(b, l1, rt);
            }),
        ),
        // A data cluster outside the file, and one misaligned.
        (
            "lies past the end of the",
            Box::new(move |b| put_be64(b, first_l2 as usize, 0x10_0000_0000)),
        ),
        (
            "reserved bits",
            Box::new(move |b| put_be64(b, first_l2 as usize, (1 << 63) | 0x5000 | 0x10)),
        ),
        // Refcount table pointing nowhere useful.
        (
            "no refcount block",
            Box::new(|b| {
                let rt = be64(b, 48) as usize;
                put_be64(b, rt, 0);
            }),
        ),
    ];
    for (says, patch) in cases {
        let mut b = base.clone();
        patch(&mut b);
        let err = error(&b);
        assert!(err.contains(says), "want {says:?}, got: {err}");
    }
}

#[test]
fn a_used_cluster_with_refcount_zero_is_refused() {
    let mut b = image("scattered.qcow2");
    let h = open(&b).unwrap().header;
    let rt = h.refcount_table_offset as usize;
    let block = be64(&b, rt) as usize;
    // Cluster 0 (the header) gets refcount 0.
    b[block..block + 2].copy_from_slice(&[0, 0]);
    let err = error(&b);
    assert!(err.contains("refcount is 0"), "{err}");
}

#[test]
fn every_truncation_is_refused_or_read() {
    let base = image("scattered.qcow2");
    for len in (0..base.len()).step_by(509) {
        // Shorter files lose metadata or data: an error, or (when only
        // data past the last metadata went) a map that still holds.
        let _ = open(&base[..len]);
    }
    // Cut before the L1 table: refused.
    let h = open(&base).unwrap().header;
    assert!(error(&base[..h.l1_offset as usize]).contains("L1 table"));
}
