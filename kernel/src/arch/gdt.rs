//! The GDT and TSS: kernel code and data segments, and the interrupt stacks
//! (IST) on which faults that must not trust the current stack run.

use spin::Once;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable, SegmentSelector};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

use super::boot::ist_stack_top;

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

static TSS: Once<TaskStateSegment> = Once::new();
static GDT: Once<(GlobalDescriptorTable, [SegmentSelector; 3])> = Once::new();

/// Loads the GDT and TSS. Call once, early, with interrupts off.
pub fn init() {
    let tss = TSS.call_once(|| {
        let mut tss = TaskStateSegment::new();
        for index in 0..4 {
            tss.interrupt_stack_table[index] = VirtAddr::new(ist_stack_top(index));
        }
        tss
    });
    let (gdt, [code, data, tss_sel]) = GDT.call_once(|| {
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
    // kernel code and data, which is what the running code already uses.
    unsafe {
        CS::set_reg(*code);
        SS::set_reg(*data);
        DS::set_reg(*data);
        ES::set_reg(*data);
        load_tss(*tss_sel);
    }
}
