//! Compact backup and restore of thin-provisioned qcow2 disks on virtio-blk
//! disks: the kernel's thin layer over [`snapshot::backup`].
//!
//! | scenario | disks (default names) | what |
//! |---|---|---|
//! | `backup` | `source` (read-only), `tape` | qcow2 image on `source` to a medium on `tape`; the source's reads and the checksums each on a thread of their own while the windows before stream (`overlap=off`: in turn) |
//! | `restore` | `tape` (read-only), `out` | medium to a raw (`format=raw`) or qcow2 (`format=qcow2`) image on `out`, which must read as zeros |
//!
//! Progress goes out as `backup.progress stage=copy|stream|restore
//! done=BYTES total=BYTES` trace records, about every 5 %; the result as
//! `backup.done` or `restore.done`, which the host tool reads to cut the
//! tape or output file to its length. A job that cannot complete ends with
//! a `job.refused` (bad input) or `job.failed` (a disk error, no memory)
//! record naming the reason, which the host shows as its last line.
//!
//! This module must never write to the source disk; it is opened
//! read-only by the host as well.

use alloc::string::{String, ToString};
use snapshot::backup::{self, Format, Stage};
use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::CmdLine;
use snapshot::qcow2::flat::FlatView;

use crate::arch::qemu::ExitCode;
use crate::trace::job_failed;
use crate::{clock, log, virtio};

/// Emits progress records, at most one per 5 % of each stage, and notes
/// when the copy stage ended (the backup's split between copy and stream).
struct Progress {
    stages: crate::trace::Progress,
    copy_ended_ns: Option<u64>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            stages: crate::trace::Progress::new("backup.progress"),
            copy_ended_ns: None,
        }
    }

    fn report(&mut self, stage: Stage, done: u64, total: u64) {
        self.stages.report(stage.name(), done, total);
        if stage == Stage::Copy && done == total {
            self.copy_ended_ns = Some(clock::now_ns());
        }
    }
}

/// Runs each job the pipeline hands it on a thread of its own (the copy,
/// then the seal) while the calling thread streams the windows sealed, so
/// the source, the checksums and the medium are busy at once; each job
/// blocks (its CPU free for the others) while it waits.
#[derive(Debug, Default)]
struct Threads {
    /// A thread could not be had: from then on no job blocks (one that
    /// cannot go on returns, and the jobs run in turn), or one would wait
    /// for the other for ever. A job thread started before still blocks
    /// until the ring moves, which the jobs in turn then do.
    in_turn: core::sync::atomic::AtomicBool,
}

/// Stack of a job's thread: the copy, its walk and its decoders.
const COPY_STACK: u64 = 256 * 1024;

impl backup::Overlap for Threads {
    fn both(&self, a: &mut (dyn FnMut() + Send), b: &mut dyn FnMut()) {
        use core::sync::atomic::Ordering;
        if self.in_turn.load(Ordering::Acquire)
            || !crate::scoped::both("backup-job", COPY_STACK, a, b)
        {
            self.in_turn.store(true, Ordering::Release);
            a();
            b();
        }
    }

    fn wait(&self, key: usize, ready: &dyn Fn() -> bool) -> bool {
        if self.in_turn.load(core::sync::atomic::Ordering::Acquire) {
            return ready();
        }
        crate::thread::block_until(key, ready);
        true
    }

    fn wake(&self, key: usize) {
        crate::thread::wake_all(key);
    }
}

/// [`backup::backup_overlapped`] with the copy on its own thread.
pub fn run_backup(
    source: &dyn BlockDevice,
    tape: &dyn BlockDevice,
    progress: backup::Progress<'_>,
) -> Result<backup::BackupSummary, backup::Error> {
    backup::backup_overlapped(source, tape, &Threads::default(), progress)
}

/// Refuses a job that needs more heap than is free, before it starts:
/// its tables are streamed, so what it needs is known from the header.
fn enough_memory(job: &'static str, need: u64) -> Result<(), backup::Error> {
    let (used, total) = crate::memory::heap::stats();
    let have = ((total - used) as u64).saturating_sub(backup::KERNEL_JOB_USE);
    if need > have {
        return Err(backup::Error::TooLittleMemory { job, need, have });
    }
    Ok(())
}

