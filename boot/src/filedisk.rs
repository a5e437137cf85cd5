//! An image file on the host as a [`BlockDevice`], so the host tool can
//! read images and media with the same library the kernel runs (to check
//! them before booting). Never writes a file it was not opened to write.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
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
    pub fn open(path: &Path, writable: bool) -> std::io::Result<FileDisk> {
        let file = OpenOptions::new().read(true).write(writable).open(path)?;
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
}
