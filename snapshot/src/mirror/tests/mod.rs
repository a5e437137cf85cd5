//! Host tests of the mirror: refusals, I/O errors on either volume, and
//! (in [`model`]) the controller against a model under crashes.

mod budget;
mod disk;
mod model;
mod windows;

use std::string::ToString;
use std::sync::Arc;
use std::vec;
use std::vec::Vec;

use disk::{sector, versions, CrashDisk};

use super::*;
use crate::devices::block::{BlockDevice, MemDisk};

fn relax() {
    std::thread::yield_now();
}

fn pair(sectors: u64) -> (Arc<CrashDisk>, Arc<CrashDisk>, Arc<CrashDisk>) {
    (
        Arc::new(CrashDisk::new("primary", sectors)),
        Arc::new(CrashDisk::new("secondary", sectors)),
        Arc::new(CrashDisk::new("control", 64)),
    )
}

fn disks(p: &Arc<CrashDisk>, s: &Arc<CrashDisk>, c: &Arc<CrashDisk>) -> Disks {
    Disks {
        primary: p.clone(),
        secondary: s.clone(),
        control: c.clone(),
    }
}

const OPTS: Options = Options {
    block_bytes: 1024,
    assume_clean: false,
};

fn refusal(r: Result<(Mirror, Opened), Error>) -> Refusal {
    match r {
        Err(Error::Refused(why)) => why,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn bad_pairs_are_refused_with_nothing_written() {
    let (p, s, c) = pair(64);
    let same = Disks {
        primary: p.clone(),
        secondary: p.clone(),
        control: c.clone(),
    };
    let why = refusal(Mirror::open(same, OPTS, relax));
    assert_eq!(why, Refusal::SameDisk("primary".into()));
    assert!(why.to_string().contains("same disk"));
    let small = Arc::new(CrashDisk::new("secondary", 63));
    let why = refusal(Mirror::open(disks(&p, &small, &c), OPTS, relax));
    assert_eq!(
        why.to_string(),
        "the secondary (32256 bytes) is smaller than the primary (32768 bytes)"
    );
    let ro = Arc::new(CrashDisk::new("primary", 64).read_only());
    let why = refusal(Mirror::open(disks(&ro, &s, &c), OPTS, relax));
    assert_eq!(why, Refusal::ReadOnly("primary".into()));
    let tiny = Arc::new(CrashDisk::new("control", 17));
    let why = refusal(Mirror::open(disks(&p, &s, &tiny), OPTS, relax));
    assert!(
        matches!(
            why,
            Refusal::ControlTooSmall {
                need: 9216,
                have: 8704
            }
        ),
        "{why:?}"
    );
    let odd = Options {
        block_bytes: 1536,
        ..OPTS
    };
    assert_eq!(
        refusal(Mirror::open(disks(&p, &s, &c), odd, relax)),
        Refusal::BlockSize(1536)
    );
    for d in [&p, &s, &c, &small, &ro, &tiny] {
        assert_eq!(d.writes(), 0, "a refusal wrote to {}", d.info().name);
    }
    // A controller disk of another pair.
    let (m, _) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    drop(m);
    let bigger = Arc::new(CrashDisk::new("primary", 80));
    let big_s = Arc::new(CrashDisk::new("secondary", 80));
    let why = refusal(Mirror::open(disks(&bigger, &big_s, &c), OPTS, relax));
    assert!(why.to_string().contains("belongs to another pair"), "{why}");
    let junk = Arc::new(CrashDisk::new("control", 64));
    junk.write(0, &[7; 512]).unwrap();
    let why = refusal(Mirror::open(disks(&p, &s, &junk), OPTS, relax));
    assert!(why.to_string().contains("bad magic"), "{why}");
}

#[test]
fn backups_and_splits_out_of_turn_are_refused() {
    let (p, s, c) = pair(64);
    let (m, opened) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    assert_eq!(opened, Opened::Created { lagging: 32 });
    let tape = MemDisk::new("tape", 1000);
    let err = BackupJob::start(&m, &tape, Via::Memory).unwrap_err();
    assert_eq!(err, Error::Refused(Refusal::NoSplit));
    assert_eq!(tape.contents(), vec![0; 512_000], "nothing on the tape");
    m.split().unwrap();
    let before = c.writes();
    assert_eq!(m.split(), Err(Error::Refused(Refusal::SplitPending)));
    assert_eq!(c.writes(), before, "a refused split writes nothing");
    let job = BackupJob::start(&m, &tape, Via::Memory).unwrap();
    let err = BackupJob::start(&m, &tape, Via::Memory).unwrap_err();
    assert!(matches!(err, Error::Refused(Refusal::Busy(_))));
    assert!(matches!(m.resync(), Err(Error::Refused(Refusal::Busy(_)))));
    drop(job);
    m.resync().unwrap();
}

/// Writes version `v` over sectors `first..first + n` through the mirror.
fn write(m: &Mirror, first: u64, n: u64, v: u64) -> Result<(), Error> {
    let mut buf = vec![0u8; n as usize * 512];
    for i in 0..n {
        buf[i as usize * 512..][..512].copy_from_slice(&sector(v, first + i));
    }
    m.write(first, &buf)
}

fn pump_all(m: &Mirror) -> u64 {
    let mut n = 0;
    while let Ok(k @ 1..) = m.pump(5) {
        n += k;
    }
    n
}

#[test]
fn a_failing_secondary_suspends_the_pair_and_the_primary_goes_on() {
    let (p, s, c) = pair(64);
    let (m, _) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    write(&m, 0, 64, 2).unwrap();
    s.fail(40, 41);
    let err = loop {
        match m.pump(4) {
            Ok(0) => panic!("the pump finished past a failing sector"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    let why = "disk \"secondary\": I/O error at sector 40";
    assert_eq!(err, Error::Suspended(why.into()));
    assert_eq!(m.status().broken.as_deref(), Some(why));
    assert_eq!(m.pump(4), Ok(0), "suspended: the pump stops");
    write(&m, 10, 30, 3).unwrap();
    assert!(matches!(
        m.split(),
        Err(Error::Refused(Refusal::Suspended(_)))
    ));
    // The suspension is durable; the bitmap keeps what resync needs.
    drop(m);
    let (m, opened) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    assert!(matches!(opened, Opened::Paired { lagging: 1.. }));
    assert_eq!(m.status().broken.as_deref(), Some(why));
    s.heal();
    m.resync().unwrap();
    pump_all(&m);
    assert_eq!(s.contents(), p.contents());
}

#[test]
fn a_failing_secondary_breaks_a_split_but_not_the_workload() {
    let (p, s, c) = pair(64);
    let (m, _) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    write(&m, 0, 64, 2).unwrap();
    pump_all(&m);
    write(&m, 20, 4, 3).unwrap();
    m.split().unwrap();
    s.fail(20, 21);
    write(&m, 20, 2, 4).expect("the workload write goes on");
    let why = m.status().broken.expect("split broken");
    assert_eq!(why, "disk \"secondary\": I/O error at sector 20");
    let tape = MemDisk::new("tape", 1000);
    assert!(matches!(
        BackupJob::start(&m, &tape, Via::Secondary),
        Err(Error::Refused(Refusal::Suspended(_)))
    ));
    drop(m);
    let (m, opened) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    assert!(matches!(opened, Opened::Split { .. }));
    assert!(m.status().broken.is_some(), "broken survives a restart");
    s.heal();
    let marked = m.resync().unwrap();
    assert_eq!(
        marked, 2,
        "the two blocks written or lagging since the split"
    );
    assert_eq!(pump_all(&m), 2);
    assert_eq!(versions(&s.contents()), versions(&p.contents()));
}

#[test]
fn a_failing_primary_fails_only_the_requests_it_hits() {
    let (p, s, c) = pair(64);
    let (m, _) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
    pump_all(&m);
    m.split().unwrap();
    p.fail(30, 31);
    let err = write(&m, 30, 1, 5).unwrap_err();
    assert_eq!(err.to_string(), "disk \"primary\": I/O error at sector 30");
    write(&m, 0, 2, 5).unwrap();
    assert!(m.status().broken.is_none(), "the pair is not suspended");
    let tape = MemDisk::new("tape", 1000);
    let mut job = BackupJob::start(&m, &tape, Via::Memory).unwrap();
    while job.step().unwrap().is_some() {}
    job.finish().unwrap();
    p.heal();
    write(&m, 30, 1, 6).unwrap();
}

/// The workload, the copier and a backup on three threads at once: the
/// tape is the primary at the split instant, whatever the interleaving.
#[test]
fn workload_copier_and_backup_race_to_the_same_instant() {
    for round in 0..8u64 {
        let (p, s, c) = pair(256);
        let (m, _) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
        write(&m, 0, 256, 2).unwrap();
        pump_all(&m);
        write(&m, 0, 256, 3).unwrap();
        let instant = versions(&p.contents());
        m.split().unwrap();
        let tape = MemDisk::new("tape", 2048);
        let via = if round % 2 == 0 {
            Via::Memory
        } else {
            Via::Secondary
        };
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for k in 0..400u64 {
                    let at = (k * 37 + round * 11) % 255;
                    write(&m, at, 2, 10 + k).unwrap();
                }
            });
            scope.spawn(|| while m.copy(3).unwrap() > 0 {});
            let mut job = BackupJob::start(&m, &tape, via).unwrap();
            while job.step().unwrap().is_some() {}
            job.finish().unwrap();
        });
        let out = MemDisk::new("out", 256);
        crate::backup::restore(&tape, &out, crate::backup::Format::Raw, &mut |_, _, _| {}).unwrap();
        assert_eq!(versions(&out.contents()), instant, "round {round}");
        assert!(m.copy_complete());
        let stats = m.copy_stats();
        assert_eq!(
            stats.copied(),
            128,
            "every lagging block copied exactly once"
        );
    }
}

/// The instant written over a fresh pair, split: returns the mirror and
/// the primary's sector versions at the instant (every block pending).
fn split_pair(p: &Arc<CrashDisk>, s: &Arc<CrashDisk>, c: &Arc<CrashDisk>) -> (Mirror, Vec<u64>) {
    let (m, _) = Mirror::open(disks(p, s, c), OPTS, relax).unwrap();
    write(&m, 0, 256, 2).unwrap();
    pump_all(&m);
    write(&m, 0, 256, 3).unwrap();
    let instant = versions(&p.contents());
    m.split().unwrap();
    (m, instant)
}

/// The copier's two halves on two threads, a batch read while the one
/// before is written, racing workload writes: every block of the instant
/// reaches the secondary exactly once, as it was at the split.
#[test]
fn a_pipelined_copier_races_the_workload_to_the_instant() {
    for round in 0..8u64 {
        let (p, s, c) = pair(256);
        let (m, instant) = split_pair(&p, &s, &c);
        let (tx, rx) = std::sync::mpsc::sync_channel::<CopyBatch>(1);
        let m = &m;
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for k in 0..400u64 {
                    let at = (k * 37 + round * 11) % 255;
                    write(m, at, 2, 10 + k).unwrap();
                }
            });
            scope.spawn(move || {
                for batch in rx {
                    m.copy_write(batch).unwrap();
                }
            });
            while !m.copy_complete() {
                match m.copy_read(1 + round % 4).unwrap() {
                    Some(batch) => tx.send(batch).unwrap(),
                    None => std::thread::yield_now(),
                }
            }
            drop(tx);
        });
        assert_eq!(versions(&s.contents()), instant, "round {round}");
        assert_eq!(m.copy_stats().copied(), 128, "each block copied once");
    }
}

