//! Scenarios: what a boot does, chosen by `scenario=` on the kernel command
//! line so one image serves the demo, the tests and every benchmark. The
//! list, with each scenario's parameters and help, is
//! [`snapshot::interface::scenario::ALL`], shared with the host tool; this
//! module only dispatches on it.
//!
//! A job that cannot complete ends with a `job.failed` or `job.refused`
//! record carrying the reason ([`crate::trace::job_failed`]), which the host tool shows
//! as its last line. This module must never decide a scenario by its name
//! as a string: it matches on [`Scenario`].

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::interface::cmdline::CmdLine;
use snapshot::interface::scenario::Scenario;
use snapshot::interface::units::format_size;

use crate::arch::cpu::{crash, Crash};
use crate::arch::qemu::ExitCode;
use crate::boot_info::region_kind_name;
use crate::trace::{job_failed, Word};
use crate::workload::Workload;
use crate::{clock, memory, memsnap, thread};

/// Runs the scenario the command line names.
pub fn run(cmd: &CmdLine<'_>) -> ExitCode {
    let scenario = match Scenario::from_cmdline(cmd) {
        Ok(scenario) => scenario,
        Err(unknown) => {
            crate::log!("{unknown}");
            return ExitCode::Failure;
        }
    };
    match scenario {
        Scenario::Demo => demo(),
        Scenario::Test => match cmd.get("test") {
            Some("list") => crate::ktest::list(crate::tests::all()),
            Some(name) => {
                crate::ktest::set_expected_cpus(cmd.u64("expect_cpus").ok().flatten());
                crate::ktest::run(crate::tests::all(), name)
            }
            None => {
                crate::log!("scenario=test needs test=<name> or test=list");
                ExitCode::Failure
            }
        },
        Scenario::Crash => crash_on_purpose(cmd.get("kind").unwrap_or("pf")),
        Scenario::Memsnap => snapshot_to_disk(cmd.get("disk").unwrap_or("snap")),
        Scenario::BenchMemsnap => crate::bench::memsnap(cmd),
        Scenario::BenchBlk => crate::bench::blk(cmd),
        Scenario::Backup => crate::backup::backup_scenario(cmd),
        Scenario::Restore => crate::backup::restore_scenario(cmd),
        Scenario::BenchBackup => crate::bench::backup(cmd),
        Scenario::Mirror => crate::mirror::mirror_scenario(cmd),
        Scenario::BenchMirror => crate::bench::mirror(cmd),
        Scenario::Clone => crate::clone::clone_scenario(cmd),
        Scenario::CloneSplit => crate::clone::split_scenario(cmd),
        Scenario::BenchCloneSplit => crate::bench::clone_split(cmd),
        Scenario::SoakMemsnap => crate::soak::scenario(cmd),
    }
}

fn demo() -> ExitCode {
    crate::log!("memory map (from the PVH start info):");
    let mut usable = 0;
    for r in crate::boot_info::memory_map() {
        crate::println!(
            "    {:#014x}-{:#014x} {:>6} {}",
            r.start,
            r.end,
            format_size(r.end - r.start),
            region_kind_name(r.kind)
        );
        if r.kind == 1 {
            usable += r.end - r.start;
        }
    }
    let (free, managed) = memory::frames::stats();
    let (heap_used, heap_size) = memory::heap::stats();
    crate::log!(
        "usable RAM {usable} bytes; frames: {free} free of {managed}; heap {heap_used}/{heap_size} bytes"
    );
    crate::log!(
        "TSC {} Hz; kernel image {:#x?}",
        clock::tsc_hz(),
        memory::kernel_image()
    );
    crate::trace!(
        "demo.memory",
        usable = usable,
        frames_free = free,
        frames = managed
    );

    crate::log!("two threads, each CPU-bound, sharing the CPU:");
    let progress = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let worker = |name: &'static str, me: usize, progress: Arc<[AtomicU64; 2]>| {
        move || {
            let mut x = me as u64 + 1;
            for step in 0..8u64 {
                let until = clock::now_ns() + 10_000_000;
                while clock::now_ns() < until {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                }
                progress[me].store(step + 1, Ordering::Relaxed);
                crate::trace!(
                    "demo.step",
                    thread = Word(name),
                    step = step,
                    other = progress[1 - me].load(Ordering::Relaxed)
                );
            }
            x
        }
    };
    let a = thread::spawn("workload", worker("workload", 0, progress.clone()));
    let b = thread::spawn("background", worker("background", 1, progress));
    let started = clock::now_ns();
    let (ra, rb) = (a.join(), b.join());
    let took = clock::now_ns() - started;
    crate::trace!(
        "demo.done",
        ms = took / 1_000_000,
        switches = thread::switches(),
        checksum = ra ^ rb
    );
    crate::trace::flush();
    crate::log!(
        "both finished in {} ms with {} context switches",
        took / 1_000_000,
        thread::switches()
    );
    let verdict = live_snapshot_demo();
    crate::log!("demo complete");
    verdict
}

/// The workload a snapshot scenario runs under: three threads writing a
/// thirty-second of free memory each (1 to 32 MiB), given 100 ms to get
/// going. Logs `what` the scenario does; `None` (logged) without memory.
fn snapshot_workload(what: &str, seed: u64) -> Option<Workload> {
    let (free, _) = memory::frames::stats();
    let each = (free * 4096 / 32).clamp(1 << 20, 32 << 20);
    crate::log!("{what} while 3 threads write {} MiB each:", each >> 20);
    let Some(workload) = Workload::start(3, each, seed) else {
        crate::log!("no memory for the workload");
        return None;
    };
    thread::sleep_ns(100_000_000);
    Some(workload)
}

