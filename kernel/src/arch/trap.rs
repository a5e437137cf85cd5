//! Interrupt and exception entry: one assembly stub per vector, one common
//! path that saves every register into a [`TrapFrame`], and [`trap_dispatch`].
//!
//! The common path calls `trap_dispatch(frame) -> frame` and resumes
//! whichever frame it returns. Returning another thread's saved frame is how
//! the scheduler switches threads, from the timer interrupt (preemption) and
//! from the software [`YIELD_VECTOR`] (yield, sleep, block, exit), so there is
//! exactly one context-switch mechanism and it is this file.
//!
//! The kernel is built without SSE (soft-float target), so the general
//! registers are the whole thread context. Handlers here must never block;
//! they decide and return.
//!
//! This file names no layer above `arch`: the scheduler and the exception
//! handler are installed as [`Handlers`] by [`init`] at boot, and device
//! drivers take a vector with [`alloc_vector`]. The one call it makes on
//! its own is the local APIC's end-of-interrupt, which the CPU requires of
//! every interrupt path. The dispatch path takes no lock and never
//! allocates: the handlers are read with one atomic load.

use core::arch::global_asm;
use core::sync::atomic::{AtomicUsize, Ordering};

use spin::Once;
use x86_64::instructions::tables::lidt;
use x86_64::structures::DescriptorTablePointer;
use x86_64::VirtAddr;

use super::gdt::{IST_DOUBLE_FAULT, IST_MACHINE_CHECK, IST_NMI, IST_PAGE_FAULT, KERNEL_CS};
use super::vectors::{
    END_DEVICE_VECTOR, FIRST_DEVICE_VECTOR, PARK_VECTOR, PIC_BASE_VECTOR, RESCHED_VECTOR,
    SPURIOUS_VECTOR, TIMER_VECTOR, YIELD_VECTOR,
};

/// The registers of an interrupted context, as the entry stub leaves them
/// on the stack (lowest address first).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// Vector number, pushed by the stub.
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one.
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// A frame that starts a new kernel thread at `entry(arg)` on a stack
    /// whose top is `stack_top` (16-byte aligned), with interrupts enabled.
    pub fn new_thread(entry: extern "C" fn(u64) -> !, arg: u64, stack_top: u64) -> Self {
        TrapFrame {
            rip: entry as usize as u64,
            cs: u64::from(KERNEL_CS),
            rflags: 0x202, // IF, plus the always-one bit
            // As if `entry` had been called: the return slot is below the top.
            rsp: stack_top - 8,
            ss: u64::from(super::gdt::KERNEL_DS),
            rdi: arg,
            ..TrapFrame::default()
        }
    }
}

// Each stub is 16 bytes: [push 0 if the CPU pushes no error code],
// push the vector, jump to the common path.
global_asm!(
    r#"
    .section .text
    .balign 16
    .global trap_stubs
trap_stubs:
    .set vector, 0
    .rept 256
    .balign 16
    .if (vector == 8) || (vector == 10) || (vector == 11) || (vector == 12) || (vector == 13) || (vector == 14) || (vector == 17) || (vector == 21) || (vector == 29) || (vector == 30)
    .else
    pushq $0
    .endif
    pushq $vector
    jmp trap_common
    .set vector, vector + 1
    .endr

trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    cld
    movq %rsp, %rdi
    call trap_dispatch
    movq %rax, %rsp             /* the frame to resume: maybe another thread's */
    /* Off the old stack now: if the scheduler left a "stack in use" flag
       for the thread it switched away from, clear it, so another CPU may
       resume that thread (percpu::release_after_switch). */
    movq %gs:{release}, %rdx
    testq %rdx, %rdx
    jz 1f
    movq $0, %gs:{release}
    movb $0, (%rdx)
1:
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp              /* vector and error code */
    iretq
    "#,
    release = const super::percpu::SWITCH_RELEASE_OFFSET,
    options(att_syntax)
);

unsafe extern "C" {
    static trap_stubs: u8;
}

const STUB_SIZE: u64 = 16;

