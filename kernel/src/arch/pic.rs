//! The legacy 8259 PICs: remapped away from the exception vectors and masked,
//! because the local APIC and IOAPIC deliver every interrupt this kernel uses.

use super::cpu::outb;
use super::vectors::PIC_BASE_VECTOR;

/// Remaps both PICs to `PIC_BASE_VECTOR..+16` and masks every line.
pub fn disable() {
    const ICW1_INIT_ICW4: u8 = 0x11;
    outb(0x20, ICW1_INIT_ICW4);
    outb(0xa0, ICW1_INIT_ICW4);
    outb(0x21, PIC_BASE_VECTOR);
    outb(0xa1, PIC_BASE_VECTOR + 8);
    outb(0x21, 4); // secondary on line 2
    outb(0xa1, 2);
    outb(0x21, 1); // 8086 mode
    outb(0xa1, 1);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}
