//! The in-kernel tests, each booted in its own QEMU by the custom runner and
//! reported by name like any `cargo test` test.
//!
//! Every test runs at each CPU count of `KERNEL_TEST_CPUS` (default one
//! and two CPUs); the one-CPU run keeps the plain name, the others are
//! named `test@Ncpus`.
//!
//! Tests that fail on purpose (a panic, a hang, a page fault) are listed but
//! ignored; `cargo test --test kernel -- --include-ignored` runs them too, and
//! the run must then fail, which shows the verdicts are real.

use libtest_mimic::{Arguments, Failed, Trial};

use kernel_tests::{kernel_test_cpus, list_kernel_tests, run_kernel_test_on_cpus, test_timeout};

fn main() {
    let args = Arguments::from_args();
    let tests = list_kernel_tests();
    assert!(!tests.is_empty(), "the kernel listed no tests");
    let mut trials = Vec::new();
    for cpus in kernel_test_cpus() {
        for test in &tests {
            let name = test.name.clone();
            let disks = test.disks.clone();
            let timeout = if test.deliberately_fails {
                std::time::Duration::from_secs(5)
            } else {
                test_timeout()
            };
            // One CPU keeps the plain name; other counts say theirs.
            let shown = match cpus {
                1 => test.name.clone(),
                n => format!("{}@{n}cpus", test.name),
            };
            trials.push(
                Trial::test(shown, move || {
                    run_kernel_test_on_cpus(&name, &disks, cpus, timeout)
                        .map(|_| ())
                        .map_err(Failed::from)
                })
                .with_ignored_flag(test.deliberately_fails),
            );
        }
    }
    libtest_mimic::run(&args, trials).exit();
}
