//! Host tests of the read-write path and the split against an in-memory
//! model: a flat array of what the guest must read.

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use proptest::prelude::*;

mod split;

use super::chain::{self, Layer};
use super::check::check;
use super::create::clone_image;
use super::Qcow2Disk;
use crate::devices::block::{
    check as check_op, BlockDevice, BlockError, DiskInfo, MemDisk, Op, SECTOR_SIZE,
};

/// A disk that keeps only the first `limit` writes and silently drops
/// the rest: the image as a crash after write `limit` leaves it.
struct CrashDisk {
    inner: Arc<MemDisk>,
    writes: AtomicUsize,
    limit: usize,
}

impl CrashDisk {
    fn new(inner: Arc<MemDisk>, limit: usize) -> Self {
        CrashDisk {
            inner,
            writes: AtomicUsize::new(0),
            limit,
        }
    }
}

impl BlockDevice for CrashDisk {
    fn info(&self) -> &DiskInfo {
        self.inner.info()
    }
    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
        for op in ops.iter() {
            check_op(self.info(), op)?;
        }
        for op in ops.iter_mut() {
            if matches!(op, Op::Write { .. })
                && self.writes.fetch_add(1, Ordering::SeqCst) >= self.limit
            {
                continue;
            }
            self.inner.transfer(core::slice::from_mut(op), depth)?;
        }
        Ok(())
    }
}

/// An image file on a memory disk with `room` spare bytes to grow into.
fn image_disk(name: &str, bytes: &[u8], room: u64) -> Arc<MemDisk> {
    let sectors = (bytes.len() as u64 + room).div_ceil(512);
    let disk = MemDisk::new(name, sectors);
    disk.write(0, &pad(bytes)).unwrap();
    Arc::new(disk)
}

fn pad(bytes: &[u8]) -> Vec<u8> {
    let mut v = bytes.to_vec();
    v.resize(v.len().next_multiple_of(SECTOR_SIZE), 0);
    v
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    crate::devices::block::fill_pattern(seed, 0, &mut out);
    out
}

fn assert_sound(disk: &dyn BlockDevice) -> super::check::Report {
    let r = check(disk).unwrap();
    assert!(r.corruptions.is_empty(), "{:?}", r.corruptions);
    r
}

const SIZE: u64 = 192 << 10;

/// A chain of `depth` layers over a raw base of random data: each layer a
/// clone of the one below with some writes of its own. Returns the top's
/// bytes, the read-only layers below (bottom first) and the model.
fn chain_of(depth: usize, bits: u32, seed: u64) -> (Vec<u8>, Vec<Arc<MemDisk>>, Vec<u8>) {
    let mut model = pattern(seed, SIZE as usize);
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let mut layers = vec![base];
    let mut top = clone_image(SIZE, bits, Some(("base", "raw"))).unwrap();
    for d in 1..depth {
        let disk = image_disk(&format!("l{d}"), &top, 1 << 20);
        {
            let q = open_chain(disk.clone(), &layers);
            let data = pattern(seed + d as u64, 4096);
            let at = (d as u64 * 20_000) & !511;
            q.write_at(at, &data).unwrap();
            model[at as usize..at as usize + 4096].copy_from_slice(&data);
            q.flush().unwrap();
        }
        let name = format!("l{d}");
        layers.push(Arc::new(
            MemDisk::from_bytes(&name, &disk.contents()).read_only(),
        ));
        top = clone_image(SIZE, bits, Some((&name, "qcow2"))).unwrap();
    }
    (top, layers, model)
}

/// Opens `top` over `layers` through the chain resolver.
fn open_chain<D: BlockDevice>(top: D, layers: &[Arc<MemDisk>]) -> Qcow2Disk<D> {
    let mut resolve = |name: &str, _parent: &str| -> super::Result<Layer> {
        let d = layers
            .iter()
            .find(|d| d.info().name == name)
            .ok_or_else(|| super::Qcow2Error::Invalid(format!("missing backing file {name}")))?;
        Ok(Layer {
            dev: Box::new(d.clone()),
            id: String::from(name),
        })
    };
    chain::open(top, "top", &mut resolve).unwrap()
}

