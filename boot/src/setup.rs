//! Installing what a run needs when the machine lacks it, so that
//! `cargo run` and `cargo test` are the only commands a user types.
//!
//! The one installer is `scripts/setup` (QEMU, gdb and binutils, the
//! pinned toolchain's kernel target); this module checks, says on one line
//! what is missing, and runs the script. It must never install anything
//! when [`NO_AUTO_SETUP`] is set (the run then stops with the one-line
//! error naming the command), never run the script twice at once (test
//! processes and threads take an exclusive lock on `target/setup.lock`
//! and check again once they hold it), and never install anything the
//! script would not.

use std::fs::File;
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::{build, qemu, workspace_root, SetupError};

/// Set (to anything but `0` or nothing) to stop automatic set-up.
pub const NO_AUTO_SETUP: &str = "SNAPSHOT_NO_AUTO_SETUP";

/// Something a run needs from the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// `qemu-system-x86_64`, and `qemu-img` and `qemu-io` beside it.
    Qemu,
    /// The pinned toolchain's `x86_64-unknown-none` target.
    KernelTarget,
    /// `gdb` and `readelf`, to read snapshot core files.
    CoreTools,
}

impl Need {
    /// What a user calls it.
    pub fn name(self) -> &'static str {
        match self {
            Need::Qemu => "QEMU",
            Need::KernelTarget => "the Rust target x86_64-unknown-none",
            Need::CoreTools => "gdb/readelf",
        }
    }

    /// The need a host tool belongs to, if the set-up installs it.
    pub fn of_tool(tool: &str) -> Option<Need> {
        match tool {
            qemu::QEMU | "qemu-img" | "qemu-io" => Some(Need::Qemu),
            "gdb" | "readelf" => Some(Need::CoreTools),
            _ => None,
        }
    }

    /// `Ok` if the machine has it, else what is missing and the fix.
    pub fn check(self) -> Result<(), SetupError> {
        match self {
            Need::Qemu => {
                qemu::check_qemu()?;
                runs("qemu-img", "bash scripts/setup")
            }
            Need::KernelTarget => build::check_toolchain(),
            Need::CoreTools => {
                runs("gdb", "bash scripts/setup")?;
                runs("readelf", "bash scripts/setup")
            }
        }
    }
}

/// `Ok` if `tool --version` runs.
fn runs(tool: &str, fix: &str) -> Result<(), SetupError> {
    let ran = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    match ran {
        Ok(status) if status.success() => Ok(()),
        _ => Err(SetupError {
            what: format!("{tool} is not installed"),
            fix: fix.into(),
        }),
    }
}

/// Whether [`NO_AUTO_SETUP`] turns automatic set-up off.
pub fn auto_setup_off() -> bool {
    std::env::var_os(NO_AUTO_SETUP).is_some_and(|v| !v.is_empty() && v != "0")
}

/// The needs among `needs` the machine lacks, with why. A need found
/// present once is not checked again in this process (each check starts
/// the tools; `ensure` runs before every tool a test or a bench calls).
fn missing(needs: &[Need]) -> Vec<(Need, SetupError)> {
    // One flag per need: a new need must grow the array.
    const NEEDS: usize = Need::CoreTools as usize + 1;
    static PRESENT: [AtomicBool; NEEDS] = [const { AtomicBool::new(false) }; NEEDS];
    needs
        .iter()
        .filter(|&&need| !PRESENT[need as usize].load(Ordering::Relaxed))
        .filter_map(|&need| match need.check() {
            Ok(()) => {
                PRESENT[need as usize].store(true, Ordering::Relaxed);
                None
            }
            Err(e) => Some((need, e)),
        })
        .collect()
}

/// The announcement: `QEMU is missing`, `QEMU and gdb/readelf are missing`.
fn missing_line(missing: &[(Need, SetupError)]) -> String {
    let names: Vec<&str> = missing.iter().map(|(need, _)| need.name()).collect();
    let verb = if names.len() == 1 { "is" } else { "are" };
    format!("{} {verb} missing", names.join(" and "))
}

/// Makes sure the machine has `needs`, running `scripts/setup` (once,
/// under the lock) for what it lacks and saying so on one line on stderr.
/// The error names what is still missing and the command that fixes it.
pub fn ensure(needs: &[Need]) -> Result<(), SetupError> {
    let first = missing(needs);
    let Some((_, error)) = first.first() else {
        return Ok(());
    };
    if auto_setup_off() {
        return Err(error.clone());
    }
    let _lock = lock()?;
    // Another process may have installed it while this one waited.
    let now = missing(needs);
    if now.is_empty() {
        return Ok(());
    }
    let what = missing_line(&now);
    let them = if now.len() == 1 { "it" } else { "them" };
    // Straight to the stream, not through `eprintln!`, which the test
    // harness would hold back with the output of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "setup: {what}; installing {them} with scripts/setup (set {NO_AUTO_SETUP}=1 to stop this)"
    );
    let script = workspace_root().join("scripts/setup");
    let status = Command::new("bash")
        .arg(&script)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        // The script's progress goes where ours does, never into the
        // output a caller parses.
        .stdout(std::io::stderr())
        .status();
    match status {
        Ok(s) if s.success() => match missing(needs).into_iter().next() {
            None => Ok(()),
            Some((_, e)) => Err(SetupError {
                what: format!("{} even after scripts/setup", e.what),
                fix: e.fix,
            }),
        },
        ran => Err(SetupError {
            what: match ran {
                Ok(s) => format!("{what} and scripts/setup failed ({s})"),
                Err(e) => format!("{what} and scripts/setup could not start ({e})"),
            },
            fix: "bash scripts/setup".into(),
        }),
    }
}

/// An exclusive lock on `target/setup.lock`, held until dropped: one
/// installer at a time across threads and processes.
fn lock() -> Result<File, SetupError> {
    let failed = |e: std::io::Error| SetupError {
        what: format!("cannot lock target/setup.lock ({e})"),
        fix: "bash scripts/setup".into(),
    };
    let dir = workspace_root().join("target");
    std::fs::create_dir_all(&dir).map_err(failed)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("setup.lock"))
        .map_err(failed)?;
    file.lock().map_err(failed)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_map_to_what_installs_them() {
        assert_eq!(Need::of_tool("qemu-img"), Some(Need::Qemu));
        assert_eq!(Need::of_tool(qemu::QEMU), Some(Need::Qemu));
        assert_eq!(Need::of_tool("readelf"), Some(Need::CoreTools));
        assert_eq!(Need::of_tool("sh"), None);
    }

    #[test]
    fn the_announcement_names_what_is_missing() {
        let e = SetupError {
            what: String::new(),
            fix: String::new(),
        };
        let one = [(Need::Qemu, e.clone())];
        assert_eq!(missing_line(&one), "QEMU is missing");
        let two = [(Need::Qemu, e.clone()), (Need::CoreTools, e)];
        assert_eq!(missing_line(&two), "QEMU and gdb/readelf are missing");
    }

    #[test]
    fn a_missing_tool_names_the_fix() {
        let e = runs("no-such-tool-here", "bash scripts/setup").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no-such-tool-here is not installed; run: bash scripts/setup"
        );
        assert_eq!(runs("cargo", "x"), Ok(()), "cargo runs: it runs this test");
    }
}
