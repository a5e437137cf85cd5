//! virtio-blk against real QEMU devices backed by host image files. Data
//! is checked against the pattern function (which the host also uses to
//! fill and check images), never against the driver's own bookkeeping.

use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::devices::block::{
    fill_pattern, host_check_extents, BlockDevice, ErrorKind, Op, HOST_CHECK_SEED,
    READ_ONLY_TEST_SEED as RO_SEED, SECTOR_SIZE,
};
use snapshot::support::rng::Rng;

use crate::memsnap::{self, Options};
use crate::virtio::{self, VirtioBlk};

fn disk(name: &str) -> Arc<VirtioBlk> {
    virtio::disk(name).unwrap_or_else(|e| panic!("{e}"))
}

const MIB: u64 = 1 << 20;
const SECTORS_PER_MIB: u64 = MIB / SECTOR_SIZE as u64;

/// The host attached four disks: each is found by its serial with the
/// size and mode the host gave it, on the modern transport with MSI-X.
pub fn disks_are_found_by_serial() {
    let found: Vec<_> = virtio::disks()
        .iter()
        .map(|d| d.info().name.clone())
        .collect();
    assert_eq!(found, ["data0", "data1", "data2", "ro0"]);
    for (name, mib, ro) in [
        ("data0", 64, false),
        ("data1", 16, false),
        ("data2", 8, false),
        ("ro0", 8, true),
    ] {
        let d = disk(name);
        let info = d.info();
        assert_eq!(info.sectors, mib * SECTORS_PER_MIB, "{name}: capacity");
        assert_eq!(info.read_only, ro, "{name}: read-only");
        assert!(info.max_depth >= 32, "{name}: queue of {}", info.max_depth);
        let id = virtio::config_dword(&d, 0);
        assert_eq!(id, 0x1042_1af4, "{name}: not a modern virtio-blk function");
        assert!(d.interrupts(), "{name}: no MSI-X");
    }
    let err = virtio::disk("tape").unwrap_err();
    assert_eq!(
        alloc::format!("{err}"),
        "no disk named \"tape\" (disks: data0, data1, data2, ro0)"
    );
}

/// Puts ops that continue each other on disk apart in the batch (evens,
/// then odds), so the driver cannot gather them: each stays its own
/// request of its own size. With `gather`, the order is left as it is.
fn arrange<'a>(ops: Vec<Op<'a>>, gather: bool) -> Vec<Op<'a>> {
    if gather {
        return ops;
    }
    let (mut even, mut odd) = (Vec::new(), Vec::new());
    for (i, op) in ops.into_iter().enumerate() {
        if i % 2 == 0 {
            even.push(op);
        } else {
            odd.push(op);
        }
    }
    even.append(&mut odd);
    even
}

/// The ops that write (or read) `buf` at byte `at` of the disk in pieces
/// of `op_bytes`, arranged as [`arrange`] says.
fn window_ops(buf: &mut [u8], at: u64, op_bytes: usize, write: bool, gather: bool) -> Vec<Op<'_>> {
    let sector = |i: usize| (at + (i * op_bytes) as u64) / 512;
    let ops = if write {
        let buf: &[u8] = buf;
        buf.chunks(op_bytes)
            .enumerate()
            .map(|(i, chunk)| Op::Write {
                sector: sector(i),
                buf: chunk,
            })
            .collect()
    } else {
        buf.chunks_mut(op_bytes)
            .enumerate()
            .map(|(i, chunk)| Op::Read {
                sector: sector(i),
                buf: chunk,
            })
            .collect()
    };
    arrange(ops, gather)
}

/// Writes the whole disk with `seed`'s pattern in ops of `op_bytes` (the
/// last one shorter when it does not divide the disk), `depth` in flight,
/// from a buffer starting `skew` bytes into a heap allocation.
fn write_whole(d: &VirtioBlk, seed: u64, op_bytes: usize, depth: usize, skew: usize, gather: bool) {
    let total = d.info().bytes();
    let window = 2 * MIB;
    let mut storage = vec![0u8; window as usize + skew];
    let buf = &mut storage[skew..];
    let mut at = 0;
    while at < total {
        let len = window.min(total - at) as usize;
        fill_pattern(seed, at / 512, &mut buf[..len]);
        let mut ops = window_ops(&mut buf[..len], at, op_bytes, true, gather);
        d.transfer(&mut ops, depth)
            .unwrap_or_else(|e| panic!("{e}"));
        at += len as u64;
    }
}

