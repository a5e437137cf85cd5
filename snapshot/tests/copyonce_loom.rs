//! The copy-once engine under loom: every interleaving, up to a preemption
//! bound, of accessors and a background copier on separate threads, with
//! the engine's own code running on loom's atomics (through
//! `AtomicWord`).
//!
//! Each unit's primary and its copy are loom cells, and the copy is written
//! in two halves, so loom itself reports a double copy (two unordered
//! writers of the copy), a read of a half copy (a reader not ordered after
//! both halves) and a workload write racing the copy (a write to the
//! primary not ordered after the copier read it).

use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use loom::sync::Arc;
use snapshot::copyonce::{words_for, Access, AtomicWord, Counters, Engine, UnitCopy};

/// Loom's atomic behind the engine's word trait.
#[derive(Debug)]
struct Word(AtomicU64);

impl AtomicWord for Word {
    fn load(&self, order: Ordering) -> u64 {
        self.0.load(order)
    }
    fn store(&self, value: u64, order: Ordering) {
        self.0.store(value, order);
    }
    fn fetch_or(&self, bits: u64, order: Ordering) -> u64 {
        self.0.fetch_or(bits, order)
    }
    fn fetch_and(&self, bits: u64, order: Ordering) -> u64 {
        self.0.fetch_and(bits, order)
    }
}

const UNITS: u64 = 2;
/// What the workload writes once its access returned.
const WRITTEN: u64 = 99;

/// A unit's value at the instant.
fn instant(unit: u64) -> u64 {
    10 + unit
}

struct Unit {
    primary: UnsafeCell<u64>,
    copy: [UnsafeCell<u64>; 2],
    copies: AtomicUsize,
}

struct Io {
    units: Vec<Unit>,
    /// The next copy of unit 0 fails between its two halves.
    fail_unit0: AtomicBool,
}

// SAFETY: the cells are loom's, which check every access for a data race
// across the model's threads: sharing them is exactly what is under test.
unsafe impl Sync for Io {}

impl Io {
    fn new(fail_unit0: bool) -> Self {
        Io {
            units: (0..UNITS)
                .map(|u| Unit {
                    primary: UnsafeCell::new(instant(u)),
                    copy: [UnsafeCell::new(0), UnsafeCell::new(0)],
                    copies: AtomicUsize::new(0),
                })
                .collect(),
            fail_unit0: AtomicBool::new(fail_unit0),
        }
    }

    /// Both halves of `unit`'s copy.
    fn read_copy(&self, unit: u64) -> [u64; 2] {
        // SAFETY: loom's cell checks this read is ordered after every write.
        self.units[unit as usize]
            .copy
            .each_ref()
            .map(|half| half.with(|p| unsafe { *p }))
    }

    /// The workload's write to `unit`, once its access let it through.
    fn write_primary(&self, unit: u64) {
        // SAFETY: loom's cell checks this write is ordered after the copy's read.
        self.units[unit as usize]
            .primary
            .with_mut(|p| unsafe { *p = WRITTEN });
    }
}

