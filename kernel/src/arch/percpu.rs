//! Per-CPU data: each CPU's GS base points at its own [`PerCpu`] record in
//! a static array, so [`index`] (which CPU am I) is one load through `gs`.
//!
//! The records live in the kernel image (a static), so a live snapshot
//! copies them with the image. Everything in a record is atomic: other
//! CPUs read it (who is online, which APIC id to send an IPI to).
//!
//! This module must never hand out a record of another CPU for writing,
//! and [`index`] is only stable while the caller cannot migrate (interrupts
//! off): a thread may move to another CPU at any preemption.

use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

pub use snapshot::policy::sched::MAX_CPUS;

/// One CPU's record. `repr(C)`: the trap path reads
/// [`PerCpu::switch_release`] at a fixed offset through `gs`.
#[repr(C)]
#[derive(Debug)]
pub struct PerCpu {
    /// The CPU's number (`0..MAX_CPUS`, the boot CPU is 0). Offset 0.
    index: AtomicU64,
    /// Set by the scheduler when it switches away from a thread: the flag
    /// that says the thread's stack is still in use; the trap path clears
    /// it once it has left that stack. Offset 8.
    switch_release: AtomicPtr<AtomicBool>,
    /// The local APIC id.
    apic_id: AtomicU32,
    /// The CPU has reported in.
    online: AtomicBool,
}

/// Offset of [`PerCpu::switch_release`], for the trap path's assembly.
pub const SWITCH_RELEASE_OFFSET: usize = 8;

static CPUS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        index: AtomicU64::new(0),
        switch_release: AtomicPtr::new(core::ptr::null_mut()),
        apic_id: AtomicU32::new(0),
        online: AtomicBool::new(false),
    }
}; MAX_CPUS];

static ONLINE: AtomicUsize = AtomicUsize::new(0);

const IA32_GS_BASE: u32 = 0xc000_0101;

/// Makes the calling CPU number `cpu` with local APIC id `apic_id`: points
/// its GS base at record `cpu`. Call once per CPU, first thing, with
/// interrupts off; [`index`] is valid from here on.
pub fn init_this(cpu: usize, apic_id: u32) {
    assert!(cpu < MAX_CPUS, "CPU {cpu} beyond MAX_CPUS");
    let record = &CPUS[cpu];
    record.index.store(cpu as u64, Ordering::Relaxed);
    record.apic_id.store(apic_id, Ordering::Relaxed);
    // SAFETY: 1. IA32_GS_BASE only changes what `gs:`-relative loads read;
    // the only such loads are `index` and the trap path, which expect this
    // record; 2. the record is a static, valid for the kernel's life.
    unsafe {
        x86_64::registers::model_specific::Msr::new(IA32_GS_BASE)
            .write(record as *const PerCpu as u64);
    }
}

/// Marks the calling CPU online (it takes threads and IPIs from now on).
pub fn report_in() {
    let record = this();
    if !record.online.swap(true, Ordering::AcqRel) {
        ONLINE.fetch_add(1, Ordering::AcqRel);
    }
}

/// The calling CPU's number. Stable only while the caller cannot migrate.
#[inline]
pub fn index() -> usize {
    let cpu: u64;
    // SAFETY: 1. GS base points at this CPU's record (`init_this` runs first
    // on every CPU, before any code that can reach here); 2. the load reads
    // the record's first field, an atomic u64, without side effects.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) cpu, options(nostack, preserves_flags, readonly));
    }
    cpu as usize
}

fn this() -> &'static PerCpu {
    &CPUS[index()]
}

/// CPUs online so far (1 until the others report in).
pub fn online() -> usize {
    ONLINE.load(Ordering::Acquire).max(1)
}

/// Whether CPU `cpu` has reported in.
pub fn is_online(cpu: usize) -> bool {
    CPUS.get(cpu)
        .is_some_and(|r| r.online.load(Ordering::Acquire))
}

/// The local APIC id of CPU `cpu`.
pub fn apic_id(cpu: usize) -> u32 {
    CPUS[cpu].apic_id.load(Ordering::Relaxed)
}

/// Asks the trap path to clear `flag` once it has left the current stack
/// (the scheduler's "this thread's stack is still in use" flag).
pub fn release_after_switch(flag: &'static AtomicBool) {
    this().switch_release.store(
        flag as *const AtomicBool as *mut AtomicBool,
        Ordering::Relaxed,
    );
}
