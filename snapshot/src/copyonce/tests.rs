//! Single-threaded tests of the engine against a model: units hold a
//! version number, copies are recorded per unit, and asynchronous copiers
//! are tokens held across steps and settled from the `relax` callback.

use super::*;
use core::cell::{Cell, RefCell};
use proptest::prelude::*;
use std::collections::VecDeque;
use std::vec;
use std::vec::Vec;

/// The primary (versions), the copies, and how often each unit was
/// copied. `fail_next` makes that many next copies fail after writing
/// garbage.
struct Store {
    primary: RefCell<Vec<u64>>,
    copy: RefCell<Vec<Option<u64>>>,
    copies: RefCell<Vec<u32>>,
    fail_next: Cell<u32>,
}

#[derive(Debug, PartialEq, Eq)]
struct DiskError;

impl Store {
    fn new(units: u64) -> Self {
        Store {
            primary: RefCell::new((0..units).map(|u| u * 1000).collect()),
            copy: RefCell::new(vec![None; units as usize]),
            copies: RefCell::new(vec![0; units as usize]),
            fail_next: Cell::new(0),
        }
    }
}

impl UnitCopy for Store {
    type Error = DiskError;
    fn copy(&self, unit: u64) -> Result<(), DiskError> {
        let u = unit as usize;
        if self.fail_next.get() > 0 {
            self.fail_next.set(self.fail_next.get() - 1);
            self.copy.borrow_mut()[u] = Some(u64::MAX);
            return Err(DiskError);
        }
        self.copy.borrow_mut()[u] = Some(self.primary.borrow()[u]);
        self.copies.borrow_mut()[u] += 1;
        Ok(())
    }
}

fn engine(units: u64, counters: &Counters) -> Engine<Vec<AtomicU64>, &Counters> {
    // Dirty storage: the engine must clear it.
    let words = (0..words_for(units))
        .map(|_| AtomicU64::new(u64::MAX))
        .collect();
    Engine::new(words, units, counters)
}

fn never() {
    panic!("waited where nothing else could make progress");
}

#[test]
fn claim_walks_the_three_states() {
    let counters = Counters::new();
    let e = engine(40, &counters);
    assert_eq!(e.state(33), State::NotCopied);
    let Claim::Won(token) = e.claim(33) else {
        panic!("first claim must win")
    };
    assert_eq!(token.unit(), 33);
    assert_eq!(e.claim(33), Claim::Busy);
    assert_eq!(e.state(33), State::Copying);
    assert_eq!(e.state(32), State::NotCopied, "neighbours untouched");
    e.abandon(token);
    assert_eq!(e.state(33), State::NotCopied);
    let Claim::Won(token) = e.claim(33) else {
        panic!("an abandoned unit can be claimed again")
    };
    e.finish(token, Cause::Access);
    assert_eq!(e.claim(33), Claim::Copied);
    assert!(e.is_copied(33));
    assert_eq!((e.count(), e.completed()), (1, 1));
    assert_eq!(e.stats()[Cause::Abandoned], 1);
    assert!(!e.is_complete());
    e.reset();
    assert_eq!(
        e.state(33),
        State::NotCopied,
        "a reset starts a new instant"
    );
    assert_eq!((e.count(), e.completed()), (0, 0));
    assert_eq!(e.stats(), Default::default());
}

#[test]
#[should_panic(expected = "unit 40 of 40")]
fn units_past_the_end_are_refused() {
    let counters = Counters::new();
    let _ = engine(40, &counters).claim(40);
}

#[test]
fn an_access_waits_for_the_copier_holding_its_unit() {
    let counters = Counters::new();
    let e = engine(3, &counters);
    let store = Store::new(3);
    let Claim::Won(token) = e.claim(1) else {
        panic!()
    };
    let mut held = Some(token);
    let mut relaxed = 0;
    let outcome = e.copy_on_access(&store, 1, || {
        relaxed += 1;
        if let Some(t) = held.take() {
            store.copy(1).unwrap();
            e.finish(t, Cause::Background);
        }
    });
    assert_eq!(outcome, Access::WaitedForOther);
    assert_eq!(relaxed, 1);
    assert_eq!(
        *store.copies.borrow(),
        [0, 1, 0],
        "copied once, by the holder"
    );
    assert_eq!(e.stats()[Cause::Waited], 1);
    assert_eq!(e.copy_on_access(&store, 1, never), Access::AlreadyCopied);
}

