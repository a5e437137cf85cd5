//! Snapshots to a virtio-blk disk, as ELF core files. The copy on the disk
//! is read back and compared with the stop-the-world reference taken at the
//! instant; the file's header is parsed back; the failure paths leave the
//! system running and the file marked incomplete.

use alloc::string::String;
use alloc::vec;

use snapshot::devices::block::BlockDevice;
use snapshot::memsnap::elfcore::{self, Kind, Registers};
use snapshot::memsnap::Phase;

use crate::memory::frames;
use crate::memsnap::{self, Options, StartError};
use crate::workload::Workload;

const MS: u64 = 1_000_000;

fn to_disk(name: &str) -> Options {
    Options {
        disk: Some(String::from(name)),
        ..super::memsnap::verified()
    }
}

/// After a refused or failed snapshot to disk, a snapshot to RAM starts,
/// completes and matches its reference.
fn a_ram_snapshot_still_verifies(after: &str) {
    memsnap::start(&Options {
        verify: true,
        ..Options::default()
    })
    .unwrap_or_else(|e| panic!("a RAM snapshot after the {after}: {e}"));
    let report = memsnap::wait().expect("report");
    assert_eq!(report.mismatched, Some(0));
    memsnap::release().expect("release");
}

fn first_page(name: &str) -> vec::Vec<u8> {
    let d = crate::virtio::disk(name).unwrap_or_else(|e| panic!("{e}"));
    let mut page = vec![0u8; 4096];
    d.read(0, &mut page).unwrap_or_else(|e| panic!("{e}"));
    page
}

/// Under a three-thread workload, a live snapshot to disk: read back from
/// the disk, every page equals the reference taken at the instant, every
/// page was written exactly once, and the disk starts with a complete ELF
/// core whose header lists the range and carries the registers and the
/// counts by cause. A second run with a small staging area makes the
/// workload and the copier wait for the writer, and still matches.
pub fn snapshot_to_disk_matches_reference() {
    let (free_before, _) = frames::stats();
    for (seed, staging) in [(5u64, None), (6, Some(64))] {
        let workload = Workload::start(3, 8 << 20, seed).expect("workload memory");
        crate::thread::sleep_ns(10 * MS);
        let opts = Options {
            staging_pages: staging,
            copier_share_pct: Some(if staging.is_some() { 100 } else { 50 }),
            ..to_disk("snap")
        };
        memsnap::start(&opts).unwrap_or_else(|e| panic!("{e}"));
        let report = memsnap::wait().expect("report");
        workload.stop();
        crate::log!("{}", memsnap::describe(&report));
        assert_eq!(report.error, None, "the snapshot failed");
        assert_eq!(memsnap::phase(), Phase::Complete);
        assert_eq!(
            report.mismatched,
            Some(0),
            "the disk differs from the instant"
        );
        assert_eq!(report.not_copied_once, Some(0));
        assert_eq!(report.stats.copied(), report.pages);
        assert_eq!(
            report.pause_faults, 0,
            "the engine faulted on itself in the pause"
        );
        assert!(report.stats.fault > 0, "the workload never faulted");
        let disk = report.disk.clone().expect("disk figures");
        assert_eq!(
            disk.writer.bytes,
            report.pages * 4096,
            "every page is written exactly once"
        );
        crate::log!(
            "staging {} pages (peak {} in use), {} batches, {} fault waits, {} copier waits",
            disk.staging_pages,
            disk.writer.peak_in_use,
            disk.writer.batches,
            report.fault_waits,
            report.copier_waits
        );
        if staging.is_some() {
            assert!(
                report.fault_waits + report.copier_waits > 0,
                "a small staging area never made anyone wait"
            );
        }

        let header = first_page("snap");
        assert_eq!(elfcore::classify(&header), Kind::Complete);
        let core = elfcore::parse(&header).unwrap_or_else(|e| panic!("{e}"));
        let meta = core.meta.expect("metadata note");
        assert!(
            meta.contains(&alloc::format!("pages={}\n", report.pages)),
            "{meta}"
        );
        assert!(meta.contains(&alloc::format!("fault={}\n", report.stats.fault)));
        let regs = core.registers.expect("register note");
        assert!(regs.0[Registers::RIP] >= crate::memory::kernel_image().start);
        assert!(regs.0[Registers::RIP] < crate::memory::kernel_image().end);
        let direct: u64 = core
            .loads
            .iter()
            .filter(|l| l.0 >= crate::memory::PHYS_OFFSET)
            .map(|l| l.3)
            .sum();
        assert_eq!(direct, report.pages * 4096, "the loads cover the range");
        let image = crate::memory::kernel_image();
        assert!(
            core.loads
                .iter()
                .any(|l| l.0 <= image.start && image.start < l.0 + l.3),
            "no load at the kernel image's own addresses"
        );
        memsnap::release().expect("release");
    }
    let (free_after, _) = frames::stats();
    assert!(
        free_before.abs_diff(free_after) <= 64,
        "frames leaked: {free_before} -> {free_after}"
    );
}

