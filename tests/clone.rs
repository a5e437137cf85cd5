//! Clones and the online clone split as a user runs them: images made by
//! `qemu-img create -b ... -F ...` and filled with `qemu-io`, split by the
//! kernel on virtio disks, then judged by QEMU's own tools: `qemu-img
//! check` (no corruption), `qemu-img info` (no backing file after the
//! split) and `qemu-img compare` against `qemu-img convert` of the
//! original chain, with the workload's writes replayed on the host from
//! its seed. QEMU is also killed in the middle of splits, and the split
//! resumed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::clone::{finish_split, make_clone, plan_split, replay_workload, undo_plan, SplitJob};
use boot::qemu::{self, Config, Disk, Outcome, Verdict};
use kernel_tests::{host_tool, image_dir, kernel, tool};
use snapshot::interface::trace::Record;
use snapshot::qcow2::workload;

const MEM: u64 = 512 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn fresh(test: &str) -> PathBuf {
    let dir = image_dir(&format!("clone-{test}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    dir
}

fn qemu_io(image: &Path, format: &str, cmds: &[String]) {
    let mut args = vec!["-f", format];
    for c in cmds {
        args.extend(["-c", c.as_str()]);
    }
    args.push(s(image));
    tool("qemu-io", &args);
}

/// Scattered writes of `count` pieces of `len` bytes, each its own pattern.
fn scattered(count: u64, stride: u64, len: &str, seed: u64) -> Vec<String> {
    (0..count)
        .map(|k| format!("write -q -P {} {} {len}", (k + seed) % 250 + 1, k * stride))
        .collect()
}

/// A new qcow2 image at `path` of `size` with `options`.
fn qcow2(path: &Path, size: &str, options: &str) {
    tool(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", options, s(path), size],
    );
}

/// Points `image` at `backing` in `format` without touching its data
/// (`qemu-img rebase -u`).
fn rebase(image: &Path, backing: &str, format: &str) {
    tool(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            format,
            s(image),
        ],
    );
}

/// A new qcow2 image at `image` over `backing` (as the header names it)
/// in `format`, as `qemu-img create -b -F` makes it.
fn overlay(image: &Path, backing: &str, format: &str) {
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            backing,
            "-F",
            format,
            s(image),
        ],
    );
}

fn boot(cmdline: &str, disks: Vec<Disk>, kill_at_pct: Option<u64>) -> Outcome {
    boot_with(MEM, cmdline, disks, kill_at_pct)
}

/// Boots; with `kill_at_pct`, kills QEMU at the first `clone.progress`
/// record at or past that per cent (records skip per cents when a burst
/// settles more than one, so an exact per cent may never come).
fn boot_with(mem: u64, cmdline: &str, disks: Vec<Disk>, kill_at_pct: Option<u64>) -> Outcome {
    let config = Config {
        mem_bytes: mem,
        timeout: Duration::from_secs(300),
        disks,
        ..Config::new(&kernel(), cmdline)
    };
    let pct = |line: &str| {
        let rest = &line[line.find("clone.progress")?..];
        let digits = rest[rest.find(" pct=")? + 5..].split(' ').next()?;
        digits.parse::<u64>().ok()
    };
    let kill_at = |line: &str| kill_at_pct.is_some_and(|at| pct(line).is_some_and(|p| p >= at));
    qemu::run_killing(&config, |_| {}, kill_at).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs the split of `job`; returns the outcome and the `clone.split`
/// record's (copied + zeroed clusters, workload requests).
fn split(
    job: &SplitJob,
    workload: bool,
    kill_at_pct: Option<u64>,
) -> (Outcome, Option<(u64, u64)>) {
    let cmdline = if workload {
        "scenario=clone-split workload=on share=30"
    } else {
        "scenario=clone-split share=30"
    };
    let outcome = boot(cmdline, job.disks.clone(), kill_at_pct);
    let records: Vec<Record<'_>> = boot::report::records(&outcome.serial).unwrap();
    let ops = finish_split(job, &records).unwrap_or_else(|e| panic!("{e}"));
    let done = records.iter().rfind(|r| r.event == "clone.split").map(|r| {
        (
            r.u64("copied").unwrap() + r.u64("zeroed").unwrap(),
            ops.unwrap(),
        )
    });
    (outcome, done)
}

fn assert_standalone_and_equal(clone: &Path, expected: &Path) {
    let check = tool("qemu-img", &["check", s(clone)]);
    assert!(check.contains("No errors were found"), "{check}");
    let info = tool("qemu-img", &["info", "--output=json", s(clone)]);
    assert!(!info.contains("backing-filename"), "still backed: {info}");
    assert_equal_to_raw(clone, expected);
}

/// `dir`/expected.raw: what `image` reads, by `qemu-img convert`.
fn flattened(dir: &Path, image: &Path) -> PathBuf {
    let expected = dir.join("expected.raw");
    tool(
        "qemu-img",
        &["convert", "-O", "raw", s(image), s(&expected)],
    );
    expected
}

/// `qemu-img compare` finds the qcow2 `clone` equal to the raw `expected`.
fn assert_equal_to_raw(clone: &Path, expected: &Path) {
    tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(expected), s(clone)],
    );
}

