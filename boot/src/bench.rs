//! Benchmark results: the kernel prints one `BENCH-JSON {...}` line
//! ([`BenchJson`]); the host writes it to a file and judges the goals,
//! each against a baseline measured in the same run.

use crate::benchjson::BenchJson;

/// One goal: its description, the measured ratio, the bound, whether met.
#[derive(Debug, Clone, PartialEq)]
pub struct Goal {
    /// What is compared.
    pub what: &'static str,
    /// The measured figure.
    pub measured: f64,
    /// The limit.
    pub limit: f64,
    /// Whether `measured` is within `limit`.
    pub met: bool,
    /// Whether the goal applies to this run (some are set for 2 GiB only).
    pub applies: bool,
}

impl Goal {
    /// A goal met when `measured <= limit`.
    pub fn at_most(what: &'static str, measured: f64, limit: f64) -> Goal {
        Goal {
            what,
            measured,
            limit,
            met: measured <= limit,
            applies: true,
        }
    }

    /// A figure shown beside the goals for information, never judged.
    pub fn info(what: &'static str, measured: f64, limit: f64) -> Goal {
        Goal {
            applies: false,
            ..Goal::at_most(what, measured, limit)
        }
    }

    /// A goal met when `measured >= limit`.
    pub fn at_least(what: &'static str, measured: f64, limit: f64) -> Goal {
        Goal {
            met: measured >= limit,
            ..Goal::at_most(what, measured, limit)
        }
    }
}

/// `a / b`, infinite when `b` is zero.
pub(crate) fn ratio(a: f64, b: f64) -> f64 {
    if b == 0.0 {
        f64::INFINITY
    } else {
        a / b
    }
}

/// The goals of `bench-memsnap`, judged from its JSON.
pub fn memsnap_goals(json: &BenchJson) -> Vec<Goal> {
    let f = |k| json.f64(k).unwrap_or(0.0);
    let (at_most, at_least) = (Goal::at_most, Goal::at_least);
    // "Under 1/100 of stop-and-copy" is the goal at 2 GiB (of which the
    // firmware keeps a little); smaller guests have too little to copy.
    let big = f("mem_bytes") >= (2u64 << 30) as f64 * 0.95;
    let mut goals = vec![
        at_most(
            "pause / pause of a 128 MiB range (x)",
            ratio(f("pause_ns"), f("small_range_pause_ns")),
            2.0,
        ),
        Goal {
            applies: big,
            ..at_most(
                "pause / stop-and-copy pause (at 2 GiB)",
                ratio(f("pause_ns"), f("stop_copy_pause_ns")),
                0.01,
            )
        },
        at_least(
            "background copy / plain copy",
            ratio(f("copy_bytes_per_s"), f("memcpy_bytes_per_s")),
            0.8,
        ),
        // Both on the CPUs the copier leaves the workload.
        at_least(
            "workload during / before",
            ratio(
                f("workload_ops_per_s_during"),
                f("workload_ops_per_s_before"),
            ),
            0.7,
        ),
        Goal::info(
            "(info) workload during / before beside a copying CPU",
            ratio(
                f("workload_ops_per_s_during"),
                f("workload_ops_per_s_beside_copier"),
            ),
            0.7,
        ),
        // The copy's p99 as a fault meets it (docs/results/memsnap.md):
        // paced like faults on the workload's CPU, the copier's CPU busy
        // copying (under the emulator each timer tick stalls every busy
        // vCPU; an idle neighbour hides that), and cold like a fault's
        // copy: a random frame of the range into a random slot, neither in
        // the host's caches nor in the emulator's TLB. The same copy over
        // 64 warm pages is shown beside it.
        at_most(
            "fault p99 / one 4 KiB copy's own p99, cold as a fault's (x)",
            ratio(f("fault_ns_p99"), f("page_copy_busy_cold_ns_p99")),
            2.0,
        ),
        Goal::info(
            "(info) fault p99 / a warm copy's p99, same conditions (x)",
            ratio(f("fault_ns_p99"), f("page_copy_busy_ns_p99")),
            2.0,
        ),
        at_most("mismatched pages", f("mismatched_pages"), 0.0),
        Goal::info(
            "(info) fault p99 / one cold 4 KiB copy's p50 (x)",
            ratio(f("fault_ns_p99"), f("page_copy_cold_ns")),
            2.0,
        ),
        Goal::info(
            "(info) fault p99 / one 4 KiB copy's p50 (x)",
            ratio(f("fault_ns_p99"), f("page_copy_ns")),
            2.0,
        ),
        // Storage in RAM takes a frame per range frame: about half.
        Goal {
            applies: false,
            ..at_least(
                "(info) range / RAM, snapshot in RAM",
                ratio(f("pages"), f("ram_pages")),
                0.45,
            )
        },
    ];
    goals.extend(memsnap_disk_goals(json));
    goals
}

