//! The live snapshot's races on several CPUs, each aimed at one: CPUs
//! writing the same pages across the pause, a write fault on a page the
//! copier on another CPU holds, stale TLB entries after an abort and after
//! a restore. Each passes on one CPU too (it then shows what one CPU can).
//!
//! The reference is independent of the copy paths: the hash of every page
//! taken stop-the-world at the instant ([`memsnap::Options::verify`]), or
//! the pattern the test itself wrote.

use alloc::sync::Arc;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use crate::memory::{PAGE_SIZE, PHYS_OFFSET};
use crate::memsnap;
use crate::thread::{self, JoinHandle};

/// Words per page.
const WORDS: usize = (PAGE_SIZE / 8) as usize;

/// Online CPUs.
fn online() -> Vec<usize> {
    (0..crate::arch::percpu::MAX_CPUS)
        .filter(|&c| crate::arch::percpu::is_online(c))
        .collect()
}

/// Runs `f` in a thread pinned to `cpu`.
fn spawn_on<T: Send + 'static>(
    cpu: usize,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    thread::spawn("pinned", move || {
        assert!(thread::set_affinity(1 << cpu, false), "pin to CPU {cpu}");
        f()
    })
}

/// `pages` whole pages of heap memory (range memory: the heap is reached
/// through the physical map), as atomics so every CPU may write them.
struct Pages {
    words: Vec<AtomicU64>,
    first: usize,
    pages: usize,
}

impl Pages {
    fn new(pages: usize, fill: impl Fn(usize) -> u64) -> Arc<Self> {
        let words: Vec<AtomicU64> = (0..(pages + 1) * WORDS)
            .map(|_| AtomicU64::new(0))
            .collect();
        let addr = words.as_ptr() as u64;
        let first = (addr.next_multiple_of(PAGE_SIZE) - addr) as usize / 8;
        let this = Pages {
            words,
            first,
            pages,
        };
        for i in 0..pages * WORDS {
            this.word(i).store(fill(i), Ordering::Relaxed);
        }
        Arc::new(this)
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        &self.words[self.first + i]
    }

    /// Physical address of page `p`.
    fn phys(&self, p: usize) -> u64 {
        self.word(p * WORDS) as *const AtomicU64 as u64 - PHYS_OFFSET
    }

    /// Virtual start and length in bytes.
    fn span(&self) -> (u64, u64) {
        (self.phys(0) + PHYS_OFFSET, (self.pages as u64) * PAGE_SIZE)
    }
}

fn assert_verified(report: &memsnap::Report, what: &str) {
    crate::log!("{what}: {}", memsnap::describe(report));
    assert_eq!(
        report.mismatched,
        Some(0),
        "{what}: differs from the instant"
    );
    assert_eq!(
        report.not_copied_once,
        Some(0),
        "{what}: copied twice or never"
    );
    assert_eq!(
        report.stats.copied(),
        report.pages,
        "{what}: counts by cause"
    );
}

