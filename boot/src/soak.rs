//! `soak-memsnap` on the host: boots the kernel with a range of runs
//! (`seed= first= runs=`), watches each run with a watchdog, and reboots
//! at the next run when one fails, crashes or hangs, until every run has
//! been tried. Prints one line per failed run with the command that
//! reproduces it, and a summary.
//!
//! What each run found comes from its `soak.run` record
//! ([`snapshot::memsnap::soak::RunResult`]); [`Tracker`] follows one
//! boot's records and decides when a run has hung. It must never count a
//! run as passed without its record.

use std::fmt;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use snapshot::interface::scenario::JobFailure;
use snapshot::interface::trace::parse_line;
use snapshot::memsnap::soak::{self, RunResult};

use crate::cli::Args;
use crate::qemu::{self, Config, Disk};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Runs in all.
    pub runs: u64,
    /// The first run's seed.
    pub seed: u64,
    /// A run still going after this long has hung.
    pub run_timeout: Duration,
    /// The kernel command line besides the soak's own words.
    pub cmdline: Vec<String>,
    /// Guest RAM and CPUs.
    pub mem_bytes: u64,
    /// See `mem_bytes`.
    pub cpus: usize,
}

/// A run that did not pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its index.
    pub run: u64,
    /// Its seed.
    pub seed: u64,
    /// What went wrong.
    pub what: String,
}

/// The soak's totals.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    /// Runs tried.
    pub runs: u64,
    /// Runs whose record found nothing wrong.
    pub passed: u64,
    /// The others, in order.
    pub failures: Vec<Failure>,
    /// Sums over every run's record.
    pub totals: RunResult,
    /// Runs the watchdog stopped.
    pub hangs: u64,
    /// Boots it took.
    pub boots: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// One boot's progress, from its serial lines.
#[derive(Debug)]
pub struct Tracker {
    run_timeout: Duration,
    /// The run in progress: index, seed, when it began.
    current: Option<(u64, u64, Instant)>,
    /// Runs that ended, with their records.
    pub done: Vec<RunResult>,
    /// The kernel's last failure reason.
    pub reason: Option<String>,
    /// The watchdog fired.
    pub hung: bool,
}

impl Tracker {
    /// A tracker whose runs hang after `run_timeout`.
    pub fn new(run_timeout: Duration) -> Self {
        Tracker {
            run_timeout,
            current: None,
            done: Vec::new(),
            reason: None,
            hung: false,
        }
    }

    /// Takes a serial line (`None`: a second of silence) at `now`;
    /// returns true when the run in progress has hung.
    pub fn see(&mut self, line: Option<&str>, now: Instant) -> bool {
        if let Some(Ok(Some(record))) = line.map(parse_line) {
            if record.event == soak::BEGIN {
                let field = |k| record.u64(k).unwrap_or(0);
                self.current = Some((field("run"), field("seed"), now));
            } else if let Some(result) = RunResult::from_record(&record) {
                self.current = None;
                self.done.push(result);
            } else if let Some(failure) = JobFailure::from_record(&record) {
                self.reason = Some(failure.reason.to_string());
            }
        } else if let Some(panic) = line.and_then(|l| l.split_once("PANIC")) {
            self.reason = Some(format!("PANIC{}", panic.1));
        }
        let hung = self
            .current
            .is_some_and(|(.., began)| now.duration_since(began) > self.run_timeout);
        self.hung |= hung;
        hung
    }

    /// The run that began and did not end: index and seed.
    pub fn unfinished(&self) -> Option<(u64, u64)> {
        self.current.map(|(run, seed, _)| (run, seed))
    }
}

impl Summary {
    /// Adds one boot's runs; returns the index of the next run to try.
    pub fn add_boot(&mut self, tracker: &Tracker, first: u64, seed: u64, verdict: &str) -> u64 {
        self.boots += 1;
        let mut next = first;
        // A boot that stopped with a reason after its last run ended: that
        // run failed, whatever its counts say (an error such as "cannot
        // reserve snapshot storage" ends a run with nothing counted).
        let failed_last = tracker.reason.is_some() && tracker.unfinished().is_none();
        for (i, r) in tracker.done.iter().enumerate() {
            self.runs += 1;
            self.totals.add(r);
            let last = i + 1 == tracker.done.len();
            let what = match (r.ok() && !(last && failed_last), &tracker.reason) {
                (true, _) => None,
                (false, Some(reason)) => Some(reason.clone()),
                (false, None) => Some(r.to_string()),
            };
            self.passed += u64::from(what.is_none());
            self.failures.extend(what.map(|what| Failure {
                run: r.run,
                seed: r.seed,
                what,
            }));
            next = r.run + 1;
        }
        // A run that began without ending, or a boot that never began its
        // first run, failed as a whole.
        let broken = tracker
            .unfinished()
            .or_else(|| (tracker.done.is_empty()).then_some((first, soak::run_seed(seed, first))));
        if let Some((run, seed)) = broken {
            self.runs += 1;
            self.hangs += u64::from(tracker.hung);
            let what = match (tracker.hung, &tracker.reason) {
                (true, _) => "hung: the watchdog rebooted the machine".to_string(),
                (false, Some(reason)) => reason.clone(),
                (false, None) => format!("the machine stopped: {verdict}"),
            };
            self.failures.push(Failure { run, seed, what });
            next = run + 1;
        }
        next
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.totals;
        write!(
            f,
            "soak: {} runs, {} passed, {} failed, in {:.1} s over {} boot(s): {} mismatched pages, \
             {} copied twice, {} never copied, {} copy-count disagreements, {} leaked frames, \
             {} restore errors, {} hangs ({} pages snapshotted in all)",
            self.runs,
            self.passed,
            self.failures.len(),
            self.elapsed.as_secs_f64(),
            self.boots,
            t.mismatched,
            t.copied_twice,
            t.never_copied,
            t.count_disagreement,
            t.leaked_frames,
            t.restore_errors,
            self.hangs,
            t.pages
        )
    }
}

