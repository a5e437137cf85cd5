//! Whether another process has an image open through QEMU, read from the
//! locks QEMU itself takes: its `file` driver holds open-file-description
//! locks on one byte per permission it holds (from byte 100) and one per
//! permission it refuses to share (from byte 200) of every image it opens
//! (QEMU's `raw_apply_lock_bytes`). The host tool asks before it changes an
//! image (grows it, repairs it, cuts it), since the QEMU it starts would
//! only find the lock afterwards, and a change under another process's
//! feet is lost data.
//!
//! It must never take a lock itself: the QEMU it starts next takes them.
//! A process that opened the image with locking off (`-U`, `locking=off`)
//! is not seen, as QEMU does not see it either.

use std::os::fd::AsRawFd;
use std::path::Path;

/// QEMU's lock bytes: 100 + permission bit, 200 + unshared permission bit,
/// for QEMU's permissions (fewer than 100 of them).
const LOCK_START: i64 = 100;
const LOCK_LEN: i64 = 200;

/// Refuses, naming `path`, if a process holds any of QEMU's image locks
/// on it; `doing` says what the tool was about to do.
pub fn check_not_in_use(path: &Path, doing: &str) -> Result<(), String> {
    match held_lock(path)? {
        None => Ok(()),
        Some(byte) => Err(format!(
            "{} is in use: another process holds QEMU's lock on it (byte {byte}); \
             stop it before {doing}; nothing was changed",
            path.display()
        )),
    }
}

/// The first of QEMU's lock bytes some process holds on `path`, if any.
pub fn held_lock(path: &Path) -> Result<Option<i64>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: LOCK_START,
        l_len: LOCK_LEN,
        l_pid: 0,
    };
    // SAFETY: `F_OFD_GETLK` reads and writes only the `flock` passed, which
    // lives across the call; the descriptor is `file`'s, open until the end
    // of this function. It takes no lock (it only asks whether one would
    // conflict), so the QEMU started next finds the file as we found it.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut probe) };
    if rc == -1 {
        return Err(format!(
            "{}: cannot read its locks: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok((probe.l_type != libc::F_UNLCK as libc::c_short).then_some(probe.l_start))
}

/// Whether any byte of `file` from `offset` on holds data (not a hole),
/// as the host's file system reports it (`SEEK_DATA`); a file system that
/// cannot tell says all of it does.
pub fn holds_data_from(file: &std::fs::File, offset: u64) -> bool {
    let Ok(offset) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: `lseek` only moves the descriptor's position (which nothing
    // else here relies on) and reads no memory of ours; the descriptor is
    // `file`'s, open for the whole call.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
    at != -1 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    #[test]
    fn data_past_an_offset_is_seen_and_holes_are_not() {
        let dir = crate::scratch_dir("holds-data");
        let path = dir.join("f");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        file.set_len(64 << 20).unwrap();
        assert!(!holds_data_from(&file, 0), "all hole");
        std::os::unix::fs::FileExt::write_at(&file, b"x", 40 << 20).unwrap();
        assert!(holds_data_from(&file, 1 << 20));
        assert!(!holds_data_from(&file, 48 << 20));
    }

    #[test]
    fn an_image_qemu_io_holds_is_in_use_until_it_quits() {
        let dir = crate::scratch_dir("image-lock");
        let image = dir.join("x.qcow2");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&image)
            .arg("1M")
            .status()
            .unwrap();
        assert!(made.success());
        assert_eq!(check_not_in_use(&image, "splitting it"), Ok(()));
        let mut holder = Command::new("qemu-io")
            .args(["-f", "qcow2"])
            .arg(&image)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // qemu-io has the image open (and locked) once it answers.
        let mut stdin = holder.stdin.take().unwrap();
        writeln!(stdin, "help").unwrap();
        let mut first = [0u8; 1];
        std::io::Read::read_exact(holder.stdout.as_mut().unwrap(), &mut first).unwrap();
        let e = check_not_in_use(&image, "splitting it").unwrap_err();
        assert!(
            e.contains("is in use") && e.contains("before splitting it"),
            "{e}"
        );
        drop(stdin);
        assert!(holder.wait().unwrap().success());
        assert_eq!(check_not_in_use(&image, "splitting it"), Ok(()));
    }
}
