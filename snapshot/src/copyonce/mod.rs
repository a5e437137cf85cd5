//! Copy once: fix an instant, then copy every unit exactly once, by whichever
//! comes first, an access that must not see newer data or a background
//! copier.
//!
//! One pattern at three granularities: the live memory snapshot (4 KiB
//! pages, copied before a write fault lets the write through), a quick-split
//! mirror (disk blocks, copied before a write to the primary) and a qcow2
//! clone split (clusters). The engine knows nothing of pages or disks: units
//! are numbered densely `0..n`, and the caller's [`UnitCopy`] does the copy.
//!
//! # Protocol
//!
//! Each unit is in one of three [`State`]s, two bits in the copy map
//! (see [`map`] for the encoding):
//!
//! ```text
//!              claim (Won)              finish
//!  NotCopied ---------------> Copying ----------> Copied
//!      ^                         |
//!      +------ abandon ----------+    (the copy failed)
//! ```
//!
//! [`Engine::claim`] answers [`Claim::Won`] with a [`Token`] to exactly one
//! caller; the others get [`Claim::Busy`] while the copy runs and
//! [`Claim::Copied`] after. Whoever holds the token copies, then hands it to
//! [`Engine::finish`] or, if the copy failed, [`Engine::abandon`]. A caller
//! that got `Busy` must not touch the unit's data: it waits
//! ([`Engine::wait`]) and claims again, so a unit is never copied twice and
//! never read half-copied. [`Engine::copy_on_access`] and
//! [`Engine::copy_background`] run the whole sequence.
//!
//! # Memory orderings
//!
//! - `claim` is Acquire: if it sees `Copied` it sees the copy's data, and if
//!   it wins after an abandon, the failed copier's partial writes to the
//!   destination happen before its own.
//! - `finish` and `abandon` are Release, pairing with the above and with
//!   `wait`'s Acquire loads.
//! - The total of finished copies is bumped with Release after the map and
//!   read with Acquire, so [`Engine::is_complete`] returning true means every
//!   copy's data is visible. Counts by cause are Relaxed statistics, and the
//!   background cursor is a Relaxed hint.
//!
//! # What the caller guarantees
//!
//! - The map words and the counters live where the copy paths can write
//!   them without faulting (a kernel passes static or pre-mapped memory; the
//!   host passes a `Vec`). The engine is built without allocating.
//! - A token is always finished or abandoned; a lost token leaves its unit
//!   `Copying` and every later access to it waiting forever.
//! - Waiting never deadlocks: whoever holds a token keeps running until it
//!   finishes or abandons. On one CPU this means a copy is never interrupted
//!   by an access to the same unit, e.g. the copier holds a token only with
//!   interrupts off, so a fault handler on that CPU never finds `Busy`.
//!   With several CPUs, the `relax` function passed to waits runs meanwhile.
//!
//! # What it must never do
//!
//! Allocate, take a lock or block on the claim, copy or finish paths (fault
//! handlers run them); copy a unit twice; let an access go on before its
//! unit's copy is finished.

mod counters;
pub mod map;
mod pace;

#[cfg(test)]
mod tests;

pub use counters::{Cause, Counters, Stats};
pub use map::{words_for, AtomicWord, State, UNITS_PER_WORD};
pub use pace::{effective_share, Pacer, SHARED_CPU_SHARE_PCT};

use core::marker::PhantomData;
use core::ops::Deref;
use core::sync::atomic::{AtomicU64, Ordering};

/// The caller's copy of one unit: from the primary (memory, a disk, a
/// backing file) to where the copy is kept. Runs on the claim path, so it
/// must not allocate or block where that path must not (a fault handler).
pub trait UnitCopy {
    /// Why a copy failed (a disk error); `Infallible` if it cannot.
    type Error;
    /// Copies `unit`. Called at most once per unit that ends up copied; a
    /// failed call may leave a partial copy, which the next attempt
    /// overwrites.
    fn copy(&self, unit: u64) -> Result<(), Self::Error>;
}

