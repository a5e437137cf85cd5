//! Host tests of the online split: holes filled, crashes at every write
//! resumed, workload writes racing the split, and the pacing.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use super::super::create::clone_image;
use super::super::split::Split;
use super::super::{Entry, Qcow2Disk};
use super::{
    assert_sound, first_difference, image_disk, open_chain, pattern, read_all, CrashDisk, SIZE,
};
use crate::copyonce::{words_for, Counters, Pacer};
use crate::devices::block::{BlockDevice, MemDisk};
use alloc::sync::Arc;

type TestSplit<'a, D> = Split<'a, D, Vec<AtomicU64>, Box<Counters>>;

fn split_of<D: BlockDevice>(q: &Qcow2Disk<D>, batch: u64) -> TestSplit<'_, D> {
    let words = (0..words_for(q.geometry().vclusters))
        .map(|_| AtomicU64::new(0))
        .collect();
    Split::new(
        q,
        words,
        Box::new(Counters::new()),
        batch,
        core::hint::spin_loop,
    )
    .unwrap()
}

/// Runs `s` at full share, with no workload, until the backing is
/// released; its progress.
fn run_to_end<D: BlockDevice>(s: &TestSplit<'_, D>) -> super::super::split::Progress {
    let mut pacer = Pacer::new(100, u64::MAX);
    let mut clock = 0u64;
    s.run(
        &mut pacer,
        0,
        &mut || {
            clock += 1;
            clock
        },
        &mut |_| {},
        &mut |_| {},
    )
    .unwrap()
}

/// A base with data in some clusters and zeros in others.
fn sparse_base(bits: u32) -> Vec<u8> {
    let cs = 1usize << bits;
    let mut base = vec![0u8; SIZE as usize];
    for (k, c) in base.chunks_mut(cs).enumerate() {
        if k % 3 != 0 {
            crate::devices::block::fill_pattern(k as u64, 0, c);
        }
    }
    base
}

#[test]
fn split_fills_holes_then_releases_the_backing() {
    let bits = 12;
    let mut model = sparse_base(bits);
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let file = image_disk(
        "top",
        &clone_image(SIZE, bits, Some(("base", "raw"))).unwrap(),
        1 << 20,
    );
    let q = open_chain(file.clone(), core::slice::from_ref(&base));
    let s = split_of(&q, 5);
    // Workload first: a partial write to a hole, a whole-cluster write.
    let part = pattern(99, 1024);
    s.write_at(4096 + 512, &part).unwrap();
    model[4096 + 512..4096 + 1536].copy_from_slice(&part);
    let whole = pattern(98, 4096);
    s.write_at(8 * 4096, &whole).unwrap();
    model[8 * 4096..9 * 4096].copy_from_slice(&whole);
    let p = run_to_end(&s);
    assert!(p.released);
    assert_eq!(p.by_workload, 2);
    let holes = SIZE / 4096 - 2;
    assert_eq!(p.copied + p.zeroed, holes);
    let zero_holes = (0..SIZE / 4096)
        .filter(|k| k % 3 == 0 && *k != 1 && *k != 8)
        .count() as u64;
    assert_eq!(p.zeroed, zero_holes);
    assert_eq!(p.copied_bytes, (holes - zero_holes) * 4096);
    drop(s);
    assert_eq!(first_difference(&read_all(&q), &model), None);
    drop(q);
    assert_sound(&*file);
    // Without the base: the header names none, and the content stays.
    let alone = Qcow2Disk::open(file.clone(), None).unwrap();
    assert!(alone.header().backing_file.is_none() && alone.header().backing_format.is_none());
    assert_eq!(first_difference(&read_all(&alone), &model), None);
    // Holes stay holes exactly where the chain read zeros.
    for (vc, c) in model.chunks(4096).enumerate() {
        let zeros = c.iter().all(|&b| b == 0);
        assert_eq!(
            alone.entry(vc as u64).unwrap() == Entry::Hole,
            zeros,
            "{vc}"
        );
    }
}

