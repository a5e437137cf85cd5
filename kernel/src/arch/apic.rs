//! The local APIC (xAPIC, memory-mapped): end-of-interrupt, the periodic
//! timer that drives preemption, the CPU's APIC id for MSI/IOAPIC routing,
//! and inter-processor interrupts (INIT, STARTUP, fixed vectors, NMI).
//!
//! Every CPU sees its own local APIC at the same physical address, so one
//! mapping serves all of them; each CPU enables its own with [`init_this_cpu`].

use core::sync::atomic::{AtomicU64, Ordering};

use spin::Once;

use super::cpu::rdmsr;
use super::vectors::{SPURIOUS_VECTOR, TIMER_VECTOR};
use crate::memory::mmio::Mmio;

const IA32_APIC_BASE: u32 = 0x1b;
const REG_ID: usize = 0x20;
const REG_TPR: usize = 0x80;
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0b0011;

const ICR_PENDING: u32 = 1 << 12;
const ICR_LEVEL_ASSERT: u32 = 1 << 14;
const ICR_INIT: u32 = 0b101 << 8;
const ICR_STARTUP: u32 = 0b110 << 8;
const ICR_NMI: u32 = 0b100 << 8;
const ICR_ALL_BUT_SELF: u32 = 0b11 << 18;

static LAPIC: Once<Mmio> = Once::new();
/// The tick rate [`start_timer`] was asked for.
static TICK_HZ: AtomicU64 = AtomicU64::new(0);
/// The timer's initial count for that rate, measured once on the boot CPU.
static TIMER_COUNT: AtomicU64 = AtomicU64::new(0);

fn regs() -> &'static Mmio {
    LAPIC.get().expect("local APIC used before apic::init")
}

/// Maps and software-enables the boot CPU's local APIC.
pub fn init() {
    let base = rdmsr(IA32_APIC_BASE) & 0xffff_f000;
    LAPIC.call_once(|| Mmio::map(base, 4096).expect("cannot map the local APIC"));
    init_this_cpu();
}

/// Software-enables the calling CPU's local APIC (after [`init`]).
pub fn init_this_cpu() {
    let lapic = regs();
    lapic.write32(REG_TPR, 0);
    lapic.write32(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
}

/// Writes the interrupt command register: `low` to CPU `apic_id` (ignored
/// with a shorthand in `low`), then waits until the APIC has sent it.
fn send(apic_id: u32, low: u32) {
    let lapic = regs();
    // The two writes form one command: no interrupt on this CPU may send
    // another in between.
    let _irq = crate::sync::IrqOff::new();
    lapic.write32(REG_ICR_HIGH, apic_id << 24);
    lapic.write32(REG_ICR_LOW, low);
    while lapic.read32(REG_ICR_LOW) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
}

/// Sends INIT to CPU `apic_id` (MP initialization, Intel SDM vol. 3 ch. 9.4).
pub fn send_init(apic_id: u32) {
    send(apic_id, ICR_INIT | ICR_LEVEL_ASSERT);
}

/// Sends STARTUP to CPU `apic_id`: it starts in real mode at `page << 12`.
pub fn send_startup(apic_id: u32, page: u8) {
    send(apic_id, ICR_STARTUP | ICR_LEVEL_ASSERT | u32::from(page));
}

/// Sends interrupt `vector` to CPU `apic_id`.
pub fn send_ipi(apic_id: u32, vector: u8) {
    send(apic_id, ICR_LEVEL_ASSERT | u32::from(vector));
}

/// Sends interrupt `vector` to every CPU but this one.
pub fn send_ipi_others(vector: u8) {
    send(0, ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | u32::from(vector));
}

/// Sends an NMI to every CPU but this one (it arrives with interrupts off).
pub fn send_nmi_others() {
    send(0, ICR_ALL_BUT_SELF | ICR_LEVEL_ASSERT | ICR_NMI);
}

/// This CPU's APIC id (the destination for MSI and IOAPIC routes).
pub fn id() -> u32 {
    regs().read32(REG_ID) >> 24
}

/// Signals the end of the interrupt being handled.
pub fn end_of_interrupt() {
    if let Some(lapic) = LAPIC.get() {
        lapic.write32(REG_EOI, 0);
    }
}

/// Measures the timer's input clock against `wait_ns` of the TSC clock and
/// starts it in periodic mode at `hz`. Returns the timer's frequency.
pub fn start_timer(hz: u32, wait: impl FnOnce()) -> u64 {
    TICK_HZ.store(u64::from(hz), Ordering::Relaxed);
    let lapic = regs();
    lapic.write32(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    lapic.write32(REG_LVT_TIMER, LVT_MASKED | u32::from(TIMER_VECTOR));
    lapic.write32(REG_TIMER_INITIAL, u32::MAX);
    let start = crate::clock::now_ns();
    wait();
    let elapsed_ns = crate::clock::now_ns() - start;
    let counted = u64::from(u32::MAX - lapic.read32(REG_TIMER_CURRENT));
    let timer_hz = counted * 1_000_000_000 / elapsed_ns.max(1);
    let count = (timer_hz / u64::from(hz)).max(1);
    TIMER_COUNT.store(count, Ordering::Relaxed);
    start_periodic(count);
    timer_hz
}

fn start_periodic(count: u64) {
    let lapic = regs();
    lapic.write32(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    lapic.write32(REG_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    lapic.write32(REG_TIMER_INITIAL, count as u32);
}

/// Starts the calling CPU's timer at the rate the boot CPU measured with
/// [`start_timer`] (every CPU's timer runs off the same bus clock).
pub fn start_timer_this_cpu() {
    let count = TIMER_COUNT.load(Ordering::Relaxed);
    assert!(
        count > 0,
        "AP timer started before the boot CPU measured it"
    );
    start_periodic(count);
}

/// Stops the calling CPU's periodic tick until the guard drops (on the
/// same CPU: the caller must be pinned to it, and the guard cannot leave
/// the thread). For a CPU that runs one thread nothing may preempt: under
/// the emulator each tick wakes its main-loop thread on the host, which
/// then competes with the vCPU threads for the host's cores and stalls
/// them (see docs/results/memsnap.md). A zero initial count stops the
/// timer outright (Intel SDM vol. 3, 11.5.4), so the emulator arms no
/// host timer for it at all, which masking would not achieve.
/// The guard's drop checks it: resumed on another CPU, it would leave this
/// one without its tick and restart the other's, so it panics instead.
pub fn pause_tick() -> TickPaused {
    let _irq = crate::sync::IrqOff::new();
    regs().write32(REG_TIMER_INITIAL, 0);
    TickPaused {
        cpu: super::percpu::index(),
        _not_send: core::marker::PhantomData,
    }
}

/// See [`pause_tick`].
#[derive(Debug)]
#[must_use = "the tick resumes when this is dropped"]
pub struct TickPaused {
    /// The CPU whose tick stopped.
    cpu: usize,
    _not_send: core::marker::PhantomData<*const ()>,
}

impl Drop for TickPaused {
    fn drop(&mut self) {
        let _irq = crate::sync::IrqOff::new();
        let here = super::percpu::index();
        assert_eq!(
            here, self.cpu,
            "CPU {}'s tick would be resumed on CPU {here}: its thread moved",
            self.cpu
        );
        start_periodic(TIMER_COUNT.load(Ordering::Relaxed));
    }
}

/// The periodic tick's rate (the scheduler's tick), 0 before [`start_timer`].
pub fn tick_hz() -> u64 {
    TICK_HZ.load(Ordering::Relaxed)
}