/// A qcow2 base, a clone made by the `clone` command (relative backing
/// name), the split with the workload running: the result is the chain
/// flattened plus exactly the workload's writes.
#[test]
fn split_with_workload_holds_the_chain_and_the_workload_writes() {
    let dir = fresh("workload");
    let base = dir.join("base.qcow2");
    qcow2(&base, "64M", "cluster_size=4k");
    qemu_io(&base, "qcow2", &scattered(200, 300 << 10, "20k", 1));
    let clone = dir.join("sub/clone.qcow2");
    let run = host_tool(&["clone", "--base", s(&base), "--out", s(&clone), "--quiet"]);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let info = tool("qemu-img", &["info", s(&clone)]);
    assert!(info.contains("backing file: ../base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
    let expected = flattened(&dir, &clone);
    let job = plan_split(&clone).unwrap();
    let (outcome, done) = split(&job, true, None);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(30));
    let (_, ops) = done.expect("a clone.split record");
    assert!(ops > 0, "the workload ran");
    replay_workload(&expected, workload::SEED, ops).unwrap();
    assert_standalone_and_equal(&clone, &expected);
    // The base is not needed any more.
    std::fs::remove_file(&base).unwrap();
    assert_equal_to_raw(&clone, &expected);
}

/// A 1 TiB clone over a chain holding three clusters, one of them zeroed
/// by a zero cluster in the middle layer: the split copies the two that
/// read data, leaves the rest holes (no L2 tables: the file stays under
/// 1 MiB; before 2026-11-30 every hole became a zero entry and a 4 TiB
/// clone grew to 513 MiB) and reads as the chain did, by `qemu-img
/// compare`, `map` and `check`, the chain moved away.
#[test]
fn a_huge_clone_of_a_nearly_empty_chain_stays_small() {
    let dir = fresh("huge");
    let base = dir.join("base.qcow2");
    qcow2(&base, "1T", "cluster_size=64k");
    qemu_io(
        &base,
        "qcow2",
        &[
            "write -q -P 7 0 64k".into(),
            "write -q -P 8 512G 64k".into(),
        ],
    );
    let mid = dir.join("mid.qcow2");
    overlay(&mid, "base.qcow2", "qcow2");
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -q -z 512G 64k".into(),
            "write -q -P 9 900G 64k".into(),
        ],
    );
    let clone = dir.join("sub/clone.qcow2");
    make_clone(&mid, &clone, None).unwrap();
    let job = plan_split(&clone).unwrap();
    let outcome = boot("scenario=clone-split", job.disks.clone(), None);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(30));
    let records: Vec<Record<'_>> = boot::report::records(&outcome.serial).unwrap();
    finish_split(&job, &records).unwrap_or_else(|e| panic!("{e}"));
    let check = tool("qemu-img", &["check", s(&clone)]);
    assert!(check.contains("No errors were found"), "{check}");
    let len = std::fs::metadata(&clone).unwrap().len();
    assert!(len < 1 << 20, "the clone grew to {len} bytes");
    let data = data_bytes(&clone);
    assert_eq!(data, 2 << 16, "data the clone maps itself");
    // The clone alone reads as the chain did.
    tool(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "qcow2", s(&mid), s(&clone)],
    );
    std::fs::rename(&mid, dir.join("moved.qcow2")).unwrap();
    std::fs::rename(&base, dir.join("moved-base.qcow2")).unwrap();
    let info = tool("qemu-img", &["info", "--output=json", s(&clone)]);
    assert!(!info.contains("backing-filename"), "still backed: {info}");
    let reads = [
        "read -q -P 7 0 64k",
        "read -q -P 0 64k 64k",
        "read -q -P 0 512G 64k",
    ];
    qemu_io(&clone, "qcow2", &reads.map(String::from));
    qemu_io(&clone, "qcow2", &["read -q -P 9 900G 64k".into()]);
}