/// A disk smaller than the core file is refused by `start`, before
/// anything changes: the disk keeps its contents, the phase stays idle,
/// and a snapshot to RAM still works.
pub fn too_small_disk_is_refused_before_anything_starts() {
    let d = crate::virtio::disk("small").unwrap_or_else(|e| panic!("{e}"));
    let mut mark = vec![0u8; 4096];
    snapshot::devices::block::fill_pattern(11, 0, &mut mark);
    d.write(0, &mark).unwrap_or_else(|e| panic!("{e}"));
    let (free_before, _) = frames::stats();
    match memsnap::start(&to_disk("small")) {
        Err(e @ StartError::Disk(_)) => {
            let text = alloc::format!("{e}");
            crate::log!("refused: {text}");
            assert!(
                text.contains("too small") && text.contains("\"small\""),
                "{text}"
            );
        }
        other => panic!("a too-small disk was accepted: {other:?}"),
    }
    assert_eq!(memsnap::phase(), Phase::Idle);
    assert_eq!(first_page("small"), mark, "the refused disk was written");
    let (free_after, _) = frames::stats();
    assert!(
        free_before.abs_diff(free_after) <= 16,
        "the refusal leaked memory"
    );
    assert!(matches!(
        memsnap::start(&to_disk("nosuchdisk")),
        Err(StartError::NoDisk(_))
    ));
    a_ram_snapshot_still_verifies("refusal");
}

/// The disk fails a sector mid-way through the pages: the snapshot ends
/// `Failed` with the disk and sector named, the file stays marked
/// incomplete, the workload keeps running, abort frees everything, and a
/// snapshot to RAM afterwards verifies.
pub fn io_error_midway_aborts_cleanly() {
    let (free_before, _) = frames::stats();
    let workload = Workload::start(2, 4 << 20, 21).expect("workload memory");
    crate::thread::sleep_ns(10 * MS);
    memsnap::start(&to_disk("bad")).unwrap_or_else(|e| panic!("{e}"));
    let report = memsnap::wait().expect("report");
    assert_eq!(memsnap::phase(), Phase::Failed);
    let error = report.error.clone().expect("a failure reason");
    crate::log!("failed as expected: {error}");
    assert!(
        error.contains("\"bad\"") && error.contains("I/O error"),
        "{error}"
    );
    assert!(
        matches!(memsnap::start(&to_disk("bad")), Err(StartError::Busy(_))),
        "a new snapshot started over a failed one"
    );
    assert!(
        memsnap::release().is_err(),
        "a failed copy is not a snapshot"
    );
    let ops = workload.ops();
    super::eventually("the workload stopped after the failure", || {
        workload.ops() > ops
    });
    memsnap::abort().expect("abort");
    assert_eq!(memsnap::phase(), Phase::Idle);
    assert_eq!(
        elfcore::classify(&first_page("bad")),
        Kind::Incomplete,
        "a failed snapshot must not look complete"
    );
    let ops = workload.ops();
    super::eventually("the workload stopped after the abort", || {
        workload.ops() > ops
    });
    workload.stop();
    let (free_after, _) = frames::stats();
    assert!(
        free_before.abs_diff(free_after) <= 64,
        "frames leaked: {free_before} -> {free_after}"
    );
    a_ram_snapshot_still_verifies("failure");
}