/// With `--to-disk`, `bench-memsnap`'s goals for the snapshot to disk:
/// against the same disk's sequential writes and against the in-RAM
/// snapshot of the same run. None without it.
fn memsnap_disk_goals(json: &BenchJson) -> Vec<Goal> {
    let f = |k| json.f64(k).unwrap_or(0.0);
    let (at_most, at_least) = (Goal::at_most, Goal::at_least);
    if json.f64("disk_write_mib_s").is_none() {
        return Vec::new();
    }
    vec![
        at_least(
            "to disk: disk writes / sequential writes",
            ratio(f("disk_write_mib_s"), f("seq_write_mib_s")),
            0.8,
        ),
        at_most(
            "to disk: fault p99 / in-RAM fault p99 (x)",
            ratio(f("disk_fault_ns_p99"), f("fault_ns_p99")),
            2.0,
        ),
        at_most("to disk: mismatched pages", f("disk_mismatched_pages"), 0.0),
        at_least(
            "to disk: range / RAM",
            ratio(f("disk_pages"), f("ram_pages")),
            0.92,
        ),
        Goal::info(
            "(info) to disk: fault p99 / copy p99 under I/O",
            ratio(f("disk_fault_ns_p99"), f("page_copy_ns_p99_under_io")),
            2.0,
        ),
    ]
}

/// Creates (or truncates) a sparse raw image of `bytes` at `path`.
pub fn make_blank_image(path: &std::path::Path, bytes: u64) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = std::fs::File::create(path)?;
    file.set_len(bytes)
}

/// The host's sequential read throughput of `path` in MiB/s (1 MiB reads).
pub fn host_read_mib_s(path: &std::path::Path) -> std::io::Result<u64> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let start = std::time::Instant::now();
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    let secs = start.elapsed().as_secs_f64().max(1e-9);
    Ok(((total as f64 / (1 << 20) as f64) / secs) as u64)
}

/// The goals of `bench-blk`, judged from its JSON.
pub fn blk_goals(json: &BenchJson) -> Vec<Goal> {
    let f = |k| json.f64(k).unwrap_or(0.0);
    let qd1 = f("rand_read_iops_qd1");
    vec![Goal::at_least(
        "random 4 KiB IOPS, depth 32 / depth 1 (x)",
        if qd1 == 0.0 {
            0.0
        } else {
            f("rand_read_iops_qd32") / qd1
        },
        4.0,
    )]
}

/// The goals of `bench-backup`, judged from its JSON.
pub fn backup_goals(json: &BenchJson) -> Vec<Goal> {
    let f = |k| json.f64(k).unwrap_or(0.0);
    let at_most = Goal::at_most;
    let mut goals = vec![
        at_most(
            "medium bytes / data bytes (x)",
            ratio(f("medium_bytes"), f("data_bytes")),
            1.01,
        ),
        at_most(
            "backup time / all-data backup time (x)",
            ratio(f("backup_s"), f("all_data_backup_s")),
            0.125,
        ),
        at_most(
            "backup time / qemu-img convert -O qcow2 (x)",
            ratio(f("backup_s"), f("qemu_img_convert_s")),
            1.0,
        ),
    ];
    if json.f64("spread_data_bytes").is_some() {
        goals.push(at_most(
            "1 TiB spread: medium bytes / data bytes (x)",
            ratio(f("spread_medium_bytes"), f("spread_data_bytes")),
            1.01,
        ));
    }
    goals
}

