//! The host's side of the virtio-blk tests: the kernel writes through the
//! driver, QEMU exits, and the host reads the image file itself.

use kernel_tests::{image_dir, run_kernel_test_with_disks, DiskSpec, HANG};
use snapshot::devices::block::{fill_pattern, host_check_extents, HOST_CHECK_SEED, SECTOR_SIZE};

/// Bytes the kernel wrote are in the file at the right offsets, and every
/// other byte is still zero.
#[test]
fn kernel_writes_are_in_the_image_at_their_offsets() {
    let test = "blk::writes_land_where_the_host_expects";
    let disks = [DiskSpec::parse("data0:16").unwrap()];
    if let Err(e) = run_kernel_test_with_disks(test, &disks, HANG) {
        panic!("{e}");
    }
    let image = std::fs::read(image_dir(test).join("data0.img")).expect("image");
    assert_eq!(image.len(), 16 << 20, "the image changed size");
    let sectors = (image.len() / SECTOR_SIZE) as u64;
    let mut expected = vec![0u8; image.len()];
    let extents = host_check_extents(sectors);
    assert!(extents.len() >= 12);
    for &(start, len) in &extents {
        let at = start as usize * SECTOR_SIZE;
        fill_pattern(
            HOST_CHECK_SEED,
            start,
            &mut expected[at..at + len as usize * SECTOR_SIZE],
        );
    }
    if let Some(i) = (0..image.len()).find(|&i| image[i] != expected[i]) {
        panic!(
            "image byte {i} (sector {}) is {:#04x}, expected {:#04x}",
            i / SECTOR_SIZE,
            image[i],
            expected[i]
        );
    }
}

/// With `blk=poll` the same two-disk test passes with completions found by
/// polling the used ring, no interrupts.
#[test]
fn polling_mode_drives_two_disks_without_interrupts() {
    let test = "blk::two_disks_at_once";
    let specs = [
        DiskSpec::parse("data0:32").unwrap(),
        DiskSpec::parse("data1:32").unwrap(),
    ];
    let dir = image_dir("blk-poll-mode");
    let disks = kernel_tests::make_images(&dir, &specs);
    let outcome = kernel_tests::boot_with_disks(
        &format!("scenario=test test={test} blk=poll"),
        256 << 20,
        HANG,
        disks,
    );
    assert!(
        outcome.serial.contains(&format!("KTEST-PASS {test}")),
        "{}",
        outcome.tail(20)
    );
    assert_eq!(outcome.serial.matches(", polled").count(), 2);
}
