//! Backups over many windows: the copier stepping aside for a backup
//! `via=memory`, that backup's copies held across windows until one flush
//! settles them, and a backup dropped with copies still unflushed.

use std::sync::Arc;
use std::vec::Vec;

use super::disk::{versions, CrashDisk};
use super::{disks, pump_all, relax, write};
use crate::backup::volume::VolumeStream;
use crate::backup::{restore, Format};
use crate::devices::block::MemDisk;
use crate::mirror::{BackupJob, Budget, Mirror, Options, Via};

/// Several windows of 512-byte blocks, the last one short.
const SECTORS: u64 = 14_339;

const OPTS: Options = Options {
    block_bytes: 512,
    assume_clean: false,
};

/// A pair in sync at version 2, then every other 61-sector run written
/// at version 3 and split: the primary at the instant, and the blocks
/// pending.
fn split_pair() -> (Mirror, [Arc<CrashDisk>; 2], Vec<u64>, u64) {
    let p = Arc::new(CrashDisk::new("primary", SECTORS));
    let s = Arc::new(CrashDisk::new("secondary", SECTORS));
    let c = Arc::new(CrashDisk::new("control", 64));
    let (m, _) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    for (k, at) in (0..SECTORS).step_by(61).enumerate() {
        write(&m, at, 61.min(SECTORS - at), 2).unwrap();
        let _ = k;
    }
    pump_all(&m);
    for at in (0..SECTORS).step_by(122) {
        write(&m, at, 61.min(SECTORS - at), 3).unwrap();
    }
    let instant = versions(&p.contents());
    let pending = m.split().unwrap().pending;
    (m, [p, s], instant, pending)
}

fn tape() -> MemDisk {
    MemDisk::new("tape", VolumeStream::medium_bytes(SECTORS * 512, 9) / 512)
}

/// The workload, a copier that keeps asking until the instant is copied,
/// and a backup over many windows, in both modes: the tape is the
/// instant, and each pending block was copied exactly once, by the
/// backup or by the copier. The last rounds run in the least memory: one
/// extent a window, on-demand copies three blocks at a time.
#[test]
fn a_backup_over_many_windows_races_the_copier_and_the_workload() {
    let small = Budget {
        batch: 3,
        window_extents: 1,
    };
    let full = Budget {
        batch: 64,
        window_extents: u64::MAX,
    };
    let rounds = [
        (Via::Memory, full),
        (Via::Secondary, full),
        (Via::Memory, full),
        (Via::Secondary, small),
        (Via::Memory, small),
    ];
    for (round, (via, budget)) in rounds.into_iter().enumerate() {
        let (m, _, instant, pending) = split_pair();
        let tape = tape();
        let mut by_copier = 0;
        let summary = std::thread::scope(|scope| {
            scope.spawn(|| {
                for k in 0..300u64 {
                    let at = (k * 4099 + round as u64 * 13) % (SECTORS - 2);
                    write(&m, at, 2, 10 + k).unwrap();
                }
            });
            let copier = scope.spawn(|| {
                let mut n = 0;
                while !m.copy_complete() {
                    match m.copy(16).unwrap() {
                        0 => relax(),
                        k => n += k,
                    }
                }
                n
            });
            let mut job = BackupJob::start_sized(&m, &tape, via, budget).unwrap();
            while job.step().unwrap().is_some() {}
            let summary = job.finish().unwrap();
            by_copier = copier.join().unwrap();
            summary
        });
        let out = MemDisk::new("out", SECTORS);
        restore(&tape, &out, Format::Raw, &mut |_, _, _| {}).unwrap();
        assert_eq!(versions(&out.contents()), instant, "round {round}");
        assert!(m.copy_complete());
        assert_eq!(m.copy_stats().copied(), pending, "each block copied once");
        assert!(summary.on_demand + by_copier <= pending, "round {round}");
    }
}

/// A backup `via=memory` dropped after a few windows, its last copies
/// written but not flushed: they are given back, so the copier finishes
/// the instant (nothing stays claimed) and the secondary holds it.
#[test]
fn a_memory_backup_dropped_midway_gives_its_unflushed_copies_back() {
    let (m, [_, s], instant, pending) = split_pair();
    let tape = tape();
    let mut job = BackupJob::start(&m, &tape, Via::Memory).unwrap();
    assert_eq!(m.copy(16).unwrap(), 0, "the copier steps aside");
    for _ in 0..3 {
        job.step().unwrap();
    }
    drop(job);
    let mut rounds = 0;
    while !m.copy_complete() {
        m.copy(64).unwrap();
        rounds += 1;
        assert!(rounds < 10_000, "a block stays claimed");
    }
    assert_eq!(m.copy_stats().copied(), pending, "each block copied once");
    assert_eq!(versions(&s.contents()[..SECTORS as usize * 512]), instant);
}