/// An 8 MiB clone of 2 MiB clusters splits at the scenarios' memory (it
/// was refused: sixteen 2 MiB L2 tables were reckoned for an image of
/// one). With less memory it is refused saying that the guest's memory is
/// short, with both figures and a `--mem` that does.
#[test]
fn a_small_clone_of_big_clusters_splits_or_names_the_memory_it_needs() {
    let dir = fresh("bigcluster");
    let base = dir.join("base.qcow2");
    qcow2(&base, "8M", "cluster_size=2M");
    qemu_io(&base, "qcow2", &["write -q -P 5 1M 3M".into()]);
    let clone = dir.join("sub/clone.qcow2");
    make_clone(&base, &clone, None).unwrap();
    let expected = flattened(&dir, &clone);
    let job = plan_split(&clone).unwrap();
    let refused = boot_with(256 << 20, "scenario=clone-split", job.disks.clone(), None);
    assert_ne!(refused.verdict, Verdict::Passed);
    let why = refused
        .serial
        .lines()
        .find(|l| l.contains("--mem"))
        .unwrap_or_else(|| panic!("no --mem in the refusal: {}", refused.tail(10)));
    assert!(why.contains("memory") && why.contains("free"), "{why}");
    let at = why.find("--mem ").unwrap() + 6;
    let mib: u64 = why[at..].split('M').next().unwrap().parse().unwrap();
    // The heap grows with the memory: what passes at `mib` passes at the
    // scenarios' memory.
    assert!(mib <= MEM >> 20, "{why}");
    assert_equal_to_raw(&clone, &expected);
    let outcome = boot_with(mib << 20, "scenario=clone-split", job.disks.clone(), None);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(30));
    let records: Vec<Record<'_>> = boot::report::records(&outcome.serial).unwrap();
    finish_split(&job, &records).unwrap_or_else(|e| panic!("{e}"));
    assert_standalone_and_equal(&clone, &expected);
}

