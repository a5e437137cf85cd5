//! The scenarios one kernel image runs, described once for the host tool
//! and the kernel: each scenario's name (the host's command word and the
//! value of `scenario=` on the kernel command line), its argument and host
//! options, the kernel parameters it reads, a one-line help, and the trace
//! events it emits. The host generates its usage text and checks its
//! options from [`ALL`]; the kernel dispatches on [`Scenario`].
//!
//! A job that fails ends with a [`JobFailure`] record (`job.failed` or
//! `job.refused`, with the reason as text), which the host prints as its
//! last line.
//!
//! Adding a scenario: a variant of [`Scenario`] and its entry in [`ALL`];
//! the compiler then points at the kernel's dispatcher. Nothing here may
//! allocate or touch a device: the kernel reads it at boot.

use core::fmt;

use crate::interface::cmdline::CmdLine;
use crate::interface::trace::{Record, Value};

/// What a boot does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Memory map, clock, threads, a verified live snapshot (the default).
    Demo,
    /// One in-kernel test, or the list.
    Test,
    /// A CPU exception on purpose.
    Crash,
    /// A live snapshot of all RAM to a disk, as an ELF core file.
    Memsnap,
    /// The live snapshot benchmark.
    BenchMemsnap,
    /// The virtio-blk benchmark.
    BenchBlk,
    /// A compact backup of a qcow2 image to a tape.
    Backup,
    /// A tape back to a disk image.
    Restore,
    /// The backup benchmark.
    BenchBackup,
    /// A mirrored pair: pair, split under a workload, back up the split
    /// instant during the copy, resync.
    Mirror,
    /// The quick-split mirror benchmark.
    BenchMirror,
    /// A new, empty qcow2 clone over a read-only base, served writable.
    Clone,
    /// Fill a clone's holes from its backing chain while a workload runs,
    /// then release the backing file.
    CloneSplit,
    /// The clone split benchmark.
    BenchCloneSplit,
    /// Many live snapshots, each configured from a seed, each verified.
    SoakMemsnap,
}

/// The word after a scenario's name on the host command line, passed to
/// the kernel as `key=word`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argument {
    /// How the usage text shows it (`NAME|list`).
    pub value: &'static str,
    /// Its kernel command-line key (`test`).
    pub key: &'static str,
    /// Whether the host insists on it (else the kernel has a default).
    pub required: bool,
}

/// A host option only some scenarios take (`--out FILE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostOption {
    /// The flag (`--out`).
    pub flag: &'static str,
    /// Its value as the usage text shows it (`FILE`), empty for a switch.
    pub value: &'static str,
    /// Whether the scenario needs it.
    pub required: bool,
}

/// One scenario, as both sides know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Description {
    /// Which.
    pub scenario: Scenario,
    /// The host's command word and the kernel's `scenario=` value.
    pub name: &'static str,
    /// The word after the name, if it takes one.
    pub argument: Option<Argument>,
    /// The scenario-specific host options it takes.
    pub options: &'static [HostOption],
    /// Kernel command-line words it reads, with their defaults.
    pub params: &'static [&'static str],
    /// One line of help.
    pub help: &'static str,
    /// Guest RAM when `--mem` is not given, in MiB.
    pub mem_mib: u64,
    /// A benchmark: prints one `BENCH-JSON` line; wants a quiet host.
    pub benchmark: bool,
    /// The trace events it emits.
    pub emits: &'static [&'static str],
    /// The record a successful run ends with, if any.
    pub ends_with: Option<&'static str>,
}

const fn opt(flag: &'static str, value: &'static str, required: bool) -> HostOption {
    HostOption {
        flag,
        value,
        required,
    }
}

const MEM: u64 = 128;
/// Backup and restore keep the tables of large images in the kernel heap.
const BACKUP_MEM: u64 = 512;
/// The soak's runs are shorter on a smaller machine.
const SOAK_MEM: u64 = 64;