/// `backup`: the qcow2 image on disk `source=` (default `source`) to the
/// medium on `tape=`.
pub fn backup_scenario(cmd: &CmdLine<'_>) -> ExitCode {
    let name = |key: &'static str| cmd.get(key).unwrap_or(key);
    let disks = (virtio::disk(name("source")), virtio::disk(name("tape")));
    let (source, tape) = match disks {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            return job_failed("backup", true, &e);
        }
    };
    // A clone is backed up as the guest sees it: its backing chain
    // (attached read-only as `back1` ...) merged into one flat view.
    let flat = match flat_view(name("source")) {
        Ok(flat) => flat,
        Err((refused, why)) => return job_failed("backup", refused, &why),
    };
    let source: &dyn BlockDevice = match &flat {
        Some(view) => view,
        None => &*source,
    };
    if let Err(e) = backup::source::read_header(source)
        .map_err(backup::Error::Source)
        .and_then(|h| enough_memory("backup", backup::backup_memory(&h, source.info().bytes())))
    {
        return job_failed("backup", e.is_refusal(), &e);
    }
    let mut progress = Progress::new();
    let start = clock::now_ns();
    crate::memory::heap::reset_peak();
    let heap_base = crate::memory::heap::stats().0;
    // `overlap=off`: copy and stream in turn (a baseline for the overlap).
    let threads = Threads::default();
    let overlap: &dyn backup::Overlap = match cmd.get("overlap") {
        Some("off") => &backup::InTurn,
        _ => &threads,
    };
    let result = backup::backup_overlapped(source, &*tape, overlap, &mut |s, d, t| {
        progress.report(s, d, t)
    });
    let end = clock::now_ns();
    match result {
        Ok(s) => {
            log!(
                "backup: {} bytes of data of a {}-byte disk, {} bytes on the medium ({} extents, {} runs in table 1) in {} ms",
                s.data_bytes,
                s.virtual_bytes,
                s.medium_bytes,
                s.extents,
                s.table1_runs,
                (end - start) / 1_000_000
            );
            // An image without data has no copy stage.
            let copied = progress.copy_ended_ns.unwrap_or(start);
            // Eight fields: more than a buffered record holds, and the
            // record that ends the job anyway.
            let u = snapshot::interface::trace::Value::U64;
            crate::trace::emit_now(
                "backup.done",
                &[
                    ("virtual_bytes", u(s.virtual_bytes)),
                    ("data_bytes", u(s.data_bytes)),
                    ("medium_bytes", u(s.medium_bytes)),
                    ("extents", u(s.extents)),
                    ("table1_runs", u(s.table1_runs)),
                    ("copy_ns", u(copied - start)),
                    ("stream_ns", u(end - copied)),
                    ("total_ns", u(end - start)),
                ],
            );
            crate::trace!(
                "backup.heap",
                base_bytes = heap_base,
                peak_bytes = crate::memory::heap::peak()
            );
            crate::trace::flush();
            ExitCode::Success
        }
        Err(e) => job_failed("backup", e.is_refusal(), &e),
    }
}

/// The chain under the source `name`, merged and seen as one qcow2 file,
/// if the source has a backing file.
fn flat_view(name: &str) -> Result<Option<FlatView<crate::clone::CloneDisk>>, (bool, String)> {
    let disk = virtio::disk(name).map_err(|e| (true, e.to_string()))?;
    // An image the reader refuses is the backup's to refuse, in its words.
    let header = match backup::source::read_header(&*disk) {
        Ok(h) if h.backing_file.is_some() => h,
        _ => return Ok(None),
    };
    let merged = crate::clone::open(name)?;
    FlatView::new(merged, header.cluster_bits)
        .map(Some)
        .map_err(|e| (true, e.to_string()))
}

/// `restore`: the medium on `tape=` to a new image on `out=` in
/// `format=raw|qcow2` (default raw).
pub fn restore_scenario(cmd: &CmdLine<'_>) -> ExitCode {
    let name = |key: &'static str| cmd.get(key).unwrap_or(key);
    let text = cmd.get("format").unwrap_or("raw");
    let Some(format) = Format::parse(text) else {
        let why = alloc::format!("format={text}: want raw or qcow2");
        return job_failed("restore", true, &why);
    };
    let (tape, out) = match (virtio::disk(name("tape")), virtio::disk(name("out"))) {
        (Ok(t), Ok(o)) => (t, o),
        (Err(e), _) | (_, Err(e)) => {
            return job_failed("restore", true, &e);
        }
    };
    let mut head = alloc::vec![0u8; snapshot::backup::tape::HEADER_BYTES as usize];
    let checked = tape
        .read(0, &mut head)
        .map_err(backup::Error::Io)
        .and_then(|()| Ok(snapshot::backup::tape::Header::decode(&head)?))
        .and_then(|h| enough_memory("restore", backup::restore_memory(h.layout.cluster_bits)));
    // A medium too short for a header is refused by the restore itself.
    if let Err(e @ backup::Error::TooLittleMemory { .. }) = checked {
        return job_failed("restore", true, &e);
    }
    let mut progress = Progress::new();
    let start = clock::now_ns();
    let result = backup::restore(&*tape, &*out, format, &mut |s, d, t| {
        progress.report(s, d, t)
    });
    let end = clock::now_ns();
    match result {
        Ok(s) => {
            log!(
                "restore: {} bytes of data of a {}-byte disk as {text}, {} bytes of output, in {} ms",
                s.data_bytes,
                s.virtual_bytes,
                s.out_bytes,
                (end - start) / 1_000_000
            );
            crate::trace!(
                "restore.done",
                virtual_bytes = s.virtual_bytes,
                data_bytes = s.data_bytes,
                out_bytes = s.out_bytes,
                total_ns = end - start
            );
            crate::trace::flush();
            ExitCode::Success
        }
        Err(e) => job_failed("restore", e.is_refusal(), &e),
    }
}
