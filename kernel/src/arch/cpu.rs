//! Single instructions: port I/O, the time-stamp counter, control registers.

use core::arch::asm;

use x86_64::instructions::port::Port;

/// Reads a byte from an I/O port.
///
/// Port I/O is only exposed to the legacy-device modules of `arch`, each of
/// which owns its port range.
pub(super) fn inb(port: u16) -> u8 {
    // SAFETY: callers in `arch` pass ports of devices they own (COM1, PIT,
    // PIC, CMOS, isa-debug-exit, PCI configuration); reading them has no memory effects.
    unsafe { Port::<u8>::new(port).read() }
}

/// Writes a byte to an I/O port (see [`inb`]).
pub(super) fn outb(port: u16, value: u8) {
    // SAFETY: as for `inb`: the port belongs to the calling device module,
    // and device register writes do not touch memory Rust knows about.
    unsafe { Port::<u8>::new(port).write(value) }
}

/// Reads a 32-bit I/O port (PCI configuration mechanism #1).
pub(super) fn inl(port: u16) -> u32 {
    // SAFETY: as for `inb`.
    unsafe { Port::<u32>::new(port).read() }
}

/// Writes a 32-bit I/O port.
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

/// The registers that locate the calling code, for a core file's
/// `NT_PRSTATUS`: `rip`, `rsp` and `rbp` as at this call site (it is
/// inlined), `rflags` and the segment selectors. The other general
/// registers are left zero: they hold nothing a debugger needs.
#[inline(always)]
pub fn registers_here() -> snapshot::memsnap::elfcore::Registers {
    use snapshot::memsnap::elfcore::Registers;
    let (rip, rsp, rbp, rflags, cs, ss): (u64, u64, u64, u64, u64, u64);
    // SAFETY: the asm only reads registers into outputs; `pushfq`/`pop`
    // use the stack balanced, nothing else is written.
    unsafe {
        asm!(
            "lea {rip}, [rip]",
            "mov {rsp}, rsp",
            "mov {rbp}, rbp",
            "pushfq",
            "pop {rflags}",
            "mov {cs:e}, cs",
            "mov {ss:e}, ss",
            rip = out(reg) rip,
            rsp = out(reg) rsp,
            rbp = out(reg) rbp,
            rflags = out(reg) rflags,
            cs = out(reg) cs,
            ss = out(reg) ss,
            options(preserves_flags)
        )
    };
    let mut regs = Registers::default();
    regs.0[Registers::RIP] = rip;
    regs.0[Registers::RSP] = rsp;
    regs.0[Registers::RBP] = rbp;
    regs.0[Registers::RFLAGS] = rflags;
    regs.0[Registers::CS] = cs;
    regs.0[Registers::SS] = ss;
    regs
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

/// Whether the CPU maps 1 GiB pages (CPUID 0x8000_0001, EDX bit 26).
pub fn has_1gib_pages() -> bool {
    let leaf = core::arch::x86_64::__cpuid(0x8000_0001);
    leaf.edx & (1 << 26) != 0
}

/// Lets the kernel execute SSE instructions (the page-copy routine uses
/// them): CR0.EM off, CR0.MP on, CR4.OSFXSR and OSXMMEXCPT on.
///
/// Rust code is built without SSE, so no context switch needs to save xmm
/// registers; the assembly that uses them runs with interrupts off.
pub fn enable_sse() {
    use x86_64::registers::control::{Cr0, Cr0Flags, Cr4, Cr4Flags};
    let cr0 = (Cr0::read() - Cr0Flags::EMULATE_COPROCESSOR) | Cr0Flags::MONITOR_COPROCESSOR;
    let cr4 = Cr4::read() | Cr4Flags::OSFXSR | Cr4Flags::OSXMMEXCPT_ENABLE;
    // SAFETY: 1. every x86_64 CPU has SSE2; 2. enabling it changes no
    // memory mapping or privilege and affects only SSE instructions.
    unsafe {
        Cr0::write(cr0);
        Cr4::write(cr4);
    }
}

core::arch::global_asm!(
    r#"
    .section .text
    .global call_on_stack
/* call_on_stack(stack_top, entry, arg): runs entry(arg) on another stack
   and comes back to this one. */
call_on_stack:
    pushq %rbp
    movq %rsp, %rbp
    movq %rdi, %rsp
    movq %rdx, %rdi
    callq *%rsi
    movq %rbp, %rsp
    popq %rbp
    retq
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    fn call_on_stack(stack_top: u64, entry: extern "C" fn(*mut u8), arg: *mut u8);
}

extern "C" fn run_closure(arg: *mut u8) {
    // SAFETY: `arg` is the `&mut &mut dyn FnMut()` that `on_stack` passed,
    // alive for the whole call because `on_stack` does not return before.
    let f = unsafe { &mut *arg.cast::<&mut dyn FnMut()>() };
    f();
}

/// Runs `f` on the stack whose top is `stack_top`, with interrupts off.
///
/// The live snapshot's pause uses this so that no page of the range (the
/// caller's own stack included) changes while the pause copies it.
///
/// # Safety
///
/// `stack_top` is 16-byte aligned, one past the end of writable memory the
/// caller owns, large enough for `f` (and for nothing else to use meanwhile).
pub unsafe fn on_stack(stack_top: u64, mut f: impl FnMut()) {
    assert_eq!(stack_top % 16, 0, "misaligned stack");
    let _irq = crate::sync::IrqOff::new();
    let mut f: &mut dyn FnMut() = &mut f;
    // SAFETY: 1. the caller vouches for the stack (contract); 2. `f` lives
    // on this stack frame, which stays intact until `call_on_stack` returns
    // here; 3. interrupts are off, so nothing else runs on either stack.
    unsafe { call_on_stack(stack_top, run_closure, (&raw mut f).cast::<u8>()) };
}