#[test]
fn a_short_last_cluster_of_zeros_stays_a_hole_when_buffers_are_reused() {
    // Ten clusters of data, then 512 bytes of zeros: batches of three
    // reuse buffers that held data, and the last batch's short cluster
    // must not count what an earlier batch left past the disk's end.
    let size = 10 * 4096 + 512;
    let mut model = vec![0u8; size];
    for (k, c) in model[..10 * 4096].chunks_mut(4096).enumerate() {
        crate::devices::block::fill_pattern(k as u64 + 1, 0, c);
    }
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let file = image_disk(
        "top",
        &clone_image(size as u64, 12, Some(("base", "raw"))).unwrap(),
        1 << 20,
    );
    let q = open_chain(file.clone(), core::slice::from_ref(&base));
    let s = split_of(&q, 3);
    let p = run_to_end(&s);
    assert!(p.released);
    assert_eq!((p.copied, p.zeroed), (10, 1));
    drop(s);
    assert_eq!(first_difference(&read_all(&q), &model), None);
    assert_eq!(q.entry(10).unwrap(), Entry::Hole);
    drop(q);
    assert_sound(&*file);
}

/// L1 entries naming an L2 table, read from the image's bytes (not
/// through the reader).
fn l2_tables(file: &MemDisk) -> u64 {
    let bytes = file.contents();
    let be = |at: usize, n: usize| {
        bytes[at..at + n]
            .iter()
            .fold(0u64, |v, &b| (v << 8) | u64::from(b))
    };
    let (size, at) = (be(36, 4) as usize, be(40, 8) as usize);
    (0..size).filter(|k| be(at + 8 * k, 8) != 0).count() as u64
}

/// A clone of 64 MiB over two qcow2 layers holding a few clusters: the
/// split allocates L2 tables only where there was data to copy. Among the
/// rest, a zero cluster in the middle layer over data in the base and a
/// base cluster written with zero bytes: both read zeros, and so do holes
/// once the chain is released.
#[test]
fn a_split_over_a_mostly_unallocated_chain_allocates_no_tables_there() {
    const BIG: u64 = 64 << 20;
    let (bits, cs) = (12, 4096u64);
    let per_table = cs / 8 * cs; // 2 MiB of virtual space per L2 table
    let mut model = vec![0u8; BIG as usize];
    let base = image_disk("base", &clone_image(BIG, bits, None).unwrap(), 1 << 20);
    {
        let q = Qcow2Disk::open(base.clone(), None).unwrap();
        for (table, seed) in [(0u64, 1u64), (5, 2), (9, 3)] {
            let at = table * per_table + 7 * cs;
            let data = pattern(seed, cs as usize);
            q.write_at(at, &data).unwrap();
            model[at as usize..(at + cs) as usize].copy_from_slice(&data);
        }
        q.write_at(20 * per_table, &vec![0u8; cs as usize]).unwrap();
        q.flush().unwrap();
    }
    let base = Arc::new(MemDisk::from_bytes("base", &base.contents()).read_only());
    let mid = image_disk(
        "mid",
        &clone_image(BIG, bits, Some(("base", "qcow2"))).unwrap(),
        1 << 20,
    );
    {
        let q = open_chain(mid.clone(), core::slice::from_ref(&base));
        let at = 9 * per_table + 7 * cs;
        q.write_zeroes(at, cs).unwrap();
        model[at as usize..(at + cs) as usize].fill(0);
        let at = 12 * per_table;
        let data = pattern(4, cs as usize);
        q.write_at(at, &data).unwrap();
        model[at as usize..(at + cs) as usize].copy_from_slice(&data);
        q.flush().unwrap();
    }
    let layers = [
        base,
        Arc::new(MemDisk::from_bytes("mid", &mid.contents()).read_only()),
    ];
    let file = image_disk(
        "top",
        &clone_image(BIG, bits, Some(("mid", "qcow2"))).unwrap(),
        1 << 20,
    );
    let q = open_chain(file.clone(), &layers);
    let s = split_of(&q, 8);
    while s.step().unwrap() > 0 {}
    assert!(s.finish().unwrap());
    drop(s);
    drop(q);
    let r = assert_sound(&*file);
    assert_eq!(r.leaks, 0);
    // Tables 0, 5 and 12 hold data; 9 (a zero cluster over data) and 20
    // (zero bytes) read zeros and need none.
    let with_data: alloc::collections::BTreeSet<u64> = model
        .chunks(cs as usize)
        .enumerate()
        .filter(|(_, c)| c.iter().any(|&b| b != 0))
        .map(|(k, _)| k as u64 * cs / per_table)
        .collect();
    assert_eq!(with_data.len(), 3);
    assert_eq!(l2_tables(&file), 3);
    assert_eq!(r.data_clusters, 3);
    let alone = Qcow2Disk::open(file.clone(), None).unwrap();
    assert!(alone.header().backing_file.is_none());
    assert_eq!(first_difference(&read_all(&alone), &model), None);
}

