//! Shared helpers for the integration tests: build the kernel once, boot it
//! with a command line, run one in-kernel test and judge it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boot::ktest;
use boot::qemu::{self, Config, Disk, Outcome, Verdict};
use boot::setup::{self, Need};
use snapshot::devices::block::{fill_pattern, READ_ONLY_TEST_SEED};

/// The kernel image, built once per test process, after installing QEMU
/// or the kernel target if the machine lacks them. Panics with the setup
/// error (which names the command to run) if it cannot be built.
pub fn kernel() -> PathBuf {
    if let Err(e) = setup::ensure(&[Need::Qemu, Need::KernelTarget]) {
        panic!("{e}");
    }
    boot::build::kernel().unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a host tool (`qemu-img`, `readelf`, `gdb` ...), installed first if
/// the set-up provides it and it is missing, and returns its standard
/// output; panics, with its output, if it fails or is missing.
pub fn tool(name: &str, args: &[&str]) -> String {
    if let Some(need) = Need::of_tool(name) {
        setup::ensure(&[need]).unwrap_or_else(|e| panic!("{e}"));
    }
    let out = std::process::Command::new(name)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name} ({e}); run: bash scripts/setup"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Boots with `cmdline` and returns the outcome.
pub fn boot(cmdline: &str, mem_bytes: u64, timeout: Duration) -> Outcome {
    boot_with_disks(cmdline, mem_bytes, timeout, Vec::new())
}

/// Boots with `cmdline` and `disks` attached.
pub fn boot_with_disks(
    cmdline: &str,
    mem_bytes: u64,
    timeout: Duration,
    disks: Vec<Disk>,
) -> Outcome {
    boot_on_cpus(cmdline, mem_bytes, timeout, disks, 1)
}

/// Boots with `cmdline` and `disks` attached on `cpus` CPUs.
pub fn boot_on_cpus(
    cmdline: &str,
    mem_bytes: u64,
    timeout: Duration,
    disks: Vec<Disk>,
    cpus: usize,
) -> Outcome {
    let config = Config {
        mem_bytes,
        timeout,
        disks,
        cpus,
        ..Config::new(&kernel(), cmdline)
    };
    qemu::run(&config, |_| {}).unwrap_or_else(|e| panic!("{e}"))
}

/// A disk a kernel test asks for: `serial:MiB[:ro]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The serial the kernel finds it by.
    pub serial: String,
    /// Size in MiB.
    pub mib: u64,
    /// Attached read-only, filled with the read-only test pattern.
    pub read_only: bool,
    /// A sector whose reads and writes fail in the device.
    pub fail_sector: Option<u64>,
}

impl DiskSpec {
    /// Parses `serial:MiB[:ro][:fail=SECTOR]`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(':');
        let serial = parts.next().filter(|s| !s.is_empty());
        let mib = parts.next().and_then(|m| m.parse().ok());
        let (mut read_only, mut fail_sector) = (false, None);
        for flag in parts {
            match flag.strip_prefix("fail=").map(str::parse) {
                _ if flag == "ro" => read_only = true,
                Some(Ok(sector)) => fail_sector = Some(sector),
                _ => return Err(format!("disk spec {spec:?}: unknown flag {flag:?}")),
            }
        }
        match (serial, mib) {
            (Some(serial), Some(mib)) => Ok(DiskSpec {
                serial: serial.into(),
                mib,
                read_only,
                fail_sector,
            }),
            _ => Err(format!(
                "disk spec {spec:?}: want serial:MiB[:ro][:fail=SECTOR]"
            )),
        }
    }
}

/// Makes fresh images for `specs` in `dir` (emptied first): zeros, or the
/// read-only pattern for read-only disks.
pub fn make_images(dir: &Path, specs: &[DiskSpec]) -> Vec<Disk> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    specs
        .iter()
        .map(|spec| {
            let path = dir.join(format!("{}.img", spec.serial));
            let mut file =
                std::fs::File::create(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            if spec.read_only {
                let mut chunk = vec![0u8; 1 << 20];
                for mib in 0..spec.mib {
                    fill_pattern(READ_ONLY_TEST_SEED, mib * 2048, &mut chunk);
                    file.write_all(&chunk).expect("write image");
                }
            } else {
                file.set_len(spec.mib << 20).expect("size image");
            }
            Disk {
                read_only: spec.read_only,
                fail_sector: spec.fail_sector,
                ..Disk::new(path, &spec.serial)
            }
        })
        .collect()
}

/// Where a kernel test's disk images live.
pub fn image_dir(test: &str) -> PathBuf {
    boot::workspace_root()
        .join("target/ktest-disks")
        .join(test.replace("::", "-"))
}

/// One kernel test as listed by the kernel.
#[derive(Debug, Clone)]
pub struct KernelTest {
    /// Its name.
    pub name: String,
    /// Whether it fails on purpose.
    pub deliberately_fails: bool,
    /// The disks it needs.
    pub disks: Vec<DiskSpec>,
}