#[test]
fn an_abandoned_copy_is_taken_over_by_the_waiter() {
    let counters = Counters::new();
    let e = engine(2, &counters);
    let store = Store::new(2);
    let Claim::Won(token) = e.claim(0) else {
        panic!()
    };
    let mut held = Some(token);
    let outcome = e.copy_on_access(&store, 0, || e.abandon(held.take().unwrap()));
    assert_eq!(outcome, Access::Copied, "the waiter copies it itself");
    assert_eq!(store.copies.borrow()[0], 1);
    store.fail_next.set(1);
    assert_eq!(
        e.copy_on_access(&store, 1, never),
        Access::Failed(DiskError)
    );
    assert_eq!(e.state(1), State::NotCopied, "a failed access leaves it");
}

#[test]
fn eager_and_marked_units_count_as_eager() {
    let counters = Counters::new();
    let e = engine(4, &counters);
    let store = Store::new(4);
    assert!(e.mark_copied(0));
    assert!(!e.mark_copied(0));
    assert_eq!(e.copy_eager(&store, 0), Ok(false));
    assert_eq!(e.copy_eager(&store, 2), Ok(true));
    store.fail_next.set(1);
    assert_eq!(e.copy_eager(&store, 3), Err(DiskError));
    assert_eq!(
        *store.copies.borrow(),
        [0, 0, 1, 0],
        "marked units are not copied"
    );
    assert_eq!(e.stats()[Cause::Eager], 2);
    assert_eq!(e.count(), 2);
}

#[test]
fn background_wraps_skips_and_ends() {
    let counters = Counters::new();
    let e = engine(70, &counters);
    let store = Store::new(70);
    assert_eq!(e.copy_background(&store, 0), Ok(0));
    // Units 62 and 65 are in others' hands: skipped, never waited for.
    let Claim::Won(held) = e.claim(65) else {
        panic!()
    };
    assert!(e.mark_copied(62));
    assert_eq!(e.copy_background(&store, 60), Ok(60));
    store.fail_next.set(1);
    assert_eq!(e.copy_background(&store, 100), Err(DiskError), "unit 60");
    assert_eq!(
        e.copy_background(&store, 100),
        Ok(8),
        "61..70 less 62 and 65, then around to 60"
    );
    assert_eq!(
        e.copy_background(&store, 100),
        Ok(0),
        "only 65 is left, held"
    );
    assert!(!e.is_complete());
    e.abandon(held);
    assert_eq!(e.copy_background(&store, 100), Ok(1));
    assert_eq!(e.copy_background(&store, 100), Ok(0));
    assert!(e.is_complete());
    assert_eq!(e.count(), 70);
    let copies = store.copies.borrow();
    let expected: Vec<u32> = (0..70).map(|u| u32::from(u != 62)).collect();
    assert_eq!(*copies, expected);
}

#[test]
fn ahead_copies_within_its_reach_and_leaves_the_cursor() {
    let counters = Counters::new();
    let e = engine(200, &counters);
    let store = Store::new(200);
    assert!(e.mark_copied(12));
    assert_eq!(
        e.copy_ahead(&store, 10, 100, 20),
        Ok((20, 31)),
        "10..31 less 12"
    );
    assert_eq!(
        e.copy_ahead(&store, 40, 3, 10),
        Ok((3, 43)),
        "stops at its reach"
    );
    assert!(!e.is_copied(43));
    assert_eq!(
        e.copy_ahead(&store, 190, 100, 50),
        Ok((10, 200)),
        "not past the end"
    );
    assert_eq!(e.copy_ahead(&store, 250, 10, 10), Ok((0, 200)));
    assert_eq!(e.copy_ahead(&store, 10, 21, 10), Ok((0, 31)), "all copied");
    assert_eq!(
        e.copy_background(&store, 5),
        Ok(5),
        "the cursor is still at 0"
    );
    let copies = store.copies.borrow();
    let copied: Vec<usize> = (0..200).filter(|&u| copies[u] == 1).collect();
    let expected: Vec<usize> = (0..5)
        .chain((10..31).filter(|&u| u != 12))
        .chain(40..43)
        .chain(190..200)
        .collect();
    assert_eq!(copied, expected);
    assert!(copies.iter().all(|&c| c <= 1));
}

#[test]
fn an_empty_engine_is_complete() {
    let counters = Counters::new();
    let e = engine(0, &counters);
    assert!(e.is_complete());
    assert_eq!(e.copy_background(&Store::new(0), 10), Ok(0));
}

#[derive(Debug, Clone)]
enum Step {
    /// An access to a unit, then a write to it if the access succeeded.
    Access(u16),
    /// An asynchronous copier claims a unit and holds it.
    Claim(u16),
    /// The oldest held claim is copied and finished, or abandoned.
    Settle(bool),
    /// A background step of up to this many units.
    Background(u8),
    /// A step ahead of an access: from a unit, a reach, up to this many.
    Ahead(u16, u8, u8),
    /// The next copy fails.
    Fail,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<u16>().prop_map(Step::Access),
        2 => any::<u16>().prop_map(Step::Claim),
        2 => any::<bool>().prop_map(Step::Settle),
        1 => (1u8..20).prop_map(Step::Background),
        1 => (any::<u16>(), any::<u8>(), 1u8..20).prop_map(|(u, r, m)| Step::Ahead(u, r, m)),
        1 => Just(Step::Fail),
    ]
}