/// The split's data in requests of one cluster, three sent together (a
/// batch's run of four: a group of three, last first, then one): a crash
/// may keep any subset of a group's writes.
fn grouped<D: BlockDevice>(q: &Qcow2Disk<D>) {
    q.set_write_chunk(1);
    q.set_write_depth(3);
}

#[test]
fn a_split_crashed_at_any_write_resumes_without_recopying() {
    let bits = 12;
    let model = sparse_base(bits);
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let img = clone_image(SIZE, bits, Some(("base", "raw"))).unwrap();
    let full = {
        let file = image_disk("top", &img, 1 << 20);
        let q = open_chain(
            CrashDisk::new(file, usize::MAX),
            core::slice::from_ref(&base),
        );
        grouped(&q);
        let s = split_of(&q, 4).with_write_back(8 * 4096);
        while s.step().unwrap() > 0 {}
        s.finish().unwrap();
        drop(s);
        q.file().writes.load(Ordering::SeqCst)
    };
    for cut in 0..full {
        let file = image_disk("top", &img, 1 << 20);
        let q = open_chain(
            CrashDisk::new(file.clone(), cut),
            core::slice::from_ref(&base),
        );
        grouped(&q);
        let s = split_of(&q, 4).with_write_back(8 * 4096);
        while s.step().unwrap() > 0 {}
        s.finish().unwrap();
        drop(s);
        drop(q);
        let r = assert_sound(&*file);
        // What was copied since the last write-back (at most 8 clusters
        // and one batch of 4), or a new L2 table.
        assert!(
            r.leaks <= 8 + 4 + 1,
            "cut {cut}: {} leaks, more than a write-back's worth",
            r.leaks
        );
        // Resume on the crashed image: the chain reads the same, the split
        // copies only what is still a hole.
        let q = if crate::backup::source::read_header(&*file)
            .unwrap()
            .backing_file
            .is_some()
        {
            open_chain(file.clone(), core::slice::from_ref(&base))
        } else {
            Qcow2Disk::open(file.clone(), None).unwrap()
        };
        assert_eq!(first_difference(&read_all(&q), &model), None, "cut {cut}");
        let holes = (0..SIZE / 4096)
            .filter(|&vc| q.entry(vc).unwrap() == Entry::Hole)
            .count() as u64;
        let s = split_of(&q, 4);
        while s.step().unwrap() > 0 {}
        assert!(s.finish().unwrap());
        assert_eq!(
            s.progress().copied + s.progress().zeroed,
            holes,
            "cut {cut}"
        );
        drop(s);
        assert_eq!(first_difference(&read_all(&q), &model), None);
        drop(q);
        assert_sound(&*file);
    }
}