/// The goals of `bench-mirror`, judged from its JSON.
pub fn mirror_goals(json: &BenchJson) -> Vec<Goal> {
    let f = |k| json.f64(k).unwrap_or(0.0);
    let slower = f("seq_read_mib_s").min(f("seq_write_mib_s"));
    let quick = f("backup_s_via_secondary").max(f("backup_s_via_memory"));
    vec![
        Goal::at_most("split acknowledgement (ms)", f("split_ack_ns") / 1e6, 1.0),
        Goal::at_most(
            "split ack, big volume / small volume (x)",
            ratio(f("split_ack_big_ns"), f("split_ack_ns")),
            2.0,
        ),
        Goal::at_least(
            "copy / slower of seq read, write",
            ratio(f("copy_mib_s"), slower),
            0.8,
        ),
        Goal::at_least(
            "workload during / before",
            ratio(
                f("workload_ops_per_s_during"),
                f("workload_ops_per_s_before"),
            ),
            0.5,
        ),
        Goal::at_most(
            "slower quick backup / copy then backup (x)",
            ratio(quick, f("copy_then_backup_s")),
            0.75,
        ),
        Goal::at_most(
            "|resync - written since split| (blocks)",
            (f("resync_bytes") - f("written_since_split_bytes")).abs() / f("block_bytes").max(1.0),
            0.0,
        ),
        Goal::at_most("mismatched blocks", f("mismatched_blocks"), 0.0),
    ]
}

/// The `bench-backup` images: 4 GiB virtual, 256 MiB of data.
const BENCH_VIRTUAL: u64 = 4 << 30;
/// Data clusters (64 KiB each) written at scattered places.
const BENCH_CLUSTERS: u64 = 4096;

pub(crate) fn run_tool(cmd: &mut std::process::Command) -> Result<(), String> {
    // A tool the set-up installs is installed first, as the kernel's
    // runner does for QEMU: `cargo test` on a machine without QEMU runs
    // these before any boot.
    let program = cmd.get_program().to_string_lossy().into_owned();
    if let Some(need) = crate::setup::Need::of_tool(&program) {
        crate::setup::ensure(&[need]).map_err(|e| e.to_string())?;
    }
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes the `bench-backup` images in `dir`: `src.qcow2` with
/// [`BENCH_CLUSTERS`] clusters of data at pseudo-random places (each a
/// different pattern), `full.qcow2` with every cluster allocated
/// (`preallocation=falloc`), and blank tape and output images.
pub fn prepare_backup_bench(dir: &std::path::Path) -> Result<Vec<crate::qemu::Disk>, String> {
    use crate::qemu::Disk;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = |name: &str| dir.join(name);
    let virtual_size = BENCH_VIRTUAL.to_string();
    for name in ["src.qcow2", "full.qcow2"] {
        let _ = std::fs::remove_file(path(name));
    }
    run_tool(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(path("src.qcow2"))
            .arg(&virtual_size),
    )?;
    // Distinct clusters from a fixed sequence, so every run backs up the
    // same image.
    let total = BENCH_VIRTUAL >> 16;
    let mut chosen = std::collections::BTreeSet::new();
    let mut rng = snapshot::support::rng::Rng::new(0x6261_636b);
    while (chosen.len() as u64) < BENCH_CLUSTERS {
        chosen.insert(rng.next_u64() % total);
    }
    let chosen: Vec<u64> = chosen.into_iter().collect();
    for (i, batch) in chosen.chunks(512).enumerate() {
        eprint!(
            "\rbench-backup: writing scattered data: {:>3}%",
            i * 512 * 100 / chosen.len()
        );
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for (j, c) in batch.iter().enumerate() {
            cmd.arg("-c").arg(format!(
                "write -q -P {} {} 64k",
                (i * 512 + j) % 255 + 1,
                c << 16
            ));
        }
        run_tool(cmd.arg(path("src.qcow2")))?;
    }
    eprintln!("\rbench-backup: writing scattered data: 100%");
    run_tool(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "preallocation=falloc"])
            .arg(path("full.qcow2"))
            .arg(&virtual_size),
    )?;
    let room = BENCH_VIRTUAL + (64 << 20);
    make_blank_image(&path("tape.img"), room).map_err(|e| format!("tape.img: {e}"))?;
    make_blank_image(&path("out.img"), BENCH_VIRTUAL).map_err(|e| format!("out.img: {e}"))?;
    Ok(vec![
        Disk {
            read_only: true,
            ..Disk::new(path("src.qcow2"), "src")
        },
        Disk {
            read_only: true,
            ..Disk::new(path("full.qcow2"), "full")
        },
        Disk {
            direct: true,
            ..Disk::new(path("tape.img"), "tape")
        },
        Disk::new(path("out.img"), "out"),
    ])
}