/// Every scenario, in [`Scenario`] order: the usage text lists them so.
pub const ALL: &[Description] = &[
    Description {
        scenario: Scenario::Demo,
        name: "demo",
        argument: None,
        options: &[],
        params: &[],
        help: "boot, memory map, two interleaved threads, a verified live snapshot, traces (default)",
        mem_mib: MEM,
        benchmark: false,
        emits: &["demo.memory", "demo.step", "demo.done", "memsnap.start", "memsnap.burst", "memsnap.progress", "demo.snapshot", FAILED, REFUSED],
        ends_with: Some("demo.snapshot"),
    },
    Description {
        scenario: Scenario::Test,
        name: "test",
        argument: Some(Argument { value: "NAME|list", key: "test", required: true }),
        options: &[],
        params: &[],
        help: "run one in-kernel test, or list them",
        mem_mib: MEM,
        benchmark: false,
        emits: &[],
        ends_with: None,
    },
    Description {
        scenario: Scenario::Crash,
        name: "crash",
        argument: Some(Argument { value: "KIND", key: "kind", required: false }),
        options: &[],
        params: &[],
        help: "raise a CPU exception on purpose (pf ud de gp bp overflow; default pf)",
        mem_mib: MEM,
        benchmark: false,
        emits: &[],
        ends_with: None,
    },
    Description {
        scenario: Scenario::Memsnap,
        name: "memsnap",
        argument: None,
        options: &[opt("--out", "FILE", true)],
        params: &["disk=snap"],
        help: "live snapshot of all RAM to a disk, left as an ELF core file at FILE (read it with gdb, readelf)",
        mem_mib: MEM,
        benchmark: false,
        emits: &["memsnap.start", "memsnap.burst", "blk.batch", "memsnap.core", FAILED, REFUSED],
        ends_with: Some("memsnap.core"),
    },
    Description {
        scenario: Scenario::BenchMemsnap,
        name: "bench-memsnap",
        argument: None,
        options: &[opt("--to-disk", "", false)],
        params: &["copier_share=PCT", "verify=on", "to_disk=NAME"],
        help: "live memory snapshot benchmark (use --mem, --json, --to-disk)",
        mem_mib: MEM,
        benchmark: true,
        emits: &["memsnap.start", "memsnap.burst", "memsnap.progress"],
        ends_with: None,
    },
    Description {
        scenario: Scenario::BenchBlk,
        name: "bench-blk",
        argument: None,
        options: &[opt("--image", "FILE", false)],
        params: &["blk=poll"],
        help: "virtio-blk benchmark on a fresh raw image (use --json, --image, --image-size)",
        mem_mib: MEM,
        benchmark: true,
        emits: &["bench.blk", "blk.disk", "blk.disk_time"],
        ends_with: None,
    },
    Description {
        scenario: Scenario::Backup,
        name: "backup",
        argument: None,
        options: &[opt("--source", "IMG.qcow2", true), opt("--tape", "FILE", true)],
        params: &["source=source", "tape=tape", "overlap=on"],
        help: "compact backup of a qcow2 image: only its data, with the tables to restore it, streamed to FILE",
        mem_mib: BACKUP_MEM,
        benchmark: false,
        emits: &["backup.progress", "backup.done", FAILED, REFUSED],
        ends_with: Some("backup.done"),
    },
    Description {
        scenario: Scenario::Restore,
        name: "restore",
        argument: None,
        options: &[opt("--tape", "FILE", true), opt("--out", "IMG", true), opt("--format", "raw|qcow2", false)],
        params: &["tape=tape", "out=out", "format=raw"],
        help: "a backup back to a new disk image (default raw)",
        mem_mib: BACKUP_MEM,
        benchmark: false,
        emits: &["backup.progress", "restore.done", FAILED, REFUSED],
        ends_with: Some("restore.done"),
    },
    Description {
        scenario: Scenario::BenchBackup,
        name: "bench-backup",
        argument: None,
        options: &[opt("--spread", "", false)],
        params: &["spread=NAME"],
        help: "backup of 256 MiB scattered in a 4 GiB disk vs an all-data backup and qemu-img convert (use --json, --spread)",
        mem_mib: BACKUP_MEM,
        benchmark: true,
        emits: &["backup.progress", "blk.disk", "blk.disk_time"],
        ends_with: None,
    },
    Description {
        scenario: Scenario::Mirror,
        name: "mirror",
        argument: None,
        options: &[
            opt("--primary", "P", true),
            opt("--secondary", "S", true),
            opt("--tape", "FILE", true),
            opt("--via", "MODE", false),
            opt("--workload", "on|off", false),
        ],
        params: &["primary=primary", "secondary=secondary", "control=control", "tape=tape", "via=secondary", "workload=on", "verify=on", "presync=on", "seed=1", "batch=64"],
        help: "pair (resync), split under a write workload, back up the split instant during the copy to FILE, resync",
        mem_mib: BACKUP_MEM,
        benchmark: false,
        emits: &["mirror.opened", "mirror.progress", "mirror.split", "mirror.backup", "mirror.done", FAILED, REFUSED],
        ends_with: Some("mirror.done"),
    },
    Description {
        scenario: Scenario::BenchMirror,
        name: "bench-mirror",
        argument: None,
        options: &[opt("--volume", "SIZE", false)],
        params: &["batch=64"],
        help: "quick split of a 256 MiB pair (--volume), 1/4 differential: backup during the copy vs copy-then-backup (use --json)",
        mem_mib: BACKUP_MEM,
        benchmark: true,
        emits: &["mirror.progress"],
        ends_with: None,
    },
    Description {
        scenario: Scenario::Clone,
        name: "clone",
        argument: None,
        options: &[opt("--base", "IMG", true), opt("--out", "CLONE.qcow2", true), opt("--format", "raw|qcow2", false)],
        params: &["clone=clone", "back1=back1"],
        help: "a new, empty qcow2 clone of a qcow2 or raw base (--format, else its first bytes), writable over the read-only base",
        mem_mib: BACKUP_MEM,
        benchmark: false,
        emits: &["clone.ready", FAILED, REFUSED],
        ends_with: Some("clone.ready"),
    },
    Description {
        scenario: Scenario::CloneSplit,
        name: "clone-split",
        argument: None,
        options: &[opt("--image", "CLONE.qcow2", true), opt("--workload", "on|off", false)],
        params: &["clone=clone", "share=100", "floor=50", "workload=off", "seed=0xc10e"],
        help: "fill a clone's holes from its backing chain (read-only) while it serves I/O, then drop the backing file",
        mem_mib: BACKUP_MEM,
        benchmark: false,
        emits: &["clone.progress", "clone.split", FAILED, REFUSED],
        ends_with: Some("clone.split"),
    },
    Description {
        scenario: Scenario::BenchCloneSplit,
        name: "bench-clone-split",
        argument: None,
        options: &[],
        params: &["share=100", "floor=50"],
        help: "clone split of a 4 GiB base with 1 GiB of data under a workload, against qemu-img rebase (use --json)",
        mem_mib: BACKUP_MEM,
        benchmark: true,
        emits: &["clone.progress", "clone.split", "blk.batch"],
        ends_with: None,
    },
    Description {
        scenario: Scenario::SoakMemsnap,
        name: "soak-memsnap",
        argument: None,
        options: &[opt("--runs", "N", false), opt("--seed", "S", false), opt("--run-timeout", "SECS", false)],
        params: &["seed=1", "first=0", "runs=1", "disk=snap", "dma=dma", "soak_inject=off"],
        help: "live snapshots configured from a seed, each verified; a line per failure with its seed, a summary",
        mem_mib: SOAK_MEM,
        benchmark: false,
        emits: &[crate::memsnap::soak::BEGIN, crate::memsnap::soak::RUN, "memsnap.start", "memsnap.burst"],
        ends_with: None,
    },
];