#[test]
fn workload_writes_race_the_split_on_threads() {
    extern crate std;
    let bits = 12;
    let base_bytes = sparse_base(bits);
    let base = Arc::new(MemDisk::from_bytes("base", &base_bytes).read_only());
    let file = image_disk(
        "top",
        &clone_image(SIZE, bits, Some(("base", "raw"))).unwrap(),
        1 << 20,
    );
    let q = open_chain(file.clone(), core::slice::from_ref(&base));
    let s = split_of(&q, 3);
    let mut model = base_bytes.clone();
    std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut rng = crate::support::rng::Rng::new(4);
            let mut writes = Vec::new();
            for _ in 0..200 {
                let at = rng.below(SIZE / 512 - 4) * 512;
                let len = (1 + rng.below(4)) * 512;
                let data = pattern(rng.next_u64(), len as usize);
                s.write_at(at, &data).unwrap();
                writes.push((at, data));
            }
            writes
        });
        while s.step().unwrap() > 0 {}
        for (at, data) in writer.join().unwrap() {
            model[at as usize..at as usize + data.len()].copy_from_slice(&data);
        }
    });
    while s.step().unwrap() > 0 {}
    assert!(s.finish().unwrap());
    drop(s);
    assert_eq!(first_difference(&read_all(&q), &model), None);
    drop(q);
    let r = assert_sound(&*file);
    assert_eq!(r.leaks, 0);
}

/// Runs a split of a fresh clone, batch by batch, with `ops` workload
/// reads during each batch of `ms` (a fake clock; the pacer's nominal
/// burst is 10 ms); returns the rests the pacer asked for.
fn rests_with_workload(ops: u64, ms: u64, busy_ops: u64) -> Vec<u64> {
    let bits = 12;
    let base = Arc::new(MemDisk::from_bytes("base", &sparse_base(bits)).read_only());
    let file = image_disk(
        "top",
        &clone_image(SIZE, bits, Some(("base", "raw"))).unwrap(),
        1 << 20,
    );
    let q = open_chain(file, core::slice::from_ref(&base));
    let s = split_of(&q, 2);
    let clock = core::cell::Cell::new(0u64);
    let mut rests = Vec::new();
    let mut pacer = Pacer::new(100, 10_000_000).with_floor(50);
    let mut buf = vec![0u8; 512];
    s.run_from(
        &mut || {
            for _ in 0..ops {
                s.read_at(0, &mut buf).unwrap();
            }
            clock.set(clock.get() + ms * 1_000_000);
            s.prepare()
        },
        &mut pacer,
        busy_ops,
        &mut || clock.get(),
        &mut |ns| {
            rests.push(ns);
            clock.set(clock.get() + ns);
        },
        &mut |_| {},
    )
    .unwrap();
    rests
}

#[test]
fn the_split_steps_aside_only_for_a_workload_above_the_busy_rate() {
    // 5 requests per 10 ms against a bound of 10: reduced activity, the
    // split never rests; nor with 20 in a batch of 40 ms (the same rate).
    for (ops, ms) in [(5, 10), (20, 40)] {
        let quiet = rests_with_workload(ops, ms, 10);
        assert!(
            !quiet.is_empty() && quiet.iter().all(|&ns| ns == 0),
            "{quiet:?}"
        );
    }
    // 20 per 10 ms: busy, the split rests as long as it worked (floor 50).
    let busy = rests_with_workload(20, 10, 10);
    assert!(busy.iter().all(|&ns| ns >= 10_000_000), "{busy:?}");
    // A bound of 0 counts any request.
    let any = rests_with_workload(1, 10, 0);
    assert!(any.iter().all(|&ns| ns >= 10_000_000), "{any:?}");
}