impl UnitCopy for Io {
    type Error = ();
    fn copy(&self, unit: u64) -> Result<(), ()> {
        let u = &self.units[unit as usize];
        // SAFETY: loom's cells check each access against the others.
        let value = u.primary.with(|p| unsafe { *p });
        // SAFETY: as above.
        u.copy[0].with_mut(|p| unsafe { *p = value });
        if unit == 0 && self.fail_unit0.swap(false, Ordering::Relaxed) {
            return Err(());
        }
        // SAFETY: as above.
        u.copy[1].with_mut(|p| unsafe { *p = value });
        u.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

type Shared = Arc<(Engine<Vec<Word>, Box<Counters>, Word>, Io)>;

fn shared(fail_unit0: bool) -> Shared {
    let words = (0..words_for(UNITS))
        .map(|_| Word(AtomicU64::new(0)))
        .collect();
    let engine = Engine::new(words, UNITS, Box::new(Counters::new()));
    Arc::new((engine, Io::new(fail_unit0)))
}

/// An access to `unit` (retried after a failed copy), a check that the
/// copy is whole and as at the instant, then the workload's write if
/// `write`. Returns how the first attempt that did not fail ended.
fn access(s: &Shared, unit: u64, write: bool) -> Access<()> {
    let (engine, io) = &**s;
    let access = loop {
        match engine.copy_on_access(io, unit, loom::thread::yield_now) {
            Access::Failed(()) => continue,
            done => break done,
        }
    };
    let value = instant(unit);
    assert_eq!(io.read_copy(unit), [value, value], "a half or stale copy");
    if write {
        io.write_primary(unit);
    }
    access
}

/// After the threads: the copier finishes what is left; every unit was
/// copied exactly once, as it was at the instant.
fn check_end(s: &Shared) {
    let (engine, io) = &**s;
    while engine.copy_background(io, u64::MAX) != Ok(0) {}
    assert!(engine.is_complete());
    for unit in 0..UNITS {
        let copies = io.units[unit as usize].copies.load(Ordering::Relaxed);
        assert_eq!(copies, 1, "unit {unit} copied {copies} times");
        let value = instant(unit);
        assert_eq!(io.read_copy(unit), [value, value]);
    }
}

fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(preemptions);
    builder.check(f);
}

/// What one model thread does.
type Job = Box<dyn Fn(&Shared) + Send + Sync>;

/// Runs each of `jobs` on its own thread, joins them, then checks the end.
///
/// Loom explores waits poorly when two threads spin on the same third one
/// (its scheduler bounces between the two waiters), so each model below
/// lets at most one thread wait at a time.
fn run(s: Shared, jobs: Vec<Job>) {
    let threads: Vec<_> = jobs
        .into_iter()
        .map(|job| {
            let s = s.clone();
            loom::thread::spawn(move || job(&s))
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    check_end(&s);
}

/// Two accessors race for both units, each writing one and reading the
/// other's copy: one copies, the other waits and reads the whole copy.
#[test]
fn racing_accessors_copy_each_unit_once() {
    model(3, || {
        run(
            shared(false),
            vec![
                Box::new(|s| {
                    access(s, 0, true);
                    access(s, 1, false);
                }),
                Box::new(|s| {
                    access(s, 1, true);
                    access(s, 0, false);
                }),
            ],
        );
    });
}

/// A background copier races one accessor per unit.
#[test]
fn accessors_and_copier_copy_each_unit_once() {
    model(2, || {
        run(
            shared(false),
            vec![
                Box::new(|s| {
                    access(s, 0, true);
                }),
                Box::new(|s| {
                    access(s, 1, true);
                }),
                Box::new(|s| {
                    let _ = s.0.copy_background(&s.1, UNITS);
                }),
            ],
        );
    });
}

/// The first copy of unit 0 fails halfway, whoever makes it: the unit is
/// abandoned, copied again by someone, and no one reads the half copy.
#[test]
fn a_failed_copy_is_redone_and_never_read() {
    model(3, || {
        run(
            shared(true),
            vec![
                Box::new(|s| {
                    access(s, 0, true);
                    access(s, 1, true);
                }),
                Box::new(|s| {
                    let _ = s.0.copy_background(&s.1, UNITS);
                }),
            ],
        );
    });
}

// The claim paths of several CPUs. Each model also checks, across all the
// interleavings it explored, that the path it is about was taken at least
// once (a std flag, outside loom's model), so it cannot pass vacuously.

/// Set when some interleaving took the path a model is about.
static SEEN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());

fn seen(path: &'static str) {
    let mut seen = SEEN.lock().unwrap();
    if !seen.contains(&path) {
        seen.push(path);
    }
}

fn was_seen(path: &'static str) -> bool {
    SEEN.lock().unwrap().contains(&path)
}

/// The copier holds unit 0 (claimed, copying in two halves) while two
/// CPUs fault on it, one to write and one to read: whichever finds it
/// `Copying` waits for the copy to finish, then retries its claim, finds
/// it copied and goes on; neither copies it again nor sees a half copy,
/// and the write lands only after the copier read the unit.
#[test]
fn two_cpus_faulting_on_a_unit_the_copier_holds_wait_then_retry() {
    model(2, || {
        let s = shared(false);
        let copier = {
            let s = s.clone();
            loom::thread::spawn(move || s.0.copy_background(&s.1, 1))
        };
        let reader = {
            let s = s.clone();
            loom::thread::spawn(move || access(&s, 0, false))
        };
        let writer = access(&s, 0, true);
        let reader = reader.join().unwrap();
        assert_eq!(copier.join().unwrap(), Ok(1), "the copier copies a unit");
        if matches!(writer, Access::WaitedForOther) && matches!(reader, Access::WaitedForOther) {
            seen("both faults waited for the copier");
        }
        check_end(&s);
    });
    assert!(was_seen("both faults waited for the copier"));
}

/// One CPU's copy of unit 0 fails halfway and is abandoned (that CPU gives
/// up, as a fault whose store failed does); another CPU faulting on the
/// same unit, waiting or not, claims it again and copies it whole. Nobody
/// reads the half copy, and the unit ends copied exactly once.
#[test]
fn a_copy_abandoned_by_one_cpu_is_redone_by_another() {
    model(3, || {
        let s = shared(true);
        let giver_up = {
            let s = s.clone();
            loom::thread::spawn(move || {
                let (engine, io) = &*s;
                engine.copy_on_access(io, 0, loom::thread::yield_now)
            })
        };
        let other = access(&s, 0, true);
        let first = giver_up.join().unwrap();
        if matches!(first, Access::Failed(())) && matches!(other, Access::Copied) {
            seen("redone by another CPU");
        }
        if matches!(first, Access::Failed(())) {
            let (engine, io) = &*s;
            assert!(
                engine.is_copied(0),
                "the other CPU's access left it uncopied"
            );
            assert_eq!(io.read_copy(0), [instant(0); 2]);
        }
        check_end(&s);
    });
    assert!(was_seen("redone by another CPU"));
}
