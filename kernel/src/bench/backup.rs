//! `bench-backup`: a compact backup of a qcow2 image and its restore,
//! against an all-data backup and the medium disk's raw throughput.

use alloc::string::String;

use snapshot::backup::BackupSummary;
use snapshot::devices::block::BlockDevice;
use snapshot::interface::cmdline::CmdLine;

use super::blk::{sequential, WINDOW};
use super::{per_second, print_json, seconds, MS};
use crate::arch::qemu::ExitCode;
use crate::clock::now_ns;
use crate::log;

/// `bench-backup`: backs up the qcow2 image on disk `src` (scattered data
/// in a large virtual disk) and restores it raw onto `out`; then backs up
/// `full` (the same virtual size, every cluster allocated) the same way.
/// The baselines, in the same boot: that all-data backup, and sequential
/// 1 MiB writes and reads of the `tape` disk. With `spread=NAME`, the
/// qcow2 image on disk NAME (the host's 1 TiB spread image) is backed up
/// last, for its medium's size against its data.
pub fn backup(cmd: &CmdLine<'_>) -> ExitCode {
    use crate::backup::run_backup;
    use snapshot::backup::{restore, Format};
    let disks = ["src", "full", "tape", "out"].map(crate::virtio::disk);
    if let Some(Err(e)) = disks.iter().find(|d| d.is_err()) {
        log!("bench-backup: {e}");
        return ExitCode::Failure;
    }
    let [src, full, tape, out] = disks.map(|d| d.expect("checked above"));
    let mut quiet = |_, _, _| {};

    let Some((span, write_ns, read_ns)) = medium_baseline(&*tape) else {
        return ExitCode::Failure;
    };
    let mib_s = |bytes: u64, ns: u64| per_second(bytes, ns) >> 20;

    // Each step timed; the first error ends the benchmark.
    fn timed<T>(
        what: &str,
        step: impl FnOnce() -> Result<T, snapshot::backup::Error>,
    ) -> Option<(T, u64)> {
        let t = now_ns();
        let result = step();
        let ns = now_ns() - t;
        result
            .map(|value| (value, ns))
            .map_err(|e| log!("bench-backup: {what}: {e}"))
            .ok()
    }
    crate::memory::heap::reset_peak();
    let steps = timed("backup", || {
        let done = run_backup(&*src, &*tape, &mut quiet);
        Ok((done?, crate::memory::heap::peak()))
    })
    .and_then(|backup| {
        let restored = timed("restore", || {
            restore(&*tape, &*out, Format::Raw, &mut quiet)
        })?;
        let all = timed("all-data backup", || run_backup(&*full, &*tape, &mut quiet))?;
        Some((backup, restored.1, all))
    });
    let Some((((sparse, peak_heap), backup_ns), restore_ns, (all, all_ns))) = steps else {
        return ExitCode::Failure;
    };
    log!(
        "backup: {} MiB of data in a {} MiB disk: {} ms, {} MiB/s; medium {} bytes for {} bytes of data",
        sparse.data_bytes >> 20,
        sparse.virtual_bytes >> 20,
        backup_ns / MS,
        mib_s(sparse.data_bytes, backup_ns),
        sparse.medium_bytes,
        sparse.data_bytes
    );
    log!(
        "all-data backup: {} MiB in {} ms; restore: {} ms; the medium's disk: {} MiB/s writing, {} MiB/s reading",
        all.data_bytes >> 20,
        all_ns / MS,
        restore_ns / MS,
        mib_s(span, write_ns),
        mib_s(span, read_ns)
    );
    let medium = (span, write_ns, read_ns);
    let mut json = fields(
        &sparse,
        &all,
        (backup_ns, all_ns, restore_ns),
        medium,
        peak_heap,
    )
    .to_vec();
    if let Some(name) = cmd.get("spread") {
        let Some(more) = spread(name, &*tape) else {
            return ExitCode::Failure;
        };
        json.extend(more);
    }
    print_json(&json);
    ExitCode::Success
}

