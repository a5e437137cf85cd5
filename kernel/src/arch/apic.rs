//! The local APIC (xAPIC, memory-mapped): end-of-interrupt, the periodic
//! timer that drives preemption, and the CPU's APIC id for MSI/IOAPIC routing.

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
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INITIAL: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;
const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_16: u32 = 0b0011;

static LAPIC: Once<Mmio> = Once::new();
/// The tick rate [`start_timer`] was asked for.
static TICK_HZ: AtomicU64 = AtomicU64::new(0);

fn regs() -> &'static Mmio {
    LAPIC.get().expect("local APIC used before apic::init")
}

/// Maps and software-enables the local APIC.
pub fn init() {
    let base = rdmsr(IA32_APIC_BASE) & 0xffff_f000;
    let lapic = LAPIC.call_once(|| Mmio::map(base, 4096).expect("cannot map the local APIC"));
    lapic.write32(REG_TPR, 0);
    lapic.write32(REG_SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
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
    lapic.write32(REG_LVT_TIMER, LVT_PERIODIC | u32::from(TIMER_VECTOR));
    lapic.write32(REG_TIMER_INITIAL, (timer_hz / u64::from(hz)).max(1) as u32);
    timer_hz
}

/// The periodic tick's rate (the scheduler's tick), 0 before [`start_timer`].
pub fn tick_hz() -> u64 {
    TICK_HZ.load(Ordering::Relaxed)
}
