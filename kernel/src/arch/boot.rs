//! Entry from QEMU: the PVH boot protocol, 32-bit protected mode to long mode.
//!
//! QEMU's `-kernel` loads this ELF at its physical addresses and, finding the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note, jumps to `pvh_start32` in 32-bit protected
//! mode with paging off and `ebx` holding the physical address of the
//! `hvm_start_info` block (memory map, command line, ACPI RSDP).
//!
//! The stub builds the boot page tables:
//! - the physical-memory map: all of the first 4 GiB at
//!   [`crate::memory::PHYS_OFFSET`] in 2 MiB pages (RAM above 4 GiB is added
//!   later by Rust code);
//! - the kernel image identity-mapped from 2 MiB, so the first 2 MiB, the
//!   null page included, stay unmapped;
//!
//! then enables PAE, long mode, NX, paging and CR0.WP (supervisor writes to
//! read-only pages fault, which the live snapshot relies on), and calls
//! `kernel_main(start_info_phys)` on the boot stack (the kernel's entry,
//! defined at the crate root: this file calls nothing above `arch`). This file must not grow
//! logic: anything that can be written in Rust is.

use core::arch::global_asm;

/// Size of the boot thread's stack (the `main` thread runs on it forever).
pub const BOOT_STACK_SIZE: usize = 256 * 1024;
/// Size of each interrupt stack (IST) used for faults that must not trust the
/// current stack.
pub const IST_STACK_SIZE: usize = 32 * 1024;

global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                 /* name size: "Xen\0" */
    .long 4                 /* descriptor size */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .long pvh_start32
    .balign 4

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                     /* keep start_info for kernel_main */

    /* Physical-memory map: 2048 x 2 MiB = the first 4 GiB. */
    movl $boot_pd_phys, %edi
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax                     /* present | writable | 2 MiB */
    movl %eax, (%edi,%ecx,8)
    movl $0, 4(%edi,%ecx,8)
    incl %ecx
    cmpl $2048, %ecx
    jb 1b
    movl $boot_pdpt_phys, %edi
    movl $boot_pd_phys + 3, %eax
    xorl %ecx, %ecx
2:  movl %eax, (%edi,%ecx,8)
    addl $0x1000, %eax
    incl %ecx
    cmpl $4, %ecx
    jb 2b

    /* Identity map of the kernel image: 2 MiB pages 1 .. end. */
    movl $__kernel_end, %edx
    addl $0x1fffff, %edx
    shrl $21, %edx
    movl $boot_pd_ident, %edi
    movl $1, %ecx
3:  cmpl %edx, %ecx
    jae 4f
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, (%edi,%ecx,8)
    incl %ecx
    jmp 3b
4:  movl $boot_pd_ident + 3, boot_pdpt_ident
    movl $boot_pdpt_ident + 3, boot_pml4
    movl $boot_pdpt_phys + 3, boot_pml4 + 256 * 8

    movl $boot_pml4, %eax
    movl $5f, %ebp
    jmp enable_long_mode32
5:  lgdt boot_gdt_ptr
    ljmp $0x08, $pvh_start64

/* Paging on, in long mode (compatibility until a far jump to 64-bit code),
   from 32-bit protected mode with paging off; shared by the boot CPU here
   and the other CPUs' trampoline (arch::trampoline). No stack needed:
   in: eax = PML4 (below 4 GiB), ebp = where to go on; clobbers eax, ebx,
   ecx, edx, edi. The code at ebp must be mapped by that PML4. */
    .global enable_long_mode32
enable_long_mode32:
    movl %eax, %cr3
    movl %cr4, %eax
    orl $(1 << 5), %eax                 /* PAE */
    movl %eax, %cr4
    /* EFER: long mode, and no-execute if the CPU has it. */
    movl $0x80000001, %eax
    cpuid
    movl %edx, %edi
    movl $0xC0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax                 /* LME */
    btl $20, %edi
    jnc 6f
    orl $(1 << 11), %eax                /* NXE */
6:  wrmsr
    movl %cr0, %eax
    orl $((1 << 31) | (1 << 16) | 1), %eax  /* PG | WP | PE */
    movl %eax, %cr0
    jmpl *%ebp

    .code64
pvh_start64:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorw %ax, %ax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    xorl %ebp, %ebp
    movl %esi, %edi                     /* start_info (zero-extended) */
    call kernel_main
    ud2

    .section .rodata
    .balign 8
    /* The accessed bit (type 0x9b, 0x93) is set: a CPU loading a
       segment whose bit is clear writes the descriptor, a write to the
       kernel image that no snapshot could account for. */
boot_gdt:
    .quad 0
    .quad 0x00af9b000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff            /* 0x10: data */
boot_gdt_ptr:
    .word boot_gdt_ptr - boot_gdt - 1
    .long boot_gdt

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global boot_pml4
boot_pml4:       .skip 4096
boot_pdpt_ident: .skip 4096
boot_pdpt_phys:  .skip 4096
boot_pd_ident:   .skip 4096
boot_pd_phys:    .skip 4096 * 4
    .balign 16
    .global boot_stack_bottom
boot_stack_bottom:
    .skip {boot_stack}
    .global boot_stack_top
boot_stack_top:
    .global ist_stacks_bottom
ist_stacks_bottom:
    .skip {ist_stack} * 4
    .global ist_stacks_top
ist_stacks_top:
    "#,
    boot_stack = const BOOT_STACK_SIZE,
    ist_stack = const IST_STACK_SIZE,
    options(att_syntax)
);

unsafe extern "C" {
    static ist_stacks_bottom: u8;
}

/// The top (highest address) of interrupt stack `index` (0..4).
pub fn ist_stack_top(index: usize) -> u64 {
    assert!(index < 4, "there are four interrupt stacks");
    (&raw const ist_stacks_bottom) as u64 + ((index + 1) * IST_STACK_SIZE) as u64
}
