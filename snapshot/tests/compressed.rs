//! Compressed clusters (deflate and zstd) and extended L2 entries
//! (subclusters) in real images made by QEMU: the reader agrees with
//! `qemu-img map`, a backup restores what the guest sees, and hostile
//! descriptors and streams are refused by name, never a panic or an
//! unbounded allocation.

mod common;

use common::{backup_to_tape, clusters, guest_view, image, qemu_map, restore_tape};
use snapshot::backup::qcow2::Cluster;
use snapshot::backup::{self, Format, Plan};
use snapshot::devices::block::MemDisk;

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn put_be64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Every L2 entry of an image with 8-byte entries: `(file position of the
/// entry, virtual cluster, entry)`, read straight from the bytes.
fn l2_entries(img: &[u8]) -> Vec<(usize, u64, u64)> {
    let cs = 1u64 << u32::from_be_bytes(img[20..24].try_into().unwrap());
    let l1 = be64(img, 40) as usize;
    let l1_size = u32::from_be_bytes(img[36..40].try_into().unwrap()) as usize;
    let per = cs / 8;
    let mut all = Vec::new();
    for i in 0..l1_size {
        let l2 = (be64(img, l1 + i * 8) & 0x00ff_ffff_ffff_fe00) as usize;
        if l2 == 0 {
            continue;
        }
        for j in 0..per {
            let at = l2 + j as usize * 8;
            let e = be64(img, at);
            if e != 0 {
                all.push((at, i as u64 * per + j, e));
            }
        }
    }
    all
}

/// The guest's view of zstd.qcow2: scattered.qcow2 as QEMU maps it,
/// overwritten by the `qemu-io` commands that made it (README).
fn zstd_view() -> Vec<u8> {
    let mut view = guest_view("scattered");
    for (at, len, byte) in [
        (5 << 20, 4096, 0x71),
        (2 << 20, 8192, 0x72),
        (9000 << 10, 4096, 0),
        (6 << 10, 1024, 0x73),
    ] {
        view[at..at + len].fill(byte);
    }
    view
}

/// What the guest of each image sees, from QEMU's reading.
fn cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        // `qemu-img convert -c` of scattered.qcow2.
        ("compressed", guest_view("scattered")),
        ("zstd", zstd_view()),
        ("ext-l2", guest_view("ext-l2")),
    ]
}