/// Bytes `qemu-img map` shows the image at `path` holding data itself.
fn data_bytes(path: &Path) -> u64 {
    let map = tool("qemu-img", &["map", "--output=json", s(path)]);
    map.lines()
        .filter(|l| l.contains("\"data\": true") && l.contains("\"depth\": 0"))
        .map(|l| {
            let at = l.find("\"length\":").unwrap() + 9;
            l[at..]
                .trim_start()
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum()
}

/// Raw base, qcow2 middle layer with writes of its own, qcow2 clone with
/// writes of its own: the split reads through both.
#[test]
fn a_chain_of_depth_two_splits_to_the_flattened_chain() {
    let dir = fresh("depth2");
    let base = dir.join("base.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&base), "32M"]);
    qemu_io(&base, "raw", &scattered(40, 700 << 10, "100k", 3));
    let mid = dir.join("mid.qcow2");
    overlay(&mid, "base.raw", "raw");
    qemu_io(&mid, "qcow2", &scattered(30, 900 << 10, "7k", 5));
    let clone = dir.join("sub/clone.qcow2");
    overlay(&clone, "../mid.qcow2", "qcow2");
    qemu_io(&clone, "qcow2", &scattered(10, 3 << 20, "3k", 9));
    let expected = flattened(&dir, &clone);
    let job = plan_split(&clone).unwrap();
    assert_eq!(job.chain.len(), 2);
    let (outcome, done) = split(&job, false, None);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(30));
    assert!(done.is_some());
    assert_standalone_and_equal(&clone, &expected);
}

/// QEMU killed at several points of a split: the image is sound by
/// `qemu-img check`, still reads as the clone did, and a second run
/// settles exactly the holes left (never recopying a filled cluster).
#[test]
fn a_split_killed_at_several_points_resumes_without_recopying() {
    for point in [1, 4, 7] {
        let dir = fresh(&format!("kill-{point}"));
        let base = dir.join("base.qcow2");
        qcow2(&base, "96M", "cluster_size=4k");
        qemu_io(&base, "qcow2", &scattered(300, 320 << 10, "60k", 2));
        let clone = dir.join("sub/clone.qcow2");
        make_clone(&base, &clone, None).unwrap();
        let expected = flattened(&dir, &clone);
        let job = plan_split(&clone).unwrap();
        let (outcome, done) = split(&job, false, Some(point));
        assert_ne!(
            outcome.verdict,
            Verdict::Passed,
            "pct={point}: the split finished first"
        );
        assert!(done.is_none());
        let check = check_allowing_leaks(&clone);
        assert!(
            check.contains("No errors were found") || check.contains("leaked clusters"),
            "{check}"
        );
        assert!(!check.contains("ERROR"), "{check}");
        assert_equal_to_raw(&clone, &expected);
        let holes = holes(&clone);
        assert!(holes > 0, "{point}: nothing left to do");
        let job = plan_split(&clone).unwrap();
        let (outcome, done) = split(&job, false, None);
        assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(30));
        assert_eq!(
            done.unwrap().0,
            holes,
            "{point}: the resumed split settles exactly the holes left"
        );
        assert_standalone_and_equal(&clone, &expected);
    }
}

/// `qemu-img check` of `path`, whose exit status may say "leaks only" (3)
/// as well as "no errors" (0); its report.
fn check_allowing_leaks(path: &Path) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(["check", s(path)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(matches!(out.status.code(), Some(0 | 3)), "{text}");
    text
}

/// Holes left in the clone at `path`, by `qemu-img map`: clusters (of
/// the size `qemu-img info` gives) it does not allocate itself (depth > 0
/// or unallocated).
fn holes(path: &Path) -> u64 {
    let info = tool("qemu-img", &["info", "--output=json", s(path)]);
    let at = info.find("\"cluster-size\":").unwrap() + 15;
    let cluster: u64 = info[at..]
        .trim_start()
        .split([',', '}', '\n'])
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let map = tool("qemu-img", &["map", "--output=json", s(path)]);
    let mut holes = 0;
    for line in map.lines().filter(|l| l.contains("\"start\"")) {
        let num = |key: &str| -> u64 {
            let at = line.find(&format!("\"{key}\":")).unwrap() + key.len() + 3;
            line[at..]
                .trim_start()
                .split([',', '}'])
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        if num("depth") > 0 || line.contains("\"present\": false") {
            holes += num("length");
        }
    }
    assert_eq!(holes % cluster, 0, "holes are whole clusters");
    holes / cluster
}

/// Bad chains are refused before anything is written, naming the problem.
#[test]
fn bad_chains_are_refused_with_nothing_written() {
    let dir = fresh("refuse");
    let base = dir.join("base.qcow2");
    qcow2(&base, "16M", "cluster_size=64k");
    let clone = dir.join("sub/clone.qcow2");
    overlay(&clone, "../base.qcow2", "qcow2");
    let refused = |why: &str| {
        let before = std::fs::read(&clone).unwrap();
        let e = plan_split(&clone).unwrap_err();
        assert!(e.contains(why), "{e}");
        assert_eq!(std::fs::read(&clone).unwrap(), before, "nothing written");
    };
    std::fs::rename(&base, dir.join("moved.qcow2")).unwrap();
    refused(&format!("{}", dir.join("sub/../base.qcow2").display()));
    std::fs::rename(dir.join("moved.qcow2"), &base).unwrap();
    // A loop: the base names the clone.
    rebase(&base, "sub/clone.qcow2", "qcow2");
    refused("loops");
    tool(
        "qemu-img",
        &["rebase", "-u", "-f", "qcow2", "-b", "", s(&base)],
    );
    // An unsupported feature in the chain: a compressed cluster.
    qemu_io(&base, "qcow2", &["write -q -P 5 0 64k".into()]);
    let packed = dir.join("packed.qcow2");
    tool(
        "qemu-img",
        &["convert", "-c", "-O", "qcow2", s(&base), s(&packed)],
    );
    rebase(&clone, "../packed.qcow2", "qcow2");
    refused("compress");
    rebase(&clone, "../base.qcow2", "qcow2");
    // An internal snapshot: its clusters are shared.
    tool("qemu-img", &["snapshot", "-c", "s1", s(&clone)]);
    refused("1 internal snapshot(s)");
    tool("qemu-img", &["snapshot", "-d", "s1", s(&clone)]);
    // Open in another process: QEMU's lock on it is held.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", s(&clone)])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = holder.stdin.take().unwrap();
    std::io::Write::write_all(&mut stdin, b"help\n").unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(holder.stdout.as_mut().unwrap(), &mut first).unwrap();
    refused("is in use");
    drop(stdin);
    assert!(holder.wait().unwrap().success());
    // A backing name QEMU takes for a protocol, though a file has it.
    std::fs::copy(&base, dir.join("sub/my:base.qcow2")).unwrap();
    rebase(&clone, "my:base.qcow2", "qcow2");
    refused("as a protocol");
    rebase(&clone, "../base.qcow2", "qcow2");
    assert!(plan_split(&clone).is_ok());
    // An output through a dangling symbolic link.
    let dangling = dir.join("dangling.qcow2");
    std::os::unix::fs::symlink("nowhere/c.qcow2", &dangling).unwrap();
    let e = make_clone(&base, &dangling, None).unwrap_err();
    assert!(e.contains("exists"), "{e}");
    // A backup of the clone whose tape would overwrite its base.
    let before = std::fs::read(&base).unwrap();
    let e = boot::backup::plan_backup(&clone, &base, MEM).unwrap_err();
    assert!(e.contains("a backing file of the source"), "{e}");
    assert_eq!(std::fs::read(&base).unwrap(), before);
}

/// A split that never started gives the clone its length back, unless
/// something wrote into the room it was given (another process that
/// opened the clone between the host's check of QEMU's lock and QEMU's
/// start): then the room, holding that data, stays.
#[test]
fn a_split_that_never_started_gives_back_only_untouched_room() {
    let dir = fresh("undo");
    let base = dir.join("base.qcow2");
    qcow2(&base, "16M", "cluster_size=4k");
    let clone = dir.join("sub/clone.qcow2");
    make_clone(&base, &clone, None).unwrap();
    let info = tool("qemu-img", &["info", "--output=json", s(&clone)]);
    assert!(
        info.contains("\"cluster-size\": 65536"),
        "at least 64 KiB: {info}"
    );
    let before = std::fs::read(&clone).unwrap();
    let job = plan_split(&clone).unwrap();
    let grown = std::fs::metadata(&clone).unwrap().len();
    assert!(grown > before.len() as u64);
    assert_eq!(undo_plan(&job), Ok(true));
    assert_eq!(std::fs::read(&clone).unwrap(), before, "as it was");
    let job = plan_split(&clone).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&clone)
        .unwrap();
    std::os::unix::fs::FileExt::write_at(&f, b"theirs", before.len() as u64 + (1 << 20)).unwrap();
    assert_eq!(undo_plan(&job), Ok(false));
    assert_eq!(
        std::fs::metadata(&clone).unwrap().len(),
        grown,
        "the room stays"
    );
}

/// An empty clone (0 bytes, over an empty raw base) splits with the
/// workload on: the workload has nothing to read or write, and says so by
/// making no request rather than failing.
#[test]
fn an_empty_clone_splits_with_the_workload_on() {
    let dir = fresh("empty");
    let base = dir.join("base.raw");
    std::fs::write(&base, b"").unwrap();
    let clone = dir.join("sub/clone.qcow2");
    overlay(&clone, "../base.raw", "raw");
    let job = plan_split(&clone).unwrap();
    let (outcome, done) = split(&job, true, None);
    assert_eq!(outcome.verdict, Verdict::Passed, "{}", outcome.tail(20));
    assert_eq!(done, Some((0, 0)));
    let check = tool("qemu-img", &["check", s(&clone)]);
    assert!(check.contains("No errors were found"), "{check}");
    let info = tool("qemu-img", &["info", "--output=json", s(&clone)]);
    assert!(!info.contains("backing-filename"), "still backed: {info}");
}

/// `clone` names its base as QEMU will find it: through a symbolic link
/// (whose target's relative backing names QEMU resolves beside the link),
/// a name QEMU would take for a protocol (`my:base`), and a raw base whose
/// first bytes look like a qcow2 header when `--format raw` says so. Each
/// clone reads, under `qemu-img compare`, what its base reads.
#[test]
fn a_clone_reads_what_its_base_reads_as_named() {
    let dir = fresh("named");
    for d in ["d1", "d2", "out"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    // d1/link.qcow2 -> ../d2/mid.qcow2, whose backing name "base.qcow2"
    // QEMU finds in d1, beside the link.
    for (d, pattern) in [("d1", 1), ("d2", 2)] {
        let base = dir.join(d).join("base.qcow2");
        qcow2(&base, "4M", "cluster_size=64k");
        qemu_io(&base, "qcow2", &[format!("write -q -P {pattern} 0 4M")]);
    }
    overlay(&dir.join("d2/mid.qcow2"), "base.qcow2", "qcow2");
    std::os::unix::fs::symlink("../d2/mid.qcow2", dir.join("d1/link.qcow2")).unwrap();
    let link = dir.join("d1/link.qcow2");
    let expected = flattened(&dir, &link);
    let clone = dir.join("out/c.qcow2");
    make_clone(&link, &clone, None).unwrap();
    assert_equal_to_raw(&clone, &expected);
    // A colon before the first slash.
    let colon = dir.join("my:base.qcow2");
    qcow2(&colon, "4M", "cluster_size=64k");
    qemu_io(&colon, "qcow2", &["write -q -P 3 0 1M".into()]);
    let clone = dir.join("colon-clone.qcow2");
    let job = make_clone(&colon, &clone, None).unwrap();
    assert_eq!(job.backing_name, "./my:base.qcow2");
    tool(
        "qemu-img",
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            s(&colon),
            s(&clone),
        ],
    );
    // A raw disk holding a qcow2 header that names a host file.
    let secret = dir.join("secret.txt");
    std::fs::write(&secret, b"a host file\n").unwrap();
    let guest = dir.join("guest.img");
    overlay(&guest, s(&secret), "raw");
    let raw = std::fs::OpenOptions::new()
        .write(true)
        .open(&guest)
        .unwrap();
    raw.set_len(1 << 20).unwrap();
    let clone = dir.join("out/guest.qcow2");
    make_clone(&guest, &clone, Some(snapshot::qcow2::chain::Format::Raw)).unwrap();
    tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", s(&guest), s(&clone)],
    );
}

/// A clone grown past its base (`qemu-img resize` of an overlay, or a base
/// made smaller) reads as zeros past the base's end, as QEMU reads it:
/// both a qcow2 and a raw base, backed up and split, equal `qemu-img
/// convert` of the chain.
#[test]
fn a_clone_larger_than_its_base_reads_zeros_past_the_base() {
    let dir = fresh("larger");
    let base = dir.join("base.qcow2");
    qcow2(&base, "10M", "cluster_size=64k");
    qemu_io(&base, "qcow2", &["write -q -P 0x11 0 10M".into()]);
    let raw = dir.join("base.raw");
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "1000k"]);
    qemu_io(&raw, "raw", &["write -q -P 0x33 0 1000k".into()]);
    for (name, format) in [("base.qcow2", "qcow2"), ("base.raw", "raw")] {
        let clone = dir.join("sub/clone.qcow2");
        let _ = std::fs::remove_file(&clone);
        overlay(&clone, &format!("../{name}"), format);
        tool("qemu-img", &["resize", "-q", s(&clone), "30M"]);
        qemu_io(&clone, "qcow2", &["write -q -P 0x22 20M 1M".into()]);
        let expected = flattened(&dir, &clone);
        backs_up_as(&dir, &clone, &expected);
        let job = plan_split(&clone).unwrap();
        let (outcome, done) = split(&job, false, None);
        assert_eq!(
            outcome.verdict,
            Verdict::Passed,
            "{name}: {}",
            outcome.tail(30)
        );
        assert!(done.is_some());
        assert_standalone_and_equal(&clone, &expected);
        std::fs::remove_file(&expected).unwrap();
    }
}

