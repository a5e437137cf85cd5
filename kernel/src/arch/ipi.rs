//! What CPUs ask of each other: TLB shootdowns, the stop-all rendezvous,
//! and the fatal stop.
//!
//! - **Shootdown** ([`Shootdown`]): after a change that removes a mapping or
//!   a permission, every other online CPU flushes its TLB before the change
//!   is relied on. Sent as an NMI, so a CPU that spins with interrupts off
//!   (on a lock the initiator holds, say) still answers: the protocol cannot
//!   deadlock on interrupt masking. Requests are numbered; each CPU records
//!   the newest number it has flushed for, so coalesced NMIs lose nothing.
//! - **Rendezvous** ([`stop_others`]): every other online CPU parks with
//!   interrupts off until the guard drops, then flushes its TLB. Sent as a
//!   fixed interrupt, so a CPU parks only where interrupts were on, which
//!   means it holds no spinning lock (every [`crate::sync::IrqMutex`] keeps
//!   interrupts off): the initiator may take any lock while others park.
//! - **Fatal stop** ([`stop_all_fatal`]): the first CPU to fail stops the
//!   others for good (NMI) so its report is the last word.
//!
//! Nothing here may take a lock or allocate: the handlers run in NMI and
//! interrupt context, and the fatal stop runs on a failing CPU.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use super::percpu::{self, MAX_CPUS};
use super::vectors::PARK_VECTOR;

static FLUSH_REQUESTED: AtomicU64 = AtomicU64::new(0);
static FLUSHED: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Flushes this CPU's whole TLB (global pages are not used by the kernel).
pub fn flush_local() {
    x86_64::instructions::tlb::flush_all();
}

/// Proof that a mapping or permission was removed on this CPU, which the
/// other CPUs may still cache. Must be [`Shootdown::flush_everywhere`]ed
/// before the memory the old entries reached is reused or relied on.
#[must_use = "other CPUs may still use the removed mapping: call flush_everywhere"]
#[derive(Debug)]
pub struct Shootdown(());

impl Shootdown {
    /// A change was made (this CPU's own TLB entry is already flushed).
    pub fn new() -> Self {
        Shootdown(())
    }

    /// Makes every online CPU flush its TLB, and waits until they have.
    /// Works with interrupts on or off; never call it from an NMI.
    pub fn flush_everywhere(self) {
        if percpu::online() <= 1 {
            return;
        }
        // No migration from here on: "every CPU but me" must stay one set.
        let _irq = crate::sync::IrqOff::new();
        // The caller may have moved since its own flush: flush here too.
        flush_local();
        let request = FLUSH_REQUESTED.fetch_add(1, Ordering::AcqRel) + 1;
        let me = percpu::index();
        super::apic::send_nmi_others();
        for cpu in (0..MAX_CPUS).filter(|&c| c != me && percpu::is_online(c)) {
            while FLUSHED[cpu].load(Ordering::Acquire) < request {
                core::hint::spin_loop();
            }
        }
    }
}

impl Default for Shootdown {
    fn default() -> Self {
        Self::new()
    }
}

/// The NMI handler's part: stop for good after a fatal error elsewhere, or
/// answer shootdowns. Returns whether the NMI was one of these (anything
/// else is a hardware NMI, for the exception handler). Once any shootdown
/// was sent, an NMI with nothing new to flush counts as a coalesced one:
/// QEMU raises no other NMI, so none is mistaken.
pub fn on_nmi() -> bool {
    if STOPPING.load(Ordering::Acquire) {
        super::cpu::halt_forever();
    }
    let requested = FLUSH_REQUESTED.load(Ordering::Acquire);
    let me = percpu::index();
    if FLUSHED[me].load(Ordering::Acquire) >= requested {
        // Nothing new; an NMI from a shootdown already answered counts too.
        return requested > 0;
    }
    flush_local();
    FLUSHED[me].fetch_max(requested, Ordering::AcqRel);
    true
}

/// Stops every other CPU for good; returns `false` if another CPU already
/// did (the caller, a second failure, should then halt quietly).
pub fn stop_all_fatal() -> bool {
    if STOPPING.swap(true, Ordering::AcqRel) {
        return false;
    }
    if percpu::online() > 1 {
        super::apic::send_nmi_others();
    }
    true
}

const NOBODY: usize = usize::MAX;
static PARK_OWNER: AtomicUsize = AtomicUsize::new(NOBODY);
static PARK_ROUND: AtomicU64 = AtomicU64::new(0);
static RELEASED_ROUND: AtomicU64 = AtomicU64::new(0);
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// Every other CPU parked with interrupts off, and this one's interrupts
/// off, until dropped; on release each parked CPU flushes its TLB.
#[derive(Debug)]
#[must_use = "the other CPUs resume when this is dropped"]
pub struct AllStopped {
    round: u64,
    _irq: crate::sync::IrqOff,
}

/// Parks every other online CPU. Call with interrupts on (so no spinning
/// lock is held, and a concurrent rendezvous can park this CPU first);
/// panics otherwise.
pub fn stop_others() -> AllStopped {
    assert!(
        x86_64::instructions::interrupts::are_enabled(),
        "stop_others with interrupts off could deadlock"
    );
    let irq = loop {
        let irq = crate::sync::IrqOff::new();
        if PARK_OWNER
            .compare_exchange(NOBODY, percpu::index(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            break irq;
        }
        // Another CPU stops the world: let its interrupt park this one.
        drop(irq);
        core::hint::spin_loop();
    };
    PARKED.store(0, Ordering::Release);
    let round = PARK_ROUND.fetch_add(1, Ordering::AcqRel) + 1;
    let others = percpu::online() - 1;
    if others > 0 {
        super::apic::send_ipi_others(PARK_VECTOR);
        while PARKED.load(Ordering::Acquire) < others {
            core::hint::spin_loop();
        }
    }
    AllStopped { round, _irq: irq }
}

impl Drop for AllStopped {
    fn drop(&mut self) {
        flush_local();
        RELEASED_ROUND.store(self.round, Ordering::Release);
        PARK_OWNER.store(NOBODY, Ordering::Release);
    }
}

/// The park interrupt's handler: waits, interrupts off, until the round it
/// was sent for is released, then flushes the TLB.
pub fn on_park() {
    let round = PARK_ROUND.load(Ordering::Acquire);
    if RELEASED_ROUND.load(Ordering::Acquire) >= round {
        return; // late or stray: that round is over
    }
    PARKED.fetch_add(1, Ordering::AcqRel);
    while RELEASED_ROUND.load(Ordering::Acquire) < round {
        core::hint::spin_loop();
    }
    flush_local();
}