/// `bench-backup --spread`: makes `spread.qcow2` in `dir`, 1 TiB with
/// default 64 KiB clusters and a 4 KiB write every 512 MiB (2,048 data
/// clusters, 128 MiB, each under an L2 table of its own: 128 MiB of
/// tables), the image whose whole tables once filled the medium and the
/// kernel's heap; attached read-only as disk `spread`.
pub fn prepare_spread(dir: &std::path::Path) -> Result<crate::qemu::Disk, String> {
    let image = dir.join("spread.qcow2");
    let _ = std::fs::remove_file(&image);
    run_tool(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("1T"),
    )?;
    for batch in 0..4u64 {
        eprint!(
            "\rbench-backup: writing the spread image: {:>3}%",
            batch * 25
        );
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.args(["-f", "qcow2"]);
        for i in batch * 512..(batch + 1) * 512 {
            cmd.arg("-c")
                .arg(format!("write -q -P {} {} 4k", i % 250 + 1, i << 29));
        }
        run_tool(cmd.arg(&image))?;
    }
    eprintln!("\rbench-backup: writing the spread image: 100%");
    Ok(crate::qemu::Disk {
        read_only: true,
        ..crate::qemu::Disk::new(image, "spread")
    })
}

/// Runs a host reference `RUNS` times, each after `sync`, and returns the
/// figures of the run whose first figure is the median (the figures of
/// one run belong together: a convert and the `fsync` of its output). The
/// sync keeps a run from paying for the write-back of what an earlier step
/// left dirty in the page cache (the kernel's restore, an earlier run),
/// which the kernel's own runs, started after a sync too, never pay; the
/// median keeps one unlucky run from standing for the reference (one
/// convert of the bench's source took 0.32 s and the next 0.58 s).
pub fn settled_median<const N: usize>(
    mut once: impl FnMut() -> Result<[f64; N], String>,
) -> Result<[f64; N], String> {
    /// Runs of each host reference.
    const RUNS: usize = 3;
    let mut runs = Vec::with_capacity(RUNS);
    for _ in 0..RUNS {
        let _ = std::process::Command::new("sync").status();
        runs.push(once()?);
    }
    runs.sort_by(|a, b| a[0].total_cmp(&b[0]));
    Ok(runs[runs.len() / 2])
}

/// The host's reference for `bench-backup`: seconds `qemu-img convert -O
/// qcow2` takes to copy the scattered source (`src.qcow2` in `dir`), run
/// after the kernel's backup in the same sitting, and then seconds an
/// `fsync` of the copy takes, from the median run of
/// [`settled_median`]. `qemu-img convert` never syncs its output (it writes with
/// `cache=unsafe`), where the backup ends with a flush the host turns
/// into an `fdatasync` of the tape: the sum is the durable copy. The copy
/// is removed.
pub fn qemu_img_convert_s(dir: &std::path::Path) -> Result<(f64, f64), String> {
    let out = dir.join("converted.qcow2");
    let [seconds, sync] = settled_median(|| {
        let start = std::time::Instant::now();
        let result = run_tool(
            std::process::Command::new("qemu-img")
                .args(["convert", "-O", "qcow2"])
                .arg(dir.join("src.qcow2"))
                .arg(&out),
        );
        let seconds = start.elapsed().as_secs_f64();
        let synced = result.and_then(|()| {
            let start = std::time::Instant::now();
            std::fs::File::open(&out)
                .and_then(|f| f.sync_all())
                .map_err(|e| format!("{}: {e}", out.display()))?;
            Ok(start.elapsed().as_secs_f64())
        });
        let _ = std::fs::remove_file(&out);
        synced.map(|sync| [seconds, sync])
    })?;
    Ok((seconds, sync))
}

