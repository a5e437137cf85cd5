//! Snapshots to disk, from the host: the kernel writes a live snapshot to a
//! virtio-blk disk as an ELF core file, QEMU exits, and the host takes the
//! file off the image and reads it with `readelf` and `gdb`, the tools a
//! user would reach for.

use std::path::Path;

use boot::corefile;
use boot::qemu::{Disk, Verdict};
use kernel_tests::{image_dir, run_kernel_test_with_disks, tool, DiskSpec, HANG};

const MEM: u64 = 128 << 20;

/// The `memsnap` scenario's core file: `readelf` lists one load per range
/// plus the kernel image's alias, and `gdb` with the kernel ELF prints
/// `SNAPSHOT_MARK` as it was at the instant (1), though the kernel set it
/// to 2 just after, and unwinds the snapshotting thread from the core.
#[test]
fn core_file_reads_in_readelf_and_gdb_with_snapshot_time_values() {
    let dir = image_dir("memsnap-core-file");
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("snap.img");
    boot::bench::make_blank_image(&image, MEM + (16 << 20)).unwrap();
    let outcome = kernel_tests::boot_with_disks(
        "scenario=memsnap disk=snap",
        MEM,
        HANG,
        vec![Disk::new(&image, "snap")],
    );
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(25));
    assert!(outcome.serial.contains("0 mismatched pages"));
    let records = boot::report::records(&outcome.serial).unwrap();
    let len = records
        .iter()
        .rfind(|r| r.event == "memsnap.core")
        .and_then(|r| r.u64("bytes"))
        .expect("memsnap.core record");
    let core_path = dir.join("snap.core");
    let core = corefile::extract(&image, len, &core_path, |_, _| {}).unwrap();
    assert_eq!(std::fs::metadata(&core_path).unwrap().len(), len);

    let readelf = tool("readelf", &["-lW", core_path.to_str().unwrap()]);
    assert!(readelf.contains("CORE (Core file)"), "{readelf}");
    let load_lines = readelf
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"));
    assert_eq!(load_lines.count(), core.loads.len(), "{readelf}");
    assert!(readelf.contains("NOTE"), "{readelf}");

    let kernel = kernel_tests::kernel();
    let gdb = tool(
        "gdb",
        &[
            "-batch",
            "-nx",
            "-ex",
            // The raw 8 bytes: an atomic's inner fields differ between
            // Rust releases (1.99 wraps the value in `Align8`).
            "print *(&kernel::scenario::SNAPSHOT_MARK as *const u64)",
            "-ex",
            "bt 3",
            kernel.to_str().unwrap(),
            core_path.to_str().unwrap(),
        ],
    );
    assert!(gdb.contains("$1 = 1\n"), "gdb did not print 1:\n{gdb}");
    assert!(gdb.contains("memsnap::start"), "no backtrace:\n{gdb}");
    let _ = std::fs::remove_file(&image);
    let _ = std::fs::remove_file(&core_path);
}

/// After the kernel test that fails a disk sector mid-way, the image is
/// recognised as an unfinished snapshot: never as a core file.
#[test]
fn interrupted_snapshot_is_recognised_as_incomplete() {
    let test = "memsnap_disk::io_error_midway_aborts_cleanly";
    let disks = [DiskSpec::parse("bad:272:fail=204800").unwrap()];
    if let Err(e) = run_kernel_test_with_disks(test, &disks, HANG) {
        panic!("{e}");
    }
    let image = image_dir(test).join("bad.img");
    let e = corefile::inspect(&image).unwrap_err();
    assert!(e.contains("incomplete snapshot"), "{e}");
    let out = image_dir(test).join("never.core");
    let e = corefile::extract(&image, 1 << 20, &out, |_, _| {}).unwrap_err();
    assert!(e.contains("incomplete"), "{e}");
    assert!(
        !Path::new(&out).exists(),
        "an incomplete core was copied out"
    );
}
