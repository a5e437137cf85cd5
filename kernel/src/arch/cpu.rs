//! Single instructions: port I/O, the time-stamp counter, control registers.

use core::arch::asm;

use x86_64::instructions::port::Port;

/// Reads a byte from an I/O port.
///
/// Port I/O is only exposed to the legacy-device modules of `arch`, each of
/// which owns its port range.
pub(super) fn inb(port: u16) -> u8 {
    // SAFETY: callers in `arch` pass ports of devices they own (COM1, PIT,
    // PIC, CMOS, isa-debug-exit); reading them has no memory effects.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes a byte to an I/O port (see [`inb`]).
pub(super) fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`: the port belongs to the calling device module,
    // and device register writes do not touch memory Rust knows about.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Reads a 32-bit I/O port (PCI configuration mechanism #1).
#[allow(dead_code)] // used by the PCI layer of the virtio-blk issue
pub(super) fn inl(port: u16) -> u32 {
    // SAFETY: as for `inb`.
    unsafe { Port::<u32>::new(port).read() }
}

/// Writes a 32-bit I/O port.
#[allow(dead_code)]
pub(super) fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { Port::<u32>::new(port).write(value) }
}

/// The time-stamp counter.
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDTSC reads a counter; CR4.TSD is clear, so it is allowed at
    // every privilege level and has no side effects.
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Reads a model-specific register.
pub(super) fn rdmsr(msr: u32) -> u64 {
    // SAFETY: callers read architectural MSRs that exist on every x86_64
    // CPU QEMU emulates (IA32_APIC_BASE); reading has no side effects.
    unsafe { x86_64::registers::model_specific::Msr::new(msr).read() }
}

/// The faulting address of the last page fault.
pub fn cr2() -> u64 {
    x86_64::registers::control::Cr2::read_raw()
}

/// The physical address of the active top-level page table.
pub fn cr3() -> u64 {
    x86_64::registers::control::Cr3::read()
        .0
        .start_address()
        .as_u64()
}

/// Stops the CPU until the next interrupt, with interrupts enabled.
pub fn enable_interrupts_and_halt() {
    x86_64::instructions::interrupts::enable_and_hlt();
}

/// Stops this CPU for good.
pub fn halt_forever() -> ! {
    loop {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::hlt();
    }
}

/// A CPU exception to raise on purpose, to show the diagnostics work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// `#PF`: read an unmapped address.
    PageFault(u64),
    /// `#UD`: execute `ud2`.
    InvalidOpcode,
    /// `#DE`: divide by zero with `div`.
    DivideError,
    /// `#GP`: read a non-canonical address.
    GeneralProtection,
    /// `#BP`: `int3`, which nothing handles.
    Breakpoint,
}

/// Raises `crash`. Each exception handler prints a diagnostic and exits
/// QEMU, so this normally does not return.
pub fn crash(crash: Crash) {
    // SAFETY: each instruction below faults before it has any effect on
    // memory; the exception handler reports it and stops the kernel, so no
    // Rust state is ever observed half-changed.
    unsafe {
        match crash {
            Crash::PageFault(addr) => {
                asm!("mov {tmp}, [{addr}]", addr = in(reg) addr, tmp = out(reg) _, options(nostack))
            }
            Crash::InvalidOpcode => asm!("ud2", options(nomem, nostack)),
            Crash::DivideError => asm!(
                "xor edx, edx", "xor ecx, ecx", "div ecx",
                out("eax") _, out("edx") _, out("ecx") _, options(nomem, nostack)
            ),
            Crash::GeneralProtection => asm!(
                "mov {tmp}, [{addr}]",
                addr = in(reg) 0x8000_0000_0000_0000u64, tmp = out(reg) _, options(nostack)
            ),
            Crash::Breakpoint => asm!("int3", options(nomem, nostack)),
        }
    }
}