/// A clone is backed up as the guest sees it: `restore` gives the chain
/// flattened, which `qemu-img compare` finds equal to `qemu-img convert`
/// of the chain.
#[test]
fn a_clone_is_backed_up_through_its_chain() {
    let dir = fresh("backup");
    let base = dir.join("base.qcow2");
    qcow2(&base, "32M", "cluster_size=64k");
    qemu_io(&base, "qcow2", &scattered(20, 1 << 20, "100k", 4));
    let clone = dir.join("sub/clone.qcow2");
    overlay(&clone, "../base.qcow2", "qcow2");
    qemu_io(&clone, "qcow2", &scattered(10, 3 << 20, "5k", 8));
    qemu_io(&clone, "qcow2", &["write -q -z 0 64k".into()]);
    let expected = flattened(&dir, &clone);
    backs_up_as(&dir, &clone, &expected);
}

/// `backup` of `clone` to a tape in `dir`, then `restore` of it to raw:
/// `qemu-img compare` finds the result equal to the raw `expected`.
fn backs_up_as(dir: &Path, clone: &Path, expected: &Path) {
    let tape = dir.join("tape");
    let run = host_tool(&[
        "backup",
        "--quiet",
        "--source",
        s(clone),
        "--tape",
        s(&tape),
    ]);
    assert_eq!(run.code, Some(0), "{}: {}", clone.display(), run.stderr);
    let out = dir.join("out.raw");
    let run = host_tool(&["restore", "--quiet", "--tape", s(&tape), "--out", s(&out)]);
    assert_eq!(run.code, Some(0), "{}: {}", clone.display(), run.stderr);
    tool(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s(expected), s(&out)],
    );
}