#[test]
fn compressed_and_subcluster_images_come_back_as_qemu_reads_them() {
    for (name, want) in cases() {
        let source = image(&format!("{name}.qcow2"));
        let stream = backup_to_tape(&source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let raw = restore_tape(&stream, Format::Raw).unwrap();
        assert!(raw == want, "{name}: raw restore differs from QEMU's view");
        let qcow2 = restore_tape(&stream, Format::Qcow2).unwrap();
        let again = backup_to_tape(&qcow2).unwrap();
        assert!(
            restore_tape(&again, Format::Raw).unwrap() == want,
            "{name}: second generation"
        );
    }
}

/// The clusters the reader calls compressed are the ones QEMU maps as
/// compressed; its data clusters are QEMU's, at the same host offsets.
#[test]
fn compressed_clusters_agree_with_qemu_img_map() {
    for name in ["compressed", "zstd"] {
        let bytes = image(&format!("{name}.qcow2"));
        let cs = 4096;
        let (mut qemu_data, mut qemu_compressed) = (Vec::new(), Vec::new());
        for e in qemu_map(name) {
            for i in 0..e.len / cs {
                if let Some(host) = e.host {
                    qemu_data.push((e.start / cs + i, host + i * cs));
                } else if e.compressed {
                    qemu_compressed.push(e.start / cs + i);
                }
            }
        }
        let mut ours_data = Vec::new();
        let mut ours_compressed = Vec::new();
        for (vc, c) in clusters(&bytes) {
            match c {
                Cluster::Data(host) => ours_data.push((vc, host)),
                Cluster::Compressed(_) => ours_compressed.push(vc),
                _ => {}
            }
        }
        assert_eq!(ours_data, qemu_data, "{name}");
        assert_eq!(ours_compressed, qemu_compressed, "{name}");
        assert!(!ours_compressed.is_empty(), "{name}");
    }
}

/// Each subcluster the reader calls data is data at the same host offset
/// in QEMU's map, and every byte QEMU maps as data the reader maps too.
#[test]
fn subclusters_agree_with_qemu_img_map() {
    let bytes = image("ext-l2.qcow2");
    let (cs, sub) = (16384u64, 512u64);
    let mut qemu = Vec::new();
    for e in qemu_map("ext-l2") {
        if let Some(host) = e.host {
            qemu.extend((0..e.len / sub).map(|i| (e.start + i * sub, host + i * sub)));
        }
    }
    let mut ours = Vec::new();
    let mut partial = 0;
    for (vc, c) in clusters(&bytes) {
        let (host, data) = match c {
            Cluster::Data(host) => (host, u32::MAX),
            Cluster::Subclusters { host, data } => {
                partial += 1;
                (host, data)
            }
            _ => continue,
        };
        for i in (0..32).filter(|i| data & (1 << i) != 0) {
            ours.push((vc * cs + i * sub, host + i * sub));
        }
    }
    assert_eq!(ours, qemu);
    assert!(partial >= 3, "{partial} partly allocated clusters");
}

fn backup_error(bytes: &[u8]) -> String {
    match backup_to_tape(bytes) {
        Ok(_) => panic!("a hostile image was backed up"),
        Err(e) => {
            assert!(e.is_refusal(), "{e}");
            format!("{e}")
        }
    }
}

/// The first compressed cluster whose descriptor names at least `room`
/// bytes: `(entry position, virtual cluster, data offset, bytes)`.
fn compressed_entry(img: &[u8], room: u64) -> (usize, u64, u64, u64) {
    let bits = u32::from_be_bytes(img[20..24].try_into().unwrap());
    let shift = 70 - bits;
    l2_entries(img)
        .into_iter()
        .filter(|&(_, _, e)| e & (1 << 62) != 0)
        .map(|(at, vc, e)| {
            let offset = e & ((1 << shift) - 1);
            let sectors = ((e >> shift) & ((1 << (bits - 8)) - 1)) + 1;
            (at, vc, offset, sectors * 512 - offset % 512)
        })
        .find(|c| c.3 >= room)
        .expect("no compressed cluster with room")
}

/// Writes `stream` as the compressed data of a cluster with room for it;
/// returns the image and that cluster's virtual offset.
fn with_stream(name: &str, stream: &[u8]) -> (Vec<u8>, u64) {
    let mut img = image(name);
    let (_, vc, offset, _) = compressed_entry(&img, stream.len() as u64);
    img[offset as usize..offset as usize + stream.len()].copy_from_slice(stream);
    (img, vc * 4096)
}

/// A zstd frame with a 4 KiB window (the cluster size) of `blocks` RLE
/// blocks of 4 KiB each.
fn zstd_rle(blocks: u32) -> Vec<u8> {
    let mut f = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 2 << 3];
    for i in 0..blocks {
        let last = u32::from(i + 1 == blocks);
        let head = last | (1 << 1) | (4096 << 3);
        f.extend_from_slice(&head.to_le_bytes()[..3]);
        f.push(0x5a);
    }
    f
}

