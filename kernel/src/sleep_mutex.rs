//! A lock whose waiters sleep instead of spinning ([`SleepMutex`]), for
//! long holds such as a disk batch. It sits above the scheduler, whose
//! block and wake calls it uses; it must never be taken in an interrupt or
//! fault handler, which cannot sleep.

use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicUsize, Ordering};

use crate::thread;

/// A lock whose waiters sleep instead of spinning, for long holds (a disk
/// batch). It is fair: callers get it in the order they asked (a ticket
/// lock), so a thread that releases and asks again cannot starve others.
/// Interrupts stay on while it is held; never take it in an interrupt
/// handler.
#[derive(Debug)]
pub struct SleepMutex<T> {
    next_ticket: AtomicUsize,
    serving: AtomicUsize,
    inner: spin::Mutex<T>,
}

/// A held [`SleepMutex`]; the next ticket is served when it drops.
#[derive(Debug)]
pub struct SleepGuard<'a, T> {
    guard: Option<spin::MutexGuard<'a, T>>,
    lock: &'a SleepMutex<T>,
}

impl<T> SleepMutex<T> {
    /// A new unlocked mutex.
    pub const fn new(value: T) -> Self {
        SleepMutex {
            next_ticket: AtomicUsize::new(0),
            serving: AtomicUsize::new(0),
            inner: spin::Mutex::new(value),
        }
    }

    fn key(&self) -> usize {
        self as *const Self as usize
    }

    /// Takes the lock, sleeping until every earlier caller has had it.
    pub fn lock(&self) -> SleepGuard<'_, T> {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        thread::block_until(self.key(), || {
            self.serving.load(Ordering::Acquire) == ticket
        });
        let guard = self
            .inner
            .try_lock()
            .expect("the ticket holder is the only one to lock");
        SleepGuard {
            guard: Some(guard),
            lock: self,
        }
    }
}

impl<T> SleepMutex<T> {
    /// Takes the lock if nobody holds it or waits for it, without
    /// sleeping: a ticket is taken only when it would be served at once,
    /// so the queue's order is kept.
    pub fn try_lock(&self) -> Option<SleepGuard<'_, T>> {
        let serving = self.serving.load(Ordering::Acquire);
        // `serving` only grows and never passes `next_ticket`: if
        // `next_ticket` still equals the `serving` read above, no ticket
        // is outstanding and the one taken here is served now.
        self.next_ticket
            .compare_exchange(serving, serving + 1, Ordering::Acquire, Ordering::Relaxed)
            .ok()?;
        let guard = self
            .inner
            .try_lock()
            .expect("the ticket holder is the only one to lock");
        Some(SleepGuard {
            guard: Some(guard),
            lock: self,
        })
    }
}

impl<T> Deref for SleepGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.guard.as_ref().expect("held until drop")
    }
}

impl<T> DerefMut for SleepGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.guard.as_mut().expect("held until drop")
    }
}

impl<T> Drop for SleepGuard<'_, T> {
    fn drop(&mut self) {
        self.guard = None;
        self.lock.serving.fetch_add(1, Ordering::Release);
        thread::wake_all(self.lock.key());
    }
}