#[derive(Debug, Clone)]
enum Act {
    Write { at: u64, len: u64, seed: u64 },
    Zero { at: u64, len: u64 },
    Read { at: u64, len: u64 },
    Flush,
}

fn act() -> impl Strategy<Value = Act> {
    let sectors = SIZE / 512;
    (0..4u8, 0..sectors, 1..64u64, any::<u64>()).prop_map(move |(k, s, n, seed)| {
        let n = n.min(sectors - s);
        let (at, len) = (s * 512, n * 512);
        match k {
            0 => Act::Write { at, len, seed },
            1 => Act::Zero { at, len },
            2 => Act::Read { at, len },
            _ => Act::Flush,
        }
    })
}

/// Clusters of `bits` an act writes to (each may need a new one).
fn touched(a: &Act, bits: u32) -> u64 {
    match *a {
        Act::Write { at, len, .. } | Act::Zero { at, len } => {
            ((at + len - 1) >> bits) - (at >> bits) + 1
        }
        _ => 0,
    }
}

fn apply<D: BlockDevice>(q: &Qcow2Disk<D>, model: &mut [u8], a: &Act) -> super::Result<()> {
    match *a {
        Act::Write { at, len, seed } => {
            let data = pattern(seed, len as usize);
            q.write_at(at, &data)?;
            model[at as usize..(at + len) as usize].copy_from_slice(&data);
        }
        Act::Zero { at, len } => {
            q.write_zeroes(at, len)?;
            model[at as usize..(at + len) as usize].fill(0);
        }
        Act::Read { at, len } => {
            let mut buf = vec![0u8; len as usize];
            q.read_at(at, &mut buf)?;
            let want = &model[at as usize..(at + len) as usize];
            assert_eq!(first_difference(&buf, want), None, "read at {at:#x}");
        }
        Act::Flush => q.flush()?,
    }
    Ok(())
}

/// Where two images' bytes first differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    (a.len() != b.len())
        .then_some(a.len().min(b.len()))
        .or_else(|| a.iter().zip(b).position(|(x, y)| x != y))
}

fn read_all<D: BlockDevice>(q: &Qcow2Disk<D>) -> Vec<u8> {
    let mut all = vec![0u8; q.geometry().virtual_size as usize];
    q.read_at(0, &mut all).unwrap();
    all
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn reads_and_writes_match_the_model(depth in 1usize..=3, small in any::<bool>(), acts in prop::collection::vec(act(), 1..40)) {
        let bits = if small { 9 } else { 12 };
        let (top, layers, mut model) = chain_of(depth, bits, 7);
        let file = image_disk("top", &top, 2 << 20);
        let q = open_chain(file.clone(), &layers);
        for a in &acts {
            apply(&q, &mut model, a).unwrap();
        }
        prop_assert_eq!(first_difference(&read_all(&q), &model), None);
        // The same bytes read in one batch of ranges that each cross
        // data, holes and zeros (the image file's runs sent together).
        let mut got = vec![0u8; SIZE as usize];
        let mut ops: Vec<Op<'_>> = got
            .chunks_mut(7 * 512)
            .enumerate()
            .map(|(k, buf)| Op::Read { sector: k as u64 * 7, buf })
            .collect();
        q.transfer(&mut ops, 4).unwrap();
        drop(ops);
        prop_assert_eq!(first_difference(&got, &model), None);
        q.flush().unwrap();
        drop(q);
        let r = assert_sound(&*file);
        prop_assert_eq!(r.leaks, 0);
        let again = open_chain(file.clone(), &layers);
        prop_assert_eq!(first_difference(&read_all(&again), &model), None);
    }

    #[test]
    fn a_crash_at_any_write_leaves_a_sound_image(depth in 1usize..=3, acts in prop::collection::vec(act(), 1..16)) {
        let (top, layers, model0) = chain_of(depth, 9, 11);
        let writes = crash_after(&top, &layers, &model0, &acts, usize::MAX);
        for cut in 0..writes {
            crash_after(&top, &layers, &model0, &acts, cut);
        }
    }
}

