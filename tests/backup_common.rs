//! What the backup test files share: images made with `qemu-img` and
//! `qemu-io`, the `backup` and `restore` jobs run as the host tool runs
//! them, the full round trip checked by `qemu-img compare` and `check`,
//! and QEMU's own count of the data bytes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::backup::{finish_backup, finish_restore, plan_backup, plan_restore};
use boot::qemu::{Disk, Outcome, Verdict};
use kernel_tests::{boot_with_disks, image_dir, tool};
use snapshot::backup::Format;
use snapshot::interface::scenario::JobFailure;

pub const MEM: u64 = 512 << 20;
/// Backups move hundreds of MiB through QEMU: twice the usual hang limit.
pub const TIMEOUT: Duration = Duration::from_secs(2 * kernel_tests::HANG.as_secs());

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh directory for one test, and a qcow2 image in it of `size`
/// with `options`, filled by the `qemu-io` commands given.
pub fn make_image(test: &str, size: &str, options: &str, io: &[&str]) -> (PathBuf, PathBuf) {
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

pub fn boot(cmdline: &str, disks: Vec<Disk>) -> Outcome {
    boot_with_disks(cmdline, MEM, TIMEOUT, disks)
}

/// Backs `src` up to `tape` as the `backup` command does; returns the
/// kernel's outcome and the stream length on success.
pub fn backup(src: &Path, tape: &Path) -> (Outcome, Result<u64, String>) {
    let job = plan_backup(src, tape, MEM).unwrap_or_else(|e| panic!("{e}"));
    let outcome = boot("scenario=backup", job.disks.clone());
    let records = boot::report::records(&outcome.serial).unwrap();
    let result = finish_backup(&job, &records, outcome.verdict == Verdict::Passed);
    (outcome, result)
}

/// Restores `tape` to `out` as the `restore` command does.
pub fn restore(tape: &Path, out: &Path, format: Format) -> (Outcome, Result<(), String>) {
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
pub fn round_trip(dir: &Path, src: &Path) -> (u64, u64) {
    let before = std::fs::read(src).unwrap();
    let tape = dir.join("tape");
    let (outcome, result) = backup(src, &tape);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(20));
    let stream = result.unwrap();
    assert_eq!(
        std::fs::metadata(&tape).unwrap().len(),
        stream,
        "tape length"
    );
    assert!(std::fs::read(src).unwrap() == before, "the source changed");
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
        // `compare` only warns when the sizes differ.
        assert!(!said.contains("size mismatch"), "{name}: {said}");
        if format == Format::Raw {
            let len = std::fs::metadata(&out).unwrap().len();
            assert_eq!(len, virtual_size(src), "{name}: its length");
        }
        if format == Format::Qcow2 {
            let check = tool("qemu-img", &["check", s(&out)]);
            assert!(check.contains("No errors were found"), "{check}");
            assert!(!check.contains("leaked"), "{check}");
        }
        std::fs::remove_file(&out).unwrap();
    }
    (stream, data)
}

/// The disk size `qemu-img info` gives `image` (its first "virtual size"
/// line is the image's own; a JSON reply lists the file's first).
pub fn virtual_size(image: &Path) -> u64 {
    let info = tool("qemu-img", &["info", s(image)]);
    let line = info
        .lines()
        .find(|l| l.starts_with("virtual size:"))
        .unwrap();
    let bytes = &line[line.find('(').unwrap() + 1..line.find(" bytes)").unwrap()];
    bytes.parse().unwrap()
}

/// Bytes QEMU maps as data in `image` (`qemu-img map`): the reference
/// for what the backup must copy.
pub fn qemu_data_bytes(image: &Path) -> u64 {
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

/// The reason the kernel gave for a job that did not complete, as the
/// host tool shows it; panics if it gave none.
pub fn job_failure(outcome: &Outcome) -> String {
    let records = boot::report::records(&outcome.serial).unwrap();
    let failure = records.iter().rev().find_map(JobFailure::from_record);
    let failure = failure.unwrap_or_else(|| panic!("no failure record: {}", outcome.tail(10)));
    failure.to_string()
}
