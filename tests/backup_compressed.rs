//! Compact backup of compressed (deflate, zstd) and extended-L2 qcow2
//! images as `qemu-img convert -c` and `qemu-io` make them: restores are
//! identical under `qemu-img compare`; a broken compressed stream is
//! refused by name.

#[allow(dead_code)]
mod backup_common;

use backup_common::*;
use std::path::Path;

use boot::qemu::Verdict;
use kernel_tests::{image_dir, tool};

/// A raw image of `size` bytes holding, in each of `regions` (offset,
/// length), text-like bytes that compress about twofold, so compressed
/// clusters vary in size and cross host cluster boundaries.
fn raw_with_text(path: &Path, size: u64, regions: &[(u64, u64)]) {
    let mut raw = vec![0u8; size as usize];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for &(at, len) in regions {
        for b in &mut raw[at as usize..(at + len) as usize] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = b"etaoin shrdlu\n"[(x % 14) as usize];
        }
    }
    std::fs::write(path, raw).unwrap();
}

/// `qemu-img convert -c -O qcow2 -o OPTIONS FROM TO`: every cluster of
/// `from` that holds data, compressed.
fn compress(from: &Path, to: &Path, options: &str) {
    let args = [
        "convert",
        "-c",
        "-O",
        "qcow2",
        "-o",
        options,
        s(from),
        s(to),
    ];
    tool("qemu-img", &args);
}

/// `qemu-img convert -c` of text and zeros, with deflate and with zstd,
/// then written over with `qemu-io` (new data, zeros, a compressed cluster
/// rewritten in part): restores are identical under `qemu-img compare`,
/// and the backup copies what QEMU maps as data.
#[test]
fn compressed_images_deflate_and_zstd() {
    for kind in ["zlib", "zstd"] {
        let test = format!("compressed-{kind}");
        let dir = image_dir(&format!("backup-{test}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("src.raw");
        raw_with_text(
            &raw,
            64 << 20,
            &[(0, 3 << 20), (20 << 20, 1 << 20), (63 << 20, 1 << 20)],
        );
        let src = dir.join("src.qcow2");
        let options = format!("compression_type={kind}");
        compress(&raw, &src, &options);
        std::fs::remove_file(&raw).unwrap();
        tool(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x5a 40M 256k",
                "-c",
                "write -z 64k 128k",
                "-c",
                "write -P 0x6b 1000k 4k",
                s(&src),
            ],
        );
        let (_, data) = round_trip(&dir, &src);
        assert_eq!(data, qemu_data_bytes(&src), "{kind}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Extended L2 entries written at subcluster granularity (2 KiB
/// subclusters of 64 KiB clusters), and compressed clusters in an image
/// with extended L2 entries.
#[test]
fn subclusters_written_in_part() {
    let (dir, src) = make_image(
        "subclusters",
        "64M",
        "extended_l2=on",
        &[
            "write -P 0x11 0 2k",
            "write -P 0x12 6k 1k",
            "write -z 8k 4k",
            "write -P 0x13 1M 64k",
            "write -P 0x14 2M 62k",
            "write -z 2M 2k",
            "discard 2113536 4k",
            "write -P 0x15 66062336 10k",
        ],
    );
    round_trip(&dir, &src);
    let compressed = dir.join("compressed.qcow2");
    compress(&src, &compressed, "extended_l2=on");
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x16 1052672 2k",
            s(&compressed),
        ],
    );
    std::fs::remove_file(&src).unwrap();
    round_trip(&dir, &compressed);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A compressed cluster whose stream is broken: the host cannot see it
/// before booting, the kernel refuses it by name, and no tape is left.
#[test]
fn a_broken_compressed_stream_is_refused() {
    let (dir, plain) = make_image("broken-compressed", "16M", "", &["write -P 0x21 0 1M"]);
    let src = dir.join("compressed.qcow2");
    tool(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", s(&plain), s(&src)],
    );
    // The first compressed cluster's data: L1[0] -> L2 table -> entry 0.
    let mut img = std::fs::read(&src).unwrap();
    let be = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l2 = (be(&img, be(&img, 40) as usize) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be(&img, l2);
    assert_ne!(entry & 1 << 62, 0, "not compressed");
    let offset = (entry & ((1 << 54) - 1)) as usize; // 64 KiB clusters
    img[offset..offset + 8].fill(0xff);
    std::fs::write(&src, img).unwrap();
    let tape = dir.join("tape");
    let (outcome, result) = backup(&src, &tape);
    assert_eq!(outcome.verdict, Verdict::Failed);
    assert_eq!(
        job_failure(&outcome),
        "backup refused: source: invalid qcow2 image: the compressed cluster at virtual \
         offset 0x0 is not a valid deflate stream (Failed)"
    );
    assert!(result.is_err());
    assert!(!tape.exists(), "a broken tape was left behind");
}