/// A writer per CPU, all on the same few pages, before the pause, through
/// it (the rendezvous parks them mid-loop) and right after it, when they
/// fault on the same pages at once: one claims each page, the others wait
/// or find it copied. The snapshot equals the reference hashed at the
/// instant, every page copied exactly once. The copier shares its CPU
/// here, so that with two CPUs both write (with its CPU reserved, the
/// writer pinned there runs beside the other).
pub fn same_pages_written_on_every_cpu_across_the_pause() {
    for seed in 0..3u64 {
        let pages = Pages::new(8, |i| i as u64 ^ seed);
        let stop = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = online()
            .into_iter()
            .map(|cpu| {
                let (pages, stop) = (pages.clone(), stop.clone());
                spawn_on(cpu, move || {
                    let mut n = 0u64;
                    while stop.load(Ordering::Relaxed) == 0 {
                        // Every page, the same words from every CPU.
                        for p in 0..pages.pages {
                            pages
                                .word(p * WORDS + (n as usize % 8))
                                .store(n, Ordering::Relaxed);
                        }
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        thread::sleep_ns(2_000_000);
        memsnap::start(&memsnap::Options {
            copier_cpu: memsnap::CopierCpu::Shared,
            ..super::memsnap::verified()
        })
        .expect("start");
        let report = memsnap::wait().expect("report");
        stop.store(1, Ordering::Relaxed);
        let rounds: Vec<u64> = writers.into_iter().map(|w| w.join()).collect();
        assert_verified(&report, "same pages");
        assert!(
            rounds.iter().all(|&r| r > 0),
            "a writer never ran: {rounds:?}"
        );
        assert!(report.stats.fault > 0, "seed {seed}: no write faulted");
        memsnap::release().expect("release");
    }
}

/// How long the copier holds each watched page, ns.
const HOLD_NS: u64 = 3_000_000;

/// A CPU writes a page exactly while the copier on another CPU holds its
/// claim (slowed by a test hook so the window is wide): the write fault
/// must wait for the copy, then retry. Were it let through, the copy
/// would hold the new value, not the instant's, and the reference says so.
pub fn write_waits_for_the_copier_on_another_cpu() {
    let pages = Pages::new(16, |i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    memsnap::slow_copies(pages.phys(0)..pages.phys(0) + 16 * PAGE_SIZE, HOLD_NS);
    // The writer on the first CPU, the copier on the last.
    let writer = {
        let pages = pages.clone();
        spawn_on(0, move || {
            let mut hits = 0;
            let mut written = [false; 16];
            while memsnap::phase() == snapshot::memsnap::Phase::Idle {
                thread::yield_now();
            }
            while memsnap::phase() == snapshot::memsnap::Phase::Active && hits < 4 {
                for (p, written) in written.iter_mut().enumerate() {
                    if !*written && memsnap::is_being_copied(pages.phys(p)) {
                        pages
                            .word(p * WORDS + 3)
                            .store(0xdead_beef, Ordering::Relaxed);
                        *written = true;
                        hits += 1;
                    }
                }
                core::hint::spin_loop();
            }
            hits
        })
    };
    let result = memsnap::start(&super::memsnap::verified()).map(|_| memsnap::wait());
    let hits = writer.join();
    memsnap::slow_copies(0..0, 0);
    let report = result.expect("start").expect("report");
    crate::log!("writes during a held copy: {hits}");
    assert_verified(&report, "write during the copier's claim");
    if thread::cpus() > 1 {
        assert!(hits > 0, "never wrote a page while the copier held it");
    }
    memsnap::release().expect("release");
    assert!(thread::set_affinity(u64::MAX, false));
}

/// Threads on every CPU read pages during a snapshot (so each CPU caches
/// the shadow's read-only entries for them) and write others, racing the
/// abort; after the abort each writes the pages it read, and the writes
/// land. A CPU left with the shadow live faults with no snapshot to explain
/// it, and the fatal fault fails the test. Under TCG this cannot single out
/// the abort's shootdown: QEMU walks the page tables again on a write its
/// TLB entry does not permit, so a stale read-only entry never faults
/// there; on hardware it would. The copier shares its CPU, so that every
/// CPU runs a thread of the test.
pub fn abort_under_writers_on_every_cpu_leaves_every_page_writable() {
    let pages = Pages::new(32, |i| i as u64);
    let step = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = online()
        .into_iter()
        .map(|cpu| {
            let (pages, step) = (pages.clone(), step.clone());
            spawn_on(cpu, move || {
                let mut sum = 0u64;
                while step.load(Ordering::Acquire) < 2 {
                    for p in 0..16 {
                        sum = sum.wrapping_add(pages.word(p * WORDS).load(Ordering::Relaxed));
                    }
                    // Writes elsewhere, racing the abort.
                    pages
                        .word((16 + cpu % 16) * WORDS + 1)
                        .fetch_add(1, Ordering::Relaxed);
                }
                for p in 0..16 {
                    pages
                        .word(p * WORDS + cpu % 8 + 1)
                        .store(0xab00 + cpu as u64, Ordering::Relaxed);
                }
                core::hint::black_box(sum)
            })
        })
        .collect();
    memsnap::start(&memsnap::Options {
        copier_share_pct: Some(1),
        copier_cpu: memsnap::CopierCpu::Shared,
        ..memsnap::Options::default()
    })
    .expect("start");
    step.store(1, Ordering::Release);
    thread::sleep_ns(10_000_000);
    memsnap::abort().expect("abort");
    step.store(2, Ordering::Release);
    for t in threads {
        t.join();
    }
    for cpu in online() {
        for p in 0..16 {
            let w = pages.word(p * WORDS + cpu % 8 + 1).load(Ordering::Relaxed);
            assert_eq!(w, 0xab00 + cpu as u64, "CPU {cpu} page {p}");
        }
    }
}

/// What a test of a write fault racing an abort works on: see
/// [`write_racing_an_abort`].
struct AbortRace {
    pages: Arc<Pages>,
    /// The page written.
    target: usize,
    writer: JoinHandle<()>,
}

/// The word of the target page the writer writes, and what.
const RACE_WORD: usize = 5;
const RACE_VALUE: u64 = 0x5eed;

/// A write fault racing an abort, up to the abort: main pinned to the last
/// CPU (where the copier shares its CPU, parked, so it copies nothing), a
/// verified snapshot of 64 heap pages started, `arm` called with the
/// physical address of the last page (not copied, then), and a writer on
/// the first CPU writing [`RACE_VALUE`] into it. `None` with one CPU (the
/// fault keeps its CPU while the other aborts).
fn write_racing_an_abort(arm: impl FnOnce(u64)) -> Option<AbortRace> {
    let cpus = online();
    if cpus.len() < 2 {
        crate::log!("one CPU: no fault can be in flight while another aborts");
        return None;
    }
    let last = *cpus.last().expect("a CPU");
    assert!(thread::set_affinity(1 << last, false), "main on CPU {last}");
    let pages = Pages::new(64, |i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    memsnap::park_copier(true);
    memsnap::start(&memsnap::Options {
        copier_share_pct: Some(1),
        copier_cpu: memsnap::CopierCpu::Shared,
        ..super::memsnap::verified()
    })
    .expect("start");
    let target = pages.pages - 1;
    assert!(!memsnap::is_copied(pages.phys(target)), "copied already");
    arm(pages.phys(target));
    let writer = {
        let pages = pages.clone();
        spawn_on(cpus[0], move || {
            pages
                .word(target * WORDS + RACE_WORD)
                .store(RACE_VALUE, Ordering::Relaxed);
        })
    };
    Some(AbortRace {
        pages,
        target,
        writer,
    })
}

impl AbortRace {
    /// After the abort: the copier unparked, the write landed.
    fn end(self) {
        memsnap::park_copier(false);
        self.writer.join();
        let word = self.pages.word(self.target * WORDS + RACE_WORD);
        assert_eq!(
            word.load(Ordering::Relaxed),
            RACE_VALUE,
            "the write racing the abort did not land"
        );
        assert!(thread::set_affinity(u64::MAX, false));
    }
}

/// A write fault raised while the snapshot protects its page, but handled
/// only after an abort has torn the snapshot down (a test hook holds it in
/// the handler meanwhile; on a busy host the emulator's scheduling opens
/// the same window by chance, between the fault and the read of the
/// snapshot's window): the page is writable again by then, so the write is
/// retried and lands. Were it judged against the torn-down snapshot, it
/// would be "a write to a read-only page" and stop the kernel.
pub fn fault_handled_after_the_abort_is_retried() {
    let arm = |phys| memsnap::hold_next_fault_at(phys + PHYS_OFFSET);
    let Some(race) = write_racing_an_abort(arm) else {
        return;
    };
    super::eventually("the writer's fault is held", memsnap::fault_held);
    memsnap::abort().expect("abort");
    memsnap::release_held_fault();
    race.end();
}

/// A write fault holds a frame's claim on one CPU (slowed by a test hook)
/// while the other CPU aborts the snapshot: the abort's check of the copies
/// made so far must wait for that copy, so that it checks every copy the
/// snapshot made against the reference. Were it to look while the copy was
/// still running, the copy would finish unchecked (and, had a write reached
/// the frame once the protection was off, copied newer data).
pub fn abort_checks_the_copy_a_fault_was_making() {
    const HOLD_NS: u64 = 300_000_000;
    let mut held = 0;
    let arm = |phys| {
        held = phys;
        memsnap::slow_copies(phys..phys + PAGE_SIZE, HOLD_NS);
    };
    let Some(race) = write_racing_an_abort(arm) else {
        return;
    };
    super::eventually("the writer's fault holds the claim", || {
        memsnap::is_being_copied(held)
    });
    memsnap::abort().expect("abort");
    race.end();
    memsnap::slow_copies(0..0, 0);
    let report = memsnap::wait().expect("report");
    let partial = report.partial.expect("an abort's check");
    crate::log!(
        "abort: {} copies, {} checked, {} mismatched",
        report.stats.copied(),
        partial.checked,
        partial.mismatched
    );
    assert_eq!(partial.mismatched, 0, "a copy differs from the instant");
    assert_eq!(
        partial.checked,
        report.stats.copied(),
        "the abort checked its copies before the last one finished"
    );
}

/// With the other CPUs held for the session (`memsnap_cpus=boot`), the
/// copier stays on the boot CPU with every other thread: it has no CPU of
/// its own, so it takes a shared CPU's share and never stops that CPU's
/// tick, which then preempts and wakes every thread. (It used to be told
/// the last CPU was its own, copy at 100 % and stop the boot CPU's tick.)
pub fn copier_shares_the_boot_cpu_while_the_others_are_held() {
    memsnap::run_on_all_cpus(false);
    let report = memsnap::start(&memsnap::Options::default()).map(|_| memsnap::wait());
    memsnap::run_on_all_cpus(true);
    let report = report.expect("start").expect("report");
    memsnap::release().expect("release");
    assert_eq!(
        report.copier_share_pct,
        snapshot::copyonce::effective_share(None, false),
        "the copier took a held CPU for its own"
    );
}

/// After a restore, a CPU that had written a page before it writes it
/// again: a second restore must roll that back too. Without restore's
/// shootdown the CPU keeps its cached entry marked dirty, writes through it
/// without marking the page table, and the second restore misses the page.
pub fn restore_sees_writes_from_every_cpu() {
    let pattern = |i: usize| (i as u64).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ 0x77;
    let pages = Pages::new(8, pattern);
    // Restore runs on CPU 0 (it flushes its own entries), the writers on
    // every other.
    assert!(thread::set_affinity(1, false), "main on CPU 0");
    memsnap::start(&super::memsnap::verified()).expect("start");
    assert_verified(&memsnap::wait().expect("report"), "before restore");
    let (virt, len) = pages.span();
    for cpu in online().into_iter().filter(|&c| c != 0) {
        let step = Arc::new(AtomicU64::new(0));
        let writer = {
            let (pages, step) = (pages.clone(), step.clone());
            spawn_on(cpu, move || {
                pages.word(2 * WORDS + 5).store(0x1111, Ordering::Relaxed);
                step.store(1, Ordering::Release);
                while step.load(Ordering::Acquire) != 2 {
                    core::hint::spin_loop();
                }
                pages.word(2 * WORDS + 5).store(0x2222, Ordering::Relaxed);
                step.store(3, Ordering::Release);
            })
        };
        while step.load(Ordering::Acquire) != 1 {
            thread::yield_now();
        }
        assert_eq!(memsnap::restore(virt, len), Ok(1), "CPU {cpu}: first write");
        step.store(2, Ordering::Release);
        writer.join();
        assert_eq!(
            memsnap::restore(virt, len),
            Ok(1),
            "CPU {cpu}: second write"
        );
        for i in 0..pages.pages * WORDS {
            assert_eq!(
                pages.word(i).load(Ordering::Relaxed),
                pattern(i),
                "CPU {cpu} word {i}"
            );
        }
    }
    memsnap::release().expect("release");
    assert!(thread::set_affinity(u64::MAX, false));
}
