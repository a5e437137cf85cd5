//! On a machine without QEMU the host tool installs it through
//! `scripts/setup`, saying so on one line, unless `SNAPSHOT_NO_AUTO_SETUP`
//! is set; then it stops with the one-line error naming the command.
//!
//! The machine here is simulated by an empty `PATH`: nothing is found, so
//! nothing is installed (the script's `bash` cannot start either) and the
//! machine's own QEMU is never touched.

use std::ffi::OsStr;

use kernel_tests::{host_tool_env, HostRun};

/// The host tool run with an empty directory, one per test, as its whole
/// `PATH`, and `SNAPSHOT_NO_AUTO_SETUP` set to `no_auto_setup`.
fn run_without_path(test: &str, no_auto_setup: &str) -> HostRun {
    let dir = boot::workspace_root().join("target/empty-path").join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the empty PATH directory");
    host_tool_env(
        &["--quiet"],
        &[
            ("PATH", dir.as_os_str()),
            ("SNAPSHOT_NO_AUTO_SETUP", OsStr::new(no_auto_setup)),
        ],
    )
}

#[test]
fn with_auto_setup_off_a_missing_qemu_stops_with_the_command_to_run() {
    let run = run_without_path("off", "1");
    assert_eq!(run.code, Some(2), "missing setup: {}", run.stderr);
    assert_eq!(
        run.stderr.trim(),
        "error: qemu-system-x86_64 is not installed; run: bash scripts/setup"
    );
}

#[test]
fn a_missing_qemu_is_announced_and_installed_with_the_setup_script() {
    let run = run_without_path("on", "");
    let lines: Vec<&str> = run.stderr.lines().collect();
    // Without rustc on PATH the kernel target counts as missing too.
    let missing = "QEMU and the Rust target x86_64-unknown-none are missing";
    assert_eq!(
        lines.first().copied(),
        Some(
            format!(
                "setup: {missing}; installing them with scripts/setup \
                 (set SNAPSHOT_NO_AUTO_SETUP=1 to stop this)"
            )
            .as_str()
        ),
        "{}",
        run.stderr
    );
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.last_line().starts_with(&format!(
            "error: {missing} and scripts/setup could not start"
        )),
        "{}",
        run.stderr
    );
}
