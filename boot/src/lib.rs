//! Host side of the project: builds the kernel, boots it in QEMU, streams and
//! keeps the serial console, maps the kernel's exit codes, enforces timeouts
//! and turns trace records into reports. It is both the `cargo run` tool and
//! the custom test runner behind `cargo test`.
//!
//! It must never guess a verdict: a run passes only if QEMU exits with the
//! kernel's success code (33); a timeout, a reset, a crash of QEMU itself or
//! exit code 35 are failures, each reported as what it is.

pub mod backup;
pub mod bench;
pub mod benchjson;
pub mod build;
pub mod cli;
pub mod clone;
pub mod clonebench;
pub mod corefile;
pub mod filedisk;
pub mod image_lock;
pub mod ktest;
pub mod mirror;
pub mod pair_record;
pub mod qemu;
pub mod report;
pub mod setup;
pub mod soak;
pub mod space;
pub mod staged;
pub mod timeline;
pub mod tracejson;

use std::fmt;
use std::path::PathBuf;

/// The repository root (the workspace this crate belongs to).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("boot/ has a parent")
        .to_path_buf()
}

/// A setup problem the user can fix with one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetupError {
    /// What is missing or broken.
    pub what: String,
    /// The exact command that fixes it.
    pub fix: String,
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}; run: {}", self.what, self.fix)
    }
}

impl std::error::Error for SetupError {}

/// An empty directory of its own for a unit test, under the system's
/// temporary directory (emptied first if a killed run left it).
#[cfg(test)]
pub(crate) fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("boot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
