//! The GDT and TSS: kernel code and data segments, and the interrupt stacks
//! (IST) on which faults that must not trust the current stack run. Each
//! CPU has its own pair (a TSS names one CPU's interrupt stacks), kept in
//! static arrays indexed by CPU number.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use super::boot::ist_stack_top;
use super::percpu::MAX_CPUS;

/// IST slot (1-based in the IDT, 0-based here) of the double-fault handler.
pub const IST_DOUBLE_FAULT: u16 = 0;
/// IST slot of the page-fault handler: a stack overflow faults on a guard
/// page, and the handler must still have a stack to report it.
pub const IST_PAGE_FAULT: u16 = 1;
/// IST slot of the NMI handler.
pub const IST_NMI: u16 = 2;
/// IST slot of the machine-check handler.
pub const IST_MACHINE_CHECK: u16 = 3;

/// Code segment selector loaded at init.
pub const KERNEL_CS: u16 = 0x08;
/// Data/stack segment selector loaded at init.
pub const KERNEL_DS: u16 = 0x10;

static TSS: [Once<TaskStateSegment>; MAX_CPUS] = [const { Once::new() }; MAX_CPUS];
static GDT: [Once<(GlobalDescriptorTable, [SegmentSelector; 3])>; MAX_CPUS] =
    [const { Once::new() }; MAX_CPUS];

/// Interrupt stacks per CPU.
pub const IST_STACKS: usize = 4;

/// Loads the boot CPU's GDT and TSS, with the interrupt stacks in the
/// kernel image. Call once, early, with interrupts off.
pub fn init() {
    init_cpu(0, core::array::from_fn(ist_stack_top));
}

/// Loads CPU `cpu`'s GDT and TSS, whose interrupt stacks have the tops
/// `ist_tops`. Call once per CPU, on that CPU, with interrupts off.
pub fn init_cpu(cpu: usize, ist_tops: [u64; IST_STACKS]) {
    let tss = TSS[cpu].call_once(|| {
        let mut tss = TaskStateSegment::new();
        for (index, top) in ist_tops.into_iter().enumerate() {
            tss.interrupt_stack_table[index] = VirtAddr::new(top);
        }
        tss
    });
    let (gdt, [code, data, tss_sel]) = GDT[cpu].call_once(|| {
        let mut gdt = GlobalDescriptorTable::new();
        let code = gdt.append(Descriptor::kernel_code_segment());
        let data = gdt.append(Descriptor::kernel_data_segment());
        let tss_sel = gdt.append(Descriptor::tss_segment(tss));
        (gdt, [code, data, tss_sel])
    });
    assert_eq!(
        (code.0, data.0),
        (KERNEL_CS, KERNEL_DS),
        "GDT layout changed"
    );
    gdt.load();
    // SAFETY: 1. the selectors index the GDT just loaded, which lives in a
    // static for the rest of the kernel's life; 2. they describe flat 64-bit
    // kernel code and data, which is what the running code already uses;
    // 3. the TSS is this CPU's own, never loaded by another (a TSS selector
    // is loaded once: `ltr` marks it busy).
    unsafe {
        CS::set_reg(*code);
        SS::set_reg(*data);
        DS::set_reg(*data);
        ES::set_reg(*data);
        load_tss(*tss_sel);
    }
}
