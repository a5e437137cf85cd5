//! Several CPUs: every CPU reports in, threads sleep, block and join across
//! CPUs, and a lock hammered from every CPU loses no update. Each test also
//! passes on one CPU (it then checks what one CPU can show).
//!
//! The reference for "which CPU ran this" is the hardware: the local APIC
//! id register read on the CPU itself, not the kernel's per-CPU records.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::sync::IrqMutex;
use crate::thread;

/// Spawns one thread pinned to each online CPU; each returns `f()` and the
/// APIC id the hardware reports where `f` ran.
fn on_each_cpu<T: Send + 'static>(f: impl Fn(usize) -> T + Send + Sync + 'static) -> Vec<(T, u32)> {
    let f = Arc::new(f);
    let cpus: Vec<usize> = (0..crate::arch::percpu::MAX_CPUS)
        .filter(|&c| crate::arch::percpu::is_online(c))
        .collect();
    let handles: Vec<_> = cpus
        .iter()
        .map(|&cpu| {
            let f = f.clone();
            thread::spawn("on-cpu", move || {
                assert!(thread::set_affinity(1 << cpu, false), "pin to CPU {cpu}");
                let value = f(cpu);
                // Read with interrupts off: the value belongs to this CPU.
                let _irq = crate::sync::IrqOff::new();
                assert!(thread::current_cpu() == cpu, "ran off CPU {cpu}");
                (value, crate::arch::apic::id())
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join()).collect()
}

/// Every CPU QEMU gives reports in (as many as the runner asked for, when it
/// says), and each runs a thread: the hardware shows as many distinct APIC
/// ids as CPUs are online.
pub fn every_cpu_reports_in() {
    let online = thread::cpus();
    if let Some(expected) = crate::ktest::expected_cpus() {
        assert_eq!(online, expected, "CPUs online vs. -smp");
    }
    let mut ids: Vec<u32> = on_each_cpu(|_| ()).into_iter().map(|(_, id)| id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), online, "distinct APIC ids seen {ids:?}");
}

/// A thread on the last CPU sleeps, then blocks until the boot CPU wakes it;
/// the boot CPU joins it; a thread on the last CPU joins one on CPU 0.
pub fn sleep_block_and_join_across_cpus() {
    let last = (0..crate::arch::percpu::MAX_CPUS)
        .rev()
        .find(|&c| crate::arch::percpu::is_online(c))
        .unwrap_or(0);
    let flag = Arc::new(AtomicU64::new(0));
    let key = Arc::as_ptr(&flag) as usize;
    let sleeper = {
        let flag = flag.clone();
        thread::spawn("sleeper", move || {
            assert!(thread::set_affinity(1 << last, false));
            thread::sleep_ns(2_000_000);
            thread::block_until(key, || flag.load(Ordering::Acquire) != 0);
            (flag.load(Ordering::Acquire), thread::current_cpu())
        })
    };
    for _ in 0..10 {
        thread::sleep_ns(1_000_000);
    }
    flag.store(7, Ordering::Release);
    thread::wake_all(key);
    let (seen, cpu) = sleeper.join();
    assert_eq!((seen, cpu), (7, last), "woken value and CPU");
    let on_zero = thread::spawn("cpu0", || {
        assert!(thread::set_affinity(1, false));
        thread::sleep_ns(1_000_000);
        41 + 1
    });
    let joiner = thread::spawn("joiner", move || {
        assert!(thread::set_affinity(1 << last, false));
        on_zero.join()
    });
    assert_eq!(joiner.join(), 42);
}

/// Per thread: increments of the locked counter.
const ROUNDS: u64 = 20_000;

/// One thread per CPU plus as many again (oversubscribed) increment a plain
/// counter under an `IrqMutex`, read-pause-write so a broken lock loses
/// updates; an atomic counts the same increments independently.
pub fn lock_hammered_from_all_cpus() {
    let counter = Arc::new(IrqMutex::new(0u64));
    let independent = Arc::new(AtomicU64::new(0));
    let threads = 2 * thread::cpus();
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (counter, independent) = (counter.clone(), independent.clone());
            thread::spawn("hammer", move || {
                for _ in 0..ROUNDS {
                    let mut held = counter.lock();
                    let seen = *held;
                    core::hint::black_box(&seen);
                    for _ in 0..8 {
                        core::hint::spin_loop();
                    }
                    *held = seen + 1;
                    independent.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for h in handles {
        h.join();
    }
    let total = *counter.lock();
    assert_eq!(total, independent.load(Ordering::Relaxed));
    assert_eq!(total, threads as u64 * ROUNDS);
}

/// A live snapshot while threads write on every CPU at once (twice as many
/// as CPUs), sessions on all CPUs (the default): it equals the stop-the-world
/// reference hashed at the instant, and every page is copied exactly once;
/// then an abort mid-way restores every permission on every CPU (the
/// writers go on without a fatal fault). The copier reserves the last CPU,
/// so with two CPUs every write fault races the copier on the other CPU,
/// and with more the writers also race each other. The race itself, not a
/// proof: the soak repeats it over many seeds.
pub fn snapshot_with_writers_on_every_cpu() {
    use crate::memsnap;
    use crate::workload::Workload;
    let threads = 2 * thread::cpus();
    for seed in [11u64, 12] {
        let workload = Workload::start(threads, 4 << 20, seed).expect("workload memory");
        thread::sleep_ns(5_000_000);
        let opts = memsnap::Options {
            verify: true,
            copier_share_pct: Some(50),
            ..memsnap::Options::default()
        };
        memsnap::start(&opts).expect("start");
        let report = memsnap::wait().expect("report");
        workload.stop();
        assert_eq!(
            report.mismatched,
            Some(0),
            "snapshot differs from the instant"
        );
        assert_eq!(
            report.not_copied_once,
            Some(0),
            "a page copied twice or never"
        );
        assert_eq!(report.stats.copied(), report.pages, "counts by cause");
        assert!(report.stats.fault > 0, "seed {seed}: no write faulted");
        memsnap::release().expect("release");
    }
    let workload = Workload::start(threads, 4 << 20, 13).expect("workload memory");
    memsnap::start(&memsnap::Options {
        copier_share_pct: Some(1),
        ..memsnap::Options::default()
    })
    .expect("start");
    thread::sleep_ns(20_000_000);
    memsnap::abort().expect("abort");
    super::eventually("the writers made no progress", || workload.ops() > 0);
    workload.stop();
}

/// A page made read-only on CPU 0 refuses a write on every other CPU,
/// although each had just written it (so its TLB held the writable entry):
/// the permission removal's shootdown reached them. Without it, a CPU keeps
/// writing through its stale entry.
pub fn permission_removal_reaches_every_cpu() {
    use crate::memory::probe::ScratchPage;
    assert!(thread::set_affinity(1, false), "main on CPU 0");
    let others: Vec<usize> = (1..crate::arch::percpu::MAX_CPUS)
        .filter(|&c| crate::arch::percpu::is_online(c))
        .collect();
    for cpu in others {
        let page = Arc::new(ScratchPage::new().expect("scratch page"));
        let step = Arc::new(AtomicU64::new(0));
        let probe = {
            let (page, step) = (page.clone(), step.clone());
            thread::spawn("prober", move || {
                assert!(thread::set_affinity(1 << cpu, false));
                let before = page.probe_write(0, 1);
                step.store(1, Ordering::Release);
                while step.load(Ordering::Acquire) != 2 {
                    core::hint::spin_loop();
                }
                (before, page.probe_write(0, 2), thread::current_cpu())
            })
        };
        while step.load(Ordering::Acquire) != 1 {
            thread::yield_now();
        }
        page.set_writable(false).expect("protect");
        step.store(2, Ordering::Release);
        let (before, after, ran_on) = probe.join();
        assert_eq!(ran_on, cpu);
        assert_eq!(
            before,
            Ok(()),
            "CPU {cpu}: the writable page refused a write"
        );
        assert!(
            after.is_err(),
            "CPU {cpu} wrote a page made read-only elsewhere"
        );
        assert_eq!(
            crate::memory::probe::read_u64(page.addr()),
            Ok(1),
            "CPU {cpu}"
        );
    }
    assert!(thread::set_affinity(u64::MAX, false));
}

/// How long [`copier_cpu_runs_nothing_else_while_it_copies`] waits for
/// every thread to run once during the snapshot: far more than a turn of
/// the scheduler takes, on any host.
const NOTE_WAIT_NS: u64 = 30_000_000_000;

/// While a snapshot's copier has its CPU (the default with several CPUs),
/// no other thread runs there: threads, one of them pinned to that CPU,
/// note the hardware's APIC id wherever they run during the snapshot, and
/// none is the copier CPU's; the pinned one runs on the others meanwhile
/// (a reservation starves nobody), and is back on its CPU once the copier
/// has ended. The copier took all of its CPU (the default share there).
/// The copier is held (its CPU still reserved) until every thread has
/// noted once, or [`NOTE_WAIT_NS`] has passed: a short snapshot on a busy
/// host would otherwise end before a thread's turn came round.
pub fn copier_cpu_runs_nothing_else_while_it_copies() {
    use crate::memsnap;
    use snapshot::memsnap::Phase;
    let last = (0..crate::arch::percpu::MAX_CPUS)
        .rev()
        .find(|&c| crate::arch::percpu::is_online(c))
        .unwrap_or(0);
    let copier_apic = on_each_cpu(|_| ()).last().map(|&(_, id)| id);
    // 0 before the snapshot, 1 once it has started, 2 to stop.
    let step = Arc::new(AtomicU64::new(0));
    // Threads that have noted at least once.
    let noted = Arc::new(AtomicU64::new(0));
    let spawn = |pin: Option<usize>| {
        let (step, noted) = (step.clone(), noted.clone());
        thread::spawn("noter", move || {
            if let Some(cpu) = pin {
                assert!(thread::set_affinity(1 << cpu, false));
            }
            let (mut seen, mut notes) = (Vec::new(), 0u64);
            while step.load(Ordering::Acquire) < 2 {
                // Interrupts off: the phase and the id are read on one CPU.
                let _irq = crate::sync::IrqOff::new();
                if step.load(Ordering::Acquire) == 1 && memsnap::phase() == Phase::Active {
                    let id = crate::arch::apic::id();
                    if !seen.contains(&id) {
                        seen.push(id);
                    }
                    if notes == 0 {
                        noted.fetch_add(1, Ordering::AcqRel);
                    }
                    notes += 1;
                }
            }
            // Placed by its affinity again at this switch.
            thread::yield_now();
            let _irq = crate::sync::IrqOff::new();
            (seen, notes, crate::arch::apic::id())
        })
    };
    let mut noters: Vec<_> = (0..2 * thread::cpus()).map(|_| spawn(None)).collect();
    noters.push(spawn(Some(last)));
    memsnap::park_copier(true);
    memsnap::start(&memsnap::Options::default()).expect("start");
    step.store(1, Ordering::Release);
    let since = crate::clock::now_ns();
    while noted.load(Ordering::Acquire) < noters.len() as u64
        && crate::clock::now_ns() - since < NOTE_WAIT_NS
    {
        thread::sleep_ns(1_000_000);
    }
    memsnap::park_copier(false);
    let report = memsnap::wait().expect("report");
    memsnap::release().expect("release");
    step.store(2, Ordering::Release);
    let notes: Vec<_> = noters.into_iter().map(|t| t.join()).collect();
    crate::log!("snapshot of {} pages; noted {notes:?}", report.pages);
    let (seen_by_pinned, pinned_notes, pinned_end) = notes.last().cloned().expect("pinned");
    assert!(pinned_notes > 0, "the thread pinned to CPU {last} starved");
    if thread::cpus() > 1 {
        let copier_apic = copier_apic.expect("the last CPU's APIC id");
        for (seen, _, _) in &notes {
            assert!(
                !seen.contains(&copier_apic),
                "a thread ran on the copier's CPU (APIC id {copier_apic}) during the snapshot"
            );
        }
        assert!(!seen_by_pinned.is_empty());
        assert_eq!(
            pinned_end, copier_apic,
            "back on CPU {last} after the copier"
        );
        // A CPU nothing else may use is the copier's to use in full.
        assert_eq!(report.copier_share_pct, 100);
    } else {
        assert_eq!(
            report.copier_share_pct,
            snapshot::copyonce::SHARED_CPU_SHARE_PCT
        );
    }
}
