//! Host test of the split's gate: a workload request in progress goes
//! before the split's next write to the clone.

use alloc::boxed::Box;
use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::super::chain::{self, Layer};
use super::super::create::clone_image;
use super::super::split::Split;
use super::{image_disk, SIZE};
use crate::copyonce::{words_for, Counters};
use crate::devices::block::{fill_pattern, BlockDevice, BlockError, DiskInfo, MemDisk, Op};

/// What the two disks below saw.
#[derive(Default)]
struct Seen {
    /// Reads of the base are held while set.
    hold: AtomicBool,
    /// A read of the base is being held.
    held: AtomicBool,
    /// Writes to the clone's file while a read of the base was held.
    writes_while_held: AtomicU64,
}

/// The base: its reads wait while `hold` is set (up to a deadlock guard).
struct HeldBase(Arc<MemDisk>, Arc<Seen>);

impl BlockDevice for HeldBase {
    fn info(&self) -> &DiskInfo {
        self.0.info()
    }
    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
        let s = &self.1;
        if s.hold.load(Ordering::SeqCst) {
            s.held.store(true, Ordering::SeqCst);
            let guard = std::time::Instant::now();
            while s.hold.load(Ordering::SeqCst) && guard.elapsed().as_secs() < 20 {
                std::thread::yield_now();
            }
            s.held.store(false, Ordering::SeqCst);
        }
        self.0.transfer(ops, depth)
    }
}

/// The clone's file: counts writes made while a read of the base is held.
struct WatchedTop(Arc<MemDisk>, Arc<Seen>);

impl BlockDevice for WatchedTop {
    fn info(&self) -> &DiskInfo {
        self.0.info()
    }
    fn transfer(&self, ops: &mut [Op<'_>], depth: usize) -> Result<(), BlockError> {
        let writes = ops.iter().any(|op| matches!(op, Op::Write { .. }));
        if writes && self.1.held.load(Ordering::SeqCst) {
            self.1.writes_while_held.fetch_add(1, Ordering::SeqCst);
        }
        self.0.transfer(ops, depth)
    }
}

/// Prepares a batch, then holds a workload read of a hole in the base
/// while another thread commits the batch; returns the clone writes made
/// during the hold.
fn writes_during_a_held_read(gate: bool) -> u64 {
    let bits = 12;
    let mut model = vec![0u8; SIZE as usize];
    fill_pattern(7, 0, &mut model);
    let seen = Arc::new(Seen::default());
    let base = Arc::new(MemDisk::from_bytes("base", &model).read_only());
    let img = clone_image(SIZE, bits, Some(("base", "raw"))).unwrap();
    let top = WatchedTop(image_disk("top", &img, 1 << 20), seen.clone());
    let below = seen.clone();
    let mut resolve = |_: &str, _: &str| -> crate::qcow2::Result<Layer> {
        Ok(Layer {
            dev: Box::new(HeldBase(base.clone(), below.clone())),
            id: String::from("base"),
        })
    };
    let q = chain::open(top, "top", &mut resolve).unwrap();
    let words = (0..words_for(q.geometry().vclusters))
        .map(|_| AtomicU64::new(0))
        .collect();
    let split: Split<'_, _, alloc::vec::Vec<AtomicU64>, Box<Counters>> = Split::new(
        &q,
        words,
        Box::new(Counters::new()),
        4,
        std::thread::yield_now,
    )
    .unwrap()
    .with_gate(gate);
    let batch = split.prepare().unwrap().expect("holes to fill");
    seen.hold.store(true, Ordering::SeqCst);
    std::thread::scope(|scope| {
        let read = scope.spawn(|| {
            // The last cluster: not in the first batch, still a hole.
            let mut buf = vec![0u8; 4096];
            split.read_at(SIZE - 4096, &mut buf).unwrap();
            assert_eq!(buf, model[(SIZE - 4096) as usize..]);
        });
        while !seen.held.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        let commit = scope.spawn(|| split.commit(batch).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(200));
        seen.hold.store(false, Ordering::SeqCst);
        read.join().unwrap();
        assert_eq!(commit.join().unwrap(), 4);
    });
    seen.writes_while_held.load(Ordering::SeqCst)
}

#[test]
fn the_split_writes_only_after_a_workload_request_in_progress() {
    assert_eq!(writes_during_a_held_read(true), 0);
    // Without the gate the same commit writes during the held read: the
    // test tells the two apart.
    assert!(writes_during_a_held_read(false) > 0);
}