/// The right to copy one unit, won by [`Engine::claim`]. Hand it to
/// [`Engine::finish`] or [`Engine::abandon`]: dropping it leaves the unit
/// `Copying` for ever.
#[must_use = "finish or abandon the claim, or the unit stays Copying for ever"]
#[derive(Debug, PartialEq, Eq)]
pub struct Token {
    unit: u64,
}

impl Token {
    /// The unit this token lets its holder copy.
    pub fn unit(&self) -> u64 {
        self.unit
    }
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// The unit was not copied and is now the caller's to copy.
    Won(Token),
    /// The unit is copied: its copy can be read.
    Copied,
    /// Someone else is copying the unit: wait, then claim again.
    Busy,
}

/// What [`Engine::copy_on_access`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Access<E> {
    /// This call copied the unit.
    Copied,
    /// The unit was copied before.
    AlreadyCopied,
    /// Another copier was copying the unit; this call waited until it was.
    WaitedForOther,
    /// This call's copy failed; the unit is not copied (the access must not
    /// go on).
    Failed(E),
}

/// The copy-once engine over units `0..units`: the copy map (words `W` of
/// atomics `A`) and the counters `C` (for example `&'static Counters`).
#[derive(Debug)]
pub struct Engine<W, C, A = AtomicU64> {
    words: W,
    units: u64,
    counters: C,
    atomic: PhantomData<fn() -> A>,
}

