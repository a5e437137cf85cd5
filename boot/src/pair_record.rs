//! Which two files a mirror's controller disk pairs, kept by the host
//! beside it (`S.img.mirror.pair`).
//!
//! The kernel sees its volumes only by role ("primary", "secondary"), so
//! only the host can tell that a controller disk is given the files of
//! another pair, or files that changed while no mirror ran: the durable
//! bitmap knows nothing of such changes, and trusting it would call a pair
//! in sync that is not, and back up blocks the primary never held. The
//! record names both files (device and inode) and, once a run has ended,
//! their length and modification time then. A run killed with the host
//! tool leaves the record "running": the kernel's own bitmap is then all
//! there is, as after a power cut.
//!
//! Must never vouch for a pair it cannot: a controller disk without a
//! record, files other than the recorded ones, or files changed since the
//! last run ended are refused, with what to do.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The record's first line: what it is, and its version.
const HEADER: &str = "snapshot-mirror pair 1";

/// A file, whatever path names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

/// A file's length and modification time, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
}

/// One volume as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Volume {
    id: FileId,
    /// After a run ended; `None` while one runs (or was killed).
    stamp: Option<Stamp>,
    /// The path it was paired under (for messages only).
    path: String,
}

impl Volume {
    fn of(path: &Path, stopped: bool) -> Result<Self, String> {
        let m = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            id: FileId {
                dev: m.dev(),
                ino: m.ino(),
            },
            stamp: stopped.then(|| Stamp {
                len: m.size(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            }),
            path: path.display().to_string(),
        })
    }

    fn line(&self, role: &str) -> String {
        let stamp = match self.stamp {
            Some(s) => format!("{} {}", s.len, s.mtime_ns),
            None => "running".to_string(),
        };
        format!(
            "{role} {} {} {stamp} {}",
            self.id.dev, self.id.ino, self.path
        )
    }

    fn parse(line: &str, role: &str) -> Option<Self> {
        let rest = line.strip_prefix(role)?.strip_prefix(' ')?;
        let mut f = rest.splitn(4, ' ');
        let id = FileId {
            dev: f.next()?.parse().ok()?,
            ino: f.next()?.parse().ok()?,
        };
        let third = f.next()?;
        let (stamp, path) = if third == "running" {
            (None, f.next()?)
        } else {
            let mut g = f.next()?.splitn(2, ' ');
            let stamp = Stamp {
                len: third.parse().ok()?,
                mtime_ns: g.next()?.parse().ok()?,
            };
            (Some(stamp), g.next()?)
        };
        Some(Self {
            id,
            stamp,
            path: path.to_string(),
        })
    }
}

/// The record kept beside `control`.
pub fn record_path(control: &Path) -> PathBuf {
    let mut name = control.as_os_str().to_owned();
    name.push(".pair");
    PathBuf::from(name)
}

fn read(record: &Path) -> Result<[Volume; 2], String> {
    let text = std::fs::read_to_string(record).map_err(|e| format!("{}: {e}", record.display()))?;
    let mut lines = text.lines();
    let parsed = (lines.next() == Some(HEADER))
        .then(|| {
            let p = Volume::parse(lines.next()?, "primary")?;
            let s = Volume::parse(lines.next()?, "secondary")?;
            Some([p, s])
        })
        .flatten();
    parsed.ok_or_else(|| format!("{}: not a pair record", record.display()))
}

fn write(control: &Path, volumes: [Volume; 2]) -> Result<(), String> {
    let record = record_path(control);
    let text = format!(
        "{HEADER}\n{}\n{}\n",
        volumes[0].line("primary"),
        volumes[1].line("secondary")
    );
    // Whole or not at all: a new file, then a rename over the old one.
    let mut tmp = record.as_os_str().to_owned();
    tmp.push(".new");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, &record))
        .map_err(|e| format!("{}: {e}", record.display()))
}