/// A crash with two copier batches out (one read, one written but its
/// bits not yet cleared on disk): the split resumes, and what the
/// copier counted copied before the crash is on the secondary.
#[test]
fn a_crash_between_the_copiers_halves_resumes_the_split() {
    for seed in 0..16u64 {
        let (p, s, c) = pair(256);
        let (m, instant) = split_pair(&p, &s, &c);
        let held = m.copy_read(5).unwrap().expect("a batch");
        assert_eq!(m.copy(7), Ok(7), "a second batch while one is out");
        assert_eq!(m.copy_read(3).unwrap().map(|b| b.blocks()), Some(3));
        drop(held);
        drop(m);
        let mut rng = crate::support::rng::Rng::new(seed);
        s.crash(&mut rng);
        c.crash(&mut rng);
        let (m, opened) = Mirror::open(disks(&p, &s, &c), OPTS, relax).unwrap();
        let Opened::Split { pending } = opened else {
            panic!("reopened {opened:?}");
        };
        assert!(pending >= 121, "only 7 blocks could be cleared: {pending}");
        while m.copy(9).unwrap() > 0 {}
        assert!(m.copy_complete());
        assert_eq!(versions(&s.contents()), instant, "seed {seed}");
    }
}

#[test]
fn at_small_blocks_the_unflushed_list_stays_bounded() {
    // 512-byte blocks: 64 MiB of copies would be 131,072 list entries.
    let blocks = copier::MAX_UNFLUSHED + 500;
    let (p, s, c) = pair(blocks);
    let opts = Options {
        block_bytes: 512,
        assume_clean: false,
    };
    let (m, opened) = Mirror::open(disks(&p, &s, &c), opts, relax).unwrap();
    assert_eq!(opened, Opened::Created { lagging: blocks });
    let (mut pumped, mut most) = (0, 0);
    while let Ok(k @ 1..) = m.pump(64) {
        pumped += k;
        most = most.max(m.unflushed_blocks());
    }
    assert_eq!(pumped, blocks);
    assert!(
        most <= copier::MAX_UNFLUSHED,
        "{most} blocks waited for a flush"
    );
    assert_eq!(m.unflushed_blocks(), 0, "the pump ends flushed");
}
