//! The in-kernel test harness. The host runner (`boot`, through `cargo test`)
//! boots one QEMU per test with `scenario=test test=<name>`; the kernel runs
//! that one test and reports on serial:
//!
//! ```text
//! KTEST-LIST <name> <normal|deliberate-failure> [disks=<spec>,...]   (test=list)
//! KTEST-START <name>
//! KTEST-PASS <name>                               (then exit 33)
//! KTEST-FAIL <name>: <why>                        (panic or exception; exit 35)
//! ```
//!
//! A hung test prints neither PASS nor FAIL; the host kills it after its
//! timeout. Tests are plain functions that panic on failure.
//!
//! A test that needs disks lists them as `serial:MiB[:ro]`; the host makes
//! a fresh raw image for each (zeros; read-only ones hold the pattern
//! [`snapshot::devices::block::fill_pattern`] with seed
//! [`snapshot::devices::block::READ_ONLY_TEST_SEED`]) and attaches
//! them in that order.

use core::fmt::Write;
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::arch::qemu::ExitCode;

/// One kernel test.
#[derive(Debug)]
pub struct Test {
    /// `module::name`, unique.
    pub name: &'static str,
    /// The test; it fails by panicking (or faulting).
    pub run: fn(),
    /// A test that must fail, to show failures are caught. Not run by default.
    pub deliberately_fails: bool,
    /// Disks the host attaches: `serial:MiB[:ro]`.
    pub disks: &'static [&'static str],
}

const NONE: usize = usize::MAX;
static CURRENT: AtomicUsize = AtomicUsize::new(NONE);

/// Prints the registry, one `KTEST-LIST` line per test.
pub fn list(tests: &[Test]) -> ExitCode {
    for test in tests {
        let kind = if test.deliberately_fails {
            "deliberate-failure"
        } else {
            "normal"
        };
        if test.disks.is_empty() {
            crate::println!("KTEST-LIST {} {kind}", test.name);
        } else {
            crate::println!(
                "KTEST-LIST {} {kind} disks={}",
                test.name,
                test.disks.join(",")
            );
        }
    }
    ExitCode::Success
}

/// Runs the named test.
pub fn run(tests: &'static [Test], name: &str) -> ExitCode {
    let Some(index) = tests.iter().position(|t| t.name == name) else {
        crate::println!(
            "KTEST-FAIL {name}: no such kernel test (scenario=test test=list lists them)"
        );
        return ExitCode::Failure;
    };
    REGISTRY.call_once(|| tests);
    CURRENT.store(index, Ordering::SeqCst);
    crate::println!("KTEST-START {name}");
    let started = crate::clock::now_ns();
    (tests[index].run)();
    let micros = (crate::clock::now_ns() - started) / 1000;
    CURRENT.store(NONE, Ordering::SeqCst);
    crate::trace::flush();
    crate::println!("KTEST-PASS {name} ({micros} us)");
    ExitCode::Success
}

static REGISTRY: spin::Once<&'static [Test]> = spin::Once::new();
/// `expect_cpus=` of the command line: the CPUs the runner gave QEMU.
static EXPECTED_CPUS: AtomicUsize = AtomicUsize::new(0);

/// Records the CPU count the runner asked QEMU for (`expect_cpus=`).
pub fn set_expected_cpus(cpus: Option<u64>) {
    EXPECTED_CPUS.store(cpus.map_or(0, |n| n as usize), Ordering::Relaxed);
}

/// The CPU count the runner gave QEMU, if it said.
pub fn expected_cpus() -> Option<usize> {
    Some(EXPECTED_CPUS.load(Ordering::Relaxed)).filter(|&n| n > 0)
}

/// Called on the fatal paths (panic, exception): names the failing test.
pub fn report_fatal(out: &mut dyn Write, what: core::fmt::Arguments<'_>) {
    let index = CURRENT.load(Ordering::SeqCst);
    if let Some(test) = REGISTRY.get().and_then(|tests| tests.get(index)) {
        let _ = writeln!(out, "KTEST-FAIL {}: {what}", test.name);
    }
}