/// The line printed for a failed run: what happened and how to run it
/// again alone.
pub fn failure_line(f: &Failure, plan: &Plan) -> String {
    let mut again = format!("--runs 1 --seed {:#x}", f.seed);
    if plan.cpus > 1 {
        again += &format!(" --cpus {}", plan.cpus);
    }
    if plan.mem_bytes != 0 {
        again += &format!(" --mem {}M", plan.mem_bytes >> 20);
    }
    if plan.run_timeout != DEFAULT_RUN_TIMEOUT {
        again += &format!(" --run-timeout {}", plan.run_timeout.as_secs_f64());
    }
    for word in &plan.cmdline {
        again += &format!(" {word}");
    }
    format!(
        "FAIL run {} (seed {:#x}): {}; reproduce: cargo run --release -- soak-memsnap {again}",
        f.run, f.seed, f.what
    )
}

/// How long a run may take before it has hung, unless `--run-timeout`.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs the whole soak: boots until every run was tried. `work` holds
/// the disks; `on_line` sees every serial line, `on_failure` each failure.
pub fn run(
    kernel: &Path,
    plan: &Plan,
    work: &Path,
    mut on_line: impl FnMut(&str),
    mut on_failure: impl FnMut(&Failure),
) -> Result<Summary, String> {
    std::fs::create_dir_all(work).map_err(|e| format!("{}: {e}", work.display()))?;
    let disks = [("snap", plan.mem_bytes + (16 << 20)), ("dma", 16 << 20)]
        .iter()
        .map(|&(name, size)| {
            let image = work.join(format!("{name}.img"));
            crate::bench::make_blank_image(&image, size)
                .map_err(|e| format!("{}: {e}", image.display()))?;
            Ok(Disk::new(image, name))
        })
        .collect::<Result<Vec<_>, String>>()?;
    let started = Instant::now();
    let mut summary = Summary::default();
    let mut next = 0;
    while next < plan.runs {
        let seed = soak::run_seed(plan.seed, next);
        let mut cmdline = vec!["scenario=soak-memsnap".to_string()];
        cmdline.extend(plan.cmdline.iter().cloned());
        cmdline.push(format!(
            "seed={seed:#x} first={next} runs={}",
            plan.runs - next
        ));
        let config = Config {
            mem_bytes: plan.mem_bytes,
            cpus: plan.cpus,
            disks: disks.clone(),
            // The watchdog stops a hung run; this only bounds a boot.
            timeout: plan
                .run_timeout
                .saturating_mul(u32::try_from(plan.runs - next + 1).unwrap_or(u32::MAX)),
            ..Config::new(kernel, &cmdline.join(" "))
        };
        let mut tracker = Tracker::new(plan.run_timeout);
        let outcome = qemu::run_supervised(&config, &mut on_line, |line| {
            tracker.see(line, Instant::now())
        })?;
        let before = summary.failures.len();
        next = summary.add_boot(&tracker, next, plan.seed, &outcome.verdict.to_string());
        summary.failures[before..].iter().for_each(&mut on_failure);
    }
    summary.elapsed = started.elapsed();
    Ok(summary)
}

