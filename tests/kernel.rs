//! The in-kernel tests, each booted in its own QEMU by the custom runner and
//! reported by name like any `cargo test` test.
//!
//! Tests that fail on purpose (a panic, a hang, a page fault) are listed but
//! ignored; `cargo test --test kernel -- --include-ignored` runs them too, and
//! the run must then fail, which shows the verdicts are real.

use libtest_mimic::{Arguments, Failed, Trial};

use kernel_tests::{list_kernel_tests, run_kernel_test_with_disks, test_timeout};

fn main() {
    let args = Arguments::from_args();
    let tests = list_kernel_tests();
    assert!(!tests.is_empty(), "the kernel listed no tests");
    let trials = tests
        .into_iter()
        .map(|test| {
            let name = test.name.clone();
            let disks = test.disks.clone();
            let timeout = if test.deliberately_fails {
                std::time::Duration::from_secs(5)
            } else {
                test_timeout()
            };
            Trial::test(test.name, move || {
                run_kernel_test_with_disks(&name, &disks, timeout)
                    .map(|_| ())
                    .map_err(Failed::from)
            })
            .with_ignored_flag(test.deliberately_fails)
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