/// Reads the whole disk back the same way and compares with the pattern.
fn check_whole(d: &VirtioBlk, seed: u64, op_bytes: usize, depth: usize, skew: usize, gather: bool) {
    let total = d.info().bytes();
    let window = 2 * MIB;
    let mut storage = vec![0u8; window as usize + skew];
    let mut expected = vec![0u8; window as usize];
    let mut at = 0;
    while at < total {
        let len = window.min(total - at) as usize;
        let buf = &mut storage[skew..skew + len];
        buf.fill(0xaa);
        let mut ops = window_ops(buf, at, op_bytes, false, gather);
        d.transfer(&mut ops, depth)
            .unwrap_or_else(|e| panic!("{e}"));
        fill_pattern(seed, at / 512, &mut expected[..len]);
        if let Some(i) = (0..len).find(|&i| buf[i] != expected[i]) {
            panic!(
                "{}: byte {} (sector {}) differs after writing {op_bytes}-byte ops",
                d.info().name,
                at + i as u64,
                (at + i as u64) / 512
            );
        }
        at += len as u64;
    }
}

/// Whole-disk passes at several queue depths and request sizes: requests
/// larger than the driver's limit, ones that do not divide the window
/// (unaligned tails), buffers misaligned in memory (so requests have
/// several segments), single sectors, and one pass whose small contiguous
/// ops the driver gathers into large requests; then a buffer on a thread
/// stack.
pub fn patterns_round_trip_at_depths_and_sizes() {
    let d = disk("data0");
    // (write op bytes, write depth, read op bytes, read depth, memory skew,
    // gather contiguous ops)
    let passes = [
        ((1 << 20) + 3 * 512, 8, 4096, 32, 0, false),
        (4096, 1, 64 << 10, 4, 8, false),
        (5 * 512, 32, (2 << 20) + 512, 2, 520, false),
        (64 << 10, 16, 512 * 7, 64, 4096 - 8, false),
        (512, 8, 3 * 512, 16, 24, true),
    ];
    for (seed, &(w_op, w_depth, r_op, r_depth, skew, gather)) in passes.iter().enumerate() {
        write_whole(&d, seed as u64 + 1, w_op, w_depth, skew, gather);
        d.flush().unwrap_or_else(|e| panic!("{e}"));
        check_whole(
            &d,
            seed as u64 + 1,
            r_op,
            r_depth,
            ((skew + 1000) % 4096) & !7,
            gather,
        );
    }
    // Single sectors at random places, one at a time.
    let mut rng = Rng::new(5);
    for _ in 0..200 {
        let sector = rng.below(d.info().sectors);
        let mut one = [0u8; 512];
        d.read(sector, &mut one).unwrap_or_else(|e| panic!("{e}"));
        let mut expected = [0u8; 512];
        fill_pattern(passes.len() as u64, sector, &mut expected);
        assert!(one == expected, "sector {sector}");
    }
    // A buffer on this thread's stack: pages the physical map does not
    // cover directly, translated through the page tables.
    let mut on_stack = [0u8; 12 * 1024];
    fill_pattern(99, 1000, &mut on_stack);
    d.write(1000, &on_stack).unwrap_or_else(|e| panic!("{e}"));
    let mut back = [0u8; 12 * 1024];
    d.read(1000, &mut back).unwrap_or_else(|e| panic!("{e}"));
    assert!(back == on_stack, "stack buffer round trip");
}