/// A disk with a volatile write cache: writes reach `live` (what reads
/// see) at once and `durable` only at a flush. After write `limit` the
/// device is gone (later writes and flushes are lost), and the crash keeps
/// a seeded subset of the writes since the last flush, in any order, as a
/// disk cache may.
struct CacheDisk {
    live: Arc<MemDisk>,
    durable: Arc<MemDisk>,
    pending: std::sync::Mutex<Vec<(u64, Vec<u8>)>>,
    writes: core::sync::atomic::AtomicUsize,
    limit: usize,
}

extern crate std;

impl CacheDisk {
    fn new(image: &[u8], limit: usize) -> Self {
        CacheDisk {
            live: image_disk("top", image, 1 << 20),
            durable: image_disk("top", image, 1 << 20),
            pending: std::sync::Mutex::new(Vec::new()),
            writes: core::sync::atomic::AtomicUsize::new(0),
            limit,
        }
    }

    fn crashed(&self) -> bool {
        self.writes.load(Ordering::SeqCst) >= self.limit
    }

    /// The image the crash leaves: the durable writes and a seeded subset
    /// of the others.
    fn after_crash(&self, seed: u64) -> Arc<MemDisk> {
        let mut rng = crate::support::rng::Rng::new(seed);
        for (sector, data) in self.pending.lock().unwrap().iter() {
            if rng.below(2) == 1 {
                self.durable.write(*sector, data).unwrap();
            }
        }
        self.durable.clone()
    }
}

