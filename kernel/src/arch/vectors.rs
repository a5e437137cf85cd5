//! The interrupt vector map: which vector number means what. Kept apart
//! from the trap path so the devices that program vectors (local APIC,
//! PIC) and the dispatcher that decodes them share it without importing
//! each other.

/// The local APIC timer's vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// The software interrupt threads raise to give up the CPU (`int 0x21`).
pub const YIELD_VECTOR: u8 = 0x21;
/// First vector handed out to devices (IOAPIC lines, MSI-X).
pub const FIRST_DEVICE_VECTOR: u8 = 0x30;
/// One past the last device vector.
pub const END_DEVICE_VECTOR: u8 = 0xe0;
/// Where the (masked) 8259 PICs are remapped, so a stray legacy interrupt
/// cannot look like a CPU exception.
pub const PIC_BASE_VECTOR: u8 = 0xe0;
/// The local APIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Inter-processor: park until the stop-all rendezvous releases this CPU
/// (see `arch::ipi`).
pub const PARK_VECTOR: u8 = 0xf0;
/// Inter-processor: a thread became ready; an idle CPU should look for it.
pub const RESCHED_VECTOR: u8 = 0xf1;
