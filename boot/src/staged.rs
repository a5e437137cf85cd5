//! Output files written whole or not at all.
//!
//! A backup's tape, a restore's image and a mirror run's tape are written by
//! the guest through a disk QEMU opens by path. The guest writes a staging
//! file beside the one the user named (`.NAME.partial`, same directory, so
//! the final step is a rename on one file system); only a run that
//! completed renames it over the user's path. A failed or killed run leaves
//! what was at that path before, untouched, and at most a stale staging
//! file that the next run replaces.
//!
//! Must never remove or truncate the user's own path: only the staging file.

use std::path::{Path, PathBuf};

/// An output being written: where the guest writes, and where it goes.
#[derive(Debug, Clone)]
pub struct Staged {
    /// The path the user named.
    pub target: PathBuf,
    /// The staging file the guest's disk is attached to.
    pub partial: PathBuf,
}

impl Staged {
    /// Stages `target`: names its staging file, made and removed at once
    /// to see that its directory takes one (nothing is left).
    /// A target in a directory that does not exist or takes no new file,
    /// or read-only by its permission bits, is refused.
    /// A target that is a link stages beside the file it names, which the
    /// commit then replaces; a target that exists but is not a regular file
    /// is refused.
    pub fn new(target: &Path) -> Result<Self, String> {
        let target = match std::fs::metadata(target) {
            Ok(m) if !m.is_file() => {
                return Err(format!("{} exists and is not a file", target.display()))
            }
            // Root (and QEMU run as root) would replace it all the same.
            Ok(m) if m.permissions().readonly() => {
                return Err(format!(
                    "{} is read-only by its permission bits; it is left as it is",
                    target.display()
                ))
            }
            Ok(_) => {
                std::fs::canonicalize(target).map_err(|e| format!("{}: {e}", target.display()))?
            }
            Err(_) => target.to_path_buf(),
        };
        let name = target
            .file_name()
            .ok_or_else(|| format!("{}: not a file name", target.display()))?;
        // The staging file goes beside the target: its directory must be
        // there (refused now, not after the run that would fill it).
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "{}: no such directory {}",
                target.display(),
                dir.display()
            ));
        }
        let mut partial_name = std::ffi::OsString::from(".");
        partial_name.push(name);
        partial_name.push(".partial");
        let partial = target.with_file_name(partial_name);
        // A directory that takes no new file (a read-only file system,
        // `/proc`) is found now too: the staging file is made and removed.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .and_then(|_| std::fs::remove_file(&partial))
            .map_err(|e| {
                format!(
                    "{}: cannot write a file in {}: {e}",
                    target.display(),
                    dir.display()
                )
            })?;
        Ok(Self { partial, target })
    }

    /// Ends a run: on success puts the staging file at the target; on
    /// failure (or if that fails) removes the staging file.
    pub fn finish<T>(&self, result: Result<T, String>) -> Result<T, String> {
        let result = result.and_then(|v| self.commit().map(|()| v));
        if result.is_err() {
            self.discard();
        }
        result
    }

    /// Puts the finished staging file at the target, replacing what was
    /// there.
    fn commit(&self) -> Result<(), String> {
        std::fs::rename(&self.partial, &self.target)
            .map_err(|e| format!("{}: {e}", self.target.display()))
    }

    /// Removes the staging file; the target keeps what it held before.
    fn discard(&self) {
        let _ = std::fs::remove_file(&self.partial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_only_target_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = crate::scratch_dir("staged-ro");
        let t = d.join("tape");
        std::fs::write(&t, b"old").unwrap();
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = Staged::new(&t).unwrap_err();
        assert!(e.contains("read-only"), "{e}");
        assert_eq!(std::fs::read(&t).unwrap(), b"old");
    }

    #[test]
    fn a_target_in_a_directory_that_takes_no_file_is_refused_and_nothing_is_left() {
        let e = Staged::new(Path::new("/proc/snap.core")).unwrap_err();
        assert!(e.contains("cannot write a file in /proc"), "{e}");
        let d = crate::scratch_dir("staged-probe");
        let staged = Staged::new(&d.join("tape")).unwrap();
        assert!(!staged.partial.exists(), "the probe removes what it made");
    }

    #[test]
    fn a_target_in_a_missing_directory_is_refused() {
        let d = crate::scratch_dir("staged-nodir");
        let e = Staged::new(&d.join("nodir/tape")).unwrap_err();
        assert!(e.contains("no such directory"), "{e}");
        assert!(!d.join("nodir").exists());
        Staged::new(&d.join("tape")).unwrap();
    }

    #[test]
    fn a_discarded_output_leaves_the_old_file_alone() {
        let d = crate::scratch_dir("staged-discard");
        let target = d.join("out.img");
        std::fs::write(&target, b"old").unwrap();
        let s = Staged::new(&target).unwrap();
        std::fs::write(&s.partial, b"half").unwrap();
        assert!(s.finish::<()>(Err("failed".into())).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
        assert!(!s.partial.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_committed_output_replaces_the_old_file() {
        let d = crate::scratch_dir("staged-commit");
        let target = d.join("tape");
        std::fs::write(&target, b"old").unwrap();
        let s = Staged::new(&target).unwrap();
        assert_eq!(s.partial, d.join(".tape.partial"));
        std::fs::write(&s.partial, b"new").unwrap();
        assert_eq!(s.finish(Ok(7)), Ok(7));
        assert_eq!(std::fs::read(&target).unwrap(), b"new");
        assert!(!s.partial.exists());
        let _ = std::fs::remove_dir_all(&d);
    }
}
