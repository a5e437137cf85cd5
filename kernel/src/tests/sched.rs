use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::clock::now_ns;
use crate::thread;

const MS: u64 = 1_000_000;
/// How long a test waits for something that should take milliseconds
/// before it calls it a hang. A cap, not a measure: under TCG a busy host
/// can stall the guest for any time, so no test here judges how long a
/// thing took, only whether it happened.
const GIVE_UP: u64 = 10_000 * MS;

/// A thread that spins without ever yielding must not stop another thread
/// (which sleeps and wakes 20 times) from finishing, and must itself progress.
pub fn spinning_thread_does_not_starve_another() {
    let stop = Arc::new(AtomicBool::new(false));
    let spins = Arc::new(AtomicU64::new(0));
    let spinner = {
        let (stop, spins) = (stop.clone(), spins.clone());
        thread::spawn("spinner", move || {
            while !stop.load(Ordering::Relaxed) {
                spins.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let started = now_ns();
    let sleeper = thread::spawn("sleeper", || {
        for _ in 0..20 {
            thread::sleep_ns(MS);
        }
        now_ns()
    });
    let finished = sleeper.join();
    stop.store(true, Ordering::Relaxed);
    spinner.join();
    let took = finished - started;
    assert!(
        took < GIVE_UP,
        "sleeper starved: 20 x 1 ms sleeps took {} ms",
        took / MS
    );
    assert!(spins.load(Ordering::Relaxed) > 0, "spinner never ran");
}

/// Two CPU-bound threads that never yield (a workload and a background
/// task) both run, in many alternating slices: each spins until both have
/// had [`SLICES`] of them, which preemption brings in about 80 ms; without
/// it the first would spin alone until [`GIVE_UP`].
pub fn workload_and_background_interleave() {
    const SLICES: u64 = 10;
    let last = Arc::new(AtomicUsize::new(usize::MAX));
    let slices = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let give_up = now_ns() + GIVE_UP;
    let run = |me: usize, last: Arc<AtomicUsize>, slices: Arc<[AtomicU64; 2]>| {
        move || {
            let mut work = 0u64;
            while slices.iter().any(|s| s.load(Ordering::Relaxed) < SLICES) && now_ns() < give_up {
                if last.swap(me, Ordering::Relaxed) != me {
                    slices[me].fetch_add(1, Ordering::Relaxed);
                }
                work += 1;
            }
            work
        }
    };
    let workload = thread::spawn("workload", run(0, last.clone(), slices.clone()));
    let background = thread::spawn("background", run(1, last, slices.clone()));
    let (w_work, b_work) = (workload.join(), background.join());
    let [w_slices, b_slices] = [0, 1].map(|i| slices[i].load(Ordering::Relaxed));
    crate::log!("workload: {w_slices} slices, background: {b_slices} slices");
    assert!(w_work > 0 && b_work > 0, "a thread made no progress");
    assert!(
        w_slices >= SLICES && b_slices >= SLICES,
        "not interleaved: {w_slices} and {b_slices} slices"
    );
}

/// Sleep lasts at least as long as asked (and ends: a unit error, a
/// thousand times longer, would exceed [`GIVE_UP`]), a
/// blocked thread wakes on `wake_all`, and `join` returns the thread's value.
pub fn sleep_block_wake_and_join() {
    let t0 = now_ns();
    thread::sleep_ns(20 * MS);
    let slept = now_ns() - t0;
    assert!(
        (20 * MS..GIVE_UP).contains(&slept),
        "sleep(20 ms) took {} us",
        slept / 1000
    );

    let flag = Arc::new(AtomicBool::new(false));
    let key = Arc::as_ptr(&flag) as usize;
    let waiter = {
        let flag = flag.clone();
        thread::spawn("waiter", move || {
            thread::block_until(key, || flag.load(Ordering::Acquire));
            now_ns()
        })
    };
    // Until the waiter has gone to sleep: on a busy host its CPU may not
    // have run it yet, however long we wait here in the guest's time.
    super::eventually("waiter did not block", || thread::blocked_on(key) > 0);
    assert!(!waiter.is_finished(), "waiter did not block");
    let set_at = now_ns();
    flag.store(true, Ordering::Release);
    assert_eq!(thread::wake_all(key), 1, "exactly the waiter was blocked");
    let woke_at = waiter.join();
    assert!(woke_at >= set_at, "waiter woke before the flag was set");

    let answer = thread::spawn("answer", || (1..=10u64).product::<u64>()).join();
    assert_eq!(answer, 3_628_800);
}

/// Spawning far more threads than there are slots works as long as they are
/// joined or detached, and leaves no stack frames behind.
pub fn threads_are_reaped_and_slots_reused() {
    let (free_before, _) = crate::memory::frames::stats();
    for batch in 0..6u64 {
        let handles: Vec<_> = (0..40u64)
            .map(|i| thread::spawn("batch", move || batch * 100 + i))
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.join(), batch * 100 + i as u64);
        }
    }
    // Detached threads are reaped by later spawns.
    for _ in 0..80 {
        drop(thread::spawn("detached", || thread::sleep_ns(MS)));
        thread::yield_now();
    }
    thread::sleep_ns(10 * MS);
    thread::spawn("reaper", || ()).join();
    // Page-table pages made for stack slots stay; stack pages must not.
    let (free_after, _) = crate::memory::frames::stats();
    let leaked = free_before.saturating_sub(free_after);
    assert!(
        leaked <= 64,
        "{leaked} frames not returned after 320 threads"
    );
}
