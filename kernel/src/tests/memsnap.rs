use crate::clock::now_ns;
use crate::memory::frames::{self, OwnedRun};
use crate::memsnap::{self, Options, StartError};
use crate::workload::Workload;
use snapshot::memsnap::Phase;

const MS: u64 = 1_000_000;

/// A verified snapshot with the copier at half the CPU.
pub(super) fn verified() -> Options {
    Options {
        verify: true,
        copier_share_pct: Some(50),
        ..Options::default()
    }
}

fn check(report: &memsnap::Report) {
    crate::log!("{}", memsnap::describe(report));
    assert_eq!(
        report.mismatched,
        Some(0),
        "snapshot differs from memory at the instant"
    );
    assert_eq!(
        report.not_copied_once,
        Some(0),
        "a page was copied twice or never"
    );
    assert_eq!(
        report.stats.copied(),
        report.pages,
        "counts by cause do not add up to the range"
    );
    assert!(report.stats.eager > 0, "nothing copied eagerly");
    assert_eq!(
        report.pause_faults, 0,
        "the engine faulted on itself in the pause"
    );
    assert!(report.stats.background > 0, "the copier copied nothing");
}

/// Under a workload writing from three threads (random and sequential
/// writes, heap churn, deep recursion), a live snapshot equals a
/// stop-the-world reference hash of every page taken at the same instant,
/// for several seeds; every page is copied exactly once; memory is returned.
pub fn live_snapshot_matches_reference_across_seeds() {
    let (free_before, _) = frames::stats();
    for seed in [1u64, 2, 3, 0xdead_beef] {
        let workload = Workload::start(3, 4 << 20, seed).expect("workload memory");
        crate::thread::sleep_ns(10 * MS);
        memsnap::start(&verified()).expect("start");
        let report = memsnap::wait().expect("report");
        let ops = workload.ops();
        workload.stop();
        check(&report);
        assert!(
            report.stats.fault > 0,
            "seed {seed}: the workload never hit a protected page"
        );
        assert!(ops > 0);
        memsnap::release().expect("release");
    }
    let (free_after, _) = frames::stats();
    assert!(
        free_before.abs_diff(free_after) <= 64,
        "frames leaked: {free_before} -> {free_after}"
    );
}

/// A second start is refused while one runs; abort mid-way restores every
/// permission (the workload keeps writing without faults being fatal) and a
/// new snapshot afterwards works and verifies.
pub fn abort_midway_and_start_again() {
    let workload = Workload::start(2, 2 << 20, 7).expect("workload memory");
    let (free_before, _) = frames::stats();
    let slow = Options {
        copier_share_pct: Some(2),
        ..verified()
    };
    memsnap::start(&slow).expect("first start");
    assert!(
        matches!(memsnap::start(&slow), Err(StartError::Busy(_))),
        "second start accepted"
    );
    crate::thread::sleep_ns(20 * MS);
    assert_eq!(
        memsnap::phase(),
        Phase::Active,
        "finished before the abort could test anything"
    );
    memsnap::abort().expect("abort");
    assert_eq!(memsnap::phase(), Phase::Idle);
    assert!(memsnap::window().is_none(), "protection left on");
    // Storage and tables are back; a few frames may have gone to the
    // copier's stack and the kernel meanwhile.
    let (free_after, _) = frames::stats();
    assert!(
        free_before.abs_diff(free_after) <= 64,
        "abort kept memory: {free_before} -> {free_after}"
    );
    let before = workload.ops();
    super::eventually("workload stalled after abort", || workload.ops() > before);
    memsnap::start(&verified()).expect("start after abort");
    let report = memsnap::wait().expect("report");
    workload.stop();
    check(&report);
    memsnap::release().expect("release");
    assert!(memsnap::release().is_err(), "double release accepted");
}

/// Restore brings a range back byte for byte, copying only the pages written
/// since the instant (during the snapshot and after it), as the CPU's dirty
/// bits say.
pub fn restore_rolls_back_only_dirtied_pages() {
    let mut region = OwnedRun::alloc(64).expect("region");
    let pattern = |i: usize| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x5a5a;
    for (i, w) in region.words_mut().iter_mut().enumerate() {
        *w = pattern(i);
    }
    let slow = Options {
        copier_share_pct: Some(5),
        ..verified()
    };
    memsnap::start(&slow).expect("start");
    assert!(
        memsnap::restore(region.virt(), region.len_bytes()).is_err(),
        "restore before completion"
    );
    let during = [3usize, 9, 10, 40, 63];
    for &page in &during {
        region.words_mut()[page * 512 + 7] = 0xdead;
    }
    check(&memsnap::wait().expect("report"));
    let after = [0usize, 1, 9, 20, 33, 50, 51];
    for &page in &after {
        region.words_mut()[page * 512] = 0xbeef;
    }
    let dirty: alloc::collections::BTreeSet<usize> = during.iter().chain(&after).copied().collect();
    let restored = memsnap::restore(region.virt(), region.len_bytes()).expect("restore");
    assert_eq!(
        restored,
        dirty.len() as u64,
        "restored pages other than the dirty ones"
    );
    for (i, w) in region.words().iter().enumerate() {
        assert_eq!(*w, pattern(i), "word {i} not restored");
    }
    let again = memsnap::restore(region.virt(), region.len_bytes()).expect("restore");
    assert_eq!(again, 0, "clean pages restored");
    memsnap::release().expect("release");
}

