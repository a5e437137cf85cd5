//! A write-heavy workload that keeps running while a snapshot is taken:
//! several threads, each writing its own memory region at random and in
//! sequential sweeps, allocating and freeing heap blocks, and recursing
//! deeply on its stack (each pattern can be left out, see
//! [`Workload::start_with`]). Everything it writes goes through mappings
//! the snapshot must handle (the physical map, the heap, thread stacks).

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use snapshot::memsnap::soak::Patterns;
use snapshot::support::rng::Rng;

use crate::memory::frames::OwnedRun;
use crate::thread::{self, JoinHandle};

/// Running workload threads.
#[derive(Debug)]
pub struct Workload {
    stop: Arc<AtomicBool>,
    ops: Arc<Vec<AtomicU64>>,
    threads: Vec<JoinHandle<OwnedRun>>,
}

/// Stack for workload threads: room for the deep recursion.
const STACK: u64 = 64 * 1024;

impl Workload {
    /// Starts `threads` threads, each with `bytes_each` of memory, seeded
    /// from `seed`. Returns `None` if the memory cannot be had.
    pub fn start(threads: usize, bytes_each: u64, seed: u64) -> Option<Self> {
        Self::start_with(threads, bytes_each, seed, Patterns::ALL_WRITES)
    }

    /// As [`Self::start`], running only `patterns` (its `dma` is not the
    /// workload's: a device does that).
    pub fn start_with(
        threads: usize,
        bytes_each: u64,
        seed: u64,
        patterns: Patterns,
    ) -> Option<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let ops = Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect::<Vec<_>>());
        let mut handles = Vec::new();
        for t in 0..threads {
            let mut region = OwnedRun::alloc(bytes_each.div_ceil(4096).max(1))?;
            let (stop, ops) = (stop.clone(), ops.clone());
            let rng = Rng::new(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let handle = thread::spawn_with_stack("workload", STACK, move || {
                run(region.words_mut(), rng, patterns, &stop, &ops[t]);
                region
            })
            .ok()?;
            handles.push(handle);
        }
        Some(Workload {
            stop,
            ops,
            threads: handles,
        })
    }

    /// Operations done so far, all threads together.
    pub fn ops(&self) -> u64 {
        self.ops.iter().map(|o| o.load(Ordering::Relaxed)).sum()
    }

    /// Stops every thread and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            drop(t.join());
        }
    }
}

fn run(words: &mut [u64], mut rng: Rng, p: Patterns, stop: &AtomicBool, ops: &AtomicU64) {
    let len = words.len();
    let mut sweep = 0usize;
    let mut done = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..if p.random { 256 } else { 0 } {
            let i = rng.below(words.len() as u64) as usize;
            words[i] = words[i].wrapping_add(rng.next_u64() | 1);
        }
        if p.sequential {
            // A sequential sweep over one page.
            let page = &mut words[sweep..(sweep + 512).min(len)];
            for (k, w) in page.iter_mut().enumerate() {
                *w ^= (done << 12) | k as u64;
            }
            sweep = (sweep + 512) % len.max(1);
        }
        if p.heap && done.is_multiple_of(16) {
            let len = 16 + rng.below(4096) as usize;
            let mut block = alloc::vec![done as u8; len];
            block[len / 2] ^= 1;
            core::hint::black_box(&block);
        }
        if p.recursion && done.is_multiple_of(64) {
            core::hint::black_box(recurse(48, done));
        }
        done += 1;
        ops.store(done, Ordering::Relaxed);
    }
}

/// Recursion with a 256-byte frame per level, so stacks are deep and dirty.
fn recurse(depth: u32, seed: u64) -> u64 {
    let mut frame = [seed; 32];
    frame[depth as usize % 32] = u64::from(depth);
    let below = if depth == 0 {
        0
    } else {
        recurse(depth - 1, seed ^ u64::from(depth))
    };
    core::hint::black_box(&mut frame);
    frame.iter().fold(below, |a, b| a.wrapping_add(*b))
}
