//! `cargo run --release -- [SCENARIO] [OPTIONS] [key=value ...]`
//!
//! Builds the kernel, boots it in QEMU with the scenario on its command line,
//! streams the serial console, summarises the trace, and exits with the
//! kernel's verdict: 0 passed, 1 the kernel reported failure (or the host
//! refused the input: a bad source image or medium), 2 bad usage or
//! missing setup, 3 timeout or an unexpected QEMU exit. When a job fails,
//! the last line says why: `restore refused: bad checksum: ...`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use boot::backup::{self as host_backup, BackupJob, RestoreJob};
use boot::benchjson::BenchJson;
use boot::cli::{self, Args};
use boot::clone::{self as host_clone, CloneJob, SplitJob};
use boot::qemu::{self, Config, Disk, Outcome, Verdict};
use boot::setup::{self, Need};
use boot::{bench, build, ktest, report, timeline, tracejson};
use snapshot::backup::Format;
use snapshot::interface::scenario::{JobFailure, Scenario};
use snapshot::interface::trace::Record;

fn main() -> ExitCode {
    let args = match cli::parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{}", cli::usage());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{}", cli::usage());
            return ExitCode::from(2);
        }
    };
    let Some(kernel) = kernel_image() else {
        return ExitCode::from(2);
    };
    if args.scenario == Scenario::SoakMemsnap {
        return boot::soak::main(&args, &kernel, |line| show_line(line, args.quiet));
    }
    let run = match prepare(&args) {
        Ok(run) => run,
        Err((code, e)) => {
            eprintln!("{e}");
            return ExitCode::from(code);
        }
    };
    if args.scenario.describe().benchmark {
        // Start from a quiet host: dirty page cache left by earlier runs
        // would be written back during this one and skew its timings.
        let _ = std::process::Command::new("sync").status();
    }
    let config = Config {
        kernel,
        mem_bytes: args.mem,
        cmdline: run.cmdline.join(" "),
        timeout: args.timeout,
        disks: run.disks.clone(),
        cpus: args.cpus,
    };
    eprintln!(
        "booting: {} MiB, {} CPU(s), cmdline {:?}",
        config.mem_bytes >> 20,
        config.cpus,
        config.cmdline
    );
    let outcome = match qemu::run(&config, |line| show_line(line, args.quiet)) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !outcome.stderr.trim().is_empty() {
        eprintln!("QEMU said: {}", outcome.stderr.trim());
    }
    let records = report::records(&outcome.serial).unwrap_or_else(|e| {
        eprintln!("error: bad trace output: {e}");
        Vec::new()
    });
    show_trace(&args, &config, &records);
    if let Some(path) = &args.trace_json {
        match std::fs::write(path, tracejson::document(&records)) {
            Ok(()) => eprintln!("trace: {} (Chrome trace-event JSON)", path.display()),
            Err(e) => eprintln!("error: cannot write {}: {e}", path.display()),
        }
    }
    show_bench(&args, &config, &outcome);
    eprintln!(
        "{} in {:.2} s",
        outcome.verdict.headline(),
        outcome.elapsed.as_secs_f64()
    );
    // Before `finish` removes a failed job's partial output, which may be
    // what filled the file system.
    let why = reason(&records, &outcome.serial);
    let full = why
        .as_deref()
        .and_then(|why| boot::space::full_disk_hint(why, &config.disks));
    let verdict = finish(&args, &run, &config, &records, outcome.verdict);
    if verdict != Verdict::Passed {
        // The kernel's own reason, last, where a user looks first.
        for line in why.iter().chain(&full) {
            eprintln!("{line}");
        }
    }
    match verdict {
        Verdict::Passed => ExitCode::SUCCESS,
        Verdict::Failed => ExitCode::from(1),
        Verdict::UnexpectedExit(_) | Verdict::TimedOut(_) => ExitCode::from(3),
    }
}

