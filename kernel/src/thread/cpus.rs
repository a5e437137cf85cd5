//! Threads and CPUs: which CPUs a thread may run on (affinity, a CPU of
//! its own), and holding every CPU but the boot CPU idle for code not yet
//! safe on several CPUs. The policy is the run queue's; this file only
//! asks it, under the scheduler's lock, and sends the reschedule
//! interrupts that make other CPUs look again. It must never switch
//! threads itself.

use snapshot::policy::sched::MAX_CPUS;

use super::{kick_idle_cpus, with, yield_now, Scheduler};
use crate::arch::percpu;
use crate::sync::IrqOff;

/// CPUs the scheduler runs threads on (those online).
pub fn cpus() -> usize {
    percpu::online()
}

/// The CPU the calling thread runs on (it may move at any preemption).
pub fn current_cpu() -> usize {
    let _irq = IrqOff::new();
    percpu::index()
}

/// Lets the calling thread run only on the CPUs of `mask` (bit `n` = CPU
/// `n`); with `reserve`, its one CPU runs no other thread while it lives.
/// Moves there at its next switch (it yields once to get there). Returns `false`, changing nothing, if refused
/// (no such CPU online, a reservation of several CPUs or of the last free
/// one).
pub fn set_affinity(mask: u64, reserve: bool) -> bool {
    let online = (0..MAX_CPUS)
        .filter(|&c| percpu::is_online(c) || c == 0)
        .fold(0u64, |m, c| m | 1 << c);
    let mask = mask & online;
    if mask == 0 {
        return false;
    }
    let set = with(|s| {
        let current = s.queue.current(percpu::index());
        s.queue.set_affinity(current, mask, reserve)
    });
    if set && mask & (1 << current_cpu()) == 0 {
        // Moves at this switch, unless its CPUs are held (then later).
        yield_now();
    }
    set
}

/// Gives the calling thread a CPU of its own, the highest online one, when
/// there is more than one CPU; returns that CPU. With `reserve`, no other
/// thread runs there while the caller lives (threads pinned to it run on
/// the other CPUs meanwhile; its idle thread and its timer still run
/// there); without, the caller is only pinned there and other threads may
/// use the CPU while it sleeps. `None` too while that CPU is held
/// ([`hold_others`]): the caller would stay on the boot CPU with everyone
/// else, so it has no CPU of its own.
pub fn take_own_cpu(reserve: bool) -> Option<usize> {
    let cpus = cpus();
    let cpu = (1..MAX_CPUS).rev().find(|&c| percpu::is_online(c))?;
    if with(|s| s.queue.held() & (1 << cpu) != 0) {
        return None;
    }
    (cpus > 1 && set_affinity(1 << cpu, reserve)).then_some(cpu)
}

/// Every CPU but the boot CPU held in its idle thread (see [`hold_others`]).
#[derive(Debug)]
#[must_use = "the other CPUs run threads again when this is dropped"]
pub struct OthersHeld(());

/// Holds every CPU but the boot CPU in its idle thread, and moves the
/// calling thread to the boot CPU: from the return on, threads run on the
/// boot CPU alone (whatever their affinity) until the last such guard
/// drops. For code that is not yet safe on several CPUs.
pub fn hold_others() -> OthersHeld {
    with(|s| {
        s.holds += 1;
        s.queue.hold(u64::MAX);
    });
    loop {
        let settled = with(|s| {
            kick_held(s);
            (1..s.queue.cpus()).all(|c| !percpu::is_online(c) || s.queue.is_idle(c))
        });
        if settled && current_cpu() == 0 {
            return OthersHeld(());
        }
        yield_now();
    }
}

fn kick_held(s: &Scheduler) {
    for cpu in 1..s.queue.cpus() {
        if percpu::is_online(cpu) && !s.queue.is_idle(cpu) {
            crate::arch::apic::send_ipi(percpu::apic_id(cpu), crate::arch::vectors::RESCHED_VECTOR);
        }
    }
}

impl Drop for OthersHeld {
    fn drop(&mut self) {
        with(|s| {
            s.holds -= 1;
            if s.holds == 0 {
                s.queue.hold(0);
                kick_idle_cpus(s, percpu::index());
            }
        });
    }
}