/// Bad requests are refused before reaching the device, with errors that
/// name the disk and sector; flush works; a read-only disk reads the
/// pattern the host wrote into its image.
pub fn refusals_flush_and_read_only_contents() {
    let d = disk("data0");
    let ro = disk("ro0");
    let data = vec![1u8; 4096];
    let err = ro.write(0, &data).unwrap_err();
    assert_eq!(err.kind, ErrorKind::ReadOnly);
    assert_eq!(
        alloc::format!("{err}"),
        "disk \"ro0\": write refused: the disk is read-only at sector 0"
    );
    let last = d.info().sectors - 1;
    let err = d.write(last, &data).unwrap_err();
    assert_eq!(err.kind, ErrorKind::OutOfRange { capacity: last + 1 });
    assert!(alloc::format!("{err}").contains("at sector"));
    let err = d.write(0, &data[..700]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Misaligned { len: 700 });
    // A refused op in a batch stops the whole batch before it starts.
    let mut ops = [
        Op::Write {
            sector: 0,
            buf: &data,
        },
        Op::Write {
            sector: last,
            buf: &data,
        },
    ];
    assert!(d.transfer(&mut ops, 2).is_err());
    let mut zero = vec![0xffu8; 4096];
    d.read(0, &mut zero).unwrap_or_else(|e| panic!("{e}"));
    assert!(zero.iter().all(|&b| b == 0), "the refused batch wrote");
    // The last sector itself is fine, and so is a flush.
    d.write(last, &data[..512])
        .unwrap_or_else(|e| panic!("{e}"));
    d.flush().unwrap_or_else(|e| panic!("{e}"));
    assert!(d.info().flush, "QEMU offers a write cache to flush");
    // The read-only disk holds what the host wrote.
    let mut got = vec![0u8; MIB as usize];
    let mut expected = vec![0u8; got.len()];
    for at in (0..ro.info().sectors).step_by(SECTORS_PER_MIB as usize) {
        ro.transfer(
            &mut got
                .chunks_mut(128 << 10)
                .enumerate()
                .map(|(i, buf)| Op::Read {
                    sector: at + i as u64 * 256,
                    buf,
                })
                .collect::<Vec<_>>(),
            8,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        fill_pattern(RO_SEED, at, &mut expected);
        assert!(
            got == expected,
            "read-only disk differs from the host's image at sector {at}"
        );
    }
}

/// The host's block layer fails every request touching sector 800 of
/// `bad0`: reads and writes come back as errors naming the disk and the
/// request's first sector, other requests work, and so does the other disk.
pub fn device_errors_name_disk_and_sector() {
    let bad = disk("bad0");
    let good = disk("data0");
    let mut buf = vec![0u8; 64 << 10];
    let err = bad.read(790, &mut buf[..20 * 512]).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io);
    assert_eq!(
        alloc::format!("{err}"),
        "disk \"bad0\": I/O error at sector 790"
    );
    let err = bad.write(800, &buf[..512]).unwrap_err();
    assert_eq!((err.kind, err.sector), (ErrorKind::Io, Some(800)));
    // In a batch: the failing op's error is reported, the rest finish.
    let (head, tail) = buf.split_at_mut(32 << 10);
    let mut ops = [
        Op::Read {
            sector: 0,
            buf: head,
        },
        Op::Read {
            sector: 784,
            buf: tail,
        },
    ];
    let err = bad.transfer(&mut ops, 2).unwrap_err();
    assert_eq!(err.sector, Some(784));
    bad.read(801, &mut buf)
        .unwrap_or_else(|e| panic!("after the error: {e}"));
    fill_pattern(3, 0, &mut buf);
    bad.write(0, &buf).unwrap_or_else(|e| panic!("{e}"));
    good.write(800, &buf).unwrap_or_else(|e| panic!("{e}"));
    let mut back = vec![0u8; buf.len()];
    bad.read(0, &mut back).unwrap_or_else(|e| panic!("{e}"));
    assert!(back == buf);
}

