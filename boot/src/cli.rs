//! The host tool's command line: `[SCENARIO] [OPTIONS] [key=value ...]`.
//!
//! Scenarios, their arguments and the options only some of them take come
//! from [`snapshot::interface::scenario::ALL`]; the usage text is generated
//! from it and from [`OPTIONS`], so a scenario added there is listed,
//! checked and passed to the kernel without touching this file. Parsing
//! never touches the file system.

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Duration;

use snapshot::backup::Format;
use snapshot::interface::cmdline::parse_u64;
use snapshot::interface::scenario::{Scenario, ALL, CRASH_KINDS};
use snapshot::interface::units::parse_size;
use snapshot::policy::sched::MAX_CPUS;

use crate::mirror::{bench_mem_bytes, bench_timeout_secs, check_bench_volume, BENCH_VOLUME};
use crate::qemu::Disk;

/// Every option with its help, in usage order. The scenario-specific ones
/// (`--out`, `--tape` ...) are checked against the scenario's description.
pub const OPTIONS: &[(&str, &str)] = &[
    ("--mem SIZE", "guest RAM, e.g. 128M, 2G (default 128M, or the scenario's)"),
    ("--timeout SECS", "kill QEMU after this long (default 600)"),
    (
        "--cpus N",
        "CPUs QEMU gives the guest (-smp N; default 2 for the demo and the benchmarks, 1 otherwise)",
    ),
    ("--quiet", "do not echo the serial console"),
    ("--json FILE", "write a benchmark's JSON result there"),
    (
        "--svg FILE",
        "write the snapshot timeline picture there (default: target/memsnap-timeline.svg when there is one)",
    ),
    (
        "--trace-json FILE",
        "write the trace there as Chrome trace-event JSON, for Perfetto or chrome://tracing",
    ),
    ("--disk NAME=FILE", "attach raw image FILE as a virtio-blk disk named NAME"),
    ("--ro-disk NAME=FILE", "the same, read-only"),
    ("--image FILE", "bench-blk's image (default target/bench-blk.img); clone-split's clone"),
    ("--image-size SIZE", "its size (default 1G)"),
    (
        "--volume SIZE",
        "bench-mirror: the pair's size, a quarter of it differential (default 256M; the issue's scale is 4G); raises --mem and --timeout when not given",
    ),
    ("--out FILE", "memsnap's core file; restore's output image; clone's new clone"),
    ("--base FILE", "clone's base image (qcow2 or raw; never written)"),
    ("--source FILE", "backup's source image (never written)"),
    ("--tape FILE", "backup's or mirror's medium (created) or restore's (read)"),
    ("--primary FILE", "mirror's primary volume (raw; the workload writes it)"),
    ("--secondary FILE", "mirror's secondary volume; its state is kept in FILE.mirror"),
    ("--via secondary|memory", "mirror: how the backup reads blocks the copier has not reached"),
    (
        "--workload on|off",
        "mirror: a seeded write workload on the primary (default on); clone-split: a seeded read/write workload on the clone (default off)",
    ),
    ("--format raw|qcow2", "restore's output format (default raw); clone's base format (default: by its first bytes)"),
    (
        "--to-disk",
        "bench-memsnap: also snapshot to a disk, against a sequential-write baseline on the same disk",
    ),
    (
        "--spread",
        "bench-backup: also back up a 1 TiB image holding 2,048 clusters 512 MiB apart, reporting its medium against its data",
    ),
    ("--runs N", "soak-memsnap: how many runs (default 20)"),
    ("--seed S", "soak-memsnap: the first run's seed, decimal or 0x hex (default 1)"),
    (
        "--run-timeout SECS",
        "soak-memsnap: a run still going after this long is a hang; the machine is rebooted (default 120)",
    ),
    ("-h, --help", "this text"),
];

const WIDTH: usize = 79;
const COLUMN: usize = 23;

