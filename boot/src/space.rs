//! Saying "the host's file system is full" when that is why a disk write
//! failed: the guest only sees an I/O error at a sector (QEMU reports the
//! host's `ENOSPC` to it as any write error), and the user would look for
//! a broken disk. The host tries a small write of its own beside the
//! image, in a file it makes and removes; it must never write to a user's
//! image to find out.

use std::io::Write;
use std::path::Path;

use crate::qemu::Disk;

/// For a kernel failure `reason` naming a write error on one of `disks`
/// (`disk "NAME": I/O error at sector N`), a line saying that the file
/// system holding that disk's image is full, if it is.
pub fn full_disk_hint(reason: &str, disks: &[Disk]) -> Option<String> {
    let name = failed_disk(reason)?;
    let disk = disks.iter().find(|d| d.serial == name && !d.read_only)?;
    let dir = disk.path.parent().filter(|d| !d.as_os_str().is_empty())?;
    is_full(dir).then(|| {
        format!(
            "the host's file system holding {} is full (no space left on device): \
             free some space there and run it again",
            dir.display()
        )
    })
}

/// The disk named in a kernel's I/O error (`disk "NAME": I/O error` or
/// `disk 'NAME': I/O error`), if `reason` is one.
fn failed_disk(reason: &str) -> Option<&str> {
    ['"', '\''].into_iter().find_map(|q| {
        let at = reason.find(&format!("disk {q}"))? + 6;
        let rest = &reason[at..];
        let (name, tail) = rest.split_at(rest.find(q)?);
        tail[1..].starts_with(": I/O error").then_some(name)
    })
}

/// Whether a 64 KiB write into a new file in `dir` fails for want of
/// space (the file is removed either way).
fn is_full(dir: &Path) -> bool {
    let probe = dir.join(format!(".space-probe-{}", std::process::id()));
    let Ok(mut file) = std::fs::File::create(&probe) else {
        return false;
    };
    let written = file
        .write_all(&[0u8; 64 << 10])
        .and_then(|()| file.sync_all());
    drop(file);
    let _ = std::fs::remove_file(&probe);
    matches!(written, Err(e) if e.raw_os_error() == Some(28))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_disk_of_an_io_error_only() {
        let said = "backup failed: disk \"tape\": I/O error at sector 9";
        assert_eq!(failed_disk(said), Some("tape"));
        let said = "backup failed: disk 'out': I/O error at sector 102400";
        assert_eq!(failed_disk(said), Some("out"));
        assert_eq!(failed_disk("restore refused: bad checksum: trailer"), None);
        assert_eq!(
            failed_disk("disk \"tape\" too small: needs 5 bytes, has 4"),
            None
        );
    }

    #[test]
    fn a_file_system_with_room_is_not_called_full() {
        let dir = crate::scratch_dir("space");
        let disk = Disk::new(dir.join("tape"), "tape");
        let said = "backup failed: disk \"tape\": I/O error at sector 9";
        assert_eq!(full_disk_hint(said, &[disk]), None);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the probe stayed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
