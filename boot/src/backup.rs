//! Host side of `backup` and `restore`: checks the input with the same
//! library the kernel uses, prepares the disk images the kernel gets, shows
//! the kernel's progress, and leaves the tape or output file at exactly its
//! length.
//!
//! The kernel does the work; the host only reads the source image (to
//! refuse a bad one before booting and to size the tape) and never writes
//! it: QEMU attaches it read-only. The tape and the restored image are
//! written beside their paths and put in place only when complete
//! ([`Staged`]): a failed run leaves whatever was there before.

use std::path::{Path, PathBuf};

use snapshot::backup::{
    guest_heap_bytes, restore_memory, Error, Format, Front, Plan, Stage, KERNEL_HEAP_USE,
};
use snapshot::devices::block::SECTOR_SIZE;
use snapshot::interface::trace::Record;

use crate::filedisk::same_file;
pub use crate::filedisk::FileDisk;
use crate::qemu::Disk;
use crate::staged::Staged;

/// Creates (or empties) `path` as a sparse file of `bytes`.
fn fresh_file(path: &Path, bytes: u64) -> Result<(), String> {
    crate::bench::make_blank_image(path, bytes).map_err(|e| {
        // Nothing half-made is left behind.
        let _ = std::fs::remove_file(path);
        let hint = if e.raw_os_error() == Some(27) {
            // EFBIG: a raw file of the disk's size is beyond what the
            // file system takes; a qcow2 file is only as large as its data.
            format!(
                " (the host's file system takes no file of {}; --format qcow2 writes one as large as the data)",
                crate::report::human_bytes(bytes)
            )
        } else {
            String::new()
        };
        format!("{}: {e}{hint}", path.display())
    })
}

/// A backup about to run: the disks for the kernel and what it should
/// produce.
#[derive(Debug)]
pub struct BackupJob {
    /// Source (read-only), tape.
    pub disks: Vec<Disk>,
    /// The tape file the user named.
    pub tape: PathBuf,
    /// Where the guest writes it until it is complete.
    pub staged: Staged,
    /// The stream's length: the tape's length afterwards.
    pub medium_bytes: u64,
    /// Bytes of data to copy.
    pub data_bytes: u64,
    /// The source's virtual size.
    pub virtual_bytes: u64,
}

/// Bytes of kernel heap a guest of `mem` bytes has for a job: its heap
/// less what the kernel itself keeps (drivers, trace buffers).
pub fn job_memory(mem: u64) -> u64 {
    guest_heap_bytes(mem).saturating_sub(KERNEL_HEAP_USE)
}

/// Refuses a job needing more than a guest of `mem` bytes can give it.
fn enough_memory(job: &'static str, need: u64, mem: u64) -> Result<(), String> {
    let have = job_memory(mem);
    if need > have {
        return Err(format!("{}", Error::TooLittleMemory { job, need, have }));
    }
    Ok(())
}

/// Reads and checks `source`, then creates the tape at the size the
/// kernel will need. A job the kernel of a guest of `mem` bytes could not
/// hold is refused.
pub fn plan_backup(source: &Path, tape: &Path, mem: u64) -> Result<BackupJob, String> {
    if same_file(source, tape) {
        return Err("--tape names the source image; it would be overwritten".into());
    }
    let disk =
        FileDisk::open(source, false).map_err(|e| format!("--source {}: {e}", source.display()))?;
    // A clone is backed up as the guest sees it: its chain merged.
    let flat = crate::clone::flat_source(source)?;
    // Nor any file of its chain, which the run reads (read-only).
    if let Some((_, layers)) = &flat {
        if let Some(layer) = layers.iter().find(|d| same_file(&d.path, tape)) {
            return Err(format!(
                "--tape names {}, a backing file of the source; it would be overwritten",
                layer.path.display()
            ));
        }
    }
    let plan = match &flat {
        Some((view, _)) => Plan::new(view),
        None => Plan::new(&disk),
    }
    .map_err(|e| format!("{}: {e}", source.display()))?;
    enough_memory("backup", plan.memory_bytes(), mem)
        .map_err(|e| format!("{}: {e}", source.display()))?;
    // A whole number of 64 KiB: QEMU refuses to write a file opened
    // `O_DIRECT` (`Disk::direct`) unless its length is a multiple of the
    // host's block size; the tape is cut to the stream afterwards.
    let staged = Staged::new(tape)?;
    fresh_file(
        &staged.partial,
        plan.layout.stream_bytes().next_multiple_of(64 << 10),
    )?;
    Ok(BackupJob {
        disks: vec![
            Disk {
                read_only: true,
                ..Disk::new(source, "source")
            },
            Disk {
                direct: true,
                ..Disk::new(&staged.partial, "tape")
            },
        ]
        .into_iter()
        .chain(flat.into_iter().flat_map(|(_, backing)| backing))
        .collect(),
        tape: tape.to_path_buf(),
        staged,
        medium_bytes: plan.layout.stream_bytes(),
        data_bytes: plan.copy_bytes(),
        virtual_bytes: plan.image.header.virtual_size,
    })
}