/// One IDT gate descriptor (Intel SDM vol. 3, 6.14.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    /// A present ring-0 interrupt gate (IF cleared on entry).
    fn interrupt(handler: u64, ist: Option<u16>) -> Self {
        Gate {
            offset_low: handler as u16,
            selector: KERNEL_CS,
            ist: ist.map_or(0, |slot| slot as u8 + 1),
            type_attr: 0x8e,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

#[repr(C, align(16))]
#[derive(Debug)]
struct Idt([Gate; 256]);

static IDT: Once<Idt> = Once::new();

/// What the layers above do with a trap: each takes the saved frame and
/// returns the frame to resume (another thread's, to switch threads).
pub type TrapHandler = fn(&mut TrapFrame) -> *mut TrapFrame;

/// The handlers the kernel installs at boot with [`init`].
#[derive(Debug, Clone, Copy)]
pub struct Handlers {
    /// CPU exceptions (vectors 0 to 31).
    pub exception: TrapHandler,
    /// The timer tick, after its end-of-interrupt.
    pub timer: TrapHandler,
    /// A thread raised [`YIELD_VECTOR`] ([`raise_yield`]).
    pub yielded: TrapHandler,
    /// After a device vector's handler ran and was acknowledged.
    pub after_device: TrapHandler,
}

static ENTRIES: Once<Handlers> = Once::new();

/// Installs `handlers`, then builds and loads the IDT: every vector goes to
/// its stub; double fault, page fault, NMI and machine check run on their
/// own interrupt stacks. Call once, before interrupts are enabled.
pub fn init(handlers: Handlers) {
    ENTRIES.call_once(|| handlers);
    let idt = IDT.call_once(|| {
        let base = (&raw const trap_stubs) as u64;
        let mut gates = [Gate::default(); 256];
        for (vector, gate) in gates.iter_mut().enumerate() {
            let ist = match vector {
                2 => Some(IST_NMI),
                8 => Some(IST_DOUBLE_FAULT),
                14 => Some(IST_PAGE_FAULT),
                18 => Some(IST_MACHINE_CHECK),
                _ => None,
            };
            *gate = Gate::interrupt(base + vector as u64 * STUB_SIZE, ist);
        }
        Idt(gates)
    });
    load(idt);
}

/// Loads the IDT [`init`] built on the calling CPU (an application
/// processor: every CPU shares the one table).
pub fn load_on_this_cpu() {
    load(IDT.get().expect("trap::init runs on the boot CPU first"));
}

fn load(idt: &'static Idt) {
    let pointer = DescriptorTablePointer {
        limit: (size_of::<Idt>() - 1) as u16,
        base: VirtAddr::new(idt as *const Idt as u64),
    };
    // SAFETY: 1. the IDT lives in a static `Once` and is never modified
    // after this point; 2. every gate points at a stub from `trap_stubs`,
    // which pushes a uniform frame and enters `trap_dispatch`.
    unsafe { lidt(&pointer) };
}

/// A handler for a device vector. It runs with interrupts off and must not
/// block; the dispatcher sends the end-of-interrupt afterwards.
pub type IrqHandler = fn(vector: u8);

static HANDLERS: [AtomicUsize; 256] = [const { AtomicUsize::new(0) }; 256];
static NEXT_DEVICE_VECTOR: AtomicUsize = AtomicUsize::new(FIRST_DEVICE_VECTOR as usize);

/// Reserves a free device vector and installs `handler` on it.
pub fn alloc_vector(handler: IrqHandler) -> Option<u8> {
    let vector = NEXT_DEVICE_VECTOR
        .try_update(Ordering::AcqRel, Ordering::Acquire, |v| {
            (v < END_DEVICE_VECTOR as usize).then_some(v + 1)
        })
        .ok()? as u8;
    HANDLERS[vector as usize].store(handler as usize, Ordering::Release);
    Some(vector)
}

/// Removes the handler of a device vector (the vector is not reused).
pub fn clear_vector(vector: u8) {
    HANDLERS[vector as usize].store(0, Ordering::Release);
}

fn device_handler(vector: u8) -> Option<IrqHandler> {
    let raw = HANDLERS[vector as usize].load(Ordering::Acquire);
    if raw == 0 {
        return None;
    }
    // SAFETY: the only non-zero values stored in HANDLERS are `IrqHandler`
    // function pointers cast to usize by `alloc_vector`.
    Some(unsafe { core::mem::transmute::<usize, IrqHandler>(raw) })
}

/// Called by `trap_common` with the saved frame; returns the frame to resume.
#[unsafe(no_mangle)]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) -> *mut TrapFrame {
    let vector = frame.vector as u8;
    // No gate reaches here before `init` has installed the handlers.
    let on = ENTRIES.get().expect("trap before trap::init");
    match vector {
        2 if super::ipi::on_nmi() => frame,
        0..=31 => (on.exception)(frame),
        TIMER_VECTOR => {
            super::apic::end_of_interrupt();
            (on.timer)(frame)
        }
        YIELD_VECTOR => (on.yielded)(frame),
        PARK_VECTOR => {
            super::apic::end_of_interrupt();
            super::ipi::on_park();
            frame
        }
        RESCHED_VECTOR => {
            super::apic::end_of_interrupt();
            (on.after_device)(frame)
        }
        SPURIOUS_VECTOR => frame,
        v if v >= PIC_BASE_VECTOR => frame, // masked legacy PIC: spurious only
        _ => {
            match device_handler(vector) {
                Some(handler) => handler(vector),
                None => crate::log!("unexpected interrupt on vector {vector:#x}"),
            }
            super::apic::end_of_interrupt();
            (on.after_device)(frame)
        }
    }
}

/// Why a thread enters the scheduler through [`YIELD_VECTOR`], as passed
/// in `rdi` (kind) and `rsi` (argument).
pub mod yield_kind {
    /// Let other ready threads run.
    pub const YIELD: u64 = 0;
    /// Sleep until the time in `rsi` (ns).
    pub const SLEEP: u64 = 1;
    /// Block on the key in `rsi`.
    pub const BLOCK: u64 = 2;
    /// The thread has finished.
    pub const EXIT: u64 = 3;
}

/// Enters the scheduler through the software yield interrupt; returns when
/// this thread is resumed, with the interrupt flag as it was. `seq` (in
/// `rdx`) is the scheduler's wake-up count the caller read before testing
/// its condition: a block is refused if a wake-up came since.
///
/// `int` is not masked by the interrupt flag, so a caller may test a
/// condition with interrupts off and block here; with `seq`, no wake-up
/// from another CPU is lost either.
pub fn raise_yield(kind: u64, arg: u64, seq: u64) {
    // SAFETY: 1. vector 0x21 is an interrupt gate to the common trap path,
    // which saves and restores every general register and RFLAGS, so the
    // asm clobbers nothing but memory (declared by omitting `nomem`);
    // 2. the trap path runs on the current stack, which is valid.
    unsafe {
        core::arch::asm!("int 0x21", in("rdi") kind, in("rsi") arg, in("rdx") seq);
    }
}