/// Settles the oldest held claim: a copy and finish if `ok`, else an
/// abandon. The model records the unit copied.
fn settle(e: &Engine<Vec<AtomicU64>, &Counters>, io: &Store, held: &mut VecDeque<Token>, ok: bool) {
    if let Some(token) = held.pop_front() {
        if ok && io.copy(token.unit()).is_ok() {
            e.finish(token, Cause::Background);
        } else {
            e.abandon(token);
        }
    }
}

/// One access as the model sees it: the outcome the model expects from
/// the unit's state, and the write that follows a successful access.
fn access(
    e: &Engine<Vec<AtomicU64>, &Counters>,
    io: &Store,
    held: &RefCell<VecDeque<Token>>,
    unit: u64,
    version: u64,
) -> Result<(), TestCaseError> {
    let before = e.state(unit);
    let fails = io.fail_next.get() > 0;
    let outcome = e.copy_on_access(io, unit, || settle(e, io, &mut held.borrow_mut(), true));
    // The armed failure hits the first copy: ours, or a held claim's, which
    // may be the one this access waits for.
    match (before, fails, &outcome) {
        (State::Copied, _, Access::AlreadyCopied)
        | (State::Copying, _, Access::WaitedForOther)
        | (State::Copying, true, Access::Copied)
        | (State::NotCopied, false, Access::Copied)
        | (State::NotCopied, true, Access::Failed(_)) => {}
        _ => prop_assert!(false, "{before:?}, failure armed {fails}, then {outcome:?}"),
    }
    if !matches!(outcome, Access::Failed(_)) {
        prop_assert!(e.is_copied(unit), "an access goes on only after the copy");
        io.primary.borrow_mut()[unit as usize] = version;
    }
    Ok(())
}

proptest! {
    /// Any interleaving of accesses (each followed by a write), asynchronous
    /// claims settled later, background steps and failures ends, once the
    /// background copier has run to the end, with every unit copied exactly
    /// once and each copy equal to the unit's data at the instant.
    #[test]
    fn every_unit_is_copied_once_as_it_was_at_the_instant(
        units in 1u64..200,
        eager in proptest::collection::btree_set(0u64..200, 0..10),
        steps in proptest::collection::vec(step(), 0..400),
    ) {
        let counters = Counters::new();
        let e = engine(units, &counters);
        let io = Store::new(units);
        let at_instant = io.primary.borrow().clone();
        for &u in eager.iter().filter(|&&u| u < units) {
            prop_assert_eq!(e.copy_eager(&io, u), Ok(true));
        }
        let held = RefCell::new(VecDeque::new());
        for (version, step) in (1_000_000..).zip(steps) {
            match step {
                Step::Access(u) => access(&e, &io, &held, u64::from(u) % units, version)?,
                Step::Claim(u) => match e.claim(u64::from(u) % units) {
                    Claim::Won(token) => held.borrow_mut().push_back(token),
                    Claim::Busy | Claim::Copied => {}
                },
                Step::Settle(ok) => settle(&e, &io, &mut held.borrow_mut(), ok),
                Step::Background(max) => { let _ = e.copy_background(&io, u64::from(max)); }
                Step::Ahead(from, reach, max) => {
                    let from = u64::from(from) % (units + 1);
                    if let Ok((_, next)) = e.copy_ahead(&io, from, u64::from(reach), u64::from(max)) {
                        prop_assert!((from..=(from + u64::from(reach)).min(units)).contains(&next));
                    }
                }
                Step::Fail => io.fail_next.set(1),
            }
        }
        while !held.borrow().is_empty() {
            settle(&e, &io, &mut held.borrow_mut(), true);
        }
        io.fail_next.set(0);
        prop_assert!(e.copy_background(&io, u64::MAX).is_ok());
        prop_assert!(e.is_complete());
        prop_assert_eq!(e.count(), units);
        prop_assert!(io.copies.borrow().iter().all(|&c| c == 1), "{:?}", io.copies.borrow());
        let expected: Vec<Option<u64>> = at_instant.into_iter().map(Some).collect();
        prop_assert_eq!(&*io.copy.borrow(), &expected);
        let stats = e.stats();
        prop_assert_eq!(stats.copied(), units, "counts by cause add up");
        prop_assert_eq!(stats[Cause::Eager], eager.iter().filter(|&&u| u < units).count() as u64);
    }
}