/// Two disks driven at once from two threads, and a third thread sharing
/// the first disk: each disk ends up with its own thread's data.
pub fn two_disks_at_once() {
    let a = disk("data0");
    let b = disk("data1");
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (a, stop, reads) = (a.clone(), stop.clone(), reads.clone());
        crate::thread::spawn("blk-reader", move || {
            let mut buf = vec![0u8; 64 << 10];
            let mut rng = Rng::new(3);
            while !stop.load(Ordering::Relaxed) {
                let sector = rng.below(a.info().sectors - 128);
                a.read(sector, &mut buf).unwrap_or_else(|e| panic!("{e}"));
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let writers: Vec<_> = [(a.clone(), 11u64), (b.clone(), 22)]
        .into_iter()
        .map(|(d, seed)| {
            crate::thread::spawn("blk-writer", move || {
                write_whole(&d, seed, 128 << 10, 16, 0, false);
                check_whole(&d, seed, 256 << 10, 8, 0, false);
            })
        })
        .collect();
    for w in writers {
        w.join();
    }
    stop.store(true, Ordering::Relaxed);
    reader.join();
    assert!(
        reads.load(Ordering::Relaxed) > 0,
        "the sharing reader never ran"
    );
    if a.interrupts() {
        assert!(a.interrupt_count() > 0 && b.interrupt_count() > 0);
    }
}

/// A 4 KiB write and a flush do not wait for another thread's long batch
/// on the same disk: each takes a queue of its own (with one lock per disk
/// they waited for the whole batch). The write's wait for a queue (the
/// driver's own count of it) is judged against the long batch's length in
/// the same run, not against the batch's end: on a busy host the flush
/// (an `fdatasync`) may well outlast the batch, and the test must not
/// fail for that. The data is read back against the pattern.
pub fn a_small_write_and_flush_pass_a_long_batch() {
    let d = disk("data0");
    assert_eq!(d.queue_count(), usize::from(virtio::MAX_QUEUES));
    assert!(d.interrupts(), "progress is seen by interrupts");
    let finished = Arc::new(AtomicBool::new(false));
    let long_ns = Arc::new(AtomicU64::new(0));
    let before = d.interrupt_count();
    let long = {
        let (d, finished, long_ns) = (d.clone(), finished.clone(), long_ns.clone());
        crate::thread::spawn("blk-long", move || {
            // One-sector reads none of which continues the one before, at
            // depth 1: thousands of requests, one after another.
            let mut bufs = vec![0u8; 4096 * SECTOR_SIZE];
            let mut ops: Vec<Op<'_>> = bufs
                .chunks_mut(SECTOR_SIZE)
                .enumerate()
                .map(|(i, buf)| Op::Read {
                    sector: (i as u64 * 2) % 8192,
                    buf,
                })
                .collect();
            let start = crate::clock::now_ns();
            d.transfer(&mut ops, 1).unwrap_or_else(|e| panic!("{e}"));
            long_ns.store(crate::clock::now_ns() - start, Ordering::Release);
            finished.store(true, Ordering::Release);
        })
    };
    // Each request of the long batch completes by interrupt: a few of
    // them mean the batch holds its queue.
    while d.interrupt_count() < before + 4 && !finished.load(Ordering::Acquire) {
        crate::thread::yield_now();
    }
    assert!(
        !finished.load(Ordering::Acquire),
        "the long batch ended before the write could start"
    );
    let sector = 40_000;
    let mut data = vec![0u8; 4096];
    fill_pattern(5, sector, &mut data);
    let mut ops = [Op::Write { sector, buf: &data }, Op::Flush];
    // Only this thread takes a queue meanwhile: the long batch holds one.
    let (_, waited_before) = d.kinds();
    d.transfer(&mut ops, 1).unwrap_or_else(|e| panic!("{e}"));
    let (_, waited_after) = d.kinds();
    long.join();
    let (waited, long_ns) = (
        waited_after - waited_before,
        long_ns.load(Ordering::Acquire),
    );
    // Behind the batch, the wait would be nearly all of it (it began
    // after a few of its thousands of requests).
    assert!(
        waited * 2 < long_ns,
        "the write waited {waited} ns for a queue; the long batch took {long_ns} ns"
    );
    let mut back = vec![0u8; 4096];
    d.read(sector, &mut back).unwrap_or_else(|e| panic!("{e}"));
    assert!(back == data, "the write did not land");
}

/// Batches of one request are timed in stages, and only those: twenty
/// single reads add twenty batches whose stages fit inside the time the
/// caller measured around them; a batch of eight requests adds none. The
/// reads bring back the pattern written before them.
pub fn single_requests_are_timed_in_stages() {
    let d = disk("data0");
    let mut data = vec![0u8; 64 * 4096];
    fill_pattern(5, 0, &mut data);
    d.write(0, &data).unwrap_or_else(|e| panic!("{e}"));
    let before = d.stages();
    let mut outside_ns = 0;
    let mut buf = [0u8; 4096];
    for i in 0..20u64 {
        let start = crate::clock::now_ns();
        d.read(i * 8 * 3, &mut buf)
            .unwrap_or_else(|e| panic!("{e}"));
        outside_ns += crate::clock::now_ns() - start;
        let at = (i * 3 * 4096) as usize;
        assert!(
            buf == data[at..at + 4096],
            "read {i} brought back other data"
        );
    }
    let mut bufs = vec![[0u8; 4096]; 8];
    let mut ops: Vec<Op<'_>> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| Op::Read {
            sector: i as u64 * 16,
            buf,
        })
        .collect();
    d.transfer(&mut ops, 8).unwrap_or_else(|e| panic!("{e}"));
    let stages = d.stages().since(&before);
    assert_eq!(stages.batches, 20, "{stages:?}");
    assert!(
        stages.total_ns() <= outside_ns,
        "{stages:?} in {outside_ns} ns"
    );
    assert!(stages.kick_ns > 0, "no notification was timed: {stages:?}");
}

/// Writes the host-check pattern at scattered, odd extents in one batch
/// and flushes; the host then reads the image file (tests/blk.rs).
pub fn writes_land_where_the_host_expects() {
    let d = disk("data0");
    let extents = host_check_extents(d.info().sectors);
    let mut bufs: Vec<Vec<u8>> = extents
        .iter()
        .map(|&(start, len)| {
            let mut b = vec![0u8; len as usize * SECTOR_SIZE];
            fill_pattern(HOST_CHECK_SEED, start, &mut b);
            b
        })
        .collect();
    let mut ops: Vec<Op<'_>> = bufs
        .iter_mut()
        .zip(&extents)
        .map(|(buf, &(sector, _))| Op::Write { sector, buf })
        .collect();
    d.transfer(&mut ops, 8).unwrap_or_else(|e| panic!("{e}"));
    d.flush().unwrap_or_else(|e| panic!("{e}"));
}

/// A live memory snapshot (with its independent reference) taken while a
/// thread keeps disk reads landing in heap buffers: the device writes
/// behind the MMU, so only DMA registration keeps the copy consistent.
/// Without registration the same run must be caught, which shows the check
/// can fail.
pub fn snapshot_stays_consistent_while_disk_reads_land() {
    let d = disk("data0");
    // Two halves with different contents, so every read changes its buffer.
    let half = d.info().bytes() / 2;
    write_whole(&d, 7, 1 << 20, 8, 0, true);
    let mut other = vec![0u8; 1 << 20];
    for at in (half..2 * half).step_by(1 << 20) {
        fill_pattern(8, at / 512, &mut other);
        d.write(at / 512, &other).unwrap_or_else(|e| panic!("{e}"));
    }
    drop(other);
    let report = snapshot_during_reads(&d);
    assert_eq!(
        report.mismatched,
        Some(0),
        "snapshot differs from the instant"
    );
    assert_eq!(report.not_copied_once, Some(0));

    let report = crate::memory::dma::with_lent_buffers_unregistered(|| snapshot_during_reads(&d));
    assert!(
        report.mismatched.is_some_and(|m| m > 0),
        "unregistered DMA went unnoticed"
    );
}

fn snapshot_during_reads(d: &Arc<VirtioBlk>) -> memsnap::Report {
    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (d, stop, reads) = (d.clone(), stop.clone(), reads.clone());
        crate::thread::spawn("blk-dma", move || {
            let mut pool = vec![0u8; 32 * (64 << 10)];
            let mut rng = Rng::new(9);
            let sectors = d.info().sectors;
            while !stop.load(Ordering::Relaxed) {
                let mut ops: Vec<Op<'_>> = pool
                    .chunks_mut(64 << 10)
                    .map(|buf| Op::Read {
                        sector: rng.below(sectors / 128) * 128,
                        buf,
                    })
                    .collect();
                d.transfer(&mut ops, 8).unwrap_or_else(|e| panic!("{e}"));
                reads.fetch_add(32, Ordering::Relaxed);
            }
        })
    };
    crate::thread::sleep_ns(20_000_000);
    let before = reads.load(Ordering::Relaxed);
    memsnap::start(&Options {
        verify: true,
        copier_share_pct: Some(30),
        ..Options::default()
    })
    .expect("start");
    let report = memsnap::wait().expect("report");
    let during = reads.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    reader.join();
    crate::log!(
        "{} ({during} disk reads meanwhile)",
        memsnap::describe(&report)
    );
    memsnap::release().expect("release");
    assert!(during > 32, "too few reads landed during the snapshot");
    report
}
