//! The quick-split mirror from the host, as a user runs it: raw images
//! made with `qemu-img create` and filled with `qemu-io`, `mirror` backs
//! the split instant up to a tape, `restore` brings it back, and
//! `qemu-img compare` judges: with the workload off the tape is the
//! primary byte for byte; with it on, the kernel compares the tape with
//! per-block hashes taken stop-the-world at the instant, and after the
//! resync the secondary is the primary. Refusals and I/O errors on either
//! volume end the run with the reason.

use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::qemu::{Disk, Verdict};
use kernel_tests::{boot_with_disks, host_tool, image_dir, tool};
use snapshot::interface::scenario::JobFailure;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh directory with a 24 MiB primary holding scattered data and a
/// blank secondary of `secondary_mib`.
fn volumes(test: &str, secondary_mib: u64) -> (PathBuf, PathBuf, PathBuf) {
    let dir = image_dir(&format!("mirror-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (p, sec) = (dir.join("p.img"), dir.join("s.img"));
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&p), "24M"]);
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 1M",
            "-c",
            "write -P 0x11 5M 3M",
            "-c",
            "write -P 0xc3 23M 1M",
            s(&p),
        ],
    );
    let size = format!("{secondary_mib}M");
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&sec), &size]);
    (dir, p, sec)
}

fn identical(a: &Path, b: &Path) {
    let out = tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(a), s(b)],
    );
    assert!(out.contains("Images are identical"), "{out}");
}

fn mirror(p: &Path, sec: &Path, tape: &Path, extra: &[&str]) -> kernel_tests::HostRun {
    let mut args = vec![
        "mirror",
        "--primary",
        s(p),
        "--secondary",
        s(sec),
        "--tape",
        s(tape),
    ];
    args.extend(extra);
    host_tool(&args)
}

fn restore(tape: &Path, out: &Path) {
    let run = host_tool(&["restore", "--tape", s(tape), "--out", s(out), "--quiet"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[test]
fn without_a_workload_the_tape_is_the_primary_in_both_modes() {
    for via in ["secondary", "memory"] {
        let (dir, p, sec) = volumes(&format!("off-{via}"), 24);
        let (tape, out) = (dir.join("tape"), dir.join("out.img"));
        let run = mirror(&p, &sec, &tape, &["--workload", "off", "--via", via]);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        restore(&tape, &out);
        identical(&p, &out);
        identical(&p, &sec);
        // A second run resumes the pair from its controller disk: in sync,
        // nothing to copy.
        let again = mirror(&p, &sec, &tape, &["--workload", "off", "--via", via]);
        assert_eq!(again.code, Some(0), "{}", again.stderr);
        restore(&tape, &out);
        identical(&p, &out);
    }
}

#[test]
fn under_a_workload_the_tape_is_the_split_instant() {
    for via in ["memory", "secondary"] {
        let (dir, p, sec) = volumes(&format!("on-{via}"), 32);
        let (tape, out) = (dir.join("tape"), dir.join("out.img"));
        let run = mirror(&p, &sec, &tape, &["--via", via]);
        assert_eq!(run.code, Some(0), "{}", run.stderr);
        // The kernel compared the tape with the stop-the-world reference.
        let line = |event: &str| {
            let found = run.stdout.lines().rfind(|l| l.contains(event));
            found.unwrap_or("").to_string()
        };
        let backup = line("mirror.backup");
        assert!(
            backup.contains("mismatched_blocks=0") && backup.contains("verified=1"),
            "{backup}"
        );
        let done = line("mirror.done");
        assert!(done.contains("in_sync=1"), "{done}");
        restore(&tape, &out);
        // The workload wrote the primary after the instant: the tape differs.
        let cmp = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw", s(&p), s(&out)])
            .output()
            .unwrap();
        assert_eq!(cmp.status.code(), Some(1), "the workload changed nothing?");
        // After the resync, the secondary is the primary (its tail past
        // the primary's size untouched, zero).
        let cut = dir.join("s-cut.img");
        std::fs::copy(&sec, &cut).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&cut)
            .unwrap()
            .set_len(24 << 20)
            .unwrap();
        identical(&p, &cut);
    }
}

#[test]
fn bad_pairs_are_refused_before_booting() {
    let (dir, p, small) = volumes("refusals", 16);
    let tape = dir.join("tape");
    let run = mirror(&p, &p, &tape, &[]);
    assert_eq!(run.code, Some(1));
    assert!(run.stderr.contains("are the same file"), "{}", run.stderr);
    let run = mirror(&p, &small, &tape, &[]);
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains(
            "the secondary (16777216 bytes) is smaller than the primary (25165824 bytes)"
        ),
        "{}",
        run.stderr
    );
    let run = mirror(&p, &small, &tape, &["--via", "tape"]);
    assert_eq!(run.code, Some(2), "{}", run.stderr);
}

/// Boots `mirror` on the disks directly, one of them read-only or
/// failing; returns the kernel's failure record.
fn failing_run(test: &str, tweak: impl Fn(&mut [Disk])) -> Option<String> {
    let (dir, p, sec) = volumes(test, 24);
    let job = boot::mirror::plan(&p, &sec, &dir.join("tape")).unwrap();
    let mut disks = job.disks.clone();
    tweak(&mut disks);
    let outcome = boot_with_disks(
        "scenario=mirror workload=off",
        512 << 20,
        Duration::from_secs(300),
        disks,
    );
    assert_eq!(outcome.verdict, Verdict::Failed, "{}", outcome.tail(20));
    let records = boot::report::records(&outcome.serial).unwrap();
    records
        .iter()
        .rev()
        .find_map(JobFailure::from_record)
        .map(|f| f.to_string())
}

#[test]
fn a_read_only_primary_is_refused() {
    let why = failing_run("ro", |d| d[0].read_only = true);
    assert_eq!(
        why.as_deref(),
        Some("mirror refused: disk 'primary' is read-only; the mirror writes it")
    );
}

#[test]
fn an_io_error_on_either_volume_names_disk_and_sector() {
    let why = failing_run("bad-secondary", |d| d[1].fail_sector = Some(12345));
    let why = why.unwrap_or_default();
    assert!(
        why.starts_with("mirror failed: pair suspended: disk 'secondary': I/O error at sector"),
        "{why}"
    );
    let why = failing_run("bad-primary", |d| d[0].fail_sector = Some(23456));
    let why = why.unwrap_or_default();
    assert!(
        why.starts_with("mirror failed: disk 'primary': I/O error at sector"),
        "{why}"
    );
}