/// Checks the setup and builds the kernel; `None` (explained) if either
/// fails.
fn kernel_image() -> Option<PathBuf> {
    if let Err(e) = setup::ensure(&[Need::Qemu, Need::KernelTarget]) {
        eprintln!("error: {e}");
        return None;
    }
    eprintln!("building the kernel ...");
    build::kernel().map_err(|e| eprintln!("error: {e}")).ok()
}

/// Echoes a serial line (unless quiet; `test list`'s lines are its result,
/// so they are shown even then) and shows backup progress.
fn show_line(line: &str, quiet: bool) {
    if !quiet || line.starts_with("KTEST-LIST ") {
        println!("{line}");
    }
    if let Ok(Some(record)) = snapshot::interface::trace::parse_line(line) {
        let progress =
            host_backup::progress_line(&record).or_else(|| boot::mirror::progress_line(&record));
        if let Some(progress) = progress {
            // One line per stage, rewritten in place on a terminal; into a
            // file or pipe only each stage's last line (rewriting there
            // runs the stages' updates together).
            let last = record.u64("done") == record.u64("total");
            if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                eprint!("\r{progress}{}", if last { "\n" } else { "" });
            } else if last {
                static SHOWN: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());
                let mut shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner());
                if *shown != progress {
                    eprintln!("{progress}");
                    *shown = progress;
                }
            }
        }
    }
}

