//! Where a write fault's time goes: each copying fault split into its
//! steps (handler entry to the copy path, claim, the page copy, marking and
//! unprotecting), counted in fixed histograms, and the slowest faults kept
//! with what the copier's CPU was doing meanwhile. The copier's own page
//! copies are counted the same way, one page in [`COPIER_SAMPLE`] (reading
//! the clock twice a page cost the copier about a twentieth of its speed
//! under TCG), so a stall that hits every CPU shows apart from one that
//! hits faults only.
//!
//! Everything lives in one static in the kernel image (never protected by
//! the shadow): the fault path writes it with relaxed atomics, without
//! allocating, locking or waiting. It must never do more than that.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::cpu::rdtsc;
use crate::arch::percpu::MAX_CPUS;
use crate::clock::cycles_to_ns;

/// Histogram bucket width, ns, and bucket count (the last takes the rest).
const BUCKET_NS: u64 = 500;
const BUCKETS: usize = 160;
/// A fault at least this long (ns) is kept in [`Splits::slow`].
const SLOW_NS: u64 = 20_000;
/// How many slow faults are kept (the first ones).
const SLOW_CAPACITY: usize = 64;
/// One copier page copy in this many is timed (the first of each run of
/// this many): the histogram, the slow copies and the copy-time estimate
/// are that sample's.
pub const COPIER_SAMPLE: u64 = 16;

/// The steps timed, in order; [`Step::Total`] is the whole fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// From the exception handler's entry to the snapshot's fault path.
    Entry = 0,
    /// Session lookup, room check, the copy-once claim.
    Claim = 1,
    /// The page copy into the store.
    Copy = 2,
    /// Marking copied, counting, making the page writable.
    Finish = 3,
    /// Entry to the end of the fault path.
    Total = 4,
    /// One of the copier's page copies (not a fault).
    CopierCopy = 5,
}

const STEPS: usize = 6;

/// The steps' names, in [`Step`] order.
pub const STEP_NAMES: [&str; STEPS] = ["entry", "claim", "copy", "finish", "total", "copier_copy"];

/// One slow fault: its steps (ns), and the copier's activity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Slow {
    /// CPU that faulted.
    pub cpu: u64,
    /// Entry, claim, copy, finish, ns.
    pub steps: [u64; 4],
    /// Pages the copier finished copying while the fault ran.
    pub copier_pages: u64,
    /// Whether the copier was inside a page copy when the fault entered.
    pub copier_copying: bool,
    /// The copier's longest timed page copy (one in [`COPIER_SAMPLE`])
    /// that ended during the fault, ns.
    pub copier_longest_ns: u64,
    /// When the fault entered, ns since boot.
    pub at_ns: u64,
}

/// One slow copy of the copier's: when it began (ns since boot), how long.
#[derive(Debug, Clone, Copy, Default)]
pub struct SlowCopy {
    /// Start, ns since boot.
    pub at_ns: u64,
    /// Duration, ns.
    pub ns: u64,
}

struct Marks {
    hist: [[AtomicU64; BUCKETS]; STEPS],
    /// Per CPU: the current fault's copy start and end (TSC).
    copy: [[AtomicU64; 2]; MAX_CPUS],
    /// The copier: pages copied, whether in a copy now, its longest copy
    /// since the counter was last read by a fault (ns).
    copier_pages: AtomicU64,
    copier_copying: AtomicU64,
    copier_longest: AtomicU64,
    slow_count: AtomicU64,
    slow: [[AtomicU64; 9]; SLOW_CAPACITY],
    copier_slow_count: AtomicU64,
    copier_slow: [[AtomicU64; 2]; SLOW_CAPACITY],
}

