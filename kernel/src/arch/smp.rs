//! Starting the application processors: INIT, STARTUP, STARTUP (Intel SDM
//! vol. 3, 9.4.4 "MP initialization example"), one CPU at a time, through
//! the real-mode [`super::trampoline`].
//!
//! This module knows nothing of what an AP does once it runs Rust: the
//! kernel passes the entry and each AP's stack. It must never start a CPU
//! while another is still in the trampoline (they share its page).

use core::sync::atomic::{AtomicUsize, Ordering};

use super::{apic, percpu, trampoline};

/// Why an AP did not start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// It did not report in within the time allowed.
    NoAnswer {
        /// Its local APIC id.
        apic_id: u32,
    },
}

/// How many APs have left the trampoline (their entry ran).
static LEFT_TRAMPOLINE: AtomicUsize = AtomicUsize::new(0);

/// Prepares the trampoline area (call once, before the first [`start`]).
pub fn prepare() {
    trampoline::install(super::cpu::cr3());
}

/// Called by an AP's entry first thing: it has left the trampoline, so the
/// next AP may use it.
pub fn left_trampoline() {
    LEFT_TRAMPOLINE.fetch_add(1, Ordering::AcqRel);
}

/// Starts the CPU with local APIC id `apic_id` as CPU number `cpu`, on the
/// stack whose top is `stack_top`, at `entry(cpu)`. Waits until it left
/// the trampoline and reported in (`percpu::is_online`). `wait_ns(ns)`
/// busy-waits (the clock sits above `arch`).
pub fn start(
    cpu: usize,
    apic_id: u32,
    stack_top: u64,
    entry: extern "C" fn(u64) -> !,
    wait_ns: impl Fn(u64),
) -> Result<(), StartError> {
    let left_before = LEFT_TRAMPOLINE.load(Ordering::Acquire);
    trampoline::set_params(trampoline::Params {
        temp_cr3: trampoline::AREA + 4096,
        kernel_cr3: super::cpu::cr3(),
        stack_top,
        arg: cpu as u64,
        entry,
    });
    apic::send_init(apic_id);
    wait_ns(10_000_000);
    for _ in 0..2 {
        apic::send_startup(apic_id, trampoline::STARTUP_PAGE);
        wait_ns(200_000);
        if LEFT_TRAMPOLINE.load(Ordering::Acquire) != left_before {
            break;
        }
    }
    // TCG on a loaded host is slow: allow a generous second.
    for _ in 0..1000 {
        if percpu::is_online(cpu) {
            return Ok(());
        }
        wait_ns(1_000_000);
    }
    Err(StartError::NoAnswer { apic_id })
}
