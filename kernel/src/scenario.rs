//! Scenarios: what a boot does, chosen by `scenario=` on the kernel command
//! line so one image serves the demo, the tests and every benchmark.
//!
//! | scenario | parameters | what |
//! |---|---|---|
//! | `demo` (default) | | memory map, clock, two interleaved threads, a verified live snapshot of a running workload, traces |
//! | `test` | `test=<name>` or `test=list` | one in-kernel test (see [`crate::ktest`]) |
//! | `crash` | `kind=pf|ud|de|gp|bp|overflow` | raise an exception on purpose |
//! | `memsnap` | `disk=snap` | a verified live snapshot of all RAM to a disk, as an ELF core file |
//! | `bench-memsnap` | `copier_share=30`, `to_disk=NAME` | live snapshot benchmark (see [`crate::bench`]) |
//! | `bench-blk` | `blk=poll` | virtio-blk benchmark on the disk `bench` |
//! | `backup` | `source=`, `scratch=`, `tape=` | compact backup of a qcow2 disk to a medium (see [`crate::backup`]) |
//! | `restore` | `tape=`, `out=`, `format=raw\|qcow2` | a medium back to a disk image |
//! | `bench-backup` | | backup of scattered data against an all-data backup and raw throughput |

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::interface::cmdline::CmdLine;
use snapshot::interface::units::format_size;

use crate::arch::cpu::{crash, Crash};
use crate::arch::qemu::ExitCode;
use crate::boot_info::region_kind_name;
use crate::trace::Word;
use crate::workload::Workload;
use crate::{clock, memory, memsnap, thread};

/// Known scenario names, for the error message.
pub const SCENARIOS: &[&str] = &[
    "demo",
    "test",
    "crash",
    "memsnap",
    "bench-memsnap",
    "bench-blk",
    "backup",
    "restore",
    "bench-backup",
];

/// Runs the scenario the command line names.
pub fn run(cmd: &CmdLine<'_>) -> ExitCode {
    match cmd.get("scenario").unwrap_or("demo") {
        "demo" => demo(),
        "test" => match cmd.get("test") {
            Some("list") => crate::ktest::list(crate::tests::all()),
            Some(name) => crate::ktest::run(crate::tests::all(), name),
            None => {
                crate::log!("scenario=test needs test=<name> or test=list");
                ExitCode::Failure
            }
        },
        "crash" => crash_on_purpose(cmd.get("kind").unwrap_or("pf")),
        "memsnap" => snapshot_to_disk(cmd.get("disk").unwrap_or("snap")),
        "bench-memsnap" => crate::bench::memsnap(cmd),
        "bench-blk" => crate::bench::blk(cmd),
        "backup" => crate::backup::backup_scenario(cmd),
        "restore" => crate::backup::restore_scenario(cmd),
        "bench-backup" => crate::bench::backup(cmd),
        other => {
            crate::log!(
                "unknown scenario {other:?}; known scenarios: {}",
                SCENARIOS.join(", ")
            );
            ExitCode::Failure
        }
    }
}

fn demo() -> ExitCode {
    crate::log!("memory map (from the PVH start info):");
    let mut usable = 0;
    for r in crate::boot_regions() {
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
        crate::log!("snapshot refused: {e}");
        workload.stop();
        return ExitCode::Failure;
    }
    let report = memsnap::wait();
    let latencies = memsnap::latencies();
    memsnap::emit_timeline();
    let _ = memsnap::release();
    workload.stop();
    let Some(report) = report else {
        return ExitCode::Failure;
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
    if report.mismatched == Some(0) && report.not_copied_once == Some(0) {
        ExitCode::Success
    } else {
        ExitCode::Failure
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
        other => crate::log!("unknown crash kind {other:?}; kinds: pf ud de gp bp overflow"),
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
        crate::log!("snapshot refused: {e}");
        workload.stop();
        return ExitCode::Failure;
    }
    let report = memsnap::wait();
    let latencies = memsnap::latencies();
    workload.stop();
    let Some(report) = report else {
        return ExitCode::Failure;
    };
    if let Some(e) = &report.error {
        crate::log!("the snapshot failed: {e}");
        let _ = memsnap::abort();
        return ExitCode::Failure;
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
    let ok = report.mismatched == Some(0) && report.not_copied_once == Some(0);
    if ok {
        if let Some(d) = &report.disk {
            crate::trace!(
                "memsnap.core",
                bytes = d.core_bytes,
                pages = report.pages,
                instant_ns = report.instant_ns
            );
        }
    }
    crate::trace::flush();
    if ok {
        ExitCode::Success
    } else {
        ExitCode::Failure
    }
}
