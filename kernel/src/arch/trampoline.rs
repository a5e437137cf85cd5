//! The application processors' way from reset to Rust: a real-mode
//! trampoline, copied to a fixed page below 1 MiB, that a STARTUP IPI
//! starts (Intel SDM vol. 3, 9.4 "Multiple-processor (MP) initialization").
//!
//! A STARTUP IPI with vector `v` starts the CPU in 16-bit real mode at
//! `v << 12` (CS = `v << 8`, IP = 0). The trampoline there:
//! 1. loads its own GDT and enters 32-bit protected mode;
//! 2. loads CR3 with *temporary* page tables (below 4 GiB, in the
//!    trampoline's area) and turns paging on in long mode through the boot
//!    stub's `enable_long_mode32` (PAE, EFER.LME and NXE, PG and CR0.WP),
//!    which runs from the kernel image, then far-jumps to 64-bit code;
//! 3. jumps to `ap_entry64` in the kernel image, which loads the kernel's
//!    own CR3 and stack and calls the Rust entry with the CPU's number.
//!
//! The temporary tables are the kernel's, except that the first 2 MiB are
//! identity-mapped: the trampoline page must be mapped at its physical
//! address while paging comes on, and the kernel's tables keep the first
//! 2 MiB (the null page) unmapped. They are used only between enabling
//! paging and `ap_entry64`.
//!
//! The area ([`AREA`]) is four pages: code and parameters, PML4, PDPT, PD.
//! It lies in low memory, which the frame allocator never hands out. This
//! module only writes the area while no AP runs in it (the caller starts
//! one AP at a time and waits for it to leave); it must never grow logic
//! beyond what the mode switches need.

use core::arch::global_asm;

use crate::memory::phys_to_virt;

/// Physical address of the trampoline page (STARTUP vector `0x70`).
pub const AREA: u64 = 0x7_0000;
/// Pages the area spans: code, PML4, PDPT, PD.
pub const AREA_PAGES: u64 = 4;
/// The STARTUP IPI's vector: the page number of [`AREA`].
pub const STARTUP_PAGE: u8 = (AREA >> 12) as u8;

/// What the trampoline reads from its parameter block (at `ap_params`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// The temporary PML4 (below 4 GiB).
    pub temp_cr3: u64,
    /// The kernel's PML4.
    pub kernel_cr3: u64,
    /// The AP's first stack (its idle thread's), 16-byte aligned top.
    pub stack_top: u64,
    /// Passed to `entry` in `rdi`: the CPU's number.
    pub arg: u64,
    /// The Rust entry.
    pub entry: extern "C" fn(u64) -> !,
}

global_asm!(
    r#"
    .section .rodata.ap_trampoline, "a"
    .balign 16
    .global ap_trampoline_start
ap_trampoline_start:
    .code16
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdtr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax                        /* PE */
    movl %eax, %cr0
    ljmpl $0x08, ${area} + (ap_tramp32 - ap_trampoline_start)

    .code32
ap_tramp32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl {area} + (ap_params - ap_trampoline_start), %eax
    movl ${area} + (ap_paged - ap_trampoline_start), %ebp
    movl $enable_long_mode32, %ecx      /* in the kernel image (arch::boot) */
    jmpl *%ecx
ap_paged:
    ljmpl $0x18, ${area} + (ap_tramp64 - ap_trampoline_start)

    .code64
ap_tramp64:
    movl $0x10, %eax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movq {area} + (ap_params - ap_trampoline_start) + 8, %rbx
    movq {area} + (ap_params - ap_trampoline_start) + 16, %rcx
    movq {area} + (ap_params - ap_trampoline_start) + 24, %rdi
    movq {area} + (ap_params - ap_trampoline_start) + 32, %rdx
    movabsq $ap_entry64, %rax
    jmpq *%rax

    .balign 8
    /* Accessed bits set, as in the boot GDT: the CPU never writes it. */
ap_gdt:
    .quad 0
    .quad 0x00cf9b000000ffff            /* 0x08: 32-bit code */
    .quad 0x00cf93000000ffff            /* 0x10: data */
    .quad 0x00af9b000000ffff            /* 0x18: 64-bit code */
ap_gdtr:
    .word ap_gdtr - ap_gdt - 1
    .long {area} + (ap_gdt - ap_trampoline_start)
    .balign 8
    .global ap_params
ap_params:
    .skip 40
    .global ap_trampoline_end
ap_trampoline_end:

    .section .text
    .code64
/* In the kernel image, mapped by both the temporary and the kernel tables:
   rbx = kernel CR3, rcx = stack top, rdi = CPU number, rdx = Rust entry. */
ap_entry64:
    movq %rbx, %cr3
    movq %rcx, %rsp
    xorl %ebp, %ebp
    callq *%rdx
    ud2
    "#,
    area = const AREA,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static ap_params: u8;
}