/// The host tool's `soak-memsnap`: as many boots as the runs need; one
/// line per failed run, then the summary; `show` echoes the kernel's log
/// and the runs' records (not every trace record). Exit status 0 only if
/// every run passed.
pub fn main(args: &Args, kernel: &Path, show: impl Fn(&str)) -> ExitCode {
    let plan = Plan {
        runs: args.runs.unwrap_or(20),
        seed: args.seed.unwrap_or(1),
        run_timeout: args.run_timeout.unwrap_or(DEFAULT_RUN_TIMEOUT),
        // The scenario's own word is added by the soak, with its range.
        cmdline: args.cmdline[1..].to_vec(),
        mem_bytes: args.mem,
        cpus: args.cpus,
    };
    eprintln!(
        "soak-memsnap: {} runs from seed {:#x}, {} MiB, {} CPU(s)",
        plan.runs,
        plan.seed,
        plan.mem_bytes >> 20,
        plan.cpus
    );
    let work = crate::workspace_root().join("target/soak-memsnap");
    let echo = |line: &str| {
        if !matches!(parse_line(line), Ok(Some(r)) if !r.event.starts_with("soak.")) {
            show(line);
        }
    };
    let failed = |failure: &Failure| eprintln!("{}", failure_line(failure, &plan));
    match run(kernel, &plan, &work, echo, failed) {
        Ok(summary) => {
            eprintln!("{summary}");
            ExitCode::from(u8::from(!summary.failures.is_empty()))
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::interface::trace::write_record;

    fn record(result: &RunResult) -> String {
        let mut line = String::new();
        write_record(&mut line, 1, soak::RUN, &result.fields()).unwrap();
        line
    }

    #[test]
    fn a_hung_run_is_one_failure_and_the_soak_goes_on_after_it() {
        let t0 = Instant::now();
        let mut tracker = Tracker::new(Duration::from_secs(10));
        let ok = RunResult {
            run: 4,
            seed: 9,
            ..RunResult::default()
        };
        assert!(!tracker.see(Some("TRACE 1 soak.begin run=4 seed=0x9"), t0));
        assert!(!tracker.see(Some(&record(&ok)), t0));
        assert!(!tracker.see(Some("TRACE 2 soak.begin run=5 seed=0x20"), t0));
        assert!(!tracker.see(None, t0 + Duration::from_secs(9)));
        assert!(tracker.see(None, t0 + Duration::from_secs(11)));
        let mut summary = Summary::default();
        assert_eq!(summary.add_boot(&tracker, 4, 0, "killed"), 6);
        assert_eq!((summary.runs, summary.passed, summary.hangs), (2, 1, 1));
        assert_eq!(summary.failures[0].run, 5);
        assert_eq!(summary.failures[0].seed, 0x20);
        let plan = Plan {
            runs: 9,
            seed: 0,
            run_timeout: Duration::from_secs(10),
            cmdline: vec!["copier_cpu=shared".into()],
            mem_bytes: 1 << 30,
            cpus: 2,
        };
        let line = failure_line(&summary.failures[0], &plan);
        assert!(
            line.ends_with(
                "--runs 1 --seed 0x20 --cpus 2 --mem 1024M --run-timeout 10 copier_cpu=shared"
            ),
            "{line}"
        );
    }

    /// A run that ended in an error the counts do not show (its record is
    /// all zeros, then the kernel's failure) failed.
    #[test]
    fn a_run_ended_by_an_error_fails_though_its_counts_are_clean() {
        let mut tracker = Tracker::new(Duration::from_secs(10));
        let now = Instant::now();
        for (run, seed) in [(0, 5), (1, 6)] {
            let clean = RunResult {
                run,
                seed,
                ..RunResult::default()
            };
            tracker.see(
                Some(&format!("TRACE 1 soak.begin run={run} seed={seed:#x}")),
                now,
            );
            tracker.see(Some(&record(&clean)), now);
        }
        tracker.see(
            Some("TRACE 2 job.failed job=soak reason=\"cannot reserve snapshot storage\""),
            now,
        );
        let mut summary = Summary::default();
        assert_eq!(summary.add_boot(&tracker, 0, 5, "failed"), 2);
        assert_eq!((summary.runs, summary.passed), (2, 1));
        assert_eq!(summary.failures[0].run, 1);
        assert_eq!(summary.failures[0].what, "cannot reserve snapshot storage");
    }

    #[test]
    fn a_failed_record_carries_the_kernels_reason_and_a_silent_boot_fails_its_first_run() {
        let mut tracker = Tracker::new(Duration::from_secs(10));
        let now = Instant::now();
        let bad = RunResult {
            run: 0,
            seed: 1,
            leaked_frames: 1,
            ..RunResult::default()
        };
        tracker.see(Some("TRACE 1 soak.begin run=0 seed=0x1"), now);
        tracker.see(Some(&record(&bad)), now);
        tracker.see(
            Some("TRACE 2 job.failed job=soak reason=\"run 0: 1 leaked frames\""),
            now,
        );
        let mut summary = Summary::default();
        assert_eq!(summary.add_boot(&tracker, 0, 1, "failed"), 1);
        assert_eq!(summary.totals.leaked_frames, 1);
        assert_eq!(summary.failures[0].what, "run 0: 1 leaked frames");

        let silent = Tracker::new(Duration::from_secs(10));
        assert_eq!(summary.add_boot(&silent, 1, 1, "QEMU exited"), 2);
        assert_eq!(summary.failures[1].seed, soak::run_seed(1, 1));
        assert!(summary.failures[1].what.contains("QEMU exited"));
        assert_eq!((summary.runs, summary.boots, summary.hangs), (2, 2, 0));
    }
}
