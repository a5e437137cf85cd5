//! `cargo run --release -- [SCENARIO] [OPTIONS] [key=value ...]`
//!
//! Builds the kernel, boots it in QEMU with the scenario on its command line,
//! streams the serial console, summarises the trace, and exits with the
//! kernel's verdict: 0 passed, 1 the kernel reported failure (or the host
//! refused the input: a bad source image or medium), 2 bad usage or
//! missing setup, 3 timeout or an unexpected QEMU exit.

use std::process::ExitCode;
use std::time::Duration;

use std::path::PathBuf;

use boot::backup::{self as host_backup, BackupJob, RestoreJob};
use boot::qemu::{self, Config, Disk, Verdict};
use boot::{bench, build, report, timeline};
use snapshot::backup::Format;
use snapshot::interface::units::parse_size;

const USAGE: &str = "\
usage: cargo run --release -- [SCENARIO] [OPTIONS] [key=value ...]

scenarios:
  demo                 boot, memory map, two interleaved threads, traces (default)
  test NAME|list       run one in-kernel test, or list them
  crash KIND           raise a CPU exception on purpose (pf ud de gp bp overflow)
  memsnap --out FILE   live snapshot of all RAM to a disk, left as an ELF core
                       file at FILE (read it with gdb, readelf)
  bench-memsnap        live memory snapshot benchmark (use --mem, --json,
                       --to-disk)
  bench-blk            virtio-blk benchmark on a fresh raw image (use --json)
  backup --source IMG.qcow2 --tape FILE
                       compact backup of a qcow2 image: only its data, with
                       the tables to restore it, streamed to FILE
  restore --tape FILE --out IMG [--format raw|qcow2]
                       a backup back to a new disk image (default raw)
  bench-backup         backup of 256 MiB of scattered data in a 4 GiB disk,
                       against an all-data backup (use --json)

options:
  --mem SIZE           guest RAM, e.g. 128M, 2G (default 128M)
  --timeout SECS       kill QEMU after this long (default 600)
  --quiet              do not echo the serial console
  --json FILE          write a benchmark's JSON result there
  --svg FILE           write the snapshot timeline picture there
                       (default: target/memsnap-timeline.svg when there is one)
  --disk NAME=FILE     attach raw image FILE as a virtio-blk disk named NAME
  --ro-disk NAME=FILE  the same, read-only
  --image FILE         bench-blk's image (default target/bench-blk.img)
  --image-size SIZE    its size (default 1G)
  --out FILE           memsnap's core file; restore's output image
  --source FILE        backup's source image (never written)
  --tape FILE          backup's medium (created) or restore's (read)
  --format raw|qcow2   restore's output format (default raw)
  --to-disk            bench-memsnap: also snapshot to a disk, against a
                       sequential-write baseline on the same disk
  -h, --help           this text

Further key=value words are passed to the kernel command line.";

#[derive(Debug)]
struct Args {
    scenario: String,
    cmdline: Vec<String>,
    mem: u64,
    timeout: Duration,
    quiet: bool,
    json: Option<PathBuf>,
    svg: Option<PathBuf>,
    disks: Vec<Disk>,
    image: Option<PathBuf>,
    image_size: u64,
    out: Option<PathBuf>,
    to_disk: bool,
    source: Option<PathBuf>,
    tape: Option<PathBuf>,
    format: Option<Format>,
    mem_given: bool,
}

fn disk_arg(option: &str, text: &str, read_only: bool) -> Result<Disk, String> {
    match text.split_once('=') {
        Some((name, path)) if !name.is_empty() && name.len() <= 20 && !path.is_empty() => {
            Ok(Disk {
                read_only,
                ..Disk::new(path, name)
            })
        }
        _ => Err(format!(
            "{option} {text}: want NAME=FILE (NAME at most 20 characters)"
        )),
    }
}