/// Without room for the storage, start fails with a clear error and
/// changes nothing: no memory taken, no protection, phase idle.
pub fn start_without_storage_fails_cleanly() {
    let (free, _) = frames::stats();
    let hog = OwnedRun::alloc(free * 3 / 4).expect("hog");
    let (free_before, _) = frames::stats();
    match memsnap::start(&Options::default()) {
        Err(StartError::NoMemory { needed, free }) => {
            crate::log!(
                "refused as expected: needs {} MiB, {} MiB free",
                needed >> 20,
                free >> 20
            );
        }
        other => panic!("start with too little memory: {other:?}"),
    }
    assert_eq!(frames::stats().0, free_before, "a failed start kept memory");
    assert_eq!(memsnap::phase(), Phase::Idle);
    assert!(memsnap::window().is_none());
    drop(hog);
    memsnap::start(&verified()).expect("start once memory is back");
    check(&memsnap::wait().expect("report"));
    memsnap::release().expect("release");
}

/// The copy map may live outside the snapshotted memory too.
pub fn copy_map_outside_the_range() {
    let workload = Workload::start(2, 2 << 20, 11).expect("workload memory");
    let opts = Options {
        map_outside: true,
        ..verified()
    };
    let t0 = now_ns();
    memsnap::start(&opts).expect("start");
    let report = memsnap::wait().expect("report");
    workload.stop();
    check(&report);
    assert!(report.total_ns <= now_ns() - t0);
    memsnap::release().expect("release");
}

/// Pages registered as DMA targets are copied at the instant, so a device
/// writing them afterwards (behind the MMU's back) does not change the
/// snapshot; an unregistered page written the same way is caught by the
/// verification, which shows the check can fail.
pub fn dma_targets_are_copied_at_the_instant() {
    use crate::memory::frames::OwnedFrame;
    use crate::memory::snapmem::device_write;
    let mut registered = OwnedFrame::alloc().expect("frame");
    // The copier walks up from frame 0; take the unregistered frame 8 MiB
    // higher so the device writes it long before the copier gets there.
    let mut below: alloc::vec::Vec<OwnedFrame> = (0..2048)
        .map(|_| OwnedFrame::alloc().expect("frame"))
        .collect();
    let mut unregistered = below.pop().expect("frame");
    drop(below);
    registered.bytes_mut().fill(0xaa);
    unregistered.bytes_mut().fill(0xaa);
    let range = registered.phys()..registered.phys() + 4096;
    memsnap::register_dma(range.clone());
    let slow = Options {
        copier_share_pct: Some(5),
        ..verified()
    };
    let started = memsnap::start(&slow).expect("start");
    // The "device" writes both frames right after the instant.
    device_write(&mut registered, 64, 0x1234);
    device_write(&mut unregistered, 64, 0x1234);
    let report = memsnap::wait().expect("report");
    memsnap::unregister_dma(range);
    crate::log!("{}", memsnap::describe(&report));
    assert!(report.stats.eager >= started.stats.eager && started.stats.eager > 0);
    assert_eq!(
        report.mismatched,
        Some(1),
        "exactly the unregistered DMA page should differ from the instant"
    );
    memsnap::release().expect("release");
}

/// The engine takes no fault of its own in the pause: with no workload,
/// nothing but the engine runs from the pause's start to protection (the
/// interrupts are off), so any page copied on a fault by then, or any
/// rewrite, was the engine writing memory it had just protected.
pub fn engine_never_faults_in_the_pause() {
    for opts in [Options::default(), verified()] {
        let started = memsnap::start(&opts).expect("start");
        assert_eq!(
            started.pause_faults, 0,
            "the engine faulted on memory it protected ({:?})",
            started.stats
        );
        let report = memsnap::wait().expect("report");
        assert_eq!(report.stats.copied(), report.pages);
        if opts.verify {
            check(&report);
        }
        memsnap::release().expect("release");
    }
}