const PAGE: u64 = 4096;
const PRESENT_WRITABLE: u64 = 0b11;
const HUGE: u64 = 1 << 7;
const ADDRESS: u64 = 0x000f_ffff_ffff_f000;

/// Copies the trampoline into [`AREA`] and builds its temporary page tables
/// from the kernel's (`kernel_pml4`, physical). The caller has checked that
/// the area is usable RAM and that no AP runs in it.
pub fn install(kernel_pml4: u64) {
    let start = (&raw const ap_trampoline_start) as u64;
    let len = (&raw const ap_trampoline_end) as u64 - start;
    assert!(len <= PAGE, "the trampoline outgrew its page");
    assert_eq!(
        size_of::<Params>(),
        40,
        "Params and the assembly's block differ"
    );
    let (pml4, pdpt, pd) = (AREA + PAGE, AREA + 2 * PAGE, AREA + 3 * PAGE);
    // SAFETY: 1. [AREA, AREA + 4 pages) is low memory, never handed out by
    // the frame allocator, and the caller checked it is RAM that no AP is
    // executing from; 2. it is reached through the physical map, which
    // covers the first 4 GiB; 3. the source is the trampoline's bytes in
    // the kernel image, `len` long, not overlapping the area.
    unsafe {
        core::ptr::copy_nonoverlapping(
            start as *const u8,
            phys_to_virt(AREA) as *mut u8,
            len as usize,
        );
    }
    copy_table(kernel_pml4, pml4);
    let kernel_pdpt = entry(kernel_pml4, 0) & ADDRESS;
    copy_table(kernel_pdpt, pdpt);
    let kernel_pd = entry(kernel_pdpt, 0) & ADDRESS;
    copy_table(kernel_pd, pd);
    set_entry(pd, 0, HUGE | PRESENT_WRITABLE); // the first 2 MiB, identity
    set_entry(pdpt, 0, pd | PRESENT_WRITABLE);
    set_entry(pml4, 0, pdpt | PRESENT_WRITABLE);
}

/// Writes the parameter block for the next AP.
pub fn set_params(params: Params) {
    let offset = (&raw const ap_params) as u64 - (&raw const ap_trampoline_start) as u64;
    let at = phys_to_virt(AREA + offset) as *mut Params;
    // SAFETY: 1. the block lies in the trampoline page `install` filled,
    // 8-byte aligned (`.balign 8`), 40 bytes = size_of::<Params>() (the
    // assembly's `.skip 40`); 2. no AP reads it now (the caller starts one
    // AP at a time and waits for it to leave the trampoline).
    unsafe { at.write_volatile(params) };
}

fn copy_table(from: u64, to: u64) {
    for index in 0..512 {
        set_entry(to, index, entry(from, index));
    }
}

fn entry(table: u64, index: u64) -> u64 {
    // SAFETY: 1. `table` is a page table (the kernel's, below 4 GiB, so in
    // the physical map) and `index` < 512: an aligned u64 read of RAM;
    // 2. reading an entry the page-table code may change is harmless here:
    // the boot entries copied (PML4, PDPT and PD of the low identity map)
    // never change after boot.
    unsafe { (phys_to_virt(table + index * 8) as *const u64).read_volatile() }
}

fn set_entry(table: u64, index: u64, value: u64) {
    debug_assert!((AREA..AREA + AREA_PAGES * PAGE).contains(&table));
    // SAFETY: 1. `table` is one of the trampoline area's own table pages
    // (asserted in debug builds; only `install` calls this, with them);
    // 2. no CPU uses those tables while they are written (no AP is in the
    // trampoline then).
    unsafe { (phys_to_virt(table + index * 8) as *mut u64).write_volatile(value) };
}