static MARKS: Marks = Marks {
    hist: [const { [const { AtomicU64::new(0) }; BUCKETS] }; STEPS],
    copy: [const { [const { AtomicU64::new(0) }; 2] }; MAX_CPUS],
    copier_pages: AtomicU64::new(0),
    copier_copying: AtomicU64::new(0),
    copier_longest: AtomicU64::new(0),
    slow_count: AtomicU64::new(0),
    slow: [const { [const { AtomicU64::new(0) }; 9] }; SLOW_CAPACITY],
    copier_slow_count: AtomicU64::new(0),
    copier_slow: [const { [const { AtomicU64::new(0) }; 2] }; SLOW_CAPACITY],
};

/// Clears everything (before a snapshot's pause).
pub fn reset() {
    let all = MARKS
        .hist
        .iter()
        .flatten()
        .chain(MARKS.copy.iter().flatten());
    let slow = MARKS.slow.iter().flatten();
    for a in all.chain(slow).chain(MARKS.copier_slow.iter().flatten()) {
        a.store(0, Ordering::Relaxed);
    }
    for a in [
        &MARKS.copier_pages,
        &MARKS.copier_copying,
        &MARKS.copier_longest,
        &MARKS.slow_count,
        &MARKS.copier_slow_count,
    ] {
        a.store(0, Ordering::Relaxed);
    }
}

fn bucket(ns: u64) -> usize {
    ((ns / BUCKET_NS) as usize).min(BUCKETS - 1)
}

fn count(step: Step, ns: u64) {
    MARKS.hist[step as usize][bucket(ns)].fetch_add(1, Ordering::Relaxed);
}

/// A fault's (or the pause's) page copy on `cpu` begins at TSC `tsc`.
pub fn copy_begins(cpu: usize, tsc: u64) {
    MARKS.copy[cpu % MAX_CPUS][0].store(tsc, Ordering::Relaxed);
}

/// The page copy [`copy_begins`] announced ends at TSC `tsc`.
pub fn copy_ends(cpu: usize, tsc: u64) {
    MARKS.copy[cpu % MAX_CPUS][1].store(tsc, Ordering::Relaxed);
}

/// Runs one of the background copier's page copies, marked for the faults
/// that look at it, and timed if it is in the sample: returns its TSC
/// cycles then.
///
/// One copier writes these marks: plain loads and stores, no locked
/// instructions on its per-page path (a fault CPU's reset of
/// `copier_longest` may be lost, which only widens one record).
pub fn copier_copy(copy: impl FnOnce()) -> Option<u64> {
    let bump = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
    let pages = MARKS.copier_pages.load(Ordering::Relaxed);
    MARKS.copier_copying.store(1, Ordering::Relaxed);
    let timed = pages.is_multiple_of(COPIER_SAMPLE);
    let start = if timed { rdtsc() } else { 0 };
    copy();
    let cycles = timed.then(|| rdtsc().saturating_sub(start));
    bump(&MARKS.copier_pages, pages + 1);
    MARKS.copier_copying.store(0, Ordering::Relaxed);
    if let Some(cycles) = cycles {
        let ns = cycles_to_ns(cycles);
        let bucket = &MARKS.hist[Step::CopierCopy as usize][bucket(ns)];
        bump(bucket, bucket.load(Ordering::Relaxed) + 1);
        let longest = MARKS.copier_longest.load(Ordering::Relaxed);
        bump(&MARKS.copier_longest, longest.max(ns));
        if ns >= SLOW_NS {
            let i = MARKS.copier_slow_count.fetch_add(1, Ordering::Relaxed) as usize;
            if let Some(rec) = MARKS.copier_slow.get(i) {
                rec[0].store(crate::clock::now_ns() - ns, Ordering::Relaxed);
                rec[1].store(ns, Ordering::Relaxed);
            }
        }
    }
    cycles
}

/// What the copier's side looked like when a fault entered.
#[derive(Debug, Clone, Copy)]
pub struct AtEntry {
    copier_pages: u64,
    copier_copying: bool,
}

/// Notes the copier's state as a fault enters its path.
pub fn at_entry() -> AtEntry {
    MARKS.copier_longest.store(0, Ordering::Relaxed);
    AtEntry {
        copier_pages: MARKS.copier_pages.load(Ordering::Relaxed),
        copier_copying: MARKS.copier_copying.load(Ordering::Relaxed) != 0,
    }
}

