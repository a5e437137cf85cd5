//! Booting the kernel in QEMU and reading its verdict.
//!
//! QEMU runs under TCG with the kernel loaded by `-kernel` (PVH), the serial
//! console on stdout, and the `isa-debug-exit` device through which the
//! kernel reports 33 (pass) or 35 (fail). Output is streamed line by line to
//! a callback as it arrives and also kept whole; a run that outlives its
//! timeout is killed.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::SetupError;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// QEMU's exit status when the kernel reports success.
pub const EXIT_PASS: i32 = 33;
/// QEMU's exit status when the kernel reports failure.
pub const EXIT_FAIL: i32 = 35;

/// How to boot.
#[derive(Debug, Clone)]
pub struct Config {
    /// The kernel ELF.
    pub kernel: PathBuf,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// The kernel command line.
    pub cmdline: String,
    /// Kill the run after this long.
    pub timeout: Duration,
    /// virtio-blk disks, in PCI order.
    pub disks: Vec<Disk>,
    /// CPUs (`-smp`), under multi-threaded TCG when more than one.
    pub cpus: usize,
}

/// A raw image file attached as a virtio-blk disk (modern transport only,
/// `disable-legacy=on`); the kernel finds it by `serial`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// The name the kernel sees (at most 20 bytes).
    pub serial: String,
    /// Attach read-only.
    pub read_only: bool,
    /// Make every read and write touching this sector fail with EIO, as
    /// the device reports it to the guest (QEMU's blkdebug driver).
    pub fail_sector: Option<u64>,
    /// Write past the host's page cache (`cache.direct=on`, as QEMU's
    /// `cache=none`) where the file system allows it; see [`direct_io`].
    pub direct: bool,
}

impl Disk {
    /// A writable disk.
    pub fn new(path: impl Into<PathBuf>, serial: &str) -> Self {
        Disk {
            path: path.into(),
            serial: serial.into(),
            read_only: false,
            fail_sector: None,
            direct: false,
        }
    }
}

/// A JSON string literal.
fn json_string(value: &str) -> String {
    let mut out = String::from("\"");
    for c in value.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// QEMU option values separate with commas; a literal comma is doubled.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

impl Config {
    /// 128 MiB, one CPU, 60 s, the given command line.
    pub fn new(kernel: &Path, cmdline: &str) -> Self {
        Config {
            kernel: kernel.to_path_buf(),
            mem_bytes: 128 << 20,
            cmdline: cmdline.to_string(),
            timeout: Duration::from_secs(60),
            disks: Vec::new(),
            cpus: 1,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The kernel exited with its success code.
    Passed,
    /// The kernel exited with its failure code.
    Failed,
    /// QEMU exited with another status: 0 means the guest reset or shut
    /// down (a triple fault with `-no-reboot`), anything else is QEMU's own
    /// error.
    UnexpectedExit(Option<i32>),
    /// Killed after the timeout.
    TimedOut(Duration),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Passed => write!(f, "passed (exit {EXIT_PASS})"),
            Verdict::Failed => write!(f, "failed (kernel reported failure, exit {EXIT_FAIL})"),
            Verdict::UnexpectedExit(Some(0)) => {
                write!(
                    f,
                    "guest reset or shut down without a verdict (triple fault?)"
                )
            }
            Verdict::UnexpectedExit(Some(code)) => write!(f, "QEMU exited with status {code}"),
            Verdict::UnexpectedExit(None) => write!(f, "QEMU was killed by a signal"),
            Verdict::TimedOut(t) => {
                write!(f, "timed out after {:.1} s and was killed", t.as_secs_f64())
            }
        }
    }
}

impl Verdict {
    /// The verdict as the line after a run says it: of the kernel when the
    /// kernel ended the run, of QEMU when QEMU ended without the kernel's
    /// word.
    pub fn headline(&self) -> String {
        match self {
            Verdict::UnexpectedExit(_) => self.to_string(),
            _ => format!("kernel {self}"),
        }
    }
}

/// The result of one boot.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub verdict: Verdict,
    /// Everything the kernel printed on serial.
    pub serial: String,
    /// What QEMU printed on stderr.
    pub stderr: String,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl Outcome {
    /// The last `n` lines of the serial log, for failure reports.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.serial.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Whether a disk asked to be `direct` is attached with `cache.direct=on`:
/// the host's file system must take `O_DIRECT` (tmpfs does not), the
/// file's length must be a whole number of 4 KiB (QEMU refuses to write a
/// direct file whose length is not a multiple of the host's request
/// alignment), and `QEMU_DIRECT=off` turns it off. A medium written once
/// and then synced (the backup's tape) gains from it: the host copies nothing into its
/// page cache, and the closing flush has nothing left to write back
/// (256 MiB on the development machine's disk: 0.27 to 0.51 s direct,
/// 0.71 to 2.84 s through the page cache and `fdatasync`).
pub fn direct_io(path: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    /// `O_DIRECT` on Linux x86_64.
    const O_DIRECT: i32 = 0o40000;
    /// The largest request alignment a host's `O_DIRECT` asks for here.
    const ALIGN: u64 = 4096;
    std::env::var("QEMU_DIRECT").as_deref() != Ok("off")
        && std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(O_DIRECT)
            .open(path)
            .and_then(|f| f.metadata())
            .is_ok_and(|m| m.len() % ALIGN == 0)
}

/// How QEMU submits disk I/O to the host: `io_uring` where the host
/// allows it (probed once with `qemu-io`), else its thread pool. Under
/// io_uring the snapshot to disk at 512 MiB wrote at 1.14 to 1.42 times
/// the sequential-write baseline, against 0.93 to 1.08 with the thread
/// pool (docs/results/memsnap-disk.md, earlier round). `QEMU_AIO=threads` (or
/// `io_uring`) in the environment overrides the probe.
pub fn aio_mode() -> &'static str {
    static MODE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    MODE.get_or_init(|| {
        match std::env::var("QEMU_AIO").as_deref() {
            Ok("threads") => return "threads",
            Ok("io_uring") => return "io_uring",
            _ => {}
        }
        let probe = std::env::temp_dir().join(format!("aio-probe-{}.img", std::process::id()));
        let works = std::fs::write(&probe, [0u8; 4096]).is_ok()
            && Command::new("qemu-io")
                .args(["-f", "raw", "-i", "io_uring", "-c", "read 0 512"])
                .arg(&probe)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        let _ = std::fs::remove_file(&probe);
        if works {
            "io_uring"
        } else {
            "threads"
        }
    })
}

/// Checks that QEMU is installed.
pub fn check_qemu() -> Result<(), SetupError> {
    match Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        _ => Err(SetupError {
            what: format!("{QEMU} is not installed"),
            fix: "bash scripts/setup".into(),
        }),
    }
}