/// After the kernel ran: checks it reported the stream the host expected
/// cuts the tape to it and puts it in place. On failure the staged tape is
/// removed (it holds no complete stream) and the path keeps what it held.
pub fn finish_backup(job: &BackupJob, records: &[Record<'_>], passed: bool) -> Result<u64, String> {
    let done = records.iter().rfind(|r| r.event == "backup.done");
    let result = match (passed, done.and_then(|r| r.u64("medium_bytes"))) {
        (true, Some(n)) if n == job.medium_bytes => std::fs::OpenOptions::new()
            .write(true)
            .open(&job.staged.partial)
            .and_then(|f| f.set_len(n))
            .map(|()| n)
            .map_err(|e| format!("{}: {e}", job.tape.display())),
        (true, Some(n)) => Err(format!(
            "the kernel wrote a {n}-byte stream, the host expected {}",
            job.medium_bytes
        )),
        _ => Err("the backup did not complete".into()),
    };
    job.staged.finish(result)
}

/// A restore about to run.
#[derive(Debug)]
pub struct RestoreJob {
    /// Tape (read-only), output.
    pub disks: Vec<Disk>,
    /// The output image the user named.
    pub out: PathBuf,
    /// Where the guest writes it until it is complete.
    pub staged: Staged,
    /// Its length when done.
    pub out_bytes: u64,
    /// The format.
    pub format: Format,
}

/// Reads the medium's header and tables (refusing a bad one before
/// booting) and creates the output image, empty, at the size it will have.
/// A job the kernel of a guest of `mem` bytes could not hold is refused.
pub fn plan_restore(
    tape: &Path,
    out: &Path,
    format: Format,
    mem: u64,
) -> Result<RestoreJob, String> {
    if same_file(tape, out) {
        return Err("--out names the tape; it would be overwritten".into());
    }
    let disk =
        FileDisk::open(tape, false).map_err(|e| format!("--tape {}: {e}", tape.display()))?;
    let front =
        Front::read_len(&disk, disk.len()).map_err(|e| format!("{}: {e}", tape.display()))?;
    enough_memory(
        "restore",
        restore_memory(front.header.layout.cluster_bits),
        mem,
    )
    .map_err(|e| format!("{}: {e}", tape.display()))?;
    let out_bytes = front.out_bytes(format).max(SECTOR_SIZE as u64);
    let staged = Staged::new(out)?;
    fresh_file(&staged.partial, out_bytes)?;
    Ok(RestoreJob {
        disks: vec![
            Disk {
                read_only: true,
                ..Disk::new(tape, "tape")
            },
            Disk::new(&staged.partial, "out"),
        ],
        out: out.to_path_buf(),
        staged,
        out_bytes,
        format,
    })
}

/// After the kernel ran: a complete restore is put in place; a failed one
/// leaves the output path as it was.
pub fn finish_restore(
    job: &RestoreJob,
    records: &[Record<'_>],
    passed: bool,
) -> Result<(), String> {
    let done = records.iter().rfind(|r| r.event == "restore.done");
    let result = match (passed, done.and_then(|r| r.u64("out_bytes"))) {
        // The disk QEMU attached is a sector at least: an empty image
        // comes back empty, as `qemu-img` sees the source.
        (true, Some(n)) if n.max(SECTOR_SIZE as u64) == job.out_bytes => {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&job.staged.partial)
                .and_then(|f| f.set_len(n))
                .map_err(|e| format!("{}: {e}", job.staged.partial.display()))
        }
        _ if job.out.exists() => Err(format!(
            "the restore did not complete; {} is as it was",
            job.out.display()
        )),
        _ => Err(format!(
            "the restore did not complete; {} was not made",
            job.out.display()
        )),
    };
    job.staged.finish(result)
}

/// A progress line for a `backup.progress` record, if it is one.
pub fn progress_line(record: &Record<'_>) -> Option<String> {
    if record.event != "backup.progress" {
        return None;
    }
    let stage = record.get("stage")?;
    let (done, total) = (record.u64("done")?, record.u64("total")?);
    let pct = (done * 100).checked_div(total).unwrap_or(100);
    let what = match format!("{stage}").as_str() {
        s if s == Stage::Copy.name() => "reading data from the source",
        s if s == Stage::Stream.name() => "streaming to the tape",
        _ => "restoring",
    };
    Some(format!(
        "{what}: {pct:>3}% ({} of {} MiB)",
        done >> 20,
        total >> 20
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_name_the_stage() {
        let line = "TRACE 5 backup.progress stage=stream done=1048576 total=4194304";
        let record = snapshot::interface::trace::parse_line(line)
            .unwrap()
            .unwrap();
        assert_eq!(
            progress_line(&record).unwrap(),
            "streaming to the tape:  25% (1 of 4 MiB)"
        );
    }
}
