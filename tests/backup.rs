//! Compact backup and restore from the host, as a user runs them: images
//! made with `qemu-img create` and filled with `qemu-io`, backed up by the
//! kernel to a tape file and restored to raw and qcow2 images, which
//! `qemu-img compare` must find identical to the source (and `qemu-img
//! check` clean). The source file must come through byte for byte.

#[allow(dead_code)]
mod backup_common;

use backup_common::*;

use boot::backup::{finish_backup, plan_backup, plan_restore};
use boot::qemu::{Disk, Verdict};
use kernel_tests::{boot_with_disks, host_tool, tool};
use snapshot::backup::Format;

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

/// A zero-byte disk comes back as a zero-byte raw file, as `qemu-img`
/// sizes the source (QEMU itself is given a sector at least to attach).
#[test]
fn a_zero_byte_image() {
    let (dir, src) = make_image("zero-bytes", "0", "", &[]);
    round_trip(&dir, &src);
    std::fs::remove_dir_all(&dir).unwrap();
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

/// Small guests: a job the host lets boot finishes, whatever its clusters;
/// one it cannot fit is refused up front with a `--mem` that fits. 512-byte
/// clusters make the walk's tables and request lists large beside the data;
/// at 128 and 256 MiB the kernel once ran out of heap mid-way (a panic) when
/// the transfer ring took what the walk needed after it.
#[test]
fn small_guests_refuse_up_front_or_finish() {
    let (dir, src) = make_image(
        "small-guests",
        "1G",
        "cluster_size=512",
        &["write -P 0x21 0 48M", "write -P 0x22 600M 1M"],
    );
    let before = std::fs::read(&src).unwrap();
    let tape = dir.join("tape");
    for mem_mib in [64u64, 96, 128, 256] {
        let mem = mem_mib << 20;
        let job = match plan_backup(&src, &tape, mem) {
            Ok(job) => job,
            Err(e) => {
                assert!(mem_mib < 128, "refused at {mem_mib} MiB: {e}");
                assert!(e.contains("--mem"), "{e}");
                continue;
            }
        };
        let outcome = boot_with_disks("scenario=backup", mem, TIMEOUT, job.disks.clone());
        assert_eq!(
            outcome.verdict,
            Verdict::Passed,
            "at {mem_mib} MiB: {}",
            outcome.tail(20)
        );
        let records = boot::report::records(&outcome.serial).unwrap();
        finish_backup(&job, &records, true).unwrap();
        assert!(std::fs::read(&src).unwrap() == before, "the source changed");
    }
    let out = dir.join("out.raw");
    let (outcome, result) = restore(&tape, &out, Format::Raw);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(20));
    result.unwrap();
    let said = tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&src), s(&out)],
    );
    assert!(said.contains("identical"), "{said}");
    std::fs::remove_dir_all(&dir).unwrap();
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
    let (outcome, result) = backup(&src, &tape);
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
    assert!(result.unwrap_err().contains("was not made"));
    assert!(!out.exists(), "a partial restore was left behind");
    // The host tool, run as a user runs it, ends with the kernel's reason
    // and exits 1, and a file already at --out keeps its contents.
    std::fs::write(&out, b"the user's file").unwrap();
    let run = host_tool(&["restore", "--quiet", "--tape", s(&broken), "--out", s(&out)]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert_eq!(run.last_line(), failure, "{}", run.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), b"the user's file");
    let leftovers: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    std::fs::remove_file(&out).unwrap();

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
        let err = plan_backup(image, &tape, MEM).unwrap_err();
        assert!(err.contains(says), "{err}");
        std::fs::write(&tape, vec![0u8; 1 << 20]).unwrap();
        let outcome = boot(
            "scenario=backup",
            vec![
                Disk {
                    read_only: true,
                    ..Disk::new(image, "source")
                },
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