/// The kernel command-line key that names the scenario.
pub const KEY: &str = "scenario";

/// The kinds `crash KIND` raises (`crash`'s help lists them too; a test
/// keeps the two in step).
pub const CRASH_KINDS: &[&str] = &["pf", "ud", "de", "gp", "bp", "overflow"];

impl Scenario {
    /// The scenario when none is named.
    pub const DEFAULT: Scenario = Scenario::Demo;

    /// Its description.
    pub fn describe(self) -> &'static Description {
        &ALL[self as usize]
    }

    /// Its name: the host's command word, the kernel's `scenario=` value.
    pub fn name(self) -> &'static str {
        self.describe().name
    }

    /// The scenario called `name`.
    pub fn parse(name: &str) -> Option<Scenario> {
        ALL.iter().find(|d| d.name == name).map(|d| d.scenario)
    }

    /// The scenario the kernel command line names ([`KEY`]), the default
    /// when it names none.
    pub fn from_cmdline<'a>(cmd: &CmdLine<'a>) -> Result<Scenario, Unknown<'a>> {
        match cmd.get(KEY) {
            None => Ok(Scenario::DEFAULT),
            Some(name) => Scenario::parse(name).ok_or(Unknown(name)),
        }
    }

    /// The kernel command-line words (`key`, `value`) that select it, with
    /// its argument if given.
    pub fn cmdline(self, argument: Option<&str>) -> impl Iterator<Item = (&'static str, &str)> {
        let arg = self.describe().argument.zip(argument);
        core::iter::once((KEY, self.name())).chain(arg.map(|(a, word)| (a.key, word)))
    }

    /// The host option `flag` as this scenario takes it, if it does.
    pub fn option(self, flag: &str) -> Option<&'static HostOption> {
        self.describe().options.iter().find(|o| o.flag == flag)
    }
}

/// The usage line of a scenario: `restore --tape FILE --out IMG [--format raw|qcow2]`.
impl fmt::Display for Description {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)?;
        if let Some(a) = self.argument {
            write!(f, " {}", a.value)?;
        }
        for o in self.options {
            let (open, close) = if o.required { ("", "") } else { ("[", "]") };
            let space = if o.value.is_empty() { "" } else { " " };
            write!(f, " {open}{}{space}{}{close}", o.flag, o.value)?;
        }
        Ok(())
    }
}

/// A `scenario=` value no scenario has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unknown<'a>(pub &'a str);

impl fmt::Display for Unknown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unknown scenario {:?}; known scenarios:", self.0)?;
        for (i, d) in ALL.iter().enumerate() {
            write!(f, "{}{}", if i == 0 { " " } else { ", " }, d.name)?;
        }
        Ok(())
    }
}

