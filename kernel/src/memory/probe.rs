//! Memory probes: a read or write that reports a page fault as an error
//! instead of stopping the kernel, like an exception table. Tests use them
//! to check mappings and permissions from the inside (that a write-protected
//! page really faults, with the right CR2).
//!
//! The faulting instruction of each probe is listed in [`fixups`]; the page
//! fault handler resumes a faulting probe at its recovery label and records
//! the fault here.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

use snapshot::policy::fault::{Fixup, PageFault};
use x86_64::structures::paging::PageTableFlags;

use super::paging::{map_page, set_flags, unmap_page, MapError};
use super::{frames, PAGE_SIZE};

global_asm!(
    r#"
    .section .text
    .global probe_read_u64
    .global probe_read_insn
    .global probe_read_resume
/* u64 probe_read_u64(u64 addr, u64 *out): 0 on success, 1 on fault */
probe_read_u64:
    xorl %eax, %eax
probe_read_insn:
    movq (%rdi), %rdx
    movq %rdx, (%rsi)
    ret
probe_read_resume:
    movl $1, %eax
    ret

    .global probe_write_u64
    .global probe_write_insn
    .global probe_write_resume
/* u64 probe_write_u64(u64 addr, u64 value): 0 on success, 1 on fault */
probe_write_u64:
    xorl %eax, %eax
probe_write_insn:
    movq %rsi, (%rdi)
    ret
probe_write_resume:
    movl $1, %eax
    ret
    "#,
    options(att_syntax)
);

unsafe extern "C" {
    fn probe_read_u64(addr: u64, out: *mut u64) -> u64;
    fn probe_read_insn();
    fn probe_read_resume();
    fn probe_write_u64(addr: u64, value: u64) -> u64;
    fn probe_write_insn();
    fn probe_write_resume();
}

/// The probe instructions allowed to fault, and where each resumes.
pub fn fixups() -> [Fixup; 2] {
    [
        Fixup {
            insn: probe_read_insn as *const () as u64,
            resume: probe_read_resume as *const () as u64,
        },
        Fixup {
            insn: probe_write_insn as *const () as u64,
            resume: probe_write_resume as *const () as u64,
        },
    ]
}

static FAULT_ADDR: AtomicU64 = AtomicU64::new(0);
static FAULT_RIP: AtomicU64 = AtomicU64::new(0);
static FAULT_CODE: AtomicU64 = AtomicU64::new(0);

/// Called by the page-fault handler when a probe faulted.
pub fn record(fault: &PageFault) {
    FAULT_ADDR.store(fault.addr, Ordering::Relaxed);
    FAULT_RIP.store(fault.rip, Ordering::Relaxed);
    FAULT_CODE.store(fault.code.bits(), Ordering::Relaxed);
}

fn last_fault() -> PageFault {
    PageFault::new(
        FAULT_ADDR.load(Ordering::Relaxed),
        FAULT_RIP.load(Ordering::Relaxed),
        FAULT_CODE.load(Ordering::Relaxed),
    )
}

/// Reads the `u64` at `addr`, or returns the page fault that read caused.
pub fn read_u64(addr: u64) -> Result<u64, PageFault> {
    let mut value = 0;
    // SAFETY: 1. a fault on the load is caught by the page-fault handler
    // (the instruction is in `fixups`) and turned into a return value, so
    // any canonical address is acceptable; 2. the load is a plain read of
    // memory the kernel maps, with no effect on Rust-visible state beyond
    // writing `value`, which is a local.
    let faulted = unsafe { probe_read_u64(addr, &mut value) };
    if faulted == 0 {
        Ok(value)
    } else {
        Err(last_fault())
    }
}

fn write_u64(addr: u64, value: u64) -> Result<(), PageFault> {
    // SAFETY: 1. as for `read_u64`, a fault is caught and reported; 2. the
    // only caller, `ScratchPage::probe_write`, passes an address inside the
    // page it owns, so the store cannot break another owner's invariants.
    let faulted = unsafe { probe_write_u64(addr, value) };
    if faulted == 0 {
        Ok(())
    } else {
        Err(last_fault())
    }
}

/// Start of the window where scratch pages are mapped.
const SCRATCH_BASE: u64 = 0xffff_b000_0000_0000;
static NEXT_SCRATCH: AtomicU64 = AtomicU64::new(SCRATCH_BASE);

/// A page of its own, mapped at a fresh address, whose permissions the
/// owner may change and then probe: the safe way to check that the MMU
/// enforces what the page tables say.
#[derive(Debug)]
pub struct ScratchPage {
    virt: u64,
}

impl ScratchPage {
    /// Allocates and maps a zeroed, writable page.
    pub fn new() -> Result<Self, MapError> {
        let frame = frames::alloc_zeroed().ok_or(MapError::OutOfFrames)?;
        let virt = NEXT_SCRATCH.fetch_add(PAGE_SIZE, Ordering::Relaxed);
        if let Err(e) = map_page(virt, frame.start_address().as_u64(), Self::flags(true)) {
            let _ = frames::free(frame);
            return Err(e);
        }
        Ok(ScratchPage { virt })
    }

    fn flags(writable: bool) -> PageTableFlags {
        let base = PageTableFlags::PRESENT | PageTableFlags::NO_EXECUTE;
        if writable {
            base | PageTableFlags::WRITABLE
        } else {
            base
        }
    }

    /// The page's virtual address.
    pub fn addr(&self) -> u64 {
        self.virt
    }

    /// Makes the page writable or read-only (the TLB entry is flushed on
    /// every CPU).
    pub fn set_writable(&self, writable: bool) -> Result<(), MapError> {
        set_flags(self.virt, Self::flags(writable)).map(|flush| flush.flush_everywhere())
    }

    /// Writes `value` at `offset` (8-byte aligned, inside the page), or
    /// returns the page fault the write caused.
    pub fn probe_write(&self, offset: u64, value: u64) -> Result<(), PageFault> {
        assert!(
            offset.is_multiple_of(8) && offset < PAGE_SIZE,
            "offset {offset:#x} outside the page"
        );
        write_u64(self.virt + offset, value)
    }
}

impl Drop for ScratchPage {
    fn drop(&mut self) {
        match unmap_page(self.virt) {
            Ok((frame, flush)) => {
                flush.flush_everywhere();
                if let Err(e) = frames::free(frame) {
                    crate::log!("scratch page {:#x}: {e}", self.virt);
                }
            }
            Err(e) => crate::log!("scratch page {:#x}: cannot unmap: {e:?}", self.virt),
        }
    }
}