/// Runs `acts` on the image `top` over `layers` (reading `model0`) on a
/// disk that drops every write after the first `cut`, then checks the
/// image as the crash left it; returns the writes the acts made.
fn crash_after(
    top: &[u8],
    layers: &[Arc<MemDisk>],
    model0: &[u8],
    acts: &[Act],
    cut: usize,
) -> usize {
    let mem = image_disk("top", top, 2 << 20);
    let q = open_chain(CrashDisk::new(mem.clone(), cut), layers);
    // Run until the writes stop landing. A sector may read what it held
    // at the last completed flush or after any act since (writes not
    // flushed may be lost, as on any disk with a cache); clusters written
    // since that flush bound what may leak.
    let mut model = model0.to_vec();
    let mut allowed = vec![model.clone()];
    let (mut unflushed, mut tables) = (0, 0);
    for a in acts {
        apply(&q, &mut model, a).unwrap();
        allowed.push(model.clone());
        unflushed += touched(a, 9);
        // An L2 table of 512-byte clusters maps 32 KiB.
        tables += touched(a, 15);
        if q.file().writes.load(Ordering::SeqCst) > cut {
            break;
        }
        if matches!(a, Act::Flush) {
            allowed = vec![model.clone()];
            (unflushed, tables) = (0, 0);
        }
    }
    let writes = q.file().writes.load(Ordering::SeqCst);
    drop(q);
    let r = assert_sound(&*mem);
    // Besides the data clusters: the L2 tables they needed (named in
    // the L1 table with the next write-back), and a refcount block.
    assert!(
        r.leaks <= unflushed + tables + 1,
        "cut {cut}: a crash leaked {} clusters, {unflushed} written since the last flush \
         in {tables} tables",
        r.leaks
    );
    let q = open_chain(mem.clone(), layers);
    let now = read_all(&q);
    for (s, got) in now.chunks(512).enumerate() {
        let r = s * 512..(s + 1) * 512;
        assert!(
            allowed.iter().any(|m| got == &m[r.clone()]),
            "cut {cut}: sector {s} reads a value it never held since the last flush"
        );
    }
    writes
}

#[test]
fn growing_the_refcount_table_keeps_the_image_sound() {
    // 512-byte clusters: one refcount table cluster covers 8 MiB of file.
    let size = 12 << 20;
    let img = clone_image(size, 9, None).unwrap();
    let file = image_disk("top", &img, 16 << 20);
    let q = Qcow2Disk::open(file.clone(), None).unwrap();
    let data = pattern(3, 1 << 20);
    for k in 0..10u64 {
        q.write_at(k << 20, &data).unwrap();
    }
    let mut back = vec![0u8; 1 << 20];
    q.read_at(9 << 20, &mut back).unwrap();
    assert_eq!(back, data);
    q.flush().unwrap();
    drop(q);
    let r = assert_sound(&*file);
    assert_eq!(r.leaks, 0);
    let h = crate::backup::source::read_header(&*file).unwrap();
    assert!(h.refcount_table_clusters > 1, "the table grew");
}

#[test]
fn a_crash_during_table_growth_leaks_but_never_corrupts() {
    let size = 10 << 20;
    let img = clone_image(size, 9, None).unwrap();
    let data = pattern(5, 1 << 20);
    // Writes needed to reach growth: find them once, then cut around it.
    let total = {
        let file = image_disk("top", &img, 14 << 20);
        let q = Qcow2Disk::open(CrashDisk::new(file, usize::MAX), None).unwrap();
        for k in 0..9u64 {
            q.write_at(k << 20, &data).unwrap();
        }
        q.file().writes.load(Ordering::SeqCst)
    };
    for cut in (total - 40..total).step_by(3) {
        let file = image_disk("top", &img, 14 << 20);
        let q = Qcow2Disk::open(CrashDisk::new(file.clone(), cut), None).unwrap();
        for k in 0..9u64 {
            q.write_at(k << 20, &data).unwrap();
        }
        drop(q);
        assert_sound(&*file);
    }
}

