//! Host side of `bench-clone-split`: the images (a 4 GiB qcow2 base with
//! 1 GiB of scattered data, a fresh clone made by `qemu-img create -b`, a
//! copy of it for `qemu-img rebase`, a scratch disk for the sequential
//! baseline), the figures only the host can measure (the base's data
//! bytes, `qemu-img rebase -b ''` of fresh copies of that copy, timed in
//! the same run, the median of three) and the check of the result against
//! what the workload wrote.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use snapshot::qcow2::check::check;
use snapshot::qcow2::workload;

use crate::backup::FileDisk;
use crate::bench::{ratio, run_tool, Goal};
use crate::benchjson::BenchJson;
use crate::clone::{finish_split, plan_split, replay_workload, SplitJob};
use crate::qemu::Disk;

/// Virtual size of the base.
const VIRTUAL: u64 = 4 << 30;
/// Data in it, in pieces of [`PIECE`] at scattered places.
const DATA: u64 = 1 << 30;
const PIECE: u64 = 256 << 10;

fn qemu_img(dir: &Path, args: &[&str]) -> Result<(), String> {
    run_tool(Command::new("qemu-img").current_dir(dir).args(args))
}

/// Makes the images in `dir` and returns the disks and the split job.
pub fn prepare(dir: &Path) -> Result<(Vec<Disk>, SplitJob), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for name in [
        "base.qcow2",
        "clone.qcow2",
        "clone-rebase.qcow2",
        "clone-rebased.qcow2",
        "expected.raw",
        "base.raw",
    ] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    // The same pieces every run: a fixed sequence.
    let raw = dir.join("base.raw");
    let f = std::fs::File::create(&raw).map_err(|e| e.to_string())?;
    f.set_len(VIRTUAL).map_err(|e| e.to_string())?;
    let slots = VIRTUAL / PIECE;
    let mut chosen = std::collections::BTreeSet::new();
    let mut rng = snapshot::support::rng::Rng::new(0x0c10_4e00);
    while (chosen.len() as u64) < DATA / PIECE {
        chosen.insert(rng.below(slots));
    }
    let mut buf = vec![0u8; PIECE as usize];
    for &slot in &chosen {
        snapshot::devices::block::fill_pattern(slot, slot * PIECE / 512, &mut buf);
        f.write_all_at(&buf, slot * PIECE)
            .map_err(|e| e.to_string())?;
    }
    drop(f);
    eprintln!(
        "bench-clone-split: base with {} MiB of data in {} MiB",
        DATA >> 20,
        VIRTUAL >> 20
    );
    qemu_img(
        dir,
        &[
            "convert",
            "-q",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "base.raw",
            "base.qcow2",
        ],
    )?;
    let _ = std::fs::remove_file(&raw);
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "clone.qcow2",
        ],
    )?;
    std::fs::copy(dir.join("clone.qcow2"), dir.join("clone-rebase.qcow2"))
        .map_err(|e| e.to_string())?;
    // What the clone reads before the run: the chain, flattened.
    qemu_img(
        dir,
        &["convert", "-q", "-O", "raw", "clone.qcow2", "expected.raw"],
    )?;
    crate::bench::make_blank_image(&dir.join("scratch.img"), 512 << 20)
        .map_err(|e| e.to_string())?;
    let job = plan_split(&dir.join("clone.qcow2"))?;
    let mut disks = job.disks.clone();
    disks.push(Disk::new(dir.join("scratch.img"), "scratch"));
    Ok((disks, job))
}

/// Adds the host's figures to the kernel's JSON: the base's data bytes and
/// `qemu-img rebase -b ''` of the clone as it was before the split (the
/// median of [`crate::bench::settled_median`]'s runs), timed now.
pub fn host_figures(dir: &Path, json: &mut BenchJson) -> Result<(), String> {
    let base = FileDisk::open(&dir.join("base.qcow2"), false).map_err(|e| e.to_string())?;
    let report = check(&base).map_err(|e| e.to_string())?;
    json.push("backing_data_bytes", report.data_clusters << 16);
    // Each run rebases a fresh copy of the clone as the kernel found it.
    let [rebase_s] = crate::bench::settled_median(|| {
        std::fs::copy(
            dir.join("clone-rebase.qcow2"),
            dir.join("clone-rebased.qcow2"),
        )
        .map_err(|e| e.to_string())?;
        let _ = Command::new("sync").status();
        let t = Instant::now();
        qemu_img(dir, &["rebase", "-b", "", "clone-rebased.qcow2"])?;
        Ok([t.elapsed().as_secs_f64()])
    })?;
    json.push_seconds("qemu_img_rebase_s", rebase_s);
    let split_s = json.f64("split_s").unwrap_or(0.0);
    json.push_seconds("split_s_over_rebase_s", ratio(split_s, rebase_s));
    Ok(())
}

/// The goals of `bench-clone-split`.
pub fn goals(json: &BenchJson) -> Vec<Goal> {
    let f = |k| json.f64(k).unwrap_or(0.0);
    // Writes onto fresh space, flushed: what the split's writes are.
    let slower = f("seq_write_mib_s").min(f("seq_read_mib_s"));
    vec![
        Goal::at_least(
            "split MiB/s / slower sequential MiB/s (x)",
            ratio(f("split_mib_s"), slower),
            0.5,
        ),
        Goal::at_least(
            "workload ops/s during / before (x)",
            ratio(
                f("workload_ops_per_s_during"),
                f("workload_ops_per_s_before"),
            ),
            0.5,
        ),
        Goal::at_most(
            "split time / qemu-img rebase time (x)",
            f("split_s_over_rebase_s"),
            1.0,
        ),
        Goal::at_most(
            "copied bytes / backing data bytes (x)",
            ratio(f("copied_bytes"), f("backing_data_bytes")),
            1.0,
        ),
        Goal::info(
            "split MiB/s / sequential writes onto allocated space (x)",
            ratio(f("split_mib_s"), f("seq_write_allocated_mib_s")),
            0.0,
        ),
        Goal::info(
            "workload p99 during / before (x)",
            ratio(f("workload_p99_ns_during"), f("workload_p99_ns_before")),
            0.0,
        ),
    ]
}

/// Checks the split clone: no corruption (`qemu-img check`), no backing
/// file (`qemu-img info`), and the content the workload left
/// (`qemu-img compare` against the flattened chain with its writes
/// replayed); both rebased and split clones read the same where the
/// workload did not write.
pub fn check_result(dir: &Path, job: &SplitJob, ops: u64) -> Result<(), String> {
    finish_split(job, &[])?;
    let clone = dir.join("clone.qcow2");
    qemu_img(dir, &["check", "-q", "clone.qcow2"]).map_err(|e| format!("qemu-img check: {e}"))?;
    let info = Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&clone)
        .output()
        .map_err(|e| e.to_string())?;
    if String::from_utf8_lossy(&info.stdout).contains("backing-filename") {
        return Err("qemu-img info still shows a backing file".into());
    }
    replay_workload(&dir.join("expected.raw"), workload::SEED, ops)?;
    qemu_img(
        dir,
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "qcow2",
            "expected.raw",
            "clone.qcow2",
        ],
    )
    .map_err(|e| format!("the split clone differs from what the workload wrote: {e}"))?;
    eprintln!("qemu-img check, info and compare: the split clone is sound, standalone, and holds what the workload wrote ({ops} requests)");
    for name in [
        "expected.raw",
        "scratch.img",
        "clone-rebase.qcow2",
        "clone-rebased.qcow2",
    ] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    Ok(())
}