/// Backs up the qcow2 image on disk `name` to `tape`;
/// its JSON fields (`spread_*`: virtual, data and medium bytes, seconds),
/// or `None` (logged) if the backup failed.
fn spread(name: &str, tape: &dyn BlockDevice) -> Option<[(&'static str, String); 4]> {
    let source = crate::virtio::disk(name)
        .map_err(|e| log!("bench-backup: {e}"))
        .ok()?;
    let t = now_ns();
    let done = crate::backup::run_backup(&*source, tape, &mut |_, _, _| {});
    let ns = now_ns() - t;
    let s = done.map_err(|e| log!("bench-backup: {name}: {e}")).ok()?;
    log!(
        "{name}: {} MiB of data in a {} GiB disk: {} ms; medium {} bytes for {} bytes of data",
        s.data_bytes >> 20,
        s.virtual_bytes >> 30,
        ns / MS,
        s.medium_bytes,
        s.data_bytes
    );
    Some([
        (
            "spread_virtual_bytes",
            alloc::format!("{}", s.virtual_bytes),
        ),
        ("spread_data_bytes", alloc::format!("{}", s.data_bytes)),
        ("spread_medium_bytes", alloc::format!("{}", s.medium_bytes)),
        ("spread_backup_s", seconds(ns)),
    ])
}

/// The baseline: raw sequential 1 MiB writes, then a flush, then reads
/// of up to 512 MiB of the medium's disk. The flush counts in the writes'
/// time, as the backup's closing flush counts in its own: without it the
/// writes measured only the host's page cache. Returns `(bytes, write
/// ns, read ns)`, or `None` (logged) on an I/O error.
pub(super) fn medium_baseline(tape: &dyn BlockDevice) -> Option<(u64, u64, u64)> {
    let span = (512u64 << 20).min(tape.info().bytes());
    let mut buf = alloc::vec![0u8; WINDOW];
    let t = now_ns();
    let write = sequential(tape, &mut buf, (0, span), true).and_then(|_| tape.flush());
    let write_ns = now_ns() - t;
    let t = now_ns();
    let read = sequential(tape, &mut buf, (0, span), false);
    let read_ns = now_ns() - t;
    match write.and(read) {
        Ok(_) => Some((span, write_ns, read_ns)),
        Err(e) => {
            log!("bench-backup: baseline: {e}");
            None
        }
    }
}

/// The JSON fields: the sparse backup, the all-data one, their times
/// `(backup, all-data backup, restore)`, the medium's baseline and the
/// kernel heap's high-water mark during the sparse backup.
fn fields(
    sparse: &BackupSummary,
    all: &BackupSummary,
    (backup_ns, all_ns, restore_ns): (u64, u64, u64),
    (span, write_ns, read_ns): (u64, u64, u64),
    peak_heap: usize,
) -> [(&'static str, String); 13] {
    let mib_s = |bytes: u64, ns: u64| alloc::format!("{}", per_second(bytes, ns) >> 20);
    [
        ("bench", "\"backup\"".into()),
        ("virtual_bytes", alloc::format!("{}", sparse.virtual_bytes)),
        ("data_bytes", alloc::format!("{}", sparse.data_bytes)),
        ("medium_bytes", alloc::format!("{}", sparse.medium_bytes)),
        ("backup_s", seconds(backup_ns)),
        ("all_data_backup_s", seconds(all_ns)),
        ("all_data_bytes", alloc::format!("{}", all.data_bytes)),
        ("restore_s", seconds(restore_ns)),
        ("backup_mib_s", mib_s(sparse.data_bytes, backup_ns)),
        ("restore_mib_s", mib_s(sparse.data_bytes, restore_ns)),
        ("seq_write_mib_s", mib_s(span, write_ns)),
        ("seq_read_mib_s", mib_s(span, read_ns)),
        ("peak_kernel_heap_bytes", alloc::format!("{peak_heap}")),
    ]
}