/// Reads and writes past the disk's end are refused, as the device refuses
/// them, not a panic in the tables' arithmetic.
#[test]
fn reads_and_writes_past_the_end_are_refused() {
    let img = clone_image(SIZE, 12, None).unwrap();
    let q = Qcow2Disk::open(image_disk("top", &img, 1 << 20), None).unwrap();
    let size = q.info().bytes();
    let mut buf = [0u8; 1024];
    assert!(q.read_at(size - 1024, &mut buf).is_ok());
    for at in [size - 512, size, u64::MAX - 100] {
        let e = q.read_at(at, &mut buf).unwrap_err();
        assert!(format!("{e}").contains("past"), "{e}");
        assert!(q.write_at(at, &buf).is_err());
    }
}

#[test]
fn refusals_name_what_is_wrong() {
    let img = clone_image(SIZE, 12, Some(("base.raw", "raw"))).unwrap();
    let file = image_disk("top", &img, 1 << 20);
    let err = Qcow2Disk::open(file.clone(), None).unwrap_err();
    assert!(
        format!("{err}").contains("\"base.raw\" is not attached"),
        "{err}"
    );
    // A backing image smaller than the clone is no refusal: it reads as
    // zeros past its end, as QEMU reads it.
    let small: Box<dyn BlockDevice> =
        Box::new(MemDisk::from_bytes("small", &[7u8; 8 * 512]).read_only());
    let q = Qcow2Disk::open(file.clone(), Some(small)).unwrap();
    let mut buf = [1u8; 16 * 512];
    q.read(4, &mut buf).unwrap();
    assert!(buf[..4 * 512].iter().all(|&b| b == 7));
    assert!(buf[4 * 512..].iter().all(|&b| b == 0));
    drop(q);
    // A loop: the image names itself.
    let mut resolve = |name: &str, _: &str| -> super::Result<Layer> {
        Ok(Layer {
            dev: Box::new(
                MemDisk::from_bytes(
                    name,
                    &pad(&clone_image(SIZE, 12, Some(("top", "qcow2"))).unwrap()),
                )
                .read_only(),
            ),
            id: String::from(name),
        })
    };
    let looped = image_disk(
        "top",
        &clone_image(SIZE, 12, Some(("top", "qcow2"))).unwrap(),
        0,
    );
    let err = chain::open(looped, "top", &mut resolve).unwrap_err();
    assert!(format!("{err}").contains("loops"), "{err}");
    let odd = image_disk(
        "top",
        &clone_image(SIZE, 12, Some(("b", "vmdk"))).unwrap(),
        0,
    );
    let err = chain::open(odd, "top", &mut resolve).unwrap_err();
    assert!(format!("{err}").contains("\"vmdk\""), "{err}");
    let before = file.contents();
    let _ = Qcow2Disk::open(file.clone(), None);
    assert_eq!(file.contents(), before, "nothing written on a refusal");
}

#[test]
fn a_backup_through_a_chain_restores_the_flattened_image() {
    use crate::backup::{backup, restore, Format, Plan};
    let (top, layers, model) = chain_of(3, 12, 21);
    let q = open_chain(image_disk("top", &top, 1 << 20), &layers);
    let view = super::flat::FlatView::new(&q, 12).unwrap();
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
    let view = super::flat::FlatView::new(&q, bits).unwrap();
    assert_eq!(view.data_bytes(), 2 * 4096, "clusters 0 and 4");
    let parsed = crate::backup::source::open(&view, &mut |_| {}).unwrap();
    assert_eq!(parsed.data_clusters, 2);
}