/// A live snapshot of a running workload, verified against a stop-the-world
/// reference, with its timeline as trace records.
fn live_snapshot_demo() -> ExitCode {
    let Some(workload) = snapshot_workload("live snapshot of all RAM", 2024) else {
        return ExitCode::Failure;
    };
    let opts = memsnap::Options {
        verify: true,
        latencies: true,
        ..memsnap::Options::default()
    };
    if let Err(e) = memsnap::start(&opts) {
        workload.stop();
        return job_failed("memsnap", true, &e);
    }
    let report = memsnap::wait();
    let latencies = memsnap::latencies();
    memsnap::emit_timeline();
    let _ = memsnap::release();
    workload.stop();
    let Some(report) = report else {
        return job_failed("memsnap", false, &"no snapshot report");
    };
    crate::log!("{}", memsnap::describe(&report));
    let p99 = crate::bench::percentile(&latencies, 99);
    crate::log!(
        "pause {} us; write faults: {} timed, p99 {} ns; verification: {} mismatched pages",
        report.pause_ns / 1000,
        latencies.len(),
        p99,
        report.mismatched.unwrap_or(u64::MAX)
    );
    crate::trace!(
        "demo.snapshot",
        pages = report.pages,
        eager = report.stats.eager,
        fault = report.stats.fault,
        background = report.stats.background,
        pause_ns = report.pause_ns,
        mismatched = report.mismatched.unwrap_or(u64::MAX)
    );
    match unverified(&report) {
        None => ExitCode::Success,
        Some(why) => job_failed("memsnap", false, &why),
    }
}

fn crash_on_purpose(kind: &str) -> ExitCode {
    crate::log!("raising {kind} on purpose");
    match kind {
        "pf" => crash(Crash::PageFault(0xdead_b000)),
        "ud" => crash(Crash::InvalidOpcode),
        "de" => crash(Crash::DivideError),
        "gp" => crash(Crash::GeneralProtection),
        "bp" => crash(Crash::Breakpoint),
        "overflow" => {
            thread::spawn_with_stack("deep", 16 * 1024, || recurse(0))
                .map(|h| h.join())
                .ok();
        }
        other => {
            crate::log!(
                "unknown crash kind {other:?}; kinds: {}",
                snapshot::interface::scenario::CRASH_KINDS.join(" ")
            );
            return ExitCode::Failure;
        }
    }
    crate::log!("no exception was raised");
    ExitCode::Failure
}

fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    let pad = core::hint::black_box([depth; 32]);
    core::hint::black_box(recurse(depth + 1)) + pad[0]
}

/// A value the `memsnap` scenario changes just after the snapshot instant:
/// 1 before, 2 after. A debugger reading the core file must see 1.
pub static SNAPSHOT_MARK: AtomicU64 = AtomicU64::new(0);

/// `memsnap`: a live snapshot of all RAM to the disk named `disk`, as an
/// ELF core file, while three threads write; verified against the
/// instant's reference read back from the disk. Ends with a
/// `memsnap.core` trace record giving the file's length, which the host
/// tool copies off the disk image.
fn snapshot_to_disk(disk: &str) -> ExitCode {
    let what = alloc::format!("live snapshot of all RAM to disk {disk:?}");
    let Some(workload) = snapshot_workload(&what, 2025) else {
        return ExitCode::Failure;
    };
    let opts = memsnap::Options {
        verify: true,
        latencies: true,
        disk: Some(disk.into()),
        ..memsnap::Options::default()
    };
    SNAPSHOT_MARK.store(1, Ordering::SeqCst);
    let started = memsnap::start(&opts);
    // After the instant: the core file must still say 1.
    SNAPSHOT_MARK.store(2, Ordering::SeqCst);
    if let Err(e) = started {
        workload.stop();
        return job_failed("memsnap", true, &e);
    }
    let report = memsnap::wait();
    let latencies = memsnap::latencies();
    workload.stop();
    let Some(report) = report else {
        return job_failed("memsnap", false, &"no snapshot report");
    };
    if let Some(e) = &report.error {
        let _ = memsnap::abort();
        return job_failed("memsnap", false, e);
    }
    let _ = memsnap::release();
    crate::log!("{}", memsnap::describe(&report));
    let p99 = crate::bench::percentile(&latencies, 99);
    crate::log!(
        "write faults: {} timed, p99 {} ns, {} waited for the disk writer; SNAPSHOT_MARK is {} now, 1 in the core",
        latencies.len(),
        p99,
        report.fault_waits,
        SNAPSHOT_MARK.load(Ordering::SeqCst)
    );
    if let Some(why) = unverified(&report) {
        return job_failed("memsnap", false, &why);
    }
    if let Some(d) = &report.disk {
        crate::trace!(
            "memsnap.core",
            bytes = d.core_bytes,
            pages = report.pages,
            instant_ns = report.instant_ns
        );
    }
    crate::trace::flush();
    ExitCode::Success
}

/// Why a verified snapshot does not match its reference, if it does not.
fn unverified(report: &memsnap::Report) -> Option<alloc::string::String> {
    let count = |n: Option<u64>| n.map_or("unknown".into(), |n| alloc::format!("{n}"));
    (report.mismatched != Some(0) || report.not_copied_once != Some(0)).then(|| {
        alloc::format!(
            "verification: {} mismatched pages, {} pages not copied exactly once",
            count(report.mismatched),
            count(report.not_copied_once)
        )
    })
}