#[test]
fn hostile_compressed_clusters_are_refused_by_name() {
    let deflate = |n| miniz_oxide::deflate::compress_to_vec(&vec![7u8; n], 6);
    let cases: Vec<(Vec<u8>, u64, String)> = [
        (
            "compressed.qcow2",
            deflate(8192),
            "decodes to more than a 4096-byte cluster",
        ),
        (
            "compressed.qcow2",
            deflate(2048),
            "decodes to 2048 bytes, not a 4096-byte cluster",
        ),
        (
            "compressed.qcow2",
            vec![0xff; 12],
            "is not a valid deflate stream",
        ),
        (
            "zstd.qcow2",
            zstd_rle(2),
            "decodes to more than a 4096-byte cluster",
        ),
        ("zstd.qcow2", vec![0xff; 12], "is not a valid zstd frame"),
        // A window of 1 GiB: refused before anything is allocated for it.
        (
            "zstd.qcow2",
            vec![0x28, 0xb5, 0x2f, 0xfd, 0, 20 << 3, 1, 0, 0],
            "window",
        ),
    ]
    .into_iter()
    .map(|(name, stream, says)| {
        let (img, at) = with_stream(name, &stream);
        (img, at, says.to_string())
    })
    .collect();
    for (img, at, says) in cases {
        let err = backup_error(&img);
        let whose = format!("the compressed cluster at virtual offset {at:#x}");
        assert!(err.contains(&whose) && err.contains(&says), "{says}: {err}");
    }
    // The same frame cut short, or with a stream of the right size.
    let (img, _) = with_stream("zstd.qcow2", &zstd_rle(1));
    backup_to_tape(&img).expect("one RLE block is one cluster");
}

#[test]
fn hostile_compressed_descriptors_are_refused_by_name() {
    let base = image("compressed.qcow2");
    let len = base.len() as u64;
    let (at, vc, _, _) = compressed_entry(&base, 1);
    let entry = be64(&base, at);
    let with = |e: u64| {
        let mut b = base.clone();
        put_be64(&mut b, at, e);
        b
    };
    let voff = vc * 4096;
    // 4 KiB clusters: offset in bits 0-57, sector count above.
    let mask = (1u64 << 58) - 1;
    let past = with((entry & !mask) | (len + 4096));
    let err = backup_error(&past);
    assert!(
        err.contains(&format!(
            "the compressed data of virtual offset {voff:#x} at {:#x}",
            len + 4096
        )) && err.contains("lies past the end"),
        "{err}"
    );
    // Most sectors the field holds, starting in the last sector.
    let err = backup_error(&with((entry & (1 << 62)) | (0xf << 58) | (len - 100)));
    assert!(err.contains("lies past the end"), "{err}");
    let err = backup_error(&with(entry | (1 << 63)));
    assert!(err.contains("COPIED"), "{err}");
    let err = backup_error(&with((entry & !mask) | 100));
    assert!(err.contains("has its data at 0x64"), "{err}");
    // Compressed data over an L2 table: two users of one cluster.
    let l2 = at as u64 & !4095;
    let err = backup_error(&with((entry & !mask) | (l2 + 8)));
    assert!(err.contains("overlaps other metadata or data"), "{err}");
}

/// Hostile subcluster bitmaps: a subcluster both data and zero, data
/// without a host cluster, a bitmap on a compressed cluster.
#[test]
fn hostile_subcluster_bitmaps_are_refused_by_name() {
    let base = image("ext-l2.qcow2");
    let disk = MemDisk::from_bytes("s", &base);
    let img = Plan::new(&disk).unwrap().image;
    let l2 = (be64(&base, img.header.l1_offset as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    // Virtual cluster 0: subcluster 0 is data.
    let (entry, bitmap) = (be64(&base, l2), be64(&base, l2 + 8));
    assert_eq!(bitmap & 1, 1);
    let with = |e: u64, b: u64| {
        let mut img = base.clone();
        put_be64(&mut img, l2, e);
        put_be64(&mut img, l2 + 8, b);
        img
    };
    for (e, b, says) in [
        (
            entry,
            bitmap | 1 << 32,
            "subclusters 0x1 are both data and zero",
        ),
        (0, 1, "are data but the cluster has no host offset"),
        (1 << 62 | 0x20000, 1, "has a subcluster bitmap"),
        (entry | 1, bitmap, "reserved bits set"),
    ] {
        let err = backup_error(&with(e, b));
        assert!(err.contains(says), "{says}: {err}");
    }
    let err = backup::backup(
        &MemDisk::from_bytes("s", &with(entry, bitmap | 1 << 32)),
        &MemDisk::new("t", 1024),
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(err.is_refusal());
}
