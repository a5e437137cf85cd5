//! Scenarios: what a boot does, chosen by `scenario=` on the kernel command
//! line so one image serves the demo, the tests and every benchmark.
//!
//! | scenario | parameters | what |
//! |---|---|---|
//! | `demo` (default) | | memory map, clock, two interleaved threads, traces |
//! | `test` | `test=<name>` or `test=list` | one in-kernel test (see [`crate::ktest`]) |
//! | `crash` | `kind=pf|ud|de|gp|bp|overflow` | raise an exception on purpose |

use alloc::sync::Arc;
use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::cmdline::CmdLine;
use snapshot::units::format_size;

use crate::arch::cpu::{crash, Crash};
use crate::arch::qemu::ExitCode;
use crate::boot_info::region_kind_name;
use crate::trace::Word;
use crate::{clock, memory, thread};

/// Known scenario names, for the error message.
pub const SCENARIOS: &[&str] = &["demo", "test", "crash"];

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
    crate::log!("demo complete");
    ExitCode::Success
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
