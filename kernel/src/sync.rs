//! The kernel's spinning locks: [`IrqMutex`], a spin lock that keeps
//! interrupts off while held, [`IrqOff`], and [`Published`], one value
//! handed to interrupt and fault handlers without a lock.
//!
//! Keeping interrupts off while held makes every lock safe to take from
//! interrupt handlers: no handler can interrupt a holder on its own CPU, so
//! no handler spins on a lock its own CPU holds; a holder on another CPU
//! runs on and releases it. The spin itself (`spin::Mutex`) is an atomic
//! compare-and-swap with acquire/release order, correct across CPUs.
//! Exception handlers (page faults) can still arrive while a lock is held;
//! they must not take locks the faulting code may hold. A CPU that waits
//! for other CPUs (a TLB shootdown, the stop-all rendezvous: `arch::ipi`)
//! reaches them by NMI or only where they hold no such lock.
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
/// Readers use [`Published::with`]: each first counts itself in, then loads
/// the pointer; [`Published::take`] first swaps the pointer out, then waits
/// until no reader is counted in. Both use sequentially consistent order,
/// so either the reader sees the pointer gone or the taker sees the reader
/// (on any CPU), and the value is freed only after its last reader left. A
/// withdrawal from inside a reader on the same CPU would wait for itself:
/// it is caught by the per-CPU reader depth and panics instead.
#[derive(Debug)]
pub struct Published<T> {
    value: core::sync::atomic::AtomicPtr<T>,
    readers: core::sync::atomic::AtomicUsize,
    depth: [core::sync::atomic::AtomicU32; crate::arch::percpu::MAX_CPUS],
}

impl<T> Published<T> {
    /// Nothing published.
    pub const fn new() -> Self {
        Published {
            value: core::sync::atomic::AtomicPtr::new(core::ptr::null_mut()),
            readers: core::sync::atomic::AtomicUsize::new(0),
            depth: [const { core::sync::atomic::AtomicU32::new(0) }; crate::arch::percpu::MAX_CPUS],
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
        use core::sync::atomic::Ordering::SeqCst;
        let _irq = IrqOff::new();
        let depth = &self.depth[crate::arch::percpu::index()];
        self.readers.fetch_add(1, SeqCst);
        depth.fetch_add(1, SeqCst);
        let raw = self.value.load(SeqCst);
        let result = (!raw.is_null()).then(|| {
            // SAFETY: 1. `raw` came from `Box::into_raw` in `publish`; 2. this
            // reader was counted in before it loaded `raw`, and `take` frees
            // only after it swapped the pointer out *and* saw no reader
            // counted in (both SeqCst), so the value outlives this borrow on
            // every CPU; 3. interrupts are off, so this CPU cannot run a
            // `take` meanwhile, except from inside `f`, which panics.
            f(unsafe { &*raw })
        });
        depth.fetch_sub(1, SeqCst);
        self.readers.fetch_sub(1, SeqCst);
        result
    }

    /// Waits until every reader that started before this call has left
    /// (it sees no reader counted in at one moment), the value still
    /// published: a grace period, for an owner that has stopped new work
    /// from starting and must see the work in flight finish. Must not be
    /// called from inside [`Self::with`] (it would wait for itself).
    pub fn quiesce(&self) {
        use core::sync::atomic::Ordering::SeqCst;
        let _irq = IrqOff::new();
        assert_eq!(
            self.depth[crate::arch::percpu::index()].load(SeqCst),
            0,
            "waiting for readers from inside one"
        );
        while self.readers.load(SeqCst) != 0 {
            core::hint::spin_loop(); // another CPU's reader is leaving
        }
    }

    /// Withdraws the value, once no CPU reads it any more. Must not be
    /// called from inside [`Self::with`].
    pub fn take(&self) -> Option<alloc::boxed::Box<T>> {
        use core::sync::atomic::Ordering::SeqCst;
        let _irq = IrqOff::new();
        assert_eq!(
            self.depth[crate::arch::percpu::index()].load(SeqCst),
            0,
            "withdrawing a value in use"
        );
        let raw = self.value.swap(core::ptr::null_mut(), SeqCst);
        while self.readers.load(SeqCst) != 0 {
            core::hint::spin_loop(); // another CPU's reader is leaving
        }
        // SAFETY: a non-null `raw` came from `Box::into_raw` in `publish`, and
        // the swap made this call its only owner; no reader holds it: every
        // reader that could have loaded it was counted in, and has left.
        (!raw.is_null()).then(|| unsafe { alloc::boxed::Box::from_raw(raw) })
    }
}