fn parse_args(mut words: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        scenario: String::new(),
        cmdline: Vec::new(),
        mem: 128 << 20,
        timeout: Duration::from_secs(600),
        quiet: false,
        json: None,
        svg: None,
        disks: Vec::new(),
        image: None,
        image_size: 1 << 30,
        out: None,
        to_disk: false,
        source: None,
        tape: None,
        format: None,
        mem_given: false,
    };
    let mut positional = Vec::new();
    while let Some(word) = words.next() {
        let mut value = |name: &str| words.next().ok_or(format!("{name} needs a value"));
        match word.as_str() {
            "-h" | "--help" => return Err(String::new()),
            "--mem" => {
                let text = value("--mem")?;
                args.mem = parse_size(&text).map_err(|e| format!("--mem {text}: {e}"))?;
                if args.mem < 32 << 20 {
                    return Err(format!("--mem {text}: the kernel needs at least 32M"));
                }
                args.mem_given = true;
            }
            "--timeout" => {
                let text = value("--timeout")?;
                let secs: f64 = text
                    .parse()
                    .map_err(|_| format!("--timeout {text}: not a number of seconds"))?;
                args.timeout = Duration::from_secs_f64(secs);
            }
            "--quiet" => args.quiet = true,
            "--json" => args.json = Some(PathBuf::from(value("--json")?)),
            "--svg" => args.svg = Some(PathBuf::from(value("--svg")?)),
            "--disk" => args
                .disks
                .push(disk_arg("--disk", &value("--disk")?, false)?),
            "--ro-disk" => args
                .disks
                .push(disk_arg("--ro-disk", &value("--ro-disk")?, true)?),
            "--image" => args.image = Some(PathBuf::from(value("--image")?)),
            "--out" => args.out = Some(PathBuf::from(value("--out")?)),
            "--to-disk" => args.to_disk = true,
            "--source" => args.source = Some(PathBuf::from(value("--source")?)),
            "--tape" => args.tape = Some(PathBuf::from(value("--tape")?)),
            "--format" => {
                let text = value("--format")?;
                args.format = Some(
                    Format::parse(&text).ok_or(format!("--format {text}: want raw or qcow2"))?,
                );
            }
            "--image-size" => {
                let text = value("--image-size")?;
                args.image_size =
                    parse_size(&text).map_err(|e| format!("--image-size {text}: {e}"))?;
                if args.image_size < 64 << 20 {
                    return Err(format!("--image-size {text}: at least 64M"));
                }
            }
            w if w.starts_with('-') => return Err(format!("unknown option {w}")),
            w if w.contains('=') => args.cmdline.push(w.to_string()),
            w => positional.push(w.to_string()),
        }
    }
    let mut positional = positional.into_iter();
    let scenario = positional.next().unwrap_or_else(|| "demo".into());
    args.cmdline.insert(0, format!("scenario={scenario}"));
    match (scenario.as_str(), &args.out, args.to_disk) {
        ("memsnap", None, _) => return Err("memsnap needs --out FILE".into()),
        ("restore", None, _) => return Err("restore needs --out IMG".into()),
        (s, Some(_), _) if s != "memsnap" && s != "restore" => {
            return Err("--out is for memsnap and restore".into())
        }
        (s, _, true) if s != "bench-memsnap" => return Err("--to-disk is for bench-memsnap".into()),
        _ => {}
    }
    match (scenario.as_str(), &args.source, &args.tape) {
        ("backup", None, _) => return Err("backup needs --source IMG.qcow2".into()),
        ("backup" | "restore", _, None) => return Err(format!("{scenario} needs --tape FILE")),
        (s, Some(_), _) if s != "backup" => return Err("--source is for backup".into()),
        (s, _, Some(_)) if s != "backup" && s != "restore" => {
            return Err("--tape is for backup and restore".into())
        }
        _ => {}
    }
    if args.format.is_some() && scenario != "restore" {
        return Err("--format is for restore".into());
    }
    if !args.mem_given && matches!(scenario.as_str(), "backup" | "restore" | "bench-backup") {
        // Room for the tables of large images in the kernel heap.
        args.mem = 512 << 20;
    }
    args.scenario = scenario.clone();
    match (scenario.as_str(), positional.next()) {
        ("test", Some(name)) => args.cmdline.push(format!("test={name}")),
        ("crash", Some(kind)) => args.cmdline.push(format!("kind={kind}")),
        ("test", None) => return Err("test needs a test name, or list".into()),
        (_, Some(extra)) => return Err(format!("unexpected argument {extra}")),
        (_, None) => {}
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if let Err(e) = qemu::check_qemu().and_then(|()| build::check_toolchain()) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    eprintln!("building the kernel ...");
    let kernel = match build::kernel() {
        Ok(path) => path,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let bench_blk = args.scenario == "bench-blk";
    let mut disks = args.disks.clone();
    let mut cmdline = args.cmdline.clone();
    // A snapshot to disk gets a fresh image with room for all of RAM.
    let snapshot_image = (args.scenario == "memsnap" || args.to_disk)
        .then(|| boot::workspace_root().join(format!("target/{}-disk.img", args.scenario)));
    if let Some(image) = &snapshot_image {
        let size = args.mem + (16 << 20);
        if let Err(e) = bench::make_blank_image(image, size) {
            eprintln!("error: {}: {e}", image.display());
            return ExitCode::from(2);
        }
        eprintln!("snapshot disk: {} ({} MiB)", image.display(), size >> 20);
        disks.push(Disk::new(image, "snap"));
        cmdline.push(
            if args.to_disk {
                "to_disk=snap"
            } else {
                "disk=snap"
            }
            .into(),
        );
    }
    if bench_blk {
        let image = args
            .image
            .clone()
            .unwrap_or_else(|| boot::workspace_root().join("target/bench-blk.img"));
        if let Err(e) = bench::make_blank_image(&image, args.image_size) {
            eprintln!("error: {}: {e}", image.display());
            return ExitCode::from(2);
        }
        eprintln!("image: {} ({} MiB)", image.display(), args.image_size >> 20);
        disks.push(Disk::new(image, "bench"));
    }
    let mut backup_job: Option<BackupJob> = None;
    let mut restore_job: Option<RestoreJob> = None;
    let work = boot::workspace_root().join("target");
    let prepared = match (args.scenario.as_str(), &args.source, &args.tape, &args.out) {
        ("backup", Some(source), Some(tape), _) => {
            host_backup::plan_backup(source, tape, &work, args.mem).map(|job| {
                eprintln!(
                    "backup: {} MiB of data in a {} MiB virtual disk; the tape will hold {} bytes",
                    job.data_bytes >> 20,
                    job.virtual_bytes >> 20,
                    job.medium_bytes
                );
                disks.extend(job.disks.iter().cloned());
                backup_job = Some(job);
            })
        }
        ("restore", _, Some(tape), Some(out)) => {
            let format = args.format.unwrap_or(Format::Raw);
            host_backup::plan_restore(tape, out, format, args.mem).map(|job| {
                cmdline.push(format!(
                    "format={}",
                    if format == Format::Raw {
                        "raw"
                    } else {
                        "qcow2"
                    }
                ));
                disks.extend(job.disks.iter().cloned());
                restore_job = Some(job);
            })
        }
        ("bench-backup", ..) => bench::prepare_backup_bench(&work.join("bench-backup"))
            .map(|bench_disks| disks.extend(bench_disks)),
        _ => Ok(()),
    };
    if let Err(e) = prepared {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    for disk in &disks {
        if !disk.path.is_file() {
            eprintln!(
                "error: disk {}: no file {}",
                disk.serial,
                disk.path.display()
            );
            return ExitCode::from(2);
        }
    }
    if args.scenario.starts_with("bench-") {
        // Start from a quiet host: dirty page cache left by earlier runs
        // would be written back during this one and skew its timings.
        let _ = std::process::Command::new("sync").status();
    }
    let config = Config {
        kernel,
        mem_bytes: args.mem,
        cmdline: cmdline.join(" "),
        timeout: args.timeout,
        disks,
    };
    eprintln!(
        "booting: {} MiB, cmdline {:?}",
        config.mem_bytes >> 20,
        config.cmdline
    );
    let quiet = args.quiet;
    let outcome = match qemu::run(&config, |line| {
        if !quiet {
            println!("{line}");
        }
        if let Ok(Some(record)) = snapshot::interface::trace::parse_line(line) {
            if let Some(progress) = host_backup::progress_line(&record) {
                // One line per stage, rewritten in place.
                let end = if record.u64("done") == record.u64("total") {
                    "\n"
                } else {
                    ""
                };
                eprint!("\r{progress}{end}");
            }
        }
    }) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if !outcome.stderr.trim().is_empty() {
        eprintln!("QEMU said: {}", outcome.stderr.trim());
    }
    let mut core_len = None;
    match report::records(&outcome.serial) {
        Ok(records) => {
            core_len = records
                .iter()
                .rfind(|r| r.event == "memsnap.core")
                .and_then(|r| r.u64("bytes"));
            eprint!("{}", report::summary(&records));
            if let Some(blk) = report::blk_report(&records) {
                eprint!("{blk}");
            }
            let samples = timeline::samples(&records);
            if !samples.is_empty() {
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
        }
        Err(e) => eprintln!("error: bad trace output: {e}"),
    }
    let mut json = bench::json(&outcome.serial).map(str::to_string);
    if let (true, Some(j)) = (bench_blk, json.as_mut()) {
        // The reference: the host reading the same file, now in its cache
        // as QEMU left it, in the same run.
        let image = &config.disks.last().expect("bench disk").path;
        match bench::host_read_mib_s(image) {
            Ok(mib_s) => {
                *j = bench::with_field(j, "host_read_mib_s", mib_s);
                eprintln!("host reads the image at {mib_s} MiB/s");
            }
            Err(e) => eprintln!("error: reading {}: {e}", image.display()),
        }
    }
    if let Some(json) = json.as_deref() {
        if bench_blk {
            eprintln!("goals (each against a baseline from this run):");
            for goal in bench::blk_goals(json) {
                let mark = if goal.met { "met " } else { "MISS" };
                eprintln!(
                    "  [{mark}] {:<42} {:>10.4}  (limit {})",
                    goal.what, goal.measured, goal.limit
                );
            }
        }
        if args.scenario == "bench-memsnap" {
            eprintln!("goals (each against a baseline from this run):");
            for goal in bench::memsnap_goals(json) {
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
        }
        if args.scenario == "bench-backup" {
            eprintln!("goals (each against a baseline from this run):");
            for goal in bench::backup_goals(json) {
                let mark = if goal.met { "met " } else { "MISS" };
                eprintln!(
                    "  [{mark}] {:<42} {:>10.4}  (limit {})",
                    goal.what, goal.measured, goal.limit
                );
            }
            let f = |k| bench::field_f64(json, k).unwrap_or(0.0);
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
    } else if let Some(path) = &args.json {
        eprintln!(
            "error: the kernel printed no benchmark result for {}",
            path.display()
        );
    }
    eprintln!(
        "kernel {} in {:.2} s",
        outcome.verdict,
        outcome.elapsed.as_secs_f64()
    );
    let mut verdict = outcome.verdict;
    let records = report::records(&outcome.serial).unwrap_or_default();
    let passed = verdict == Verdict::Passed;
    if let Some(job) = &backup_job {
        match host_backup::finish_backup(job, &records, passed) {
            Ok(n) => eprintln!("tape: {} ({n} bytes)", job.tape.display()),
            Err(e) => {
                eprintln!("error: {e}");
                verdict = Verdict::Failed;
            }
        }
    }
    if let Some(job) = &restore_job {
        match host_backup::finish_restore(job, &records, passed) {
            Ok(()) => eprintln!(
                "restored: {} ({:?}, {} bytes)",
                job.out.display(),
                job.format,
                job.out_bytes
            ),
            Err(e) => {
                eprintln!("error: {e}");
                verdict = Verdict::Failed;
            }
        }
    }
    if args.scenario == "bench-backup" && passed {
        if let Err(e) = bench::check_backup_bench(&work.join("bench-backup")) {
            eprintln!("error: {e}");
            verdict = Verdict::Failed;
        }
    }
    if let (Some(image), Some(out)) = (&snapshot_image, &args.out) {
        if !take_core(
            image,
            core_len,
            out,
            verdict == Verdict::Passed,
            &config.kernel,
        ) {
            verdict = Verdict::Failed;
        }
    }
    if let Some(image) = &snapshot_image {
        let _ = std::fs::remove_file(image);
    }
    match verdict {
        Verdict::Passed => ExitCode::SUCCESS,
        Verdict::Failed => ExitCode::from(1),
        Verdict::UnexpectedExit(_) | Verdict::TimedOut(_) => ExitCode::from(3),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Args, String> {
        parse_args(words.iter().map(|w| w.to_string()))
    }

    #[test]
    fn defaults_to_the_demo() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.cmdline, ["scenario=demo"]);
        assert_eq!(args.mem, 128 << 20);
    }

    #[test]
    fn scenario_options_and_kernel_words() {
        let args = parse(&["test", "memory::x", "--mem", "2G", "seed=7"]).unwrap();
        assert_eq!(args.cmdline, ["scenario=test", "seed=7", "test=memory::x"]);
        assert_eq!(args.mem, 2 << 30);
    }

    #[test]
    fn bad_input_is_explained() {
        assert!(parse(&["--mem", "lots"])
            .unwrap_err()
            .contains("--mem lots"));
        assert!(parse(&["--mem", "1M"])
            .unwrap_err()
            .contains("at least 32M"));
        assert!(parse(&["--frobnicate"])
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse(&["demo", "extra"])
            .unwrap_err()
            .contains("unexpected argument"));
        assert!(parse(&["memsnap"]).unwrap_err().contains("--out FILE"));
        assert!(parse(&["demo", "--out", "x"])
            .unwrap_err()
            .contains("memsnap"));
        assert!(parse(&["demo", "--to-disk"])
            .unwrap_err()
            .contains("bench-memsnap"));
    }

    #[test]
    fn memsnap_takes_its_core_file_path() {
        let args = parse(&["memsnap", "--out", "/tmp/x.core", "--mem", "256M"]).unwrap();
        assert_eq!(args.scenario, "memsnap");
        assert_eq!(
            args.out.as_deref(),
            Some(std::path::Path::new("/tmp/x.core"))
        );
        assert!(parse(&["bench-memsnap", "--to-disk"]).unwrap().to_disk);
    }
}
