//! Host tests of the clone split against the same in-memory model: holes
//! filled from the chain and the backing released, a crash at any write
//! resumed without recopying, workload writes racing the split on
//! threads, and the backup and flat view through a chain.

use super::*;

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
    let mut pacer = Pacer::new(100, u64::MAX);
    let mut clock = 0u64;
    let p = s
        .run(
            &mut pacer,
            0,
            &mut || {
                clock += 1;
                clock
            },
            &mut |_| {},
            &mut |_| {},
        )
        .unwrap();
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
    assert!((0..SIZE / 4096).all(|vc| alone.entry(vc).unwrap() != Entry::Hole));
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

#[test]
fn a_backup_through_a_chain_restores_the_flattened_image() {
    use crate::backup::{backup, restore, Format, Plan};
    let (top, layers, model) = chain_of(3, 12, 21);
    let q = open_chain(image_disk("top", &top, 1 << 20), &layers);
    let view = crate::qcow2::flat::FlatView::new(&q, 12).unwrap();
    // Raw at the bottom: every cluster is data.
    assert_eq!(view.data_bytes(), SIZE);
    let plan = Plan::new(&view).unwrap();
    let tape = MemDisk::new("tape", plan.layout.stream_bytes().div_ceil(512));
    backup(&view, &tape, &mut |_, _, _| {}).unwrap();
    let out = MemDisk::new("out", SIZE / 512);
    restore(&tape, &out, Format::Raw, &mut |_, _, _| {}).unwrap();
    assert_eq!(first_difference(&out.contents(), &model), None);
}

#[test]
fn a_flat_view_holds_only_the_clusters_with_data() {
    let bits = 12;
    // A qcow2 base with data in two clusters, a clone writing a third and
    // zeroing one of the base's.
    let base_img = image_disk("base", &clone_image(SIZE, bits, None).unwrap(), 1 << 20);
    {
        let b = Qcow2Disk::open(base_img.clone(), None).unwrap();
        b.write_at(0, &pattern(1, 4096)).unwrap();
        b.write_at(8192, &pattern(2, 4096)).unwrap();
        b.flush().unwrap();
    }
    let base = Arc::new(MemDisk::from_bytes("base", &base_img.contents()).read_only());
    let file = image_disk(
        "top",
        &clone_image(SIZE, bits, Some(("base", "qcow2"))).unwrap(),
        1 << 20,
    );
    let q = open_chain(file, core::slice::from_ref(&base));
    q.write_at(4 * 4096, &pattern(3, 512)).unwrap();
    q.write_zeroes(8192, 4096).unwrap();
    let view = crate::qcow2::flat::FlatView::new(&q, bits).unwrap();
    assert_eq!(view.data_bytes(), 2 * 4096, "clusters 0 and 4");
    let parsed = crate::backup::source::open(&view, &mut |_| {}).unwrap();
    assert_eq!(parsed.data_clusters, 2);
}
