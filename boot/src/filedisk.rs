//! An image file on the host as a [`BlockDevice`], so the host tool can
//! read images and media with the same library the kernel runs (to check
//! them before booting). Never writes a file it was not opened to write.
//! Also the checks on the files a job names: whether two name the same
//! file, whether one may be written.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use snapshot::devices::block::{
    check, BlockDevice, BlockError, DiskInfo, ErrorKind, Op, SECTOR_SIZE,
};

/// An image file as a block device, the way QEMU shows a raw file: its
/// length rounded up to whole sectors, reading zeros past the end.
#[derive(Debug)]
pub struct FileDisk {
    info: DiskInfo,
    file: File,
    len: u64,
}

impl FileDisk {
    /// Opens `path` for reading (and writing, if `writable`).
    /// A directory is refused by name (Linux opens one for reading, and
    /// only the first read would fail).
    pub fn open(path: &Path, writable: bool) -> std::io::Result<FileDisk> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
        if file.metadata()?.is_dir() {
            return Err(is_a_directory());
        }
        let len = file.metadata()?.len();
        Ok(FileDisk {
            info: DiskInfo {
                name: path.display().to_string(),
                sectors: len.div_ceil(SECTOR_SIZE as u64),
                block_size: 4096,
                read_only: !writable,
                flush: true,
                max_depth: 1,
            },
            file,
            len,
        })
    }

    /// The file's true length (the device shows whole sectors).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn io(&self, sector: u64) -> impl Fn(std::io::Error) -> BlockError + '_ {
        move |_| BlockError::new(&self.info.name, Some(sector), ErrorKind::Io)
    }
}

fn is_a_directory() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::IsADirectory,
        "a directory, not an image file",
    )
}

/// Whether two paths name the same file (when both exist): the same
/// device and inode, so a symbolic or a hard link to a file is that file.
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Whether a job may write the existing file at `path`: not a directory,
/// not read-only by its permission bits (which root, and QEMU run as root,
/// would otherwise ignore), and open for writing.
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    if meta.is_dir() {
        return Err(is_a_directory());
    }
    if meta.permissions().readonly() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "read-only by its permission bits",
        ));
    }
    OpenOptions::new().write(true).open(path).map(drop)
}

impl BlockDevice for FileDisk {
    fn info(&self) -> &DiskInfo {
        &self.info
    }

    fn transfer(&self, ops: &mut [Op<'_>], _depth: usize) -> Result<(), BlockError> {
        for op in ops.iter() {
            check(&self.info, op)?;
        }
        for op in ops.iter_mut() {
            match op {
                Op::Read { sector, buf } => {
                    let at = *sector * SECTOR_SIZE as u64;
                    let have = (self.len.saturating_sub(at) as usize).min(buf.len());
                    self.file
                        .read_exact_at(&mut buf[..have], at)
                        .map_err(self.io(*sector))?;
                    buf[have..].fill(0);
                }
                Op::Write { sector, buf } => self
                    .file
                    .write_all_at(buf, *sector * SECTOR_SIZE as u64)
                    .map_err(self.io(*sector))?,
                Op::Flush => self.file.sync_data().map_err(self.io(0))?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_disk_reads_like_qemu_shows_a_raw_file() {
        let dir = std::env::temp_dir().join(format!("filedisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("odd.bin");
        std::fs::write(&path, vec![7u8; 1000]).unwrap();
        let disk = FileDisk::open(&path, false).unwrap();
        assert_eq!(disk.info().sectors, 2);
        let mut buf = vec![1u8; 1024];
        disk.read(0, &mut buf).unwrap();
        assert!(buf[..1000].iter().all(|&b| b == 7) && buf[1000..].iter().all(|&b| b == 0));
        assert_eq!(
            disk.write(0, &buf[..512]).unwrap_err().kind,
            ErrorKind::ReadOnly
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        crate::scratch_dir(&format!("filedisk-{name}"))
    }

    #[test]
    fn a_directory_is_refused_by_name_not_as_an_io_error() {
        let dir = scratch("dir");
        let e = FileDisk::open(&dir, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::IsADirectory, "{e}");
        assert_eq!(
            check_writable(&dir).unwrap_err().kind(),
            std::io::ErrorKind::IsADirectory
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn links_to_a_file_are_the_same_file() {
        let dir = scratch("links");
        let (a, b) = (dir.join("a.img"), dir.join("b.img"));
        std::fs::write(&a, [1u8; 512]).unwrap();
        std::fs::write(&b, [1u8; 512]).unwrap();
        std::fs::hard_link(&a, dir.join("hard.img")).unwrap();
        std::os::unix::fs::symlink(&a, dir.join("soft.img")).unwrap();
        assert!(same_file(&a, &dir.join("hard.img")));
        assert!(same_file(&dir.join("soft.img"), &a));
        assert!(same_file(&a, &dir.join(".").join("a.img")));
        assert!(!same_file(&a, &b), "equal contents are not the same file");
        assert!(!same_file(&a, &dir.join("missing.img")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_read_only_by_its_bits_is_not_writable_even_for_root() {
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("ro");
        let path = dir.join("ro.img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        check_writable(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = check_writable(&path).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