/// Checks that the controller disk `control` (which exists) pairs these
/// two files, unchanged since its last run ended.
pub fn check(control: &Path, primary: &Path, secondary: &Path) -> Result<(), String> {
    let record = record_path(control);
    let afresh = format!(
        "delete {} to pair the two afresh (every block is copied again)",
        control.display()
    );
    if !record.exists() {
        return Err(format!(
            "{} holds a pair's state but {} (which files it pairs) is missing; {afresh}",
            control.display(),
            record.display()
        ));
    }
    let recorded = read(&record).map_err(|e| format!("{e}; {afresh}"))?;
    for (was, path, role) in [
        (&recorded[0], primary, "--primary"),
        (&recorded[1], secondary, "--secondary"),
    ] {
        let now = Volume::of(path, was.stamp.is_some())?;
        if now.id != was.id {
            return Err(format!(
                "{} pairs {} as its {}, and {role} {} is another file; {afresh}",
                control.display(),
                was.path,
                &role[2..],
                path.display()
            ));
        }
        if now.stamp != was.stamp {
            return Err(format!(
                "{role} {} changed since the pair's last run ended, outside the mirror \
                 (its bitmap cannot know which blocks); {afresh}",
                path.display()
            ));
        }
    }
    Ok(())
}

/// Records that a run on this pair is starting.
pub fn begin(control: &Path, primary: &Path, secondary: &Path) -> Result<(), String> {
    write(
        control,
        [Volume::of(primary, false)?, Volume::of(secondary, false)?],
    )
}

/// Records that the run has ended (QEMU has exited, whatever the
/// outcome): the files as they are now.
pub fn end(control: &Path, primary: &Path, secondary: &Path) -> Result<(), String> {
    write(
        control,
        [Volume::of(primary, true)?, Volume::of(secondary, true)?],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(test: &str) -> (PathBuf, PathBuf, PathBuf) {
        let d = crate::scratch_dir(test);
        let (p, s, c) = (d.join("p"), d.join("s"), d.join("s.mirror"));
        for f in [&p, &s, &c] {
            std::fs::write(f, [0u8; 512]).unwrap();
        }
        (p, s, c)
    }

    #[test]
    fn a_pair_left_alone_is_accepted_while_running_and_after() {
        let (p, s, c) = pair("pair-ok");
        begin(&c, &p, &s).unwrap();
        check(&c, &p, &s).unwrap();
        std::fs::write(&p, [1u8; 512]).unwrap();
        check(&c, &p, &s).unwrap();
        end(&c, &p, &s).unwrap();
        check(&c, &p, &s).unwrap();
    }

    #[test]
    fn another_file_at_the_same_path_is_refused() {
        let (p, s, c) = pair("pair-other");
        begin(&c, &p, &s).unwrap();
        let moved = p.with_file_name("p.old");
        std::fs::rename(&p, &moved).unwrap();
        std::fs::write(&p, [0u8; 512]).unwrap();
        let e = check(&c, &p, &s).unwrap_err();
        assert!(e.contains("is another file") && e.contains("delete"), "{e}");
        // The recorded file under another name is the pair.
        check(&c, &moved, &s).unwrap();
    }

    #[test]
    fn a_file_changed_after_the_run_ended_is_refused() {
        let (p, s, c) = pair("pair-changed");
        end(&c, &p, &s).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&s, [7u8; 512]).unwrap();
        let e = check(&c, &p, &s).unwrap_err();
        assert!(e.starts_with("--secondary"), "{e}");
        assert!(e.contains("changed since"), "{e}");
    }

    #[test]
    fn a_controller_disk_without_a_record_or_with_a_bad_one_is_refused() {
        let (p, s, c) = pair("pair-missing");
        let e = check(&c, &p, &s).unwrap_err();
        assert!(e.contains("is missing") && e.contains("delete"), "{e}");
        std::fs::write(record_path(&c), "hello\n").unwrap();
        let e = check(&c, &p, &s).unwrap_err();
        assert!(e.contains("not a pair record"), "{e}");
    }

    #[test]
    fn paths_with_spaces_survive_the_record() {
        let d = crate::scratch_dir("pair-spaces");
        let (p, s, c) = (d.join("my p"), d.join("my s"), d.join("my s.mirror"));
        for f in [&p, &s, &c] {
            std::fs::write(f, [0u8; 512]).unwrap();
        }
        end(&c, &p, &s).unwrap();
        let [a, b] = read(&record_path(&c)).unwrap();
        assert_eq!(a.path, p.display().to_string());
        assert_eq!(b.path, s.display().to_string());
        check(&c, &p, &s).unwrap();
    }
}