/// Why the kernel did not pass, in its words: the last job failure
/// record, else the failing kernel test.
fn reason(records: &[Record<'_>], serial: &str) -> Option<String> {
    let job = records.iter().rev().find_map(JobFailure::from_record);
    let test = || {
        ktest::lines(serial)
            .filter(|l| matches!(l, ktest::Line::Fail { .. }))
            .last()
    };
    job.map(|f| f.to_string())
        .or_else(|| test().map(|l| l.to_string()))
}

/// What the run needs besides the arguments: its disks, the kernel
/// command line, and the jobs to finish afterwards.
#[derive(Debug)]
struct Run {
    disks: Vec<Disk>,
    cmdline: Vec<String>,
    /// A fresh disk for a snapshot to disk, removed afterwards.
    snapshot_image: Option<PathBuf>,
    backup: Option<BackupJob>,
    restore: Option<RestoreJob>,
    clone: Option<CloneJob>,
    split: Option<SplitJob>,
    mirror: Option<boot::mirror::MirrorJob>,
    /// Where the host keeps its work files.
    work: PathBuf,
}

/// Makes the images and jobs the scenario needs. Errors carry the exit
/// code and the message.
fn prepare(args: &Args) -> Result<Run, (u8, String)> {
    let work = boot::workspace_root().join("target");
    let mut run = Run {
        disks: args.disks.clone(),
        cmdline: args.cmdline.clone(),
        snapshot_image: None,
        backup: None,
        restore: None,
        clone: None,
        split: None,
        mirror: None,
        work: work.clone(),
    };
    let blank = |image: &Path, size: u64| {
        bench::make_blank_image(image, size)
            .map_err(|e| (2, format!("error: {}: {e}", image.display())))
    };
    let refused = |e| (1, format!("{} refused: {e}", args.scenario.name()));
    if let (Scenario::Memsnap, Some(out)) = (args.scenario, &args.out) {
        // Refused now rather than after the whole snapshot ran.
        boot::staged::Staged::new(out).map_err(refused)?;
    }
    // A snapshot to disk gets a fresh image with room for all of RAM.
    if args.scenario == Scenario::Memsnap || args.to_disk {
        remove_orphan_disks(&work, args.scenario.name());
        // One per run: two runs at once must not share (and truncate) it.
        let image = work.join(format!(
            "{}-disk-{}.img",
            args.scenario.name(),
            std::process::id()
        ));
        let size = args.mem + (16 << 20);
        blank(&image, size)?;
        eprintln!("snapshot disk: {} ({} MiB)", image.display(), size >> 20);
        run.disks.push(Disk::new(&image, "snap"));
        let word = if args.to_disk {
            "to_disk=snap"
        } else {
            "disk=snap"
        };
        run.cmdline.push(word.into());
        run.snapshot_image = Some(image);
    }
    match (args.scenario, &args.source, &args.tape, &args.out) {
        (Scenario::BenchBlk, ..) => {
            let image = args
                .image
                .clone()
                .unwrap_or_else(|| work.join("bench-blk.img"));
            blank(&image, args.image_size)?;
            eprintln!("image: {} ({} MiB)", image.display(), args.image_size >> 20);
            run.disks.push(Disk::new(image, "bench"));
        }
        (Scenario::Backup, Some(source), Some(tape), _) => {
            let job = host_backup::plan_backup(source, tape, args.mem).map_err(refused)?;
            eprintln!(
                "backup: {} of data in a {} virtual disk; the tape will hold {} bytes",
                boot::report::human_bytes(job.data_bytes),
                boot::report::human_bytes(job.virtual_bytes),
                job.medium_bytes
            );
            run.disks.extend(job.disks.iter().cloned());
            run.backup = Some(job);
        }
        (Scenario::Restore, _, Some(tape), Some(out)) => {
            let format = args.format.unwrap_or(Format::Raw);
            let job = host_backup::plan_restore(tape, out, format, args.mem).map_err(refused)?;
            run.cmdline.push(format!("format={}", format.name()));
            run.disks.extend(job.disks.iter().cloned());
            run.restore = Some(job);
        }
        (Scenario::Mirror, ..) => {
            let (p, s, t) = (&args.primary, &args.secondary, &args.tape);
            let (Some(p), Some(s), Some(t)) = (p, s, t) else {
                return Err((2, "mirror needs --primary, --secondary and --tape".into()));
            };
            let job = boot::mirror::plan(p, s, t, args.mem).map_err(refused)?;
            eprintln!(
                "mirror: controller disk {}; the tape will hold {} bytes",
                job.control.display(),
                job.medium_bytes
            );
            run.disks.extend(job.disks.iter().cloned());
            run.mirror = Some(job);
        }
        (Scenario::BenchMirror, ..) => {
            let disks = boot::mirror::prepare_bench(&work.join("bench-mirror"), args.volume)
                .map_err(|e| (1, format!("error: {e}")))?;
            run.disks.extend(disks);
        }
        (Scenario::BenchBackup, ..) => {
            let dir = work.join("bench-backup");
            let disks =
                bench::prepare_backup_bench(&dir).map_err(|e| (1, format!("error: {e}")))?;
            run.disks.extend(disks);
            if args.spread {
                let disk = bench::prepare_spread(&dir).map_err(|e| (1, format!("error: {e}")))?;
                run.disks.push(disk);
                run.cmdline.push("spread=spread".into());
            }
        }
        (Scenario::Clone, ..) => {
            let (Some(base), Some(out)) = (&args.base, &args.out) else {
                return Err((2, "clone needs --base and --out".into()));
            };
            let format = args.format.map(|f| match f {
                Format::Raw => snapshot::qcow2::chain::Format::Raw,
                Format::Qcow2 => snapshot::qcow2::chain::Format::Qcow2,
            });
            let job = host_clone::make_clone(base, out, format).map_err(refused)?;
            eprintln!(
                "clone: {} over {} (backing name \"{}\")",
                job.out.display(),
                base.display(),
                job.backing_name
            );
            run.disks.extend(job.disks.iter().cloned());
            run.clone = Some(job);
        }
        (Scenario::CloneSplit, ..) => {
            let Some(image) = &args.image else {
                return Err((2, "clone-split needs --image".into()));
            };
            let job = host_clone::plan_split(image).map_err(refused)?;
            eprintln!(
                "clone-split: {} over {} backing layer(s), attached read-only",
                image.display(),
                job.chain.len()
            );
            run.disks.extend(job.disks.iter().cloned());
            run.split = Some(job);
        }
        (Scenario::BenchCloneSplit, ..) => {
            let (disks, job) = boot::clonebench::prepare(&work.join("bench-clone-split"))
                .map_err(|e| (1, format!("error: {e}")))?;
            run.disks.extend(disks);
            run.split = Some(job);
        }
        _ => {}
    }
    for disk in &run.disks {
        if !disk.path.is_file() {
            let e = format!(
                "error: disk {}: no file {}",
                disk.serial,
                disk.path.display()
            );
            return Err((2, e));
        }
    }
    Ok(run)
}

/// The trace summary, the block layer's report and the timeline picture.
fn show_trace(args: &Args, config: &Config, records: &[Record<'_>]) {
    eprint!("{}", report::summary(records));
    if let Some(blk) = report::blk_report(records) {
        eprint!("{blk}");
    }
    let samples = timeline::samples(records);
    if samples.is_empty() {
        return;
    }
    let path = args
        .svg
        .clone()
        .unwrap_or_else(|| boot::workspace_root().join("target/memsnap-timeline.svg"));
    let title = format!(
        "Live snapshot, {} MiB guest: pages copied by cause",
        config.mem_bytes >> 20
    );
    match std::fs::write(&path, timeline::svg(&samples, &title)) {
        Ok(()) => eprintln!("timeline: {}", path.display()),
        Err(e) => eprintln!("error: cannot write {}: {e}", path.display()),
    }
}

/// A benchmark's result: its goals, judged, and the `--json` file.
fn show_bench(args: &Args, config: &Config, outcome: &Outcome) {
    let mut json = match BenchJson::from_serial(&outcome.serial) {
        Some(Ok(json)) => json,
        found => {
            if let Some(Err(e)) = found {
                eprintln!("error: {e}");
            }
            if let Some(path) = &args.json {
                let path = path.display();
                eprintln!("error: the kernel printed no benchmark result for {path}");
            }
            return;
        }
    };
    // What the figures ran on: the CPUs QEMU gave the guest.
    json.push("cpus", config.cpus as u64);
    if args.scenario == Scenario::BenchBlk {
        // The reference: the host reading the same file, now in its cache
        // as QEMU left it, in the same run.
        let image = &config.disks.last().expect("bench disk").path;
        match bench::host_read_mib_s(image) {
            Ok(mib_s) => {
                json.push("host_read_mib_s", mib_s);
                eprintln!("host reads the image at {mib_s} MiB/s");
            }
            Err(e) => eprintln!("error: reading {}: {e}", image.display()),
        }
    }
    if args.scenario == Scenario::BenchBackup {
        let source = config.disks.iter().find(|d| d.serial == "src");
        let dir = source.and_then(|d| d.path.parent()).expect("bench source");
        match bench::qemu_img_convert_s(dir) {
            Ok((seconds, sync)) => {
                json.push_seconds("qemu_img_convert_s", seconds);
                json.push_seconds("qemu_img_convert_fsync_s", sync);
                eprintln!(
                    "qemu-img convert -O qcow2 of the source: {seconds:.2} s, then fsync {sync:.2} s"
                );
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if args.scenario == Scenario::BenchCloneSplit {
        let dir = boot::workspace_root().join("target/bench-clone-split");
        if let Err(e) = boot::clonebench::host_figures(&dir, &mut json) {
            eprintln!("error: {e}");
        }
    }
    let goals = match args.scenario {
        Scenario::BenchBlk => bench::blk_goals(&json),
        Scenario::BenchCloneSplit => boot::clonebench::goals(&json),
        Scenario::BenchMemsnap => bench::memsnap_goals(&json),
        Scenario::BenchBackup => bench::backup_goals(&json),
        Scenario::BenchMirror => bench::mirror_goals(&json),
        _ => Vec::new(),
    };
    if !goals.is_empty() {
        eprintln!("goals (each against a baseline from this run):");
    }
    for goal in goals {
        let mark = match (goal.applies, goal.met) {
            (false, _) => "n/a ",
            (true, true) => "met ",
            (true, false) => "MISS",
        };
        eprintln!(
            "  [{mark}] {:<42} {:>10.4}  (limit {})",
            goal.what, goal.measured, goal.limit
        );
    }
    if args.scenario == Scenario::BenchBackup {
        let f = |k| json.f64(k).unwrap_or(0.0);
        eprintln!(
            "  backup {:.0} MiB/s, restore {:.0} MiB/s of data; the tape's disk: {:.0} MiB/s sequential writes, {:.0} reads",
            f("backup_mib_s"),
            f("restore_mib_s"),
            f("seq_write_mib_s"),
            f("seq_read_mib_s")
        );
    }
    if let Some(path) = &args.json {
        match std::fs::write(path, format!("{json}\n")) {
            Ok(()) => eprintln!("results: {}", path.display()),
            Err(e) => eprintln!("error: cannot write {}: {e}", path.display()),
        }
    }
}

/// Finishes the jobs on the host (tape, restored image, benchmark check,
/// core file) and returns the verdict, failed if one of them failed.
fn finish(
    args: &Args,
    run: &Run,
    config: &Config,
    records: &[Record<'_>],
    mut verdict: Verdict,
) -> Verdict {
    let passed = verdict == Verdict::Passed;
    // A host job that fails after a run that passed fails it; after a
    // timeout or an unexpected QEMU exit the verdict (and exit status 3)
    // stays what QEMU's end made it.
    let mut fail = |e: String| {
        eprintln!("error: {e}");
        if verdict == Verdict::Passed {
            verdict = Verdict::Failed;
        }
    };
    if let Some(job) = &run.backup {
        match host_backup::finish_backup(job, records, passed) {
            Ok(n) => eprintln!("tape: {} ({n} bytes)", job.tape.display()),
            Err(e) => fail(e),
        }
    }
    if let Some(job) = &run.mirror {
        match boot::mirror::finish(job, records, passed) {
            Ok(n) => eprintln!("tape: {} ({n} bytes)", job.tape.display()),
            Err(e) => fail(e),
        }
    }
    if let Some(job) = &run.restore {
        match host_backup::finish_restore(job, records, passed) {
            Ok(()) => eprintln!(
                "restored: {} ({:?}, {} bytes)",
                job.out.display(),
                job.format,
                // The file as made (an empty image is cut back to 0 bytes).
                std::fs::metadata(&job.out).map_or(job.out_bytes, |m| m.len())
            ),
            Err(e) => fail(e),
        }
    }
    if args.scenario == Scenario::BenchBackup && passed {
        if let Err(e) = bench::check_backup_bench(&run.work.join("bench-backup")) {
            fail(e);
        }
    }
    finish_clone(args, run, records, passed, &mut fail);
    if let Some(image) = &run.snapshot_image {
        if let Some(out) = &args.out {
            let core_len = records
                .iter()
                .rfind(|r| r.event == "memsnap.core")
                .and_then(|r| r.u64("bytes"));
            let ok = verdict == Verdict::Passed;
            if !take_core(image, core_len, out, ok, &config.kernel) && ok {
                verdict = Verdict::Failed;
            }
        }
        let _ = std::fs::remove_file(image);
    }
    verdict
}

/// Removes the snapshot disks (`NAME-disk-PID.img` in `work`) of runs
/// whose host tool is gone (killed before it could remove its own): each
/// is as large as the guest's RAM.
fn remove_orphan_disks(work: &std::path::Path, name: &str) {
    let Ok(entries) = std::fs::read_dir(work) else {
        return;
    };
    let prefix = format!("{name}-disk-");
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|f| f.strip_suffix(".img"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// After `clone`, `clone-split` and `bench-clone-split`: a clone the
/// kernel refused is removed; a split clone is checked and cut to its end.
fn finish_clone(
    args: &Args,
    run: &Run,
    records: &[Record<'_>],
    passed: bool,
    fail: &mut dyn FnMut(String),
) {
    if let Some(job) = &run.clone {
        if passed {
            eprintln!("clone ready: {}", job.out.display());
        } else {
            let _ = std::fs::remove_file(&job.out);
        }
    }
    let Some(job) = &run.split else { return };
    if args.scenario == Scenario::BenchCloneSplit {
        if passed {
            let ops = records
                .iter()
                .rfind(|r| r.event == "clone.split")
                .and_then(|r| r.u64("workload_ops"))
                .unwrap_or(0);
            let dir = run.work.join("bench-clone-split");
            if let Err(e) = boot::clonebench::check_result(&dir, job, ops) {
                fail(e);
            }
        }
        return;
    }
    let refused = records.iter().any(|r| r.event == "job.refused")
        && !records.iter().any(|r| r.event == "clone.progress");
    if records.is_empty() || refused {
        // QEMU never ran the kernel (it may have found the image locked),
        // or the kernel refused the image before splitting: the room the
        // plan gave the file goes, unless someone wrote into it.
        let what = if refused {
            "was refused"
        } else {
            "did not start"
        };
        match host_clone::undo_plan(job) {
            Ok(true) => {
                eprintln!("the split {what}; {} is as it was", job.image.display());
                return;
            }
            Ok(false) if !refused => {
                eprintln!(
                    "the split did not start; another process wrote {} meanwhile, so the \
                     room given to it for the split stays (it holds that process's data)",
                    job.image.display()
                );
                return;
            }
            Ok(false) => {}
            Err(e) => return fail(e),
        }
    }
    match host_clone::finish_split(job, records) {
        Ok(Some(ops)) if passed => eprintln!(
            "split: {} stands alone now ({ops} workload requests during the split)",
            job.image.display()
        ),
        Ok(_) if passed => fail("the kernel reported no clone.split record".into()),
        Ok(_) => eprintln!(
            "the split did not finish; {} is sound: what it filled stays filled, and \
             clone-split run again goes on from there once the error above is dealt with",
            job.image.display()
        ),
        Err(e) => fail(e),
    }
}

/// After `memsnap`: copies the core file off the snapshot disk image to
/// `out` and describes it. Returns whether `out` holds a complete core.
fn take_core(
    image: &std::path::Path,
    len: Option<u64>,
    out: &std::path::Path,
    passed: bool,
    kernel: &std::path::Path,
) -> bool {
    let len = match (passed, len) {
        (true, Some(len)) => len,
        _ => {
            // Say what the disk holds: an interrupted snapshot is marked.
            let what = match boot::corefile::inspect(image) {
                Ok(_) => "a complete core the kernel did not vouch for".to_string(),
                Err(e) => e,
            };
            eprintln!("error: no core file: the snapshot did not complete ({what})");
            return false;
        }
    };
    let mut shown = 0;
    let result = boot::corefile::extract(image, len, out, |done, total| {
        let pct = done * 100 / total.max(1);
        if pct >= shown + 10 || done == total {
            shown = pct;
            eprint!(
                "\rcopying the core file: {pct:>3}% ({} of {} MiB)",
                done >> 20,
                total >> 20
            );
        }
    });
    eprintln!();
    match result {
        Ok(core) => {
            let loads = core.loads.len();
            let bytes: u64 = core
                .loads
                .iter()
                .filter(|l| l.0 >= 0xffff_8000_0000_0000)
                .map(|l| l.3)
                .sum();
            eprintln!(
                "core file: {} ({} MiB of memory in {loads} loads); try: gdb {} {}",
                out.display(),
                bytes >> 20,
                kernel.display(),
                out.display()
            );
            true
        }
        Err(e) => {
            eprintln!("error: {e}");
            false
        }
    }
}