/// After `bench-backup`: `qemu-img compare` must find the raw restore
/// identical to the source; then the large images are removed.
pub fn check_backup_bench(dir: &std::path::Path) -> Result<(), String> {
    let result = run_tool(
        std::process::Command::new("qemu-img")
            .args(["compare", "-q", "-f", "qcow2", "-F", "raw"])
            .arg(dir.join("src.qcow2"))
            .arg(dir.join("out.img")),
    )
    .map_err(|e| format!("the restored image differs from the source: {e}"));
    if result.is_ok() {
        eprintln!("qemu-img compare: the raw restore is identical to the source");
    }
    for name in ["full.qcow2", "tape.img", "out.img", "spread.qcow2"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUN: &str = r#"{"pause_ns":2000,"small_range_pause_ns":1500,"stop_copy_pause_ns":300000,"copy_bytes_per_s":90,"memcpy_bytes_per_s":100,"workload_ops_per_s_before":10,"workload_ops_per_s_during":6,"fault_ns_p99":7000,"page_copy_ns":4000,"page_copy_ns_p99":3000,"page_copy_busy_ns_p99":3000,"page_copy_busy_cold_ns_p99":3000,"mismatched_pages":0}"#;

    #[test]
    fn judges_each_goal() {
        let goals = memsnap_goals(&BenchJson::parse(RUN).unwrap());
        let met: Vec<bool> = goals.iter().map(|g| g.met).collect();
        assert_eq!(
            met,
            [true, true, true, false, false, false, false, true, false, true, true],
            "0.6 of the workload is under 0.7; 7000 is over 2 x 3000"
        );
        assert!(
            !goals[4].applies && !goals[6].applies && !goals[8].applies && !goals[9].applies,
            "the copy-spread ratios are information only"
        );
        assert!(
            !goals[10].applies,
            "the RAM store's share is information only"
        );
    }

    #[test]
    fn disk_goals_join_when_the_run_went_to_disk() {
        let disk = RUN.replace(
            "}",
            r#","seq_write_mib_s":1000,"disk_write_mib_s":850,"disk_fault_ns_p99":15000,"disk_mismatched_pages":0,"ram_pages":1000,"disk_pages":925}"#,
        );
        let goals = memsnap_goals(&BenchJson::parse(&disk).unwrap());
        assert_eq!(goals.len(), 16);
        assert!(
            !goals[15].applies,
            "the under-I/O ratio is information only"
        );
        let met: Vec<bool> = goals[11..15].iter().map(|g| g.met).collect();
        assert_eq!(met, [true, false, true, true], "15000 > 2 x 7000");
        assert!((goals[11].measured - 0.85).abs() < 1e-9);
        assert!((goals[14].measured - 0.925).abs() < 1e-9);
        let short = disk.replace("\"disk_pages\":925", "\"disk_pages\":900");
        assert!(
            !memsnap_goals(&BenchJson::parse(&short).unwrap())[14].met,
            "90 % of RAM is too little"
        );
    }

    #[test]
    fn blk_goals_compare_the_two_depths() {
        let json = |text| BenchJson::parse(text).unwrap();
        let goals = blk_goals(&json(
            "{\"rand_read_iops_qd1\":1000,\"rand_read_iops_qd32\":4500}",
        ));
        assert!(goals[0].met && (goals[0].measured - 4.5).abs() < 1e-9);
        let goals = blk_goals(&json(
            "{\"rand_read_iops_qd1\":1000,\"rand_read_iops_qd32\":3000}",
        ));
        assert!(!goals[0].met);
    }
}