/// Appends `left` padded to the help column, then `help` wrapped to
/// [`WIDTH`]; a `left` too long for the column gets a line of its own.
fn entry(out: &mut String, left: &str, help: &str) {
    let mut line = format!("  {left}");
    if line.len() + 1 > COLUMN {
        out.push_str(&line);
        out.push('\n');
        line.clear();
    }
    for word in help.split(' ') {
        if line.len() + 1 + word.len() > WIDTH && line.len() > COLUMN {
            out.push_str(line.trim_end());
            out.push('\n');
            line.clear();
        }
        if line.len() < COLUMN {
            line = format!("{line:<COLUMN$}");
        } else {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

/// The usage text, generated from the scenario table and [`OPTIONS`].
pub fn usage() -> String {
    let mut text =
        String::from("usage: cargo run --release -- [SCENARIO] [OPTIONS] [key=value ...]\n\n");
    text.push_str("scenarios:\n");
    for d in ALL {
        let mut help = d.help.to_string();
        if !d.params.is_empty() {
            let _ = write!(help, "; kernel words: {}", d.params.join(" "));
        }
        if d.mem_mib != Scenario::DEFAULT.describe().mem_mib {
            let _ = write!(help, "; {}M of RAM unless --mem", d.mem_mib);
        }
        entry(&mut text, &d.to_string(), &help);
    }
    text.push_str("\noptions:\n");
    for (left, help) in OPTIONS {
        entry(&mut text, left, help);
    }
    text.push_str("\nFurther key=value words are passed to the kernel command line.");
    text
}

/// The parsed command line.
#[derive(Debug)]
pub struct Args {
    /// What the kernel runs.
    pub scenario: Scenario,
    /// The kernel command line so far: the scenario's words, then the
    /// user's `key=value` words.
    pub cmdline: Vec<String>,
    /// Guest RAM in bytes.
    pub mem: u64,
    /// When QEMU is killed.
    pub timeout: Duration,
    /// CPUs for the guest (`--cpus`), or the scenario's default.
    pub cpus: usize,
    /// Whether to keep the serial console off stdout.
    pub quiet: bool,
    /// Where a benchmark's JSON goes.
    pub json: Option<PathBuf>,
    /// Where the timeline picture goes.
    pub svg: Option<PathBuf>,
    /// Where the trace goes as trace-event JSON.
    pub trace_json: Option<PathBuf>,
    /// Disks from `--disk` and `--ro-disk`.
    pub disks: Vec<Disk>,
    /// bench-blk's image.
    pub image: Option<PathBuf>,
    /// Its size.
    pub image_size: u64,
    /// memsnap's core file, restore's output.
    pub out: Option<PathBuf>,
    /// bench-memsnap: also to a disk.
    pub to_disk: bool,
    /// bench-backup: also the 1 TiB spread image.
    pub spread: bool,
    /// backup's source image.
    pub source: Option<PathBuf>,
    /// backup's or restore's medium.
    pub tape: Option<PathBuf>,
    /// restore's output format.
    pub format: Option<Format>,
    /// clone's base image.
    pub base: Option<PathBuf>,
    /// soak-memsnap: runs, the first run's seed, the per-run watchdog.
    pub runs: Option<u64>,
    /// See `runs`.
    pub seed: Option<u64>,
    /// See `runs`.
    pub run_timeout: Option<Duration>,
    /// bench-mirror's pair size.
    pub volume: u64,
    /// mirror's primary and secondary images.
    pub primary: Option<PathBuf>,
    /// See `primary`.
    pub secondary: Option<PathBuf>,
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

/// A positive number of seconds, for option `flag`.
fn seconds(flag: &str, text: &str) -> Result<Duration, String> {
    match text.parse::<f64>() {
        Ok(secs) if secs > 0.0 && secs.is_finite() => Ok(Duration::from_secs_f64(secs)),
        _ => Err(format!("{flag} {text}: not a number of seconds")),
    }
}

/// Parses one option (with its value, unless it is a switch) into `args`.
fn option(
    args: &mut Args,
    word: &str,
    value: &mut dyn FnMut() -> Result<String, String>,
) -> Result<(), String> {
    let path = |v: Result<String, String>| v.map(|v| Some(PathBuf::from(v)));
    match word {
        "--mem" => {
            let text = value()?;
            args.mem = parse_size(&text).map_err(|e| format!("--mem {text}: {e}"))?;
            if args.mem < 32 << 20 {
                return Err(format!("--mem {text}: the kernel needs at least 32M"));
            }
            if let Some(host) = host_memory_bytes().filter(|&host| args.mem > host) {
                return Err(format!(
                    "--mem {text}: more than this host's memory ({} MiB); QEMU could not give it",
                    host >> 20
                ));
            }
        }
        "--timeout" => args.timeout = seconds(word, &value()?)?,
        "--run-timeout" => args.run_timeout = Some(seconds(word, &value()?)?),
        "--runs" => {
            let text = value()?;
            let runs = parse_u64(&text).filter(|&n| n > 0);
            args.runs = Some(runs.ok_or(format!("--runs {text}: want a count above 0"))?);
        }
        "--seed" => {
            let text = value()?;
            args.seed = Some(parse_u64(&text).ok_or(format!("--seed {text}: not a number"))?);
        }
        "--cpus" => {
            let text = value()?;
            args.cpus = text
                .parse()
                .ok()
                .filter(|n| (1..=MAX_CPUS).contains(n))
                .ok_or(format!("--cpus {text}: want 1 to {MAX_CPUS}"))?;
        }
        "--quiet" => args.quiet = true,
        "--json" => args.json = path(value())?,
        "--svg" => args.svg = path(value())?,
        "--trace-json" => args.trace_json = path(value())?,
        "--disk" => args.disks.push(disk_arg(word, &value()?, false)?),
        "--ro-disk" => args.disks.push(disk_arg(word, &value()?, true)?),
        "--image" => args.image = path(value())?,
        "--out" => args.out = path(value())?,
        "--to-disk" => args.to_disk = true,
        "--spread" => args.spread = true,
        "--base" => args.base = path(value())?,
        "--source" => args.source = path(value())?,
        "--tape" => args.tape = path(value())?,
        "--primary" => args.primary = path(value())?,
        "--secondary" => args.secondary = path(value())?,
        "--via" => {
            let text = value()?;
            if !matches!(text.as_str(), "secondary" | "memory") {
                return Err(format!("--via {text}: want secondary or memory"));
            }
            args.cmdline.push(format!("via={text}"));
        }
        "--workload" => {
            let text = value()?;
            if !matches!(text.as_str(), "on" | "off") {
                return Err(format!("--workload {text}: want on or off"));
            }
            args.cmdline.push(format!("workload={text}"));
        }
        "--format" => {
            let text = value()?;
            let format =
                Format::parse(&text).ok_or(format!("--format {text}: want raw or qcow2"))?;
            args.format = Some(format);
        }
        "--volume" => {
            let text = value()?;
            args.volume = parse_size(&text).map_err(|e| format!("--volume {text}: {e}"))?;
            check_bench_volume(args.volume).map_err(|e| format!("--volume {text}: {e}"))?;
        }
        "--image-size" => {
            let text = value()?;
            args.image_size = parse_size(&text).map_err(|e| format!("--image-size {text}: {e}"))?;
            if args.image_size < 64 << 20 {
                return Err(format!("--image-size {text}: at least 64M"));
            }
        }
        w => return Err(format!("unknown option {w}")),
    }
    Ok(())
}

/// Checks the scenario-specific options: each given one must be the
/// scenario's, each required one given.
fn check_options(scenario: Scenario, given: &[String]) -> Result<(), String> {
    let d = scenario.describe();
    for o in d.options.iter().filter(|o| o.required) {
        if !given.iter().any(|g| g == o.flag) {
            return Err(format!("{} needs {} {}", d.name, o.flag, o.value));
        }
    }
    for flag in given {
        let takers: Vec<&str> = ALL
            .iter()
            .filter(|t| t.scenario.option(flag).is_some())
            .map(|t| t.name)
            .collect();
        if !takers.is_empty() && scenario.option(flag).is_none() {
            return Err(format!("{flag} is for {}", takers.join(" and ")));
        }
    }
    Ok(())
}

/// CPUs a scenario gets without `--cpus`: two for the demo and the
/// benchmarks (the machines they stand for have several), one otherwise.
pub fn default_cpus(scenario: Scenario) -> usize {
    if scenario == Scenario::DEFAULT || scenario.describe().benchmark {
        2
    } else {
        1
    }
}

/// Parses the words after the program name. `Err("")` asks for the usage
/// text; any other error says what is wrong.
pub fn parse_args(mut words: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut args = Args {
        scenario: Scenario::DEFAULT,
        cmdline: Vec::new(),
        mem: 0,
        timeout: Duration::from_secs(600),
        cpus: 0,
        quiet: false,
        json: None,
        svg: None,
        trace_json: None,
        disks: Vec::new(),
        image: None,
        image_size: 1 << 30,
        out: None,
        to_disk: false,
        spread: false,
        source: None,
        tape: None,
        format: None,
        base: None,
        runs: None,
        seed: None,
        run_timeout: None,
        volume: BENCH_VOLUME,
        primary: None,
        secondary: None,
    };
    let (mut positional, mut given, mut user_words) = (Vec::new(), Vec::new(), Vec::new());
    while let Some(word) = words.next() {
        match word.as_str() {
            "-h" | "--help" => return Err(String::new()),
            w if w.starts_with('-') => {
                // Given twice, one would silently win: only the disks add up.
                if given.contains(&word) && !matches!(w, "--disk" | "--ro-disk") {
                    return Err(format!("{w} given twice"));
                }
                let mut value = || words.next().ok_or(format!("{w} needs a value"));
                option(&mut args, w, &mut value)?;
                given.push(word);
            }
            w if w.contains('=') => user_words.push(word),
            _ => positional.push(word),
        }
    }
    let mut positional = positional.into_iter();
    if let Some(name) = positional.next() {
        args.scenario = Scenario::parse(&name).ok_or_else(|| {
            let names: Vec<&str> = ALL.iter().map(|d| d.name).collect();
            format!("unknown scenario {name}; known: {}", names.join(", "))
        })?;
    }
    let d = args.scenario.describe();
    check_options(args.scenario, &given)?;
    let argument = positional.next();
    match (d.argument, &argument) {
        (Some(a), None) if a.required => {
            return Err(format!("{} needs {}", d.name, a.value));
        }
        (None, Some(extra)) => return Err(format!("unexpected argument {extra}")),
        _ => {}
    }
    if let Some(extra) = positional.next() {
        return Err(format!("unexpected argument {extra}"));
    }
    if let (Scenario::Crash, Some(kind)) = (args.scenario, &argument) {
        if !CRASH_KINDS.contains(&kind.as_str()) {
            return Err(format!(
                "unknown crash kind {kind}; kinds: {}",
                CRASH_KINDS.join(" ")
            ));
        }
    }
    if !given.iter().any(|g| g == "--mem") {
        args.mem = d.mem_mib << 20;
    }
    if args.cpus == 0 {
        args.cpus = default_cpus(args.scenario);
    }
    if args.scenario == Scenario::SoakMemsnap && given.iter().any(|g| g == "--timeout") {
        // Each boot of a soak is bounded by its runs' watchdog instead.
        return Err("soak-memsnap bounds each run with --run-timeout SECS, not --timeout".into());
    }
    if args.scenario == Scenario::BenchMirror {
        let mem_given = given.iter().any(|g| g == "--mem");
        args.mem = bench_mem_bytes(args.volume, args.mem, mem_given)
            .map_err(|e| format!("bench-mirror: {e}"))?;
        if !given.iter().any(|g| g == "--timeout") {
            args.timeout = Duration::from_secs(bench_timeout_secs(args.volume));
        }
    }
    // `scenario=` first and the argument last, as the kernel reads the
    // last of repeated keys.
    let mut scenario_words = args
        .scenario
        .cmdline(argument.as_deref())
        .map(|(k, v)| format!("{k}={v}"));
    args.cmdline.extend(scenario_words.next());
    args.cmdline.extend(user_words);
    args.cmdline.extend(scenario_words);
    Ok(args)
}

/// The host's memory (`MemTotal` of `/proc/meminfo`), if it can be read.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
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
        let args = parse(&["crash"]).unwrap();
        assert_eq!(
            args.cmdline,
            ["scenario=crash"],
            "the kernel's default kind"
        );
        let args = parse(&["restore", "--tape", "t", "--out", "o"]).unwrap();
        assert_eq!(args.mem, 512 << 20);
    }

    #[test]
    fn cpus_default_by_scenario_and_are_checked() {
        assert_eq!(parse(&[]).unwrap().cpus, 2, "the demo");
        assert_eq!(parse(&["bench-memsnap"]).unwrap().cpus, 2, "a benchmark");
        assert_eq!(parse(&["test", "x::y"]).unwrap().cpus, 1);
        assert_eq!(parse(&["crash", "--cpus", "4"]).unwrap().cpus, 4);
        assert_eq!(
            parse(&["crash", "bogus"]).unwrap_err(),
            "unknown crash kind bogus; kinds: pf ud de gp bp overflow"
        );
        let help = Scenario::Crash.describe().help;
        for kind in CRASH_KINDS {
            assert!(help.contains(kind), "crash's help omits {kind}");
            assert!(parse(&["crash", kind]).is_ok());
        }
        let err = |words: &[&str]| parse(words).unwrap_err();
        assert!(err(&["--cpus", "0"]).contains("want 1 to 16"));
        assert!(err(&["--cpus", "many"]).contains("--cpus many"));
    }

    #[test]
    fn bad_input_is_explained() {
        let err = |words: &[&str]| parse(words).unwrap_err();
        assert!(err(&["--mem", "lots"]).contains("--mem lots"));
        assert!(err(&["--mem", "1M"]).contains("at least 32M"));
        assert!(err(&["--frobnicate"]).contains("unknown option"));
        assert!(err(&["demo", "extra"]).contains("unexpected argument"));
        assert!(err(&["test"]).contains("test needs NAME|list"));
        assert!(err(&["nonsense"]).contains("unknown scenario nonsense"));
        assert_eq!(err(&["memsnap"]), "memsnap needs --out FILE");
        assert_eq!(err(&["restore", "--tape", "t"]), "restore needs --out IMG");
        assert_eq!(
            err(&["demo", "--out", "x"]),
            "--out is for memsnap and restore and clone"
        );
        assert_eq!(err(&["clone", "--out", "c"]), "clone needs --base IMG");
        assert_eq!(
            err(&["memsnap", "--out", "a", "--out", "b"]),
            "--out given twice"
        );
        assert!(err(&["soak-memsnap", "--timeout", "1"]).contains("--run-timeout"));
        assert_eq!(
            err(&["demo", "--workload", "on"]),
            "--workload is for mirror and clone-split"
        );
        assert_eq!(
            err(&["demo", "--to-disk"]),
            "--to-disk is for bench-memsnap"
        );
        assert_eq!(
            err(&["backup", "--tape", "t"]),
            "backup needs --source IMG.qcow2"
        );
    }

    #[test]
    fn more_memory_than_the_host_has_is_refused_by_name() {
        let e = parse(&["demo", "--mem", "1024T"]).unwrap_err();
        assert!(
            e.starts_with("--mem 1024T: more than this host's memory"),
            "{e}"
        );
    }

    #[test]
    fn memsnap_takes_its_core_file_path() {
        let args = parse(&["memsnap", "--out", "/tmp/x.core", "--mem", "256M"]).unwrap();
        assert_eq!(args.scenario, Scenario::Memsnap);
        assert_eq!(
            args.out.as_deref(),
            Some(std::path::Path::new("/tmp/x.core"))
        );
        assert!(parse(&["bench-memsnap", "--to-disk"]).unwrap().to_disk);
        assert!(parse(&["bench-backup", "--spread"]).unwrap().spread);
        assert_eq!(
            parse(&["bench-memsnap", "--spread"]).unwrap_err(),
            "--spread is for bench-backup"
        );
    }

    #[test]
    fn bench_mirror_takes_its_volume_and_sizes_mem_and_timeout() {
        let args = parse(&["bench-mirror"]).unwrap();
        assert_eq!((args.volume, args.mem), (256 << 20, 512 << 20));
        assert_eq!(args.timeout, Duration::from_secs(600));
        let args = parse(&["bench-mirror", "--volume", "4G"]).unwrap();
        assert_eq!((args.volume, args.mem), (4 << 30, 512 << 20));
        assert_eq!(args.timeout, Duration::from_secs(600 + 60 * 15));
        let args = parse(&["bench-mirror", "--volume", "4G", "--timeout", "9"]).unwrap();
        assert_eq!(args.timeout, Duration::from_secs(9));
        // A 64 GiB pair's reference (8 MiB) does not fit 64M's 4 MiB heap:
        // raised when --mem is not given, refused with the figure when it is.
        assert_eq!(bench_mem_bytes(64 << 30, 64 << 20, false), Ok(448 << 20));
        let args = parse(&["bench-mirror", "--volume", "64G", "--mem", "64M"]);
        let e = args.unwrap_err();
        assert!(
            e.contains("needs 24 MiB of kernel heap") && e.contains("--mem 448M"),
            "{e}"
        );
        let err = |words: &[&str]| parse(words).unwrap_err();
        assert!(err(&["bench-mirror", "--volume", "100M"]).contains("steps of 16 MiB"));
        assert!(err(&["bench-mirror", "--volume", "128G"]).contains("64 MiB to 64 GiB"));
        assert_eq!(
            err(&["demo", "--volume", "1G"]),
            "--volume is for bench-mirror"
        );
    }

    #[test]
    fn the_soak_takes_runs_seed_and_cpus() {
        let args = parse(&[
            "soak-memsnap",
            "--runs",
            "5",
            "--seed",
            "0x2a",
            "--cpus",
            "2",
        ])
        .unwrap();
        assert_eq!((args.runs, args.seed, args.cpus), (Some(5), Some(42), 2));
        assert_eq!(args.mem, 64 << 20);
        let err = |words: &[&str]| parse(words).unwrap_err();
        assert_eq!(err(&["demo", "--runs", "5"]), "--runs is for soak-memsnap");
        assert!(err(&["soak-memsnap", "--runs", "0"]).contains("above 0"));
        assert!(err(&["soak-memsnap", "--seed", "x"]).contains("not a number"));
    }

    #[test]
    fn the_usage_lists_every_scenario_and_option_within_the_width() {
        let text = usage();
        for d in ALL {
            assert!(text.contains(&format!("\n  {d}")), "{}", d.name);
        }
        for (left, _) in OPTIONS {
            assert!(text.contains(&format!("\n  {left}")), "{left}");
        }
        for line in text.lines() {
            assert!(line.len() <= WIDTH || !line.contains(' '), "{line:?}");
        }
    }
}