impl BlockDevice for CacheDisk {
    fn info(&self) -> &crate::devices::block::DiskInfo {
        self.live.info()
    }
    fn transfer(
        &self,
        ops: &mut [crate::devices::block::Op<'_>],
        depth: usize,
    ) -> Result<(), crate::devices::block::BlockError> {
        use crate::devices::block::Op;
        for op in ops.iter_mut() {
            match op {
                Op::Write { sector, buf } => {
                    if self.writes.fetch_add(1, Ordering::SeqCst) >= self.limit {
                        continue;
                    }
                    self.pending.lock().unwrap().push((*sector, buf.to_vec()));
                }
                Op::Flush if !self.crashed() => {
                    for (sector, data) in self.pending.lock().unwrap().drain(..) {
                        self.durable.write(sector, &data).unwrap();
                    }
                }
                _ => {}
            }
            if !(matches!(op, Op::Write { .. }) && self.crashed()) {
                self.live.transfer(core::slice::from_mut(op), depth)?;
            }
        }
        Ok(())
    }
}

#[test]
fn a_crash_keeping_any_unflushed_writes_leaves_a_sound_clone() {
    crash_keeping_any_unflushed_writes(false);
}

#[test]
fn a_crash_with_write_backs_running_late_leaves_a_sound_clone() {
    crash_keeping_any_unflushed_writes(true);
}

/// With `deferred`, the split leaves its write-backs to the caller, which
/// runs each one a batch after it fell due (as a write-back thread does,
/// while the split goes on): a crash may then leak two intervals' worth.
fn crash_keeping_any_unflushed_writes(deferred: bool) {
    let bits = 12;
    let model = sparse_base(bits);
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let img = clone_image(SIZE, bits, Some(("base", "raw"))).unwrap();
    let run = |limit: usize| {
        let q = open_chain(CacheDisk::new(&img, limit), core::slice::from_ref(&base));
        grouped(&q);
        let s = split_of(&q, 4)
            .with_write_back(8 * 4096)
            .with_deferred_write_back(deferred);
        // Workload writes between batches: in place, and to holes.
        let mut k = 0u64;
        let mut late = false;
        loop {
            let _ = s.write_at((k * 37 % (SIZE / 512)) * 512, &pattern(k, 512));
            k += 1;
            let due = deferred && s.take_write_back_due();
            let more = s.step().is_ok_and(|n| n > 0);
            if late {
                let _ = q.write_back();
            }
            late = due;
            if !more {
                break;
            }
        }
        let _ = s.finish();
        drop(s);
        (q.into_file(), k)
    };
    let (full, _) = run(usize::MAX);
    let full = full.writes.load(Ordering::SeqCst);
    assert!(full > 20, "{full} writes");
    for cut in 0..full {
        let (disk, writes) = run(cut);
        for seed in 0..2 {
            let file = disk.after_crash(seed ^ (cut as u64) << 1);
            let r = assert_sound(&*file);
            let wb = if deferred { 2 * 8 } else { 8 };
            assert!(r.leaks <= wb + 4 + 2 + 64, "cut {cut}: {} leaks", r.leaks);
            // What was durable reads as the chain with some of the
            // workload's writes: every cluster the base's or a written one.
            let header = crate::backup::source::read_header(&*file).unwrap();
            let q = if header.backing_file.is_some() {
                open_chain(file.clone(), core::slice::from_ref(&base))
            } else {
                Qcow2Disk::open(file.clone(), None).unwrap()
            };
            let got = read_all(&q);
            for (vc, (a, b)) in got.chunks(4096).zip(model.chunks(4096)).enumerate() {
                let written =
                    (0..writes).any(|k| (k * 37 % (SIZE / 512)) * 512 / 4096 == vc as u64);
                assert!(
                    written || a == b,
                    "cut {cut}: cluster {vc} reads what it never held"
                );
            }
        }
    }
}

/// A disk whose flushes wait (up to a deadlock guard) until `go` is set,
/// and record whether it was.
struct SlowFlush {
    inner: Arc<MemDisk>,
    go: core::sync::atomic::AtomicBool,
    flushing: core::sync::atomic::AtomicBool,
    saw_go: core::sync::atomic::AtomicBool,
}

impl BlockDevice for SlowFlush {
    fn info(&self) -> &crate::devices::block::DiskInfo {
        self.inner.info()
    }
    fn transfer(
        &self,
        ops: &mut [crate::devices::block::Op<'_>],
        depth: usize,
    ) -> Result<(), crate::devices::block::BlockError> {
        if ops
            .iter()
            .any(|op| matches!(op, crate::devices::block::Op::Flush))
        {
            self.flushing.store(true, Ordering::SeqCst);
            let guard = std::time::Instant::now();
            while !self.go.load(Ordering::SeqCst) && guard.elapsed().as_secs() < 20 {
                std::thread::yield_now();
            }
            self.saw_go
                .fetch_or(self.go.load(Ordering::SeqCst), Ordering::SeqCst);
        }
        self.inner.transfer(ops, depth)
    }
}

#[test]
fn reads_of_holes_go_on_during_a_write_back_flush() {
    let bits = 12;
    let model = sparse_base(bits);
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let img = clone_image(SIZE, bits, Some(("base", "raw"))).unwrap();
    let file = SlowFlush {
        inner: image_disk("top", &img, 1 << 20),
        go: false.into(),
        flushing: false.into(),
        saw_go: false.into(),
    };
    let q = open_chain(file, core::slice::from_ref(&base));
    // A first write makes the L2 table (its own flush, let through).
    q.file().go.store(true, Ordering::SeqCst);
    q.write_at(0, &pattern(1, 4096)).unwrap();
    q.write_at(8 * 4096, &pattern(2, 4096)).unwrap();
    q.file().go.store(false, Ordering::SeqCst);
    q.file().flushing.store(false, Ordering::SeqCst);
    q.file().saw_go.store(false, Ordering::SeqCst);
    std::thread::scope(|scope| {
        let wb = scope.spawn(|| q.write_back().unwrap());
        while !q.file().flushing.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // The write-back is in its flush: a hole reads from the base.
        let mut buf = vec![0u8; 4096];
        q.read_at(4 * 4096, &mut buf).unwrap();
        assert_eq!(buf, model[4 * 4096..5 * 4096]);
        q.file().go.store(true, Ordering::SeqCst);
        wb.join().unwrap();
    });
    assert!(
        q.file().saw_go.load(Ordering::SeqCst),
        "the read waited for the flush"
    );
    drop(q);
}