/// The event of a job that failed while running.
pub const FAILED: &str = "job.failed";
/// The event of a job that refused its input.
pub const REFUSED: &str = "job.refused";

/// Why a job (`backup`, `restore`, `memsnap`) did not complete: the record
/// `job.failed` or `job.refused` with `job=NAME reason="..."`. Shown as
/// `restore refused: bad checksum: extent 4 (...)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobFailure<'a> {
    /// The job's name.
    pub job: &'a str,
    /// It refused its input (rather than failing while running).
    pub refused: bool,
    /// Why, in words.
    pub reason: &'a str,
}

impl<'a> JobFailure<'a> {
    /// The record's event name.
    pub fn event(&self) -> &'static str {
        if self.refused {
            REFUSED
        } else {
            FAILED
        }
    }

    /// The record's fields.
    pub fn fields(&self) -> [(&'static str, Value<'a>); 2] {
        [
            ("job", Value::Word(self.job)),
            ("reason", Value::Text(self.reason)),
        ]
    }

    /// The failure a record reports, if it is a well-formed failure record.
    pub fn from_record(record: &Record<'a>) -> Option<Self> {
        let refused = match record.event {
            FAILED => false,
            REFUSED => true,
            _ => return None,
        };
        Some(JobFailure {
            job: record.str("job")?,
            refused,
            reason: record.str("reason")?,
        })
    }
}

impl fmt::Display for JobFailure<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = if self.refused { "refused" } else { "failed" };
        write!(f, "{} {how}: {}", self.job, self.reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interface::trace::{parse_line, write_record};
    use proptest::prelude::*;
    use std::string::{String, ToString};
    use std::vec::Vec;

    #[test]
    fn the_table_is_in_variant_order_with_unique_names() {
        for (i, d) in ALL.iter().enumerate() {
            assert_eq!(d.scenario as usize, i, "{}", d.name);
            assert_eq!(Scenario::parse(d.name), Some(d.scenario));
            assert!(d.help.len() < 120 && !d.help.contains('\n'), "{}", d.name);
        }
        let mut names: Vec<_> = ALL.iter().map(|d| d.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }

    #[test]
    fn the_kernel_command_line_selects_and_defaults() {
        let scenario = |line| Scenario::from_cmdline(&CmdLine::new(line));
        assert_eq!(scenario("quiet"), Ok(Scenario::Demo));
        assert_eq!(scenario("scenario=bench-blk"), Ok(Scenario::BenchBlk));
        let err = scenario("scenario=nonsense").unwrap_err().to_string();
        assert!(err.starts_with("unknown scenario \"nonsense\"; known scenarios: demo, test,"));
        let words: Vec<_> = Scenario::Test.cmdline(Some("list")).collect();
        assert_eq!(words, [("scenario", "test"), ("test", "list")]);
        assert_eq!(Scenario::Demo.cmdline(Some("x")).count(), 1);
    }

    #[test]
    fn usage_lines_show_arguments_and_options() {
        let line = |s: Scenario| s.describe().to_string();
        assert_eq!(line(Scenario::Test), "test NAME|list");
        assert_eq!(line(Scenario::Memsnap), "memsnap --out FILE");
        assert_eq!(
            line(Scenario::Restore),
            "restore --tape FILE --out IMG [--format raw|qcow2]"
        );
        assert_eq!(line(Scenario::BenchMemsnap), "bench-memsnap [--to-disk]");
    }

    #[test]
    fn only_failure_records_with_a_job_and_reason_are_failures() {
        let rec = |l: &'static str| parse_line(l).unwrap().unwrap();
        let none = |l| JobFailure::from_record(&rec(l));
        assert_eq!(none("TRACE 1 backup.done medium_bytes=4"), None);
        assert_eq!(none("TRACE 1 job.failed job=backup"), None);
        assert_eq!(none("TRACE 1 job.failed reason=\"x\""), None);
        let f = JobFailure::from_record(&rec(
            "TRACE 1 job.refused job=restore reason=\"bad checksum: trailer\"",
        ))
        .unwrap();
        assert_eq!(f.to_string(), "restore refused: bad checksum: trailer");
    }

    proptest! {
        #[test]
        fn failures_round_trip(
            job in "[a-z][a-z-]{0,10}",
            refused in any::<bool>(),
            reason in "[^\"\\p{Cc}]{0,60}",
        ) {
            let failure = JobFailure { job: &job, refused, reason: &reason };
            let mut line = String::new();
            write_record(&mut line, 7, failure.event(), &failure.fields()).unwrap();
            let record = parse_line(&line).unwrap().unwrap();
            prop_assert_eq!(JobFailure::from_record(&record), Some(failure));
        }
    }
}
