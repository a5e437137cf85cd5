//! Snapshot core files on the host: tell finished files from unfinished
//! ones and read their layout (`snapshot::memsnap::elfcore` defines the format).

use std::io::Read;
use std::path::Path;

use snapshot::memsnap::elfcore::{self, Core, Kind};

/// Bytes read to find the header region; the notes of any snapshot fit.
const HEADER_PROBE: u64 = 1 << 20;

/// Reads a core file's header region, refusing unfinished and foreign
/// files with a message that says which.
pub fn inspect(path: &Path) -> Result<Core, String> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(HEADER_PROBE).read_to_end(&mut head))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    match elfcore::classify(&head) {
        Kind::Incomplete => {
            return Err(format!(
                "{}: incomplete snapshot (interrupted before it was made durable)",
                path.display()
            ))
        }
        Kind::Unknown => return Err(format!("{}: not a snapshot core file", path.display())),
        Kind::Complete => {}
    }
    elfcore::parse(&head).map_err(|e| format!("{}: {e}", path.display()))
}

/// Copies the first `len` bytes of the disk image `image` (where the
/// kernel wrote the core file) to `out`, then checks the result is a
/// complete core. `progress(done, total)` is called as bytes go. The copy
/// is staged beside `out` and put there only once checked: a failed copy
/// (a full file system, a short core) leaves what `out` held before.
pub fn extract(
    image: &Path,
    len: u64,
    out: &Path,
    progress: impl FnMut(u64, u64),
) -> Result<Core, String> {
    // Refuse before copying anything if the image holds no finished core.
    inspect(image)?;
    let staged = crate::staged::Staged::new(out)?;
    let result =
        copy(image, len, &staged.partial, progress).and_then(|()| inspect(&staged.partial));
    staged.finish(result)
}

/// Copies the first `len` bytes of `image` to a new file `to`, durably.
fn copy(
    image: &Path,
    len: u64,
    to: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<(), String> {
    use std::io::Write;
    let at = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    let from = std::fs::File::open(image).map_err(|e| at(image, e))?;
    let available = from.metadata().map_err(|e| at(image, e))?.len();
    if available < len {
        return Err(format!(
            "{}: {available} bytes, but the kernel reported a {len}-byte core file",
            image.display()
        ));
    }
    let mut from = from.take(len);
    let mut file = std::fs::File::create(to).map_err(|e| at(to, e))?;
    let mut buf = vec![0u8; 8 << 20];
    let mut done = 0;
    loop {
        let n = from.read(&mut buf).map_err(|e| at(image, e))?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).map_err(|e| at(to, e))?;
        done += n as u64;
        progress(done, len);
    }
    file.sync_all().map_err(|e| at(to, e))?;
    if done != len {
        return Err(format!("{}: copied {done} of {len} bytes", to.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::memsnap::elfcore::{header, Load, Registers, INCOMPLETE_MAGIC};
    use std::process::Command;

    fn write_core(path: &Path) -> Vec<u8> {
        let loads = [
            Load {
                vaddr: 0xffff_8000_0000_0000,
                paddr: 0,
                len: 0x3000,
                alias_of: None,
            },
            Load {
                vaddr: 0x20_0000,
                paddr: 0x1000,
                len: 0x1000,
                alias_of: Some(0),
            },
        ];
        let (mut bytes, layout) = header(&loads, &Registers::default(), "pages=3\n").unwrap();
        bytes.extend((0..0x3000u32).map(|i| (i % 251) as u8));
        assert_eq!(bytes.len() as u64, layout.total);
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn readelf_accepts_the_file_and_lists_the_ranges() {
        let dir = crate::workspace_root().join("target/corefile-test");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("core");
        write_core(&path);
        let core = inspect(&path).unwrap();
        assert_eq!(core.loads.len(), 2);
        assert_eq!(core.meta.as_deref(), Some("pages=3\n"));
        match Command::new("readelf").arg("-lW").arg(&path).output() {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                assert!(out.status.success(), "readelf: {text}");
                assert!(text.contains("CORE (Core file)"), "{text}");
                assert_eq!(text.matches("LOAD").count(), 2, "{text}");
                assert!(text.contains("0xffff800000000000"), "{text}");
            }
            Err(e) => eprintln!("readelf not run ({e}); the parser check above stands"),
        }
    }

    #[test]
    fn unfinished_files_are_refused_by_name() {
        let dir = crate::workspace_root().join("target/corefile-test");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("partial");
        let mut bytes = write_core(&path);
        bytes[..16].copy_from_slice(&INCOMPLETE_MAGIC);
        std::fs::write(&path, &bytes).unwrap();
        assert!(inspect(&path).unwrap_err().contains("incomplete snapshot"));
        std::fs::write(&path, b"hello").unwrap();
        assert!(inspect(&path)
            .unwrap_err()
            .contains("not a snapshot core file"));
    }

    #[test]
    fn a_failed_copy_leaves_the_old_file_and_no_staging_file() {
        let dir = crate::scratch_dir("corefile-failed-copy");
        let image = dir.join("disk.img");
        write_core(&image);
        let out = dir.join("core");
        std::fs::write(&out, b"the user's old file").unwrap();
        // A core shorter than its own header: the copy is not a core file.
        assert!(extract(&image, 100, &out, |_, _| {}).is_err());
        assert_eq!(std::fs::read(&out).unwrap(), b"the user's old file");
        assert!(!dir.join(".core.partial").exists());
        // The whole core goes in place of the old file.
        let bytes = std::fs::read(&image).unwrap();
        let core = extract(&image, bytes.len() as u64, &out, |_, _| {}).unwrap();
        assert_eq!(core.loads.len(), 2);
        assert_eq!(std::fs::read(&out).unwrap(), bytes);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_is_refused_as_the_output() {
        let dir = crate::scratch_dir("corefile-dir-out");
        let image = dir.join("disk.img");
        let len = write_core(&image).len() as u64;
        let err = extract(&image, len, &dir, |_, _| {}).unwrap_err();
        assert!(err.contains("exists and is not a file"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
