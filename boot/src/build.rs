//! Building the kernel image for `x86_64-unknown-none`.
//!
//! The kernel is a workspace member that only builds for bare metal, so it is
//! built here, on demand, with its own target directory (`target/kernel`) so
//! this never contends with the host build that is running us.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use crate::{workspace_root, SetupError};

/// The kernel's Rust target.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Checks that the pinned toolchain has the kernel target installed.
pub fn check_toolchain() -> Result<(), SetupError> {
    let fix = || SetupError {
        what: format!("the Rust target {KERNEL_TARGET} is not installed"),
        fix: "rustup toolchain install".into(),
    };
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(workspace_root())
        .output()
        .map_err(|_| SetupError {
            what: "rustc is not on PATH".into(),
            fix: "rustup toolchain install".into(),
        })?;
    if !out.status.success() {
        return Err(fix());
    }
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let lib = Path::new(&sysroot).join("lib/rustlib").join(KERNEL_TARGET);
    if lib.is_dir() {
        Ok(())
    } else {
        Err(fix())
    }
}

/// Builds the kernel (release profile) and returns the ELF's path. Cargo's
/// own progress goes to stderr. Built once per process.
pub fn kernel() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT.get_or_init(build_kernel).clone()
}

fn build_kernel() -> Result<PathBuf, String> {
    check_toolchain().map_err(|e| e.to_string())?;
    let root = workspace_root();
    let target_dir = root.join("target/kernel");
    let status = Command::new(cargo())
        .args([
            "build",
            "--release",
            "-p",
            "kernel",
            "--target",
            KERNEL_TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        // Flags meant for host builds must not leak into the kernel build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .status()
        .map_err(|e| format!("cannot run cargo to build the kernel: {e}"))?;
    if !status.success() {
        return Err(format!("building the kernel failed ({status})"));
    }
    Ok(target_dir.join(KERNEL_TARGET).join("release/kernel"))
}
