//! Shared helpers for the integration tests: build the kernel once, boot it
//! with a command line, run one in-kernel test and judge it.

use std::path::PathBuf;
use std::time::Duration;

use boot::qemu::{self, Config, Outcome, Verdict};

/// The kernel image, built once per test process. Panics with the setup
/// error (which names the command to run) if it cannot be built.
pub fn kernel() -> PathBuf {
    if let Err(e) = qemu::check_qemu() {
        panic!("{e}");
    }
    boot::build::kernel().unwrap_or_else(|e| panic!("{e}"))
}

/// Boots with `cmdline` and returns the outcome.
pub fn boot(cmdline: &str, mem_bytes: u64, timeout: Duration) -> Outcome {
    let config = Config {
        mem_bytes,
        timeout,
        ..Config::new(&kernel(), cmdline)
    };
    qemu::run(&config, |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// One kernel test as listed by the kernel.
#[derive(Debug, Clone)]
pub struct KernelTest {
    /// Its name.
    pub name: String,
    /// Whether it fails on purpose.
    pub deliberately_fails: bool,
}

/// Asks the kernel for its test list.
pub fn list_kernel_tests() -> Vec<KernelTest> {
    let outcome = boot(
        "scenario=test test=list",
        128 << 20,
        Duration::from_secs(60),
    );
    assert_eq!(
        outcome.verdict,
        Verdict::Passed,
        "listing kernel tests failed:\n{}",
        outcome.tail(20)
    );
    outcome
        .serial
        .lines()
        .filter_map(|line| line.strip_prefix("KTEST-LIST "))
        .filter_map(|rest| rest.split_once(' '))
        .map(|(name, kind)| KernelTest {
            name: name.to_string(),
            deliberately_fails: kind == "deliberate-failure",
        })
        .collect()
}

/// Runs one kernel test; `Ok` only if QEMU exited with the pass code *and*
/// the kernel printed `KTEST-PASS <name>`. The error explains the failure and
/// carries the tail of the serial log.
pub fn run_kernel_test(name: &str, timeout: Duration) -> Result<Outcome, String> {
    let outcome = boot(&format!("scenario=test test={name}"), 128 << 20, timeout);
    let passed_line = outcome.serial.lines().any(|l| {
        l.strip_prefix("KTEST-PASS ")
            .and_then(|r| r.split(' ').next())
            == Some(name)
    });
    if outcome.verdict == Verdict::Passed && passed_line {
        return Ok(outcome);
    }
    let why = outcome
        .serial
        .lines()
        .find(|l| l.starts_with(&format!("KTEST-FAIL {name}")))
        .map(str::to_string)
        .unwrap_or_else(|| format!("kernel test {name}: {}", outcome.verdict));
    Err(format!(
        "{why}\n--- serial (last 25 lines) ---\n{}",
        outcome.tail(25)
    ))
}

/// Per-test timeout: `KERNEL_TEST_TIMEOUT` seconds, default 60.
pub fn test_timeout() -> Duration {
    let secs = std::env::var("KERNEL_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}
