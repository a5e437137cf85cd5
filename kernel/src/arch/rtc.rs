//! The CMOS real-time clock's periodic interrupt (ISA IRQ 8): a device whose
//! interrupt travels through the IOAPIC, used to test interrupt routing.

use super::cpu::{inb, outb};

const INDEX: u16 = 0x70;
const DATA: u16 = 0x71;
const NMI_OFF: u8 = 0x80;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const PERIODIC_ENABLE: u8 = 1 << 6;

fn read(reg: u8) -> u8 {
    outb(INDEX, NMI_OFF | reg);
    inb(DATA)
}

fn write(reg: u8, value: u8) {
    outb(INDEX, NMI_OFF | reg);
    outb(DATA, value);
}

/// Starts the periodic interrupt at 32768 >> (rate - 1) Hz (rate 3..=15;
/// 6 is 1024 Hz).
pub fn start_periodic(rate: u8) {
    let rate = rate.clamp(3, 15);
    write(REG_A, (read(REG_A) & 0xf0) | rate);
    write(REG_B, read(REG_B) | PERIODIC_ENABLE);
    acknowledge();
}

/// Stops the periodic interrupt.
pub fn stop_periodic() {
    write(REG_B, read(REG_B) & !PERIODIC_ENABLE);
    acknowledge();
}

/// Acknowledges an interrupt; the RTC raises no more until this is read.
pub fn acknowledge() {
    read(REG_C);
}
