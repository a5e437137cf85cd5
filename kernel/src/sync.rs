//! The kernel's spinning locks: [`IrqMutex`], a spin lock that keeps
//! interrupts off while held, [`IrqOff`], and [`Published`], one value
//! handed to interrupt and fault handlers without a lock.
//!
//! On this single CPU that makes every lock safe to take from interrupt
//! handlers: no handler can interrupt a holder, so no handler can spin on a
//! lock its own CPU holds. Exception handlers (page faults) can still arrive
//! while a lock is held; they must not take locks the faulting code may hold.
//!
//! Nothing here may block or name the scheduler: `arch` and `memory` build
//! on these locks, below the scheduler. The lock whose waiters sleep is
//! `sleep_mutex`, above it.

use core::ops::{Deref, DerefMut};

use x86_64::instructions::interrupts;

/// A spin lock that disables interrupts for as long as it is held.
#[derive(Debug)]
pub struct IrqMutex<T> {
    inner: spin::Mutex<T>,
}

/// Proof that interrupts are off; restores the previous state on drop.
#[derive(Debug)]
pub struct IrqOff {
    were_enabled: bool,
}

impl IrqOff {
    /// Disables interrupts until the guard is dropped.
    pub fn new() -> Self {
        let were_enabled = interrupts::are_enabled();
        interrupts::disable();
        IrqOff { were_enabled }
    }
}

impl Default for IrqOff {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for IrqOff {
    fn drop(&mut self) {
        if self.were_enabled {
            interrupts::enable();
        }
    }
}

/// A held [`IrqMutex`]. The lock is released before interrupts come back
/// (fields drop in declaration order).
#[derive(Debug)]
pub struct IrqGuard<'a, T> {
    guard: spin::MutexGuard<'a, T>,
    _irq: IrqOff,
}

impl<T> IrqMutex<T> {
    /// A new unlocked mutex.
    pub const fn new(value: T) -> Self {
        IrqMutex {
            inner: spin::Mutex::new(value),
        }
    }

    /// Disables interrupts, then spins until the lock is free.
    pub fn lock(&self) -> IrqGuard<'_, T> {
        let irq = IrqOff::new();
        IrqGuard {
            guard: self.inner.lock(),
            _irq: irq,
        }
    }

    /// Takes the lock if it is free (for diagnostics on fatal paths).
    pub fn try_lock(&self) -> Option<IrqGuard<'_, T>> {
        let irq = IrqOff::new();
        let guard = self.inner.try_lock()?;
        Some(IrqGuard { guard, _irq: irq })
    }
}

impl<T> Deref for IrqGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T> DerefMut for IrqGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// One value published for interrupt and fault handlers to read without a
/// lock: a page-fault handler cannot take a lock the code it interrupted may
/// hold, but it can follow a pointer.
///
/// Readers use [`Published::with`], which keeps interrupts off while the
/// value is borrowed, so on this single CPU no thread can withdraw the value
/// under a reader; a withdrawal from inside a reader is caught by the reader
/// count and panics instead of freeing memory in use.
#[derive(Debug)]
pub struct Published<T> {
    value: core::sync::atomic::AtomicPtr<T>,
    readers: core::sync::atomic::AtomicUsize,
}

impl<T> Published<T> {
    /// Nothing published.
    pub const fn new() -> Self {
        Published {
            value: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
            readers: core::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Publishes `value`, or hands it back if something is published.
    pub fn publish(&self, value: alloc::boxed::Box<T>) -> Result<(), alloc::boxed::Box<T>> {
        use core::sync::atomic::Ordering;
        let raw = alloc::boxed::Box::into_raw(value);
        match self.value.compare_exchange(
            core::ptr::null_mut(),
            raw,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(()),
            // SAFETY: `raw` came from `Box::into_raw` just above and was not
            // published, so this is its only owner.
            Err(_) => Err(unsafe { alloc::boxed::Box::from_raw(raw) }),
        }
    }

    /// Runs `f` on the published value, with interrupts off.
    pub fn with<R>(&self, f: impl FnOnce(&T) -> R) -> Option<R> {
        use core::sync::atomic::Ordering;
        let _irq = IrqOff::new();
        let raw = self.value.load(Ordering::Acquire);
        if raw.is_null() {
            return None;
        }
        self.readers.fetch_add(1, Ordering::AcqRel);
        // SAFETY: 1. `raw` came from `Box::into_raw` in `publish`; 2. it
        // stays valid while interrupts are off, because `take` only runs in
        // thread context (this single CPU cannot switch threads with
        // interrupts off) and panics if called from inside a reader.
        let result = f(unsafe { &*raw });
        self.readers.fetch_sub(1, Ordering::AcqRel);
        Some(result)
    }

    /// Withdraws the value. Must not be called from inside [`Self::with`].
    pub fn take(&self) -> Option<alloc::boxed::Box<T>> {
        use core::sync::atomic::Ordering;
        let _irq = IrqOff::new();
        assert_eq!(
            self.readers.load(Ordering::Acquire),
            0,
            "withdrawing a value in use"
        );
        let raw = self.value.swap(core::ptr::null_mut(), Ordering::AcqRel);
        // SAFETY: a non-null `raw` came from `Box::into_raw` in `publish`, and
        // the swap made this call its only owner; no reader holds it (checked).
        (!raw.is_null()).then(|| unsafe { alloc::boxed::Box::from_raw(raw) })
    }
}
