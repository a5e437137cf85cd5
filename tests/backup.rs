//! Compact backup and restore from the host, as a user runs them: images
//! made with `qemu-img create` and filled with `qemu-io`, backed up by the
//! kernel to a tape file and restored to raw and qcow2 images, which
//! `qemu-img compare` must find identical to the source (and `qemu-img
//! check` clean). The source file must come through byte for byte.

use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::backup::{finish_backup, finish_restore, plan_backup, plan_restore};
use boot::qemu::{Disk, Outcome, Verdict};
use kernel_tests::{boot_with_disks, host_tool, image_dir, tool};
use snapshot::backup::Format;
use snapshot::interface::scenario::JobFailure;

const MEM: u64 = 512 << 20;
/// Backups move hundreds of MiB through QEMU: twice the usual hang limit.
const TIMEOUT: Duration = Duration::from_secs(2 * kernel_tests::HANG.as_secs());

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh directory for one test, and a qcow2 image in it of `size`
/// with `options`, filled by the `qemu-io` commands given.
fn make_image(test: &str, size: &str, options: &str, io: &[&str]) -> (PathBuf, PathBuf) {
    let dir = image_dir(&format!("backup-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("src.qcow2");
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !options.is_empty() {
        args.extend(["-o", options]);
    }
    args.extend([s(&src), size]);
    tool("qemu-img", &args);
    if !io.is_empty() {
        let mut args = vec!["-f", "qcow2"];
        for c in io {
            args.extend(["-c", c]);
        }
        args.push(s(&src));
        tool("qemu-io", &args);
    }
    (dir, src)
}

fn boot(cmdline: &str, disks: Vec<Disk>) -> Outcome {
    boot_with_disks(cmdline, MEM, TIMEOUT, disks)
}

/// Backs `src` up to `tape` as the `backup` command does; returns the
/// kernel's outcome and the stream length on success.
fn backup(dir: &Path, src: &Path, tape: &Path) -> (Outcome, Result<u64, String>) {
    let job = plan_backup(src, tape, dir, MEM).unwrap_or_else(|e| panic!("{e}"));
    let outcome = boot("scenario=backup", job.disks.clone());
    let records = boot::report::records(&outcome.serial).unwrap();
    let result = finish_backup(&job, &records, outcome.verdict == Verdict::Passed);
    (outcome, result)
}

/// Restores `tape` to `out` as the `restore` command does.
fn restore(tape: &Path, out: &Path, format: Format) -> (Outcome, Result<(), String>) {
    let job = plan_restore(tape, out, format, MEM).unwrap_or_else(|e| panic!("{e}"));
    let outcome = boot(
        &format!("scenario=restore format={}", format.name()),
        job.disks.clone(),
    );
    let records = boot::report::records(&outcome.serial).unwrap();
    let result = finish_restore(&job, &records, outcome.verdict == Verdict::Passed);
    (outcome, result)
}

/// The whole cycle: backup, both restores, compare and check; returns the
/// tape's length and the data bytes the kernel reported.
fn round_trip(dir: &Path, src: &Path) -> (u64, u64) {
    let before = std::fs::read(src).unwrap();
    let tape = dir.join("tape");
    let (outcome, result) = backup(dir, src, &tape);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(20));
    let stream = result.unwrap();
    assert_eq!(
        std::fs::metadata(&tape).unwrap().len(),
        stream,
        "tape length"
    );
    assert!(std::fs::read(src).unwrap() == before, "the source changed");
    assert!(
        !dir.join("backup-scratch.img").exists(),
        "scratch left behind"
    );
    let records = boot::report::records(&outcome.serial).unwrap();
    let done = records.iter().rfind(|r| r.event == "backup.done").unwrap();
    let data = done.u64("data_bytes").unwrap();
    // The job stayed within the memory its figures allow (full windows).
    let heap = records.iter().rfind(|r| r.event == "backup.heap").unwrap();
    let grew = heap.u64("peak_bytes").unwrap() - heap.u64("base_bytes").unwrap();
    let sized = snapshot::backup::Plan::new(&snapshot::devices::block::MemDisk::from_bytes(
        "src", &before,
    ))
    .unwrap()
    .memory_bytes_at_most();
    assert!(
        grew <= sized,
        "the backup used {grew} bytes of heap, at most {sized} expected"
    );

    for (format, name) in [(Format::Raw, "out.raw"), (Format::Qcow2, "out.qcow2")] {
        let out = dir.join(name);
        let (outcome, result) = restore(&tape, &out, format);
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(20));
        result.unwrap();
        let said = tool(
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                format.name(),
                s(src),
                s(&out),
            ],
        );
        assert!(said.contains("Images are identical"), "{name}: {said}");
        if format == Format::Qcow2 {
            let check = tool("qemu-img", &["check", s(&out)]);
            assert!(check.contains("No errors were found"), "{check}");
            assert!(!check.contains("leaked"), "{check}");
        }
        std::fs::remove_file(&out).unwrap();
    }
    (stream, data)
}

