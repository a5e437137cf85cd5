//! The quick-split mirror from the host, as a user runs it: raw images
//! made with `qemu-img create` and filled with `qemu-io`, `mirror` backs
//! the split instant up to a tape, `restore` brings it back, and
//! `qemu-img compare` judges: with the workload off the tape is the
//! primary byte for byte; with it on, the kernel compares the tape with
//! per-block hashes taken stop-the-world at the instant, and after the
//! resync the secondary is the primary. Refusals and I/O errors on either
//! volume end the run with the reason. QEMU killed at several points
//! (pairing, mid-copy, mid-backup, mid-resync) and booted again with the
//! same disks: the pair resumes from its controller disk and the run
//! finishes with the same results.

use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::qemu::{Config, Disk, Verdict};
use kernel_tests::{boot_with_disks, host_tool, image_dir, kernel, tool};
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
fn a_one_sector_pair_runs_under_the_workload() {
    let dir = image_dir("mirror-one-sector");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (p, sec, tape) = (dir.join("p.img"), dir.join("s.img"), dir.join("tape"));
    for f in [&p, &sec] {
        tool("qemu-img", &["create", "-q", "-f", "raw", s(f), "512"]);
    }
    let run = mirror(&p, &sec, &tape, &["--quiet"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    // The workload wrote the primary (its pattern is not zeros), and
    // after the resync the secondary holds it.
    assert_ne!(
        std::fs::read(&p).unwrap(),
        vec![0u8; 512],
        "no write landed"
    );
    identical(&p, &sec);
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

/// A kernel word with a value it does not take is refused by name, the
/// pair untouched (no controller disk state written), not read as "off".
#[test]
fn a_bad_kernel_word_is_refused_by_name() {
    let (dir, p, sec) = volumes("bad-word", 24);
    let run = mirror(&p, &sec, &dir.join("tape"), &["workload=bogus"]);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("parameter workload=") && run.stderr.contains("expected on or off"),
        "{}",
        run.stderr
    );
    assert!(!dir.join("tape").exists());
}

/// Boots `mirror` on the disks directly, one of them read-only or
/// failing; returns the kernel's failure record.
fn failing_run(test: &str, tweak: impl Fn(&mut [Disk])) -> Option<String> {
    let (dir, p, sec) = volumes(test, 24);
    let job = boot::mirror::plan(&p, &sec, &dir.join("tape"), 512 << 20).unwrap();
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

/// The secondary fails while a split's copy runs: that split is broken
/// for good (a workload may have overwritten blocks of its instant since).
/// The next run, the secondary sound again, resyncs the pair, splits it
/// again at a new instant and finishes: the tape and the secondary are the
/// primary.
#[test]
fn a_split_the_secondary_broke_is_resynced_and_split_again() {
    let (dir, p, sec) = volumes("broken-split", 24);
    let (tape, out) = (dir.join("tape"), dir.join("out.img"));
    let job = boot::mirror::plan(&p, &sec, &tape, 512 << 20).unwrap();
    let mut disks = job.disks.clone();
    disks[1].fail_sector = Some(12345);
    let outcome = boot_with_disks(
        "scenario=mirror workload=off presync=off",
        512 << 20,
        Duration::from_secs(300),
        disks,
    );
    assert_eq!(outcome.verdict, Verdict::Failed, "{}", outcome.tail(20));
    assert!(
        outcome.serial.contains("mirror.split"),
        "the secondary failed before the split: {}",
        outcome.tail(20)
    );
    let run = mirror(&p, &sec, &tape, &["--workload", "off"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert!(run.stdout.contains("resumed_split=0"), "{}", run.stdout);
    restore(&tape, &out);
    identical(&p, &out);
    identical(&p, &sec);
}

/// Where a crash test kills QEMU: the kernel words of the run, among
/// them a hold point (`hold=POINT:N`), where the kernel records
/// `mirror.hold` and stops for good with work left to do. The kill lands
/// while the operation is provably under way, however fast the kernel is.
struct KillPoint {
    words: &'static str,
}

/// Boots `mirror` on the pair and kills QEMU (SIGKILL) once it holds.
fn killed_run(p: &Path, sec: &Path, tape: &Path, at: &KillPoint) {
    let job = boot::mirror::plan(p, sec, tape, 512 << 20).unwrap();
    let config = Config {
        mem_bytes: 512 << 20,
        timeout: Duration::from_secs(300),
        disks: job.disks.clone(),
        ..Config::new(&kernel(), &format!("scenario=mirror {}", at.words))
    };
    let outcome =
        boot::qemu::run_killing(&config, |_| {}, |line| line.contains("mirror.hold")).unwrap();
    assert_eq!(
        outcome.verdict,
        Verdict::UnexpectedExit(None),
        "never held at {}: {}",
        at.words,
        outcome.tail(20)
    );
}

/// Kills a run at `at`, then runs `mirror` again (workload off) on the
/// same disks: it must resume (a pending split if `split_pending`),
/// finish, and leave a tape and a secondary equal to the primary.
fn crash_and_resume(test: &str, at: KillPoint, via: &str, split_pending: bool) {
    let (dir, p, sec) = volumes(test, 24);
    let (tape, out) = (dir.join("tape"), dir.join("out.img"));
    killed_run(&p, &sec, &tape, &at);
    let run = mirror(&p, &sec, &tape, &["--workload", "off", "--via", via]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let opened = run.stdout.lines().find(|l| l.contains("mirror.opened"));
    let want = format!("resumed_split={}", u64::from(split_pending));
    assert!(
        opened.unwrap_or("").contains(&want),
        "{opened:?}, want {want}"
    );
    restore(&tape, &out);
    identical(&p, &out);
    identical(&p, &sec);
}

#[test]
fn killed_while_pairing_the_pair_resumes() {
    let at = KillPoint {
        words: "workload=off hold=pair:3",
    };
    crash_and_resume("crash-pair", at, "secondary", false);
}

#[test]
fn killed_mid_copy_the_split_resumes_toward_its_instant() {
    let at = KillPoint {
        words: "workload=off presync=off hold=copy:1 batch=8",
    };
    crash_and_resume("crash-copy", at, "secondary", true);
}

/// A crash mid-backup leaves a partial tape; the next run writes the
/// tape again from its start (the host creates it afresh), for the same
/// pending instant.
#[test]
fn killed_mid_backup_the_backup_is_redone() {
    let at = KillPoint {
        words: "workload=off presync=off via=memory hold=backup:4",
    };
    crash_and_resume("crash-backup", at, "memory", true);
}

/// Killed while the resync copies what the workload wrote since the
/// split, two blocks a step, after its first step: after the next run
/// the secondary holds every acknowledged write.
#[test]
fn killed_mid_resync_no_acknowledged_write_is_lost() {
    let at = KillPoint {
        words: "workload=on hold=resync:1 batch=2",
    };
    crash_and_resume("crash-resync", at, "secondary", false);
}

/// At `--mem 64M` (a 4 MiB kernel heap) a 64 MiB pair either runs whole
/// and right, its transfers sized down to the heap, or is refused with the
/// figure; never an abort.
#[test]
fn a_64_mib_pair_at_64m_runs_or_is_refused_with_the_figure() {
    let dir = image_dir("mirror-mem64");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (p, sec, tape, out) = (
        dir.join("p.img"),
        dir.join("s.img"),
        dir.join("tape"),
        dir.join("out.img"),
    );
    for f in [&p, &sec] {
        tool("qemu-img", &["create", "-q", "-f", "raw", s(f), "64M"]);
    }
    tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 0 8M",
            "-c",
            "write -P 0x11 40M 3M",
            s(&p),
        ],
    );
    for (via, workload) in [("memory", "off"), ("secondary", "on")] {
        let run = mirror(
            &p,
            &sec,
            &tape,
            &["--mem", "64M", "--via", via, "--workload", workload],
        );
        let all = format!("{}\n{}", run.stdout, run.stderr);
        assert!(!all.contains("PANIC"), "{}", run.stderr);
        if run.code != Some(0) {
            assert_eq!(run.code, Some(1), "{all}");
            assert!(
                all.contains("kernel memory") || all.contains("kernel heap"),
                "{all}"
            );
            assert!(all.contains("--mem"), "{all}");
            continue;
        }
        let backup = run.stdout.lines().rfind(|l| l.contains("mirror.backup"));
        let backup = backup.unwrap_or("");
        assert!(
            backup.contains("mismatched_blocks=0") && backup.contains("verified=1"),
            "{backup}"
        );
        if workload == "off" {
            restore(&tape, &out);
            identical(&p, &out);
        }
        identical(&p, &sec);
    }
}