/// A fault on `cpu` that copied its page ended at TSC `end`; it entered
/// the handler at `entry` and the fault path at `start`.
pub fn fault_copied(cpu: usize, at: AtEntry, entry: u64, start: u64, end: u64) {
    let marks = &MARKS.copy[cpu % MAX_CPUS];
    let (copy_start, copy_end) = (
        marks[0].load(Ordering::Relaxed),
        marks[1].load(Ordering::Relaxed),
    );
    let ns = |a: u64, b: u64| cycles_to_ns(b.saturating_sub(a));
    let steps = [
        ns(entry, start),
        ns(start, copy_start),
        ns(copy_start, copy_end),
        ns(copy_end, end),
    ];
    for (i, &s) in steps.iter().enumerate() {
        count([Step::Entry, Step::Claim, Step::Copy, Step::Finish][i], s);
    }
    let total = ns(entry, end);
    count(Step::Total, total);
    if total < SLOW_NS {
        return;
    }
    let i = MARKS.slow_count.fetch_add(1, Ordering::Relaxed) as usize;
    if let Some(rec) = MARKS.slow.get(i) {
        let pages = MARKS.copier_pages.load(Ordering::Relaxed) - at.copier_pages;
        let words = [
            cpu as u64,
            steps[0],
            steps[1],
            steps[2],
            steps[3],
            pages,
            u64::from(at.copier_copying),
            MARKS.copier_longest.load(Ordering::Relaxed),
            crate::clock::now_ns() - total,
        ];
        for (w, v) in rec.iter().zip(words) {
            w.store(v, Ordering::Relaxed);
        }
    }
}

/// The figures of the last snapshot.
#[derive(Debug, Clone, Default)]
pub struct Splits {
    /// Per step (in [`Step`] order): count, p50, p99, max bucket (ns,
    /// each the upper edge of its bucket).
    pub steps: [[u64; 4]; STEPS],
    /// Faults of at least 20 us (the first 64), and how many there were.
    pub slow: alloc::vec::Vec<Slow>,
    /// See `slow`.
    pub slow_count: u64,
    /// The copier's copies of at least 20 us (the first 64), and how many.
    pub copier_slow: alloc::vec::Vec<SlowCopy>,
    /// See `copier_slow`.
    pub copier_slow_count: u64,
}

/// Reads the figures of the last snapshot.
pub fn read() -> Splits {
    let mut out = Splits::default();
    for (step, hist) in MARKS.hist.iter().enumerate() {
        let counts: alloc::vec::Vec<u64> = hist.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let n: u64 = counts.iter().sum();
        let edge = |rank: u64| {
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen > rank {
                    return (i as u64 + 1) * BUCKET_NS;
                }
            }
            0
        };
        out.steps[step] = [
            n,
            edge(n / 2),
            edge(n * 99 / 100),
            edge(n.saturating_sub(1)),
        ];
    }
    out.slow_count = MARKS.slow_count.load(Ordering::Relaxed);
    let kept = (out.slow_count as usize).min(SLOW_CAPACITY);
    out.slow = MARKS.slow[..kept]
        .iter()
        .map(|rec| {
            let w: [u64; 9] = core::array::from_fn(|k| rec[k].load(Ordering::Relaxed));
            Slow {
                cpu: w[0],
                steps: [w[1], w[2], w[3], w[4]],
                copier_pages: w[5],
                copier_copying: w[6] != 0,
                copier_longest_ns: w[7],
                at_ns: w[8],
            }
        })
        .collect();
    out.copier_slow_count = MARKS.copier_slow_count.load(Ordering::Relaxed);
    let kept = (out.copier_slow_count as usize).min(SLOW_CAPACITY);
    out.copier_slow = MARKS.copier_slow[..kept]
        .iter()
        .map(|rec| SlowCopy {
            at_ns: rec[0].load(Ordering::Relaxed),
            ns: rec[1].load(Ordering::Relaxed),
        })
        .collect();
    out
}