impl<W, C, A> Engine<W, C, A>
where
    W: AsRef<[A]>,
    C: Deref<Target = Counters>,
    A: AtomicWord,
{
    /// An engine over `units` units, none copied: clears the first
    /// [`words_for`]`(units)` words and resets the counters.
    ///
    /// # Panics
    ///
    /// If `words` holds fewer words than that.
    pub fn new(words: W, units: u64, counters: C) -> Self {
        let needed = words_for(units);
        assert!(words.as_ref().len() >= needed, "copy map storage too small");
        for word in &words.as_ref()[..needed] {
            word.store(0, Ordering::Relaxed);
        }
        counters.reset();
        Engine {
            words,
            units,
            counters,
            atomic: PhantomData,
        }
    }

    /// Every unit back to not copied and the counters to zero, for the
    /// next instant: what [`Self::new`] does, on the same storage. The
    /// caller guarantees nobody claims, copies or waits meanwhile (no
    /// instant is in progress); a claim racing a reset could be lost.
    pub fn reset(&self) {
        for word in &self.words.as_ref()[..words_for(self.units)] {
            word.store(0, Ordering::Release);
        }
        self.counters.reset();
    }

    /// Units covered.
    pub fn units(&self) -> u64 {
        self.units
    }

    /// The counters.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counts by cause.
    pub fn stats(&self) -> Stats {
        self.counters.read()
    }

    /// The word and shift of `unit`.
    ///
    /// # Panics
    ///
    /// If `unit` is not below [`Self::units`].
    fn word(&self, unit: u64) -> (&A, u32) {
        assert!(unit < self.units, "unit {unit} of {}", self.units);
        let (index, shift) = map::locate(unit);
        (&self.words.as_ref()[index], shift)
    }

    /// `unit`'s state now (Acquire: `Copied` means its copy is visible).
    pub fn state(&self, unit: u64) -> State {
        let (word, shift) = self.word(unit);
        State::decode(word.load(Ordering::Acquire), shift)
    }

    /// Whether `unit` is copied.
    pub fn is_copied(&self, unit: u64) -> bool {
        self.state(unit) == State::Copied
    }

    /// Tries to take `unit` from not copied to copying.
    pub fn claim(&self, unit: u64) -> Claim {
        let (word, shift) = self.word(unit);
        let before = word.fetch_or(1 << shift, Ordering::Acquire);
        match State::decode(before, shift) {
            State::NotCopied => Claim::Won(Token { unit }),
            State::Copying => Claim::Busy,
            State::Copied => Claim::Copied,
        }
    }

    /// The copy of `token`'s unit is complete: copying to copied, counted
    /// under `cause` (one of the causes that copy).
    pub fn finish(&self, token: Token, cause: Cause) {
        let (word, shift) = self.word(token.unit);
        let before = word.fetch_or(2 << shift, Ordering::Release);
        debug_assert_eq!(State::decode(before, shift), State::Copying);
        self.counters.note_copy(cause);
    }

    /// The copy of `token`'s unit failed: copying back to not copied, so
    /// the next claim copies it again.
    pub fn abandon(&self, token: Token) {
        let (word, shift) = self.word(token.unit);
        let before = word.fetch_and(!(1 << shift), Ordering::Release);
        debug_assert_eq!(State::decode(before, shift), State::Copying);
        self.counters.note(Cause::Abandoned);
    }

    /// Calls `relax` until `unit` is no longer being copied; returns
    /// `Copied`, or `NotCopied` if the copy was abandoned. See the module
    /// doc for what keeps this from waiting for ever.
    pub fn wait(&self, unit: u64, mut relax: impl FnMut()) -> State {
        loop {
            match self.state(unit) {
                State::Copying => relax(),
                settled => return settled,
            }
        }
    }

    /// Copies the claimed unit and finishes under `cause`, or abandons.
    fn copy_claimed<U: UnitCopy>(
        &self,
        io: &U,
        token: Token,
        cause: Cause,
    ) -> Result<(), U::Error> {
        match io.copy(token.unit) {
            Ok(()) => {
                self.finish(token, cause);
                Ok(())
            }
            Err(e) => {
                self.abandon(token);
                Err(e)
            }
        }
    }

    /// Copies `unit` at the instant, when nothing else copies; returns
    /// whether it copied (false if it was already copied, or held by a
    /// copier, which then keeps it).
    pub fn copy_eager<U: UnitCopy>(&self, io: &U, unit: u64) -> Result<bool, U::Error> {
        match self.claim(unit) {
            Claim::Won(token) => self.copy_claimed(io, token, Cause::Eager).map(|()| true),
            Claim::Copied | Claim::Busy => Ok(false),
        }
    }

    /// Marks `unit` copied, counted as eager, without copying: for units
    /// the caller copied itself before the first claim (the memory
    /// snapshot's copy-map pages, which the claims change). Returns whether
    /// it marked (false if the unit was claimed already).
    pub fn mark_copied(&self, unit: u64) -> bool {
        match self.claim(unit) {
            Claim::Won(token) => {
                self.finish(token, Cause::Eager);
                true
            }
            Claim::Copied | Claim::Busy => false,
        }
    }

    /// An access is about to see `unit`'s newer data: make sure it is
    /// copied first, copying it now or waiting (calling `relax`) for the
    /// copier that holds it. Allocation- and lock-free.
    pub fn copy_on_access<U: UnitCopy>(
        &self,
        io: &U,
        unit: u64,
        mut relax: impl FnMut(),
    ) -> Access<U::Error> {
        let mut waited = false;
        loop {
            match self.claim(unit) {
                Claim::Won(token) => {
                    return match self.copy_claimed(io, token, Cause::Access) {
                        Ok(()) => Access::Copied,
                        Err(e) => Access::Failed(e),
                    }
                }
                Claim::Copied if waited => {
                    self.counters.note(Cause::Waited);
                    return Access::WaitedForOther;
                }
                Claim::Copied => {
                    self.counters.note(Cause::AlreadyCopied);
                    return Access::AlreadyCopied;
                }
                Claim::Busy => {
                    waited = true;
                    self.wait(unit, &mut relax);
                }
            }
        }
    }

    /// Copies up to `max` units nobody has claimed, scanning from the
    /// background cursor and wrapping around at most once; units being
    /// copied or copied are skipped. Returns how many it copied: `Ok(0)`
    /// (with `max > 0`) means a whole pass found nothing left to claim, so
    /// the engine is complete or the rest is in other copiers' hands. On a
    /// failed copy the unit is abandoned (a later pass retries it) and the
    /// error returned.
    pub fn copy_background<U: UnitCopy>(&self, io: &U, max: u64) -> Result<u64, U::Error> {
        let n = self.units;
        if n == 0 {
            return Ok(0);
        }
        let cursor = self.counters.cursor();
        let start = cursor.load(Ordering::Relaxed) % n;
        let span = self.copy_span(io, start, n, max);
        cursor.store((start + span.scanned) % n, Ordering::Relaxed);
        span.result.map(|()| span.copied)
    }

    /// Copies up to `max` units nobody has claimed among the `reach` units
    /// from `from` (not past the last unit, not wrapping), for a copier
    /// that follows the accesses: the units just after one an access
    /// copied are likely the next ones accessed. The background cursor
    /// stays where it was. Returns how many it copied and the unit after
    /// the last one it looked at (`from + reach`, or the end, once it
    /// looked at them all); a failed copy is abandoned, as in
    /// [`Engine::copy_background`].
    pub fn copy_ahead<U: UnitCopy>(
        &self,
        io: &U,
        from: u64,
        reach: u64,
        max: u64,
    ) -> Result<(u64, u64), U::Error> {
        let from = from.min(self.units);
        let span = self.copy_span(io, from, reach.min(self.units - from), max);
        span.result.map(|()| (span.copied, from + span.scanned))
    }

    /// Claims and copies up to `max` units among the `len` from `start`
    /// (wrapping at the end), until the first failed copy.
    fn copy_span<U: UnitCopy>(&self, io: &U, start: u64, len: u64, max: u64) -> Span<U::Error> {
        let n = self.units;
        let (mut scanned, mut copied) = (0, 0);
        let mut result = Ok(());
        while copied < max && scanned < len && result.is_ok() {
            let at = (start + scanned) % n;
            let Some(unit) = self.next_unclaimed(at) else {
                scanned += (self.word_end(at) - at).min(len - scanned);
                continue;
            };
            if unit - at >= len - scanned {
                scanned = len;
                break;
            }
            scanned += unit - at + 1;
            if let Claim::Won(token) = self.claim(unit) {
                result = self.copy_claimed(io, token, Cause::Background);
                copied += u64::from(result.is_ok());
            }
        }
        Span {
            scanned,
            copied,
            result,
        }
    }

    /// The end of the map word holding `unit`, capped at the last unit.
    fn word_end(&self, unit: u64) -> u64 {
        (unit - unit % UNITS_PER_WORD + UNITS_PER_WORD).min(self.units)
    }

    /// The first unit from `unit` to the end of its word that nobody has
    /// claimed (a Relaxed look: the claim decides).
    fn next_unclaimed(&self, unit: u64) -> Option<u64> {
        let (word, _) = self.word(unit);
        map::first_unclaimed(word.load(Ordering::Relaxed), unit, self.word_end(unit))
    }

    /// Finished copies, from the counters: constant time.
    pub fn completed(&self) -> u64 {
        self.counters.copied()
    }

    /// Copied units, counted in the map: one load per word.
    pub fn count(&self) -> u64 {
        self.words.as_ref()[..words_for(self.units)]
            .iter()
            .map(|w| u64::from((w.load(Ordering::Acquire) & map::COPIED_BITS).count_ones()))
            .sum()
    }

    /// Whether every unit is copied. True means every copy's data is
    /// visible to the caller.
    pub fn is_complete(&self) -> bool {
        self.completed() == self.units
    }
}

/// What [`Engine::copy_span`] did: units looked at, units copied, and the
/// failed copy that stopped it, if one did.
struct Span<E> {
    scanned: u64,
    copied: u64,
    result: Result<(), E>,
}