/// Asks the kernel for its test list.
pub fn list_kernel_tests() -> Vec<KernelTest> {
    let outcome = boot("scenario=test test=list", 128 << 20, HANG);
    assert_eq!(
        outcome.verdict,
        Verdict::Passed,
        "listing kernel tests failed:\n{}",
        outcome.tail(20)
    );
    ktest::lines(&outcome.serial)
        .filter_map(|line| match line {
            ktest::Line::List {
                name,
                deliberately_fails,
                disks,
            } => Some(KernelTest {
                name: name.to_string(),
                deliberately_fails,
                disks: disks
                    .map(|list| {
                        list.split(',')
                            .map(|spec| {
                                DiskSpec::parse(spec).unwrap_or_else(|e| panic!("{name}: {e}"))
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            }),
            _ => None,
        })
        .collect()
}

/// Runs one kernel test; `Ok` only if QEMU exited with the pass code *and*
/// the kernel printed `KTEST-PASS <name>`. The error explains the failure and
/// carries the tail of the serial log.
pub fn run_kernel_test(name: &str, timeout: Duration) -> Result<Outcome, String> {
    run_kernel_test_with_disks(name, &[], timeout)
}

/// [`run_kernel_test`] with fresh images for `disks` in [`image_dir`].
pub fn run_kernel_test_with_disks(
    name: &str,
    disks: &[DiskSpec],
    timeout: Duration,
) -> Result<Outcome, String> {
    run_kernel_test_on_cpus(name, disks, 1, timeout)
}

/// [`run_kernel_test_with_disks`] on `cpus` CPUs; the kernel is told how
/// many to expect (`expect_cpus=`). Images go to a folder per CPU count, so
/// the same test at two counts may run at once.
pub fn run_kernel_test_on_cpus(
    name: &str,
    disks: &[DiskSpec],
    cpus: usize,
    timeout: Duration,
) -> Result<Outcome, String> {
    let images = if disks.is_empty() {
        Vec::new()
    } else if cpus == 1 {
        make_images(&image_dir(name), disks)
    } else {
        make_images(&image_dir(&format!("{name}@{cpus}cpus")), disks)
    };
    // Disk tests move megabytes through the heap (a sixteenth of RAM).
    let mem = if disks.is_empty() {
        128 << 20
    } else {
        256 << 20
    };
    let cmdline = format!("scenario=test expect_cpus={cpus} test={name}");
    let outcome = boot_on_cpus(&cmdline, mem, timeout, images, cpus);
    let passed_line = ktest::lines(&outcome.serial).any(|l| l == ktest::Line::Pass(name));
    if outcome.verdict == Verdict::Passed && passed_line {
        return Ok(outcome);
    }
    let why = ktest::lines(&outcome.serial)
        .find_map(|l| match l {
            ktest::Line::Fail { name: n, why } if n == name => {
                Some(format!("KTEST-FAIL {name}: {why}"))
            }
            _ => None,
        })
        .unwrap_or_else(|| format!("kernel test {name}: {}", outcome.verdict));
    Err(format!(
        "{why}\n--- serial (last 25 lines) ---\n{}",
        outcome.tail(25)
    ))
}

/// How long a boot may run before it counts as hung. Generous: a busy
/// host slows QEMU many times over (next to two CPU-bound processes and
/// other people's tests, a blk test of seconds passed 60 s), and a timeout
/// only has to tell a hang; no test judges how long a boot took.
pub const HANG: Duration = Duration::from_secs(300);

/// The CPU counts the in-kernel suite runs at: `KERNEL_TEST_CPUS`, a
/// comma-separated list (default `1,2`: every test on one CPU and on two).
pub fn kernel_test_cpus() -> Vec<usize> {
    let text = std::env::var("KERNEL_TEST_CPUS").unwrap_or_else(|_| "1,2".into());
    let counts: Vec<usize> = text
        .split(',')
        .map(|n| {
            n.trim()
                .parse()
                .ok()
                .filter(|&n| n >= 1)
                .unwrap_or_else(|| panic!("KERNEL_TEST_CPUS={text}: want counts like 1,2"))
        })
        .collect();
    assert!(!counts.is_empty(), "KERNEL_TEST_CPUS is empty");
    counts
}

/// Per-test timeout: `KERNEL_TEST_TIMEOUT` seconds, default [`HANG`].
pub fn test_timeout() -> Duration {
    let secs = std::env::var("KERNEL_TEST_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(HANG.as_secs());
    Duration::from_secs(secs)
}

/// What the host tool printed and how it exited.
#[derive(Debug)]
pub struct HostRun {
    /// Its exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    /// Its standard output (the serial console unless `--quiet`).
    pub stdout: String,
    /// Its standard error (progress, summaries, errors).
    pub stderr: String,
}

impl HostRun {
    /// The last non-empty line of standard error.
    pub fn last_line(&self) -> &str {
        self.stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
    }
}

/// Runs the host tool (`cargo run -- ARGS`) as a user does. Built once per
/// test process, in its own target directory so it never waits for the
/// build that runs the tests.
pub fn host_tool(args: &[&str]) -> HostRun {
    host_tool_env(args, &[])
}

/// [`host_tool`] with `env` set in its environment.
pub fn host_tool_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> HostRun {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let binary = BUILT.get_or_init(|| {
        let root = boot::workspace_root();
        let target = root.join("target/host-tool");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-q", "-p", "boot", "--bin", "boot", "--target-dir"])
            .arg(&target)
            .current_dir(&root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the host tool failed");
        target.join("debug/boot")
    });
    let out = std::process::Command::new(binary)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    HostRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