/// The QEMU command line for `config`.
pub fn command(config: &Config) -> Command {
    let mut cmd = Command::new(QEMU);
    let accel = if config.cpus > 1 {
        "tcg,thread=multi"
    } else {
        "tcg"
    };
    cmd.args([
        "-machine",
        "q35",
        "-accel",
        accel,
        "-cpu",
        "max",
        "-nodefaults",
    ])
    .arg("-smp")
    .arg(config.cpus.max(1).to_string())
    .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
    .arg("-m")
    .arg(format!("{}M", config.mem_bytes.div_ceil(1 << 20)))
    .arg("-kernel")
    .arg(&config.kernel)
    .arg("-append")
    .arg(&config.cmdline);
    for (i, disk) in config.disks.iter().enumerate() {
        let path = disk.path.to_string_lossy();
        // The largest queue QEMU offers: a 1 MiB request of 4 KiB pages
        // takes 258 descriptors (the driver has no indirect descriptors),
        // so a 256-entry queue holds one such request at a time.
        // Four request queues (each with its own MSI-X vector): callers
        // sharing a disk each get one, so a small write does not wait for
        // another caller's long batch.
        let mut device = format!(
            "virtio-blk-pci,drive=disk{i},serial={},disable-legacy=on,queue-size=1024,num-queues=4",
            escape(&disk.serial)
        );
        if let Some(sector) = disk.fail_sector {
            // raw over blkdebug over the file: raw's reads and writes fire
            // the events the error rules wait for.
            let rules: Vec<String> = ["read_aio", "write_aio"]
                .iter()
                .map(|event| format!(r#"{{"event":"{event}","sector":{sector},"errno":5}}"#))
                .collect();
            let node = format!(
                r#"{{"driver":"raw","node-name":"disk{i}","read-only":{},"file":{{"driver":"blkdebug","inject-error":[{}],"image":{{"driver":"file","filename":{}}}}}}}"#,
                disk.read_only,
                rules.join(","),
                json_string(&path)
            );
            cmd.args(["-blockdev", &node]);
        } else {
            let mut drive = format!("file={},if=none,id=disk{i},format=raw", escape(&path));
            if disk.read_only {
                drive.push_str(",readonly=on");
            }
            drive.push_str(",aio=");
            drive.push_str(aio_mode());
            if disk.direct && direct_io(&disk.path) {
                drive.push_str(",cache.direct=on");
            }
            cmd.args(["-drive", &drive]);
        }
        // Errors go to the guest, which names disk and sector and fails
        // the job; QEMU's default stops the whole machine when the host
        // file system is full, and the run then hangs until its timeout.
        device.push_str(",rerror=report,werror=report");
        cmd.args(["-device", &device]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    cmd
}

/// Makes QEMU die (SIGKILL) when the thread that starts it ends: the host
/// tool stopped by a signal (Ctrl-C, `kill`) then leaves no machine running
/// on, reparented, with the user's disks open. So the thread that spawns
/// the command must also wait for it, as [`run_supervised`] does.
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = std::process::id();
    let hook = move || {
        // SAFETY: 1. This runs in the child between fork and exec, where
        //    only async-signal-safe calls are allowed: `prctl` and
        //    `getppid` are plain system calls, and nothing here allocates
        //    or takes a lock.
        // 2. PR_SET_PDEATHSIG takes a signal number and changes nothing
        //    but what the child receives when its parent thread ends.
        let (set, ppid) = unsafe {
            (
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong),
                libc::getppid(),
            )
        };
        if set == -1 {
            return Err(std::io::Error::last_os_error());
        }
        // The parent may have gone before the signal was set up.
        if ppid as u32 != parent {
            return Err(std::io::Error::other("the host tool has exited"));
        }
        Ok(())
    };
    // SAFETY: the hook is async-signal-safe (see inside it) and captures
    // only a copied integer.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Boots and waits for the verdict, handing each serial line to `on_line`
/// as it arrives.
pub fn run(config: &Config, on_line: impl FnMut(&str)) -> Result<Outcome, String> {
    run_killing(config, on_line, |_| false)
}

/// As [`run`], but kills QEMU (SIGKILL, as a power cut would stop the
/// machine) as soon as `kill_at` says yes to a serial line; the verdict
/// is then [`Verdict::UnexpectedExit`]`(None)`. For crash tests.
pub fn run_killing(
    config: &Config,
    on_line: impl FnMut(&str),
    mut kill_at: impl FnMut(&str) -> bool,
) -> Result<Outcome, String> {
    run_supervised(config, on_line, |line| line.is_some_and(&mut kill_at))
}

/// As [`run`], but kills QEMU as soon as `kill` says yes: `kill` is asked
/// with each serial line and, with `None`, at least once a second while
/// the kernel is silent (a watchdog for a kernel that hangs). The verdict
/// is then [`Verdict::UnexpectedExit`]`(None)`.
pub fn run_supervised(
    config: &Config,
    mut on_line: impl FnMut(&str),
    mut kill: impl FnMut(Option<&str>) -> bool,
) -> Result<Outcome, String> {
    check_qemu().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut child = command(config)
        .spawn()
        .map_err(|e| format!("cannot start {QEMU}: {e}"))?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match lines.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf);
                    let line = line.trim_end_matches(['\n', '\r']).to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = started + config.timeout;
    let mut serial = String::new();
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                on_line(&line);
                serial.push_str(&line);
                serial.push('\n');
                if kill(Some(&line)) {
                    let _ = child.kill();
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if kill(None) {
                    let _ = child.kill();
                    break;
                }
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for {QEMU}: {e}"))?;
    let _ = reader.join();
    let stderr = errors.join().unwrap_or_default();
    let verdict = if timed_out {
        Verdict::TimedOut(config.timeout)
    } else {
        match status.code() {
            Some(EXIT_PASS) => Verdict::Passed,
            Some(EXIT_FAIL) => Verdict::Failed,
            other => Verdict::UnexpectedExit(other),
        }
    };
    Ok(Outcome {
        verdict,
        serial,
        stderr,
        elapsed: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_headline_names_who_ended_the_run() {
        assert_eq!(Verdict::Passed.headline(), "kernel passed (exit 33)");
        assert!(Verdict::Failed.headline().starts_with("kernel failed"));
        let killed = Verdict::UnexpectedExit(None).headline();
        assert_eq!(killed, "QEMU was killed by a signal");
        assert_eq!(
            Verdict::UnexpectedExit(Some(1)).headline(),
            "QEMU exited with status 1"
        );
        assert!(Verdict::UnexpectedExit(Some(0))
            .headline()
            .starts_with("guest reset"));
        let late = Verdict::TimedOut(Duration::from_secs(3)).headline();
        assert!(late.starts_with("kernel timed out"), "{late}");
    }
    use super::*;

    /// Every disk reports I/O errors to the guest: with QEMU's default
    /// (`werror=enospc`) a full host file system stops the machine and the
    /// run hangs until its timeout instead of failing with the sector.
    #[test]
    fn every_disk_reports_errors_to_the_guest() {
        let mut config = Config::new(Path::new("kernel"), "");
        config.disks = vec![
            Disk::new("/nonexistent/a.img", "a"),
            Disk {
                fail_sector: Some(8),
                ..Disk::new("/nonexistent/b.img", "b")
            },
        ];
        let cmd = command(&config);
        let devices: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .filter(|a| a.starts_with("virtio-blk-pci,"))
            .collect();
        assert_eq!(devices.len(), 2, "{devices:?}");
        for d in &devices {
            assert!(d.contains(",rerror=report,werror=report"), "{d}");
        }
    }
}