/// Bytes QEMU maps as data in `image` (`qemu-img map`): the reference
/// for what the backup must copy.
fn qemu_data_bytes(image: &Path) -> u64 {
    let map = tool("qemu-img", &["map", "--output=json", s(image)]);
    map.lines()
        .filter(|l| l.contains("\"data\": true"))
        .map(|l| {
            let at = l.find("\"length\": ").unwrap() + 10;
            let rest = &l[at..];
            rest[..rest.find(',').unwrap()]
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

#[test]
fn scattered_patterns_zero_writes_and_discards() {
    let (dir, src) = make_image(
        "scattered",
        "64M",
        "",
        &[
            "write -P 0x11 0 100k",
            "write -P 0x22 7M 4k",
            "write -P 0x33 20M 1M",
            "write -P 0x44 33M 512",
            "write -z 21M 128k",
            "write -z 40M 2M",
            "discard 20M 64k",
            "write -P 0x55 63M 1M",
            "discard 63M 512k",
            "write -P 0x66 50M 3M",
            "write -z 51M 64k",
        ],
    );
    let (stream, data) = round_trip(&dir, &src);
    assert_eq!(data, qemu_data_bytes(&src));
    assert!(stream < data + 200 * 1024, "{stream} bytes for {data}");
}

#[test]
fn a_full_image() {
    let (dir, src) = make_image("full", "64M", "", &["write -P 0x7e 0 64M"]);
    let (_, data) = round_trip(&dir, &src);
    assert_eq!(data, 64 << 20);
    assert_eq!(data, qemu_data_bytes(&src));
}

#[test]
fn an_empty_image() {
    let (dir, src) = make_image("empty", "64M", "", &[]);
    let (stream, data) = round_trip(&dir, &src);
    assert_eq!(data, 0);
    assert!(stream < 64 * 1024, "{stream}");
}

#[test]
fn a_100_gib_disk_with_little_data() {
    let (dir, src) = make_image(
        "100g",
        "100G",
        "",
        &[
            "write -P 0x01 0 64k",
            "write -P 0x02 50G 1M",
            "write -z 70G 1G",
            "write -P 0x03 102399M 1M",
        ],
    );
    let (stream, data) = round_trip(&dir, &src);
    assert_eq!(data, (64 << 10) + (2 << 20));
    assert_eq!(data, qemu_data_bytes(&src));
    assert!(stream < 4 << 20, "{stream}");
}

/// `qemu-io` commands writing `count` 4 KiB patterns `step` bytes apart.
fn spread(count: u64, step: u64) -> Vec<String> {
    (0..count)
        .map(|i| format!("write -P {} {} 4k", i % 250 + 1, i * step))
        .collect()
}

/// Large tables do not exhaust the kernel's memory (it has 32 MiB of
/// heap here): the tables are streamed, and the medium holds the data
/// runs only. Each case is one a whole-table reader could not hold.
fn large_tables(test: &str, size: &str, options: &str, io: &[String]) {
    let io: Vec<&str> = io.iter().map(String::as_str).collect();
    let (dir, src) = make_image(test, size, options, &io);
    let (stream, data) = round_trip(&dir, &src);
    assert_eq!(data, qemu_data_bytes(&src));
    // 1.01 times the data, and the header, a table sector, an extent
    // header and the trailer.
    assert!(
        stream as f64 <= data as f64 * 1.01 + 6144.0,
        "{stream} bytes on the medium for {data} of data"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// 1 TiB, 64 KiB clusters, 256 clusters 4 GiB apart: 256 L2 tables of
/// 64 KiB (16 MiB of tables; the full case of 2048 is 128 MiB).
#[test]
fn a_1_tib_disk_with_spread_clusters() {
    large_tables("1t-spread", "1T", "", &spread(256, 4 << 30));
}

/// 4 TiB in 4 KiB clusters: a 16 MiB L1 table.
#[test]
fn a_4_tib_disk_with_4_kib_clusters() {
    large_tables("4t-4k", "4T", "cluster_size=4096", &spread(90, 45 << 30));
}

/// 512-byte clusters, each alone, 10 MB apart and written in an order
/// unlike the disk's, so the source file's order is scrambled too: the
/// layout that costs table 1 the most bytes a cluster. Medium version 2,
/// which recorded where each run lay in the file, needed more than 1.01
/// times the data here.
#[test]
fn lone_512_byte_clusters_in_scrambled_order() {
    let io: Vec<String> = (0..1000u64)
        .map(|i| {
            let c = i * 7919 % 1000;
            format!("write -P {} {} 512", c % 250 + 1, c * 20_000 * 512)
        })
        .collect();
    large_tables("lone-512", "10G", "cluster_size=512", &io);
}

/// 100 GiB in 512-byte clusters: a 25 MiB L1 table.
#[test]
fn a_100_gib_disk_with_512_byte_clusters() {
    large_tables(
        "100g-512",
        "100G",
        "cluster_size=512",
        &spread(100, 1 << 30),
    );
}

#[test]
fn small_clusters_and_odd_refcount_widths() {
    let (dir, src) = make_image(
        "small-clusters",
        "256M",
        "cluster_size=4096,refcount_bits=2",
        &[
            "write -P 0xa1 1M 10k",
            "write -P 0xa2 100M 300k",
            "write -z 101M 8k",
            "write -P 0xa3 255M 1M",
        ],
    );
    round_trip(&dir, &src);
}

/// Broken tapes: what the host sees before booting it refuses at once;
/// what only the kernel sees (extent data) the kernel refuses, and no
/// output file is left behind.
#[test]
fn truncated_and_corrupted_tapes_are_refused() {
    let (dir, src) = make_image(
        "broken-tapes",
        "64M",
        "",
        &["write -P 0x42 0 3M", "write -P 0x43 40M 2M"],
    );
    let tape = dir.join("tape");
    let (outcome, result) = backup(&dir, &src, &tape);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(20));
    let len = result.unwrap();
    let good = std::fs::read(&tape).unwrap();
    let out = dir.join("out.raw");
    let broken = dir.join("broken");

    // Truncated: the host refuses before booting, naming the trailer.
    std::fs::write(&broken, &good[..good.len() - 4096]).unwrap();
    let err = plan_restore(&broken, &out, Format::Raw, MEM).unwrap_err();
    assert!(err.contains("missing trailer"), "{err}");
    assert!(!out.exists());
    // The kernel, given the truncated tape directly, says the same.
    std::fs::write(&out, vec![0u8; 64 << 20]).unwrap();
    let outcome = boot(
        "scenario=restore format=raw",
        vec![
            Disk {
                read_only: true,
                ..Disk::new(&broken, "tape")
            },
            Disk::new(&out, "out"),
        ],
    );
    assert_eq!(outcome.verdict, Verdict::Failed);
    assert!(
        outcome.serial.contains("restore refused: missing trailer"),
        "{}",
        outcome.tail(10)
    );
    std::fs::remove_file(&out).unwrap();

    // Unknown version: refused by the host, saying which.
    let mut bad = good.clone();
    bad[8] = 9;
    std::fs::write(&broken, &bad).unwrap();
    let err = plan_restore(&broken, &out, Format::Raw, MEM).unwrap_err();
    assert!(err.contains("unknown medium version 9"), "{err}");

    // A flipped bit in the data of the last extent: only the kernel reads
    // it, refuses it, and the host removes the partial output.
    let mut bad = good.clone();
    bad[len as usize - 512 - 1000] ^= 4;
    std::fs::write(&broken, &bad).unwrap();
    let (outcome, result) = restore(&broken, &out, Format::Qcow2);
    assert_eq!(outcome.verdict, Verdict::Failed);
    let failure = job_failure(&outcome);
    assert!(
        failure.starts_with("restore refused: bad checksum: extent 4"),
        "{failure}"
    );
    assert!(result.unwrap_err().contains("removed"));
    assert!(!out.exists(), "a partial restore was left behind");
    // The host tool, run as a user runs it, ends with the kernel's reason
    // and exits 1.
    let run = host_tool(&["restore", "--quiet", "--tape", s(&broken), "--out", s(&out)]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.last_line(), failure, "{}", run.stderr);
    assert!(!out.exists(), "a partial restore was left behind");

    // A corrupted trailer.
    let mut bad = good.clone();
    bad[len as usize - 100] ^= 1;
    std::fs::write(&broken, &bad).unwrap();
    let (outcome, _) = restore(&broken, &out, Format::Raw);
    assert!(
        outcome
            .serial
            .contains("restore refused: bad checksum: trailer"),
        "{}",
        outcome.tail(10)
    );
}

/// Images the reader does not support are refused by name, by the host
/// before booting and by the kernel when given one directly; nothing is
/// written to the tape.
#[test]
fn unsupported_sources_are_refused_by_name() {
    let (dir, _) = make_image("unsupported", "16M", "", &["write -P 1 0 1M"]);
    let external = dir.join("external.qcow2");
    let data_file = format!("data_file={}", s(&dir.join("external.raw")));
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            &data_file,
            s(&external),
            "16M",
        ],
    );
    let tape = dir.join("tape");
    // A clone with a backing file is backed up through its chain (see
    // the clone tests), no longer refused.
    let (image, says) = (&external, "unsupported qcow2 feature: external data file");
    {
        let err = plan_backup(image, &tape, &dir, MEM).unwrap_err();
        assert!(err.contains(says), "{err}");
        let scratch = dir.join("scratch.img");
        std::fs::write(&scratch, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&tape, vec![0u8; 1 << 20]).unwrap();
        let outcome = boot(
            "scenario=backup",
            vec![
                Disk {
                    read_only: true,
                    ..Disk::new(image, "source")
                },
                Disk::new(&scratch, "scratch"),
                Disk::new(&tape, "tape"),
            ],
        );
        assert_eq!(outcome.verdict, Verdict::Failed);
        assert_eq!(
            job_failure(&outcome),
            format!("backup refused: {}", err.split_once(": ").unwrap().1),
            "the kernel gives the host's reason"
        );
        assert!(std::fs::read(&tape).unwrap().iter().all(|&b| b == 0));
        // The host tool refuses before booting, with the same reason last.
        let run = host_tool(&["backup", "--source", s(image), "--tape", s(&tape)]);
        assert_eq!(run.code, Some(1), "{}", run.stderr);
        assert_eq!(run.last_line(), format!("backup refused: {err}"));
    }
}

/// The reason the kernel gave for a job that did not complete, as the
/// host tool shows it; panics if it gave none.
fn job_failure(outcome: &Outcome) -> String {
    let records = boot::report::records(&outcome.serial).unwrap();
    let failure = records.iter().rev().find_map(JobFailure::from_record);
    let failure = failure.unwrap_or_else(|| panic!("no failure record: {}", outcome.tail(10)));
    failure.to_string()
}

/// Internal snapshots share clusters with the active layer (refcount 2,
/// `COPIED` clear): the backup takes the active layer, as the guest sees
/// it now.
#[test]
fn internal_snapshots_back_up_the_active_layer() {
    let (dir, src) = make_image("internal-snapshots", "64M", "", &["write -P 0x61 0 1M"]);
    tool("qemu-img", &["snapshot", "-c", "first", s(&src)]);
    tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x62 512k 1M",
            "-c",
            "discard 0 64k",
            s(&src),
        ],
    );
    tool("qemu-img", &["snapshot", "-c", "second", s(&src)]);
    let (_, data) = round_trip(&dir, &src);
    assert_eq!(data, qemu_data_bytes(&src));
}

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
        tool(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &options,
                s(&raw),
                s(&src),
            ],
        );
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
    tool(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on",
            s(&src),
            s(&compressed),
        ],
    );
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
    let (outcome, result) = backup(&dir, &src, &tape);
    assert_eq!(outcome.verdict, Verdict::Failed);
    assert_eq!(
        job_failure(&outcome),
        "backup refused: source: invalid qcow2 image: the compressed cluster at virtual \
         offset 0x0 is not a valid deflate stream (Failed)"
    );
    assert!(result.is_err());
    assert!(!tape.exists(), "a broken tape was left behind");
}
