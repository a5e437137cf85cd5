//! The kernel's one lock: a spin lock that keeps interrupts off while held.
//!
//! On this single CPU that makes every lock safe to take from interrupt
//! handlers: no handler can interrupt a holder, so no handler can spin on a
//! lock its own CPU holds. Exception handlers (page faults) can still arrive
//! while a lock is held; they must not take locks the faulting code may hold.

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
